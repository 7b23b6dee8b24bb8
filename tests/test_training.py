"""Optimiser, schedule, command-line flags and run names of train.py."""
import argparse
import os
import re

import pytest
import torch
from harness import checkpoints, runs
from arguments import get_parser, parse_args



@pytest.fixture(scope='module')
def model():
    return checkpoints.build_model(parse_args(['--pretrained', 'none']))


def ids(params) -> list[int]:
    return [id(p) for p in params]


def test_optimizer_groups(model):
    args = parse_args([])
    optimizer = checkpoints.build_optimizer(args, model)
    assert isinstance(optimizer, torch.optim.SGD)
    assert len(optimizer.param_groups) == 2
    encoder_group, set_group = optimizer.param_groups
    assert ids(encoder_group['params']) == ids(model.encoder.parameters())
    set_params = [p for f in (model.f_task, model.f_class, model.h) for p in f.parameters()]
    assert sorted(ids(set_group['params'])) == sorted(ids(set_params))
    assert len(set_group['params']) == 3 * 8
    # every parameter of the model in exactly one group
    assert sorted(ids(encoder_group['params']) + ids(set_group['params'])) == sorted(ids(model.parameters()))
    assert encoder_group['lr'] == pytest.approx(1e-4, rel=1e-12)
    assert set_group['lr'] == pytest.approx(1e-2, rel=1e-12)
    for group in optimizer.param_groups:
        assert group['momentum'] == pytest.approx(0.9, rel=1e-12)
        assert group['nesterov'] is True
        assert group['weight_decay'] == pytest.approx(5e-4, rel=1e-12)
        assert group['dampening'] == 0


def test_optimizer_follows_the_flags(model):
    args = parse_args(['--lr_network', '0.003', '--lr', '0.07', '--mo', '0.8', '--wd', '0.001'])
    optimizer = checkpoints.build_optimizer(args, model)
    assert [g['lr'] for g in optimizer.param_groups] == pytest.approx([0.003, 0.07])
    assert [g['momentum'] for g in optimizer.param_groups] == pytest.approx([0.8, 0.8])
    assert [g['weight_decay'] for g in optimizer.param_groups] == pytest.approx([0.001, 0.001])


def test_multistep_schedule_counts_validations():
    args = parse_args([])
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{'params': [weights[0]], 'lr': args.lr_network},
                                 {'params': [weights[1]], 'lr': args.lr}], lr=args.lr, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=args.point, gamma=args.gamma)  # as train.py
    expected = {0: 1e-2, 19: 1e-2, 20: 2e-3, 29: 2e-3, 30: 4e-4, 39: 4e-4, 40: 8e-5, 60: 8e-5}
    for step in range(61):
        if step in expected:
            assert optimizer.param_groups[1]['lr'] == pytest.approx(expected[step], rel=1e-9), step
            assert optimizer.param_groups[0]['lr'] == pytest.approx(expected[step] / 100, rel=1e-9), step
        optimizer.step()
        scheduler.step()


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_every_flag_has_help():
    for action in flag_actions(get_parser()):
        assert action.help and action.help.strip(), f'{action.option_strings} has no help text'


def test_original_flag_names_are_accepted():
    args = parse_args(['--data_name', 'x', '--network_name', 'resnet', '--model_name', 'glofa', '--N', '3',
                       '--K', '2', '--Q', '4', '--devices', '0', '1', '--lr_network', '0.5', '--lr', '0.25',
                       '--point', '2', '3', '--gamma', '0.5', '--wd', '0', '--mo', '0.5',
                       '--n_training_episodes', '7', '--n_validating_episodes', '8', '--n_testing_episodes', '9',
                       '--episode_gap', '6', '--tau', '0.5', '--delta', '0.3', '--seed', '1',
                       '--save_dir', 'elsewhere', '--pretrained', 'w.pth', '--flag_debug'])
    assert (args.N, args.K, args.Q, args.devices, args.point) == (3, 2, 4, [0, 1], [2, 3])
    assert (args.tau, args.delta, args.lr, args.lr_network) == (0.5, 0.3, 0.25, 0.5)
    # explicit flags win over the debug preset
    assert (args.n_training_episodes, args.episode_gap, args.n_validating_episodes,
            args.n_testing_episodes) == (7, 6, 8, 9)


