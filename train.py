"""Meta-train GLoFA (or --model_name protonet / feat) from a pretrained encoder: python train.py --N 5 --K 1 [--resume].

Every --episode_gap training episodes: mean training loss over the gap, validation accuracy, a checkpoint
when it beats the best so far, then one step of the learning-rate schedule. After training, the best
checkpoint is evaluated on the test split.
"""
import contextlib
import os
import sys
from typing import Optional

import numpy as np
import torch

from arguments import check_args, parse_args
from dataloader import (DATA_FLAGS, EPISODE_FLAGS, check_disjoint, episode_sampler, eval_transform, query_targets,
                        generate_data_loader, iterate, open_split, train_transform)
from harness.checkpoints import atomic_save, build_model, build_optimizer, load_model_checkpoint, model_state_dict
from base.console import NonFiniteLoss, UserError, exit_on_interrupt, exits_cleanly, flag_hint, progress
from harness.device import EvalOptions, autocast, grad_scaler, place_model, to_device
from harness.evaluation import describe_eval_mode, draw_episodes, mean_ci, run_episodes, run_test
from base.files import check_output_folder, trim_log
from harness.runs import (Progress, Run, check_existing_run, check_finite, interrupted_message, log_entry,
                          open_tensorboard, run_identity, run_name, run_paths, save_last, set_up, write_identity)
from models.diagnostics import (ADAPTOR_RECORD, adaptors_died_line, adaptors_off_warning, record_episode,
                                training_diagnostics)
from models.glofa import GLoFA


def train_one_gap(run: Run, loader, bar) -> tuple[list[float], Optional[dict]]:
    """Train on the loader's episodes (one gap): their losses and, for GLoFA, what its adaptors did on each
    (``ADAPTOR_RECORD``). A non-finite loss stops the run."""
    model, optimizer, args, device = run.model, run.optimizer, run.args, run.device
    model.train()
    if args.freeze_encoder:
        model.encoder.eval()  # BatchNorm normalises by its running statistics and leaves them as they are
    targets = query_targets(args.N, args.Q, device)  # query j is of class j % N
    losses, adaptors = [], {key: [] for key in ADAPTOR_RECORD} if isinstance(model, GLoFA) else None
    for images, _ in iterate(loader):  # one episode: N*(K+Q) images, shot-major
        with autocast(device, args.amp):
            with torch.no_grad() if args.freeze_encoder else contextlib.nullcontext():
                features = model.encode(to_device(images, device, args.channels_last))  # (N*(K+Q), d)
            loss, adaptation = model.loss(features, targets, args.N, args.K)
        check_finite(loss, run, f'episode {run.progress.done + len(losses) + 1}', 'episode', '--lr or --lr_network')
        optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()  # the scaler is off but with float16 --amp: then the loss is scaled,
        run.scaler.unscale_(optimizer)     # the gradients unscaled, and a step with non-finite ones skipped
        if adaptors is not None:  # GLoFA: strengths, h(S) and the gradients reaching the set functions
            record_episode(adaptors, model, adaptation)
        run.scaler.step(optimizer)
        run.scaler.update()
        losses.append(loss.item())
        bar.set_postfix(loss=f'{np.mean(losses):.4f}', lr=f'{optimizer.param_groups[-1]["lr"]:.2g}', refresh=False)
        bar.update(1)
    return losses, adaptors


def save_state(run: Run) -> None:
    """The 'last' state after ``run.progress.done`` episodes, with the reference's statistics."""
    p = run.progress
    save_last(run, finished=p.done >= run.args.n_training_episodes, episode=p.done, statistics=p.statistics,
              best_accuracy=p.best_accuracy)


