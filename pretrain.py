"""Supervised pretraining of the backbone, as FEAT does: python pretrain.py [--network_name resnet] [--resume].

The encoder and a linear classifier over the train split's classes learn with cross-entropy on
shuffled mini-batches of augmented images. Every --val_every epochs a ProtoNet validation (16-way
1-shot by default) on cached embeddings of the val split picks the best epoch by cosine accuracy;
its weights are written in FEAT's format, {'params': {'encoder.<key>': ..., 'fc.weight': ...,
'fc.bias': ...}}, which train.py --pretrained reads. Several processes (GPUs, or CPU processes):
    torchrun --standalone --nproc_per_node G pretrain.py ...
"""
import argparse
import os
import sys
import time
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from arguments import (AT_LEAST_0, AT_LEAST_1, DEMO_ROOTS, DOMAINS, FACTOR, HelpFormatter, add_flags, check_domains,
                       common_parser, with_data_roots)
from dataloader import (DATA_FLAGS, SplitDataset, check_disjoint, data_loader, episode_sampler, eval_transform, iterate,
                        open_split, train_transform)
from harness import distributed
from harness.checkpoints import atomic_save, model_state_dict
from base.console import (ProcessError, UserError, exit_on_interrupt, exits_cleanly, flag_hint,
                             interrupt_on_sigterm, progress)
from harness.device import EvalOptions, autocast, grad_scaler, keep_freed_memory, select_device, set_seed, to_device
from harness.embeddings import encode_split
from harness.evaluation import git_revision, mean_ci
from base.files import trim_log
from harness.outputs import check_file_name, check_output, command_inputs
from harness.runs import (Progress, Run, RunPaths, check_existing_run, check_finite, data_identity, data_label,
                          interrupted_message, log_entry, open_tensorboard, save_last, weights_paths,
                          write_identity)
from models.protonet import METRICS, prototype_logits, split_episode
from models.classifier import EncoderClassifier
from dataloader import query_targets
from networks import build_encoder


PRETRAIN_DOMAINS = {
    'epochs': AT_LEAST_1, 'batch_size': AT_LEAST_1, 'val_every': AT_LEAST_1, 'val_shot': AT_LEAST_1,
    'val_query': AT_LEAST_1, 'val_episodes': AT_LEAST_1, 'milestones': AT_LEAST_1,
    'val_way': DOMAINS['N'], 'lr': AT_LEAST_0, 'wd': AT_LEAST_0, 'gamma': FACTOR, 'n_workers': AT_LEAST_0,
    'seed': DOMAINS['seed'],
}


PRETRAIN_LR = {'sgd': 0.1, 'adam': 0.001}
# A short schedule for the built-in demo data on a 2-core CPU (its val split has 8 classes).
PRETRAIN_DEMO_PRESET = dict(network_name='convnet', epochs=4, batch_size=32, milestones=[3], val_every=1, val_way=5)


PRETRAIN_FLAGS = {
    'optimisation': {
        '--epochs': dict(type=int, default=100, help='passes over the train split'),
        '--batch_size': dict(type=int, default=128, help=(
            'images per optimisation step, over all processes (each takes batch_size / processes)')),
        '--optimizer': dict(default='auto', choices=['auto', 'sgd', 'adam'],
                            help='auto: SGD with Nesterov momentum 0.9 for resnet, Adam for convnet (as FEAT)'),
        '--lr': dict(type=float, default=None, help='learning rate; none given: 0.1 for SGD, 0.001 for Adam'),
        '--milestones': dict(type=int, nargs='+', default=[60, 80],
                             help='epochs after which the learning rate is multiplied by --gamma'),
        '--gamma': dict(type=float, default=0.1, help='learning-rate factor at each milestone'),
        '--wd': dict(type=float, default=0.0005, help='weight decay'),
    },
    'validation (model selection)': {
        '--val_every': dict(type=int, default=5,
                            help='epochs between two validations (the last epoch always validates)'),
        '--val_way': dict(type=int, default=16, help='classes per validation episode'),
        '--val_shot': dict(type=int, default=1, help='support images per class'),
        '--val_query': dict(type=int, default=15, help='query images per class'),
        '--val_episodes': dict(type=int, default=200,
                               help='validation episodes (the same ones at every validation)'),
    },
    'output': {
        '--out': dict(default=None, help=(
            'weights file to write; none given: <save_dir>/pretrained/<data>-<network_name>-pretrain-seed<seed>.pth. '
            'Its state, log and identity go beside it as .last.pth, .log.jsonl and .run.json')),
        '--sync_bn': dict(action='store_true',
                          help='CUDA, several processes: synchronise BatchNorm statistics over the whole batch'),
    },
}


