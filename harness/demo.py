"""The demo's datasets, procedural, in the folder format (``write_split``, which tests/small_data.py's
writers of every format use too).

Layout written under ``root``::

    images/<label><8-digit index>.jpg      e.g. images/n9000000100000001.jpg
    split/{train,val,test}.csv             header ``filename,label``
    .demo_complete                         JSON of the generation parameters

Two datasets, both by ``generate_demo_dataset``: the coarse demo (datasets/demo) and a fine-grained
sibling (``kind='fine'``, datasets/demo_fine); ``--demo mixed`` trains on both.

Every class is a combination of a background *texture* covering the whole
image (horizontal, vertical or diagonal stripes, checks or dots, each at two
scales, or soft blobs) and a *foreground*: one to three objects of a per-class
shape and saturated hue.  These properties survive random crops, flips and
brightness / contrast / saturation jitter.  The background colour is drawn
afresh for every image and carries no class information; within a class the
texture phase, angle and period, the object hue, count, positions, sizes and
rotations, an optional distractor object and the pixel noise vary too.
Foregrounds (hue, shape) are never shared between splits, so validation and
test classes are new combinations of attribute values that all occur in
training.  Inside a split classes come in pairs that share a texture and differ
only in their foreground, which keeps the task from being trivial.

In the fine-grained dataset, classes come in families of FINE_FAMILY_SIZE that share the
texture and the shape and differ only in a subtle hue shift of the objects (FINE_HUE_STEP
apart, 18 degrees, with a jitter of FINE_HUE_JITTER inside a class).  Hue is the detail that
survives the training augmentation: RandomResizedCrop can crop away a small mark or change the
count of objects, and ColorJitter changes brightness, contrast and saturation but not hue.
Families (texture, shape, band of hues) are never shared between splits.
"""
import colorsys
import csv
import json
import math
import os
import re
import time
from typing import Dict, Iterable, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw
from base.console import UserError

DEMO_SPLITS: Dict[str, int] = {'train': 20, 'val': 8, 'test': 10}

_FORMAT_VERSION = 2
_MARKER = '.demo_complete'
_JPEG_QUALITY = 90
_LABEL_PREFIX = 'n9'
_FILE_RE = re.compile(r'^n9\d{7}\d{8}\.jpg$')

# The fine-grained sibling: families of classes told apart by the objects' hue only.
FINE_SPLITS: Dict[str, int] = {'train': 4, 'val': 2, 'test': 2}  # families per split
FINE_FAMILY_SIZE = 5
FINE_HUE_STEP = 0.05
FINE_HUE_JITTER = 0.008
_FINE_FORMAT_VERSION = 1
_FINE_LABEL_PREFIX = 'n8'
_FINE_FILE_RE = re.compile(r'^n8\d{7}\d{8}\.jpg$')

# Background textures: (kind, parameter); lengths are in pixels at 84x84 and
# scale with the image size.  Only flip-invariant orientations are used, since
# training applies random horizontal flips.
_TEXTURES: List[Tuple[str, object]] = [
    ('stripes_h', 6.0), ('stripes_h', 12.0),
    ('stripes_v', 6.0), ('stripes_v', 12.0),
    ('stripes_d', 6.0), ('stripes_d', 12.0),
    ('checks', 7.0), ('checks', 14.0),
    ('dots', 9.0), ('dots', 16.0),
    ('blobs', 6),
]
_FG_HUES = [i / 8.0 for i in range(8)]
_SHAPES = ['circle', 'square', 'triangle', 'cross', 'star', 'ring']


def _class_label(index: int, prefix: str = _LABEL_PREFIX) -> str:
    """WordNet-like class id (``n`` and eight digits), e.g. ``n90000001`` for index 1."""
    return f'{prefix}{index:07d}'


