"""Backbones and set functions of GLoFA."""
import torch.nn as nn


NETWORKS = ('resnet', 'convnet')


def build_encoder(network_name: str) -> nn.Module:
    """'resnet' -> ResNet-12 (640-d), 'convnet' -> Conv-4 (64-d). The encoder has ``out_dim``."""
    if network_name == 'resnet':
        from networks.resnet import ResNet12
        return ResNet12()
    if network_name == 'convnet':
        from networks.convnet import ConvNet
        return ConvNet()
    raise ValueError(f'unknown network {network_name!r} (expected resnet or convnet)')


def _plain(encoder: nn.Module) -> nn.Module:
    return encoder.module if isinstance(encoder, nn.DataParallel) else encoder


def forward_count(encoder: nn.Module) -> int:
    """Forward passes so far of an encoder with a DropBlock ramp (ResNet-12); 0 for one without."""
    return getattr(_plain(encoder), 'n_forward', 0)


def set_forward_count(encoder: nn.Module, n: int) -> None:
    if hasattr(_plain(encoder), 'n_forward'):
        _plain(encoder).n_forward = int(n)


def advance_forward_count(encoder: nn.Module, n: int) -> None:
    """Count ``n`` more forward passes, as if the encoder had been called ``n`` more times."""
    set_forward_count(encoder, forward_count(encoder) + n)


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
