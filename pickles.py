"""Pickled dataset files: read with an unpickler that runs no code, and the pickled forms of
mini-ImageNet and tiered-ImageNet converted once into the array layout that ``TieredDataset`` maps.

The forms, by the files in a root (each split converted when it is first opened, with a progress bar):
- MetaOptNet / rfs: ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``, each a dict
  with ``data`` (uint8, n x 84 x 84 x 3), ``labels`` (ints) and ``catname2label`` ({name: label});
  ``train_phase_val`` and ``train_phase_test`` hold other images of the train classes and are not read.
- Ren et al.'s caches, as learn2learn reads them: ``mini-imagenet-cache-{train,validation,test}.pkl``,
  a dict with ``image_data`` (uint8, n x 84 x 84 x 3) and ``class_dict`` ({name: [indices]}).
- Ren et al.'s tiered-ImageNet: ``{split}_images_png.pkl`` (a list of PNG-encoded images) with
  ``{split}_labels.pkl`` (``label_specific``, and ``label_specific_str`` for the names when present).
The converted split is ``{split}_images.npz`` (stored, so memory-mapped) and ``{split}_labels.pkl``
(one class name per image) in ``<root>/.glofa-arrays/``, or under the cache folder when the root is
read-only; it is written atomically and reused while it is newer than its source.
"""
import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from typing import Any, BinaryIO, Iterator, Optional

import numpy as np
from PIL import Image
from utils import progress

from utils import UserError, atomic_write, too_large

# what a pickle of plain containers, numbers, strings and numpy arrays needs (Python 2's and 3's)
SAFE_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'), ('collections', 'OrderedDict'),
    ('builtins', 'set'), ('builtins', 'frozenset'), ('builtins', 'bytearray'), ('builtins', 'complex'),
    ('__builtin__', 'set'), ('__builtin__', 'frozenset'), ('__builtin__', 'bytearray'), ('__builtin__', 'complex'),
}


class RefusedGlobal(pickle.UnpicklingError):
    pass


