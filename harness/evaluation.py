"""Few-shot evaluation: per-episode accuracies of a model on a split's episodes, and their report.

Two ways give the same answers: 'episodic' encodes every episode's images, as the reference does; 'cached'
encodes each image of the split once (``harness.embeddings``, loaded when it runs) and runs only the model's head, on many episodes at
once. ``draw_episodes`` draws the episodes and chooses the way (--eval_mode), ``run_episodes`` evaluates them.
"""
import math
import os
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from dataloader import data_loader, episode_sampler, iterate
from base.console import UserError, exit_on_interrupt, progress
from harness.device import EvalOptions, autocast, to_device
from models import FewShotModel
from models.diagnostics import ACTING_STRENGTHS, adaptors_off_warning, diagnostics_line, episode_values
from dataloader import query_targets
from networks import advance_forward_count


MODES = ('auto', 'cached', 'episodic')


def choose_eval_mode(mode: str, n_images: int, n_episodes: int, images_per_episode: int) -> str:
    """'auto': cached when encoding the split once costs fewer images than encoding every episode."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if mode != 'auto':
        return mode
    return 'cached' if n_images < n_episodes * images_per_episode else 'episodic'


def draw_episodes(args, dataset, generator: torch.Generator, n_episodes: int, n_way: int,
                   n_shot: int) -> tuple['Episodes', str]:
    """A split's N-way K-shot episodes (--Q, --task_mix) from ``generator``, and the way --eval_mode chooses."""
    episodes = Episodes(n_episodes, n_way, n_shot, args.Q, generator, args.task_mix)
    return episodes, choose_eval_mode(args.eval_mode, len(dataset), n_episodes, episodes.images_per_episode)


def describe_eval_mode(args, drawn: tuple['Episodes', str], n_images: int) -> str:
    """'cached evaluation (auto: the split's 12000 images once, not 10000 episodes x 80 images)'."""
    episodes, chosen = drawn
    how = 'auto' if args.eval_mode == 'auto' else 'forced by --eval_mode'
    once, each = f"the split's {n_images} images once", f'{episodes.n_episodes} episodes x {episodes.images_per_episode} images'
    reason = f'{once}, not {each}' if chosen == 'cached' else f'{each}, not {once}'
    return f'{chosen} evaluation ({how}: {reason})'


@dataclass
class Episodes:
    """``n_episodes`` N-way K-shot Q-query tasks drawn from ``generator``."""
    n_episodes: int
    n_way: int
    n_shot: int
    n_query: int
    generator: Optional[torch.Generator] = None
    task_mix: str = 'class'  # several roots: see dataloader.episode_sampler

    @property
    def images_per_episode(self) -> int:
        return self.n_way * (self.n_shot + self.n_query)


@dataclass
class EpisodeResults:
    """What evaluation measured on each episode, in order."""
    mode: str                 # 'cached' or 'episodic': the way that ran
    accuracies: np.ndarray    # (E,) in [0, 1]
    alphas: np.ndarray        # (E, 2): (alpha_task, alpha_cls) = relu(h(S)); nan for a model without adaptors
    mask_task: np.ndarray     # (E,): mean of m_task over the d features
    mask_cls: np.ndarray      # (E,): mean of m_cls over the N classes and d features
    groups: Optional[list] = None  # (E,) with several roots: each episode's root, or single-source / mixed

    def group_accuracies(self) -> dict:
        """{group: per-episode accuracies} in order of first appearance ({} for a single root)."""
        found = {}
        for group, accuracy in zip(self.groups or [], self.accuracies):
            found.setdefault(group, []).append(accuracy)
        return {group: np.asarray(values) for group, values in found.items()}

    @property
    def has_adaptors(self) -> bool:
        return not np.isnan(self.alphas).all()

    def diagnostics(self) -> dict:
        """Means of the strengths, the share of episodes where each is above 0, the masks ({} without adaptors)."""
        if not self.has_adaptors:
            return {}
        active = self.alphas > 0
        return {'alpha_task': float(self.alphas[:, 0].mean()), 'alpha_cls': float(self.alphas[:, 1].mean()),
                'alpha_task_active': float(active[:, 0].mean()), 'alpha_cls_active': float(active[:, 1].mean()),
                'mask_task': float(self.mask_task.mean()), 'mask_cls': float(self.mask_cls.mean())}

    def figures(self, n_way: int, n_shot: int) -> dict:
        """One setting's figures for --json: accuracy and CI in percent, episodes, way, shot, diagnostics."""
        mean, ci = mean_ci(self.accuracies)
        figures = {'N': n_way, 'K': n_shot, 'episodes': len(self.accuracies), 'accuracy': 100 * mean,
                   'ci95': 100 * ci, 'mode': self.mode, **self.diagnostics()}
        if self.groups is not None:
            figures['groups'] = {group: dict(zip(('accuracy', 'ci95'), (100 * v for v in mean_ci(values))),
                                             episodes=len(values)) for group, values in self.group_accuracies().items()}
        return figures

    def adaptors_off(self, adaptor: str = 'both') -> bool:
        """The acting strengths are 0 on every episode: the masks do nothing (normalised-prototype ProtoNet)."""
        acting = ACTING_STRENGTHS[adaptor]
        return bool(acting) and self.has_adaptors and bool((self.alphas[:, acting] == 0).all())