def test_run_name_encodes_the_flags(tmp_path):
    base = ['--N', '5', '--K', '1', '--Q', '15']
    name = runs.run_name(parse_args(base))
    variants = [['--N', '3'], ['--K', '5'], ['--Q', '10'], ['--lr_network', '0.001'], ['--lr', '0.1'],
                ['--point', '20', '30'], ['--point', '10', '30', '40'], ['--gamma', '0.1'], ['--tau', '0.5'],
                ['--delta', '0.3'], ['--network_name', 'convnet'], ['--data_name', 'other'],
                ['--adaptor', 'task'], ['--adaptor', 'none'], ['--seed', '3'], ['--n_training_episodes', '5000'],
                ['--episode_gap', '100'], ['--n_validating_episodes', '50'], ['--wd', '0.001'], ['--mo', '0.8'],
                ['--pretrained', 'other.pth'], ['--data_path', 'datasets/mini_imagenet2']]
    names = {name}
    for extra in variants:
        other = runs.run_name(parse_args(base + extra))
        assert other != name, extra
        names.add(other)
    assert len(names) == len(variants) + 1, 'each flag value gives its own name'
    assert runs.run_name(parse_args(base)) == name
    # how a run is executed is not what it is
    same = ['--n_workers', '0', '--device', 'cpu', '--save_dir', str(tmp_path), '--channels_last', '--amp',
            '--n_testing_episodes', '3', '--eval_mode', 'episodic', '--resume', '--overwrite',
            '--data_path', os.path.join('datasets', 'mini_imagenet')]
    assert runs.run_name(parse_args(base + same)) == name
    assert re.fullmatch(r'mini_imagenet-resnet-glofa-N5-K1-seed960402-[0-9a-f]{8}', name), name
    assert runs.run_name(parse_args(base + ['--adaptor', 'task'])).startswith('mini_imagenet-resnet-glofa-task-N5-K1')


def test_data_and_weights_enter_the_name_by_content(tmp_path):
    def split_files(root, rows):
        os.makedirs(root / 'split')
        for split in ('train', 'val', 'test'):
            (root / 'split' / f'{split}.csv').write_text('filename,label\n' + rows)
    split_files(tmp_path / 'here' / 'mini', 'a.jpg,n1\n')
    split_files(tmp_path / 'moved' / 'mini', 'a.jpg,n1\n')  # the same dataset, somewhere else
    split_files(tmp_path / 'other' / 'mini', 'b.jpg,n1\n')  # another dataset of the same folder name
    name = {where: runs.run_name(parse_args(['--data_path', str(tmp_path / where / 'mini'), '--pretrained', 'none']))
            for where in ('here', 'moved', 'other')}
    assert name['here'] == name['moved'] != name['other']
    for folder, content in (('a', b'one'), ('b', b'two'), ('c', b'one')):  # three files called weights.pth
        os.makedirs(tmp_path / folder)
        (tmp_path / folder / 'weights.pth').write_bytes(content)
    weights = {folder: runs.run_name(parse_args(['--pretrained', str(tmp_path / folder / 'weights.pth')]))
               for folder in 'abc'}
    assert weights['a'] == weights['c'] != weights['b']


def test_run_paths_lie_under_save_dir(tmp_path):
    args = parse_args(['--save_dir', str(tmp_path)])
    paths = runs.run_paths(args)
    assert len(set(paths.files())) == 5
    for path in paths.files():
        assert os.path.commonpath([path, str(tmp_path)]) == str(tmp_path)
        assert runs.run_name(args) in os.path.basename(path)
    other = runs.run_paths(parse_args(['--save_dir', str(tmp_path), '--tau', '0.5']))
    assert other.best != paths.best and other.stat != paths.stat


def test_freeze_encoder_keeps_every_encoder_tensor_and_lr_network_0_does_not(tiny_dataset, tmp_path, capsys):
    """--freeze_encoder: weights and BatchNorm's running statistics as pretrained, the head trained; with
    --lr_network 0 the weights stay but the running statistics move (train-mode BatchNorm)."""
    import train
    from harness.checkpoints import atomic_save
    from conftest import exits_with, tiny_run_flags
    from networks import build_encoder
    torch.manual_seed(0)
    encoder = build_encoder('convnet')
    weights = str(tmp_path / 'pre.pth')
    atomic_save({'params': {f'encoder.{k}': v for k, v in encoder.state_dict().items()}}, weights)
    before = encoder.state_dict()

    def trained(*extra):
        argv = tiny_run_flags(tiny_dataset, tmp_path / 'saves', '--pretrained', weights, *extra)
        result = train.main(argv)
        state = torch.load(result['paths'].last, weights_only=False)['state_dict']
        return {k[len('encoder.'):]: v for k, v in state.items() if k.startswith('encoder.')}, state

    frozen, state = trained('--freeze_encoder', '--lr_network', '0.1', '--h_bias_init', '1')
    assert all(torch.equal(frozen[k], before[k]) for k in before)
    assert not torch.equal(state['h.rho.2.bias'], torch.ones(2))  # the head was trained (h's bias started at 1)
    zero_rate, _ = trained('--lr_network', '0')
    weights_same = [k for k in before if 'running' not in k and 'num_batches' not in k]
    assert all(torch.equal(zero_rate[k], before[k]) for k in weights_same)
    assert not all(torch.equal(zero_rate[k], before[k]) for k in before if 'running_mean' in k)
    assert '--freeze_encoder' in exits_with(train.main, tiny_run_flags(tiny_dataset, tmp_path / 'p', '--model_name',
                                                                       'protonet', '--freeze_encoder'), capsys)
