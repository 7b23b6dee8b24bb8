"""Episodic N-way K-shot Q-query data loading: the front of the data.

``open_split`` opens a split in whichever form its root holds: the folder form, ``images/<file>`` and
``split/{train,val,test}.csv`` (a header line, then rows ``filename,label[,...]``: mini-ImageNet, CUB with
FEAT's split files), read by ``data.splits``; other forms (``data.forms``) and several roots (``data.mixing``)
load when the data is in them. The sampler sees labels only and yields episodes in *shot-major* order
(``data.splits.EpisodeSampler``); ``data_loader`` makes the loaders (with workers, ``data.workers``).
"""
import csv
import itertools
import os
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

from base.console import UserError
from data.splits import (IMAGE_SIZE, NORMALIZATIONS, SPLITS, TASK_MIXES, EpisodeSampler, FewShotDataset,  # noqa: F401
                         SplitDataset, eval_transform, missing_root_message, query_targets, read_split,
                         split_csv_path, to_rgb, too_large, train_transform)
# the flags named when the data layer refuses something (with base.console.flag_hint)
DATA_FLAGS = '--data_path (or --demo for the built-in demo data)'
EPISODE_FLAGS = '--N, --K, --Q, or --task_mix with several roots'


def overlaps(splits: dict) -> list[str]:
    """One line per two splits ({split: dataset}) that share classes, and per two that share images (by file name):
    ``check_disjoint`` refuses the first, scripts/check_dataset.py lists them all."""
    items, lines = list(splits.items()), []
    for i, (a, first) in enumerate(items):
        for b, second in items[i + 1:]:
            for what, key in (('classes', 'class_names'), ('images', 'filenames')):
                shared = sorted(set(getattr(first, key, ())) & set(getattr(second, key, ())))
                if shared:
                    lines.append(f'{len(shared)} {what} are in both the {a} split ({first.location}) and the {b} '
                                 f'split ({second.location}), e.g. {shared[0]}')
    return lines


def check_disjoint(splits: dict, allow_overlap: bool = False) -> None:
    """Refuse splits ({split: dataset}) that share a class or an image (``overlaps``), unless ``allow_overlap``."""
    shared = [] if allow_overlap else overlaps(splits)
    if shared:
        raise UserError(f'{shared[0]}: few-shot splits must not share them, or the accuracy is not few-shot (pass '
                        f'--allow_overlap if it is on purpose)')


def dataset_format(root: str) -> str:
    """'folder' when ``root`` holds images/ or split/, else the form ``data.forms`` finds there."""
    if not os.path.isdir(root):
        raise UserError(missing_root_message(root))
    if os.path.isdir(os.path.join(root, 'images')) or os.path.isdir(os.path.join(root, 'split')):
        return 'folder'
    from data.forms import other_form
    return other_form(root)


def data_sources(root: str) -> dict:
    """What defines ``root``'s data, for a run's identity: {what: (files, read by content?)}. The folder form:
    each split CSV (by content) and the images it names (by name and size); another form: its arrays and labels
    (by name and size). Nothing else under the root counts (a README, .DS_Store, this program's converted copies)."""
    if dataset_format(root) != 'folder':
        from data.forms import source_files
        return {os.path.basename(path): ([path], False) for path in source_files(root)}
    sources = {}
    for split in SPLITS:
        csv_path = split_csv_path(root, split)
        if os.path.isfile(csv_path):
            sources[f'split/{split}.csv'] = ([csv_path], True)
            with open(csv_path, newline='', encoding='utf-8-sig', errors='replace') as f:  # read_split refuses faults
                names = [row[0].strip() for row in itertools.islice(csv.reader(f), 1, None) if row and row[0].strip()]
            sources[f'the images split/{split}.csv names'] = ([os.path.join(root, 'images', n) for n in names], False)
    return sources


def open_root(root: str, split: str, transform: Optional[Callable] = None) -> 'SplitDataset':
    """The reader of ``split`` under ``root``, in whichever form it holds."""
    form = dataset_format(root)
    if form == 'folder':
        return FewShotDataset(root, split, transform)
    from data.forms import open_form
    return open_form(form, root, split, transform)