def get_pretrain_parser() -> argparse.ArgumentParser:
    """The flags of pretrain.py (every one documented in docs/pretrain.md and used)."""
    parser = argparse.ArgumentParser(
        description='Supervised pretraining of the GLoFA backbone (encoder + linear classifier over the '
                    'train classes), with few-shot validation for model selection.',
        formatter_class=HelpFormatter, parents=[common_parser()])
    return add_flags(parser, PRETRAIN_FLAGS)


def parse_pretrain_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Parse pretrain.py's command line; --demo changes the defaults, explicit flags still win."""
    parser = get_pretrain_parser()
    args = parser.parse_args(argv)
    if args.demo:
        parser.set_defaults(**DEMO_ROOTS[args.demo], **PRETRAIN_DEMO_PRESET)
        args = parser.parse_args(argv)
    with_data_roots(args)
    args.optimizer = args.optimizer if args.optimizer != 'auto' else ('sgd' if args.network_name == 'resnet' else 'adam')
    args.lr = args.lr if args.lr is not None else PRETRAIN_LR[args.optimizer]
    return args


def pretrain_identity(args) -> dict:
    """What defines a pretraining's result, as ``run_identity`` for meta-training. The number of epochs is
    left out: a finished pretraining can be continued with --resume and more --epochs."""
    return {**data_identity(args), 'network_name': args.network_name, 'normalization': args.normalization,
            'batch_size': args.batch_size,
            'optimizer': args.optimizer, 'lr': args.lr, 'milestones': list(args.milestones), 'gamma': args.gamma,
            'wd': args.wd, 'seed': args.seed}


def pretrain_paths(args) -> RunPaths:
    """The FEAT-format weights (--out, else under <save_dir>/pretrained/), and beside them the state to
    resume from, the JSON log and the identity."""
    data = data_label(args)  # the data folder's name (roots and mix), as train.py's runs
    return weights_paths(args.out or os.path.join(args.save_dir, 'pretrained',
                                                  f'{data}-{args.network_name}-pretrain-seed{args.seed}.pth'))


# ------------------------------------------------------------------ the pretraining
def build_optimizer(name: str, parameters: Iterable[torch.Tensor], lr: float, wd: float) -> torch.optim.Optimizer:
    """'sgd': SGD with Nesterov momentum 0.9 (FEAT's ResNet-12 pretraining); 'adam': Adam (its Conv-4)."""
    if name == 'sgd':
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=wd)


def classification_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        amp: bool = False) -> tuple[torch.Tensor, int]:
    """Cross-entropy of a batch (images (B, 3, H, W), labels (B,)) and the number predicted right."""
    with autocast(images.device, amp):
        logits = model(images)  # (B, n_classes)
        loss = F.cross_entropy(logits.float(), labels)
    return loss, int((logits.argmax(dim=1) == labels).sum())


class ShuffledBatches:
    """Batch sampler of supervised pretraining, for process ``rank`` of ``world_size``.

    Epoch e (``set_epoch``, as DistributedSampler): a permutation of the split's images and one
    augmentation seed per image, both from a generator seeded with seed + e, so an epoch's batches and
    images depend on (seed, e) alone, not on the number of processes or workers. The permutation is
    cut into ``len(self)`` global batches of ``batch_size`` (a last incomplete one is dropped); process
    r takes positions [r * b, (r + 1) * b) of each, b = batch_size / world_size. Batches are lists of
    (index, seed) pairs, for ``FewShotDataset``.
    """

    def __init__(self, n_images: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f'batch_size {batch_size} is not divisible by world_size {world_size}')
        self.n_images, self.batch_size, self.seed = n_images, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_images // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n_images, generator=g)
        seeds = torch.randint(2 ** 62, (self.n_images,), generator=g)  # seeds[i]: image i's augmentation
        share = self.batch_size // self.world_size
        for b in range(len(self)):
            start = b * self.batch_size + self.rank * share
            indices = order[start:start + share]
            yield list(zip(indices.tolist(), seeds[indices].tolist()))


