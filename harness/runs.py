"""A run: its identity and name, its files, what happens to an existing one (and its lock), its saved state."""
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from arguments import MODEL_FLAGS
from dataloader import data_sources
from harness.checkpoints import atomic_save, model_state_dict, read_file, weights_digest
from base.console import NonFiniteLoss, UserError, interrupt_on_sigterm, on_failed_start, writing
from harness.device import keep_freed_memory, random_states, select_device, set_seed
from base.files import append_log
from networks import forward_count


def data_label(args) -> str:
    """The data part of a run name: the root's folder name, or the roots' joined, e.g. demo+demo_fine-mixclass."""
    roots = args.data_path
    if len(roots) == 1:
        return os.path.basename(os.path.normpath(roots[0])) or 'data'
    from data.mixing import root_names
    return '+'.join(name.replace('/', '_') for name in root_names(roots)) + f'-mix{args.task_mix}'


def data_identity(args) -> dict:
    """The data by content, not location (a moved dataset keeps its runs), and the mix of several roots."""
    roots = args.data_path
    return {'data': [root_digest(root) for root in roots], 'task_mix': args.task_mix if len(roots) > 1 else None}


def root_digest(root: str) -> dict:
    """{what: digest} of ``dataloader.data_sources``: the split files by content, the images they name (or another
    form's arrays) by name and size. Files no split reads, and the program's converted copies, do not count."""
    try:
        sources = data_sources(root)
    except UserError:  # no data there: refused, naming the flag, when the split is opened
        return {}
    digests, prefix = {}, len(os.path.join(root, ''))
    for what, (paths, by_content) in sources.items():
        digest = hashlib.blake2b(digest_size=8)
        for path in paths:
            try:
                if by_content:
                    with open(path, 'rb') as f:
                        digest.update(f.read())
                else:
                    digest.update(f'{path[prefix:]}\0{os.stat(path).st_size}\0'.encode())
            except (OSError, ValueError):  # missing, or no file name (a NUL byte): refused when the split is read
                digest.update(f'{path[prefix:]}\0missing\0'.encode())
        digests[what] = digest.hexdigest()
    return digests


def run_identity(args) -> dict:
    """What defines a run's result: the data and the pretrained weights by content (two files of one name are two
    runs), the model and its flags (FEAT's regulariser resolved for the shot), optimisation, schedule, seed; not
    how fast it runs (device, workers, --amp, --channels_last, --save_dir)."""
    model = {flag: getattr(args, flag) for flag in MODEL_FLAGS[args.model_name]}
    if args.model_name == 'feat':
        from models.feat import feat_regulariser
        model['temperature2'], model['balance'] = feat_regulariser(args, args.K)
    weights = args.pretrained.lower() != 'none' and os.path.isfile(args.pretrained)
    return {**data_identity(args), 'network_name': args.network_name, 'model_name': args.model_name, **model,
            'normalization': args.normalization, 'freeze_encoder': getattr(args, 'freeze_encoder', False),
            'pretrained': weights_digest(args.pretrained)[:16] if weights else os.path.basename(args.pretrained),
            **{key: getattr(args, key) for key in ('N', 'K', 'Q', 'n_training_episodes', 'episode_gap',
                                                   'n_validating_episodes', 'lr_network', 'lr')},
            'point': list(args.point), 'gamma': args.gamma, 'wd': args.wd, 'mo': args.mo, 'seed': args.seed}


def run_name(args, identity: Optional[dict] = None) -> str:
    """A readable name and a hash of the whole identity, e.g. mini_imagenet-resnet-glofa-N5-K1-seed960402-1a2b3c4d."""
    identity = run_identity(args) if identity is None else identity
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    if args.model_name == 'glofa':
        variant = ('' if args.adaptor == 'both' else f'-{args.adaptor}') + (
            '' if args.h_bias_init is None else f'-hbias{args.h_bias_init:g}') + (
            '' if args.strengths == 'reference' else f'-{args.strengths}')
    else:
        variant = '' if args.metric == 'euclidean' else f'-{args.metric}'
    variant += '-frozen' if getattr(args, 'freeze_encoder', False) else ''
    return (f'{data_label(args)}-{args.network_name}-{args.model_name}{variant}-N{args.N}-K{args.K}-seed{args.seed}'
            f'-{digest}')


@dataclass
class RunPaths:
    best: str      # the best weights: train.py's <run>.model, pretrain.py's FEAT-format output
    last: str      # the whole state after the last finished episode gap or epoch, to resume from
    log: str       # one JSON line per validation
    identity: str  # <run>.run.json: what defines the run; its lock
    stat: Optional[str] = None  # train.py: the statistics record of the reference code

    def files(self) -> list[str]:
        return [p for p in (self.best, self.last, self.stat, self.log, self.identity) if p]


def weights_paths(out: str) -> RunPaths:
    """A pretraining's files: the FEAT-format weights at ``out``, and beside them the state to resume from, the JSON
    log and the identity."""
    base = os.path.splitext(out)[0]
    return RunPaths(best=out, last=f'{base}.last.pth', log=f'{base}.log.jsonl', identity=f'{base}.run.json')


def run_paths(args, name: Optional[str] = None) -> RunPaths:
    """A meta-training run's files under --save_dir."""
    name = run_name(args) if name is None else name
    models, stats = os.path.join(args.save_dir, 'trained_models'), os.path.join(args.save_dir, 'statistics')
    return RunPaths(best=os.path.join(models, f'{name}.model'), last=os.path.join(models, f'{name}.last.model'),
                    log=os.path.join(stats, f'{name}.log.jsonl'), identity=os.path.join(stats, f'{name}.run.json'),
                    stat=os.path.join(stats, f'{name}.stat'))


