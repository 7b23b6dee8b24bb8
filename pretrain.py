"""Supervised pretraining of the backbone, as FEAT does: python pretrain.py [--network_name resnet] [--resume].

The encoder and a linear classifier over the train split's classes learn with cross-entropy on
shuffled mini-batches of augmented images. Every --val_every epochs a ProtoNet validation (16-way
1-shot by default) on cached embeddings of the val split picks the best epoch by cosine accuracy;
its weights are written in FEAT's format, {'params': {'encoder.<key>': ..., 'fc.weight': ...,
'fc.bias': ...}}, which train.py --pretrained reads. Several processes (GPUs, or CPU processes):
    torchrun --standalone --nproc_per_node G pretrain.py ...
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import distributed
from arguments import parse_pretrain_args
from checkpoints import atomic_save, check_config, load_strict, model_state_dict, read_file, saved_forward_count
from dataloader import (FewShotDataset, ShuffledBatches, episode_loader, episode_sampler, eval_transform, iterate,
                        open_split, train_transform)
from evaluation import EvalOptions, encode_split, prototype_accuracies
from models.classifier import EncoderClassifier
from networks import build_encoder, forward_count, set_forward_count
from runs import data_label, data_path, prepare_demo
from utils import (UserError, autocast, backward_and_step, exits_cleanly, git_revision, ignore_further_interrupts,
                   interrupt_on_sigterm, interrupted, mean_ci, random_states, select_device, set_random_states, set_seed,
                   to_device, trim_log)



# ------------------------------------------------------------------ flags
def check_flags(args, device: torch.device) -> None:
    for flag in ('epochs', 'batch_size', 'val_every', 'val_way', 'val_shot', 'val_query', 'val_episodes'):
        if getattr(args, flag) < 1:
            raise UserError(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    for flag in ('lr', 'gamma'):
        if getattr(args, flag) <= 0:
            raise UserError(f'--{flag} must be positive, got {getattr(args, flag)}')
    if args.n_workers < 0:
        raise UserError(f'--n_workers must be 0 or more, got {args.n_workers}')
    if args.resume and args.overwrite:
        raise UserError('--resume continues the saved pretraining, --overwrite replaces it: give one of them')
    processes = distributed.world_size()
    if args.batch_size % processes:
        lower = max(processes, args.batch_size - args.batch_size % processes)
        raise UserError(f'--batch_size {args.batch_size} is not divisible by the {processes} processes: each '
                        f'process takes an equal share (e.g. --batch_size {lower})')
    if args.amp and device.type != 'cuda':
        raise UserError('--amp needs a CUDA device (this run is on the CPU)')
    if args.sync_bn and device.type != 'cuda':
        raise UserError('--sync_bn needs CUDA devices (on the CPU each process keeps its own BatchNorm statistics)')


def check_data(args, train_set: FewShotDataset, val_set: FewShotDataset) -> None:
    """Refuse data that cannot give one full batch or one validation episode, before any training."""
    if len(train_set) < args.batch_size:
        raise UserError(f'--batch_size {args.batch_size} is larger than the train split ({train_set.location}: '
                        f'{len(train_set)} images): there would be no full batch')
    n_classes = len(val_set.class_names)
    if n_classes < args.val_way:
        raise UserError(f'the val split ({val_set.location}) has {n_classes} classes, fewer than --val_way '
                        f'{args.val_way}: pass a smaller --val_way')
    counts = np.bincount(val_set.labels, minlength=n_classes)
    need = args.val_shot + args.val_query
    if counts.min() < need:
        name = val_set.class_names[int(counts.argmin())]
        raise UserError(f'class {name} of the val split ({val_set.location}) has {counts.min()} images, fewer than '
                        f'--val_shot + --val_query = {need}')


# ------------------------------------------------------------------ outputs and state
@dataclass
class Paths:
    out: str   # the best weights, FEAT's format
    last: str  # the state to resume from, written after every epoch
    log: str   # one JSON line per validation


def output_paths(args) -> Paths:
    data = data_label(args)  # the data folder's name (roots and mix), as train.py's runs
    out = args.out or os.path.join(args.save_dir, 'pretrained', f'{data}-{args.network_name}-pretrain-seed{args.seed}.pth')
    base = os.path.splitext(out)[0]
    return Paths(out, f'{base}.last.pth', f'{base}.log.jsonl')


def run_config(args, n_classes: int) -> dict:
    """What a saved state must agree with to be resumed exactly."""
    return {'network_name': args.network_name, 'n_classes': n_classes, 'batch_size': args.batch_size,
            'optimizer': args.optimizer, 'lr': args.lr, 'milestones': list(args.milestones), 'gamma': args.gamma,
            'wd': args.wd, 'seed': args.seed}


@dataclass
class Progress:
    """Where the pretraining stands; filled in as it goes, so that an interruption can say it."""
    epoch: int = 0              # epochs done
    best_accuracy: float = -1.0  # best cosine validation accuracy so far, in [0, 1]
    best_epoch: int = 0
    saved_epoch: Optional[int] = None  # the epoch of the state saved in paths.last
    paths: Optional[Paths] = None


@dataclass
class Run:
    """What the phases share."""
    args: argparse.Namespace
    device: torch.device
    model: nn.Module  # EncoderClassifier, in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    scaler: Optional[torch.amp.GradScaler]
    paths: Paths
    progress: Progress = field(default_factory=Progress)

    @property
    def plain(self) -> EncoderClassifier:
        return distributed.unwrap(self.model)


def previous_state(args, paths: Paths) -> Optional[dict]:
    """The saved state to resume, or None to start afresh; never overwrites an output silently."""
    if args.overwrite:
        return None
    record = read_file(paths.last, 'resume state', weights_only=False) if os.path.isfile(paths.last) else None
    if record is not None and not (isinstance(record, dict) and {'model', 'optimizer', 'epoch'} <= record.keys()):
        raise UserError(f'{paths.last} is not a state file of pretrain.py: move it away or pass --overwrite')
    if args.resume:
        if record is None and os.path.isfile(paths.out):
            raise UserError(f'{paths.out} exists but its state {paths.last} does not, so it cannot be resumed: '
                            f'pass --overwrite to start over and replace it')
        if record is None and distributed.is_main_process():
            print(f'no saved state {paths.last} yet: starting a new pretraining')
        return record
    if record is not None and not record.get('finished'):
        raise UserError(f"an unfinished pretraining is saved in {paths.last} (epoch {record['epoch']}): "
                        f"add --resume to continue it, or --overwrite to start over")
    if record is not None or os.path.isfile(paths.out):
        done = f" (finished at epoch {record['epoch']})" if record is not None else ''
        raise UserError(f'pretrained weights {paths.out} exist{done}: pass --overwrite to replace them, '
                        f'--out to write elsewhere, or --resume with more --epochs to continue')
    return None


def save_last(run: Run, finished: bool) -> None:
    """Every process's random states go to rank 0, which writes the state file atomically."""
    states = distributed.gather_objects(random_states())
    if distributed.is_main_process():
        p = run.progress
        atomic_save({'model': model_state_dict(run.plain), 'optimizer': run.optimizer.state_dict(),
                     'scheduler': run.scheduler.state_dict(),
                     'scaler': run.scaler.state_dict() if run.scaler else None,
                     'epoch': p.epoch, 'best_accuracy': p.best_accuracy, 'best_epoch': p.best_epoch,
                     # the shuffling generator of epoch e is seeded with seed + e (ShuffledBatches.set_epoch)
                     'sampler': {'seed': run.args.seed, 'next_epoch': p.epoch + 1},
                     'random_states': states, 'forward_count': forward_count(run.plain.encoder),
                     'config': run_config(run.args, run.plain.fc.out_features), 'finished': finished}, run.paths.last)
    run.progress.saved_epoch = run.progress.epoch