@torch.no_grad()
def prototype_accuracies(features: torch.Tensor, episodes: Iterable[torch.Tensor], n_way: int,
                         n_shot: int) -> dict[str, np.ndarray]:
    """ProtoNet accuracy of each episode on cached embeddings, with two metrics.

    features: (n_images, d), the split's embeddings in dataset order (``encode_split``); each episode
    is an index tensor (N * (K + Q),) in shot-major order (``EpisodeSampler``). The prototype of class
    n is the mean of its K support embeddings; 'euclidean' logits are -||q - p_n||^2, 'cosine' ones
    <q, p_n / ||p_n||> (whose argmax is that of cos(q, p_n)). Returns {'cosine': (n_episodes,), 'euclidean': (n_episodes,)}, values in [0, 1].
    """
    correct = {metric: [] for metric in METRICS}
    for episode in episodes:
        x = features[episode.to(features.device)].float()                   # (N*S, d)
        n_query = len(episode) // n_way - n_shot
        _, query, prototypes = split_episode(x, n_way, n_shot)               # (N*Q, d), (N, d)
        targets = query_targets(n_way, n_query, x.device)                   # (N*Q,)
        for metric in METRICS:  # ProtoNet's logits (the argmax does not depend on a temperature)
            logits = prototype_logits(query, prototypes, metric, 1.0)        # (N*Q, N)
            correct[metric].append((logits.argmax(dim=1) == targets).float().mean().item())
    return {metric: np.asarray(values) for metric, values in correct.items()}


# ------------------------------------------------------------------ flags
def check_flags(args, device: torch.device) -> None:
    check_domains(args, PRETRAIN_DOMAINS)
    processes = distributed.world_size()
    if args.batch_size % processes:
        lower = max(processes, args.batch_size - args.batch_size % processes)
        raise UserError(f'--batch_size {args.batch_size} is not divisible by the {processes} processes: each '
                        f'process takes an equal share (e.g. --batch_size {lower})')
    if args.amp and device.type != 'cuda':
        raise UserError('--amp needs a CUDA device (this run is on the CPU)')
    if args.tensorboard:
        from harness.tensorboard import tensorboard_writer_class
        tensorboard_writer_class()  # refused now, before any work
    if args.sync_bn and device.type != 'cuda':
        raise UserError('--sync_bn needs CUDA devices (on the CPU each process keeps its own BatchNorm statistics)')


def check_data(args, train_set: SplitDataset, val_set: SplitDataset) -> None:
    """Refuse data that cannot give one full batch or one validation episode, before any training."""
    if len(train_set) < args.batch_size:
        raise UserError(f'--batch_size {args.batch_size} is larger than the train split ({train_set.location}: '
                        f'{len(train_set)} images): there would be no full batch')
    with flag_hint(f'--val_way {args.val_way}, --val_shot {args.val_shot} and --val_query {args.val_query}'):
        episode_sampler(val_set, 1, args.val_way, args.val_shot + args.val_query, task_mix=args.task_mix)  # its checks


# ------------------------------------------------------------------ outputs and state
def save_state(run: Run, finished: bool) -> None:
    p = run.progress
    save_last(run, finished, epoch=p.done, best_accuracy=p.best_accuracy, best_epoch=p.best_at,
              # the shuffling generator of epoch e is seeded with seed + e (ShuffledBatches.set_epoch)
              sampler={'seed': run.args.seed, 'next_epoch': p.done + 1})


# ------------------------------------------------------------------ phases
def train_one_epoch(run: Run, loader, bar) -> tuple[float, float, float]:
    """One pass over this process's share of the epoch's batches: (mean loss, accuracy) over all
    processes, and the seconds it took."""
    run.model.train()
    args, device = run.args, run.device
    loss_sum, correct, count = 0.0, 0, 0
    start = time.perf_counter()
    for images, labels in iterate(loader):
        labels = labels.to(device, non_blocking=True)
        loss, right = classification_loss(run.model, to_device(images, device, args.channels_last), labels, args.amp)
        where = f'process {distributed.rank()}, ' if distributed.world_size() > 1 else ''
        check_finite(loss, run, f'{where}epoch {run.progress.done + 1}', 'epoch', '--lr')
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()  # DistributedDataParallel averages the gradients
        run.scaler.step(run.optimizer)     # (the scaler is off but with float16 --amp: harness.device.grad_scaler)
        run.scaler.update()
        loss = loss.item()
        loss_sum, correct, count = loss_sum + loss * len(labels), correct + right, count + len(labels)
        bar.set_postfix(epoch=run.progress.done + 1, loss=f'{loss_sum / count:.4f}',
                        acc=f'{100 * correct / count:.1f}%', lr=f'{run.optimizer.param_groups[0]["lr"]:.2g}',
                        refresh=False)
        bar.update(1)  # shows the bar at most once per refresh interval (off a terminal: every 30 s)
    seconds = time.perf_counter() - start
    loss_sum, correct, count = distributed.all_reduce_sum([loss_sum, correct, count], device)
    return loss_sum / count, correct / count, seconds


