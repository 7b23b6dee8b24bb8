"""What the entry points share about a run: its flags checked, its data, its identity and files, what
happens to an existing one, its saved state, its model.

train.py, test.py, pretrain.py and the scripts import this module; it imports none of them.
"""
import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import distributed
from checkpoints import atomic_save, check_config, load_pretrained, load_strict, model_state_dict, read_file, \
    saved_forward_count
from evaluation import ADAPTOR_RECORD, gradient_norm
from dataloader import SPLITS, FewShotDataset, TieredDataset, dataset_format, overlap_error, root_names
from arguments import DOMAINS, MODEL_FLAGS, domain_error, feat_regulariser, parse_args, parse_pretrain_args
from models import FewShotModel
from models.feat import FEAT
from models.glofa import GLoFA
from models.protonet import ProtoNet
from networks import NETWORKS, build_encoder, data_parallel, forward_count, set_forward_count
from utils import NonFiniteLoss, UserError, append_log, backward_and_step, on_failed_start, progress, random_states, \
    set_random_states, writing

FEAT_WEIGHTS = {'resnet': 'Res12-pre.pth', 'convnet': 'con-pre.pth'}
# the flags that choose what the data layer reads, named when it refuses something
DATA_FLAGS = '--data_path (or --demo for the built-in demo data)'
EPISODE_FLAGS = '--N, --K, --Q, or --task_mix with several roots'


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


def data_identity(args) -> dict:
    """The data of a run: its roots' absolute locations, and the task mix when there are several."""
    roots = data_path(args)
    return {'data': [os.path.normpath(os.path.abspath(root)) for root in roots],
            'task_mix': args.task_mix if len(roots) > 1 else None}  # one root: the mix changes nothing


def model_flags(args) -> dict:
    """The chosen model's own flags (arguments.MODEL_FLAGS), FEAT's regulariser resolved for the shot."""
    flags = {flag: getattr(args, flag) for flag in MODEL_FLAGS[args.model_name]}
    if args.model_name == 'feat':
        flags['temperature2'], flags['balance'] = feat_regulariser(args, args.K)
    return flags


def later_flags(args) -> dict:
    """Flags added after runs were first named: in an identity only when they differ from their default,
    so that every run named before them keeps its name and files."""
    return {**({'normalization': args.normalization} if args.normalization != 'imagenet' else {}),
            **({'freeze_encoder': True} if getattr(args, 'freeze_encoder', False) else {})}


def run_identity(args) -> dict:
    """Everything that defines a run's result: the data (names and locations), the model and its flags,
    the optimisation, the schedule and the seed. Execution options (device, workers, --amp,
    --channels_last, --save_dir) are left out: they change how fast a run goes, not what it is."""
    return {
        **data_identity(args),
        'network_name': args.network_name, 'model_name': args.model_name, **model_flags(args), **later_flags(args),
        'pretrained': os.path.basename(args.pretrained),
        'N': args.N, 'K': args.K, 'Q': args.Q,
        'n_training_episodes': args.n_training_episodes, 'episode_gap': args.episode_gap,
        'n_validating_episodes': args.n_validating_episodes,
        'lr_network': args.lr_network, 'lr': args.lr, 'point': list(args.point), 'gamma': args.gamma,
        'wd': args.wd, 'mo': args.mo, 'seed': args.seed,
    }


def pretrain_identity(args) -> dict:
    """What defines a pretraining's result, as ``run_identity`` for meta-training. The number of epochs is
    left out: a finished pretraining can be continued with --resume and more --epochs."""
    return {**data_identity(args), 'network_name': args.network_name, **later_flags(args), 'batch_size': args.batch_size,
            'optimizer': args.optimizer, 'lr': args.lr, 'milestones': list(args.milestones), 'gamma': args.gamma,
            'wd': args.wd, 'seed': args.seed}


# what a checkpoint must agree with to be evaluated (no model's parameters depend on N, K or Q)
MODEL_KEYS = {'glofa': ('adaptor',), 'protonet': ('metric',), 'feat': ('metric',)}


def model_config(args) -> dict:
    return {'network_name': args.network_name, 'model_name': args.model_name,
            **{key: getattr(args, key) for key in MODEL_KEYS[args.model_name]}}


