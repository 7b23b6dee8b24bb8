"""Check a few-shot dataset folder before training: python scripts/check_dataset.py [--data_path ...].

Reads the three split files, counts classes and images, opens the header of a sample of images
(every image, fully decoded, with --decode) and lists the problems that would stop or spoil a
run: missing folders or split files, malformed rows, missing or undecodable images, classes with
fewer than K + Q images, N larger than a split's classes, classes shared between splits and
filenames listed twice. Exit code 0 when nothing is wrong, 2 otherwise.
"""
import argparse
import collections
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dataloader import SPLITS, read_split, split_csv_path  # noqa: E402
from utils import UserError  # noqa: E402

LIST_LIMIT = 10  # problems of one kind listed one by one per split; the rest are counted


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description='Check a dataset folder (images/ and split/{train,val,test}.csv) '
                                            'and list what is wrong with it.')
    p.add_argument('--data_path', type=str, default=os.path.join('datasets', 'mini_imagenet'),
                   help='dataset root holding images/ and split/{train,val,test}.csv')
    p.add_argument('--N', type=int, default=5, help='classes per episode: every split needs at least N classes')
    p.add_argument('--K', type=int, default=1, help='support images per class')
    p.add_argument('--Q', type=int, default=15, help='query images per class: every class needs K + Q images')
    p.add_argument('--sample', type=int, default=50,
                   help='images per split whose header is read (sizes, unreadable files); ignored with --decode')
    p.add_argument('--decode', action='store_true',
                   help='fully decode every listed image, as training will (slower: minutes for mini-ImageNet)')
    p.add_argument('--n_threads', type=int, default=min(8, os.cpu_count() or 1),
                   help='threads that read images')
    return p


def inspect_image(path: str, decode: bool) -> tuple[Optional[tuple[int, int]], Optional[str], Optional[str]]:
    """(size, mode, None) for a readable image, (None, None, reason) otherwise.

    Without ``decode`` only the header is read; with it the pixels are decoded and converted to RGB,
    as the data loader does.
    """
    try:
        with Image.open(path) as image:
            size, mode = image.size, image.mode
            if decode:
                image.convert('RGB')
        return size, mode, None
    except Exception as error:  # any failure means training would stop on this file
        reason = str(error).strip().splitlines()[0][:100] if str(error).strip() else ''
        return None, None, f'{type(error).__name__}: {reason}' if reason else type(error).__name__


def capped(problems: list[str], items: Sequence[str], more: str) -> None:
    """Append the first LIST_LIMIT items to ``problems``, then one line counting the rest."""
    problems.extend(items[:LIST_LIMIT])
    if len(items) > LIST_LIMIT:
        problems.append(f'... and {len(items) - LIST_LIMIT} more {more}')


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


