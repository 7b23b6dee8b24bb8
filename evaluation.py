"""Few-shot evaluation shared by train.py, test.py and the scripts: per-episode accuracies of a model.

Two ways give the same answers: 'episodic' encodes every episode's images, as the reference does;
'cached' encodes each image of the split once and runs only the model's head (set functions, masks,
prototypes, logits), on many episodes at once. An entry point chooses the way once
(``choose_eval_mode``), then ``run_episodes(model, dataset, Episodes(...), way, EvalOptions(...))``.
"""
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn as nn
from checkpoints import LOADED_DIGESTS
from dataloader import (IMAGE_SIZE, FewShotDataset, content_digest, episode_group, episode_loader, episode_sampler,
                        image_loader, iterate)
from models import FewShotModel, prototype_logits, split_episode
from models.glofa import query_targets
from networks import advance_forward_count, forward_count, set_forward_count
from utils import UserError, accuracy_line, atomic_write, autocast, mean_ci, progress, to_device, write_json


MODES = ('auto', 'cached', 'episodic')


def choose_eval_mode(mode: str, n_images: int, n_episodes: int, images_per_episode: int) -> str:
    """'auto': cached when encoding the split once costs fewer images than encoding every episode."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if mode != 'auto':
        return mode
    return 'cached' if n_images < n_episodes * images_per_episode else 'episodic'


def split_episodes(args, dataset, generator: torch.Generator, n_episodes: int, n_way: int,
                   n_shot: int) -> tuple['Episodes', str]:
    """A split's N-way K-shot episodes (--Q queries, --task_mix) drawn from ``generator``, and the way
    --eval_mode chooses for them: what every entry point evaluates."""
    episodes = Episodes(n_episodes, n_way, n_shot, args.Q, generator, args.task_mix)
    return episodes, choose_eval_mode(args.eval_mode, len(dataset), n_episodes, episodes.images_per_episode)


def describe_eval_mode(mode: str, chosen: str, n_images: int, n_episodes: int, images_per_episode: int) -> str:
    """'cached evaluation (auto: the split's 12000 images once, not 10000 episodes x 80 images)'."""
    how = 'auto' if mode == 'auto' else 'forced by --eval_mode'
    once, each = f"the split's {n_images} images once", f'{n_episodes} episodes x {images_per_episode} images'
    reason = f'{once}, not {each}' if chosen == 'cached' else f'{each}, not {once}'
    return f'{chosen} evaluation ({how}: {reason})'


@dataclass
class EvalOptions:
    """How evaluation runs: none of these changes a result."""
    device: torch.device
    n_workers: int = 0           # loader workers
    amp: bool = False            # CUDA autocast
    channels_last: bool = False  # encoder memory format
    episode_batch: int = 0       # cached way: episodes computed at once; 0 chooses by memory

    @classmethod
    def from_args(cls, args, device: torch.device) -> 'EvalOptions':
        return cls(device, args.n_workers, args.amp, args.channels_last, args.episode_batch)


@dataclass
class Episodes:
    """Which episodes are evaluated: ``n_episodes`` N-way K-shot Q-query tasks drawn from ``generator``."""
    n_episodes: int
    n_way: int
    n_shot: int
    n_query: int
    generator: Optional[torch.Generator] = None
    task_mix: str = 'class'  # several roots: see dataloader.episode_sampler

    @property
    def images_per_episode(self) -> int:
        return self.n_way * (self.n_shot + self.n_query)


@torch.no_grad()
def encode_split(encoder: nn.Module, dataset: FewShotDataset, options: EvalOptions, batch_size: int = 128,
                 desc: Optional[str] = None) -> torch.Tensor:
    """Embeddings of every image of the split in eval mode, in order: (len(dataset), d) on ``options.device``."""
    encoder.eval()
    device, features = options.device, []
    loader = image_loader(dataset, batch_size, options.n_workers, pin_memory=device.type == 'cuda')
    with progress(iterate(loader), total=len(loader), desc=desc or f'encoding {dataset.split}', leave=False,
              unit='batch', disable=desc == '') as bar:
        for images, _ in bar:
            with autocast(device, options.amp):
                features.append(encoder(to_device(images, device, options.channels_last)).float())
    return torch.cat(features)