def validate_and_save(run: Run, val_set, validation, losses: list[float], adaptors: Optional[dict]):
    """The end of a gap, in the reference's order: validation, best checkpoint, scheduler step; then the
    statistics (with GLoFA's per-episode ``adaptors``), the JSON log line and the 'last' state. Returns the
    validation and whether it improved."""
    args, p, paths = run.args, run.progress, run.paths
    try:
        results = run_episodes(run.model, val_set, *validation, EvalOptions.from_args(args, run.device),
                               desc='validation')
    except UserError as error:  # non-finite logits: the weights diverged in this gap
        raise NonFiniteLoss(f'{error}; stopped after episode {p.done}. The state after episode {p.saved} is kept in '
                            f'{paths.last}: try a lower --lr or --lr_network') from None
    accuracy, ci = mean_ci(results.accuracies)
    loss = float(np.mean(losses))
    p.statistics['training_loss'].append(loss)
    p.statistics['validating_accuracy'].append(accuracy)
    if adaptors is not None:  # one entry per training episode, beside the reference's one per validation
        history = p.statistics.setdefault('training_episodes', {key: [] for key in ('episode', *ADAPTOR_RECORD)})
        history['episode'].extend(range(p.done - len(losses) + 1, p.done + 1))
        for key in ADAPTOR_RECORD:
            history[key].extend(adaptors[key])
    improved = accuracy > p.best_accuracy
    if improved:  # the reference's record; its key 'epoch' holds the number of training episodes done
        p.best_accuracy, p.best_at = accuracy, p.done
        atomic_save({'state_dict': model_state_dict(run.model), 'validating_accuracy': accuracy,
                     'epoch': p.done, 'config': run.config}, paths.best)
    run.scheduler.step()
    atomic_save(p.statistics, paths.stat)
    lrs = {'lr_network': run.optimizer.param_groups[0]['lr'],
           **({'lr': run.optimizer.param_groups[1]['lr']} if len(run.optimizer.param_groups) > 1 else {})}
    log_entry(run, {'episode': p.done, 'training_loss': loss, 'validating_accuracy': accuracy, 'validating_ci': ci,
                    'best_validating_accuracy': p.best_accuracy, **lrs, **results.diagnostics(),
                    **(training_diagnostics(adaptors) if adaptors else {})}, 'episode')
    save_state(run)
    return results, improved