def validate(run: Run, val_set: SplitDataset) -> dict[str, np.ndarray]:
    """ProtoNet accuracies (cosine and Euclidean) of the same --val_episodes episodes at every validation,
    on embeddings of the val split encoded once. The DropBlock ramp counters are left as they were."""
    args, encoder = run.args, run.plain.encoder
    features = encode_split(encoder, val_set, EvalOptions(run.device, args.n_workers, args.amp, args.channels_last))
    sampler = episode_sampler(val_set, args.val_episodes, args.val_way, args.val_shot + args.val_query,
                              torch.Generator().manual_seed(args.seed + 1), args.task_mix)
    episodes = progress(sampler, desc='validation', leave=False, unit='ep')
    return prototype_accuracies(features, episodes, args.val_way, args.val_shot)


def validate_and_save(run: Run, val_set: SplitDataset, loss: float, accuracy: float, lr: float,
                      seconds: float, steps: int, bar) -> None:
    """Rank 0: validation, the best weights in FEAT's format when the cosine accuracy beats the best so
    far, one JSON line in the log and one line on screen."""
    args, p = run.args, run.progress
    accuracies = validate(run, val_set)
    (cosine, cosine_ci), (euclidean, euclidean_ci) = mean_ci(accuracies['cosine']), mean_ci(accuracies['euclidean'])
    improved = cosine > p.best_accuracy
    if improved:
        p.best_accuracy, p.best_at = cosine, p.done
        atomic_save({'params': model_state_dict(run.plain)}, run.paths.best)
    log_entry(run, {'epoch': p.done, 'loss': loss, 'train_accuracy': accuracy, 'lr': lr,
                               'val_cosine': cosine, 'val_cosine_ci': cosine_ci, 'val_euclidean': euclidean,
                               'val_euclidean_ci': euclidean_ci, 'best_val_cosine': p.best_accuracy,
                               'best_epoch': p.best_at, 'epoch_seconds': seconds, 'steps': steps}, 'epoch')
    bar.write(f'epoch {p.done}: loss {loss:.4f}, train accuracy {100 * accuracy:.2f} %, lr {lr:.3g}; validation '
              f'({args.val_way}-way {args.val_shot}-shot, {args.val_episodes} episodes) cosine '
              f'{100 * cosine:.2f} ± {100 * cosine_ci:.2f} %, euclidean {100 * euclidean:.2f} ± {100 * euclidean_ci:.2f} %'
              f'{" (best, saved)" if improved else ""}')


def summary(run: Run) -> None:
    args, p = run.args, run.progress
    n_encoder = len(run.plain.encoder.state_dict())
    print(f'best validation accuracy {100 * p.best_accuracy:.2f} % (cosine prototypes, {args.val_way}-way '
          f'{args.val_shot}-shot, {args.val_episodes} episodes) at epoch {p.best_at}; weights {run.paths.best} '
          f'({n_encoder} encoder tensors, fc {tuple(run.plain.fc.weight.shape)})')
    demo = f' --demo{" mixed" if args.demo == "mixed" else ""}' if args.demo else ''
    print(f'next: python train.py{demo} --network_name {args.network_name} '
          f'--pretrained {run.paths.best}')
    print(f'seed {args.seed}, revision {git_revision()}')