def run_name(args) -> str:
    """A readable name plus a short hash of the run's whole identity, so distinct runs never share
    files, e.g. mini_imagenet-resnet-glofa-N5-K1-seed960402-1a2b3c4d."""
    digest = hashlib.sha256(json.dumps(run_identity(args), sort_keys=True).encode()).hexdigest()[:8]
    if args.model_name == 'glofa':
        variant = '' if args.adaptor == 'both' else f'-{args.adaptor}'
        if args.h_bias_init is not None:
            variant += f'-hbias{args.h_bias_init:g}'
    else:
        variant = '' if args.metric == 'euclidean' else f'-{args.metric}'
    if getattr(args, 'freeze_encoder', False):
        variant += '-frozen'
    return (f'{data_label(args)}-{args.network_name}-{args.model_name}{variant}-N{args.N}-K{args.K}-seed{args.seed}'
            f'-{digest}')


@dataclass
class RunPaths:
    """A run's files."""
    best: str      # the best weights: train.py's <run>.model, pretrain.py's FEAT-format output
    last: str      # the whole state after the last finished episode gap or epoch, to resume from
    log: str       # one JSON line per validation
    identity: str  # <run>.run.json: what defines the run
    stat: Optional[str] = None  # train.py: the statistics record of the reference code

    def files(self) -> list[str]:
        return [p for p in (self.best, self.last, self.stat, self.log, self.identity) if p]


def run_paths(args) -> RunPaths:
    """A meta-training run's files under --save_dir: best checkpoint, last state, statistics, JSON log, identity."""
    name = run_name(args)
    models, stats = os.path.join(args.save_dir, 'trained_models'), os.path.join(args.save_dir, 'statistics')
    return RunPaths(best=os.path.join(models, f'{name}.model'), last=os.path.join(models, f'{name}.last.model'),
                    log=os.path.join(stats, f'{name}.log.jsonl'), identity=os.path.join(stats, f'{name}.run.json'),
                    stat=os.path.join(stats, f'{name}.stat'))


def pretrain_paths(args) -> RunPaths:
    """The FEAT-format weights (--out, else under <save_dir>/pretrained/), and beside them the state to
    resume from, the JSON log and the identity."""
    data = data_label(args)  # the data folder's name (roots and mix), as train.py's runs
    out = args.out or os.path.join(args.save_dir, 'pretrained', f'{data}-{args.network_name}-pretrain-seed{args.seed}.pth')
    base = os.path.splitext(out)[0]
    return RunPaths(best=out, last=f'{base}.last.pth', log=f'{base}.log.jsonl', identity=f'{base}.run.json')


def check_existing_run(args, paths: RunPaths, finished: Callable[[dict], bool], unit: str,
                       use_it: str) -> Optional[dict]:
    """The saved state this run resumes, or None to start afresh. One rule for every entry point:
    --resume and --overwrite exclude each other; --overwrite removes the run's files; an unfinished run
    is continued with --resume and never replaced without --overwrite; a finished one (``finished``
    of its saved state) is never replaced without --overwrite. ``unit`` names what the state counts
    ('episode', 'epoch'); ``use_it`` says what to do with a finished run instead."""
    if args.resume and args.overwrite:
        raise UserError('--resume continues the saved run, --overwrite replaces it: give one of them')
    if distributed.is_main_process():
        RunLock.take(paths)
    if args.overwrite:
        removed = [path for path in paths.files() if path != paths.identity and os.path.isfile(path)]  # the
        # identity holds the lock, and is rewritten
        if distributed.is_main_process():
            for path in removed:
                os.remove(path)
            if removed:
                print(f'--overwrite: removed the {len(removed)} files of the earlier run in '
                      f'{os.path.dirname(paths.last)}')
        return None
    record = read_file(paths.last, 'resume state') if os.path.isfile(paths.last) else None
    if record is not None and not (isinstance(record, dict) and 'optimizer' in record and unit in record):
        raise UserError(f'{paths.last} is not a saved state of this program: move it away or pass --overwrite')
    if record is not None and not finished(record):
        if args.resume:
            return record
        raise UserError(f'an unfinished run with these flags is saved in {paths.last} ({unit} {record[unit]}): '
                        f'add --resume to continue it, or --overwrite to start over')
    existing = [p for p in paths.files() if p != paths.identity and os.path.isfile(p)]
    if existing:
        where = paths.best if os.path.isfile(paths.best) else existing[0]
        state = f' (finished at {unit} {record[unit]})' if record is not None else ', without a state to resume'
        raise UserError(f'this run is already done{state}: its files are {where} and the rest beside it; '
                        f'{use_it}, or add --overwrite to run it again')
    if args.resume and distributed.is_main_process():
        others = [(name, diff, saved_state(os.path.join(args.save_dir, 'trained_models', f'{name}.last.model')))
                  for name, diff in (other_runs(args) if paths.stat else [])]  # train.py's runs: named by identity
        unfinished = [(name, diff) for name, diff, state in others if state == 'unfinished']
        if unfinished:
            name, diff = unfinished[0]
            raise UserError(f'--resume: no run with these flags, but the unfinished run {name} of the same data and '
                            f'model differs only in {describe_differences(diff)}: give its flags to continue it, or '
                            f'drop --resume to start this new run')
        for name, diff, state in others[:3]:
            print(f'note: no run with these flags; the {state} run {name} differs in {describe_differences(diff)}')
        print(f'no saved state {paths.last} yet: starting a new run')
    return None


