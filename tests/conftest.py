"""Shared fixtures: small datasets in mini-ImageNet's real on-disk format."""
import os

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
