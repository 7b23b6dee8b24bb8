"""Check few-shot dataset roots before training: python scripts/check_dataset.py [--data_path ROOT ...].

A folder of images (images/ and split/{train,val,test}.csv: mini-ImageNet, CUB): reads the three
split files, counts classes and images, opens the header of a sample of images (every image, fully
decoded, with --decode) and lists the problems that would stop or spoil a run: missing folders or
split files, malformed rows, missing or undecodable images, classes with fewer than K + Q images,
N larger than a split's classes, classes shared between splits and filenames listed twice.

tiered-ImageNet ({split}_images.npz and {split}_labels.pkl): counts classes and images per split
from the labels and the array's header (the pixels are not read; --decode reads them all and checks
the zip checksum), checks shape (n, H, W, 3) and dtype uint8, labels against images, classes with
fewer than K + Q images and N larger than a split's classes, and says whether the array is stored
(memory-mapped in place) or compressed (copied once, uncompressed, at the first run).

Each root given is checked in turn. Exit code 0 when nothing is wrong, 2 otherwise.
"""
import argparse
import collections
import csv
import hashlib
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dataloader import (IMAGE_SIZE, SPLITS, dataset_format, missing_root_message, open_split, overlaps,  # noqa: E402
                        read_split, split_csv_path, to_rgb)
from data.splits import SMALL_SIDE, convertible, episode_problems, header_error, missing_images, small_image_note  # noqa: E402
from data.forms import FORM_NAMES, array_problems, npz_array_info, read_tiered_labels, tiered_paths  # noqa: E402
from harness.weights_check import BENCHMARKS  # noqa: E402
from base.console import UserError, exits_cleanly, interrupt_on_sigterm, progress  # noqa: E402

FORMAT_NAMES = {'folder': 'images/ and split/*.csv', 'tiered': "tiered-ImageNet's {split}_images.npz and {split}_labels.pkl"}
LIST_LIMIT = 10  # problems of one kind listed one by one per split; the rest are counted


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Check dataset roots (images/ and split/{train,val,test}.csv, or '
                                            "tiered-ImageNet's {split}_images.npz and {split}_labels.pkl) and list "
                                            'what is wrong with them.')
    p.add_argument('--data_path', type=str, nargs='+', default=[os.path.join('datasets', 'mini_imagenet')],
                   help='dataset root(s) holding images/ and split/{train,val,test}.csv, or {split}_images.npz '
                        'and {split}_labels.pkl; each is checked in turn')
    p.add_argument('--N', type=int, default=5, help='classes per episode: every split needs at least N classes')
    p.add_argument('--K', type=int, default=1, help='support images per class')
    p.add_argument('--Q', type=int, default=15, help='query images per class: every class needs K + Q images')
    p.add_argument('--sample', type=int, default=50,
                   help='images per split fully decoded, as training will (the header of every listed image is read '
                        'in any case); ignored with --decode')
    p.add_argument('--decode', action='store_true',
                   help='fully decode every listed image (slower: minutes for mini-ImageNet)')
    p.add_argument('--n_threads', type=int, default=min(8, os.cpu_count() or 1),
                   help='threads that read images')
    return p


def inspect_image(path: str, decode: bool) -> tuple[Optional[tuple[int, int]], Optional[str], Optional[str]]:
    """(size, mode, None) for a readable image, (None, None, reason) otherwise (a folder, an empty, dangling
    or foreign file among them).

    Without ``decode`` only the header is read; with it the pixels are decoded and converted to RGB,
    as the data loader does.
    """
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
            if not convertible(mode):
                return None, None, f'mode {mode} cannot be converted to 8-bit RGB'
            if decode:
                to_rgb(image, path)
        return size, mode, None
    except Exception as error:  # any failure means training would stop on this file
        reason = str(error).strip().splitlines()[0][:100] if str(error).strip() else ''
        return None, None, f'{type(error).__name__}: {reason}' if reason else type(error).__name__


