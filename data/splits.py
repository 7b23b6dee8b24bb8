"""The base of the data: a split's readers (``SplitDataset``, the folder form ``FewShotDataset``), split files,
transforms, the episode sampler (shot-major episodes), and the messages about images. The other forms
(``data.forms``), several roots (``data.mixing``), worker processes (``data.workers``) build on it;
``dataloader.py``, the front, opens a split in whichever form and makes the loaders.
"""
import csv
import os
import sys
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from base.console import UserError
try:
    from torchvision import transforms
except RuntimeError as error:  # a torchvision built for another torch: 'operator torchvision::nms does not exist'
    print(f'error: the installed torchvision does not fit torch {torch.__version__} '
          f'({(str(error).strip().splitlines() or [""])[0]}); install the two together: pip install --upgrade torch '
          f'torchvision (CPU-only: add --index-url https://download.pytorch.org/whl/cpu)', file=sys.stderr)
    sys.exit(2)


SPLITS = ('train', 'val', 'test')


# per-channel (mean, std) of the images, in [0, 1] units (--normalization)
NORMALIZATIONS = {
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # the reference (torchvision's ImageNet statistics)
    'feat': (tuple(x / 255 for x in (120.39586422, 115.59361427, 104.54012653)),  # FEAT's ResNet-12 pretraining
             tuple(x / 255 for x in (70.68188272, 68.27635443, 72.54505529))),
}


IMAGE_SIZE = 84


TASK_MIXES = ('class', 'source')


