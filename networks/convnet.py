"""Conv-4 backbone (four conv-BN-ReLU-maxpool blocks) with FEAT's state-dict layout."""
import torch
import torch.nn as nn


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv (with bias) -> BatchNorm -> ReLU -> 2x2 max-pool; halves H and W (floor)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class ConvNet(nn.Module):
    """Four-block convolutional embedding network.

    Shapes for an 84x84 input:
        (B, in_channels, 84, 84) -> block 1 -> (B, hid_dim, 42, 42)
                                 -> block 2 -> (B, hid_dim, 21, 21)
                                 -> block 3 -> (B, hid_dim, 10, 10)
                                 -> block 4 -> (B, out_dim, 5, 5)
                                 -> 5x5 max-pool + flatten -> (B, out_dim)

    The parameters live in ``self.encoder`` so that the state-dict keys are
    ``encoder.{0,1,2,3}.{0,1}.*`` (index 0 is the convolution, 1 the BatchNorm).
    """

    def __init__(self, in_channels: int = 3, hid_dim: int = 64, out_dim: int = 64) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.encoder = nn.Sequential(
            _conv_block(in_channels, hid_dim),
            _conv_block(hid_dim, hid_dim),
            _conv_block(hid_dim, hid_dim),
            _conv_block(hid_dim, out_dim),
        )
        self.pool = nn.MaxPool2d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (B, C, 84, 84) to embeddings (B, out_dim)."""
        x = self.encoder(x)          # (B, out_dim, 5, 5)
        x = self.pool(x)             # (B, out_dim, 1, 1)
        return x.flatten(1)          # (B, out_dim)
