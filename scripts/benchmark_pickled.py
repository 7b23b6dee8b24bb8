"""Cost of the pickled dataset forms at full scale: conversion time, disk use, and train.py's start.

    python scripts/benchmark_pickled.py --data_path DIR [--work_dir W] [--forms metaoptnet learn2learn tiered_png]

DIR is a dataset in the folder form (images/ + split/*.csv of 84 x 84 images), e.g. one written by
``python demo.py --kind mini_scale --root DIR`` with mini-ImageNet's 60000 images. Its images are written once in each pickled
form (demo.write_pickled_split: the real keys and layouts) under --work_dir, then, per form:
(a) the one-time conversion of the three splits to the array layout, timed in this process, and the
    disk used by the pickles and by the converted arrays;
(b) ``train.py --flag_debug --network_name convnet --pretrained none`` on the form, run twice in its own
    process: the first start (which converts, the converted copy removed before) and a later start
    (which maps the converted copy), beside the same command on the folder form.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from dataloader import SPLITS, open_split  # noqa: E402
from demo import PICKLED_FORMS, write_pickled_split  # noqa: E402
from pickles import CONVERTED, convert_split  # noqa: E402

GIB = 2 ** 30


def disk(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def train_seconds(data_path: str, save_dir: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--flag_debug', '--network_name', 'convnet',
                    '--pretrained', 'none', '--data_path', data_path, '--save_dir', save_dir, '--overwrite'],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_path', required=True, help='a folder-form dataset to write in every form')
    p.add_argument('--work_dir', default=None, help='where the forms are written (default: a temporary folder)')
    p.add_argument('--forms', nargs='+', default=list(PICKLED_FORMS), choices=list(PICKLED_FORMS))
    opts = p.parse_args(argv)
    work = opts.work_dir or tempfile.mkdtemp(prefix='glofa-pickled-')
    saves = os.path.join(work, 'saves')
    results = {}
    splits = {split: open_split(opts.data_path, split) for split in SPLITS}
    print(f'folder form: {sum(len(d) for d in splits.values())} images, {disk(os.path.join(opts.data_path, "images")) / GIB:.2f} GiB')
    for form in opts.forms:
        root = os.path.join(work, form)
        if not os.path.isdir(root):
            start, first = time.perf_counter(), 0
            for split, dataset in splits.items():
                images = np.stack([np.asarray(dataset.load_image(i)) for i in range(len(dataset))])
                names = [dataset.class_names[label] for label in dataset.labels]
                write_pickled_split(root, form, split, images, names, first)
                first += len(dataset.class_names)
            print(f'{form}: pickles written in {time.perf_counter() - start:.1f} s')
        shutil.rmtree(os.path.join(root, CONVERTED), ignore_errors=True)
        start = time.perf_counter()
        for split in SPLITS:
            convert_split(root, split)
        conversion = time.perf_counter() - start
        source = sum(disk(os.path.join(root, f)) for f in os.listdir(root) if f != CONVERTED)
        converted = disk(os.path.join(root, CONVERTED))
        shutil.rmtree(os.path.join(root, CONVERTED))
        first_start = train_seconds(root, saves)
        later_start = train_seconds(root, saves)
        results[form] = dict(conversion_s=conversion, pickles_gib=source / GIB, converted_gib=converted / GIB,
                             train_first_s=first_start, train_later_s=later_start)
        print(f'{form}: conversion {conversion:.1f} s; pickles {source / GIB:.2f} GiB, converted arrays '
              f'{converted / GIB:.2f} GiB; train.py --flag_debug first start {first_start:.1f} s, later '
              f'{later_start:.1f} s', flush=True)
    folder = train_seconds(opts.data_path, saves)
    results['folder'] = dict(train_later_s=folder)
    print(f'folder form: train.py --flag_debug {folder:.1f} s')
    return results


if __name__ == '__main__':
    main()