class FeatureCache:
    """A split's embeddings stored on disk, so that the same checkpoint never encodes the same split twice:
    ``<folder>/<digest>.npy`` (float32, (n_images, d)) with ``<digest>.json`` beside it, where the digest is
    that of ``key``: the digest of the checkpoint's bytes as they were loaded, the content of every file the split
    is read from (split file and images, or the arrays), the transform, the network and how it ran. Any change of
    those is another file. Both are written atomically (utils.atomic_write); on reading, the array is checked
    against its record's SHA-256 and against the model (one row per image, its feature size, float32), so a
    damaged, partial or foreign file is encoded again, with one line, never read as numbers. The key is made
    on first use (hashing the split reads every file): an evaluation that never uses the store pays nothing."""

    def __init__(self, folder: str, make_key: Callable[[], dict]):
        self.folder, self.make_key = folder, make_key
        self.warning: Optional[str] = None  # a store that failed: said after the result, never instead of it

    @functools.cached_property
    def key(self) -> dict:
        return self.make_key()

    @functools.cached_property
    def path(self) -> str:
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(self.folder, f'{digest}.npy')

    @property
    def record(self) -> str:
        return self.path[:-len('.npy')] + '.json'

    def load(self, rows: int, dim: Optional[int] = None) -> Optional[torch.Tensor]:
        """The stored embeddings of ``rows`` images of ``dim`` features, or None (none stored, another key, or a
        damaged or mismatched file: said in one line)."""
        try:
            with open(self.record) as f:
                record = json.load(f)
            if not isinstance(record, dict) or record.get('key') != self.key:
                return None
            array = np.load(self.path, mmap_mode='r', allow_pickle=False)
            if array.dtype != np.float32 or array.ndim != 2 or array.shape[0] != rows or dim not in (None, array.shape[1]):
                raise ValueError(f'it holds {array.dtype} of shape {tuple(array.shape)}, the model needs float32 of '
                                 f'shape ({rows}, {dim if dim is not None else "d"})')
            if list(array.shape) != record['shape'] or hashlib.sha256(memoryview(np.ascontiguousarray(array))) \
                    .hexdigest() != record['sha256']:
                raise ValueError('its content does not match its record')
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, EOFError) as error:
            print(f'note: the stored embeddings {self.path} are damaged or do not fit ({error}): encoding again')
            return None
        print(f'embeddings of the {self.key["split"]["split"]} split reused from {self.path} '
              f'({os.path.getsize(self.path) / 2 ** 20:.1f} MiB; --feature_cache off, or deleting {self.folder}, '
              f'encodes again)')
        return torch.from_numpy(np.array(array))

    def save(self, features: torch.Tensor) -> None:
        """Store the embeddings; a failure (read-only folder, full disk) is kept in ``warning``, not raised."""
        array = np.ascontiguousarray(features.detach().cpu().float().numpy())
        try:
            atomic_write(self.path, lambda f: np.save(f, array))
            write_json(self.record, {'key': self.key, 'shape': list(array.shape),
                                     'sha256': hashlib.sha256(memoryview(array)).hexdigest()})
        except UserError as error:
            self.warning = f'warning: the embeddings were not stored ({error}); the result above is not affected'
            return
        print(f'embeddings of the {self.key["split"]["split"]} split stored in {self.path} '
              f'({os.path.getsize(self.path) / 2 ** 20:.1f} MiB): a later evaluation of this checkpoint reuses them')


def weights_digest(path: str) -> str:
    """The digest of a checkpoint's bytes as this process loaded them (checkpoints.LOADED_DIGESTS), else of the
    file now: its stored embeddings follow the weights that made them, not the file's name."""
    loaded = LOADED_DIGESTS.get(os.path.realpath(path))
    return loaded if loaded is not None else content_digest([path])


def feature_cache(save_dir: str, checkpoint: str, stamp: Callable[[], dict], normalization: str, network_name: str,
                  options: 'EvalOptions') -> 'FeatureCache':
    """The cache under <save_dir>/features of the embeddings, by the encoder of ``checkpoint`` (its digest taken
    now), of the images that ``stamp()`` describes on first use (a split's ``dataset.stamp``, or any function
    returning {'split': name, 'content': digest})."""
    weights = weights_digest(checkpoint)
    return FeatureCache(os.path.join(save_dir, 'features'), lambda: {
        'checkpoint': weights, 'split': stamp(), 'transform': f'eval-{normalization}', 'image_size': IMAGE_SIZE,
        'network': network_name, 'device': options.device.type, 'amp': options.amp,
        'channels_last': options.channels_last})