def other_runs(args) -> list[tuple[str, dict]]:
    """Runs under --save_dir of the same data, network and model with another identity: (name, {flag:
    (here, there)}), fewest differences first. Reads their identity files only."""
    here, name_here = run_identity(args), run_name(args)
    folder = os.path.join(args.save_dir, 'statistics')
    found = []
    for file in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if not file.endswith('.run.json'):
            continue
        try:
            with open(os.path.join(folder, file)) as f:
                there = json.load(f)
        except (OSError, ValueError):
            continue
        name = there.pop('run', file[:-len('.run.json')]) if isinstance(there, dict) else None
        if not isinstance(name, str) or os.path.basename(name) != name or name in ('', '.', '..'):
            continue  # a record whose name would lead out of --save_dir's folders is not a run of ours
        if name == name_here or any(there.get(k) != here[k] for k in ('data', 'network_name', 'model_name')):
            continue
        found.append((name, {k: (here.get(k), there.get(k)) for k in sorted(set(here) | set(there))
                             if here.get(k) != there.get(k)}))
    return sorted(found, key=lambda run: len(run[1]))


def saved_state(last: str) -> str:
    """What a run's 'last' file says: 'not started' (no file), 'finished', 'unfinished', or 'saved' (a state
    this version cannot read). A state without the 'finished' key is finished, as train.py reads it."""
    if not os.path.isfile(last):
        return 'not started'
    try:
        return 'finished' if read_file(last, 'resume state').get('finished', True) else 'unfinished'
    except UserError:
        return 'saved'


def unfinished_line(checkpoint: str) -> Optional[str]:
    """For the best checkpoint of a run that is still training or was stopped: 'note: ... unfinished (episode
    k of n) ...'; None for a finished run or a file that is not a run's."""
    if not checkpoint.endswith('.model') or checkpoint.endswith('.last.model'):
        return None
    last = checkpoint[:-len('.model')] + '.last.model'
    try:
        state = read_file(last, 'resume state') if os.path.isfile(last) else None
    except UserError:
        return None
    if not isinstance(state, dict) or state.get('finished', True):
        return None
    total = (state.get('config') or {}).get('n_training_episodes', '?')
    return (f"note: this run is unfinished (episode {state.get('episode')} of {total}: still training, or stopped): "
            f"its best checkpoint so far is evaluated, not the run's result")


def describe_differences(diff: dict) -> str:
    return ', '.join(f'{k} ({here} here, {there} there)' for k, (here, there) in diff.items())


class RunLock:
    """An exclusive lock on a run for the life of this process: fcntl.flock on its identity file
    (<run>.run.json, which every run writes anyway), so a second process training the same run is
    refused, and a crash releases the lock with the process."""
    held: dict = {}  # locked path -> its open file, for this process

    @classmethod
    def take(cls, paths: RunPaths) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock
            return
        path = os.path.abspath(paths.identity)
        if path in cls.held:  # this process holds it already (a run started again in the same process)
            return
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        new = not os.path.exists(path)
        f = open(path, 'a')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise UserError(f'this run is being trained by another process (its lock is on {path}): wait for it to '
                            f'end, or stop it; a crashed process releases the lock') from None
        cls.held[path] = f
        if new:  # a start that fails before the identity is written leaves no empty file behind
            on_failed_start(lambda: cls.release_unstarted(path))

    @classmethod
    def release_unstarted(cls, path: str) -> None:
        f = cls.held.pop(path, None)
        if f is not None:
            f.close()
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                os.remove(path)


