"""A split's embeddings: encoded once in batches, and stored under --save_dir/features for the next evaluation
of the same weights on the same images (the cached way of evaluation)."""
import functools
import hashlib
import json
import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset

from dataloader import IMAGE_SIZE, data_loader, iterate
from base.console import UserError, progress
from harness.checkpoints import weights_digest
from harness.device import EvalOptions, autocast, to_device
from base.files import atomic_write
from harness.outputs import write_json
from models.diagnostics import episode_values
from networks import forward_count, set_forward_count


@torch.no_grad()
def encode_split(encoder: nn.Module, dataset: Dataset, options: EvalOptions, batch_size: int = 128,
                 desc: Optional[str] = None) -> torch.Tensor:
    """Embeddings of every image of the split in eval mode, in order: (len(dataset), d) on ``options.device``.
    The encoder's DropBlock counter is left as it was: evaluation counts one pass per episode."""
    encoder.eval()
    device, features, count = options.device, [], forward_count(encoder)
    loader = data_loader(dataset, options.n_workers, device.type == 'cuda', batch_size=batch_size, shuffle=False)
    with progress(iterate(loader), total=len(loader), desc=desc or f'encoding {dataset.split}', leave=False,
              unit='batch', disable=desc == '') as bar:
        for images, _ in bar:
            with autocast(device, options.amp):
                features.append(encoder(to_device(images, device, options.channels_last)).float())
    set_forward_count(encoder, count)
    return torch.cat(features)


def load_or_encode(encoder: nn.Module, dataset: Dataset, options: EvalOptions,
                   cache: Optional['FeatureCache']) -> torch.Tensor:
    """The split's embeddings from ``cache`` when it holds them, else encoded (and stored in ``cache``)."""
    if cache is not None:
        stored = cache.load(len(dataset), getattr(getattr(encoder, 'module', encoder), 'out_dim', None))
        if stored is not None:
            return stored.to(options.device)
    features = encode_split(encoder, dataset, options, desc=f'encoding {dataset.split}')
    if cache is not None:
        cache.save(features)
    return features


class FeatureCache:
    """A split's embeddings stored on disk, so that the same checkpoint never encodes the same split twice:
    ``<folder>/<digest>.npy`` (float32, (n_images, d)) with ``<digest>.json`` beside it, where the digest is
    that of ``key``: the digest of the checkpoint's bytes as they were loaded, the content of every file the split
    is read from (split file and images, or the arrays), the transform, the network and how it ran. Any change of
    those is another file. Both are written atomically (base.files.atomic_write); on reading, the array is checked
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


def feature_cache(save_dir: str, weights: str, stamp: Callable[[], dict], normalization: str, network_name: str,
                  options: EvalOptions) -> 'FeatureCache':
    """The store under <save_dir>/features of the embeddings, by the weights of digest ``weights``
    (``checkpoints.weights_digest``), of the images that ``stamp()`` describes on first use ({'split': name,
    'content': ``content_digest`` of their files})."""
    return FeatureCache(os.path.join(save_dir, 'features'), lambda: {
        'checkpoint': weights, 'split': stamp(), 'transform': f'eval-{normalization}', 'image_size': IMAGE_SIZE,
        'network': network_name, 'device': options.device.type, 'amp': options.amp,
        'channels_last': options.channels_last})


# The cached way computes many episodes at once; their working memory is bounded by this (bytes).
EPISODE_BATCH_MEMORY = {'cpu': 256 * 2 ** 20, 'cuda': 1024 * 2 ** 20}


MAX_EPISODE_BATCH = 1000


def episode_batch_size(options: EvalOptions, episodes, feature_dim: int) -> int:
    """Episodes computed at once by the cached way: --episode_batch, else as many as fit in
    EPISODE_BATCH_MEMORY. Per episode: its embeddings (N*(K+Q) x d) and, per support image, the three
    set functions' hidden activations (about 24 d floats), all float32."""
    if options.episode_batch:
        return options.episode_batch
    e = episodes
    per_episode = 4 * feature_dim * (e.images_per_episode + 24 * e.n_way * e.n_shot + 8 * e.n_way)
    budget = EPISODE_BATCH_MEMORY['cuda' if options.device.type == 'cuda' else 'cpu']
    return max(1, min(e.n_episodes, MAX_EPISODE_BATCH, budget // per_episode))


def content_digest(paths: Sequence[str]) -> str:
    """BLAKE2b of the files' names and contents, in order (a file that cannot be read counts as such: it is
    reported when read)."""
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        digest.update(f'{os.path.basename(path)}\0'.encode())
        try:
            with open(path, 'rb') as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            digest.update(b'\0end\0')
        except OSError:
            digest.update(b'\0unreadable\0')
    return digest.hexdigest()


def head_on_stored(model, features: torch.Tensor, draws, episodes, options: EvalOptions, targets: torch.Tensor,
                   values, drawn: list, bar) -> None:
    """The cached way of ``evaluation.run_episodes``: the head on ``features`` (the split's embeddings), many of the
    ``draws`` (episodes' indices) at once; each episode's ``episode_values`` into ``values``, its indices into
    ``drawn``."""
    e, done = episodes, 0
    batch = episode_batch_size(options, e, features.size(1))
    while done < e.n_episodes:
        indices = torch.stack([next(draws) for _ in range(min(batch, e.n_episodes - done))])  # (B, N*S)
        drawn.extend(indices)
        with autocast(options.device, options.amp):
            logits, adaptation = model.episode(features[indices.to(options.device)], e.n_way, e.n_shot)  # (B, N*Q, N)
        values[done:done + len(indices)] = episode_values(logits, adaptation, targets).cpu().numpy()
        done += len(indices)
        bar.update(len(indices))


def stored_features(args, checkpoint: Optional[str], dataset, options: EvalOptions) -> Optional[Callable]:
    """With --feature_cache on and a checkpoint: what opens the store of the split's embeddings under
    --save_dir/features, keyed by the weights as they were loaded; opened only if the cached way runs."""
    if args.feature_cache != 'on' or not checkpoint:
        return None
    weights = weights_digest(checkpoint)

    def open_store():
        return feature_cache(args.save_dir, weights, lambda: {'split': dataset.split, 'content': content_digest(
            dataset.files())}, args.normalization, args.network_name, options)
    return open_store


class SplitFeatures:
    """A split's embeddings, encoded on first use and shared by several (N, K) settings; read from or written to
    a store (``stored_features``) when given."""

    def __init__(self, encoder: nn.Module, dataset, options: EvalOptions, store: Optional[Callable] = None):
        self.encoder, self.dataset, self.options, self.store = encoder, dataset, options, store
        self.features: Optional[torch.Tensor] = None
        self.cache = None

    def warning(self) -> Optional[str]:
        """Why the embeddings could not be stored, if so: printed after the result."""
        return self.cache.warning if self.cache is not None else None

    def get(self) -> torch.Tensor:
        if self.features is None:
            self.cache = self.store() if self.store is not None else None
            self.features = load_or_encode(self.encoder, self.dataset, self.options, self.cache)
        return self.features


def split_features(args, model, checkpoint: Optional[str], dataset, options: EvalOptions) -> SplitFeatures:
    """The split's embeddings for the cached way, shared by every setting, stored under --save_dir/features for
    ``checkpoint`` (``stored_features``)."""
    return SplitFeatures(model.encoder, dataset, options, stored_features(args, checkpoint, dataset, options))
