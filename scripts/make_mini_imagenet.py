"""Write mini-ImageNet (images/ + split/*.csv) from ILSVRC2012's train set and Ravi and Larochelle's split files.

    python scripts/make_mini_imagenet.py --imagenet ILSVRC2012_img_train --split_dir SPLITS --out datasets/mini_imagenet [--size 84]

--imagenet holds ILSVRC2012's train set as one folder per WordNet id (n01532829/n01532829_10007.JPEG ...)
or as one tar per class (n01532829.tar, as ILSVRC2012_img_train.tar unpacks). --split_dir holds
train.csv, val.csv and test.csv: a header, then rows filename,label such as
n0153282900000005.jpg,n01532829.

The mapping is the common convention of the widely used converter (yaoyao-liu/mini-imagenet-tools):
the name n0153282900000005.jpg is class n01532829 and the 5th (1-based) of that class's files sorted by
their numeric suffix (n01532829_10007.JPEG -> 10007). Whether this yields Ravi and Larochelle's exact
images is not confirmed by any source we know of; scripts/check_dataset.py then checks the counts.

By default each image is copied as it is (a JPEG, whatever its size: FEAT's loader resizes and crops raw
images, and FEAT reports lower scores for pre-resized copies); --size S writes S x S copies instead,
resized with Lanczos filtering (PIL.Image.LANCZOS) and saved as JPEG quality 95. Every row is checked
before anything is written: a missing class, a missing index or a class with too few files is one line
naming the split file and the class. A re-run writes only what is missing; a file already there is
never rewritten (each is written to a temporary name, then renamed).
"""
import argparse
import io
import os
import re
import shutil
import sys
import tarfile
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from PIL import Image  # noqa: E402
from base.console import UserError, exit_on_interrupt, exits_cleanly, interrupt_on_sigterm, progress  # noqa: E402

from dataloader import SPLITS, read_split, split_csv_path, to_rgb  # noqa: E402

NAME = re.compile(r'^(n\d{8})(\d+)\.\w+$')      # n0153282900000005.jpg: class, 1-based index
SOURCE = re.compile(r'^n\d{8}_(\d+)\.JPEG$', re.IGNORECASE)  # n01532829_10007.JPEG: numeric suffix


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--imagenet', required=True, help="ILSVRC2012's train set: a folder per class, or a tar per class")
    p.add_argument('--split_dir', required=True, help='folder of train.csv, val.csv and test.csv (Ravi and Larochelle)')
    p.add_argument('--out', required=True, help='dataset root to write: out/images/ and out/split/')
    p.add_argument('--size', type=int, default=None,
                   help='write S x S copies (Lanczos, JPEG quality 95) instead of copying the files as they are')
    return p


def wanted(split_dir: str) -> dict:
    """{output name: (class, 1-based index, split file)} of every row of the three split files."""
    rows = {}
    for split in SPLITS:
        path = os.path.join(split_dir, f'{split}.csv')
        filenames, _, _ = read_split(path)
        for name in filenames:
            match = NAME.match(name)
            if not match:
                raise UserError(f'{path}: {name} is not a name like n0153282900000005.jpg (class, then 1-based index)')
            if int(match.group(2)) < 1:
                raise UserError(f'{path}: {name} has index 0; indices are 1-based')
            rows[name] = (match.group(1), int(match.group(2)), path)
    return rows


class Source:
    """One class of ILSVRC2012's train set, a folder or a tar: its files sorted by their numeric suffix."""

    def __init__(self, imagenet: str, wnid: str):
        folder, tar = os.path.join(imagenet, wnid), os.path.join(imagenet, f'{wnid}.tar')
        self.tar: Optional[tarfile.TarFile] = None
        if os.path.isdir(folder):
            self.where, names = folder, os.listdir(folder)
        elif os.path.isfile(tar):
            self.where = tar
            try:
                self.tar = tarfile.open(tar)
                self.members = {os.path.basename(m.name): m for m in self.tar.getmembers() if m.isfile()}
            except (tarfile.TarError, OSError) as error:
                raise UserError(f'{tar} cannot be read as a tar ({type(error).__name__})') from None
            names = list(self.members)
        else:
            raise UserError(f'class {wnid} not found in {imagenet} (expected the folder {folder} or the tar {tar})')
        self.files = sorted((n for n in names if SOURCE.match(n)), key=lambda n: int(SOURCE.match(n).group(1)))

    def read(self, index: int) -> bytes:
        name = self.files[index - 1]
        if self.tar is None:
            with open(os.path.join(self.where, name), 'rb') as f:
                return f.read()
        return self.tar.extractfile(self.members[name]).read()


def write_image(data: bytes, target: str, size: Optional[int], origin: str) -> None:
    partial = f'{target}.part'
    try:
        if size is None:
            with open(partial, 'wb') as f:
                f.write(data)
        else:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    to_rgb(image, origin).resize((size, size), Image.LANCZOS).save(partial, format='JPEG', quality=95)
            except (OSError, ValueError, SyntaxError) as error:
                raise UserError(f'{origin} cannot be decoded ({type(error).__name__})') from None
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> dict:
    interrupt_on_sigterm()
    args = get_parser().parse_args(argv)
    if args.size is not None and args.size < 1:
        raise UserError(f'--size must be at least 1, got {args.size}')
    if not os.path.isdir(args.imagenet):
        raise UserError(f'ImageNet folder {args.imagenet} (--imagenet) not found')
    rows = wanted(args.split_dir)
    by_class = {}
    for name, (wnid, index, path) in rows.items():
        by_class.setdefault(wnid, []).append((index, name, path))
    sources = {}
    for wnid, items in progress(by_class.items(), desc='listing classes', unit='class', leave=False):
        source = sources[wnid] = Source(args.imagenet, wnid)
        index, name, path = max(items)
        if index > len(source.files):
            raise UserError(f'{path} names {name}, image {index} of class {wnid}, but {source.where} holds '
                            f'{len(source.files)} files named like {wnid}_<number>.JPEG')
    images = os.path.join(args.out, 'images')
    os.makedirs(images, exist_ok=True)
    os.makedirs(os.path.join(args.out, 'split'), exist_ok=True)
    for split in SPLITS:  # the split files themselves, verbatim
        target = split_csv_path(args.out, split)
        if not os.path.isfile(target):
            shutil.copyfile(os.path.join(args.split_dir, f'{split}.csv'), target)
    todo = [(wnid, index, name) for wnid, items in by_class.items() for index, name, _ in sorted(items)
            if not os.path.isfile(os.path.join(images, name))]
    done = len(rows) - len(todo)
    if done:
        print(f'{done} of {len(rows)} images already in {images}: writing the {len(todo)} missing')
    written = 0
    with exit_on_interrupt(lambda: f'interrupted: {done + written} of {len(rows)} images are in {images}; '
                                   f'run the same command again to write the rest'):
        for wnid, index, name in progress(todo, desc='writing images', unit='image'):
            source = sources[wnid]
            write_image(source.read(index), os.path.join(images, name), args.size,
                        f'{source.where}: {source.files[index - 1]}')
            written += 1
    print(f'{len(rows)} images of {len(by_class)} classes in {images} ({written} written now); '
          f'check them with python scripts/check_dataset.py --data_path {args.out}')
    return {'written': written, 'total': len(rows)}


if __name__ == '__main__':
    main(sys.argv[1:])
