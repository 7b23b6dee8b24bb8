"""The embeddings of a split stored by the first test of a checkpoint and reused by the next: the same
accuracies, and a new encoding whenever the checkpoint, the split's files or the transform change, or the
stored file is damaged."""
import os
import shutil

import numpy as np
import pytest

import test as test_script
import train
from arguments import parse_args
from runs import run_paths


def flags(data, save_dir, *extra):
    return ['--data_path', str(data), '--save_dir', str(save_dir), '--network_name', 'convnet', '--pretrained',
            'none', '--N', '2', '--K', '1', '--Q', '2', '--n_training_episodes', '2', '--episode_gap', '1',
            '--n_validating_episodes', '2', '--n_testing_episodes', '20', '--eval_mode', 'cached',
            '--n_workers', '0', *extra]


@pytest.fixture
def run(tiny_dataset, tmp_path, capsys):
    data = shutil.copytree(tiny_dataset, tmp_path / 'data')
    argv = flags(data, tmp_path / 'saves')
    trained = train.main(argv)  # its test stores the test split's embeddings
    assert 'stored in' in capsys.readouterr().out
    return argv, data, trained['test_accuracies']


def stored(save_dir) -> list:
    folder = os.path.join(save_dir, 'features')
    return sorted(f for f in os.listdir(folder) if f.endswith('.npy')) if os.path.isdir(folder) else []


def test_a_second_test_reuses_the_embeddings_with_the_same_accuracies(run, tmp_path, capsys):
    argv, _, accuracies = run
    results = test_script.main(argv)
    out = capsys.readouterr().out
    assert 'reused from' in out and 'stored in' not in out
    np.testing.assert_array_equal(results[(2, 1)].accuracies, accuracies)
    off = test_script.main(argv + ['--feature_cache', 'off'])
    assert 'reused' not in capsys.readouterr().out
    np.testing.assert_array_equal(off[(2, 1)].accuracies, accuracies)
    assert len(stored(tmp_path / 'saves')) == 1


@pytest.mark.parametrize('change', ['checkpoint', 'split file', 'image', 'normalization'])
def test_any_change_encodes_again(run, tmp_path, capsys, change):
    argv, data, _ = run
    extra = []
    if change == 'checkpoint':
        best = run_paths(parse_args(argv)).best
        with open(best, 'ab') as f:  # another content (torch.load ignores bytes after the archive)
            f.write(b'\0')
    elif change == 'split file':
        os.utime(os.path.join(data, 'split', 'test.csv'), (1, 1))
    elif change == 'image':
        name = sorted(os.listdir(os.path.join(data, 'images')))[-1]
        os.utime(os.path.join(data, 'images', name), (1, 1))
    else:  # another run's name: its checkpoint given by path
        extra = ['--normalization', 'feat', '--model_path', run_paths(parse_args(argv)).best]
    test_script.main(argv + extra)
    out = capsys.readouterr().out
    assert 'stored in' in out and 'reused' not in out
    assert len(stored(tmp_path / 'saves')) == 2


@pytest.mark.parametrize('damage', ['bytes', 'cut', 'record'])
def test_a_damaged_file_is_rebuilt_never_read(run, tmp_path, capsys, damage):
    argv, _, accuracies = run
    (name,) = stored(tmp_path / 'saves')
    path = os.path.join(tmp_path / 'saves', 'features', name)
    if damage == 'bytes':
        with open(path, 'r+b') as f:
            f.seek(-8, 2)
            f.write(b'\x7f' * 8)
    elif damage == 'cut':
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path[:-len('.npy')] + '.json', 'w') as f:
            f.write('{"key": ')
    results = test_script.main(argv)
    out = capsys.readouterr().out
    assert 'damaged' in out and 'stored in' in out and 'reused' not in out
    np.testing.assert_array_equal(results[(2, 1)].accuracies, accuracies)
    test_script.main(argv)
    assert 'reused from' in capsys.readouterr().out  # rebuilt whole


def test_a_small_question_stores_nothing(run, tmp_path, capsys):
    argv, _, _ = run
    shutil.rmtree(tmp_path / 'saves' / 'features')
    test_script.main([a for a in argv if a not in ('--eval_mode', 'cached')] + ['--n_testing_episodes', '1'])
    assert stored(tmp_path / 'saves') == []  # 1 episode runs episodic: no encoding of the split
