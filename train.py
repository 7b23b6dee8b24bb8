"""Meta-train GLoFA from a pretrained encoder: python train.py --N 5 --K 1 [--resume].

Every --episode_gap training episodes: mean training loss over the gap, validation accuracy,
a checkpoint when it beats the best so far, then one step of the learning-rate schedule.
After training, the best checkpoint is evaluated on the test split.
"""
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from arguments import parse_args
from checkpoints import (atomic_save, check_config, load_model_checkpoint, load_strict, model_state_dict, read_file,
                         saved_forward_count, strip_module)
from dataloader import FewShotDataset, episode_sampler, eval_transform, generate_data_loader, iterate, open_split, train_transform
from evaluation import (EpisodeResults, Episodes, EvalOptions, adaptors_off_warning, choose_eval_mode,
                        describe_eval_mode, result_lines, run_episodes, setting_figures, write_figures)
from models.glofa import GLoFA, query_targets
from networks import forward_count, set_forward_count
from runs import (build_model, check_args, check_existing_run, data_path, place_model, prepare_demo, run_config,
                  run_identity, run_name, run_paths)
from utils import (UserError, autocast, backward_and_step, exits_cleanly, git_revision, ignore_further_interrupts,
                   interrupt_on_sigterm, interrupted, mean_ci, random_states, select_device, set_random_states, set_seed, to_device, trim_log)


# ------------------------------------------------------------------ model and optimisation
def build_optimizer(args, model: GLoFA) -> torch.optim.SGD:
    """SGD with Nesterov momentum: the encoder at --lr_network, the three set functions at --lr."""
    set_functions = [p for m in (model.f_task, model.f_class, model.h) for p in m.parameters()]
    return torch.optim.SGD([{'params': list(model.encoder.parameters()), 'lr': args.lr_network},
                            {'params': set_functions, 'lr': args.lr}],
                           momentum=args.mo, nesterov=True, weight_decay=args.wd)


def build_scheduler(args, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.MultiStepLR:
    """MultiStepLR over validations: stepped once after each validation."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.point, gamma=args.gamma)


# ------------------------------------------------------------------ training state
@dataclass
class RunState:
    """Everything a resumed run needs besides the model, optimizer and scheduler."""
    episode: int = 0          # training episodes done
    saved_episode: int = 0    # the episode whose state the 'last' checkpoint holds
    best_accuracy: float = 0.0
    statistics: dict = field(default_factory=lambda: {'training_loss': [], 'validating_accuracy': []})


@dataclass
class Run:
    """One training run: its flags, files, model, optimisation and state, handed from phase to phase."""
    args: object
    device: torch.device
    paths: dict
    model: GLoFA
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    scaler: Optional[torch.amp.GradScaler]
    generators: dict          # 'train' (episodes and augmentation) and 'val' (validation episodes)
    state: RunState = field(default_factory=RunState)


def save_last(run: Run, finished: bool) -> None:
    """The whole state of the run after ``run.state.episode`` episodes, written atomically."""
    state = run.state
    atomic_save({'state_dict': model_state_dict(run.model), 'optimizer': run.optimizer.state_dict(),
                 'scheduler': run.scheduler.state_dict(), 'scaler': run.scaler.state_dict() if run.scaler else None,
                 'random_states': random_states(),
                 'generators': {k: g.get_state() for k, g in run.generators.items()},
                 'episode': state.episode, 'statistics': state.statistics, 'best_accuracy': state.best_accuracy,
                 'forward_count': forward_count(run.model.encoder), 'config': run_config(run.args),
                 'finished': finished}, run.paths['last'])
    state.saved_episode = state.episode


def load_last(run: Run) -> dict:
    path = run.paths['last']
    record = read_file(path, 'resume checkpoint', weights_only=False)
    if not isinstance(record, dict) or 'optimizer' not in record or 'episode' not in record:
        raise UserError(f'resume checkpoint {path} is not a last-state checkpoint of train.py')
    check_config(record, run_config(run.args), path)
    load_strict(run.model, strip_module(record['state_dict']), path, 'resume checkpoint')
    run.optimizer.load_state_dict(record['optimizer'])
    run.scheduler.load_state_dict(record['scheduler'])
    if run.scaler is not None and record.get('scaler'):
        run.scaler.load_state_dict(record['scaler'])
    for k, g in run.generators.items():
        g.set_state(record['generators'][k])
    set_forward_count(run.model.encoder, saved_forward_count(record))
    run.state = RunState(episode=record['episode'], saved_episode=record['episode'],
                         best_accuracy=record['best_accuracy'], statistics=record['statistics'])
    set_random_states(record['random_states'])
    return record


# ------------------------------------------------------------------ phases
class NonFiniteLoss(Exception):
    def __init__(self, value: float, episode: int):
        super().__init__(f'training loss became {value} at episode {episode}')
        self.value, self.episode = value, episode


def train_one_gap(run: Run, loader, bar: tqdm) -> list[float]:
    """Train on the loader's episodes (one gap); returns their losses. A non-finite loss stops the run."""
    model, optimizer, scaler, args, device = run.model, run.optimizer, run.scaler, run.args, run.device
    model.train()
    targets = query_targets(args.N, args.Q, device)
    losses = []
    for images, _ in iterate(loader):
        with autocast(device, args.amp):
            logits = model(to_device(images, device, args.channels_last), args.N, args.K)  # (N*Q, N)
            loss = F.cross_entropy(logits.float(), targets)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(loss.item(), run.state.episode + len(losses) + 1)
        backward_and_step(loss, optimizer, scaler)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f'{np.mean(losses):.4f}', lr=f'{optimizer.param_groups[1]["lr"]:.2g}')
    return losses