class More(str):
    """The line that stands for ``count`` problems not listed one by one."""
    n_problems: int


def capped(problems: list[str], items: Sequence[str], more: str) -> None:
    """Append the first LIST_LIMIT items to ``problems``, then one line counting the rest."""
    problems.extend(items[:LIST_LIMIT])
    if len(items) > LIST_LIMIT:
        line = More(f'... and {len(items) - LIST_LIMIT} more {more}')
        line.n_problems = len(items) - LIST_LIMIT
        problems.append(line)


def count_problems(problems: Sequence[str]) -> int:
    return sum(getattr(problem, 'n_problems', 1) for problem in problems)


def size_summary(sizes: Sequence[tuple[int, int]], modes: Sequence[str]) -> str:
    if not sizes:
        return 'none read'
    common = collections.Counter(sizes).most_common(3)
    by_area = sorted(sizes, key=lambda s: (s[0] * s[1], s))
    text = ', '.join(f'{w}x{h} ({n})' for (w, h), n in common)
    if len(set(sizes)) > len(common):
        text += f', ... ({len(set(sizes))} sizes)'
    (w0, h0), (w1, h1) = by_area[0], by_area[-1]
    mode_text = ', '.join(f'{m} ({n})' for m, n in collections.Counter(modes).most_common())
    return f'{text}; smallest {w0}x{h0}, largest {w1}x{h1}; modes {mode_text}'


def check_classes(split: str, labels: Sequence[int], class_names: Sequence[str], N: int, K: int, Q: int,
                  problems: list[str]) -> list[int]:
    """Problems of a split's classes for N-way episodes of K + Q images a class (the sampler's own check,
    ``episode_problems``, every one listed); returns the counts."""
    counts = collections.Counter(labels)
    per_class = [counts[c] for c in range(len(class_names))]
    found = episode_problems(per_class, class_names, N, K + Q, split)
    problems.extend(found[:1] if N > len(class_names) else [])
    capped(problems, found[1:] if N > len(class_names) else found,
           f'classes of {split} with fewer than K + Q = {K + Q} images')
    return per_class


def read_member(npz_path: str, key: str = 'images') -> Optional[str]:
    """Read a member of an .npz to its end, which checks its zip checksum: None, or what went wrong."""
    import zipfile
    try:
        with zipfile.ZipFile(npz_path) as archive, archive.open(f'{key}.npy') as member, \
                progress(total=archive.getinfo(f'{key}.npy').file_size, unit='B', unit_scale=True,
                     desc=f'reading {os.path.basename(npz_path)}', leave=False) as bar:
            while chunk := member.read(1 << 24):
                bar.update(len(chunk))
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        return f'{type(error).__name__}: {error}'
    return None


def check_tiered(root: str, N: int, K: int, Q: int, decode: bool, summary: list[str], problems: list[str],
                 counts: dict, sizes: dict) -> None:
    """Check tiered-ImageNet's {split}_images.npz and {split}_labels.pkl: counts, shapes, dtype, episodes."""
    for split in SPLITS:
        images_path, labels_path = tiered_paths(root, split)
        try:
            labels, class_names = read_tiered_labels(labels_path)
        except UserError as error:
            problems.append(f'{split}: {error}')
            labels = class_names = None
        try:
            info = npz_array_info(images_path, 'images')
        except UserError as error:
            problems.append(f'{split}: {error}')
            info = None
        if labels is not None:
            per_class = check_classes(split, labels, class_names, N, K, Q, problems)
            counts[split] = (class_names, per_class)
            summary.append(f'{split}: {len(class_names)} classes, {len(labels)} images, min {min(per_class)} / '
                           f'max {max(per_class)} images per class ({os.path.basename(labels_path)})')
        if info is None:
            continue
        sizes[split] = [(info.shape[2], info.shape[1])] if len(info.shape) == 4 else []
        size = (f'{info.member_size / 2 ** 30:.2f} GiB' if info.member_size >= 2 ** 30
                else f'{info.member_size / 2 ** 20:.1f} MiB')
        how = (f'compressed: an uncompressed copy of {size} is written once at the first run' if info.compressed
               else f'stored: memory-mapped in place, {size}')
        summary.append(f'{split}: images {info.dtype} of shape {info.shape} ({os.path.basename(images_path)}, {how})')
        wrong = array_problems(info, labels, images_path, labels_path)  # the reader's own checks
        problems.extend(f'{split}: {problem}' for problem in wrong)
        if not wrong and info.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
            summary.append(f'{split}: images are {info.shape[2]}x{info.shape[1]}, resized to 84x84 by the transforms')
        if decode:
            error = read_member(images_path)
            if error:
                problems.append(f'{split}: {images_path} cannot be read to its end ({error})')
            else:
                summary.append(f'{split}: every byte of the images read, zip checksum correct')
    if not decode:
        summary.append('(the pixels were not read; --decode reads them all and checks the zip checksums)')


