"""Meta-train GLoFA from a pretrained encoder: python train.py --N 5 --K 1 [--resume].

Every --episode_gap training episodes: mean training loss over the gap, validation accuracy,
a checkpoint when it beats the best so far, then one step of the learning-rate schedule.
After training, the best checkpoint is evaluated on the test split.
"""
import json
import os
import random
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from arguments import parse_args
from checkpoints import atomic_save, check_config, load_model_checkpoint, load_strict, model_state_dict, read_file, strip_module
from dataloader import FewShotDataset, episode_sampler, eval_transform, generate_data_loader, iterate, train_transform
from evaluation import evaluate
from models.glofa import GLoFA, query_targets
from networks import forward_counters, set_forward_counters
from runs import build_model, check_args, data_path, place_model, prepare_demo, run_config, run_name, run_paths
from utils import interrupt_on_sigterm
from utils import UserError, accuracy_line, autocast, exits_cleanly, git_revision, mean_ci, select_device, set_seed, to_device


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
class RunState:
    """Everything a resumed run needs besides the model, optimizer and scheduler."""

    def __init__(self):
        self.episode = 0
        self.best_accuracy = 0.0
        self.statistics = {'training_loss': [], 'validating_accuracy': []}


def random_states() -> dict:
    return {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_states(states: dict) -> None:
    random.setstate(states['python'])
    np.random.set_state(states['numpy'])
    torch.set_rng_state(states['torch'])
    if states['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states['cuda'])


def save_last(path: str, args, model, optimizer, scheduler, scaler, state: RunState, generators: dict,
              finished: bool) -> None:
    atomic_save({'state_dict': model_state_dict(model), 'optimizer': optimizer.state_dict(),
                 'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict() if scaler else None,
                 'random_states': random_states(),
                 'generators': {k: g.get_state() for k, g in generators.items()},
                 'episode': state.episode, 'statistics': state.statistics, 'best_accuracy': state.best_accuracy,
                 'forward_counters': forward_counters(model.encoder), 'config': run_config(args),
                 'finished': finished}, path)


def load_last(path: str, args, model, optimizer, scheduler, scaler, state: RunState, generators: dict) -> dict:
    record = read_file(path, 'resume checkpoint', weights_only=False)
    if not isinstance(record, dict) or 'optimizer' not in record or 'episode' not in record:
        raise UserError(f'resume checkpoint {path} is not a last-state checkpoint of train.py')
    check_config(record, run_config(args), path)
    load_strict(model, strip_module(record['state_dict']), path, 'resume checkpoint')
    optimizer.load_state_dict(record['optimizer'])
    scheduler.load_state_dict(record['scheduler'])
    if scaler is not None and record.get('scaler'):
        scaler.load_state_dict(record['scaler'])
    for k, g in generators.items():
        g.set_state(record['generators'][k])
    set_forward_counters(model.encoder, record['forward_counters'])
    state.episode, state.statistics = record['episode'], record['statistics']
    state.best_accuracy = record['best_accuracy']
    set_random_states(record['random_states'])
    return record


# ------------------------------------------------------------------ phases
class NonFiniteLoss(Exception):
    def __init__(self, value: float, episode: int):
        super().__init__(f'training loss became {value} at episode {episode}')
        self.value, self.episode = value, episode


def train_one_gap(model: GLoFA, loader, optimizer, scaler, args, device: torch.device, state: RunState,
                  bar: tqdm) -> list[float]:
    """Train on the loader's episodes (one gap); returns their losses. A non-finite loss stops the run."""
    model.train()
    targets = query_targets(args.N, args.Q, device)
    losses = []
    for images, _ in iterate(loader):
        with autocast(device, args.amp):
            logits = model(to_device(images, device, args.channels_last), args.N, args.K)  # (N*Q, N)
            loss = F.cross_entropy(logits.float(), targets)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(loss.item(), state.episode + len(losses) + 1)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f'{np.mean(losses):.4f}', lr=f'{optimizer.param_groups[1]["lr"]:.2g}')
    return losses


def trim_log(path: str, episode: int) -> None:
    """Keep the log lines of validations up to ``episode`` (none for a new run)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get('episode', 0) <= episode:
                    kept.append(line)
            except ValueError:  # a line cut short by a crash
                pass
    with open(path, 'w') as f:
        f.writelines(kept)


def validate_and_save(model: GLoFA, val_set: FewShotDataset, losses: list[float], args, device: torch.device,
                      optimizer, scheduler, scaler, state: RunState, generators: dict,
                      paths: dict) -> tuple[float, float, bool]:
    """End of a gap, in the reference's order: validation, best checkpoint, scheduler step; then the
    statistics, the JSON log line and the 'last' checkpoint. Returns (accuracy, its 95% CI, improved)."""
    accuracy, ci = mean_ci(evaluate_split(model, val_set, args, device, generators['val'], 'validation'))
    loss = float(np.mean(losses))
    state.statistics['training_loss'].append(loss)
    state.statistics['validating_accuracy'].append(accuracy)
    improved = accuracy > state.best_accuracy
    if improved:
        state.best_accuracy = accuracy
        atomic_save({'state_dict': model_state_dict(model), 'validating_accuracy': accuracy,
                     'epoch': state.episode, 'config': run_config(args)}, paths['model'])
    scheduler.step()
    atomic_save(state.statistics, paths['stat'])
    with open(paths['log'], 'a') as log:
        log.write(json.dumps({'episode': state.episode, 'training_loss': loss, 'validating_accuracy': accuracy,
                              'validating_ci': ci, 'best_validating_accuracy': state.best_accuracy,
                              'lr_network': optimizer.param_groups[0]['lr'],
                              'lr': optimizer.param_groups[1]['lr']}) + '\n')
    save_last(paths['last'], args, model, optimizer, scheduler, scaler, state, generators,
              finished=state.episode >= args.n_training_episodes)
    return accuracy, ci, improved


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
    train_set = FewShotDataset(root, 'train', train_transform())
    val_set = FewShotDataset(root, 'val', eval_transform())
    test_set = FewShotDataset(root, 'test', eval_transform())
    pin = device.type == 'cuda'
    train_loader = generate_data_loader(root, 'train', args.episode_gap, args.N, args.K + args.Q,
                                        n_workers=args.n_workers, seed=args.seed, pin_memory=pin, dataset=train_set)
    episodes = train_loader.batch_sampler.sampler
    generators = {'train': episodes.generator, 'val': torch.Generator().manual_seed(args.seed + 1)}
    for dataset in (val_set, test_set):  # fail now, not after hours of training
        episode_sampler(dataset, 1, args.N, args.K + args.Q)

    # ---------------- model
    model = build_model(args, pretrained=not (args.resume and os.path.isfile(paths['last'])))
    model = place_model(model, args, device)
    optimizer = build_optimizer(args, model)
    scheduler = build_scheduler(args, optimizer)
    scaler = torch.amp.GradScaler('cuda') if args.amp and not torch.cuda.is_bf16_supported() else None
    state = RunState()
    if os.path.isfile(paths['last']):
        if args.resume:
            load_last(paths['last'], args, model, optimizer, scheduler, scaler, state, generators)
            print(f"resumed {paths['last']} at episode {state.episode}")
        else:
            record = read_file(paths['last'], 'resume checkpoint', weights_only=False)
            if isinstance(record, dict) and not record.get('finished', True):
                raise UserError(f"an unfinished run with these flags is saved in {paths['last']} (episode "
                                f"{record.get('episode')}): add --resume to continue it, or move that file to start over")
    elif args.resume:
        print(f"no checkpoint {paths['last']} yet: starting a new run")
    trim_log(paths['log'], state.episode)

    print(f'run {run_name(args)} on {device}; {len(train_set)} / {len(val_set)} / {len(test_set)} images '
          f'in train / val / test')

    # ---------------- meta-training
    try:
        with tqdm(total=args.n_training_episodes, initial=min(state.episode, args.n_training_episodes),
                  desc='training', unit='ep', dynamic_ncols=True) as bar:
            if state.episode == 0:
                save_last(paths['last'], args, model, optimizer, scheduler, scaler, state, generators, finished=False)
            while state.episode < args.n_training_episodes:
                episodes.n_episodes = min(args.episode_gap, args.n_training_episodes - state.episode)
                losses = train_one_gap(model, train_loader, optimizer, scaler, args, device, state, bar)
                state.episode += len(losses)
                accuracy, ci, improved = validate_and_save(model, val_set, losses, args, device, optimizer,
                                                           scheduler, scaler, state, generators, paths)
                bar.write(f'episode {state.episode}: training loss {np.mean(losses):.4f}, validation accuracy '
                          f'{100 * accuracy:.2f} ± {100 * ci:.2f} %{" (best, saved)" if improved else ""}')
    except NonFiniteLoss as error:
        raise UserError(f"{error}; stopped. The last good state (episode {state.episode}) is kept in {paths['last']}; "
                        f"runs are deterministic, so resuming with the same flags meets the same loss: "
                        f"try a lower --lr or --lr_network") from None
    except KeyboardInterrupt:
        print(f"\ninterrupted during episode {state.episode + 1}; the state after episode {state.episode} is "
              f"saved in {paths['last']}: run the same command with --resume to continue", file=sys.stderr)
        # a loader interrupted while starting its workers complains when it is torn down: nothing to report
        sys.unraisablehook = lambda unraisable: None
        sys.exit(130)

    # ---------------- test of the best checkpoint
    if not os.path.isfile(paths['model']):
        raise UserError(f"no best checkpoint was written (validation accuracy never rose above 0); see {paths['stat']}")
    record = load_model_checkpoint(model, paths['model'], run_config(args))
    print(f"best validation accuracy {100 * record['validating_accuracy']:.2f} % at episode {record['epoch']}; "
          f"checkpoint {paths['model']}")
    accuracies = evaluate_split(model, test_set, args, device, torch.Generator().manual_seed(args.seed), 'test',
                                mode=args.eval_mode)
    print(accuracy_line('test', accuracies, args.N, args.K))
    print(f'seed {args.seed}, {args.eval_mode} evaluation, revision {git_revision()}')
    return {'statistics': state.statistics, 'test_accuracies': accuracies, 'paths': paths}


def evaluate_split(model: GLoFA, dataset: FewShotDataset, args, device: torch.device,
                   generator: torch.Generator, desc: str, mode: Optional[str] = None) -> np.ndarray:
    """Per-episode accuracies on the validation or test split with this run's flags."""
    if mode is None:  # validation: cached when it encodes fewer images, unless --eval_mode episodic
        mode = 'episodic' if args.eval_mode == 'episodic' else 'auto'
    n_episodes = args.n_validating_episodes if desc == 'validation' else args.n_testing_episodes
    return evaluate(model, dataset, n_episodes, args.N, args.K, args.Q, device, generator=generator, mode=mode,
                    n_workers=args.n_workers, amp=args.amp, channels_last=args.channels_last, desc=desc)


if __name__ == '__main__':
    main(sys.argv[1:])