# ------------------------------------------------------------------ main
def pretrain(args, built: list) -> dict:
    """The whole pretraining; the Run is appended to ``built`` as soon as it exists (for the interrupt)."""
    device = select_device(args.device, [0])
    check_flags(args, device)
    device = distributed.setup(device)
    main_process, processes = distributed.is_main_process(), distributed.world_size()
    if args.demo and main_process:
        from harness.demo import prepare_demo
        prepare_demo(args)
    distributed.barrier()
    set_seed(args.seed + distributed.rank())
    paths = pretrain_paths(args)

    # ---------------- data
    root = args.data_path
    with flag_hint(DATA_FLAGS):
        train_set = open_split(root, 'train', train_transform(args.normalization))
        val_set = open_split(root, 'val', eval_transform(args.normalization))
        check_disjoint({'train': train_set, 'val': val_set}, args.allow_overlap)
    check_data(args, train_set, val_set)
    if main_process:  # an existing file of this run is the existing-run rule's (check_existing_run)
        flag = '--out' if args.out else '--save_dir'
        check_output(paths.best, flag, command_inputs(args, train_set, val_set), True)
        for path in paths.files():  # the run's files beside it: names that fit too
            check_file_name(path, flag)
        if os.path.lexists(paths.best) and not os.path.isfile(paths.identity):
            raise UserError(f'{flag} {paths.best} exists and was not written by pretrain.py (no run record '
                            f'{paths.identity} beside it): refused, so nothing of yours is replaced; choose another '
                            f'file')
    record = check_existing_run(args, paths, lambda saved: saved['epoch'] >= args.epochs, 'epoch',
                                'pass --out to write elsewhere, or --resume with more --epochs to continue it', main_process)
    if record is None and args.resume and main_process:
        from harness.finding import resume_elsewhere
        resume_elsewhere(args, paths)
    distributed.barrier()  # rank 0 may have removed an earlier run's files (--overwrite)
    sampler = ShuffledBatches(len(train_set), args.batch_size, args.seed, distributed.rank(), processes)
    loader = data_loader(train_set, args.n_workers, device.type == 'cuda', batch_sampler=sampler,
                         persistent_workers=args.n_workers > 0)

    # ---------------- model and optimisation
    model = EncoderClassifier(build_encoder(args.network_name), len(train_set.class_names)).to(device)
    if args.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    model = distributed.wrap(model, device, args.sync_bn)
    plain = distributed.unwrap(model)
    optimizer = build_optimizer(args.optimizer, plain.parameters(), args.lr, args.wd)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=args.gamma)
    run = Run(args, device, paths, model, optimizer, scheduler, grad_scaler(args.amp), pretrain_identity(args),
              Progress(best_accuracy=-1.0), rank=distributed.rank(), world_size=processes, plain=plain)
    built.append(run)
    p = run.progress
    if record is not None:
        from harness.finding import load_last
        load_last(run, record)
        p.done = p.saved = record['epoch']
        p.best_accuracy, p.best_at = record['best_accuracy'], record['best_epoch']
        if main_process:
            print(f'resumed {paths.last} at epoch {p.done}')
    if main_process:
        os.makedirs(os.path.dirname(os.path.abspath(paths.log)), exist_ok=True)
        trim_log(paths.log, 'epoch', p.done)
        write_identity(run.config, paths)
        open_tensorboard(run, os.path.splitext(os.path.basename(paths.best))[0])
        print(f'pretraining {args.network_name} on {", ".join(root)}: {len(train_set.class_names)} classes, {len(train_set)} '
              f'images (val {len(val_set.class_names)} classes, {len(val_set)} images); {args.epochs} '
              f'epoch{"s" if args.epochs > 1 else ""} of '
              f'{len(sampler)} steps of {args.batch_size} images; {args.optimizer} lr {args.lr:g}, milestones '
              f'{" ".join(map(str, args.milestones))}, gamma {args.gamma:g}; on {device}, {processes} '
              f'process{"es" if processes > 1 else ""}'
              f'{f" of {args.batch_size // processes} images a step" if processes > 1 else ""}')

    # ---------------- training, validation on rank 0 while the others wait
    with progress(total=args.epochs * len(sampler), initial=min(p.done, args.epochs) * len(sampler),
              desc='pretraining', unit='step', dynamic_ncols=True, disable=not main_process) as bar:
        if p.done == 0:
            save_state(run, finished=False)
        for epoch in range(p.done + 1, args.epochs + 1):
            sampler.set_epoch(epoch)
            loss, accuracy, seconds = train_one_epoch(run, loader, bar)
            lr = optimizer.param_groups[0]['lr']
            scheduler.step()
            p.done = epoch
            if main_process and (epoch % args.val_every == 0 or epoch == args.epochs):
                validate_and_save(run, val_set, loss, accuracy, lr, seconds, len(sampler), bar)
            distributed.barrier()
            save_state(run, finished=epoch == args.epochs)
    if main_process:
        summary(run)
    distributed.cleanup()
    return {'paths': paths, 'epoch': p.done, 'best_accuracy': p.best_accuracy, 'best_epoch': p.best_at}


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    interrupt_on_sigterm()
    keep_freed_memory()
    args = parse_pretrain_args(argv)
    built = []  # the run, once it exists

    def message() -> str:
        if not built:
            return 'interrupted before pretraining started: no state was written'
        progress = built[0].progress  # the epoch after the saved one runs (its validation included)
        return interrupted_message(built[0], f'epoch {(progress.saved or 0) + 1}', 'epoch')

    try:
        with exit_on_interrupt(message, report=distributed.is_main_process()):
            return pretrain(args, built)
    except UserError as error:
        if distributed.is_main_process() or isinstance(error, ProcessError):
            raise
        sys.exit(2)  # the same mistake on every process: rank 0 reports it


if __name__ == '__main__':
    main(sys.argv[1:])