def write_identity(identity: dict, paths: RunPaths) -> None:
    """<run>.run.json: the flags that define the run (what its name stands for)."""
    os.makedirs(os.path.dirname(paths.identity) or '.', exist_ok=True)
    with writing(paths.identity), open(paths.identity, 'w') as f:  # in place: the file is the run's lock (RunLock)
        json.dump(identity, f, indent=1)


# ------------------------------------------------------------------ a training run and its saved state
@dataclass
class Progress:
    """Where a training run stands; filled in as it goes, so that an interruption can say it."""
    done: int = 0                 # training episodes (train.py) or epochs (pretrain.py) done
    saved: Optional[int] = None   # the count whose state the 'last' file holds
    best_accuracy: float = 0.0    # best validation accuracy so far, in [0, 1]
    best_at: int = 0              # and when
    statistics: dict = field(default_factory=lambda: {'training_loss': [], 'validating_accuracy': []})


@dataclass
class Run:
    """One training run: its flags, files, model, optimisation and progress, handed from phase to phase."""
    args: object
    device: torch.device
    paths: RunPaths
    model: nn.Module          # in DistributedDataParallel under torchrun (pretrain.py)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    scaler: Optional[torch.amp.GradScaler]
    config: dict              # what the saved state must agree with to be resumed
    progress: Progress = field(default_factory=Progress)
    generators: dict = field(default_factory=dict)  # named samplers' generators, saved with the state
    tensorboard: Optional[object] = None  # a SummaryWriter with --tensorboard (open_tensorboard)

    @property
    def plain(self) -> nn.Module:
        return distributed.unwrap(self.model)


def tensorboard_writer_class():
    """torch's SummaryWriter, or one line with the install command when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard; '
                        'the JSON log and scripts/plot_curves.py have the same figures)') from None
    except Exception as error:  # noqa: BLE001 (an install that breaks on import: a version that does not fit)
        raise UserError(f'--tensorboard: the tensorboard package fails on import ({type(error).__name__}: '
                        f'{str(error).strip().splitlines()[0] if str(error).strip() else ""}); reinstall it with pip '
                        f'install --upgrade tensorboard, or drop --tensorboard') from None
    return SummaryWriter


def open_tensorboard(run: Run, name: str) -> None:
    """--tensorboard (rank 0): a writer under <save_dir>/tensorboard/<name> that continues after the saved state:
    events of later steps, written by the interrupted process after its last save, are dropped (purge_step), so
    a resumed run has each step once."""
    if not run.args.tensorboard or not distributed.is_main_process():
        return
    folder = os.path.join(run.args.save_dir, 'tensorboard', name)
    run.tensorboard = tensorboard_writer_class()(folder, purge_step=run.progress.done + 1)
    print(f'TensorBoard: tensorboard --logdir {os.path.join(run.args.save_dir, "tensorboard")} (this run: {folder})')


def log_entry(run: Run, entry: dict, step: str) -> None:
    """One line of the run's JSON log, and with --tensorboard its numbers as scalars at step ``entry[step]``."""
    append_log(run.paths.log, entry)
    if run.tensorboard is not None:
        for key, value in entry.items():
            if key != step and isinstance(value, (int, float)) and not isinstance(value, bool):
                run.tensorboard.add_scalar(key, value, entry[step])
        run.tensorboard.flush()


def check_finite(loss: torch.Tensor, run: Run, where: str, unit: str, flags: str) -> None:
    """Stop the run (NonFiniteLoss, exit 2) at a loss that is inf or nan, naming the state kept."""
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f'training loss became {loss.item()} at {where}; stopped. The state after {unit} '
                            f'{run.progress.saved} is kept in {run.paths.last}; runs are deterministic, so resuming '
                            f'with the same flags meets the same loss: try a lower {flags}')


def interrupted_message(run: Run, during: str, unit: str) -> str:
    """What an interrupted run says: what was running, and what is saved."""
    if run.progress.saved is None:
        return f'interrupted during {during}, before any state was saved'
    return (f'interrupted during {during}; the state after {unit} {run.progress.saved} is saved in '
            f'{run.paths.last}: run the same command with --resume to continue')


