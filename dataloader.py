"""Episodic N-way K-shot Q-query data loading in mini-ImageNet's on-disk format.

A dataset root holds ``images/<file>`` and ``split/{train,val,test}.csv``; each CSV has a header
line and rows ``filename,label`` (label = WordNet id). Classes are numbered in order of first
appearance. The sampler yields episodes in *shot-major* order (see ``EpisodeSampler``).
"""
import csv
import os
import signal
from typing import Iterator, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision import transforms

from utils import UserError

SPLITS = ('train', 'val', 'test')
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 84


# ------------------------------------------------------------------ transforms
def train_transform() -> transforms.Compose:
    """RandomResizedCrop(84), ColorJitter(0.4, 0.4, 0.4), horizontal flip, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(IMAGE_SIZE),
        transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform() -> transforms.Compose:
    """Resize(92), CenterCrop(84), ImageNet normalisation: deterministic."""
    return transforms.Compose([
        transforms.Resize(92),
        transforms.CenterCrop(IMAGE_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ------------------------------------------------------------------ split files
def split_csv_path(data_path: str, split: str) -> str:
    return os.path.join(data_path, 'split', f'{split}.csv')


def read_split(csv_path: str) -> tuple[list[str], list[int], list[str]]:
    """Read a split CSV: (filenames, integer labels, class names in order of first appearance)."""
    if not os.path.isfile(csv_path):
        raise UserError(f'split file {csv_path} not found (expected a CSV with rows filename,label)')
    filenames, labels, class_names = [], [], []
    index = {}
    with open(csv_path, newline='') as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if line_no == 1 or not row or (len(row) == 1 and not row[0].strip()):
                continue  # header line and blank lines
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise UserError(f"{csv_path}, line {line_no}: expected 'filename,label', got {','.join(row)!r}")
            name, label = row[0].strip(), row[1].strip()
            if label not in index:
                index[label] = len(class_names)
                class_names.append(label)
            filenames.append(name)
            labels.append(index[label])
    if not filenames:
        raise UserError(f'split file {csv_path} lists no images (expected a header, then rows filename,label)')
    return filenames, labels, class_names


# ------------------------------------------------------------------ dataset
class FewShotDataset(Dataset):
    """The images of one split. ``dataset[i]`` -> (image (3, 84, 84), label).

    ``dataset[(i, seed)]`` applies the (random) transform under ``torch.manual_seed(seed)``, so
    training augmentation depends on the episode sampler alone, not on the number of workers.
    """

    def __init__(self, data_path: str, split: str, transform: Optional[transforms.Compose] = None,
                 check_files: bool = True):
        if not os.path.isdir(data_path):
            raise UserError(f'data folder {data_path} not found (expected images/ and split/{{train,val,test}}.csv; '
                            f'see --data_path, or --demo for the built-in demo data)')
        self.image_dir = os.path.join(data_path, 'images')
        if not os.path.isdir(self.image_dir):
            raise UserError(f'image folder {self.image_dir} not found (expected {data_path}/images/<file>)')
        self.split = split
        self.csv_path = split_csv_path(data_path, split)
        self.filenames, self.labels, self.class_names = read_split(self.csv_path)
        self.transform = transform if transform is not None else eval_transform()
        if check_files:
            present = set(os.listdir(self.image_dir))
            for name in self.filenames:
                if name not in present and not os.path.isfile(os.path.join(self.image_dir, name)):
                    raise UserError(f'image {name} listed in {self.csv_path} is missing from {self.image_dir}')

    def __len__(self) -> int:
        return len(self.filenames)

    def load_image(self, i: int) -> Image.Image:
        path = os.path.join(self.image_dir, self.filenames[i])
        try:
            with Image.open(path) as image:
                return image.convert('RGB')
        except (OSError, ValueError, SyntaxError) as error:
            raise UserError(f'image {path} cannot be read or decoded ({type(error).__name__})') from None

    def __getitem__(self, item: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        i = int(i)
        image = self.load_image(i)
        if seed is None:
            x = self.transform(image)
        elif get_worker_info() is None:  # main process: keep the global random state untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.transform(image)
        else:
            torch.manual_seed(seed)
            x = self.transform(image)
        return x, self.labels[i]


# ------------------------------------------------------------------ episodes
class EpisodeSampler:
    """Yields ``n_episodes`` episodes, each an index tensor of n_way * n_per_class images.

    N distinct classes are drawn uniformly, then n_per_class = K + Q distinct images of each. The
    (N, S) grid is transposed and flattened: position ``s * N + n`` holds image ``s`` of class ``n``
    ("shot-major"). The first N*K positions are the support set (K rows of N), the remaining N*Q
    the queries, and the target of query j is ``j % N``.
    """

    def __init__(self, labels: Sequence[int], n_episodes: int, n_way: int, n_per_class: int,
                 generator: Optional[torch.Generator] = None, class_names: Optional[Sequence[str]] = None,
                 split: str = 'split'):
        labels = torch.as_tensor(labels, dtype=torch.long)
        n_classes = int(labels.max()) + 1 if labels.numel() else 0
        self.class_indices = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
        self.n_episodes, self.n_way, self.n_per_class = n_episodes, n_way, n_per_class
        self.generator = generator
        if n_way > n_classes:
            raise UserError(f'the {split} has {n_classes} classes, fewer than N = {n_way} classes per episode')
        for c, indices in enumerate(self.class_indices):
            if len(indices) < n_per_class:
                name = class_names[c] if class_names is not None else str(c)
                raise UserError(f'class {name} of the {split} has {len(indices)} images, fewer than '
                                f'K + Q = {n_per_class} needed per episode')

    def __len__(self) -> int:
        return self.n_episodes

    def sample(self) -> torch.Tensor:
        """One episode: (N * S,) indices, shot-major."""
        g = self.generator
        classes = torch.randperm(len(self.class_indices), generator=g)[:self.n_way]
        grid = torch.stack([self.class_indices[c][torch.randperm(len(self.class_indices[c]), generator=g)
                                                  [:self.n_per_class]] for c in classes])  # (N, S)
        return grid.t().reshape(-1)  # (S * N,): position s*N + n = image s of class n

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.n_episodes):
            yield self.sample()


class SeededEpisodes:
    """Batch sampler: the episodes of ``sampler``, each index paired with an augmentation seed
    drawn from the same generator, so that an episode's images depend on that generator alone."""

    def __init__(self, sampler: EpisodeSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for indices in self.sampler:
            seeds = torch.randint(2 ** 62, (len(indices),), generator=self.sampler.generator)
            yield list(zip(indices.tolist(), seeds.tolist()))


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


def episode_sampler(dataset: 'FewShotDataset', n_episodes: int, N: int, S: int,
                    generator: Optional[torch.Generator] = None) -> EpisodeSampler:
    """The episodes of a split; refuses (UserError) a split with fewer than N classes or S images a class."""
    return EpisodeSampler(dataset.labels, n_episodes, N, S, generator=generator, class_names=dataset.class_names,
                          split=f'{dataset.split} split ({dataset.csv_path})')


def check_episode_flags(N: int, K: int, Q: int) -> None:
    for flag, value in (('N', N), ('K', K), ('Q', Q)):
        if value < 1:
            raise UserError(f'--{flag} must be at least 1, got {value}')


def generate_data_loader(data_path: str, flag_mode: str, n_episodes: int, N: int, S: int,
                         n_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                         dataset: Optional[FewShotDataset] = None) -> DataLoader:
    """Episode loader for split ``flag_mode`` ('train', 'val' or 'test').

    Each batch is one episode of N * S images in shot-major order: (images (N*S, 3, 84, 84), labels).
    'train' uses the training augmentation, seeded per image by the sampler; the others the
    deterministic evaluation transform. The sampler's generator is seeded with ``seed``.
    """
    if flag_mode not in SPLITS:
        raise ValueError(f'flag_mode must be one of {SPLITS}, got {flag_mode!r}')
    if dataset is None:
        dataset = FewShotDataset(data_path, flag_mode, train_transform() if flag_mode == 'train' else eval_transform())
    sampler = episode_sampler(dataset, n_episodes, N, S, torch.Generator().manual_seed(seed))
    batch_sampler = SeededEpisodes(sampler) if flag_mode == 'train' else sampler
    return episode_loader(dataset, batch_sampler, n_workers, pin_memory, persistent=n_workers > 0)


def iterate(loader: DataLoader) -> Iterator:
    """``iter(loader)``, with Ctrl-C and SIGTERM held back while worker processes start: they are
    delivered just after, to the main process (a KeyboardInterrupt raised during a fork can be lost).
    The workers inherit the block; ``ignore_interrupts`` ignores Ctrl-C there and lets SIGTERM in again."""
    if loader.num_workers == 0 or not hasattr(signal, 'pthread_sigmask'):
        return iter(loader)
    held = {signal.SIGINT, signal.SIGTERM} if loader.worker_init_fn is ignore_interrupts else {signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_interrupts(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which saves, stops them and exits cleanly. SIGTERM is
    let in again: torch's handler in the worker exits quietly when the main process stops it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, 'pthread_sigmask'):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def episode_loader(dataset: Dataset, batch_sampler, n_workers: int = 0, pin_memory: bool = False,
                   persistent: bool = False) -> DataLoader:
    """A loader of whole episodes: each batch is one episode from ``batch_sampler`` (or one batch of a
    ``ShuffledBatches``)."""
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=n_workers, pin_memory=pin_memory,
                      persistent_workers=persistent, worker_init_fn=ignore_interrupts,
                      # worker seeds come from their own generator, never from the global random state
                      generator=torch.Generator().manual_seed(0))


def image_loader(dataset: FewShotDataset, batch_size: int = 128, n_workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """Every image of a split once, in order: for encoding a split in batches."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=n_workers,
                      pin_memory=pin_memory, worker_init_fn=ignore_interrupts,
                      generator=torch.Generator().manual_seed(0))