def check_existing_run(args, paths: RunPaths, finished: Callable[[dict], bool], unit: str, use_it: str,
                       main: bool = True) -> Optional[dict]:
    """The saved state to resume, or None to start afresh. An existing run, finished or not, is replaced only with
    --overwrite; an unfinished one is continued with --resume. ``unit``: what the state counts ('episode',
    'epoch'); ``use_it``: what to do with a finished run instead; ``main``: rank 0, which locks, removes, says.
    (--resume without a saved state: the program then says what else there is, ``harness.finding.resume_elsewhere``.)"""
    if args.resume and args.overwrite:
        raise UserError('--resume continues the saved run, --overwrite replaces it: give one of them')
    if main:
        lock_run(paths)
    if args.overwrite:
        removed = [path for path in paths.files() if path != paths.identity and os.path.isfile(path)]  # the lock stays
        if main:
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
    return None


def unfinished_line(checkpoint: str) -> Optional[str]:
    """'note: this run is unfinished ...' for the best checkpoint of a run still training or stopped, else None."""
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


_locks: dict = {}  # the runs this process holds: identity file -> its open file


def lock_run(paths: RunPaths) -> None:
    """Lock the run for the life of this process (flock on its identity file): a second process training it is
    refused, a crash releases it. A start that fails leaves no empty identity file behind."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        return
    path = os.path.abspath(paths.identity)
    if path in _locks:  # a run started again in the same process
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    f = open(path, 'a')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UserError(f'this run is being trained by another process (its lock is on {path}): wait for it to '
                        f'end, or stop it; a crashed process releases the lock') from None
    _locks[path] = f

    def release_unstarted():
        _locks.pop(path).close()
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            os.remove(path)
    if new:
        on_failed_start(release_unstarted)


def write_identity(identity: dict, paths: RunPaths) -> None:
    """<run>.run.json: what the run's name stands for."""
    os.makedirs(os.path.dirname(paths.identity) or '.', exist_ok=True)
    with writing(paths.identity), open(paths.identity, 'w') as f:  # in place: the file is the run's lock (lock_run)
        json.dump(identity, f, indent=1)


# ------------------------------------------------------------------ a training run and its saved state
@dataclass
class Progress:
    """Where a training run stands, so that an interruption can say it."""
    done: int = 0                 # training episodes (train.py) or epochs (pretrain.py) done
    saved: Optional[int] = None   # the count whose state the 'last' file holds
    best_accuracy: float = 0.0    # best validation accuracy so far, in [0, 1]
    best_at: int = 0              # and when
    statistics: dict = field(default_factory=lambda: {'training_loss': [], 'validating_accuracy': []})


@dataclass
class Run:
    """One training run, handed from phase to phase."""
    args: object
    device: torch.device
    paths: RunPaths
    model: nn.Module          # in DistributedDataParallel under torchrun (pretrain.py)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    scaler: torch.amp.GradScaler  # off but with float16 --amp (harness.device.grad_scaler)
    config: dict              # what the saved state must agree with to be resumed
    progress: Progress = field(default_factory=Progress)
    generators: dict = field(default_factory=dict)  # named samplers' generators, saved with the state
    tensorboard: Optional[object] = None  # a SummaryWriter with --tensorboard (open_tensorboard)
    rank: int = 0             # under torchrun (pretrain.py): this process's rank, and the number of processes
    world_size: int = 1
    plain: Optional[nn.Module] = None  # the model inside DistributedDataParallel; ``model`` itself without

    def __post_init__(self):
        self.plain = self.model if self.plain is None else self.plain


def open_tensorboard(run: Run, name: str) -> None:
    """--tensorboard (rank 0): a writer under <save_dir>/tensorboard/<name>."""
    if run.args.tensorboard and run.rank == 0:
        from harness.tensorboard import open_writer
        run.tensorboard = open_writer(run.args.save_dir, name, run.progress.done)

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
    if run.progress.saved is None:
        return f'interrupted during {during}, before any state was saved'
    return (f'interrupted during {during}; the state after {unit} {run.progress.saved} is saved in '
            f'{run.paths.last}: run the same command with --resume to continue')


def save_last(run: Run, finished: bool, **fields) -> None:
    """The whole state, written by rank 0: weights, optimisation, every process's random states, the generators,
    the encoder's pass count, ``fields``."""
    states = [random_states()]
    if run.world_size > 1:
        from harness.distributed import gather_objects
        states = gather_objects(states[0])
    if run.rank == 0:
        atomic_save({'state_dict': model_state_dict(run.plain), 'optimizer': run.optimizer.state_dict(),
                     'scheduler': run.scheduler.state_dict(),
                     'scaler': run.scaler.state_dict() if run.scaler.is_enabled() else None,
                     'random_states': states, 'generators': {k: g.get_state() for k, g in run.generators.items()},
                     'forward_count': forward_count(run.plain.encoder), 'config': run.config, 'finished': finished,
                     **fields}, run.paths.last)
    run.progress.saved = run.progress.done


def set_up(args, check: Callable) -> torch.device:
    """What every entry point does first: signals, memory, the demo's data, the device, ``check(device)``, seeds."""
    interrupt_on_sigterm()
    keep_freed_memory()
    if args.demo:
        from harness.demo import prepare_demo
        prepare_demo(args)
    device = select_device(args.device, args.devices)
    check(device)
    if getattr(args, 'tensorboard', False):  # refused now, not after the data is opened
        from harness.tensorboard import tensorboard_writer_class
        tensorboard_writer_class()
    set_seed(args.seed)
    return device
