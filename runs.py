"""What the entry points share about a run: its flags checked, its data, its name and files, its model.

train.py, test.py and the scripts import this module; it imports none of them.
"""
import hashlib
import json
import os

import torch

from checkpoints import load_pretrained, read_file
from dataloader import check_episode_flags, root_names
from models.glofa import GLoFA
from networks import build_encoder, data_parallel
from utils import UserError

FEAT_WEIGHTS = {'resnet': 'Res12-pre.pth', 'convnet': 'con-pre.pth'}


def data_path(args) -> list[str]:
    """The dataset roots: --data_path, else datasets/<data_name>."""
    paths = args.data_path or os.path.join('datasets', args.data_name)
    return [paths] if isinstance(paths, str) else list(paths)


def data_label(args) -> str:
    """The data part of a run name: the root's folder name; for several roots, their names joined by
    '+' and the task mix, e.g. demo+demo_fine-mixclass."""
    roots = data_path(args)
    if len(roots) == 1:
        return os.path.basename(os.path.normpath(roots[0])) or 'data'
    return '+'.join(name.replace('/', '_') for name in root_names(roots)) + f'-mix{args.task_mix}'


def run_identity(args) -> dict:
    """Everything that defines a run's result: the data (names and locations), the model, the
    optimisation, the schedule and the seed. Execution options (device, workers, --amp,
    --channels_last, --save_dir) are left out: they change how fast a run goes, not what it is."""
    return {
        'data': [os.path.normpath(os.path.abspath(root)) for root in data_path(args)],
        'task_mix': args.task_mix if len(data_path(args)) > 1 else None,  # one root: the mix changes nothing
        'network_name': args.network_name, 'model_name': args.model_name, 'adaptor': args.adaptor,
        'pretrained': os.path.basename(args.pretrained), 'tau': args.tau, 'delta': args.delta,
        'N': args.N, 'K': args.K, 'Q': args.Q,
        'n_training_episodes': args.n_training_episodes, 'episode_gap': args.episode_gap,
        'n_validating_episodes': args.n_validating_episodes,
        'lr_network': args.lr_network, 'lr': args.lr, 'point': list(args.point), 'gamma': args.gamma,
        'wd': args.wd, 'mo': args.mo, 'seed': args.seed, 'h_bias_init': args.h_bias_init,
    }


def run_name(args) -> str:
    """A readable name plus a short hash of the run's whole identity, so distinct runs never share
    files, e.g. mini_imagenet-resnet-glofa-N5-K1-seed960402-1a2b3c4d."""
    digest = hashlib.sha256(json.dumps(run_identity(args), sort_keys=True).encode()).hexdigest()[:8]
    variant = '' if args.adaptor == 'both' else f'-{args.adaptor}'
    if args.h_bias_init is not None:
        variant += f'-hbias{args.h_bias_init:g}'
    return (f'{data_label(args)}-{args.network_name}-{args.model_name}{variant}-N{args.N}-K{args.K}-seed{args.seed}'
            f'-{digest}')


def run_paths(args) -> dict:
    """The run's files under --save_dir: best checkpoint, last state, statistics, JSON log, identity."""
    name = run_name(args)
    models, stats = os.path.join(args.save_dir, 'trained_models'), os.path.join(args.save_dir, 'statistics')
    return {'model': os.path.join(models, f'{name}.model'), 'last': os.path.join(models, f'{name}.last.model'),
            'stat': os.path.join(stats, f'{name}.stat'), 'log': os.path.join(stats, f'{name}.log.jsonl'),
            'identity': os.path.join(stats, f'{name}.run.json')}


def check_existing_run(args, paths: dict) -> bool:
    """Whether this run resumes its saved state. No run's files are replaced silently: a finished run
    stops here unless --overwrite is given, an unfinished one unless --resume or --overwrite is."""
    existing = [paths[k] for k in ('model', 'last', 'stat', 'log') if os.path.isfile(paths[k])]
    if args.overwrite:
        removed = [path for path in existing + [paths['identity']] if os.path.isfile(path)]
        for path in removed:
            os.remove(path)
        if removed:
            print(f'--overwrite: removed the {len(removed)} files of the earlier run {run_name(args)}')
        return False
    if os.path.isfile(paths['last']):
        record = read_file(paths['last'], 'resume checkpoint', weights_only=False)
        finished = not isinstance(record, dict) or record.get('finished', True)
        if args.resume and not finished:
            return True
        if not finished:
            raise UserError(f"an unfinished run with these flags is saved in {paths['last']} (episode "
                            f"{record.get('episode')}): add --resume to continue it, or --overwrite to start over")
    elif not existing:
        if args.resume:
            print(f"no checkpoint {paths['last']} yet: starting a new run")
        return False
    where = paths['model'] if os.path.isfile(paths['model']) else existing[0]
    raise UserError(f'this run is already finished: its files are {where} and the rest under {args.save_dir}; '
                    f'evaluate them with test.py and the same flags, or add --overwrite to train it again')