def check_dataset(data_path: str, N: int = 5, K: int = 1, Q: int = 15, decode: bool = False,
                  sample: int = 50, n_threads: int = 1) -> tuple[list[str], list[str]]:
    """Check the dataset at ``data_path`` for N-way K-shot Q-query episodes.

    Returns (summary lines, problems); the dataset is usable when ``problems`` is empty.
    """
    summary, problems = [f'dataset {data_path} (checked for {N}-way {K}-shot {Q}-query episodes)'], []
    if not os.path.isdir(data_path):
        problems.append(f'{missing_root_message(data_path)}; see --data_path')
        return summary, problems
    counts, sizes = {}, {}  # per split: (class names, images per class); image sizes (width, height) seen
    try:
        form = dataset_format(data_path)
    except UserError as error:
        problems.append(str(error))
        return summary, problems
    summary.append(f'format: {form} ({FORMAT_NAMES.get(form) or FORM_NAMES[form]})')
    if form != 'folder':
        (check_tiered if form == 'tiered' else check_pickled)(data_path, N, K, Q, decode, summary, problems,
                                                               counts, sizes)
    else:
        check_folder(data_path, N, K, Q, decode, sample, n_threads, summary, problems, counts, sizes)
    compare_with_benchmarks(counts, sizes, summary)
    return summary, problems


