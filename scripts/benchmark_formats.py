"""Reading cost and loader memory of the two image layouts, side by side in one process.

    python scripts/benchmark_formats.py [--images 20000] [--workers 8] [--reads 2000] [--json PATH]

Writes one split of --images 84x84 images twice under --work_dir: as JPEGs with a split CSV
(mini-ImageNet's layout) and as tiered-ImageNet's {split}_images.npz (stored, np.savez) with
{split}_labels.pkl. Then

(a) per-image read cost, the same --reads random images in both layouts: the raw read
    (load_image: JPEG decode, or a copy out of the memory map) and a whole item with the
    evaluation transform (dataset[i]); warm page cache, one process;
(b) memory of a loader with --workers workers reading every image of the tiered split once:
    the peak over the run of the summed PSS of the worker processes (and of the main process),
    split into anonymous memory (private to the processes) and file-backed pages (the operating
    system's page cache, shared and reclaimable), for the memory-mapped reader and for a naive one
    that np.loads the array into memory; with fork (Linux's default) and spawn workers.
"""
import argparse
import glob
import json
import os
import pickle
import sys
import tempfile
import time
import warnings
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from demo import write_split, write_tiered_split  # noqa: E402
from dataloader import TieredDataset, eval_transform, ignore_interrupts, open_split  # noqa: E402

MIB = 2 ** 20


def smooth_images(n: int, seed: int = 0, chunk: int = 1000):
    """Yields n images (84, 84, 3) uint8 of smooth random colour fields plus a little noise, closer to
    photographs in JPEG size and decoding time than pure noise."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        for _ in range(min(chunk, n - start)):
            low = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
            image = np.asarray(Image.fromarray(low).resize((84, 84), Image.Resampling.BICUBIC), dtype=np.int16)
            yield np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


def write_both(work_dir: str, n: int, n_classes: int = 100) -> tuple[str, str]:
    """The same n images as a JPEG folder with split/train.csv and as train_images.npz + train_labels.pkl."""
    folder, tiered = os.path.join(work_dir, 'jpeg'), os.path.join(work_dir, 'tiered')
    labels = np.arange(n) % n_classes
    array = np.stack(list(smooth_images(n)))  # (n, 84, 84, 3)
    write_split(folder, 'train', ((f'{i:08d}.jpg', f'c{labels[i]:04d}', image) for i, image in enumerate(array)))
    write_tiered_split(tiered, 'train', labels, array)
    return folder, tiered


# ------------------------------------------------------------------ (a) read cost
def per_image_ms(fn, indices) -> float:
    start = time.perf_counter()
    for i in indices:
        fn(int(i))
    return 1000 * (time.perf_counter() - start) / len(indices)


def read_cost(folder: str, tiered: str, reads: int) -> dict:
    datasets = {'jpeg': open_split(folder, 'train', eval_transform()),
                'tiered': open_split(tiered, 'train', eval_transform())}
    indices = torch.randperm(len(datasets['jpeg']), generator=torch.Generator().manual_seed(0))[:reads]
    out = {}
    for name, dataset in datasets.items():
        per_image_ms(dataset.__getitem__, indices[:50])  # warm-up
        out[f'{name}_load_ms'] = per_image_ms(dataset.load_image, indices)
        out[f'{name}_item_ms'] = per_image_ms(dataset.__getitem__, indices)
    return out


# ------------------------------------------------------------------ (b) loader memory
class NaiveTiered(TieredDataset):
    """What a reader without memory-mapping does: np.load the whole array into memory."""

    def __init__(self, root: str, split: str, transform=None):
        super().__init__(root, split, transform)
        with np.load(self.images_path) as archive:
            self.array = archive['images']

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[i])


def children() -> list[int]:
    pids = []
    for path in glob.glob(f'/proc/{os.getpid()}/task/*/children'):
        with open(path) as f:
            pids.extend(int(p) for p in f.read().split())
    return pids


def rollup(pid: int) -> dict:
    """Rss, Pss, Pss_Anon and Pss_File of a process in bytes (zeros once it is gone)."""
    out = dict.fromkeys(('Rss', 'Pss', 'Pss_Anon', 'Pss_File'), 0)
    try:
        with open(f'/proc/{pid}/smaps_rollup') as f:
            for line in f:
                key, _, rest = line.partition(':')
                if key in out:
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def loader_memory(dataset, workers: int, context: str, batch_size: int = 64) -> dict:
    """Peak summed memory of the workers (and the main process) while a loader reads every image once."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        multiprocessing_context=context, worker_init_fn=ignore_interrupts)
    peak = {'workers_' + k: 0 for k in ('Rss', 'Pss', 'Pss_Anon', 'Pss_File')}
    peak.update({'main_' + k: 0 for k in ('Rss', 'Pss', 'Pss_Anon', 'Pss_File')})
    start = time.perf_counter()
    for b, _ in enumerate(loader):
        if b % 10 == 0 or b == len(loader) - 1:
            sums = [rollup(pid) for pid in children()]
            for k in ('Rss', 'Pss', 'Pss_Anon', 'Pss_File'):
                peak['workers_' + k] = max(peak['workers_' + k], sum(s[k] for s in sums))
            for k, v in rollup(os.getpid()).items():
                peak['main_' + k] = max(peak['main_' + k], v)
    peak['seconds'] = time.perf_counter() - start
    return peak


