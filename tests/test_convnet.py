"""Tests for the Conv-4 backbone."""
import torch
import torch.nn as nn

from networks.convnet import ConvNet


def test_output_shape_and_out_dim():
    net = ConvNet().eval()
    assert net.out_dim == 64
    with torch.no_grad():
        out = net(torch.randn(3, 3, 84, 84))
    assert out.shape == (3, 64)


def test_intermediate_map_sizes():
    net = ConvNet().eval()
    shapes = []
    hooks = [block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
             for block in net.encoder]
    with torch.no_grad():
        net(torch.randn(2, 3, 84, 84))
    for h in hooks:
        h.remove()
    assert shapes == [(2, 64, 42, 42), (2, 64, 21, 21), (2, 64, 10, 10), (2, 64, 5, 5)]


def test_block_structure():
    net = ConvNet()
    assert len(net.encoder) == 4
    for block in net.encoder:
        assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
        conv = block[0]
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is not None


def test_state_dict_keys_follow_feat_layout():
    expected = set()
    for i in range(4):
        expected |= {f'encoder.{i}.0.weight', f'encoder.{i}.0.bias'}
        expected |= {f'encoder.{i}.1.{name}' for name in
                     ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')}
    assert set(ConvNet().state_dict().keys()) == expected


def test_final_pool_is_global_max_over_5x5_map():
    torch.manual_seed(0)
    net = ConvNet().eval()
    # Handcrafted input: a bright square, a vertical ramp and a dark bar.
    x = torch.zeros(2, 3, 84, 84)
    x[0, :, 10:30, 50:70] = 2.0
    x[0, 1] += torch.linspace(-1, 1, 84).view(84, 1)
    x[1, 2, 40:44, :] = -3.0
    x[1, 0] += torch.linspace(1, -1, 84).view(1, 84)
    with torch.no_grad():
        feat = x
        for block in net.encoder:
            feat = block(feat)
        expected = feat.amax(dim=(2, 3))
        assert torch.allclose(net(x), expected)
        assert torch.allclose(net(x), net.encoder(x).amax(dim=(2, 3)))