def check_folder(data_path: str, N: int, K: int, Q: int, decode: bool, sample: int, n_threads: int,
                 summary: list[str], problems: list[str], counts: dict, sizes: dict) -> None:
    """Check the folder format: split files, counts, episode needs, missing and repeated files, image headers."""
    image_dir = os.path.join(data_path, 'images')
    present = None
    if os.path.isdir(image_dir):
        present = set(os.listdir(image_dir))
    else:
        problems.append(f'image folder {image_dir} not found (expected {data_path}/images/<file>)')

    # ---------------- split files
    splits = {}
    for split in SPLITS:
        csv_path = split_csv_path(data_path, split)
        try:
            filenames, labels, class_names = read_split(csv_path, strict=False)
        except UserError as error:
            problems.append(str(error))
            summary.append(f'{split}: not checked ({csv_path} cannot be read, see the problems)')
            continue
        with open(csv_path, newline='', encoding='utf-8-sig') as f:
            error = header_error(csv_path, next(csv.reader(f), []), class_names)  # as train.py checks it
        if error:
            problems.append(error)
        splits[split] = (csv_path, filenames, labels, class_names)

    # ---------------- per split: counts, episode needs, missing files, duplicates
    listed = set()  # every filename a split lists
    to_read = []  # (split, path) of images whose header (or pixels) are read
    rng = random.Random(0)
    for split, (csv_path, filenames, labels, class_names) in splits.items():
        per_class = check_classes(split, labels, class_names, N, K, Q, problems)
        counts[split] = (class_names, per_class)
        summary.append(f'{split}: {len(class_names)} classes, {len(filenames)} images, '
                       f'min {min(per_class)} / max {max(per_class)} images per class ({os.path.basename(csv_path)})')
        repeated = [name for name, n in collections.Counter(filenames).items() if n > 1]
        capped(problems, [f'{split}: {name} is listed {filenames.count(name)} times in {csv_path}' for name in repeated],
               f'filenames listed more than once in {csv_path}')
        listed.update(filenames)
        if present is None:
            continue
        missing = missing_images(image_dir, csv_path, filenames, present)  # the reader's own check, every image
        capped(problems, [f'{split}: {line}' for line in missing.values()], f'images of {split} missing from {image_dir}')
        found = [name for name in dict.fromkeys(filenames) if name not in missing]
        chosen = set(found if decode or len(found) <= sample else rng.sample(found, sample))
        to_read.extend((split, os.path.join(image_dir, name), name in chosen) for name in found)

    problems.extend(overlaps({split: SimpleNamespace(filenames=filenames, class_names=class_names, location=csv_path)
                              for split, (csv_path, filenames, _, class_names) in splits.items()}))  # the loader's check

    # ---------------- images: the header of every listed image, a sample (or every image) decoded
    if present is not None:
        summary.append(f'images/: {len(present)} files, {len(present - listed)} not listed in any split')
    if to_read:
        unique = list({path: full for _, path, full in to_read}.items())
        with ThreadPoolExecutor(max(1, n_threads)) as pool:
            results = pool.map(lambda item: inspect_image(*item), unique)
            results = dict(zip((path for path, _ in unique),
                               progress(results, total=len(unique), desc='reading images', unit='image', leave=False)))
        for split in splits:
            paths = [(path, full) for s, path, full in to_read if s == split]
            if not paths:
                continue
            good = [results[path] for path, _ in paths if results[path][2] is None]
            sizes[split] = [g[0] for g in good]
            decoded = sum(full for _, full in paths)
            what = f'all {len(paths)} decoded' if decoded == len(paths) else f'{len(paths)} headers, {decoded} decoded'
            summary.append(f'{split}: image sizes ({what}): '
                           f'{size_summary([g[0] for g in good], [g[1] for g in good])}')
            capped(problems, [f'{split}: image {path} cannot be {"decoded" if full else "read"} ({results[path][2]})'
                              for path, full in paths if results[path][2] is not None],
                   f'unreadable images of {split}')
            small = [(path, results[path][0]) for path, _ in paths
                     if results[path][2] is None and small_image_note(path, results[path][0])]
            if small:
                summary.append(f'{split}: warning: {len(small)} image{"s are" if len(small) > 1 else " is"} far below the {IMAGE_SIZE} x {IMAGE_SIZE} '
                               f'input (smaller side under {SMALL_SIDE} px) and are scaled up without detail: '
                               + ', '.join(f'{path} ({w}x{h})' for path, (w, h) in small[:LIST_LIMIT])
                               + (f' and {len(small) - LIST_LIMIT} more' if len(small) > LIST_LIMIT else ''))
        if not decode and any(not full for _, _, full in to_read):
            summary.append(f'(every listed image\'s header was read and up to {sample} images per split decoded: an '
                           f'image damaged after its header is found only when decoded, by --decode or in training)')
