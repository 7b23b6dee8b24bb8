"""ResNet-12 of FEAT: shapes, state-dict keys, initialisation, dropout / DropBlock and its ramp."""
import math

import pytest
import torch
import torch.nn as nn

import networks
import networks.resnet as resnet
from harness.distributed import data_parallel
from networks.resnet import BasicBlock, ResNet12, dropblock, dropblock_gamma, dropblock_keep

WIDTHS = (64, 160, 320, 640)


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return ResNet12()


def test_output_and_intermediate_sizes(net):
    sizes = {}
    hooks = [getattr(net, f'layer{i}').register_forward_hook(
        lambda m, inp, out, i=i: sizes.__setitem__(i, tuple(out.shape))) for i in range(1, 5)]
    try:
        net.eval()
        with torch.no_grad():
            out = net(torch.randn(2, 3, 84, 84))
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (2, 640)
    assert sizes == {1: (2, 64, 42, 42), 2: (2, 160, 21, 21), 3: (2, 320, 10, 10), 4: (2, 640, 5, 5)}
    assert ResNet12.out_dim == 640


def test_state_dict_keys_and_shapes(net, spec_encoder_keys):
    sd = net.state_dict()
    assert set(sd) == spec_encoder_keys
    in_planes = 3
    for i, planes in enumerate(WIDTHS, start=1):
        p = f'layer{i}.0.'
        assert sd[p + 'conv1.weight'].shape == (planes, in_planes, 3, 3)
        assert sd[p + 'conv2.weight'].shape == (planes, planes, 3, 3)
        assert sd[p + 'conv3.weight'].shape == (planes, planes, 3, 3)
        assert sd[p + 'downsample.0.weight'].shape == (planes, in_planes, 1, 1)
        for bn in ('bn1', 'bn2', 'bn3', 'downsample.1'):
            assert sd[p + bn + '.weight'].shape == (planes,)
        in_planes = planes


def test_convolutions_have_no_bias_and_the_right_geometry(net):
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16
    for m in convs:
        assert m.bias is None
        assert m.stride == (1, 1)
        if m.kernel_size == (3, 3):
            assert m.padding == (1, 1)
        else:
            assert m.kernel_size == (1, 1)


def test_kaiming_normal_fan_out_initialisation():
    torch.manual_seed(1)
    net = ResNet12()
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            w = m.weight.detach()
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            expected = math.sqrt(2.0 / fan_out)  # gain sqrt(2) of leaky_relu with a = 0
            tolerance = 0.1 if w.numel() >= 1000 else 0.2
            assert abs(w.std().item() / expected - 1) < tolerance, name
            assert abs(w.mean().item()) < 0.1 * expected + 3 * expected / math.sqrt(w.numel()), name
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight.detach(), torch.ones_like(m.weight)), name
            assert torch.equal(m.bias.detach(), torch.zeros_like(m.bias)), name


def test_block_structure(net):
    for i in range(1, 5):
        block = getattr(net, f'layer{i}')[0]
        assert isinstance(block, BasicBlock)
        assert isinstance(block.relu, nn.LeakyReLU) and block.relu.negative_slope == pytest.approx(0.1)


def test_block_computation_by_hand():
    """conv-BN-leaky, conv-BN-leaky, conv-BN, + (1x1 conv-BN) shortcut, leaky, 2x2 max-pool."""
    torch.manual_seed(2)
    block = BasicBlock(4, 6, drop_rate=0.1, drop_block=False).double().eval()
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def bn(m, y):
        return ((y - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps)
                * m.weight[:, None, None] + m.bias[:, None, None])

    def leaky(y):
        return torch.where(y > 0, y, 0.1 * y)

    conv = torch.nn.functional.conv2d
    out = leaky(bn(block.bn1, conv(x, block.conv1.weight, padding=1)))
    out = leaky(bn(block.bn2, conv(out, block.conv2.weight, padding=1)))
    out = bn(block.bn3, conv(out, block.conv3.weight, padding=1))
    out = leaky(out + bn(block.downsample[1], conv(x, block.downsample[0].weight)))
    out = out.view(2, 6, 4, 2, 4, 2).amax(dim=(3, 5))
    with torch.no_grad():
        torch.testing.assert_close(block(x), out, rtol=1e-10, atol=1e-10)


