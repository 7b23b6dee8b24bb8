"""The one module that knows about several devices: torch.distributed for pretraining, and train.py's --devices
(DataParallel, with the encoder's passes counted once each).

``torchrun --nproc_per_node G script.py`` gives each of its G processes RANK, LOCAL_RANK and WORLD_SIZE (and
MASTER_ADDR, MASTER_PORT) in its environment. A plain ``python script.py`` is rank 0 of 1, and no function here
touches torch.distributed for it.
"""
import os
from typing import Any

import torch
import torch.nn as nn

from base.console import ProcessError, UserError
from networks import advance_forward_count


def launched() -> bool:
    """True in a process started by torchrun (or anything else that sets its environment variables)."""
    return all(name in os.environ for name in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))


def _env(name: str, single: int) -> int:
    """The torchrun variable ``name``; ``single`` in a plain process."""
    if not launched():
        return single
    try:
        return int(os.environ[name])
    except ValueError:
        raise UserError(f'environment variable {name}={os.environ[name]!r} is not an integer (torchrun sets it)') from None


def rank() -> int:
    return _env('RANK', 0)


def local_rank() -> int:
    return _env('LOCAL_RANK', 0)


def world_size() -> int:
    return _env('WORLD_SIZE', 1)


def is_main_process() -> bool:
    """Rank 0: the process that prints, logs and writes files."""
    return rank() == 0


def _initialized() -> bool:
    return launched() and torch.distributed.is_available() and torch.distributed.is_initialized()


def setup(device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU); this process's device: CUDA device LOCAL_RANK
    under torchrun, ``device`` otherwise."""
    if not launched():
        return device
    if device.type == 'cuda':
        if local_rank() >= torch.cuda.device_count():
            raise ProcessError(f'process {rank()} has LOCAL_RANK {local_rank()}, but this machine has '
                               f'{torch.cuda.device_count()} CUDA device(s): lower --nproc_per_node')
        device = torch.device('cuda', local_rank())
        torch.cuda.set_device(device)
        torch.distributed.init_process_group('nccl', device_id=device)
    else:
        torch.distributed.init_process_group('gloo')
    return device


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` (on ``device``) under torchrun, with SyncBatchNorm if ``sync_bn``;
    ``model`` itself otherwise."""
    if not launched():
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == 'cuda' else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (its state dict has the plain keys)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums of ``values`` over all processes."""
    if not _initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(obj: Any) -> list:
    """``obj`` of every process, in rank order."""
    if not _initialized():
        return [obj]
    gathered = [None] * world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier()


def cleanup() -> None:
    if _initialized():
        torch.distributed.destroy_process_group()


class _CountingDataParallel(nn.DataParallel):
    """DataParallel that counts each call once on the wrapped encoder; its replicas (thrown away after
    the call) see the count and do not advance it."""

    def forward(self, *inputs, **kwargs):
        if len(self.device_ids) > 1:
            advance_forward_count(self.module, 1)
        return super().forward(*inputs, **kwargs)


def data_parallel(encoder: nn.Module, device_ids: list[int]) -> nn.Module:
    """The encoder split over several CUDA devices, its forward passes counted as one each."""
    return _CountingDataParallel(encoder, device_ids=device_ids)
