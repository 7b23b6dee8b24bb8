"""Every user mistake ends with one line naming the culprit, exit code 2, no traceback, nothing lost."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
import test as test_script
from harness import checkpoints, runs
from arguments import parse_args
import train
from harness.checkpoints import atomic_save, model_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_flags(data, save_dir, *extra):
    return ['--data_path', str(data), '--save_dir', str(save_dir), '--network_name', 'convnet', '--pretrained',
            'none', '--N', '2', '--K', '1', '--Q', '1', '--n_training_episodes', '2', '--episode_gap', '1',
            '--n_validating_episodes', '2', '--n_testing_episodes', '2', '--n_workers', '0', *extra]


def fails(main, argv, capsys):
    """Run an entry point; return its one-line error after checking exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith('error: ')
    return err[-1]


@pytest.fixture
def data(tiny_dataset, tmp_path):
    """A private copy of the tiny dataset, free to break."""
    return shutil.copytree(tiny_dataset, tmp_path / 'data')


def first_row(data, split='train'):
    with open(os.path.join(data, 'split', f'{split}.csv')) as f:
        return f.read().splitlines()[1].split(',')


@pytest.mark.parametrize('entry', ['train', 'test', 'pretrain'])
def test_missing_data_folder_names_the_folder_and_the_flag(tmp_path, capsys, entry):
    import pretrain
    main = {'train': train.main, 'test': test_script.main, 'pretrain': pretrain.main}[entry]
    argv = base_flags(tmp_path / 'nowhere', tmp_path) if entry != 'pretrain' else \
        ['--data_path', str(tmp_path / 'nowhere'), '--save_dir', str(tmp_path), '--n_workers', '0']
    if entry == 'test':
        argv += ['--model_path', __file__]  # the data is read before the checkpoint
    line = fails(main, argv, capsys)
    assert str(tmp_path / 'nowhere') in line and '--data_path' in line


def test_missing_split_file(data, tmp_path, capsys):
    os.remove(os.path.join(data, 'split', 'val.csv'))
    line = fails(train.main, base_flags(data, tmp_path), capsys)
    assert 'val.csv' in line and 'not found' in line


def test_malformed_csv_row_names_file_and_line(data, tmp_path, capsys):
    path = os.path.join(data, 'split', 'train.csv')
    with open(path) as f:
        lines = f.read().splitlines()
    lines[3] = 'just-a-filename.jpg'
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    line = fails(train.main, base_flags(data, tmp_path), capsys)
    assert 'train.csv, line 4' in line and 'just-a-filename.jpg' in line


def test_missing_image_found_at_start_up(data, tmp_path, capsys):
    name = first_row(data, 'test')[0]
    os.remove(os.path.join(data, 'images', name))
    line = fails(train.main, base_flags(data, tmp_path), capsys)
    assert name in line and 'missing' in line


@pytest.mark.parametrize('workers', [0, 2])
def test_undecodable_image_named_when_read(data, tmp_path, capsys, workers):
    for name, _ in [first_row(data, split) for split in ('train', 'val', 'test')]:
        with open(os.path.join(data, 'images', name), 'wb') as f:
            f.write(b'not a jpeg at all')
    flags = base_flags(data, tmp_path)
    flags[flags.index('--n_workers') + 1] = str(workers)
    line = fails(train.main, flags + ['--n_training_episodes', '40', '--episode_gap', '40'], capsys)
    assert 'cannot be read or decoded' in line and '.jpg' in line
    # the reader's own message, whichever process met it, and nothing of a worker's traceback
    assert line.startswith(f"error: image {os.path.join(data, 'images')}") and 'worker' not in line


def test_class_with_too_few_images(data, tmp_path, capsys):
    line = fails(train.main, base_flags(data, tmp_path, '--Q', '6'), capsys)  # 6 images, K + Q = 7
    assert 'class n0000000' in line and 'has 6 images' in line and 'K + Q = 7' in line


def test_more_ways_than_classes(data, tmp_path, capsys):
    line = fails(train.main, base_flags(data, tmp_path, '--N', '4'), capsys)  # val and test have 3 classes
    assert 'val' in line and '3 classes' in line and 'N = 4' in line and '--N' in line