@torch.no_grad()
def run_episodes(model: FewShotModel, dataset, episodes: Episodes, mode: str, options: EvalOptions,
                 features=None, desc: str = 'test') -> EpisodeResults:
    """Per-episode accuracies and adaptor diagnostics, in eval mode. 'episodic' encodes each episode, as the
    reference does; 'cached' encodes the split once (or takes ``features``) and runs the head on many episodes at
    once. Same episodes, same answers up to rounding; the DropBlock counter advances once per episode either way.
    """
    if mode not in ('cached', 'episodic'):
        raise ValueError(f"mode must be 'cached' or 'episodic' (choose_eval_mode picks one), got {mode!r}")
    model.eval()
    e, device = episodes, options.device
    sampler = episode_sampler(dataset, e.n_episodes, e.n_way, e.n_shot + e.n_query, e.generator, e.task_mix)
    targets = query_targets(e.n_way, e.n_query, device)
    values = np.empty((e.n_episodes, 6))  # per episode: episode_values
    drawn = []  # every episode's indices, in order (episodic: recorded as the loader draws them)
    if mode == 'cached':  # encoded before the episodes' progress bar starts (harness.embeddings)
        from harness.embeddings import SplitFeatures, head_on_stored
        cache = (features or SplitFeatures(model.encoder, dataset, options)).get()  # (len(dataset), d)
        advance_forward_count(model.encoder, e.n_episodes)  # one pass per episode, as the reference counts
    with progress(total=e.n_episodes, desc=desc, leave=False, unit='ep') as bar:
        if mode == 'cached':  # the head on many episodes at once
            head_on_stored(model, cache, iter(sampler), e, options, targets, values, drawn, bar)
        else:
            loader = data_loader(dataset, options.n_workers, device.type == 'cuda',
                                 batch_sampler=recorded(sampler, drawn))
            batches = iterate(loader)  # held here until the end: an interrupt must not tear the workers down early
            for i, (images, _) in enumerate(batches):
                with autocast(device, options.amp):
                    embeddings = model.encode(to_device(images, device, options.channels_last))  # (N*S, d)
                    logits, adaptation = model.episode(embeddings, e.n_way, e.n_shot)  # (N*Q, N)
                values[i] = episode_values(logits, adaptation, targets).cpu().numpy()  # one transfer per episode
                bar.update(1)
    broken = int((values[:, 5] == 0).sum())
    if broken:
        raise UserError(f'{desc}: the logits of {broken} of {e.n_episodes} episodes hold nan or inf: the weights or '
                        f'the images hold non-finite numbers, or the model overflowed (with --amp, try without)')
    groups = None
    if len(getattr(dataset, 'source_names', ())) > 1:  # several roots: each episode's group
        from data.mixing import episode_group
        groups = [episode_group(dataset, indices, e.task_mix) for indices in drawn]
    return EpisodeResults(mode, values[:, 0], values[:, 1:3], values[:, 3], values[:, 4], groups=groups)