def run_config(args) -> dict:
    """What a checkpoint records of the model it holds: network, way, shot and adaptor ablation."""
    return {'network_name': args.network_name, 'N': args.N, 'K': args.K, 'adaptor': args.adaptor}


def model_config(args) -> dict:
    """What a checkpoint must agree with to be loaded into this model. GLoFA's parameters do not
    depend on N or K (the set functions take sets of any size), so any way and shot may be evaluated."""
    return {'network_name': args.network_name, 'adaptor': args.adaptor}


def list_runs(save_dir: str, suffix: str) -> list[str]:
    """Files ending in ``suffix`` under ``save_dir``'s trained_models/ and statistics/, sorted."""
    found = []
    for folder in ('trained_models', 'statistics'):
        path = os.path.join(save_dir, folder)
        if os.path.isdir(path):
            found += [os.path.join(path, f) for f in sorted(os.listdir(path))
                      if f.endswith(suffix) and not f.endswith('.last' + suffix)]
    return found


def missing_run_message(what: str, path: str, save_dir: str, suffix: str) -> str:
    """'<what> <path> not found; runs under <save_dir>: a, b' (or: 'no runs under ...')."""
    found = list_runs(save_dir, suffix)
    if not found:
        return f'{what} {path} not found, and there are no runs under {save_dir}: train one first (train.py)'
    names = ', '.join(os.path.basename(f)[:-len(suffix)] for f in found[:5])
    more = f' and {len(found) - 5} more' if len(found) > 5 else ''
    return (f'{what} {path} not found; runs under {save_dir}: {names}{more} '
            f'(give the flags of one of them, or its file with --model_path)')


def prepare_demo(args) -> None:
    """Generate the built-in demo data once (deterministic), where --data_path points: one root for
    --demo, two (coarse, then fine) for --demo mixed."""
    from demo import generate_demo_dataset, generate_fine_dataset
    roots = data_path(args)
    if args.demo == 'mixed':
        if len(roots) != 2:
            raise UserError(f'--demo mixed writes two roots, the coarse demo then the fine one: give --data_path '
                            f'COARSE FINE (got {len(roots)} root{"s" if len(roots) > 1 else ""})')
        generate_demo_dataset(roots[0])
        generate_fine_dataset(roots[1])
    else:
        if len(roots) != 1:
            raise UserError(f'--demo writes one root, got {len(roots)} in --data_path (--demo mixed writes two)')
        generate_demo_dataset(roots[0])


# ------------------------------------------------------------------ model
def build_model(args, pretrained: bool = True) -> GLoFA:
    """GLoFA on the chosen encoder; with ``pretrained``, the encoder starts from --pretrained."""
    encoder = build_encoder(args.network_name)
    if pretrained and args.pretrained.lower() != 'none':
        if not os.path.isfile(args.pretrained):
            raise UserError(f'pretrained weights {args.pretrained} not found: download FEAT\'s '
                            f'{FEAT_WEIGHTS[args.network_name]} (github.com/Sha-Lab/FEAT) and pass --pretrained PATH, '
                            f'or use --pretrained none to train from scratch')
        n = load_pretrained(encoder, args.pretrained)
        print(f'loaded {n} encoder tensors from {args.pretrained}')
    return GLoFA(encoder, encoder.out_dim, tau=args.tau, delta=args.delta, adaptor=args.adaptor,
                 h_bias_init=args.h_bias_init)


def place_model(model: GLoFA, args, device: torch.device) -> GLoFA:
    """Move the model to ``device``; several --devices wrap the encoder in DataParallel."""
    model.to(device)
    if args.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    if device.type == 'cuda' and len(args.devices) > 1:
        model.encoder = data_parallel(model.encoder, args.devices)
    return model



def check_args(args, device: torch.device) -> None:
    check_episode_flags(args.N, args.K, args.Q)
    for flag in ('n_training_episodes', 'n_validating_episodes', 'n_testing_episodes', 'episode_gap'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    if args.tau <= 0:
        raise UserError(f'--tau must be positive, got {args.tau}')
    for flag in ('n_workers', 'episode_batch'):
        if getattr(args, flag) < 0:
            raise UserError(f'--{flag} must be 0 or more, got {getattr(args, flag)}')
    if args.amp and device.type != 'cuda':
        raise UserError('--amp needs a CUDA device (this run is on the CPU)')
