"""The demo preset, Conv-4 weight loading, and a shortened demo run through the command line."""
import os
import re
import subprocess
import sys

import pytest
import torch
from harness import checkpoints, demo, runs
from arguments import parse_args
from arguments import DEMO_PRESET, DEMO_ROOTS
from harness.checkpoints import load_pretrained
from models.glofa import GLoFA
from networks.convnet import ConvNet
from base.console import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_preset_and_explicit_flags_win():
    args = parse_args(['--demo'])
    for key, value in DEMO_PRESET.items():
        assert getattr(args, key) == value
    args = parse_args(['--demo', '--Q', '3', '--network_name', 'resnet'])
    assert args.Q == 3 and args.network_name == 'resnet' and args.lr_network == DEMO_PRESET['lr_network']
    assert parse_args(['--demo', 'coarse']) == parse_args(['--demo'])
    default = parse_args([])  # the paper's defaults stay the defaults
    assert (default.network_name, default.Q, default.lr_network, default.pretrained) == \
        ('resnet', 15, 0.0001, 'pretrained_weights.pth')


@pytest.mark.parametrize('prefix', ['encoder.', '', 'module.encoder.'])
def test_conv4_loads_feat_weights_with_or_without_prefix(tmp_path, prefix):
    source = ConvNet()
    for p in source.parameters():
        torch.nn.init.normal_(p)
    state = {prefix + k: v for k, v in source.state_dict().items()}
    state.update({'fc.weight': torch.zeros(64, 64), 'fc.bias': torch.zeros(64)})  # a classifier, dropped
    path = tmp_path / 'con-pre.pth'
    torch.save({'params': state}, path)
    target = ConvNet()
    assert load_pretrained(target, str(path)) == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_conv4_refuses_resnet_weights(tmp_path):
    from networks.resnet import ResNet12
    path = tmp_path / 'res12.pth'
    torch.save({'params': {'encoder.' + k: v for k, v in ResNet12().state_dict().items()}}, path)
    with pytest.raises(UserError, match='lacks key encoder.0.0.weight'):
        load_pretrained(ConvNet(), str(path))


def test_channels_last_gives_the_same_logits():
    torch.manual_seed(0)
    model = GLoFA(ConvNet(), 64).eval()
    images = torch.randn(2 * 3, 3, 84, 84)
    with torch.no_grad():
        plain = model.episode(model.encode(images), 2, 1)[0]
        model.encoder.to(memory_format=torch.channels_last)
        fast = model.episode(model.encode(images.contiguous(memory_format=torch.channels_last)), 2, 1)[0]
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_shortened_demo_runs_end_to_end(tmp_path):
    flags = ['--demo', '--data_path', str(tmp_path / 'demo'), '--save_dir', str(tmp_path / 'saves'),
             '--n_training_episodes', '8', '--episode_gap', '4', '--n_validating_episodes', '5',
             '--n_testing_episodes', '30', '--n_workers', '0']
    run = subprocess.run([sys.executable, 'train.py', *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert os.path.isfile(tmp_path / 'demo' / 'split' / 'test.csv')
    line = [s for s in run.stdout.splitlines() if s.startswith('test accuracy:')]
    assert line and line[0].endswith('(5-way 1-shot, 30 episodes)')
    again = subprocess.run([sys.executable, 'test.py', *flags], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert line[0] in again.stdout.splitlines()  # test.py --demo re-evaluates the same checkpoint, same episodes


def test_mixed_demo_preset_and_run_names():
    args = parse_args(['--demo', 'mixed'])
    for key, value in {**DEMO_PRESET, **DEMO_ROOTS['mixed']}.items():
        assert getattr(args, key) == value
    assert args.data_path == [os.path.join('datasets', 'demo'), os.path.join('datasets', 'demo_fine')]
    assert re.fullmatch(r'demo\+demo_fine-mixclass-convnet-glofa-N5-K1-seed960402-[0-9a-f]{8}', runs.run_name(args))
    args = parse_args(['--demo', 'mixed', '--task_mix', 'source', '--adaptor', 'task', '--h_bias_init', '1'])
    assert runs.run_name(args).startswith('demo+demo_fine-mixsource-convnet-glofa-task-hbias1-N5-K1-seed960402-')
    assert runs.run_name(args) != runs.run_name(parse_args(['--demo', 'mixed', '--task_mix', 'source',
                                                            '--adaptor', 'task', '--h_bias_init', '2']))
    # one root: the data path is a list, and the mix changes nothing, so not the run either
    names = set()
    for argv in ([], ['--task_mix', 'source']):
        args = parse_args(argv)
        assert len(args.data_path) == 1
        names.add(runs.run_name(args))
    assert len(names) == 1 and names.pop().startswith('mini_imagenet-resnet-glofa-N5-K1-seed960402-')
    assert runs.run_name(parse_args(['--data_path', 'somewhere/else'])).startswith('else-resnet-glofa-N5-K1-')
    assert runs.run_name(parse_args(['--data_path', 'x/data', 'y/data'])).startswith('x_data+y_data-mixclass-')


@pytest.mark.parametrize('argv, message', [
    (['--demo', 'mixed', '--data_path', 'only_one'], '--demo mixed writes two roots'),
    (['--demo', '--data_path', 'a', 'b'], '--demo writes one root, got 2'),
])
def test_demo_refuses_the_wrong_number_of_roots(argv, message):
    with pytest.raises(UserError, match=message):
        demo.prepare_demo(parse_args(argv))


def test_h_bias_init_reaches_the_model():
    model = checkpoints.build_model(parse_args(['--demo', '--h_bias_init', '0.75']), pretrained=False)
    assert torch.equal(model.h.rho[2].bias.detach(), torch.full((2,), 0.75))
