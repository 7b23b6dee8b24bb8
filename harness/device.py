"""Where and how the numbers are computed: the device, mixed precision, memory layout, seeds and random states."""
import ctypes
from dataclasses import dataclass
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from base.console import UserError


def keep_freed_memory() -> None:
    """Let the C allocator keep freed memory for the next tensors instead of handing it back to the system.

    glibc maps every block over 32 MiB afresh and unmaps it when it is freed, so on the CPU the activations of
    each episode (a Conv-4 episode's first layer alone is 100 MB) were faulted in page by page every time:
    40 % of a training step's CPU time went to the kernel. No number changes, only where memory comes from;
    the process keeps its peak memory until it ends. Nothing is done where the C library is not glibc."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-4, 0)          # M_MMAP_MAX: serve large blocks from the heap, which keeps them when freed
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: hand the heap's free top back only beyond 2 GiB
    except (OSError, AttributeError):
        pass


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


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); make cuDNN deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def random_states() -> dict:
    """The global random states of Python, NumPy and torch (CPU and every CUDA device)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()  # NumPy's key as a tensor: weights_only loads it
    return {'python': random.getstate(), 'numpy': [kind, torch.from_numpy(keys.astype(np.int64)), int(position),
                                                   int(has_gauss), float(cached)],
            'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def place_model(model: nn.Module, args, device: torch.device) -> nn.Module:
    """Move the model to ``device``; several --devices wrap the encoder in DataParallel."""
    model.to(device)
    if args.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    if device.type == 'cuda' and len(args.devices) > 1:
        from harness.distributed import data_parallel
        model.encoder = data_parallel(model.encoder, args.devices)
    return model


def grad_scaler(amp: bool) -> torch.amp.GradScaler:
    """The grad scaler: on with --amp on a GPU without bfloat16 (float16 autocast, whose loss needs it); off, its
    calls are plain: scale(loss) is loss, step(optimizer) is optimizer.step(), unscale_ and update do nothing."""
    return torch.amp.GradScaler('cuda', enabled=amp and not torch.cuda.is_bf16_supported())


@dataclass
class EvalOptions:
    """How evaluation runs: none of these changes a result."""
    device: torch.device
    n_workers: int = 0           # loader workers
    amp: bool = False            # CUDA autocast
    channels_last: bool = False  # encoder memory format
    episode_batch: int = 0       # cached way: episodes computed at once; 0 chooses by memory

    @classmethod
    def from_args(cls, args, device: torch.device) -> 'EvalOptions':
        return cls(device, args.n_workers, args.amp, args.channels_last, args.episode_batch)