def validation_line(episode: int, losses: list[float], results, improved: bool) -> str:
    accuracy, ci = mean_ci(results.accuracies)
    d = results.diagnostics()
    strengths = f', alpha_task {d["alpha_task"]:.3f}, alpha_cls {d["alpha_cls"]:.3f}' if d else ''
    return (f'episode {episode}: training loss {np.mean(losses):.4f}, validation accuracy '
            f'{100 * accuracy:.2f} ± {100 * ci:.2f} %{strengths}{" (best, saved)" if improved else ""}')


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = set_up(args, lambda device: check_args(args, device))
    if device.type == 'cpu' and args.network_name == 'resnet':
        print(f'note: the ResNet-12 is slow on the CPU (seconds per training episode, minutes per encoded split)'
              f'{"; to check that the pipeline runs" if args.flag_debug else "; for a quick check"}, '
              f'--network_name convnet (Conv-4) takes seconds')
    check_output_folder(args.save_dir, '--save_dir')
    identity = run_identity(args)  # the data and the pretrained weights by content: made once
    name, root = run_name(args, identity), args.data_path
    paths = run_paths(args, name)

    # ---------------- data
    with flag_hint(DATA_FLAGS):
        train_set = open_split(root, 'train', train_transform(args.normalization))
        val_set = open_split(root, 'val', eval_transform(args.normalization))
        test_set = open_split(root, 'test', eval_transform(args.normalization))
        check_disjoint({'train': train_set, 'val': val_set, 'test': test_set}, args.allow_overlap)
    if args.json:  # the rule for outputs, before any work (harness.outputs)
        from harness.outputs import check_output, command_inputs
        check_output(args.json, '--json', command_inputs(args, train_set, val_set, test_set), args.overwrite)
    with flag_hint(EPISODE_FLAGS):  # every split fits the episodes: fail now, not after hours of training
        for dataset in (train_set, val_set, test_set):
            episode_sampler(dataset, 1, args.N, args.K + args.Q, task_mix=args.task_mix)

    # ---------------- model, optimizer, schedule, or the saved state to resume
    saved = check_existing_run(args, paths, lambda state: state.get('finished', True), 'episode',
                               'evaluate it with test.py and the same flags')
    if saved is None and args.resume:  # no saved state: what there is instead (another run's flags continue it)
        from harness.finding import resume_elsewhere
        resume_elsewhere(args, paths)
    model = place_model(build_model(args, pretrained=saved is None), args, device)
    optimizer = build_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.point, gamma=args.gamma)  # per gap
    generators = {'train': torch.Generator().manual_seed(args.seed), 'val': torch.Generator().manual_seed(args.seed + 1)}
    run = Run(args, device, paths, model, optimizer, scheduler, grad_scaler(args.amp), identity, generators=generators)
    if saved is not None:
        from harness.finding import load_last
        load_last(run, saved)
        run.progress = Progress(done=saved['episode'], saved=saved['episode'], best_accuracy=saved['best_accuracy'],
                                statistics=saved['statistics'])
        print(f"resumed {paths.last} at episode {run.progress.done}")
    trim_log(paths.log, 'episode', run.progress.done)
    write_identity({'run': name, **run.config}, paths)
    open_tensorboard(run, name)
    train_loader = generate_data_loader(train_set, args.n_training_episodes, args.N, args.K + args.Q, args.n_workers,
                                        pin_memory=device.type == 'cuda', task_mix=args.task_mix,
                                        generator=generators['train'], per_pass=args.episode_gap,
                                        done=run.progress.done)  # one pass: the episodes between two validations
    validation = draw_episodes(args, val_set, generators['val'], args.n_validating_episodes, args.N, args.K)
    print(f'run {name} on {device}; {len(train_set)} / {len(val_set)} / {len(test_set)} images in train / '
          f'val / test; validation: {describe_eval_mode(args, validation, len(val_set))}')

    # ---------------- meta-training
    p, phase, bar, said_died = run.progress, 'start-up', None, False

    def during() -> str:
        return {'training': f'episode {int(bar.n) + 1 if bar is not None else p.done + 1}',
                'validation': f'the validation after episode {p.done}'}.get(phase, phase)

    with exit_on_interrupt(lambda: interrupted_message(run, during(), 'episode')):
        with progress(total=args.n_training_episodes, initial=min(p.done, args.n_training_episodes),
                      desc='training', unit='ep', dynamic_ncols=True) as bar:
            if p.done == 0:
                save_state(run)
            while p.done < args.n_training_episodes:
                phase = 'training'
                losses, adaptors = train_one_gap(run, train_loader, bar)
                p.done += len(losses)
                phase = 'validation'
                results, improved = validate_and_save(run, val_set, validation, losses, adaptors)
                bar.write(validation_line(p.done, losses, results, improved))
                died = adaptors and adaptors_died_line(p.statistics['training_episodes'], len(losses), args.adaptor)
                if died and not said_died:
                    bar.write(died)
                said_died = bool(died)
                if results.adaptors_off(args.adaptor):
                    bar.write(adaptors_off_warning(results, 'validation', args.adaptor))

    # ---------------- test of the best checkpoint
    if not os.path.isfile(paths.best):
        raise UserError(f"no best checkpoint was written (validation accuracy never rose above 0); see {paths.stat}")
    best = load_model_checkpoint(model, paths.best, args)
    print(f"best validation accuracy {100 * best['validating_accuracy']:.2f} % at episode {best['epoch']}; "
          f"checkpoint {paths.best}")
    test = run_test(args, [(args.N, args.K)], test_set, model, paths.best, device,
                         f'training is finished and saved: python test.py with the same flags evaluates {paths.best}')
    results = test[args.N, args.K]
    return {'statistics': p.statistics, 'test_accuracies': results.accuracies, 'test': results, 'paths': paths}


if __name__ == '__main__':
    main(sys.argv[1:])