def test_average_pooling_of_the_last_map(net):
    captured = {}
    handle = net.layer4.register_forward_hook(lambda m, inp, out: captured.__setitem__('map', out))
    try:
        net.eval()
        with torch.no_grad():
            out = net(torch.randn(1, 3, 84, 84))
    finally:
        handle.remove()
    torch.testing.assert_close(out, captured['map'].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ DropBlock ramp
@pytest.mark.parametrize('t, keep', [(1, 0.9999975), (20000, 0.95), (40000, 0.9), (80000, 0.9),
                                     (10000, 0.975), (39999, 0.9000025)])
def test_dropblock_keep_ramp(t, keep):
    assert dropblock_keep(0.1, t) == pytest.approx(keep, rel=0, abs=1e-12)
    assert dropblock_keep(0.1, t) == pytest.approx(max(1 - 0.1 * t / 40000, 0.9), rel=0, abs=1e-12)


@pytest.mark.parametrize('keep, f, gamma', [
    (0.9, 10, 0.1 / 25 * 100 / 36),  # = 1 / 90
    (0.9, 5, 0.1 / 25 * 25 / 1),     # = 0.1
    (0.95, 10, 0.05 / 25 * 100 / 36),  # = 1 / 180
    (0.95, 5, 0.05),
])
def test_dropblock_gamma(keep, f, gamma):
    assert dropblock_gamma(keep, 5, f) == pytest.approx(gamma, rel=1e-12)


def test_dropblock_gamma_written_out():
    assert dropblock_gamma(0.9, 5, 10) == pytest.approx(0.011111111111, rel=1e-9)
    assert dropblock_gamma(0.9, 5, 5) == pytest.approx(0.1, rel=1e-12)


# ------------------------------------------------------------------ forward counters
def test_one_counter_starts_at_zero_and_counts_every_pass():
    net = ResNet12()
    assert net.n_forward == 0
    x = torch.randn(1, 3, 84, 84)
    net.train()
    with torch.no_grad():
        net(x)
    assert net.n_forward == 1
    net.eval()
    with torch.no_grad():
        net(x)
        net(x)
    assert net.n_forward == 3
    assert not any(hasattr(b, 'n_forward') for b in net.modules() if b is not net)  # one counter, on the network
    assert 'n_forward' not in ''.join(net.state_dict())
    assert ResNet12().n_forward == 0  # a new process / model starts again


def test_data_parallel_replicas_see_the_count_and_do_not_advance_it(monkeypatch):
    """A DataParallel replica (a shallow copy made for each call) runs its blocks at the original's
    count; the wrapper counts the call once on the original."""
    net = ResNet12().train()
    net.n_forward = 19999
    seen = []
    monkeypatch.setattr(resnet, 'dropblock_keep', lambda rate, t: seen.append(t) or 1.0)
    replica = net._replicate_for_data_parallel()  # what nn.DataParallel makes per device and call
    with torch.no_grad():
        replica(torch.randn(1, 3, 84, 84))
    assert net.n_forward == 19999 and seen == [19999, 19999]  # blocks 3 and 4 at the count they were given
    wrapped = data_parallel(net, device_ids=[0, 1])
    wrapped.device_ids = [0, 1]  # as on two GPUs; the call itself needs them, the counting does not
    advance = networks.advance_forward_count
    calls = []
    import harness.distributed
    monkeypatch.setattr(harness.distributed, 'advance_forward_count', lambda m, n: calls.append((m, n)) or advance(m, n))
    monkeypatch.setattr(nn.DataParallel, 'forward', lambda self, *a, **k: None)
    wrapped(torch.randn(2, 3, 84, 84))
    assert calls == [(net, 1)] and net.n_forward == 20000 and networks.forward_count(wrapped) == 20000


def test_gamma_follows_the_counter_and_the_map_size(monkeypatch):
    """Blocks 3-4 draw DropBlock seeds with gamma from the t-th pass; blocks 1-2 use dropout 0.1."""
    calls = []
    real_dropblock = resnet.dropblock

    def recording_dropblock(x, gamma, block_size):
        calls.append(('dropblock', x.size(2), gamma, block_size))
        return real_dropblock(x, gamma, block_size)

    real_dropout = resnet.F.dropout

    def recording_dropout(x, p=0.5, training=True, inplace=False):
        calls.append(('dropout', x.size(2), p, training))
        return real_dropout(x, p, training, inplace)

    monkeypatch.setattr(resnet, 'dropblock', recording_dropblock)
    monkeypatch.setattr(resnet.F, 'dropout', recording_dropout)
    net = ResNet12().train()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        net(x)
    keep1 = 1 - 0.1 / 40000
    assert calls == [('dropout', 42, 0.1, True), ('dropout', 21, 0.1, True),
                     ('dropblock', 10, pytest.approx((1 - keep1) / 25 * 100 / 36, rel=1e-9), 5),
                     ('dropblock', 5, pytest.approx((1 - keep1) / 25 * 25, rel=1e-9), 5)]
    calls.clear()
    net.n_forward = 19999  # the next pass is the 20000th: keep = 0.95
    with torch.no_grad():
        net(x)
    assert calls[2] == ('dropblock', 10, pytest.approx(0.05 / 25 * 100 / 36, rel=1e-9), 5)
    assert calls[3] == ('dropblock', 5, pytest.approx(0.05, rel=1e-9), 5)
    calls.clear()
    net.eval()
    with torch.no_grad():
        net(x)
    assert calls == [], 'no regularisation in eval mode'


# ------------------------------------------------------------------ eval mode
def test_eval_output_is_deterministic_and_free_of_dropping():
    torch.manual_seed(3)
    net = ResNet12()
    net.train()
    with torch.no_grad():
        net(torch.randn(4, 3, 84, 84))  # non-trivial running statistics
    plain = ResNet12(drop_rate=0.0)
    plain.load_state_dict(net.state_dict())
    net.n_forward = 100000  # full drop rate, were it training
    net.eval()
    plain.eval()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        a, b, c = net(x), net(x), plain(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


# ------------------------------------------------------------------ dropblock itself
def assert_zeros_are_whole_inside_squares(mask: torch.Tensor, b: int) -> None:
    """mask: (H, W) booleans of zeroed positions; it must be a union of b x b squares inside the map."""
    h, w = mask.shape
    covered = torch.zeros_like(mask)
    for i in range(h - b + 1):
        for j in range(w - b + 1):
            if mask[i:i + b, j:j + b].all():
                covered[i:i + b, j:j + b] = True
    assert torch.equal(covered, mask), f'zeros that are not whole {b}x{b} squares inside the map:\n{mask.int()}'


def test_dropblock_zeroes_whole_squares_and_rescales():
    x = torch.ones(2, 3, 10, 10)
    n_with_drops = 0
    for seed in range(12):
        torch.manual_seed(seed)
        y = dropblock(x, 0.02, 5)
        assert y.shape == x.shape
        zero = y == 0
        kept = int((~zero).sum())
        if 0 < kept < x.numel():
            n_with_drops += 1
        if kept:
            assert torch.allclose(y[~zero], torch.full((kept,), x.numel() / kept)), 'rescale by numel / kept'
        for bi in range(2):
            for ci in range(3):
                assert_zeros_are_whole_inside_squares(zero[bi, ci], 5)
    assert n_with_drops >= 6


def test_dropblock_squares_are_independent_per_channel():
    torch.manual_seed(0)
    y = dropblock(torch.ones(4, 16, 10, 10), 0.02, 5)
    zero = (y == 0).flatten(2)  # (B, C, H*W)
    assert not (zero == zero[:, :1]).all(), 'each channel draws its own blocks'


def test_dropblock_with_gamma_zero_is_the_identity():
    x = torch.randn(2, 4, 10, 10)
    torch.manual_seed(0)
    assert torch.equal(dropblock(x, 0.0, 5), x)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(dropblock(x, 0.0, 5), x)


def test_dropblock_on_a_5x5_map_drops_whole_maps():
    torch.manual_seed(4)
    y = dropblock(torch.ones(64, 8, 5, 5), 0.1, 5)
    zero = (y == 0).flatten(2)
    per_map = zero.sum(-1)
    assert set(per_map.unique().tolist()) <= {0, 25}
    assert 0.05 < (per_map == 25).float().mean().item() < 0.15  # seed probability 0.1, one position


# ------------------------------------------------------------------ regularisation in the blocks
def test_blocks_1_and_2_use_dropout_0_1():
    torch.manual_seed(5)
    net = ResNet12().train()
    x = torch.randn(8, 3, 40, 40)
    block1 = net.layer1[0]
    with torch.no_grad():
        out = block1(x)  # (8, 64, 20, 20) = 204800 values
        assert abs((out == 0).float().mean().item() - 0.1) < 0.01
        block2 = net.layer2[0]
        out2 = block2(torch.randn(8, 64, 20, 20))
        assert abs((out2 == 0).float().mean().item() - 0.1) < 0.01
        block1.eval()
        assert (block1(x) == 0).sum() == 0


def test_blocks_3_and_4_use_dropblock_of_size_5():
    torch.manual_seed(6)
    net = ResNet12().train()
    block3, block4 = net.layer3[0], net.layer4[0]
    with torch.no_grad():  # at the 40000th pass: the full drop rate
        out3 = block3(torch.randn(4, 160, 20, 20), 40000)  # (4, 320, 10, 10)
        out4 = block4(torch.randn(4, 320, 10, 10), 40000)  # (4, 640, 5, 5)
    assert out3.shape == (4, 320, 10, 10) and out4.shape == (4, 640, 5, 5)
    zero3 = out3 == 0
    assert zero3.any()
    for bi in range(4):
        for ci in range(0, 320, 8):
            assert_zeros_are_whole_inside_squares(zero3[bi, ci], 5)
    per_map4 = (out4 == 0).flatten(2).sum(-1)
    assert set(per_map4.unique().tolist()) <= {0, 25}
    # gamma = 0.1 on a 5x5 map: about a tenth of the maps vanish
    assert 0.07 < (per_map4 == 25).float().mean().item() < 0.13
