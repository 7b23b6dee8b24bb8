"""Shared fixtures: small datasets in mini-ImageNet's and tiered-ImageNet's real on-disk formats."""
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image


def make_dataset(root, classes_per_split=(4, 3, 3), images_per_class=6, size=(100, 90), seed=0):
    """Write ``root/images/*.jpg`` and ``root/split/{train,val,test}.csv`` with WordNet-like labels.

    Each class has its own colour plus noise, so that a model can tell classes apart. Returns root.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    os.makedirs(os.path.join(root, 'split'), exist_ok=True)
    wnid = 0
    for split, n_classes in zip(('train', 'val', 'test'), classes_per_split):
        rows = ['filename,label']
        for _ in range(n_classes):
            wnid += 1
            label = f'n{wnid:08d}'
            colour = rng.integers(0, 256, 3)
            for i in range(images_per_class):
                pixels = np.clip(colour + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                name = f'{label}{i:08d}.jpg'
                Image.fromarray(pixels).save(os.path.join(root, 'images', name), quality=90)
                rows.append(f'{name},{label}')
        with open(os.path.join(root, 'split', f'{split}.csv'), 'w') as f:
            f.write('\n'.join(rows) + '\n')
    return str(root)


# ------------------------------------------------------------------ tiered-ImageNet files
SPLIT_CLASSES = {'train': 4, 'val': 3, 'test': 3}
PER_CLASS = 6


def python2_pickle(labels) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) writes for {'labels': int64 array}: the array's data
    is a Python 2 str, which Python 3 only reads with encoding='latin1' once a byte is >= 0x80."""
    raw = np.asarray(labels).astype('<i8').tobytes()

    def short(b: bytes) -> bytes:
        return b'U' + bytes([len(b)]) + b  # SHORT_BINSTRING: a Python 2 str

    return (b'\x80\x02}' + short(b'labels')
            + b'cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85' + short(b'b') + b'\x87R'
            + b'(K\x01M' + struct.pack('<H', len(labels)) + b'\x85cnumpy\ndtype\n' + short(b'i8') + b'K\x00K\x01\x87R'
            + b'(K\x03' + short(b'<') + b'NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89'
            + b'T' + struct.pack('<i', len(raw)) + raw + b'tbs.')


def write_tiered(root, compressed=False, python2=False, seed=0):
    """{split}_images.npz (uint8, (n, 84, 84, 3)) and {split}_labels.pkl; labels are numbers from 200,
    interleaved and descending, so that numbering in order of first appearance is visible. Returns root."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    first = 200
    for split, n_classes in SPLIT_CLASSES.items():
        values = np.tile(np.arange(first + n_classes - 1, first - 1, -1), PER_CLASS)  # interleaved, descending
        first += n_classes
        colours = {v: rng.integers(0, 256, 3) for v in np.unique(values)}
        images = np.stack([np.clip(colours[v] + rng.normal(0, 30, (84, 84, 3)), 0, 255) for v in values]).astype(np.uint8)
        (np.savez_compressed if compressed else np.savez)(os.path.join(root, f'{split}_images.npz'), images=images)
        with open(os.path.join(root, f'{split}_labels.pkl'), 'wb') as f:
            f.write(python2_pickle(values) if python2 else pickle.dumps({'labels': values}))
    return str(root)


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """4 / 3 / 3 classes of 6 images: enough for 3-way episodes with K + Q <= 6."""
    return make_dataset(tmp_path_factory.mktemp('data') / 'tiny')


@pytest.fixture(scope='session')
def spec_encoder_keys() -> set:
    """The state-dict keys of the ResNet-12, as the spec lists them."""
    keys = set()
    for i in range(1, 5):
        for conv in ('conv1', 'conv2', 'conv3', 'downsample.0'):
            keys.add(f'layer{i}.0.{conv}.weight')
        for bn in ('bn1', 'bn2', 'bn3', 'downsample.1'):
            for name in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
                keys.add(f'layer{i}.0.{bn}.{name}')
    return keys


@pytest.fixture(scope='session')
def spec_model_keys(spec_encoder_keys) -> set:
    """The state-dict keys of GLoFA on the ResNet-12, as the spec lists them."""
    keys = {f'encoder.{k}' for k in spec_encoder_keys}
    for f in ('f_task', 'f_class', 'h'):
        for part in ('psi', 'rho'):
            for layer in (0, 2):
                for name in ('weight', 'bias'):
                    keys.add(f'{f}.{part}.{layer}.{name}')
    return keys