def split_episodes(args, dataset: FewShotDataset, generator: torch.Generator, n_episodes: int) -> tuple[Episodes, str]:
    """The run's N-way K-shot episodes of a split, and the evaluation way --eval_mode chooses for them, once."""
    episodes = Episodes(n_episodes, args.N, args.K, args.Q, generator, args.task_mix)
    return episodes, choose_eval_mode(args.eval_mode, len(dataset), n_episodes, episodes.images_per_episode)


def validate_and_save(run: Run, val_set: FewShotDataset, validation: tuple[Episodes, str],
                      losses: list[float]) -> tuple[EpisodeResults, bool]:
    """End of a gap, in the reference's order: validation, best checkpoint, scheduler step; then the
    statistics, the JSON log line and the 'last' checkpoint. Returns the validation and whether it improved."""
    args, state, paths = run.args, run.state, run.paths
    results = run_episodes(run.model, val_set, *validation, EvalOptions.from_args(args, run.device), desc='validation')
    accuracy, ci = mean_ci(results.accuracies)
    loss = float(np.mean(losses))
    state.statistics['training_loss'].append(loss)
    state.statistics['validating_accuracy'].append(accuracy)
    improved = accuracy > state.best_accuracy
    if improved:
        state.best_accuracy = accuracy
        atomic_save({'state_dict': model_state_dict(run.model), 'validating_accuracy': accuracy,
                     'epoch': state.episode, 'config': run_config(args)}, paths['model'])
    run.scheduler.step()
    atomic_save(state.statistics, paths['stat'])
    with open(paths['log'], 'a') as log:
        log.write(json.dumps({'episode': state.episode, 'training_loss': loss, 'validating_accuracy': accuracy,
                              'validating_ci': ci, 'best_validating_accuracy': state.best_accuracy,
                              'lr_network': run.optimizer.param_groups[0]['lr'],
                              'lr': run.optimizer.param_groups[1]['lr'], **results.diagnostics()}) + '\n')
    save_last(run, finished=state.episode >= args.n_training_episodes)
    return results, improved


def validation_line(episode: int, losses: list[float], results: EpisodeResults, improved: bool) -> str:
    accuracy, ci = mean_ci(results.accuracies)
    d = results.diagnostics()
    return (f'episode {episode}: training loss {np.mean(losses):.4f}, validation accuracy '
            f'{100 * accuracy:.2f} ± {100 * ci:.2f} %, alpha_task {d["alpha_task"]:.3f}, alpha_cls '
            f'{d["alpha_cls"]:.3f}{" (best, saved)" if improved else ""}')


def interrupted_message(run: Run, during: str) -> str:
    state = run.state
    return (f"\ninterrupted during {during}; the state after episode {state.saved_episode} is saved in "
            f"{run.paths['last']}: run the same command with --resume to continue")