def memory_rows(tiered: str, workers: int, contexts: list[str]) -> list[dict]:
    rows = []
    for context in contexts:
        for kind, cls in (('memmap', TieredDataset), ('naive np.load', NaiveTiered)):
            dataset = cls(tiered, 'train', eval_transform())
            row = {'reader': kind, 'start': context, 'workers': workers, 'pickled_bytes': len(pickle.dumps(dataset))}
            row.update(loader_memory(dataset, workers, context))
            rows.append(row)
            del dataset
    return rows


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description='Per-image read cost (JPEG folder vs memory-mapped tiered npz) and '
                                            'loader memory (memory-mapped vs np.load), side by side.')
    p.add_argument('--images', type=int, default=20000, help='images in the split written in both layouts')
    p.add_argument('--reads', type=int, default=2000, help='random images read per layout for the read cost')
    p.add_argument('--workers', type=int, default=8, help='loader workers for the memory figures (0: skip them)')
    p.add_argument('--contexts', nargs='+', default=['fork', 'spawn'], choices=['fork', 'spawn', 'forkserver'],
                   help='how workers are started for the memory figures')
    p.add_argument('--work_dir', type=str, default=None, help='where the data is written (default: a temporary folder)')
    p.add_argument('--json', type=str, default=None, help='also write the figures to this JSON file')
    opts = p.parse_args(argv)
    warnings.filterwarnings('ignore', message='This DataLoader will create')  # more workers than cores, on purpose

    with tempfile.TemporaryDirectory() as tmp:
        work_dir = opts.work_dir or tmp
        start = time.perf_counter()
        folder, tiered = write_both(work_dir, opts.images)
        size = os.path.getsize(os.path.join(tiered, 'train_images.npz'))
        print(f'wrote {opts.images} images of 84x84 as JPEGs and as train_images.npz ({size / MIB:.0f} MiB) '
              f'under {work_dir} in {time.perf_counter() - start:.0f} s')

        cost = read_cost(folder, tiered, min(opts.reads, opts.images))
        print(f'\nper-image read cost, {min(opts.reads, opts.images)} random images, warm page cache, one process:')
        print(f'{"":38s}{"JPEG folder":>14s}{"tiered memmap":>16s}{"ratio":>9s}')
        for key, what in (('load', 'raw read (load_image)'), ('item', 'item with the eval transform')):
            jpeg, npz = cost[f'jpeg_{key}_ms'], cost[f'tiered_{key}_ms']
            print(f'{what:38s}{jpeg:>11.3f} ms{npz:>13.3f} ms{jpeg / npz:>8.1f}x')
        figures = {'images': opts.images, 'npz_bytes': size, 'read_cost': cost}

        if opts.workers > 0:
            rows = memory_rows(tiered, opts.workers, opts.contexts)
            print(f'\nloader memory, {opts.workers} workers reading all {opts.images} images once '
                  f'(peak sums over the workers; MiB):')
            print(f'{"reader":15s}{"start":>7s}{"workers PSS":>13s}{"anon":>8s}{"file":>8s}{"RSS":>8s}'
                  f'{"main PSS":>10s}{"main anon":>11s}{"pickled":>10s}')
            for r in rows:
                print(f'{r["reader"]:15s}{r["start"]:>7s}{r["workers_Pss"] / MIB:>13.0f}{r["workers_Pss_Anon"] / MIB:>8.0f}'
                      f'{r["workers_Pss_File"] / MIB:>8.0f}{r["workers_Rss"] / MIB:>8.0f}{r["main_Pss"] / MIB:>10.0f}'
                      f'{r["main_Pss_Anon"] / MIB:>11.0f}{r["pickled_bytes"] / 1024:>8.0f} KB')
            figures['memory'] = rows
    if opts.json:
        with open(opts.json, 'w') as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == '__main__':
    main(sys.argv[1:])