def check_pickled(root: str, N: int, K: int, Q: int, decode: bool, summary: list[str], problems: list[str],
                  counts: dict, sizes: dict) -> None:
    """A pickled form: each split opened as train.py opens it (converted once to the array layout, then
    memory-mapped); counts, episode needs, the array's shape, and with --decode repeated images."""
    for split in SPLITS:
        try:
            dataset = open_split(root, split)
        except UserError as error:
            problems.append(f'{split}: {error}')
            continue
        per_class = check_classes(split, dataset.labels, dataset.class_names, N, K, Q, problems)
        counts[split] = (dataset.class_names, per_class)
        sizes[split] = [(dataset.shape[2], dataset.shape[1])]
        summary.append(f'{split}: {len(dataset.class_names)} classes, {len(dataset)} images, min {min(per_class)} / '
                       f'max {max(per_class)} images per class ({os.path.basename(dataset.location)}; array '
                       f'{dataset.shape} in {dataset.array_path})')
        if decode:
            digests = collections.Counter(hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
                                          for image in progress(dataset.images, desc=f'hashing {split}', leave=False))
            repeated = sum(n - 1 for n in digests.values() if n > 1)
            if repeated:
                problems.append(f'{split}: {repeated} image{"s" if repeated > 1 else ""} of {dataset.location} '
                                f'repeat{"" if repeated > 1 else "s"} another image of the split')


# ------------------------------------------------------------------ the benchmark it looks like


def compare_with_benchmarks(counts: dict, sizes: dict, summary: list[str]) -> None:
    """Which benchmark the split looks like, what differs from it, the image sizes, and a one-line verdict."""
    if len(counts) < len(SPLITS):
        summary.append('verdict: not usable as it is (see the problems)')
        return
    classes = tuple(len(counts[split][0]) for split in SPLITS)
    shared = sorted(set(counts['train'][0]) & set(counts['val'][0]) | set(counts['train'][0]) & set(counts['test'][0])
                    | set(counts['val'][0]) & set(counts['test'][0]))
    all_sizes = [size for split in SPLITS for size in sizes.get(split, [])]
    resized = bool(all_sizes) and set(all_sizes) == {(84, 84)}
    size_text = ('every image read is 84 x 84 (a pre-resized copy)' if resized else
                 f'images read are of {len(set(all_sizes))} size(s), resized and cropped by the transforms (raw images)'
                 if all_sizes else 'image sizes not read')
    summary.append(f'images: {size_text}')
    closest = min(BENCHMARKS, key=lambda b: sum(abs(a - e) for a, e in zip(classes, BENCHMARKS[b][0])))
    expected, per_class = BENCHMARKS[closest]
    differences = [f'{split} has {n} classes, {closest} {e}' for split, n, e in zip(SPLITS, classes, expected) if n != e]
    if per_class is not None:
        short = [(split, name, n) for split in SPLITS for name, n in zip(*counts[split]) if n != per_class]
        if short:
            split, name, n = short[0]
            differences.append(f'{len(short)} classes do not have {per_class} images (e.g. {split} class {name}: {n})')
    if shared:
        differences.append(f'{len(shared)} classes are in more than one split')
    if not differences:
        summary.append(f'verdict: {closest}, as the benchmark defines it: {" / ".join(map(str, classes))} classes'
                       + (f' of {per_class} images' if per_class else '') + f'; {size_text}')
    elif len(differences) <= 3 and sum(abs(a - e) for a, e in zip(classes, expected)) <= 0.1 * sum(expected):
        summary.append(f'verdict: looks like {closest}, but {"; ".join(differences)}')
    else:
        known = ', '.join(f'{b} {"/".join(map(str, c))}' for b, (c, _) in BENCHMARKS.items())
        summary.append(f'verdict: no benchmark split ({known} classes); a dataset of its own with '
                       f'{" / ".join(map(str, classes))} classes')


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> int:
    interrupt_on_sigterm()
    parser = get_parser()
    args = parser.parse_args(argv)
    for flag in ('N', 'K', 'Q'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    code = 0
    for root in args.data_path:
        summary, problems = check_dataset(root, args.N, args.K, args.Q, args.decode, max(args.sample, 0),
                                          args.n_threads)
        print('\n'.join(summary))
        if not problems:
            print('no problems found')
            continue
        total = count_problems(problems)
        print(f'{total} problem{"s" if total > 1 else ""} found:')
        for problem in problems:
            print(f'  - {problem}')
        code = 2
    return code


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