def stored_features(args, checkpoint: Optional[str], dataset, options: 'EvalOptions') -> Optional['FeatureCache']:
    """test.py's (and train.py's test's) cache of the split's embeddings: with --feature_cache on and a
    checkpoint file, else None (encode, store nothing)."""
    if args.feature_cache != 'on' or not checkpoint:
        return None
    return feature_cache(args.save_dir, checkpoint, dataset.stamp, args.normalization, args.network_name, options)


class SplitFeatures:
    """The embeddings of a split, encoded on first use and then shared (e.g. by several (N, K) settings),
    and with a ``FeatureCache`` stored for the next evaluation of the same checkpoint.

    Encoding leaves the encoder's DropBlock counter as it was: evaluation counts one pass per episode.
    """

    def __init__(self, encoder: nn.Module, dataset: FewShotDataset, options: EvalOptions,
                 cache: Optional[FeatureCache] = None):
        self.encoder, self.dataset, self.options, self.cache = encoder, dataset, options, cache
        self.features: Optional[torch.Tensor] = None

    @classmethod
    def given(cls, features: torch.Tensor) -> 'SplitFeatures':
        """Embeddings computed elsewhere: (n_images, d), in the split's order."""
        split = cls(nn.Identity(), None, None)
        split.features = features
        return split

    def warning(self) -> Optional[str]:
        """Why the embeddings could not be stored, if so: printed after the result."""
        return self.cache.warning if self.cache is not None else None

    def get(self) -> torch.Tensor:
        if self.features is None and self.cache is not None:
            encoder = getattr(self.encoder, 'module', self.encoder)  # inside DataParallel
            stored = self.cache.load(len(self.dataset), getattr(encoder, 'out_dim', None))
            self.features = stored.to(self.options.device) if stored is not None else None
        if self.features is None:
            count = forward_count(self.encoder)
            self.features = encode_split(self.encoder, self.dataset, self.options,
                                         desc=f'encoding {self.dataset.split}')
            set_forward_count(self.encoder, count)
            if self.cache is not None:
                self.cache.save(self.features)
        return self.features


# The cached way computes many episodes at once; their working memory is bounded by this (bytes).
EPISODE_BATCH_MEMORY = {'cpu': 256 * 2 ** 20, 'cuda': 1024 * 2 ** 20}
MAX_EPISODE_BATCH = 1000


