"""Small helpers shared by the entry points: errors, seeding, devices, reporting."""
import functools
import math
import os
import random
import subprocess
import sys
from typing import Callable, Sequence

import numpy as np
import torch


class UserError(Exception):
    """A mistake in the user's data, files or flags: reported in one line, exit code 2."""


def user_message(error: BaseException) -> str:
    """The one-line message of a UserError, also when it crossed a DataLoader worker."""
    text = str(error).strip()
    if 'Original Traceback' in text:  # re-raised from a worker: the last line is 'UserError: msg'
        text = text.splitlines()[-1]
        text = text.split(': ', 1)[1] if 'Error: ' in text else text
    return text.splitlines()[0] if text else type(error).__name__


def exits_cleanly(main: Callable) -> Callable:
    """Turn UserError into 'error: <message>' on stderr and exit code 2, without a traceback.

    A UserError raised in a DataLoader worker is re-raised in the main process as a UserError whose
    message carries the worker's traceback; ``user_message`` keeps its last line.
    """
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f'error: {user_message(error)}', file=sys.stderr)
            sys.exit(2)
    return wrapper


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def select_device(device: str, devices: Sequence[int]) -> torch.device:
    """'auto' -> CUDA when present else the CPU; 'cuda' without a GPU is a user error."""
    if device == 'cpu' or (device == 'auto' and not torch.cuda.is_available()):
        return torch.device('cpu')
    if not torch.cuda.is_available():
        raise UserError('--device cuda was given but no CUDA GPU is available (use --device cpu or auto)')
    n = torch.cuda.device_count()
    bad = [d for d in devices if d < 0 or d >= n]
    if bad:
        raise UserError(f'--devices {bad[0]} does not exist: this machine has {n} CUDA device(s), ids 0..{n - 1}')
    return torch.device(f'cuda:{devices[0]}')


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width (1.96 * std / sqrt(n), population std) of the values."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return float('nan'), float('nan')
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(a.size))


def accuracy_line(name: str, accuracies: Sequence[float], n_way: int, n_shot: int) -> str:
    """'test accuracy: 66.12 ± 0.20 % (5-way 1-shot, 10000 episodes)' from per-episode accuracies in [0, 1]."""
    mean, ci = mean_ci(accuracies)
    return (f'{name} accuracy: {100 * mean:.2f} ± {100 * ci:.2f} % '
            f'({n_way}-way {n_shot}-shot, {len(accuracies)} episodes)')


def git_revision() -> str:
    """Short git revision of the code, 'unknown' outside a checkout."""
    try:
        out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5)
        return out.stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA: bfloat16 where supported, else float16. A no-op when disabled."""
    if not enabled:
        return torch.autocast(device_type=device.type, enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type='cuda', dtype=dtype)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A batch of images on ``device`` (asynchronously from pinned memory), channels-last if asked."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def save_figure(figure, path: str) -> None:
    """Write a matplotlib figure to ``path``, creating its folder (matplotlib is imported by the caller)."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path)