def save_last(run: Run, finished: bool, **fields) -> None:
    """The whole state of the run, written atomically by rank 0: weights, optimizer, scheduler, scaler,
    every process's random states, the generators, the encoder's pass count, the config, ``fields``."""
    states = distributed.gather_objects(random_states())
    if distributed.is_main_process():
        atomic_save({'state_dict': model_state_dict(run.plain), 'optimizer': run.optimizer.state_dict(),
                     'scheduler': run.scheduler.state_dict(), 'scaler': run.scaler.state_dict() if run.scaler else None,
                     'random_states': states, 'generators': {k: g.get_state() for k, g in run.generators.items()},
                     'forward_count': forward_count(run.plain.encoder), 'config': run.config, 'finished': finished,
                     **fields}, run.paths.last)
    run.progress.saved = run.progress.done


def load_last(run: Run, record: dict) -> None:
    """Restore what ``save_last`` wrote (and states written before it: the weights under 'model', one
    process's random states as a dict, per-block pass counters)."""
    path = run.paths.last
    check_config(record, run.config, path)
    load_strict(run.plain, record.get('state_dict', record.get('model')), path, 'resume state')
    run.optimizer.load_state_dict(record['optimizer'])
    run.scheduler.load_state_dict(record['scheduler'])
    if run.scaler is not None and record.get('scaler'):
        run.scaler.load_state_dict(record['scaler'])
    for name, generator in run.generators.items():
        generator.set_state(record['generators'][name])
    set_forward_count(run.plain.encoder, saved_forward_count(record))
    states = record['random_states']
    states = [states] if isinstance(states, dict) else states
    if len(states) != distributed.world_size() and distributed.is_main_process():
        print(f'note: the state was saved by {len(states)} process(es) and is resumed on '
              f'{distributed.world_size()}: processes without a saved random state keep a fresh seed, so the '
              f'continuation is not bit-identical to an uninterrupted run')
    if distributed.rank() < len(states):
        set_random_states(states[distributed.rank()])


def list_runs(save_dir: str, suffix: str) -> list[str]:
    """Files ending in ``suffix`` under ``save_dir``'s trained_models/ and statistics/, sorted."""
    found = []
    for folder in ('trained_models', 'statistics'):
        path = os.path.join(save_dir, folder)
        if os.path.isdir(path):
            found += [os.path.join(path, f) for f in sorted(os.listdir(path))
                      if f.endswith(suffix) and not f.endswith('.last' + suffix)]
    return found


def missing_run_message(what: str, path: str, save_dir: str, suffix: str, file_flag: str = '--model_path') -> str:
    """'<what> <path> not found; runs under <save_dir>: a, b' (or: 'no runs under ...'); ``file_flag`` is
    the flag that gives the file itself."""
    found = list_runs(save_dir, suffix)
    if not found:
        return f'{what} {path} not found, and there are no runs under {save_dir}: train one first (train.py)'
    names = ', '.join(os.path.basename(f)[:-len(suffix)] for f in found[:5])
    more = f' and {len(found) - 5} more' if len(found) > 5 else ''
    return (f'{what} {path} not found; runs under {save_dir}: {names}{more} '
            f'(give the flags of one of them, or its file with {file_flag})')


# ------------------------------------------------------------------ one training episode
def episode_loss(model, features: torch.Tensor, targets: torch.Tensor, n_way: int, n_shot: int):
    """The training loss of one episode's embeddings (cross-entropy, plus FEAT's regulariser) and the head's
    adaptation (GLoFA's; None for the others)."""
    logits, adaptation = model.episode(features, n_way, n_shot)
    loss = F.cross_entropy(logits.float(), targets)
    auxiliary = model.auxiliary_loss(features, n_way, n_shot)  # FEAT's regulariser; None for the others
    return (loss if auxiliary is None else loss + auxiliary), adaptation


def training_step(model, loss: torch.Tensor, adaptation, optimizer, scaler, record: Optional[dict]) -> None:
    """One optimisation step; with a ``record`` (GLoFA), what its adaptors did on the episode is appended to it:
    the strengths, h(S) before the relu, and the norms of the loss's gradients reaching f_task, f_class and h."""
    gradients = []
    backward_and_step(loss, optimizer, scaler, None if record is None else lambda: gradients.extend(
        gradient_norm(part) for part in (model.f_task, model.f_class, model.h)))
    if record is not None:
        values = torch.cat([adaptation.alpha.detach().float(), adaptation.h_output.detach().float(),
                            torch.stack(gradients)]).tolist()
        for key, value in zip(ADAPTOR_RECORD, values):
            record[key].append(value)