class SafeUnpickler(pickle.Unpickler):
    """Admits only the globals of SAFE_GLOBALS: a file that needs any other object runs no code, it is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise RefusedGlobal(f'{module}.{name}')


def safe_load(path: str, what: str) -> Any:
    """Unpickle ``path`` (Python 2 pickles too: encoding latin1) admitting only plain data, or a UserError
    naming the file and what it needed."""
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} not found')
    try:
        with open(path, 'rb') as f:
            return SafeUnpickler(f, encoding='latin1').load()
    except RefusedGlobal as error:
        raise UserError(f'{what} {path} needs {error} to be read, which could run code: refused (expected a pickle '
                        f'of plain containers, numbers, strings and numpy arrays)') from None
    except Exception as error:  # a truncated or foreign file: any unpickling failure
        raise UserError(f'{what} {path} cannot be unpickled ({type(error).__name__})') from None


# ------------------------------------------------------------------ the forms
SPLIT_FILES = {
    'metaoptnet': {'train': 'miniImageNet_category_split_train_phase_train.pickle',
                   'val': 'miniImageNet_category_split_val.pickle',
                   'test': 'miniImageNet_category_split_test.pickle'},
    'learn2learn': {'train': 'mini-imagenet-cache-train.pkl', 'val': 'mini-imagenet-cache-validation.pkl',
                    'test': 'mini-imagenet-cache-test.pkl'},
    'tiered_png': {'train': 'train_images_png.pkl', 'val': 'val_images_png.pkl', 'test': 'test_images_png.pkl'},
}
FORM_NAMES = {'metaoptnet': "MetaOptNet / rfs pickles", 'learn2learn': "Ren et al.'s caches (learn2learn)",
              'tiered_png': "Ren et al.'s tiered-ImageNet PNG pickles"}
CONVERTED = '.glofa-arrays'


def pickled_form(root: str) -> Optional[str]:
    """The pickled form whose files are in ``root`` ('metaoptnet', 'learn2learn', 'tiered_png'), or None."""
    for form, files in SPLIT_FILES.items():
        if any(os.path.isfile(os.path.join(root, name)) for name in files.values()):
            return form
    return None


def source_file(root: str, form: str, split: str) -> str:
    path = os.path.join(root, SPLIT_FILES[form][split])
    if not os.path.isfile(path):
        raise UserError(f'{path} not found: {root} holds {FORM_NAMES[form]}, whose {split} split is that file')
    return path


def check_array(data: Any, path: str, key: str) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
        what = f'{data.dtype} of shape {data.shape}' if isinstance(data, np.ndarray) else f'a {type(data).__name__}'
        raise UserError(f"{path}: {key!r} is {what}, expected uint8 of shape (n, height, width, 3)")
    return data


def dict_with(record: Any, path: str, keys: tuple) -> dict:
    if not isinstance(record, dict) or any(k not in record for k in keys):
        found = f'keys {sorted(map(str, record))}' if isinstance(record, dict) else f'a {type(record).__name__}'
        raise UserError(f'{path} holds {found}, expected a dict with {", ".join(map(repr, keys))}')
    return record


def read_metaoptnet(path: str) -> tuple[np.ndarray, list[str]]:
    record = dict_with(safe_load(path, 'pickle'), path, ('data', 'labels'))
    data = check_array(record['data'], path, 'data')
    labels = np.asarray(record['labels']).ravel().tolist()
    if len(labels) != len(data):
        raise UserError(f"{path}: {len(labels)} labels for {len(data)} images")
    names = {int(v): str(k) for k, v in (record.get('catname2label') or {}).items()}
    return data, [names.get(int(label), str(label)) for label in labels]


def read_learn2learn(path: str) -> tuple[np.ndarray, list[str]]:
    record = dict_with(safe_load(path, 'pickle'), path, ('image_data', 'class_dict'))
    data = check_array(record['image_data'], path, 'image_data')
    names = [None] * len(data)
    for name, indices in record['class_dict'].items():
        for i in np.asarray(indices).ravel().tolist():
            if not 0 <= i < len(data) or names[i] is not None:
                raise UserError(f"{path}: class_dict lists image {i} {'twice' if 0 <= i < len(data) else 'out of range'}")
            names[i] = str(name)
    if None in names:
        raise UserError(f'{path}: image {names.index(None)} is in no class of class_dict')
    return data, names


def read_tiered_png(path: str, root: str, split: str) -> tuple[list, list[str]]:
    images = safe_load(path, 'pickle')
    if not isinstance(images, (list, tuple, np.ndarray)):
        raise UserError(f'{path} holds a {type(images).__name__}, expected a list of PNG-encoded images')
    labels_path = os.path.join(root, f'{split}_labels.pkl')
    record = dict_with(safe_load(labels_path, 'label file'), labels_path, ('label_specific',))
    values = np.asarray(record['label_specific']).ravel().tolist()
    names = record.get('label_specific_str')
    if len(values) != len(images):
        raise UserError(f'{labels_path} lists {len(values)} labels but {path} holds {len(images)} images')
    if names is not None:
        names = [n.decode('latin1') if isinstance(n, bytes) else str(n) for n in names]
        return images, [names[int(v)] if int(v) < len(names) else str(v) for v in values]
    return images, [str(v) for v in values]


def decode_png(item: Any, path: str, i: int) -> np.ndarray:
    raw = item.tobytes() if isinstance(item, np.ndarray) else bytes(item)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return np.asarray(image.convert('RGB'))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UserError(f'{path}: image {i} cannot be decoded ({too_large(error) or type(error).__name__})') from None


# ------------------------------------------------------------------ conversion
def cache_dir() -> str:
    """Where uncompressed copies go when a dataset folder is read-only: $GLOFA_CACHE, else
    $XDG_CACHE_HOME/glofa, else ~/.cache/glofa."""
    if os.environ.get('GLOFA_CACHE'):
        return os.environ['GLOFA_CACHE']
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'), 'glofa')


def cache_folder(folder: str, source: str) -> str:
    """Create ``folder`` (a copy of ``source`` goes there) and check it can be written, or one line naming it
    and the way out. Returns ``folder``."""
    try:
        os.makedirs(folder, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
        reason = 'it is read-only'
    except OSError as error:
        reason = error.strerror or str(error)
    raise UserError(f'{source} is read in a converted copy, which cannot be written to {folder} ({reason}): set '
                    f'GLOFA_CACHE to a folder you can write to (now {cache_dir()})')


def converted_folder(root: str) -> str:
    """<root>/.glofa-arrays, or, for a read-only root, a folder of its own under the cache folder."""
    if os.access(root, os.W_OK):
        return os.path.join(root, CONVERTED)
    digest = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), 'pickled', digest)


def source_stamp(path: str) -> dict:
    stat = os.stat(path)
    return {'source': os.path.abspath(path), 'size': stat.st_size, 'mtime': stat.st_mtime}


def write_stored_npz(file: BinaryIO, n: int, height: int, width: int, rows: Iterator[np.ndarray]) -> None:
    """An .npz holding 'images' (uint8, (n, height, width, 3)), stored (not compressed), written row by row into
    the open ``file``."""
    with zipfile.ZipFile(file, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive, \
            archive.open('images.npy', 'w', force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {'descr': '|u1', 'fortran_order': False,
                                                 'shape': (n, height, width, 3)})
        for row in rows:
            f.write(np.ascontiguousarray(row, dtype=np.uint8).tobytes())


def convert_split(root: str, split: str) -> str:
    """The folder holding ``split`` of the pickled dataset at ``root`` in the array layout, converted now
    if it is not there yet (or its source changed). Returns the folder (TieredDataset reads it)."""
    form = pickled_form(root)
    source = source_file(root, form, split)
    folder = converted_folder(root)
    images_path, labels_path = (os.path.join(folder, f'{split}_images.npz'), os.path.join(folder, f'{split}_labels.pkl'))
    stamp_path = os.path.join(folder, f'{split}.source.json')
    stamp = source_stamp(source)
    if all(os.path.isfile(p) for p in (images_path, labels_path, stamp_path)):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return folder
    cache_folder(folder, source)
    print(f'{source}: {FORM_NAMES[form]}; converting the {split} split once to {folder} '
          f'(memory-mapped from then on)')
    if form == 'tiered_png':
        encoded, names = read_tiered_png(source, root, split)
        first = decode_png(encoded[0], source, 0) if len(encoded) else np.zeros((84, 84, 3), np.uint8)
        shape = first.shape

        def rows() -> Iterator[np.ndarray]:
            for i, item in enumerate(progress(encoded, desc=f'decoding {os.path.basename(source)}', unit='image',
                                          leave=False)):
                image = decode_png(item, source, i)
                if image.shape != shape:
                    raise UserError(f'{source}: image {i} is {image.shape[1]}x{image.shape[0]}, image 0 is '
                                    f'{shape[1]}x{shape[0]} (one size is expected)')
                yield image
        n = len(encoded)
    else:
        data, names = (read_metaoptnet if form == 'metaoptnet' else read_learn2learn)(source)
        shape, n = data.shape[1:], len(data)

        def rows() -> Iterator[np.ndarray]:
            yield from progress(np.array_split(data, max(1, n // 1000)) if n else [],
                            desc=f'writing {os.path.basename(images_path)}', unit='chunk', leave=False)
    needed = n * int(np.prod(shape)) + 2 ** 20
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f'converting {source} needs {needed / 2 ** 30:.1f} GiB in {folder}, which has '
                        f'{free / 2 ** 30:.1f} GiB free (set GLOFA_CACHE to a folder with room, and make {root} read-only)')
    if os.path.lexists(stamp_path):
        os.remove(stamp_path)  # written last: a conversion cut short is never taken for a whole one
    atomic_write(images_path, lambda f: write_stored_npz(f, n, shape[0], shape[1], rows()))
    atomic_write(labels_path, lambda f: pickle.dump({'labels': names}, f))
    atomic_write(stamp_path, lambda f: json.dump(stamp, f), binary=False)
    return folder
