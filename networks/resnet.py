"""ResNet-12 of FEAT (640-d), with its dropout / DropBlock regularisation and DropBlock ramp."""
import torch
import torch.nn as nn
import torch.nn.functional as F

RAMP_STEPS = 40000  # the drop rate is reached after this many forward passes of a block


def conv3x3(in_planes: int, out_planes: int) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)


def dropblock_keep(drop_rate: float, t: int) -> float:
    """keep = max(1 - drop_rate * t / 40000, 1 - drop_rate) at the t-th forward pass (t >= 1)."""
    return max(1.0 - drop_rate * t / RAMP_STEPS, 1.0 - drop_rate)


def dropblock_gamma(keep: float, block_size: int, feat_size: int) -> float:
    """Seed probability: (1 - keep) / b^2 * f^2 / (f - b + 1)^2 for an f x f map and b x b blocks."""
    return (1.0 - keep) / block_size ** 2 * feat_size ** 2 / (feat_size - block_size + 1) ** 2


def dropblock(x: torch.Tensor, gamma: float, block_size: int) -> torch.Tensor:
    """Drop block_size x block_size squares lying fully inside the map, rescale by elements / kept.

    x: (B, C, H, W). Seeds are drawn with probability gamma on the (H - b + 1, W - b + 1) grid of
    top-left corners; each seed zeroes the b x b square it starts.
    """
    b, c, h, w = x.shape
    seeds = torch.bernoulli(torch.full((b, c, h - block_size + 1, w - block_size + 1), gamma,
                                       device=x.device, dtype=x.dtype))
    # a position is dropped when a seed lies at most block_size - 1 above and to its left
    dropped = F.max_pool2d(F.pad(seeds, [block_size - 1] * 4), kernel_size=block_size, stride=1)  # (B, C, H, W)
    block_mask = 1.0 - dropped
    kept = block_mask.sum().clamp(min=1.0)
    return block_mask * x * (block_mask.numel() / kept)


class BasicBlock(nn.Module):
    """Three 3x3 conv-BN (LeakyReLU 0.1 after the first two and after the residual sum), a 1x1
    conv-BN shortcut, 2x2 max-pooling, then dropout (blocks 1-2) or DropBlock (blocks 3-4) when training.

    ``forward(x, t)``: t is the encoder's forward pass that this one belongs to (1 for the first), which
    sets the DropBlock rate (``dropblock_keep``).
    """

    def __init__(self, in_planes: int, planes: int, drop_rate: float = 0.0, drop_block: bool = False,
                 block_size: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv3x3(planes, planes)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1)
        self.maxpool = nn.MaxPool2d(2)
        self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, bias=False),
                                        nn.BatchNorm2d(planes))
        self.drop_rate, self.drop_block, self.block_size = drop_rate, drop_block, block_size

    def forward(self, x: torch.Tensor, t: int = 1) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.relu(out + self.downsample(x))
        out = self.maxpool(out)
        if self.drop_rate > 0 and self.training:
            if self.drop_block:
                keep = dropblock_keep(self.drop_rate, t)
                gamma = dropblock_gamma(keep, self.block_size, out.size(2))
                out = dropblock(out, gamma, self.block_size)
            else:
                out = F.dropout(out, p=self.drop_rate, training=True)
        return out


class Layer(nn.Sequential):
    """``layer{i}``: one BasicBlock (at key ``0``, as FEAT's state dicts have it), handed the pass count."""

    def forward(self, x: torch.Tensor, t: int = 1) -> torch.Tensor:
        for block in self:
            x = block(x, t)
        return x


class ResNet12(nn.Module):
    """ResNet-12: (B, 3, 84, 84) -> (B, 640). Maps 84 -> 42 -> 21 -> 10 -> 5, then 5x5 average pooling.

    State-dict keys: ``layer{1..4}.0.{conv1,bn1,conv2,bn2,conv3,bn3,downsample.0,downsample.1}.*``.
    ``n_forward`` counts the forward passes (evaluation ones included, the current one too) and drives
    the DropBlock ramp of every block; it starts at 0 in every process and is not part of the state
    dict. DataParallel replicas do not count: ``networks.data_parallel`` counts their call once.
    """
    out_dim = 640

    def __init__(self, drop_rate: float = 0.1, dropblock_size: int = 5):
        super().__init__()
        widths = (64, 160, 320, 640)
        in_planes = 3
        for i, planes in enumerate(widths, start=1):
            block = BasicBlock(in_planes, planes, drop_rate, drop_block=i >= 3, block_size=dropblock_size)
            setattr(self, f'layer{i}', Layer(block))
            in_planes = planes
        self.avgpool = nn.AvgPool2d(5, stride=1)
        self.n_forward = 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='leaky_relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(self, '_is_replica', False):
            self.n_forward += 1
        for i in range(1, 5):
            x = getattr(self, f'layer{i}')(x, self.n_forward)  # -> (B, 640, 5, 5)
        return self.avgpool(x).flatten(1)  # (B, 640)
