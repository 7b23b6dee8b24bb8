"""Backbones and set functions of GLoFA."""
import torch.nn as nn


def build_encoder(network_name: str) -> nn.Module:
    """'resnet' -> ResNet-12 (640-d), 'convnet' -> Conv-4 (64-d). The encoder has ``out_dim``."""
    if network_name == 'resnet':
        from networks.resnet import ResNet12
        return ResNet12()
    if network_name == 'convnet':
        from networks.convnet import ConvNet
        return ConvNet()
    raise ValueError(f'unknown network {network_name!r} (expected resnet or convnet)')


def forward_counters(module: nn.Module) -> list[int]:
    """The forward-pass counters (``n_forward``) of every block that has one, in module order."""
    return [m.n_forward for m in module.modules() if hasattr(m, 'n_forward')]


def set_forward_counters(module: nn.Module, values: list[int]) -> None:
    blocks = [m for m in module.modules() if hasattr(m, 'n_forward')]
    if len(blocks) != len(values):
        raise ValueError(f'{len(values)} counters given for {len(blocks)} blocks')
    for m, v in zip(blocks, values):
        m.n_forward = int(v)


def advance_forward_counters(module: nn.Module, n: int) -> None:
    """Count ``n`` more forward passes, as if the encoder had been called ``n`` more times."""
    for m in module.modules():
        if hasattr(m, 'n_forward'):
            m.n_forward += n
