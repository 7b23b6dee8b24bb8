"""The data forms other than the folder one, read when the data is in them: tiered-ImageNet's arrays
({split}_images.npz, {split}_labels.pkl), memory-mapped, and pickled forms converted once to that layout.

Pickles are read with an unpickler that runs no code. The forms, by the files in a root (each split converted when it is first opened, with a progress bar):
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
import struct
import zipfile
from typing import Any, BinaryIO, Callable, Iterable, Iterator, NamedTuple, Optional

import numpy as np
from PIL import Image

from data.splits import SPLITS, SplitDataset, eval_transform, missing_root_message, too_large
from base.console import UserError, progress
from base.files import atomic_write


LABEL_KEYS = ('labels', 'label_specific')  # tiered-ImageNet pickles: FEAT's key, then Ren et al.'s


# ------------------------------------------------------------------ tiered-ImageNet files
def tiered_paths(root: str, split: str) -> tuple[str, str]:
    """(images, labels) files of a split in tiered-ImageNet's format: {split}_images.npz, {split}_labels.pkl."""
    return os.path.join(root, f'{split}_images.npz'), os.path.join(root, f'{split}_labels.pkl')


def number_labels(values: Iterable) -> tuple[list[int], list[str]]:
    """Integer labels numbered in order of first appearance, and the class names (the values as text)."""
    labels, class_names, index = [], [], {}
    for value in values:
        if value not in index:
            index[value] = len(class_names)
            class_names.append(value.decode('latin1') if isinstance(value, bytes) else str(value))
        labels.append(index[value])
    return labels, class_names


def read_tiered_labels(pkl_path: str) -> tuple[list[int], list[str]]:
    """Labels of a tiered-ImageNet pickle: a dict whose ``labels`` (or ``label_specific``) holds one
    label per image. Python 2 pickles load too (always read with encoding='latin1', which leaves
    Python 3 pickles unchanged); only plain data is admitted (``safe_load``). Returns (integer
    labels, class names in order of first appearance)."""
    if not os.path.isfile(pkl_path):
        raise UserError(f'label file {pkl_path} not found (expected a pickled dict with one label per image)')
    record = safe_load(pkl_path, 'label file')
    keys = [k for k in LABEL_KEYS if isinstance(record, dict) and k in record]
    if not keys:
        what = f'keys {sorted(map(str, record))}' if isinstance(record, dict) else f'a {type(record).__name__}'
        raise UserError(f"label file {pkl_path} holds {what}, expected a dict with 'labels' (one label per image)")
    values = record[keys[0]]
    values = values.ravel().tolist() if isinstance(values, np.ndarray) else list(values)
    return number_labels(values)


class ArrayInfo(NamedTuple):
    """Where an .npy array lies inside an .npz file."""
    shape: tuple
    dtype: np.dtype
    fortran_order: bool
    compressed: bool
    member_size: int  # bytes of the whole .npy member, header included, uncompressed
    header_size: int  # bytes of the .npy header
    offset: int       # position of the .npy member in the .npz file (meaningful for stored members)


