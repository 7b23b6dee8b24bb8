"""Small datasets in the real on-disk formats, for the tests and the developer tools (scripts/dev): coloured noise
in the folder form, tiered-ImageNet's arrays, and the pickled forms, with their real file names, keys and dtypes."""
import io
import os
import pickle
import struct
from typing import Sequence

import numpy as np
from PIL import Image

from harness.demo import write_split


def python2_pickle(labels: Sequence[int]) -> bytes:
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


def write_tiered_split(root: str, split: str, labels: Sequence, images: np.ndarray, compressed: bool = False,
                       python2: bool = False) -> None:
    """tiered-ImageNet's format: ``{split}_images.npz`` (array ``images``, uint8 (n, H, W, 3); stored, or
    compressed) and ``{split}_labels.pkl`` ({'labels': one label per image}; as Python 2 wrote it)."""
    os.makedirs(root, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(os.path.join(root, f'{split}_images.npz'), images=images)
    with open(os.path.join(root, f'{split}_labels.pkl'), 'wb') as f:
        f.write(python2_pickle(labels) if python2 else pickle.dumps({'labels': np.asarray(labels)}))


TIERED_CLASSES = {'train': 4, 'val': 3, 'test': 3}
TIERED_PER_CLASS = 6


def write_tiered_dataset(root: str, compressed: bool = False, python2: bool = False, seed: int = 0) -> str:
    """tiered-ImageNet's format, 4 / 3 / 3 classes of 6 images of 84 x 84; labels are numbers from 200,
    interleaved and descending, so that numbering in order of first appearance is visible. Returns root."""
    rng = np.random.default_rng(seed)
    first = 200
    for split, n_classes in TIERED_CLASSES.items():
        values = np.tile(np.arange(first + n_classes - 1, first - 1, -1), TIERED_PER_CLASS)  # interleaved, descending
        first += n_classes
        colours = {v: rng.integers(0, 256, 3) for v in np.unique(values)}
        images = np.stack([np.clip(colours[v] + rng.normal(0, 30, (84, 84, 3)), 0, 255) for v in values]).astype(np.uint8)
        write_tiered_split(root, split, values, images, compressed, python2)
    return str(root)


PICKLED_FORMS = ('metaoptnet', 'learn2learn', 'tiered_png')
SPLITS_ORDER = ('train', 'val', 'test')


def pickled_split_images(split: str, seed: int = 0) -> tuple[np.ndarray, list]:
    """The images and class names of one split of the pickled miniatures: TIERED_CLASSES[split] classes
    of TIERED_PER_CLASS coloured 84 x 84 images, interleaved (image i is of class i % classes)."""
    rng = np.random.default_rng(seed + SPLITS_ORDER.index(split))
    n_classes = TIERED_CLASSES[split]
    names = [f'n{7000000 + 100 * SPLITS_ORDER.index(split) + c:08d}' for c in range(n_classes)]
    colours = rng.integers(0, 256, (n_classes, 3))
    per_image = [names[i % n_classes] for i in range(n_classes * TIERED_PER_CLASS)]
    images = np.stack([np.clip(colours[i % n_classes] + rng.normal(0, 30, (84, 84, 3)), 0, 255)
                       for i in range(len(per_image))]).astype(np.uint8)
    return images, per_image


def write_pickled_split(root: str, form: str, split: str, images: np.ndarray, names: Sequence[str],
                        first_label: int = 0) -> None:
    """One split in one of the pickled forms, with its real file names, keys, dtypes and layouts (``pickles``
    reads them); images uint8 (n, H, W, 3), one class name per image:
    - 'metaoptnet': miniImageNet_category_split_{train_phase_train,val,test}.pickle, {'data': uint8
      (n, 84, 84, 3), 'labels': [int] (numbered from ``first_label``), 'catname2label': {name: int}};
    - 'learn2learn': mini-imagenet-cache-{train,validation,test}.pkl, {'image_data': uint8 (n, 84, 84, 3),
      'class_dict': {name: [indices]}};
    - 'tiered_png': {split}_images_png.pkl, a list of PNG-encoded images (uint8 1-d arrays), and
      {split}_labels.pkl with 'label_specific', 'label_general' and their '_str' names.
    Pickled with protocol 2, as Python 2 could read them."""
    from data.forms import SPLIT_FILES
    os.makedirs(root, exist_ok=True)
    classes = list(dict.fromkeys(names))
    if form == 'metaoptnet':
        catname2label = {name: first_label + c for c, name in enumerate(classes)}
        record = {'data': images, 'labels': [catname2label[n] for n in names], 'catname2label': catname2label}
    elif form == 'learn2learn':
        members = {c: [] for c in classes}
        for i, name in enumerate(names):
            members[name].append(i)
        record = {'image_data': images, 'class_dict': members}
    else:
        record = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format='PNG')
            record.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
        index = {c: k for k, c in enumerate(classes)}
        labels = {'label_specific': np.array([index[n] for n in names]),
                  'label_general': np.zeros(len(names), dtype=np.int64),
                  'label_specific_str': classes, 'label_general_str': ['all']}
        with open(os.path.join(root, f'{split}_labels.pkl'), 'wb') as f:
            pickle.dump(labels, f, protocol=2)
    with open(os.path.join(root, SPLIT_FILES[form][split]), 'wb') as f:
        pickle.dump(record, f, protocol=2)


def write_pickled_dataset(root: str, form: str, seed: int = 0) -> str:
    """A miniature of a pickled form (``write_pickled_split``): TIERED_CLASSES classes of TIERED_PER_CLASS
    coloured 84 x 84 images per split, and the same images in the folder format, as PNG (lossless),
    under root/folder. Returns root."""
    first = 0
    for split in SPLITS_ORDER:
        images, names = pickled_split_images(split, seed)
        write_pickled_split(root, form, split, images, names, first)
        write_split(os.path.join(root, 'folder'), split,
                    [(f'{name}{i:08d}.png', name, image) for i, (name, image) in enumerate(zip(names, images))])
        first += len(set(names))
    return str(root)