def load_last(run: Run, record: dict) -> None:
    path = run.paths.last
    check_config(record, run_config(run.args, run.plain.fc.out_features), path)
    load_strict(run.plain, record['model'], path, 'resume state')
    run.optimizer.load_state_dict(record['optimizer'])
    run.scheduler.load_state_dict(record['scheduler'])
    if run.scaler is not None and record.get('scaler'):
        run.scaler.load_state_dict(record['scaler'])
    set_forward_count(run.plain.encoder, saved_forward_count(record))
    p = run.progress
    p.epoch, p.best_accuracy, p.best_epoch = record['epoch'], record['best_accuracy'], record['best_epoch']
    p.saved_epoch = p.epoch
    states, rank = record['random_states'], distributed.rank()
    if len(states) != distributed.world_size() and distributed.is_main_process():
        print(f'note: the state was saved by {len(states)} process(es) and is resumed on '
              f'{distributed.world_size()}: processes without a saved random state keep a fresh seed, so the '
              f'continuation is not bit-identical to an uninterrupted run')
    if rank < len(states):
        set_random_states(states[rank])


# ------------------------------------------------------------------ phases
class NonFiniteLoss(distributed.ProcessError):
    """The loss became inf or nan: reported by whichever process met it."""


def build_optimizer(args, parameters) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum 0.9 (ResNet-12) or Adam (Conv-4), weight decay --wd."""
    if args.optimizer == 'sgd':
        return torch.optim.SGD(parameters, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.wd)
    return torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.wd)


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: Optional[torch.amp.GradScaler], amp: bool) -> tuple[float, int]:
    """One optimisation step on this process's share of a batch; (mean loss, correct predictions).
    Under DistributedDataParallel the backward pass averages the gradients over the processes."""
    with autocast(images.device, amp):
        logits = model(images)                            # (B, n_classes)
        loss = F.cross_entropy(logits.float(), labels)
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f'training loss became {loss.item()}')
    backward_and_step(loss, optimizer, scaler)
    return loss.item(), int((logits.argmax(dim=1) == labels).sum())


def train_one_epoch(run: Run, loader, bar: tqdm) -> tuple[float, float, float]:
    """One pass over this process's share of the epoch's batches: (mean loss, accuracy) over all
    processes, and the seconds it took."""
    run.model.train()
    args, device = run.args, run.device
    loss_sum, correct, count = 0.0, 0, 0
    start = time.perf_counter()
    for images, labels in iterate(loader):
        try:
            loss, right = train_step(run.model, to_device(images, device, args.channels_last),
                                     labels.to(device, non_blocking=True), run.optimizer, run.scaler, args.amp)
        except NonFiniteLoss as error:
            where = f'process {distributed.rank()}, ' if distributed.world_size() > 1 else ''
            raise NonFiniteLoss(f'{error} ({where}epoch {run.progress.epoch + 1}); stopped. The state after epoch '
                                f'{run.progress.saved_epoch} is kept in {run.paths.last}; runs are deterministic, so '
                                f'resuming with the same flags meets the same loss: try a lower --lr') from None
        loss_sum, correct, count = loss_sum + loss * len(labels), correct + right, count + len(labels)
        bar.update(1)
        bar.set_postfix(epoch=run.progress.epoch + 1, loss=f'{loss_sum / count:.4f}',
                        acc=f'{100 * correct / count:.1f}%', lr=f'{run.optimizer.param_groups[0]["lr"]:.2g}')
    seconds = time.perf_counter() - start
    loss_sum, correct, count = distributed.all_reduce_sum([loss_sum, correct, count], device)
    return loss_sum / count, correct / count, seconds


def validate(run: Run, val_set: FewShotDataset) -> dict[str, np.ndarray]:
    """ProtoNet accuracies (cosine and Euclidean) of the same --val_episodes episodes at every validation,
    on embeddings of the val split encoded once. The DropBlock ramp counters are left as they were."""
    args, encoder = run.args, run.plain.encoder
    count = forward_count(encoder)
    features = encode_split(encoder, val_set, EvalOptions(run.device, args.n_workers, args.amp, args.channels_last))
    set_forward_count(encoder, count)
    sampler = episode_sampler(val_set, args.val_episodes, args.val_way, args.val_shot + args.val_query,
                              torch.Generator().manual_seed(args.seed + 1), args.task_mix)
    episodes = tqdm(sampler, desc='validation', leave=False, unit='ep')
    return prototype_accuracies(features, episodes, args.val_way, args.val_shot)


def validate_and_save(run: Run, val_set: FewShotDataset, loss: float, accuracy: float, lr: float,
                      seconds: float, steps: int, bar: tqdm) -> None:
    """Rank 0: validation, the best weights in FEAT's format when the cosine accuracy beats the best so
    far, one JSON line in the log and one line on screen."""
    args, p = run.args, run.progress
    accuracies = validate(run, val_set)
    (cosine, cosine_ci), (euclidean, euclidean_ci) = mean_ci(accuracies['cosine']), mean_ci(accuracies['euclidean'])
    improved = cosine > p.best_accuracy
    if improved:
        p.best_accuracy, p.best_epoch = cosine, p.epoch
        atomic_save({'params': model_state_dict(run.plain)}, run.paths.out)
    entry = {'epoch': p.epoch, 'loss': loss, 'train_accuracy': accuracy, 'lr': lr,
             'val_cosine': cosine, 'val_cosine_ci': cosine_ci, 'val_euclidean': euclidean,
             'val_euclidean_ci': euclidean_ci, 'best_val_cosine': p.best_accuracy, 'best_epoch': p.best_epoch,
             'epoch_seconds': seconds, 'steps': steps}
    with open(run.paths.log, 'a') as log:
        log.write(json.dumps(entry) + '\n')
    bar.write(f'epoch {p.epoch}: loss {loss:.4f}, train accuracy {100 * accuracy:.2f} %, lr {lr:.3g}; validation '
              f'({args.val_way}-way {args.val_shot}-shot, {args.val_episodes} episodes) cosine '
              f'{100 * cosine:.2f} ± {100 * cosine_ci:.2f} %, euclidean {100 * euclidean:.2f} ± {100 * euclidean_ci:.2f} %'
              f'{" (best, saved)" if improved else ""}')


def summary(run: Run) -> None:
    args, p = run.args, run.progress
    n_encoder = len(run.plain.encoder.state_dict())
    print(f'best validation accuracy {100 * p.best_accuracy:.2f} % (cosine prototypes, {args.val_way}-way '
          f'{args.val_shot}-shot, {args.val_episodes} episodes) at epoch {p.best_epoch}; weights {run.paths.out} '
          f'({n_encoder} encoder tensors, fc {tuple(run.plain.fc.weight.shape)})')
    demo = f' --demo{" mixed" if args.demo == "mixed" else ""}' if args.demo else ''
    print(f'next: python train.py{demo} --network_name {args.network_name} '
          f'--pretrained {run.paths.out}')
    print(f'seed {args.seed}, revision {git_revision()}')


# ------------------------------------------------------------------ main
def pretrain(args, progress: Progress) -> dict:
    device = select_device(args.device, [0])
    check_flags(args, device)
    device = distributed.setup(device)
    main_process, processes = distributed.is_main_process(), distributed.world_size()
    if args.demo and main_process:
        prepare_demo(args)
    distributed.barrier()
    set_seed(args.seed + distributed.rank())
    paths = progress.paths = output_paths(args)

    # ---------------- data
    root = data_path(args)
    train_set = open_split(root, 'train', train_transform())
    val_set = open_split(root, 'val', eval_transform())
    check_data(args, train_set, val_set)
    record = previous_state(args, paths)
    sampler = ShuffledBatches(len(train_set), args.batch_size, args.seed, distributed.rank(), processes)
    loader = episode_loader(train_set, sampler, args.n_workers, pin_memory=device.type == 'cuda',
                            persistent=args.n_workers > 0)

    # ---------------- model and optimisation
    model = EncoderClassifier(build_encoder(args.network_name), len(train_set.class_names)).to(device)
    if args.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    model = distributed.wrap(model, device, args.sync_bn)
    optimizer = build_optimizer(args, distributed.unwrap(model).parameters())
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=args.gamma)
    scaler = torch.amp.GradScaler('cuda') if args.amp and not torch.cuda.is_bf16_supported() else None
    run = Run(args, device, model, optimizer, scheduler, scaler, paths, progress)
    if record is not None:
        load_last(run, record)
        if main_process:
            print(f'resumed {paths.last} at epoch {progress.epoch}')
    if main_process:
        if args.overwrite and os.path.isfile(paths.out):
            os.remove(paths.out)
        os.makedirs(os.path.dirname(os.path.abspath(paths.log)), exist_ok=True)
        trim_log(paths.log, 'epoch', progress.epoch)
        print(f'pretraining {args.network_name} on {", ".join(root)}: {len(train_set.class_names)} classes, {len(train_set)} '
              f'images (val {len(val_set.class_names)} classes, {len(val_set)} images); {args.epochs} '
              f'epoch{"s" if args.epochs > 1 else ""} of '
              f'{len(sampler)} steps of {args.batch_size} images; {args.optimizer} lr {args.lr:g}, milestones '
              f'{" ".join(map(str, args.milestones))}, gamma {args.gamma:g}; on {device}, {processes} '
              f'process{"es" if processes > 1 else ""}'
              f'{f" of {args.batch_size // processes} images a step" if processes > 1 else ""}')

    # ---------------- training, validation on rank 0 while the others wait
    with tqdm(total=args.epochs * len(sampler), initial=min(progress.epoch, args.epochs) * len(sampler),
              desc='pretraining', unit='step', dynamic_ncols=True, disable=not main_process) as bar:
        if progress.epoch == 0:
            save_last(run, finished=False)
        for epoch in range(progress.epoch + 1, args.epochs + 1):
            sampler.set_epoch(epoch)
            loss, accuracy, seconds = train_one_epoch(run, loader, bar)
            lr = optimizer.param_groups[0]['lr']
            scheduler.step()
            progress.epoch = epoch
            if main_process and (epoch % args.val_every == 0 or epoch == args.epochs):
                validate_and_save(run, val_set, loss, accuracy, lr, seconds, len(sampler), bar)
            distributed.barrier()
            save_last(run, finished=epoch == args.epochs)
    if main_process:
        summary(run)
    distributed.cleanup()
    return {'paths': paths, 'epoch': progress.epoch, 'best_accuracy': progress.best_accuracy,
            'best_epoch': progress.best_epoch}


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    interrupt_on_sigterm()
    args = parse_pretrain_args(argv)
    progress = Progress()
    try:
        return pretrain(args, progress)
    except UserError as error:
        if distributed.is_main_process() or isinstance(error, distributed.ProcessError):
            raise
        sys.exit(2)  # the same mistake on every process: rank 0 reports it
    except BaseException as error:
        # Ctrl-C or SIGTERM, or an error in its wake: a collective whose peer has stopped, a loader worker
        # stopped by the same signal
        if isinstance(error, SystemExit) or not (isinstance(error, KeyboardInterrupt) or interrupted()):
            raise
        ignore_further_interrupts()
        if distributed.is_main_process():
            epoch = progress.saved_epoch
            if epoch is None:
                print('\ninterrupted before pretraining started: no state was written', file=sys.stderr)
            else:
                print(f'\ninterrupted during epoch {epoch + 1}; the state after epoch {epoch} is saved in '
                      f'{progress.paths.last}: run the same command with --resume to continue', file=sys.stderr)
        # a loader interrupted while starting its workers complains when it is torn down: nothing to report
        sys.unraisablehook = lambda unraisable: None
        sys.exit(130)

if __name__ == '__main__':
    main(sys.argv[1:])