def _design_classes(seed: int) -> Dict[str, List[dict]]:
    """Assign a texture and a foreground (hue, shape) to every class of every split.

    Foregrounds are never shared between splits; inside a split, classes come in
    pairs that share a texture.
    """
    rng = np.random.default_rng([seed, 0])
    foregrounds = [(h, s) for h in range(len(_FG_HUES)) for s in range(len(_SHAPES))]
    fg_order = rng.permutation(len(foregrounds))
    if sum(DEMO_SPLITS.values()) > len(foregrounds):
        raise ValueError('DEMO_SPLITS asks for more classes than there are foregrounds')

    design: Dict[str, List[dict]] = {}
    fg_pos = 0
    class_index = 1
    for split, n_classes in DEMO_SPLITS.items():
        n_groups = (n_classes + 1) // 2
        textures = [int(t) for t in rng.permutation(len(_TEXTURES))]
        textures = (textures * (n_groups // len(textures) + 1))[:n_groups]
        classes = []
        for k in range(n_classes):
            fg_hue, shape = foregrounds[fg_order[fg_pos]]
            fg_pos += 1
            classes.append({
                'index': class_index,
                'label': _class_label(class_index),
                'texture': textures[k // 2],
                'fg_hue': fg_hue,
                'shape': shape,
            })
            class_index += 1
        design[split] = classes
    return design


def _design_fine_classes(seed: int) -> Dict[str, List[dict]]:
    """Families of FINE_FAMILY_SIZE classes: one texture, one shape and a band of hues FINE_HUE_STEP
    apart per family; no (texture, shape) pair and no starting hue is used twice."""
    rng = np.random.default_rng([seed, 10])
    n_families = sum(FINE_SPLITS.values())
    pairs = [(t, s) for t in range(len(_TEXTURES)) for s in range(len(_SHAPES))]
    chosen = rng.permutation(len(pairs))[:n_families]
    first_hues = (np.arange(n_families) / n_families)[rng.permutation(n_families)]
    design: Dict[str, List[dict]] = {}
    family, class_index = 0, 1
    for split, n in FINE_SPLITS.items():
        classes = []
        for _ in range(n):
            texture, shape = pairs[chosen[family]]
            for j in range(FINE_FAMILY_SIZE):
                classes.append({'index': class_index, 'label': _class_label(class_index, _FINE_LABEL_PREFIX),
                                'texture': texture, 'shape': shape, 'family': family,
                                'hue': float(first_hues[family] + j * FINE_HUE_STEP) % 1.0,
                                'hue_jitter': FINE_HUE_JITTER})
                class_index += 1
            family += 1
        design[split] = classes
    return design


def _hsv255(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _texture_mask(kind: str, param: object, size: int, rng: np.random.Generator) -> np.ndarray:
    """Float mask in [0, 1] of shape (size, size) for one background texture."""
    scale = size / 84.0
    if kind == 'blobs':
        k = int(param)
        grid = rng.random((k, k)).astype(np.float32)
        up = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
        g = np.asarray(up, dtype=np.float32)
        return np.clip((g - 0.5) * 4.0 + 0.5, 0.0, 1.0)

    period = float(param) * scale * rng.uniform(0.85, 1.15)
    if kind == 'stripes_h':
        angle = 90.0
    elif kind == 'stripes_v':
        angle = 0.0
    elif kind == 'stripes_d':
        angle = 45.0 if rng.random() < 0.5 else 135.0
    else:
        angle = rng.uniform(0.0, 90.0)
    angle = math.radians(angle + rng.uniform(-8.0, 8.0))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    phase_u, phase_v = rng.uniform(0.0, 2.0 * math.pi, size=2)
    w = 2.0 * math.pi / period
    if kind.startswith('stripes'):
        return np.clip(0.5 + 1.5 * np.sin(w * u + phase_u), 0.0, 1.0)
    if kind == 'checks':
        return np.clip(0.5 + 1.5 * np.sin(w * u + phase_u) * np.sin(w * v + phase_v), 0.0, 1.0)
    if kind == 'dots':
        du = np.mod(u + phase_u / w, period) - period / 2.0
        dv = np.mod(v + phase_v / w, period) - period / 2.0
        dist = np.sqrt(du * du + dv * dv)
        return np.clip(0.3 * period - dist + 0.5, 0.0, 1.0)
    raise ValueError(f'unknown texture kind {kind!r}')


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    if shape == 'square':
        angles = [rot + math.pi / 4 + i * math.pi / 2 for i in range(4)]
        radii = [r] * 4
    elif shape == 'triangle':
        angles = [rot + i * 2 * math.pi / 3 for i in range(3)]
        radii = [r] * 3
    elif shape == 'star':
        angles = [rot + i * math.pi / 5 for i in range(10)]
        radii = [r if i % 2 == 0 else 0.42 * r for i in range(10)]
    elif shape == 'cross':
        a = 0.33
        base = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
                (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in base]
    else:
        raise ValueError(f'unknown polygon shape {shape!r}')
    return [(cx + rr * math.cos(t), cy + rr * math.sin(t)) for t, rr in zip(angles, radii)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                rot: float, color: Tuple[int, int, int]) -> None:
    if shape == 'circle':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == 'ring':
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, int(round(0.35 * r))))
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, rot), fill=color)