# ------------------------------------------------------------------ transforms
def train_transform(normalization: str = 'imagenet') -> transforms.Compose:
    """RandomResizedCrop(84), ColorJitter(0.4, 0.4, 0.4), horizontal flip, normalisation (ImageNet's by default)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(IMAGE_SIZE),
        transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(*NORMALIZATIONS[normalization]),
    ])


def eval_transform(normalization: str = 'imagenet') -> transforms.Compose:
    """Resize(92), CenterCrop(84), normalisation (ImageNet's by default): deterministic."""
    return transforms.Compose([
        transforms.Resize(92),
        transforms.CenterCrop(IMAGE_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(*NORMALIZATIONS[normalization]),
    ])


# ------------------------------------------------------------------ images
# modes PIL converts to RGB faithfully (8 bits a channel, palettes, alpha dropped, CMYK, YCbCr, ...)
EIGHT_BIT_MODES = ('1', 'L', 'LA', 'La', 'P', 'PA', 'RGB', 'RGBA', 'RGBa', 'RGBX', 'CMYK', 'YCbCr', 'LAB', 'HSV')


def convertible(mode: str) -> bool:
    """Whether ``to_rgb`` converts this PIL mode (16-bit and integer greyscale included)."""
    return mode in EIGHT_BIT_MODES or mode == 'I' or mode.startswith('I;16')


def to_rgb(image: Image.Image, path: str) -> Image.Image:
    """The image as 8-bit RGB. 16-bit greyscale (I;16*, and I as 16-bit PNGs open) is scaled, 65535 -> 255, where
    PIL's own conversion clips it white; a mode without a faithful conversion is refused, naming the file."""
    mode = image.mode
    if mode in EIGHT_BIT_MODES:
        return image.convert('RGB')
    if convertible(mode):
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise UserError(f'image {path} has mode {mode} with values from {values.min()} to {values.max()}: '
                            f'not 16-bit, so it cannot be converted to 8-bit RGB faithfully')
        return Image.fromarray(np.round(values / 257).astype(np.uint8), 'L').convert('RGB')
    raise UserError(f'image {path} has mode {mode}, which cannot be converted to 8-bit RGB faithfully '
                    f'(expected RGB, greyscale of 8 or 16 bits, a palette, CMYK or YCbCr)')


# ------------------------------------------------------------------ split files (folder format)
def split_csv_path(data_path: str, split: str) -> str:
    return os.path.join(data_path, 'split', f'{split}.csv')


def read_split(csv_path: str, strict: bool = True) -> tuple[list[str], list[int], list[str]]:
    """(filenames, integer labels, class names in order of first appearance) of a UTF-8 split CSV: a header, then
    rows of at least filename and label (further fields, as FEAT's CUB split has, are ignored). ``strict`` refuses
    a file without a header or listing an image twice (scripts/check_dataset.py reports them itself)."""
    if os.path.isdir(csv_path):
        raise UserError(f'split file {csv_path} is a folder, not a CSV with rows filename,label')
    if not os.path.isfile(csv_path):
        raise UserError(f'split file {csv_path} not found (expected a CSV with rows filename,label)')
    filenames, labels, class_names = [], [], []
    index, first_line = {}, {}
    try:
        with open(csv_path, newline='', encoding='utf-8-sig') as f:
            rows = list(enumerate(csv.reader(f), start=1))
    except UnicodeDecodeError as error:
        raise UserError(f'split file {csv_path} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x}): '
                        f'save it as UTF-8') from None
    header = rows[0][1] if rows else []
    for line_no, row in rows:
        if line_no == 1 or not row or (len(row) == 1 and not row[0].strip()):
            continue  # header line and blank lines
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise UserError(f"{csv_path}, line {line_no}: expected 'filename,label', got {','.join(row)!r}")
        name, label = row[0].strip(), row[1].strip()
        if os.path.isabs(name) or ('..' in name and os.path.normpath(name).split(os.sep)[0] == '..'):
            raise UserError(f"{csv_path}, line {line_no}: {name!r} leaves the images folder (an absolute path or one "
                            f"through '..'); a row names a file inside images/")
        if strict and name in first_line:
            raise UserError(f'split file {csv_path} lists {name} twice (lines {first_line[name]} and {line_no}): '
                            f'an image listed twice can be its own query; remove the repeated rows')
        first_line.setdefault(name, line_no)
        if label not in index:
            index[label] = len(class_names)
            class_names.append(label)
        filenames.append(name)
        labels.append(index[label])
    if not filenames:
        raise UserError(f'split file {csv_path} lists no images (expected a header, then rows filename,label)')
    error = header_error(csv_path, header, index)
    if strict and error:
        raise UserError(error)
    return filenames, labels, class_names


def header_error(csv_path: str, header: Sequence[str], class_names: Iterable[str]) -> Optional[str]:
    """The line saying that the first line is a row of one of the classes (no header, so it is skipped), or None."""
    if len(header) >= 2 and header[1].strip() in set(class_names):
        return (f'split file {csv_path} has no header: its first line is a row of class {header[1].strip()} '
                f'({header[0].strip()}), which would be skipped; add the line filename,label at the top')
    return None


# ------------------------------------------------------------------ readers
class SplitDataset(Dataset):
    """The images of one split, whatever the form: ``dataset[i]`` -> (image (3, 84, 84), label), and
    ``dataset[(i, seed)]`` with the random transform under that seed, so augmentation depends on the sampler
    alone, not on the workers. A reader sets ``root``, ``split``, ``labels`` (ints), ``class_names``,
    ``location`` (the file that messages name) and ``transform``, and implements ``load_image(i)``."""

    def load_image(self, i: int) -> Image.Image:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def source_names(self) -> list[str]:
        return [os.path.basename(os.path.normpath(self.root))]

    @property
    def sources(self) -> torch.Tensor:
        return torch.zeros(len(self), dtype=torch.long)

    def __getitem__(self, item: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int]:
        x, label, note = self.read(item)
        if note:
            say_notes([(self.location, note)])
        return x, label

    def read(self, item: Union[int, tuple[int, int]]) -> tuple[torch.Tensor, int, Optional[str]]:
        """(image, label, a note about the image or None: ``small_image_note``); workers carry the note."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        i = int(i)
        image = self.load_image(i)
        note = small_image_note(self.image_path(i), image.size)
        if seed is None:
            x = self.transform(image)
        else:  # the transform under its own seed, the process's random state left as it was
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.transform(image)
        return x, self.labels[i], note

    def image_path(self, i: int) -> str:
        return f'{i} of {self.location}'

    def files(self) -> list[str]:
        """Every file the split is read from (the key of its stored embeddings; what no output may be)."""
        return [self.location]


class FewShotDataset(SplitDataset):
    """``images/<file>`` and ``split/{train,val,test}.csv``, as mini-ImageNet and CUB (FEAT's split) come."""

    def __init__(self, data_path: str, split: str, transform: Optional[Callable] = None,
                 check_files: bool = True):
        if not os.path.isdir(data_path):
            raise UserError(missing_root_message(data_path))
        self.root = data_path
        self.image_dir = os.path.join(data_path, 'images')
        if not os.path.isdir(self.image_dir):
            raise UserError(f'image folder {self.image_dir} not found (expected {data_path}/images/<file>)')
        self.split = split
        self.csv_path = self.location = split_csv_path(data_path, split)
        self.filenames, self.labels, self.class_names = read_split(self.csv_path)
        self.transform = transform if transform is not None else eval_transform()
        missing = missing_images(self.image_dir, self.csv_path, self.filenames) if check_files else {}
        if missing:
            raise UserError(next(iter(missing.values())))

    def image_path(self, i: int) -> str:
        return os.path.join(self.image_dir, self.filenames[i])

    def files(self) -> list[str]:
        return [self.csv_path, *(os.path.join(self.image_dir, name) for name in self.filenames)]

    def load_image(self, i: int) -> Image.Image:
        path = self.image_path(i)
        try:
            with Image.open(path) as image:
                return to_rgb(image, path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise UserError(f'image {path} cannot be read or decoded ({too_large(error) or type(error).__name__})') from None


def missing_images(image_dir: str, csv_path: str, filenames: Sequence[str], present: Optional[set] = None) -> dict:
    """{name: the line naming it} for each image ``csv_path`` lists that ``image_dir`` lacks (``present``: its
    listing, when read already), in order: the reader refuses the first, scripts/check_dataset.py lists them all."""
    present = set(os.listdir(image_dir)) if present is None else present
    return {name: f'image {name} listed in {csv_path} is missing from {image_dir}' for name in dict.fromkeys(filenames)
            if name not in present and not os.path.isfile(os.path.join(image_dir, name))}


ARCHIVES = ('.tar', '.tar.gz', '.tgz', '.zip', '.tar.bz2', '.tar.xz')


def missing_root_message(root: str) -> str:
    if os.path.isfile(root):
        if root.lower().endswith(ARCHIVES):
            unpack = f'unzip {root} -d DIR' if root.lower().endswith('.zip') else f'tar -xf {root} -C DIR'
            return (f'{root} is an archive, not a data folder: unpack it first ({unpack}) and give --data_path the '
                    f'folder that holds images/ and split/')
        return f'{root} is a file, not a data folder (expected a folder holding images/ and split/{{train,val,test}}.csv)'
    return (f'data folder {root} not found (expected images/ and split/{{train,val,test}}.csv, or tiered-ImageNet\'s '
            f'{{train,val,test}}_images.npz and _labels.pkl)')


# ------------------------------------------------------------------ episodes
def episode_problems(per_class: Sequence[int], class_names: Optional[Sequence[str]], n_way: int, n_per_class: int,
                     split: str) -> list[str]:
    """What keeps a split (``per_class``: its images per class) from N-way episodes of K + Q images a class, one line
    each: the sampler refuses the first, scripts/check_dataset.py lists them all."""
    problems = [f'{split}: {len(per_class)} classes, fewer than N = {n_way} classes per episode'] \
        if n_way > len(per_class) else []
    return problems + [f'class {class_names[c] if class_names is not None else c} has {n} images, fewer than K + Q = '
                       f'{n_per_class} needed per episode ({split})' for c, n in enumerate(per_class) if n < n_per_class]


class EpisodeSampler:
    """Yields ``n_episodes`` episodes, each an index tensor of n_way * n_per_class images.

    N distinct classes are drawn uniformly, then n_per_class = K + Q distinct images of each, all from
    ``generator``. Shot-major: position ``s * N + n`` holds image ``s`` of class ``n``; the first N*K are the
    support set, the remaining N*Q the queries, and the target of query j is ``j % N``.
    """

    def __init__(self, labels: Sequence[int], n_episodes: int, n_way: int, n_per_class: int,
                 generator: Optional[torch.Generator] = None, class_names: Optional[Sequence[str]] = None,
                 split: str = 'split'):
        labels = torch.as_tensor(labels, dtype=torch.long)
        n_classes = int(labels.max()) + 1 if labels.numel() else 0
        self.class_indices = [torch.nonzero(labels == c).flatten() for c in range(n_classes)]
        self.n_episodes, self.n_way, self.n_per_class = n_episodes, n_way, n_per_class
        self.generator = generator
        problems = episode_problems([len(i) for i in self.class_indices], class_names, n_way, n_per_class, split)
        if problems:
            raise UserError(problems[0])

    def __len__(self) -> int:
        return self.n_episodes

    def episode(self, classes: torch.Tensor) -> torch.Tensor:
        """(N,) classes -> (N * S,) indices, shot-major: S distinct images of each class."""
        g = self.generator
        grid = torch.stack([self.class_indices[c][torch.randperm(len(self.class_indices[c]), generator=g)
                                                  [:self.n_per_class]] for c in classes])  # (N, S)
        return grid.t().reshape(-1)  # (S * N,): position s*N + n = image s of class n

    def sample(self) -> torch.Tensor:
        """One episode: (N * S,) indices, shot-major; N classes drawn uniformly from all."""
        classes = torch.randperm(len(self.class_indices), generator=self.generator)[:self.n_way]
        return self.episode(classes)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.n_episodes):
            yield self.sample()


def query_targets(n_way: int, n_query: int, device: torch.device = None) -> torch.Tensor:
    """Targets of the N*Q queries in shot-major order: j % N."""
    return torch.arange(n_way * n_query, device=device) % n_way


SMALL_SIDE = IMAGE_SIZE // 2  # an image whose smaller side is under this is upscaled without detail (a warning)


def small_image_note(path: str, size: tuple[int, int]) -> Optional[str]:
    """'image X is 1x1, far below the 84 x 84 input...' for an image whose smaller side is under SMALL_SIDE."""
    if min(size) >= SMALL_SIDE:
        return None
    return (f'warning: image {path} is {size[0]}x{size[1]}, far below the {IMAGE_SIZE} x {IMAGE_SIZE} input: it is '
            f'scaled up without any detail (said once per dataset; scripts/check_dataset.py lists every such image)')


_said: set = set()  # the datasets whose note this process has said


def say_notes(notes: list[tuple[str, str]]) -> None:
    """Print the first note of each dataset (key) once per process (the main one reads every batch)."""
    for key, note in notes:
        if key not in _said:
            _said.add(key)
            print(note, file=sys.stderr)


def too_large(error: Exception) -> Optional[str]:
    """PIL's refusal of an image whose header claims more pixels than its limit (a decompression bomb), in words."""
    if isinstance(error, Image.DecompressionBombError):
        return f'its header claims more pixels than PIL reads ({str(error).split(" pixels")[0].split("(")[-1]} pixels)'
    return None