def read_npy_header(f: BinaryIO, path: str) -> tuple[tuple, np.dtype, bool]:
    """(shape, dtype, fortran order) from the header of an .npy stream positioned at its start."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(f)
    except ValueError as error:
        raise UserError(f'{path} does not hold an .npy array ({error})') from None
    return shape, dtype, fortran_order


def npz_array_info(npz_path: str, key: str = 'images') -> ArrayInfo:
    """Shape, dtype and position of array ``key`` inside an .npz file, reading only its header."""
    if not os.path.isfile(npz_path):
        raise UserError(f'image file {npz_path} not found (expected an .npz whose {key!r} has shape (n, 84, 84, 3))')
    try:
        with zipfile.ZipFile(npz_path) as archive:
            try:
                member = archive.getinfo(f'{key}.npy')
            except KeyError:
                names = ', '.join(n[:-4] if n.endswith('.npy') else n for n in archive.namelist())
                raise UserError(f'{npz_path} has no array {key!r} (it holds: {names or "nothing"})') from None
            with archive.open(member) as f:
                shape, dtype, fortran_order = read_npy_header(f, npz_path)
                header_size = f.tell()
    except (zipfile.BadZipFile, OSError) as error:
        raise UserError(f'{npz_path} is not a readable .npz file ({type(error).__name__}: {error})') from None
    with open(npz_path, 'rb') as f:  # the stored member starts after its local header
        f.seek(member.header_offset)
        local = f.read(30)
    name_length, extra_length = struct.unpack('<HH', local[26:30])
    return ArrayInfo(tuple(shape), dtype, fortran_order, member.compress_type != zipfile.ZIP_STORED,
                     member.file_size, header_size, member.header_offset + 30 + name_length + extra_length)


def array_problems(info: ArrayInfo, labels: Optional[list], images_path: str, labels_path: str) -> list[str]:
    """What keeps a tiered split's array from being read (a shape or dtype other than (n, H, W, 3) uint8, another
    number of images than of ``labels``), one line each: the reader refuses the first, scripts/check_dataset.py
    lists them all."""
    problems = []
    if len(info.shape) != 4 or info.shape[3] != 3 or info.dtype != np.uint8:
        problems.append(f"{images_path}: 'images' is {info.dtype} of shape {info.shape}, expected uint8 of shape "
                        f'(n, height, width, 3)')
    if labels is not None and info.shape and info.shape[0] != len(labels):
        problems.append(f'{labels_path} lists {len(labels)} labels but {images_path} holds {info.shape[0]} images')
    return problems


def is_writable(folder: str) -> bool:
    return os.access(folder, os.W_OK)


def uncompressed_copy(npz_path: str, key: str, info: ArrayInfo) -> str:
    """Path of an uncompressed .npy copy of a compressed .npz member, written once (with a progress
    bar) beside the .npz, or under ``cache_dir()`` when that folder is read-only."""
    folder = copy_folder(os.path.dirname(os.path.abspath(npz_path)), npz_path, 'tiered', npz_path)
    target = os.path.join(folder, os.path.splitext(os.path.basename(npz_path))[0] + '.npy')
    if os.path.isfile(target) and os.path.getsize(target) == info.member_size \
            and os.path.getmtime(target) >= os.path.getmtime(npz_path):
        with open(target, 'rb') as f:
            if read_npy_header(f, target) == (info.shape, info.dtype, info.fortran_order):
                return target
    check_room(folder, info.member_size, f'{npz_path} is compressed and its uncompressed copy')
    print(f'{npz_path} is compressed: writing an uncompressed copy to {target} once, memory-mapped from then on')

    def copy(out) -> None:
        with zipfile.ZipFile(npz_path) as archive, archive.open(f'{key}.npy') as source, \
                progress(total=info.member_size, unit='B', unit_scale=True, desc=f'decompressing {os.path.basename(npz_path)}',
                         leave=False) as bar:
            while chunk := source.read(1 << 24):
                out.write(chunk)
                bar.update(len(chunk))
    atomic_write(target, copy)
    return target


class TieredDataset(SplitDataset):
    """tiered-ImageNet as FEAT reads it: ``{split}_images.npz`` (array ``images``, uint8, (n, 84, 84, 3))
    and ``{split}_labels.pkl`` (a dict whose ``labels`` holds one label per image).

    The pixels are memory-mapped, never loaded: straight from the .npz when its member is stored
    (np.savez), else from an uncompressed .npy copy written once (np.savez_compressed). Each
    process opens its own map on first use, and pickling leaves it out, so loader workers share
    the operating system's page cache instead of holding copies.
    """

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None):
        if not os.path.isdir(root):
            raise UserError(missing_root_message(root))
        self.root, self.split = root, split
        self.images_path, self.labels_path = tiered_paths(root, split)
        self.location = self.labels_path
        self.transform = transform if transform is not None else eval_transform()
        self.labels, self.class_names = read_tiered_labels(self.labels_path)
        info = npz_array_info(self.images_path, 'images')
        problems = array_problems(info, self.labels, self.images_path, self.labels_path)
        if problems:
            raise UserError(problems[0])
        self.shape, self.dtype, self.fortran_order = info.shape, info.dtype, info.fortran_order
        if info.compressed:
            self.array_path = uncompressed_copy(self.images_path, 'images', info)
            self.array_offset = info.header_size
        else:
            self.array_path, self.array_offset = self.images_path, info.offset + info.header_size
        self._images = None

    @property
    def images(self) -> np.memmap:
        """(n, H, W, 3) uint8, memory-mapped read-only; opened on first use in each process."""
        if self._images is None:
            self._images = np.memmap(self.array_path, dtype=self.dtype, mode='r', offset=self.array_offset,
                                     shape=self.shape, order='F' if self.fortran_order else 'C')
        return self._images

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state['_images'] = None  # a worker maps the file itself
        return state

    def files(self) -> list[str]:
        return [self.images_path, self.labels_path]

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(np.array(self.images[i]))


def other_form(root: str) -> str:
    """The form of a root without images/ or split/: a pickled one ('metaoptnet', 'learn2learn', 'tiered_png'),
    'tiered' when it holds {split}_images.npz or {split}_labels.pkl files; a UserError otherwise."""
    form = pickled_form(root)
    if form:
        return form
    if any(os.path.isfile(path) for split in SPLITS for path in tiered_paths(root, split)):
        return 'tiered'
    raise UserError(f'no dataset recognised in {root}: expected images/ and split/{{train,val,test}}.csv '
                    f'(mini-ImageNet, CUB), {{train,val,test}}_images.npz with {{train,val,test}}_labels.pkl '
                    f'(tiered-ImageNet), or the pickles of MetaOptNet, learn2learn or Ren et al. (docs/datasets.md)')


def open_form(form: str, root: str, split: str, transform: Optional[Callable] = None) -> TieredDataset:
    """A split of ``root`` in ``form`` (``other_form``); a pickled form is converted once to the array layout."""
    if form == 'tiered':
        return TieredDataset(root, split, transform)
    dataset = TieredDataset(convert_split(root, split), split, transform)
    dataset.root, dataset.location = root, source_file(root, form, split)
    return dataset


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


def source_files(root: str) -> list[str]:
    """The files a root in another form is read from (``other_form``): its arrays and labels, never the converted
    copies (``.glofa-arrays``, an .npz's uncompressed .npy)."""
    form = other_form(root)
    if form == 'tiered':
        names = [os.path.basename(p) for split in SPLITS for p in tiered_paths(root, split)]
    else:
        names = list(SPLIT_FILES[form].values()) + ([f'{split}_labels.pkl' for split in SPLITS]
                                                    if form == 'tiered_png' else [])
    return [os.path.join(root, name) for name in names if os.path.isfile(os.path.join(root, name))]


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


def copy_folder(beside: str, source: str, kind: str, key: str) -> str:
    """Where this program's copy of ``source`` goes: ``beside`` when its parent can be written, else a folder of its
    own under the cache folder (``kind``/a digest of ``key``), created; a folder that cannot be written is one line
    naming it and the way out. The one rule of both copies: a compressed .npz's .npy, a pickled form's arrays."""
    parent = os.path.dirname(beside) if os.path.basename(beside) == CONVERTED else beside
    if is_writable(parent):
        return beside
    return cache_folder(os.path.join(cache_dir(), kind, hashlib.sha1(os.path.abspath(key).encode()).hexdigest()[:12]),
                        source)


def check_room(folder: str, needed: int, what: str) -> None:
    """Before a copy is written: ``folder`` has ``needed`` bytes free, else one line saying how much is missing."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise UserError(f'{what} needs {needed / 2 ** 30:.1f} GiB in {folder}, which has {free / 2 ** 30:.1f} GiB free '
                        f'(set GLOFA_CACHE to a folder with room, and make the dataset\'s folder read-only so that the '
                        f'copy goes there)')


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
    folder = copy_folder(os.path.join(root, CONVERTED), source, 'pickled', root)
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
    check_room(folder, n * int(np.prod(shape)) + 2 ** 20, f'converting {source}')
    if os.path.lexists(stamp_path):
        os.remove(stamp_path)  # written last: a conversion cut short is never taken for a whole one
    atomic_write(images_path, lambda f: write_stored_npz(f, n, shape[0], shape[1], rows()))
    atomic_write(labels_path, lambda f: pickle.dump({'labels': names}, f))
    atomic_write(stamp_path, lambda f: json.dump(stamp, f), binary=False)
    return folder