@pytest.mark.parametrize('flag', ['--N', '--K', '--Q'])
def test_episode_sizes_below_one(data, tmp_path, capsys, flag):
    line = fails(train.main, base_flags(data, tmp_path, flag, '0'), capsys)
    assert line.startswith(f'error: {flag} must be at least') and line.endswith('got 0')


def test_non_positive_temperature(data, tmp_path, capsys):
    assert '--tau' in fails(train.main, base_flags(data, tmp_path, '--tau', '0'), capsys)


def test_cuda_without_gpu(data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    assert '--device cuda' in fails(train.main, base_flags(data, tmp_path, '--device', 'cuda'), capsys)


def test_pretrained_not_a_checkpoint(data, tmp_path, capsys):
    path = tmp_path / 'weights.pth'
    path.write_bytes(b'\x00garbage' * 10)
    line = fails(train.main, base_flags(data, tmp_path, '--pretrained', str(path)), capsys)
    assert str(path) in line and 'not a PyTorch checkpoint' in line


def test_pretrained_of_another_network(data, tmp_path, capsys):
    path = tmp_path / 'res12.pth'
    from networks.resnet import ResNet12
    torch.save({'params': {f'encoder.{k}': v for k, v in ResNet12().state_dict().items()}}, path)
    line = fails(train.main, base_flags(data, tmp_path, '--pretrained', str(path)), capsys)
    assert str(path) in line and '--network_name resnet' in line  # the flag that fixes it
    torch.save({'params': {'encoder.something.weight': torch.zeros(3)}}, path)  # fits no network
    line = fails(train.main, base_flags(data, tmp_path, '--pretrained', str(path)), capsys)
    assert str(path) in line and '--network_name' not in line


def save_checkpoint(tmp_path, data, *extra):
    args = parse_args(base_flags(data, tmp_path, *extra))
    model = checkpoints.build_model(args, pretrained=False)
    path = runs.run_paths(args).best
    atomic_save({'state_dict': model_state_dict(model), 'validating_accuracy': 0.5, 'epoch': 1,
                 'config': runs.run_identity(args)}, path)
    return path


def test_checkpoint_missing(data, tmp_path, capsys):
    line = fails(test_script.main, base_flags(data, tmp_path, '--model_path', str(tmp_path / 'gone.model')), capsys)
    assert 'gone.model' in line and 'not found' in line


def test_checkpoint_not_a_checkpoint(data, tmp_path, capsys):
    path = tmp_path / 'bad.model'
    torch.save({'something': 1}, path)
    line = fails(test_script.main, base_flags(data, tmp_path, '--model_path', str(path)), capsys)
    assert 'bad.model' in line and "'state_dict'" in line


def test_checkpoint_of_another_way_is_evaluated_and_said(data, tmp_path, capsys):
    path = save_checkpoint(tmp_path, data, '--N', '3')
    results = test_script.main(base_flags(data, tmp_path, '--model_path', path))
    assert list(results) == [(2, 1)]
    assert 'trained as 3-way 1-shot; evaluating 2-way 1-shot' in capsys.readouterr().out


def test_checkpoint_of_another_network(data, tmp_path, capsys):
    path = save_checkpoint(tmp_path, data, '--network_name', 'resnet')
    line = fails(test_script.main, base_flags(data, tmp_path, '--model_path', path), capsys)
    assert 'network_name = resnet' in line
    record = torch.load(path, weights_only=False)
    del record['config']  # a checkpoint without a config is still refused by its keys
    torch.save(record, path)
    line = fails(test_script.main, base_flags(data, tmp_path, '--model_path', path), capsys)
    assert 'key' in line and 'another network' in line


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, capsys):
    flags = base_flags(data, tmp_path, '--lr', '1e30', '--lr_network', '1e30', '--n_training_episodes', '4')
    line = fails(train.main, flags, capsys)  # the first step makes the weights blow up: validation sees nan
    last = runs.run_paths(parse_args(flags)).last
    assert 'nan or inf' in line and 'after episode 1' in line and last in line
    kept = torch.load(last, weights_only=True)
    assert kept['episode'] == 0 and all(torch.isfinite(v).all() for v in kept['state_dict'].values()
                                        if v.is_floating_point())


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, 'train.py', *base_flags(tmp_path / 'nowhere', tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('error: data folder')