def check_dataset(data_path: str, N: int = 5, K: int = 1, Q: int = 15, decode: bool = False,
                  sample: int = 50, n_threads: int = 1) -> tuple[list[str], list[str]]:
    """Check the dataset at ``data_path`` for N-way K-shot Q-query episodes.

    Returns (summary lines, problems); the dataset is usable when ``problems`` is empty.
    """
    summary, problems = [f'dataset {data_path} (checked for {N}-way {K}-shot {Q}-query episodes)'], []
    if not os.path.isdir(data_path):
        problems.append(f'data folder {data_path} not found (expected images/ and split/{{train,val,test}}.csv '
                        f'inside it; see --data_path)')
        return summary, problems
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
            filenames, labels, class_names = read_split(csv_path)
        except UserError as error:
            problems.append(str(error))
            summary.append(f'{split}: not checked ({csv_path} cannot be read, see the problems)')
            continue
        splits[split] = (csv_path, filenames, labels, class_names)

    # ---------------- per split: counts, episode needs, missing files, duplicates
    owners = collections.defaultdict(list)  # class name -> splits listing it
    file_owners = collections.defaultdict(list)  # filename -> splits listing it
    to_read = []  # (split, path) of images whose header (or pixels) are read
    rng = random.Random(0)
    for split, (csv_path, filenames, labels, class_names) in splits.items():
        counts = collections.Counter(labels)
        per_class = [counts[c] for c in range(len(class_names))]
        summary.append(f'{split}: {len(class_names)} classes, {len(filenames)} images, '
                       f'min {min(per_class)} / max {max(per_class)} images per class ({os.path.basename(csv_path)})')
        if N > len(class_names):
            problems.append(f'{split}: {len(class_names)} classes, fewer than N = {N} classes per episode')
        capped(problems, [f'{split}: class {name} has {per_class[c]} images, fewer than K + Q = {K + Q}'
                          for c, name in enumerate(class_names) if per_class[c] < K + Q],
               f'classes of {split} with fewer than K + Q = {K + Q} images')
        for name in class_names:
            owners[name].append(split)
        repeated = [name for name, n in collections.Counter(filenames).items() if n > 1]
        capped(problems, [f'{split}: {name} is listed {filenames.count(name)} times in {csv_path}' for name in repeated],
               f'filenames listed more than once in {csv_path}')
        for name in dict.fromkeys(filenames):
            file_owners[name].append(split)
        if present is None:
            continue
        missing = [name for name in dict.fromkeys(filenames) if name not in present]
        capped(problems, [f'{split}: image {name} listed in {csv_path} is missing from {image_dir}' for name in missing],
               f'images of {split} missing from {image_dir}')
        found = [name for name in dict.fromkeys(filenames) if name in present]
        chosen = found if decode or len(found) <= sample else rng.sample(found, sample)
        to_read.extend((split, os.path.join(image_dir, name)) for name in chosen)

    shared = [f'class {name} appears in more than one split: {", ".join(s)}' for name, s in owners.items() if len(s) > 1]
    capped(problems, shared, 'classes in more than one split')
    shared_files = [f'{name} is listed in more than one split: {", ".join(s)}'
                    for name, s in file_owners.items() if len(s) > 1]
    capped(problems, shared_files, 'filenames in more than one split')

    # ---------------- images: headers of a sample, or every image decoded
    if present is not None:
        listed = set(file_owners)
        summary.append(f'images/: {len(present)} files, {len(present - listed)} not listed in any split')
    if to_read:
        unique = list(dict.fromkeys(path for _, path in to_read))
        with ThreadPoolExecutor(max(1, n_threads)) as pool:
            results = pool.map(lambda path: inspect_image(path, decode), unique)
            results = dict(zip(unique, tqdm(results, total=len(unique), desc='decoding', unit='image',
                                            leave=False, disable=not decode)))
        for split in splits:
            paths = [path for s, path in to_read if s == split]
            if not paths:
                continue
            good = [results[path] for path in paths if results[path][2] is None]
            what = f'all {len(paths)} decoded' if decode else f'headers of {len(paths)}'
            summary.append(f'{split}: image sizes ({what}): '
                           f'{size_summary([g[0] for g in good], [g[1] for g in good])}')
            capped(problems, [f'{split}: image {path} cannot be {"decoded" if decode else "read"} ({results[path][2]})'
                              for path in paths if results[path][2] is not None],
                   f'unreadable images of {split}')
        if not decode:
            summary.append('(only a sample of image headers was read; --decode decodes every image)')
    return summary, problems


def main(argv: Optional[list[str]] = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    for flag in ('N', 'K', 'Q'):
        if getattr(args, flag) < 1:
            parser.error(f'--{flag} must be at least 1, got {getattr(args, flag)}')
    summary, problems = check_dataset(args.data_path, args.N, args.K, args.Q, args.decode,
                                      max(args.sample, 0), args.n_threads)
    print('\n'.join(summary))
    if not problems:
        print('no problems found')
        return 0
    print(f'{len(problems)} problem{"s" if len(problems) > 1 else ""} found:')
    for problem in problems:
        print(f'  - {problem}')
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