def write_identity(run: Run) -> None:
    """<run>.run.json: the flags that define the run (what its name's hash stands for)."""
    os.makedirs(os.path.dirname(run.paths['identity']), exist_ok=True)
    with open(run.paths['identity'], 'w') as f:
        json.dump({'run': run_name(run.args), **run_identity(run.args)}, f, indent=1)


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    interrupt_on_sigterm()
    args = parse_args(argv)
    if args.demo:
        prepare_demo(args)
    set_seed(args.seed)
    device = select_device(args.device, args.devices)
    check_args(args, device)
    paths = run_paths(args)
    root = data_path(args)

    # ---------------- data
    train_set = open_split(root, 'train', train_transform())
    val_set = open_split(root, 'val', eval_transform())
    test_set = open_split(root, 'test', eval_transform())
    pin = device.type == 'cuda'
    train_loader = generate_data_loader(root, 'train', args.episode_gap, args.N, args.K + args.Q,
                                        n_workers=args.n_workers, seed=args.seed, pin_memory=pin, dataset=train_set,
                                        task_mix=args.task_mix)
    episodes = train_loader.batch_sampler.sampler
    generators = {'train': episodes.generator, 'val': torch.Generator().manual_seed(args.seed + 1)}
    for dataset in (val_set, test_set):  # fail now, not after hours of training
        episode_sampler(dataset, 1, args.N, args.K + args.Q, task_mix=args.task_mix)

    # ---------------- model
    resuming = check_existing_run(args, paths)
    model = build_model(args, pretrained=not resuming)
    model = place_model(model, args, device)
    optimizer = build_optimizer(args, model)
    scaler = torch.amp.GradScaler('cuda') if args.amp and not torch.cuda.is_bf16_supported() else None
    run = Run(args, device, paths, model, optimizer, build_scheduler(args, optimizer), scaler, generators)
    if resuming:
        load_last(run)
        print(f"resumed {paths['last']} at episode {run.state.episode}")
    trim_log(paths['log'], 'episode', run.state.episode)
    write_identity(run)

    validation = split_episodes(args, val_set, generators['val'], args.n_validating_episodes)
    print(f'run {run_name(args)} on {device}; {len(train_set)} / {len(val_set)} / {len(test_set)} images '
          f'in train / val / test; validation: {describe_eval_mode(args.eval_mode, validation[1], len(val_set), args.n_validating_episodes, validation[0].images_per_episode)}')

    # ---------------- meta-training
    state, phase, bar = run.state, 'start-up', None
    try:
        with tqdm(total=args.n_training_episodes, initial=min(state.episode, args.n_training_episodes),
                  desc='training', unit='ep', dynamic_ncols=True) as bar:
            if state.episode == 0:
                save_last(run, finished=False)
            while state.episode < args.n_training_episodes:
                episodes.n_episodes = min(args.episode_gap, args.n_training_episodes - state.episode)
                phase = 'training'
                losses = train_one_gap(run, train_loader, bar)
                state.episode += len(losses)
                phase = 'validation'
                results, improved = validate_and_save(run, val_set, validation, losses)
                bar.write(validation_line(state.episode, losses, results, improved))
                if results.adaptors_off(args.adaptor):
                    bar.write(adaptors_off_warning(results, 'validation', args.adaptor))
    except NonFiniteLoss as error:
        raise UserError(f"{error}; stopped. The last good state (episode {state.saved_episode}) is kept in "
                        f"{paths['last']}; runs are deterministic, so resuming with the same flags meets the same "
                        f"loss: try a lower --lr or --lr_network") from None
    except (KeyboardInterrupt, RuntimeError) as error:
        # Ctrl-C or SIGTERM, or an error in its wake (a loader worker stopped by the same signal)
        if not isinstance(error, KeyboardInterrupt) and not interrupted():
            raise
        # loaders torn down by the interrupt (workers stopped by the same signal, or still starting)
        # complain while they are collected: nothing to report
        sys.unraisablehook = lambda unraisable: None
        ignore_further_interrupts()
        during = {'training': f'episode {int(bar.n) + 1 if bar is not None else state.episode + 1}',
                  'validation': f'the validation after episode {state.episode}'}.get(phase, phase)
        print(interrupted_message(run, during), file=sys.stderr)
        sys.exit(130)

    # ---------------- test of the best checkpoint
    if not os.path.isfile(paths['model']):
        raise UserError(f"no best checkpoint was written (validation accuracy never rose above 0); see {paths['stat']}")
    record = load_model_checkpoint(model, paths['model'], run_config(args))
    print(f"best validation accuracy {100 * record['validating_accuracy']:.2f} % at episode {record['epoch']}; "
          f"checkpoint {paths['model']}")
    test = split_episodes(args, test_set, torch.Generator().manual_seed(args.seed), args.n_testing_episodes)
    try:
        results = run_episodes(model, test_set, *test, EvalOptions.from_args(args, device), desc='test')
    except KeyboardInterrupt:
        print(f'\ninterrupted during the test; training is finished and saved: python test.py with the same '
              f'flags evaluates {paths["model"]}', file=sys.stderr)
        sys.exit(130)
    print('\n'.join(result_lines(results, args.N, args.K, args.adaptor)))
    print(f'seed {args.seed}, {results.mode} evaluation, revision {git_revision()}')
    if args.json:
        write_figures(args.json, [setting_figures(args.N, args.K, results)])
    return {'statistics': state.statistics, 'test_accuracies': results.accuracies, 'test': results, 'paths': paths}


if __name__ == '__main__':
    main(sys.argv[1:])
