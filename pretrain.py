"""Supervised pretraining of the backbone, as FEAT does: python pretrain.py [--network_name resnet] [--resume].

The encoder and a linear classifier over the train split's classes learn with cross-entropy on
shuffled mini-batches of augmented images. Every --val_every epochs a ProtoNet validation (16-way
1-shot by default) on cached embeddings of the val split picks the best epoch by cosine accuracy;
its weights are written in FEAT's format, {'params': {'encoder.<key>': ..., 'fc.weight': ...,
'fc.bias': ...}}, which train.py --pretrained reads. Several processes (GPUs, or CPU processes):
    torchrun --standalone --nproc_per_node G pretrain.py ...
"""
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
from utils import progress

import distributed
from arguments import PRETRAIN_DOMAINS, parse_pretrain_args
from checkpoints import atomic_save, model_state_dict
from dataloader import ShuffledBatches, SplitDataset, episode_loader, episode_sampler, eval_transform, iterate, \
    open_split, train_transform
from evaluation import EvalOptions, encode_split, prototype_accuracies
from models.classifier import EncoderClassifier, build_optimizer, classification_loss
from networks import build_encoder, forward_count, set_forward_count
from runs import (DATA_FLAGS, Progress, Run, check_disjoint, check_domains, check_existing_run, check_finite, command_inputs,
                  data_path,
                  interrupted_message, load_last, log_entry, open_tensorboard, prepare_demo, pretrain_identity,
                  pretrain_paths, save_last, tensorboard_writer_class, write_identity)
from utils import (ProcessError, UserError, backward_and_step, check_output, exit_on_interrupt,
                   exits_cleanly,
                   flag_hint, git_revision, interrupt_on_sigterm, keep_freed_memory, mean_ci, select_device, set_seed, to_device, trim_log)


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
        tensorboard_writer_class()  # refused now, before any work
    if args.sync_bn and device.type != 'cuda':
        raise UserError('--sync_bn needs CUDA devices (on the CPU each process keeps its own BatchNorm statistics)')


def check_data(args, train_set: SplitDataset, val_set: SplitDataset) -> None:
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
        backward_and_step(loss, run.optimizer, run.scaler)  # DistributedDataParallel averages the gradients
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
    count = forward_count(encoder)
    features = encode_split(encoder, val_set, EvalOptions(run.device, args.n_workers, args.amp, args.channels_last))
    set_forward_count(encoder, count)
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
        prepare_demo(args)
    distributed.barrier()
    set_seed(args.seed + distributed.rank())
    paths = pretrain_paths(args)

    # ---------------- data
    root = data_path(args)
    with flag_hint(DATA_FLAGS):
        train_set = open_split(root, 'train', train_transform(args.normalization))
        val_set = open_split(root, 'val', eval_transform(args.normalization))
        check_disjoint(args, {'train': train_set, 'val': val_set})
    check_data(args, train_set, val_set)
    if main_process:  # an existing file there is the existing-run rule's (check_existing_run)
        check_output(paths.best, '--out' if args.out else '--save_dir', command_inputs(args, train_set, val_set), True)
    record = check_existing_run(args, paths, lambda saved: saved['epoch'] >= args.epochs, 'epoch',
                                'pass --out to write elsewhere, or --resume with more --epochs to continue it')
    distributed.barrier()  # rank 0 may have removed an earlier run's files (--overwrite)
    sampler = ShuffledBatches(len(train_set), args.batch_size, args.seed, distributed.rank(), processes)
    loader = episode_loader(train_set, sampler, args.n_workers, pin_memory=device.type == 'cuda',
                            persistent=args.n_workers > 0)

    # ---------------- model and optimisation
    model = EncoderClassifier(build_encoder(args.network_name), len(train_set.class_names)).to(device)
    if args.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    model = distributed.wrap(model, device, args.sync_bn)
    optimizer = build_optimizer(args.optimizer, distributed.unwrap(model).parameters(), args.lr, args.wd)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.milestones, gamma=args.gamma)
    scaler = torch.amp.GradScaler('cuda') if args.amp and not torch.cuda.is_bf16_supported() else None
    run = Run(args, device, paths, model, optimizer, scheduler, scaler, pretrain_identity(args),
              Progress(best_accuracy=-1.0))
    built.append(run)
    p = run.progress
    if record is not None:
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
