"""Several roots as one dataset: the union of a split of each, and the tasks drawn from one root at a time
(--task_mix source); each episode's group for the report."""
import bisect
import os
from typing import Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import Dataset

from data.splits import EpisodeSampler, SplitDataset
from base.console import UserError


def root_names(paths: Sequence[str]) -> list[str]:
    """A short distinct name per root: its folder name, with parent folders added while two coincide."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep)[1:] or [os.sep] for p in paths]
    depth = [1] * len(parts)
    while True:
        names = ['/'.join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clashes:
            return names
        for i in clashes:
            depth[i] += 1


# ------------------------------------------------------------------ several roots
class MultiSourceDataset(Dataset):
    """The union of one split of several roots, as one dataset.

    Images are numbered root after root; classes too, so classes of different roots stay different
    even when their names coincide (``class_names`` are prefixed with the root's name,
    e.g. ``fine_set/n0123``). ``sources[i]`` is the root index of image i, ``source_names[k]`` the
    name of root k. Items are read, and seeded, by the root's own reader.
    """

    def __init__(self, datasets: Sequence[SplitDataset], names: Sequence[str]):
        if len({d.split for d in datasets}) != 1:
            raise ValueError('the datasets of a union must be of one split')
        self.datasets, self.source_names = list(datasets), list(names)
        self.roots = [d.root for d in datasets]
        self.split = datasets[0].split
        self.location = ' + '.join(d.location for d in datasets)
        self.starts = [0]
        self.labels, self.class_names = [], []
        for name, d in zip(self.source_names, datasets):
            first = len(self.class_names)
            self.labels.extend(first + label for label in d.labels)
            self.class_names.extend(f'{name}/{c}' for c in d.class_names)
            self.starts.append(self.starts[-1] + len(d))
        self.sources = torch.cat([torch.full((len(d),), k, dtype=torch.long) for k, d in enumerate(datasets)])

    def __len__(self) -> int:
        return self.starts[-1]

    def files(self) -> list[str]:
        return [path for d in self.datasets for path in d.files()]

    def locate(self, i: int) -> tuple[int, int]:
        """(root index, index inside that root's dataset) of image i."""
        if not 0 <= i < len(self):
            raise IndexError(f'image {i} of a dataset of {len(self)}')
        k = bisect.bisect_right(self.starts, i) - 1
        return k, i - self.starts[k]

    def load_image(self, i: int) -> Image.Image:
        k, j = self.locate(int(i))
        return self.datasets[k].load_image(j)

    __getitem__ = SplitDataset.__getitem__  # the image and label; its note said once

    def read(self, item: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int, Optional[str]]:
        i, seed = item if isinstance(item, tuple) else (item, None)
        k, j = self.locate(int(i))
        x, _, note = self.datasets[k].read((j, seed) if seed is not None else j)
        return x, self.labels[int(i)], note


class SourceEpisodeSampler(EpisodeSampler):
    """Episodes from one root at a time: each draws a root uniformly, then N of its classes
    uniformly, then K + Q images of each (same layout as ``EpisodeSampler``, same generator)."""

    def __init__(self, labels: Sequence[int], sources: Sequence[int], n_episodes: int, n_way: int,
                 n_per_class: int, generator: Optional[torch.Generator] = None,
                 class_names: Optional[Sequence[str]] = None, split: str = 'split',
                 roots: Optional[Sequence[str]] = None):
        super().__init__(labels, n_episodes, n_way, n_per_class, generator, class_names, split)
        sources = torch.as_tensor(sources, dtype=torch.long)
        class_source = torch.stack([sources[indices[0]] for indices in self.class_indices])  # (C,)
        n_sources = int(sources.max()) + 1
        self.source_classes = [torch.nonzero(class_source == k).flatten() for k in range(n_sources)]
        for k, classes in enumerate(self.source_classes):
            if len(classes) < n_way:
                root = roots[k] if roots is not None else f'root {k}'
                raise UserError(f'tasks drawn from one root at a time: {root} has {len(classes)} classes in the {split}, '
                                f'fewer than N = {n_way} classes per episode')

    def sample(self) -> torch.Tensor:
        """One episode: a root, then N of its classes, then S images of each: (N * S,), shot-major."""
        g = self.generator
        k = int(torch.randint(len(self.source_classes), (1,), generator=g))
        chosen = self.source_classes[k]
        return self.episode(chosen[torch.randperm(len(chosen), generator=g)[:self.n_way]])


def episode_group(dataset: Dataset, indices: Union[torch.Tensor, Sequence[int]], task_mix: str) -> Optional[str]:
    """Which group an episode's accuracy is reported under, by where its images come from.

    None for a dataset of one root. With several: under the 'source' mix, the name of the episode's
    root (``dataset.source_names``); under the 'class' mix, 'single-source' when all its images come
    from one root and 'mixed' otherwise.
    """
    names = getattr(dataset, 'source_names', None)
    if names is None or len(names) < 2:
        return None
    roots = torch.as_tensor(dataset.sources)[torch.as_tensor(indices, dtype=torch.long)].unique()
    if len(roots) > 1:
        return 'mixed'
    return names[int(roots[0])] if task_mix == 'source' else 'single-source'