# ------------------------------------------------------------------ runs of the scripts that chain commands
ROOT = os.path.dirname(os.path.abspath(__file__))


def run_stage(command: list[str], log: str, done: list) -> None:
    """Run one command of this repository (``['train.py', flags...]``) in its own process, its output shown
    as it comes and appended to ``log``; a failure is one line. The command line is appended to ``done``."""
    line = shlex.join(['python', *command])
    print(f'\n$ {line}', flush=True)
    os.makedirs(os.path.dirname(log) or '.', exist_ok=True)
    with writing(log), open(log, 'a') as f:
        process = start_stage(command, line, f, subprocess.PIPE)
        for chunk in iter(lambda: process.stdout.read1(65536), b''):  # as it comes: progress bars stay live
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            f.write(chunk.decode(errors='replace'))
        code = process.wait()
    if code != 0:
        raise stage_failed(line, code, log)
    done.append(line)


def start_stage(command: list[str], line: str, log, stdout, env: Optional[dict] = None) -> subprocess.Popen:
    """Write the command line at the head of its output in the open ``log``, then start it in its own process."""
    log.write(f'$ {line}\n')
    log.flush()
    return subprocess.Popen([sys.executable, os.path.join(ROOT, command[0]), *command[1:]], stdout=stdout,
                            stderr=subprocess.STDOUT, env=env)


def stage_failed(line: str, code: int, log: str) -> UserError:
    return UserError(f'{line} stopped with exit code {code} (its output: {log}); run the same script again '
                     f'with the same flags to continue')


def threads_per_job(jobs: int) -> int:
    """The threads of each of ``jobs`` processes that share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // jobs)


def run_stages(stages: list[tuple[list, str]], done: list, jobs: int = 1,
               finished: Callable[[int], None] = lambda i: None) -> None:
    """Run the (command, log) stages as run_stage does, ``jobs`` at a time, calling ``finished(i)`` after stage i.
    With jobs > 1 each process gets cpu_count // jobs threads (which can move a figure's last decimal against
    one process on every core) and writes only to its log; a bar counts the stages. A failure, or an interrupt,
    stops the others, which keep what they saved: the same command continues them."""
    if jobs <= 1 or len(stages) <= 1:
        for i, (command, log) in enumerate(stages):
            run_stage(command, log, done)
            finished(i)
        return
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads_per_job(jobs))}
    waiting, running = list(enumerate(stages)), {}
    with progress(total=len(stages), desc=f'runs, {jobs} at a time', unit='run') as bar:
        try:
            while waiting or running:
                while waiting and len(running) < jobs:
                    i, (command, log) = waiting.pop(0)
                    line = shlex.join(['python', *command])
                    os.makedirs(os.path.dirname(log) or '.', exist_ok=True)
                    with writing(log):
                        f = open(log, 'a')
                        process = start_stage(command, line, f, f, env)
                    bar.write(f'$ {line}  (output: {log})')
                    running[process] = (i, line, log, f)
                for process in [p for p in running if p.poll() is not None]:
                    i, line, log, f = running.pop(process)
                    f.close()
                    if process.returncode != 0:
                        raise stage_failed(line, process.returncode, log)
                    done.append(line)
                    bar.update(1)
                    finished(i)
                time.sleep(0.5)
        finally:
            for process, (_, _, _, f) in running.items():
                process.terminate()  # train.py saves its last state on SIGTERM
                process.wait()
                f.close()


def run_finished(argv: list[str]) -> bool:
    """Whether train.py with ``argv`` has a finished run (its 'last' state says so)."""
    return saved_state(run_paths(parse_args(argv)).last) == 'finished'


def pretraining_finished(argv: list[str]) -> bool:
    """Whether pretrain.py with ``argv`` has finished: its 'last' state holds all --epochs."""
    args = parse_pretrain_args(argv)
    last = pretrain_paths(args).last
    try:
        return os.path.isfile(last) and read_file(last, 'resume state').get('epoch', 0) >= args.epochs
    except (UserError, AttributeError):
        return False


# the reference's meta-training rates for a pretrained encoder (train.py's defaults), on the demo's schedule
PRETRAINED_RATES = ['--lr_network', '0.0001', '--lr', '0.01']


def pretrained_encoder(save_dir: str, pretrain_extra: list, done: list) -> str:
    """The Conv-4 of pretrain.py --demo mixed in save_dir, pretrained once (continued when unfinished)."""
    weights = os.path.join(save_dir, 'pretrained-convnet-demo-mixed.pth')
    command = ['--demo', 'mixed', '--save_dir', save_dir, '--out', weights, *pretrain_extra]
    if not pretraining_finished(command):
        run_stage(['pretrain.py', *command, '--resume'], os.path.join(save_dir, 'pretrain.log'), done)
    return weights


def variant_stage(base: str, flags: list) -> Optional[tuple[list, str]]:
    """What run_variant runs for ``flags``: (command, log), train.py (with --resume for an unfinished run; test.py
    for a finished run without figures); None when base.test.json exists."""
    if os.path.isfile(base + '.test.json'):
        return None
    state = saved_state(run_paths(parse_args(flags)).last)
    command = 'test.py' if state == 'finished' else 'train.py'
    # --resume only where this run has a state to continue: with runs at once, another seed's unfinished run
    # would make --resume refuse a run that has not started
    return [command, *flags, *(['--resume'] if state == 'unfinished' else []), '--json', base + '.test.json'], base + '.log'


def variant_figures(base: str, flags: list) -> dict:
    """The test's figures of a variant that has run, with GLoFA's strengths at each validation from its log."""
    with open(base + '.test.json') as f:
        figures = json.load(f)['settings'][0]
    with open(run_paths(parse_args(flags)).log) as f:  # GLoFA's strengths at each validation
        entries = [json.loads(line) for line in f if line.strip()]
    figures['validation_strengths'] = [
        f"episode {e['episode']}: {e['alpha_task']:.3f}, {e['alpha_cls']:.3f}" for e in entries if 'alpha_task' in e]
    return figures


def run_variant(base: str, flags: list, done: list) -> dict:
    """train.py with ``flags`` (test.py for a finished run without figures; nothing when base.test.json exists):
    the test's figures, with GLoFA's strengths at each validation from the run's log."""
    stage = variant_stage(base, flags)
    if stage is not None:
        run_stage(*stage, done)
    return variant_figures(base, flags)


