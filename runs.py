"""What the entry points share about a run: its flags checked, its data, its name and files, its model.

train.py, test.py and the scripts import this module; it imports none of them.
"""
import os

import torch
import torch.nn as nn

from checkpoints import load_pretrained
from dataloader import check_episode_flags, root_names
from models.glofa import GLoFA
from networks import build_encoder
from utils import UserError

FEAT_WEIGHTS = {'resnet': 'Res12-pre.pth', 'convnet': 'con-pre.pth'}


def data_path(args) -> list[str]:
    """The dataset roots: --data_path, else datasets/<data_name>."""
    return list(args.data_path) if args.data_path else [os.path.join('datasets', args.data_name)]


def data_label(args) -> str:
    """The data part of a run name: --data_name for one root; for several, the roots' names joined
    by '+' and the task mix, e.g. demo+demo_fine-mixclass."""
    roots = data_path(args)
    if len(roots) == 1:
        return args.data_name
    return '+'.join(name.replace('/', '_') for name in root_names(roots)) + f'-mix{args.task_mix}'


def run_name(args) -> str:
    """The flags that define a run, e.g. mini_imagenet-resnet-glofa-N5-K1-Q15-lrn0.0001-lr0.01-point20_30_40-gamma0.2-tau1-delta1."""
    name = (f'{data_label(args)}-{args.network_name}-{args.model_name}-N{args.N}-K{args.K}-Q{args.Q}'
            f'-lrn{args.lr_network:g}-lr{args.lr:g}-point{"_".join(map(str, args.point))}-gamma{args.gamma:g}'
            f'-tau{args.tau:g}-delta{args.delta:g}')
    if args.adaptor != 'both':
        name += f'-{args.adaptor}'
    if args.h_bias_init is not None:
        name += f'-hbias{args.h_bias_init:g}'
    return name


def run_paths(args) -> dict:
    name = run_name(args)
    models, stats = os.path.join(args.save_dir, 'trained_models'), os.path.join(args.save_dir, 'statistics')
    return {'model': os.path.join(models, f'{name}.model'), 'last': os.path.join(models, f'{name}.last.model'),
            'stat': os.path.join(stats, f'{name}.stat'), 'log': os.path.join(stats, f'{name}.log.jsonl')}


def run_config(args) -> dict:
    """What a checkpoint must agree with to be loaded into this run's model."""
    return {'network_name': args.network_name, 'N': args.N, 'K': args.K, 'adaptor': args.adaptor}


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
        model.encoder = nn.DataParallel(model.encoder, device_ids=args.devices)
    return model



def check_args(args, device: torch.device) -> None:
    check_episode_flags(args.N, args.K, args.Q)
    for flag in ('n_training_episodes', 'n_validating_episodes', 'n_testing_episodes', 'episode_gap'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    if args.tau <= 0:
        raise UserError(f'--tau must be positive, got {args.tau}')
    if args.n_workers < 0:
        raise UserError(f'--n_workers must be 0 or more, got {args.n_workers}')
    if args.amp and device.type != 'cuda':
        raise UserError('--amp needs a CUDA device (this run is on the CPU)')