def _render_image(cls: dict, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one image of class ``cls`` as an RGB PIL image of shape (size, size)."""
    kind, param = _TEXTURES[cls['texture']]
    mask = _texture_mask(kind, param, size, rng)[..., None]

    bg_h = rng.random()  # the background hue carries no class information
    bg_s = rng.uniform(0.2, 0.5)
    light = _hsv255(bg_h, bg_s, rng.uniform(0.8, 0.92))
    dark = _hsv255(bg_h, min(1.0, bg_s + 0.1), rng.uniform(0.4, 0.55))
    canvas = mask * light + (1.0 - mask) * dark

    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    shape = _SHAPES[cls['shape']]
    fg_h = cls['hue'] if 'hue' in cls else _FG_HUES[cls['fg_hue']]
    jitter = cls.get('hue_jitter', 0.03)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(0.11, 0.22) * size
        cx, cy = rng.uniform(0.12, 0.88, size=2) * size
        color = _hsv255(fg_h + rng.uniform(-jitter, jitter), rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))
        _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi),
                    tuple(int(c) for c in color))
    if rng.random() < cls.get('distractor', 0.3):  # distractor object of a random shape and hue
        r = rng.uniform(0.07, 0.13) * size
        cx, cy = rng.uniform(0.1, 0.9, size=2) * size
        color = _hsv255(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
        _draw_shape(draw, _SHAPES[int(rng.integers(len(_SHAPES)))], cx, cy, r,
                    rng.uniform(0, 2 * math.pi), tuple(int(c) for c in color))

    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(3.0, 10.0), size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------ the writers of the two formats
def write_split(root: str, split: str, items: Iterable[Tuple[str, str, Union[Image.Image, np.ndarray]]],
                quality: int = _JPEG_QUALITY) -> int:
    """The folder format: each (filename, label, image) item to ``root/images/<filename>`` (JPEG at
    ``quality`` for .jpg, else by the name's extension), and ``root/split/<split>.csv``: the header
    ``filename,label``, then one row per item. Returns the number of images written."""
    os.makedirs(os.path.join(root, 'images'), exist_ok=True)
    os.makedirs(os.path.join(root, 'split'), exist_ok=True)
    rows = []
    for filename, label, image in items:
        image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        path = os.path.join(root, 'images', filename)
        if filename.lower().endswith(('.jpg', '.jpeg')):
            image.save(path, format='JPEG', quality=quality)
        else:
            image.save(path)
        rows.append((filename, label))
    with open(os.path.join(root, 'split', f'{split}.csv'), 'w', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(['filename', 'label'])
        writer.writerows(rows)
    return len(rows)


# ------------------------------------------------------------------ small datasets of coloured noise
def write_colour_dataset(root: str, classes_per_split: Sequence[int] = (4, 3, 3), images_per_class: int = 6,
                         size: Tuple[int, int] = (100, 90), seed: int = 0) -> str:
    """The folder format with WordNet-like labels (n00000001, ...): each class its own colour plus
    noise, so that a model can tell classes apart; (width, height) ``size``. Returns ``root``."""
    rng = np.random.default_rng(seed)
    wnid = 0
    for split, n_classes in zip(('train', 'val', 'test'), classes_per_split):
        items = []
        for _ in range(n_classes):
            wnid += 1
            label = f'n{wnid:08d}'
            colour = rng.integers(0, 256, 3)
            for i in range(images_per_class):
                pixels = np.clip(colour + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
                items.append((f'{label}{i:08d}.jpg', label, pixels))
        write_split(root, split, items)
    return str(root)


# ------------------------------------------------------------------ the demo
def demo_owns(root: str) -> bool:
    """Whether the demo may write into ``root``: it is missing or empty, or it carries the demo's marker
    (written before anything else, so an interrupted generation is still the demo's)."""
    if not os.path.exists(root):
        return True
    return os.path.isdir(root) and (not os.listdir(root) or os.path.isfile(os.path.join(root, _MARKER)))


def refuse_unowned(roots: Sequence[str]) -> None:
    """Before anything is written: every root is the demo's to write (``demo_owns``), or a ValueError
    naming the first that is not. A user's dataset is never written into."""
    for root in roots:
        if os.path.exists(root) and not os.path.isdir(root):
            raise ValueError(f'the demo writes its data into the folder {root}, but it is a file: choose an empty '
                             f'or new folder')
        if not demo_owns(root):
            raise ValueError(f'{root} is not empty and holds no demo data (no {_MARKER} file): the demo writes only '
                             f'into an empty or new folder or its own, so nothing of yours is overwritten; choose '
                             f'another folder')


def _is_complete(root: str, params: dict) -> bool:
    try:
        with open(os.path.join(root, _MARKER)) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return False
    if stored != params:
        return False
    return all(os.path.isfile(os.path.join(root, 'split', f'{s}.csv')) for s in DEMO_SPLITS)


def _write_dataset(root: str, design: Dict[str, List[dict]], params: dict, file_re: re.Pattern,
                   stream: int, force: bool, what: str, verbose: bool) -> str:
    """Write ``design`` under ``root`` unless a completed dataset with ``params`` is there already.

    Class ``index`` draws from ``default_rng([seed, stream, index])``, so files are byte-identical
    for given parameters. Says what it wrote (or kept) in one line when ``verbose``.
    """
    seed, images_per_class, image_size = params['seed'], params['images_per_class'], params['image_size']
    n_images = images_per_class * sum(len(classes) for classes in design.values())
    counts = ' / '.join(str(len(design[s])) for s in ('train', 'val', 'test'))

    def already_there() -> bool:
        if force or not _is_complete(root, params):
            return False
        if verbose:
            print(f'{what} in {root}: {counts} classes (train / val / test), {n_images} images, already generated')
        return True
    if already_there():
        return root
    refuse_unowned([root])
    image_dir = os.path.join(root, 'images')
    split_dir = os.path.join(root, 'split')
    marker = os.path.join(root, _MARKER)
    os.makedirs(root, exist_ok=True)
    with open(marker, 'a') as lock:  # first: the folder is the demo's; locked while its data is written
        _hold(lock)  # a process writing the same data now (two runs started at once): wait, then use its data
        if already_there():
            return root
        start = time.time()
        with open(marker, 'w') as f:  # the data not yet complete
            json.dump({'complete': False}, f)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(split_dir, exist_ok=True)
        for name in os.listdir(image_dir):  # stale images of an earlier demo dataset only
            if file_re.match(name):
                os.remove(os.path.join(image_dir, name))

        def items(classes: List[dict]):
            for cls in classes:
                rng = np.random.default_rng([seed, stream, cls['index']])
                for j in range(1, images_per_class + 1):
                    yield f"{cls['label']}{j:08d}.jpg", cls['label'], _render_image(cls, image_size, rng)

        for split, classes in design.items():
            write_split(root, split, items(classes))

        with open(marker, 'w') as f:
            json.dump(params, f, sort_keys=True)
    if verbose:
        print(f'{what}: wrote {n_images} images of {image_size}x{image_size} ({counts} classes in train / val / test, '
              f'{images_per_class} each) to {root} in {time.time() - start:.1f} s')
    return root


def _hold(f) -> None:
    """An exclusive flock on ``f`` until it is closed, waiting for the process that holds it (none on Windows)."""
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(f, fcntl.LOCK_EX)


def generate_demo_dataset(root: str, seed: int = 0, images_per_class: int = 50, image_size: int = 84,
                          force: bool = False, verbose: bool = True, kind: str = 'coarse') -> str:
    """Write the demo dataset under ``root`` (mini-ImageNet layout) and return ``root``: the coarse demo, or with
    ``kind='fine'`` its fine-grained sibling (families of FINE_FAMILY_SIZE classes that differ only in the objects'
    hue, 20 / 10 / 10 classes, labels starting with ``n8``). Returns at once when ``root`` already holds a completed
    dataset made with the same parameters, unless ``force``. Output is byte-identical for a given seed."""
    if images_per_class < 1 or image_size < 16:
        raise ValueError('images_per_class must be >= 1 and image_size >= 16')
    params = {'format': _FORMAT_VERSION, 'seed': int(seed), 'images_per_class': int(images_per_class),
              'image_size': int(image_size)}
    if kind == 'coarse':
        return _write_dataset(root, _design_classes(seed), {**params, 'splits': dict(DEMO_SPLITS)}, _FILE_RE, 1, force,
                              'demo data', verbose)
    params.update(kind='fine', format=_FINE_FORMAT_VERSION, families=dict(FINE_SPLITS), family_size=FINE_FAMILY_SIZE,
                  hue_step=FINE_HUE_STEP, hue_jitter=FINE_HUE_JITTER)
    return _write_dataset(root, _design_fine_classes(seed), params, _FINE_FILE_RE, 2, force, 'fine-grained demo data',
                          verbose)


def prepare_demo(args) -> None:
    """Generate the built-in demo data once (deterministic), where --data_path points: one root for
    --demo, two (coarse, then fine) for --demo mixed. A folder that is neither empty nor the demo's is
    refused before anything is written (a user's dataset given by mistake stays as it was)."""
    roots = args.data_path
    wanted = 2 if args.demo == 'mixed' else 1
    if len(roots) != wanted:
        raise UserError(f'--demo mixed writes two roots, the coarse demo then the fine one: give --data_path '
                        f'COARSE FINE (got {len(roots)} root{"s" if len(roots) > 1 else ""})' if wanted == 2 else
                        f'--demo writes one root, got {len(roots)} in --data_path (--demo mixed writes two)')
    try:
        refuse_unowned(roots)
    except ValueError as error:
        raise UserError(f'{error} with --data_path, or drop --demo to use the dataset that is there') from None
    for root, kind in zip(roots, ('coarse', 'fine')):
        try:
            generate_demo_dataset(root, kind=kind)
        except OSError as error:
            raise UserError(f'the demo data cannot be written to {root} ({error.strerror or error}'
                            f'{f": {error.filename}" if error.filename else ""}): run from a folder you can write '
                            f'to, or give --data_path a writable folder') from None