def recorded(sampler, drawn: list):
    """``sampler``'s episodes as a loader's batches, each one's indices appended to ``drawn`` as it is drawn."""
    for indices in sampler:
        drawn.append(indices)
        yield indices.tolist()  # plain numbers travel to the workers without sharing a tensor's memory


def result_lines(results: EpisodeResults, n_way: int, n_shot: int, adaptor: str = 'both') -> list[str]:
    """One setting's report: the accuracy, per root with several, the adaptor diagnostics, a warning if off."""
    lines = [accuracy_line('test', results.accuracies, n_way, n_shot)]
    lines += [accuracy_line(f'{group} tasks: test' if group in ('single-source', 'mixed') else f'{group}: test',
                            values, n_way, n_shot) for group, values in results.group_accuracies().items()]  # per root
    if results.has_adaptors:
        lines.append(diagnostics_line(results))
    if results.adaptors_off(adaptor):
        lines.append(adaptors_off_warning(results, 'test', adaptor))
    return lines


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width (1.96 * std / sqrt(n), population std) of the values."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float('nan'), float('nan')
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(a.size))


def accuracy_line(name: str, accuracies: Sequence[float], n_way: int, n_shot: int) -> str:
    """'test accuracy: 66.12 ± 0.20 % (5-way 1-shot, 10000 episodes)' from per-episode accuracies in [0, 1]."""
    mean, ci = mean_ci(accuracies)
    return (f'{name} accuracy: {100 * mean:.2f} ± {100 * ci:.2f} % '
            f'({n_way}-way {n_shot}-shot, {len(accuracies)} episodes)')


def run_test(args, settings: list[tuple[int, int]], dataset, model: FewShotModel, checkpoint: Optional[str],
                  device: torch.device, after_interrupt: str) -> dict:
    """The test: each (N, K) setting on its own episodes drawn from --seed (so its line is the same alone or beside
    others), the split encoded once for all of them (and stored, ``stored_features``); lines printed as each ends,
    --json written at the end. ``after_interrupt``: what an interrupt leaves, said with it."""
    options, features, results = EvalOptions.from_args(args, device), None, {}
    with exit_on_interrupt(lambda: f'interrupted during the test ({len(results)} of {len(settings)} settings done); '
                                   f'{after_interrupt}'):
        for n, k in settings:
            drawn = draw_episodes(args, dataset, torch.Generator().manual_seed(args.seed), args.n_testing_episodes,
                                   n, k)
            print(f'{n}-way {k}-shot: {describe_eval_mode(args, drawn, len(dataset))}')
            if features is None and drawn[1] == 'cached':  # encoded (or read) once for every cached setting
                from harness.embeddings import split_features
                features = split_features(args, model, checkpoint, dataset, options)
            results[n, k] = run_episodes(model, dataset, *drawn, options, features, desc=f'test {n}-way {k}-shot')
            print('\n'.join(result_lines(results[n, k], n, k, args.adaptor)))
    if len(settings) > 1:
        print('| way | shot | accuracy (%) |\n|---|---|---|')
        for (n, k), result in results.items():
            mean, ci = mean_ci(result.accuracies)
            print(f'| {n} | {k} | {100 * mean:.2f} ± {100 * ci:.2f} |')
    end_of_test(args, features, {(n, k, None): r for (n, k), r in results.items()}, checkpoint=checkpoint)
    return results


def end_of_test(args, features, results: dict, **what) -> None:
    """What follows a test's results: the seed and revision, why the embeddings could not be stored (if so), and
    with --json the figures of ``results`` ({(N, K, metric or None): EpisodeResults}) beside ``what`` was tested."""
    revision = git_revision()
    print(f'seed {args.seed}, revision {revision}')
    if features is not None and features.warning():
        print(features.warning())
    if args.json:
        from harness.outputs import write_figures
        figures = [{**r.figures(n, k), **({'metric': metric} if metric else {})}
                   for (n, k, metric), r in results.items()]
        write_figures(args.json, figures, **what, seed=args.seed, Q=args.Q, revision=revision)


def git_revision() -> str:
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'