def open_split(paths: Union[str, Sequence[str]], split: str,
               transform: Optional[Callable] = None) -> Dataset:
    """The images of ``split`` under one root, or the union of several (``MultiSourceDataset``)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError('open_split needs at least one root')
    seen = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f'the same root is given twice: {seen[real]} and {path}')
        seen[real] = path
    if len(paths) == 1:
        return open_root(paths[0], split, transform)
    from data.mixing import MultiSourceDataset, root_names
    return MultiSourceDataset([open_root(path, split, transform) for path in paths], root_names(paths))


def split_files_beside(root: str, split: str) -> dict:
    """The other splits of ``root`` where their labels are cheap to read (folder and tiered forms), else {}."""
    try:
        form = dataset_format(root)
        if form == 'folder':
            return {other: FewShotDataset(root, other, check_files=False) for other in SPLITS if other != split}
        if form == 'tiered':
            from data.forms import TieredDataset
            return {other: TieredDataset(root, other) for other in SPLITS if other != split}
        return {}
    except UserError:
        return {}


class SeededEpisodes:
    """The training split's episodes, each index paired with an augmentation seed drawn from the sampler's generator
    (so augmentation depends on the sampler alone, not on the workers), in passes of ``per_pass`` episodes (the
    training between two validations; default all) from episode ``done`` up to the sampler's ``n_episodes``."""

    def __init__(self, sampler: EpisodeSampler, per_pass: Optional[int] = None, done: int = 0):
        self.sampler, self.per_pass, self.done = sampler, per_pass or sampler.n_episodes, done

    def __len__(self) -> int:
        return min(self.per_pass, self.sampler.n_episodes - self.done)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _ in range(len(self)):
            indices = self.sampler.sample()
            seeds = torch.randint(2 ** 62, (len(indices),), generator=self.sampler.generator)
            self.done += 1
            yield list(zip(indices.tolist(), seeds.tolist()))


def episode_sampler(dataset: Dataset, n_episodes: int, N: int, S: int,
                    generator: Optional[torch.Generator] = None, task_mix: str = 'class') -> EpisodeSampler:
    """The episodes of a split, refusing one with fewer than N classes or S images a class. With several roots,
    ``task_mix`` 'class' draws from the union of their classes, 'source' a root per episode, then its classes."""
    if task_mix not in TASK_MIXES:
        raise ValueError(f'task_mix must be one of {TASK_MIXES}, got {task_mix!r}')
    split = f'{dataset.split} split ({dataset.location})'
    if task_mix == 'source' and len(dataset.source_names) > 1:
        from data.mixing import SourceEpisodeSampler
        return SourceEpisodeSampler(dataset.labels, dataset.sources, n_episodes, N, S, generator,
                                    class_names=dataset.class_names, split=split,
                                    roots=getattr(dataset, 'roots', dataset.source_names))
    return EpisodeSampler(dataset.labels, n_episodes, N, S, generator=generator, class_names=dataset.class_names,
                          split=split)


def generate_data_loader(dataset: Dataset, n_episodes: int, N: int, S: int, n_workers: int = 0, seed: int = 0,
                         pin_memory: bool = False, task_mix: str = 'class', generator: Optional[torch.Generator] = None,
                         per_pass: Optional[int] = None, done: int = 0) -> DataLoader:
    """Each batch one episode, (images (N*S, 3, 84, 84), labels) shot-major, drawn from ``generator`` (else one
    seeded with ``seed``); the training split augmented under seeds from it too, and iterated in passes of
    ``per_pass`` episodes from episode ``done`` on (``SeededEpisodes``)."""
    sampler = episode_sampler(dataset, n_episodes, N, S, generator or torch.Generator().manual_seed(seed), task_mix)
    batch_sampler = SeededEpisodes(sampler, per_pass, done) if dataset.split == 'train' else sampler
    return data_loader(dataset, n_workers, pin_memory, batch_sampler=batch_sampler, persistent_workers=n_workers > 0)


def data_loader(dataset: Dataset, n_workers: int = 0, pin_memory: bool = False, **batching) -> DataLoader:
    """A loader of ``dataset`` (``batching``: batch_sampler= for whole episodes, or batch_size= and shuffle=); with
    workers, through ``data.workers``. Its own generator seeds the workers: the global random state is left
    alone."""
    if n_workers > 0:
        from data.workers import Reported, collate, ignore_interrupts
        dataset = Reported(dataset)
        batching.update(num_workers=n_workers, worker_init_fn=ignore_interrupts, collate_fn=collate)
    else:
        batching.pop('persistent_workers', None)
    return DataLoader(dataset, pin_memory=pin_memory, generator=torch.Generator().manual_seed(0), **batching)


def iterate(loader: DataLoader) -> Iterator:
    """The loader's batches; with workers, ``data.workers.iterate`` (a UserError in a worker raised here)."""
    if loader.num_workers == 0:
        return iter(loader)
    from data.workers import iterate
    return iterate(loader)