def episode_batch_size(options: EvalOptions, episodes: Episodes, feature_dim: int) -> int:
    """Episodes computed at once by the cached way: --episode_batch, else as many as fit in
    EPISODE_BATCH_MEMORY. Per episode: its embeddings (N*(K+Q) x d) and, per support image, the three
    set functions' hidden activations (about 24 d floats), all float32."""
    if options.episode_batch:
        return options.episode_batch
    e = episodes
    per_episode = 4 * feature_dim * (e.images_per_episode + 24 * e.n_way * e.n_shot + 8 * e.n_way)
    budget = EPISODE_BATCH_MEMORY['cuda' if options.device.type == 'cuda' else 'cpu']
    return max(1, min(e.n_episodes, MAX_EPISODE_BATCH, budget // per_episode))


def episode_values(logits: torch.Tensor, adaptation, targets: torch.Tensor) -> torch.Tensor:
    """(..., 6): accuracy, alpha_task, alpha_cls, mean task mask, mean class mask of each episode, and 1 where
    its logits are all finite.
    logits (..., N*Q, N) and GLoFA's Adaptation of the same episodes (None for a model without
    adaptors: its four columns are nan); targets (N*Q,)."""
    accuracy = (logits.argmax(dim=-1) == targets).float().mean(dim=-1)  # (...,)
    finite = torch.isfinite(logits).flatten(-2).all(dim=-1).float()  # (...,): 0 where a logit is nan or inf
    if adaptation is None:
        nan = torch.full_like(accuracy, float('nan'))
        return torch.stack([accuracy, nan, nan, nan, nan, finite], dim=-1)
    return torch.stack([accuracy, adaptation.alpha[..., 0], adaptation.alpha[..., 1],
                        adaptation.m_task.mean(dim=-1), adaptation.m_cls.mean(dim=(-2, -1)), finite], dim=-1).float()


# the strengths whose masks act under each --adaptor ablation (columns of EpisodeResults.alphas)
ACTING_STRENGTHS = {'both': [0, 1], 'task': [0], 'class': [1], 'none': []}


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
        """Means over the episodes: the strengths, the share of episodes where each is above 0, the masks
        ({} for a model without adaptors)."""
        if not self.has_adaptors:
            return {}
        active = self.alphas > 0
        return {'alpha_task': float(self.alphas[:, 0].mean()), 'alpha_cls': float(self.alphas[:, 1].mean()),
                'alpha_task_active': float(active[:, 0].mean()), 'alpha_cls_active': float(active[:, 1].mean()),
                'mask_task': float(self.mask_task.mean()), 'mask_cls': float(self.mask_cls.mean())}

    def adaptors_off(self, adaptor: str = 'both') -> bool:
        """The strengths of the adaptor's masks are 0 on every episode: the masks have no effect and the
        model is normalised-prototype ProtoNet ('task' and 'class' ablations: their one strength)."""
        acting = ACTING_STRENGTHS[adaptor]
        return bool(acting) and self.has_adaptors and bool((self.alphas[:, acting] == 0).all())


def diagnostics_line(results: EpisodeResults) -> str:
    """'adaptors: alpha_task 0.412 (> 0 in 100 % of episodes), alpha_cls ..., mean masks task 0.31, class 0.12'."""
    d = results.diagnostics()
    return (f"adaptors: alpha_task {d['alpha_task']:.4f} (> 0 in {100 * d['alpha_task_active']:.0f} % of episodes), "
            f"alpha_cls {d['alpha_cls']:.4f} (> 0 in {100 * d['alpha_cls_active']:.0f} %); "
            f"mean mask values: task {d['mask_task']:.4f}, class {d['mask_cls']:.4f}")


def adaptors_off_warning(results: EpisodeResults, where: str, adaptor: str = 'both') -> str:
    names = ' = '.join(('alpha_task', 'alpha_cls')[i] for i in ACTING_STRENGTHS[adaptor])
    return (f'warning: {names} = 0 on all {len(results.accuracies)} {where} episodes: the adaptors '
            f'are switched off and the model is normalised-prototype ProtoNet at this point')


# what GLoFA's adaptors do in training (runs.training_step records it)
# per training episode: the strengths relu(h(S)), h(S) before the relu, and the norms of the loss's gradients
ADAPTOR_RECORD = ('alpha_task', 'alpha_cls', 'h_task', 'h_cls', 'grad_f_task', 'grad_f_class', 'grad_h')


def gradient_norm(module: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of the gradients of a module's parameters (0 where none reached them)."""
    squares = [p.grad.detach().float().pow(2).sum() for p in module.parameters() if p.grad is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=next(module.parameters()).device)


def training_diagnostics(record: dict) -> dict:
    """The JSON log's train_* keys: means over a gap's episodes of the strengths, the share of episodes where
    each is above 0, h's output before the relu (both strengths together, and each), the gradient norms."""
    mean = {key: float(np.mean(values)) for key, values in record.items()}
    return {'train_alpha_task': mean['alpha_task'], 'train_alpha_cls': mean['alpha_cls'],
            'train_alpha_task_active': float(np.mean(np.array(record['alpha_task']) > 0)),
            'train_alpha_cls_active': float(np.mean(np.array(record['alpha_cls']) > 0)),
            'train_h_preactivation': (mean['h_task'] + mean['h_cls']) / 2,
            'train_h_preactivation_task': mean['h_task'], 'train_h_preactivation_cls': mean['h_cls'],
            'train_grad_f_task': mean['grad_f_task'], 'train_grad_f_class': mean['grad_f_class'],
            'train_grad_h': mean['grad_h']}


STRENGTHS = [('alpha_task', 'h_task'), ('alpha_cls', 'h_cls')]


def dead_since(history: dict, gap: int, adaptor: str) -> Optional[int]:
    """The episode since which the strengths the adaptor acts through have been 0 on every training episode,
    when that holds for at least the last ``gap`` episodes of ``history`` (the per-episode record); else None."""
    acting = [STRENGTHS[i][0] for i in ACTING_STRENGTHS[adaptor]]
    alive = [any(history[a][i] > 0 for a in acting) for i in range(len(history['episode']))]
    if not acting or not alive or any(alive[-gap:]):
        return None
    return history['episode'][max((i for i, on in enumerate(alive) if on), default=-1) + 1]


def adaptors_died_line(history: dict, gap: int, adaptor: str) -> Optional[str]:
    """When the strengths the adaptor acts through were 0 on every one of the last ``gap`` training episodes
    (``history``: the statistics' per-episode record): since which episode, h's output, and the gradient that
    reached h over those episodes, as measured. None otherwise."""
    since = dead_since(history, gap, adaptor)
    if since is None:
        return None
    acting = [STRENGTHS[i] for i in ACTING_STRENGTHS[adaptor]]
    largest = max(history['grad_h'][-gap:])
    names = ' = '.join(a for a, _ in acting)
    before = ', '.join(f'{np.mean(history[h][-gap:]):.3f} ({a})' for a, h in acting)
    back = ('exactly 0 on each: relu passes h no gradient, so h is not trained back and the strengths return only '
            'if the encoder moves h\'s input' if largest == 0 else f'not 0 (largest norm {largest:.3g})')
    return (f'adaptors: {names} = 0 on all {gap} training episodes up to episode {history["episode"][-1]}, and on '
            f'every training episode since episode {since}; h(S) before the relu averaged {before} over this '
            f'interval, and the gradient reaching h was {back}')


@torch.no_grad()
def run_episodes(model: FewShotModel, dataset: FewShotDataset, episodes: Episodes, mode: str, options: EvalOptions,
                 features: Optional[SplitFeatures] = None, desc: str = 'test') -> EpisodeResults:
    """Evaluate the episodes in eval mode, the way ``mode`` ('cached' or 'episodic', see
    ``choose_eval_mode``); per-episode accuracies and adaptor diagnostics.

    'episodic' encodes each episode's images and runs the model on it, as the reference does. 'cached'
    encodes every image of the split once (or takes ``features``, already encoded), then runs the
    model's head on batches of episodes at once (``episode_batch_size``). Both draw the same episodes
    from ``episodes.generator`` and give the same answers up to float rounding. Either way the
    encoder's DropBlock counter advances by one per episode, as in the reference.
    """
    if mode not in ('cached', 'episodic'):
        raise ValueError(f"mode must be 'cached' or 'episodic' (choose_eval_mode picks one), got {mode!r}")
    model.eval()
    e, device = episodes, options.device
    sampler = episode_sampler(dataset, e.n_episodes, e.n_way, e.n_shot + e.n_query, e.generator, e.task_mix)
    targets = query_targets(e.n_way, e.n_query, device)
    values = np.empty((e.n_episodes, 6))  # per episode: episode_values
    drawn = []  # every episode's indices, in order (episodic: recorded as the loader draws them)
    if mode == 'cached':  # encoded before the episodes' progress bar starts
        cache = (features or SplitFeatures(model.encoder, dataset, options)).get()  # (len(dataset), d)
        advance_forward_count(model.encoder, e.n_episodes)  # one pass per episode, as the reference counts
    with progress(total=e.n_episodes, desc=desc, leave=False, unit='ep') as bar:
        if mode == 'cached':
            batch, draws, done = episode_batch_size(options, e, cache.size(1)), iter(sampler), 0
            while done < e.n_episodes:
                indices = torch.stack([next(draws) for _ in range(min(batch, e.n_episodes - done))])  # (B, N*S)
                drawn.extend(indices)
                with autocast(device, options.amp):
                    logits, adaptation = model.episode(cache[indices.to(device)], e.n_way, e.n_shot)  # (B, N*Q, N)
                values[done:done + len(indices)] = episode_values(logits, adaptation, targets).cpu().numpy()
                done += len(indices)
                bar.update(len(indices))
        else:
            loader = episode_loader(dataset, RecordedEpisodes(sampler, drawn), options.n_workers,
                                    pin_memory=device.type == 'cuda')
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
    groups = [episode_group(dataset, indices, e.task_mix) for indices in drawn]
    return EpisodeResults(mode, values[:, 0], values[:, 1:3], values[:, 3], values[:, 4],
                          groups=groups if groups and groups[0] is not None else None)


class RecordedEpisodes:
    """A batch sampler that passes on ``sampler``'s episodes and appends each one's indices to ``drawn``."""

    def __init__(self, sampler, drawn: list):
        self.sampler, self.drawn = sampler, drawn

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for indices in self.sampler:
            self.drawn.append(indices)
            yield indices.tolist()  # plain numbers travel to the workers without sharing a tensor's memory


def group_label(group: str) -> str:
    """A root's folder name as it is; 'single-source tasks' and 'mixed tasks' under the class mix."""
    return f'{group} tasks' if group in ('single-source', 'mixed') else group


def result_lines(results: EpisodeResults, n_way: int, n_shot: int, adaptor: str = 'both') -> list[str]:
    """The report of one test setting: the accuracy line, one line per root (or for single-source and
    mixed tasks apart) with several roots, the adaptor diagnostics, and a warning when they are off."""
    lines = [accuracy_line('test', results.accuracies, n_way, n_shot)]
    lines += [accuracy_line(f'{group_label(group)}: test', values, n_way, n_shot)
              for group, values in results.group_accuracies().items()]
    if results.has_adaptors:
        lines.append(diagnostics_line(results))
    if results.adaptors_off(adaptor):
        lines.append(adaptors_off_warning(results, 'test', adaptor))
    return lines


def setting_figures(n_way: int, n_shot: int, results: EpisodeResults) -> dict:
    """One setting's figures for --json: accuracy and CI in percent, episodes, way, shot, diagnostics."""
    mean, ci = mean_ci(results.accuracies)
    figures = {'N': n_way, 'K': n_shot, 'episodes': len(results.accuracies), 'accuracy': 100 * mean, 'ci95': 100 * ci,
               'mode': results.mode, **results.diagnostics()}
    if results.groups is not None:
        figures['groups'] = {group: dict(zip(('accuracy', 'ci95'), (100 * v for v in mean_ci(values))),
                                         episodes=len(values))
                             for group, values in results.group_accuracies().items()}
    return figures


def write_figures(path: str, settings: list[dict], **extra) -> None:
    """Write the figures of one or more settings to a JSON file (its folder is created)."""
    write_json(path, {**extra, 'settings': settings})


PROTOTYPE_METRICS = ('cosine', 'euclidean')


@torch.no_grad()
def prototype_accuracies(features: torch.Tensor, episodes: Iterable[torch.Tensor], n_way: int,
                         n_shot: int) -> dict[str, np.ndarray]:
    """ProtoNet accuracy of each episode on cached embeddings, with two metrics.

    features: (n_images, d), the split's embeddings in dataset order (``encode_split``); each episode
    is an index tensor (N * (K + Q),) in shot-major order (``EpisodeSampler``). The prototype of class
    n is the mean of its K support embeddings; 'euclidean' logits are -||q - p_n||^2, 'cosine' ones
    cos(q, p_n). Returns {'cosine': (n_episodes,), 'euclidean': (n_episodes,)}, values in [0, 1].
    """
    correct = {metric: [] for metric in PROTOTYPE_METRICS}
    for episode in episodes:
        x = features[episode.to(features.device)].float()                   # (N*S, d)
        n_query = len(episode) // n_way - n_shot
        _, query, prototypes = split_episode(x, n_way, n_shot)               # (N*Q, d), (N, d)
        targets = query_targets(n_way, n_query, x.device)                   # (N*Q,)
        for metric in PROTOTYPE_METRICS:  # ProtoNet's logits (the argmax does not depend on a temperature)
            logits = prototype_logits(query, prototypes, metric, 1.0)        # (N*Q, N)
            correct[metric].append((logits.argmax(dim=1) == targets).float().mean().item())
    return {metric: np.asarray(values) for metric, values in correct.items()}