def prepare_demo(args) -> None:
    """Generate the built-in demo data once (deterministic), where --data_path points: one root for
    --demo, two (coarse, then fine) for --demo mixed. A folder that is neither empty nor the demo's is
    refused before anything is written (a user's dataset given by mistake stays as it was)."""
    from demo import generate_demo_dataset, generate_fine_dataset, refuse_unowned
    roots = data_path(args)
    wanted = 2 if args.demo == 'mixed' else 1
    if len(roots) != wanted:
        raise UserError(f'--demo mixed writes two roots, the coarse demo then the fine one: give --data_path '
                        f'COARSE FINE (got {len(roots)} root{"s" if len(roots) > 1 else ""})' if wanted == 2 else
                        f'--demo writes one root, got {len(roots)} in --data_path (--demo mixed writes two)')
    try:
        refuse_unowned(roots)
    except ValueError as error:
        raise UserError(f'{error} with --data_path, or drop --demo to use the dataset that is there') from None
    for root, generate in zip(roots, (generate_demo_dataset, generate_fine_dataset)):
        try:
            generate(root)
        except OSError as error:
            raise UserError(f'the demo data cannot be written to {root} ({error.strerror or error}'
                            f'{f": {error.filename}" if error.filename else ""}): run from a folder you can write '
                            f'to, or give --data_path a writable folder') from None


# ------------------------------------------------------------------ model
def build_model(args, pretrained: bool = True) -> FewShotModel:
    """--model_name on the chosen encoder; with ``pretrained``, the encoder starts from --pretrained."""
    encoder = build_encoder(args.network_name)
    if pretrained and args.pretrained.lower() != 'none':
        if not os.path.isfile(args.pretrained):
            raise UserError(f'pretrained weights {args.pretrained} not found: download FEAT\'s '
                            f'{FEAT_WEIGHTS[args.network_name]} (github.com/Sha-Lab/FEAT) and pass --pretrained PATH, '
                            f'or use --pretrained none to train from scratch')
        n = load_encoder_weights(encoder, args.pretrained, args.network_name)
        print(f'loaded {n} encoder tensors from {args.pretrained}')
    return model_on(args, encoder, encoder.out_dim)


