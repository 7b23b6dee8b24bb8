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