def model_on(args, encoder: nn.Module, feature_dim: int) -> FewShotModel:
    """--model_name and its flags on ``encoder`` (embeddings of ``feature_dim``), its head freshly initialised."""
    if args.model_name == 'protonet':
        return ProtoNet(encoder, metric=args.metric, temperature=args.temperature)
    if args.model_name == 'feat':
        temperature2, balance = feat_regulariser(args, args.K)
        return FEAT(encoder, feature_dim, metric=args.metric, temperature=args.temperature,
                    temperature2=temperature2, balance=balance)
    return GLoFA(encoder, feature_dim, tau=args.tau, delta=args.delta, adaptor=args.adaptor,
                 h_bias_init=args.h_bias_init)


def load_encoder_weights(encoder: nn.Module, path: str, network_name: str) -> int:
    """load_pretrained, and for a file that does not fit: the --network_name it does fit, when there is one."""
    try:
        return load_pretrained(encoder, path)
    except UserError:
        for other in NETWORKS:
            if other != network_name:
                try:
                    load_pretrained(build_encoder(other), path)
                except UserError:
                    continue
                raise UserError(f'pretrained weights {path} hold a {other} encoder, not a {network_name} one: pass '
                                f'--network_name {other}') from None
        raise


def build_optimizer(args, model: FewShotModel) -> torch.optim.SGD:
    """SGD with Nesterov momentum: the encoder at --lr_network, the head (GLoFA's three set functions,
    FEAT's attention layer) at --lr; ProtoNet has the encoder's group only."""
    head = model.head_parameters()
    return torch.optim.SGD([{'params': list(model.encoder.parameters()), 'lr': args.lr_network}]
                           + ([{'params': head, 'lr': args.lr}] if head else []),
                           momentum=args.mo, nesterov=True, weight_decay=args.wd)


def build_scheduler(args, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR over validations: stepped once after each validation."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.point, gamma=args.gamma)


def place_model(model: FewShotModel, args, device: torch.device) -> FewShotModel:
    """Move the model to ``device``; several --devices wrap the encoder in DataParallel."""
    model.to(device)
    if args.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    if device.type == 'cuda' and len(args.devices) > 1:
        model.encoder = data_parallel(model.encoder, args.devices)
    return model



def check_disjoint(args, splits: dict) -> None:
    """Refuse splits ({name: dataset}) that share classes or images, unless --allow_overlap."""
    error = overlap_error(splits)
    if error and not args.allow_overlap:
        raise UserError(error)


def split_files_beside(root: str, split: str) -> dict:
    """The other splits of ``root`` known from their label files alone (the folder and npz forms; a pickled
    form would have to be converted): what test.py compares its split with. {} when they cannot be read."""
    try:
        form = dataset_format(root)
        if form not in ('folder', 'tiered'):
            return {}
        reader = FewShotDataset if form == 'folder' else TieredDataset
        kwargs = {'check_files': False} if form == 'folder' else {}
        return {other: reader(root, other, **kwargs) for other in SPLITS if other != split}
    except UserError:
        return {}


def check_domains(args, domains: dict) -> None:
    """Refuse, in one line, the first flag of ``domains`` outside its domain (arguments.domain_error)."""
    error = domain_error(args, domains)
    if error:
        raise UserError(error)


def check_episode_flags(N: int, K: int, Q: int) -> None:
    check_domains(argparse.Namespace(N=N, K=K, Q=Q), DOMAINS)


def command_inputs(args, *datasets) -> list[str]:
    """What no output of a command may be (utils.check_output): its weights files and every file of its data."""
    weights = [getattr(args, flag, None) for flag in ('pretrained', 'model_path')]
    return [p for p in weights if p and p.lower() != 'none'] + [path for d in datasets for path in d.files()]


def check_args(args, device: torch.device) -> None:
    """Every numeric flag in its domain (arguments.DOMAINS), and what the device allows."""
    check_domains(args, DOMAINS)
    if getattr(args, 'freeze_encoder', False) and args.model_name == 'protonet':
        raise UserError('--freeze_encoder leaves ProtoNet nothing to train (it has no head parameters): evaluate the '
                        'encoder as it is with test.py --model_name protonet --pretrained FILE')
    if getattr(args, 'freeze_encoder', False) and args.pretrained.lower() == 'none':
        raise UserError('--freeze_encoder with --pretrained none would freeze a randomly initialised encoder: give '
                        '--pretrained FILE, or drop --freeze_encoder')
    if args.amp and device.type != 'cuda':
        raise UserError('--amp needs a CUDA device (this run is on the CPU)')
