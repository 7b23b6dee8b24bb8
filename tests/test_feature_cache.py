"""The embeddings of a split stored by the first test of a checkpoint and reused by the next: the same
accuracies, and a new encoding whenever the checkpoint, the content of the split's files or the transform change
(also with the same sizes and modification times), or the stored file is damaged or does not fit the model."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import test as test_script
import train
from arguments import parse_args
from harness import embeddings
from harness.runs import run_paths


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


def replace_keeping_size_and_time(path: str, content: bytes) -> None:
    """Another content of the same size at ``path``, its modification time kept (as cp -p or tar would)."""
    info = os.stat(path)
    assert len(content) == info.st_size
    with open(path, 'wb') as f:
        f.write(content)
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


@pytest.mark.parametrize('change', ['checkpoint', 'split file', 'image', 'normalization'])
def test_any_change_encodes_again(run, tmp_path, capsys, change):
    argv, data, _ = run
    extra = []
    if change == 'checkpoint':
        best = run_paths(parse_args(argv)).best
        with open(best, 'ab') as f:  # another content (torch.load ignores bytes after the archive)
            f.write(b'\0')
    elif change == 'split file':  # two rows swapped: the same size, the same time (another run: given by path)
        extra = ['--model_path', run_paths(parse_args(argv)).best]
        path = os.path.join(data, 'split', 'test.csv')
        with open(path, 'rb') as f:
            header, first, second, *rest = f.read().split(b'\n')
        replace_keeping_size_and_time(path, b'\n'.join([header, second, first, *rest]))
    elif change == 'image':  # another picture, padded to the same size (JPEG ignores what follows its end)
        images = os.path.join(data, 'images')
        a, b = sorted((os.path.join(images, n) for n in sorted(os.listdir(images))[-2:]), key=os.path.getsize)
        with open(a, 'rb') as f:
            smaller = f.read()
        replace_keeping_size_and_time(b, smaller + b'\0' * (os.path.getsize(b) - len(smaller)))
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


def test_the_same_content_with_new_times_is_reused(run, tmp_path, capsys):
    argv, data, _ = run
    for directory, _, files in os.walk(data):
        for name in files:
            os.utime(os.path.join(directory, name), (1, 1))
    test_script.main(argv)
    assert 'reused from' in capsys.readouterr().out


@pytest.mark.parametrize('damage', ['empty array', 'empty record', 'record of a list', 'another shape', 'float64'])
def test_a_stored_array_that_does_not_fit_is_encoded_again(run, tmp_path, capsys, damage):
    """A zero-byte file (a power loss before the rename), a record of another form, or an array of another shape
    or type than the model's (with a matching record): one line, encoded again, the same accuracies."""
    argv, _, accuracies = run
    (name,) = stored(tmp_path / 'saves')
    path = os.path.join(tmp_path / 'saves', 'features', name)
    record = path[:-len('.npy')] + '.json'
    if damage.startswith('empty'):
        open(path if damage == 'empty array' else record, 'w').close()
    elif damage == 'record of a list':
        with open(record, 'w') as f:
            f.write('[1, 2]')
    else:
        array = np.load(path)
        array = array[:, :-1] if damage == 'another shape' else array.astype(np.float64)
        np.save(path, array)
        with open(record) as f:
            saved = json.load(f)
        saved.update(shape=list(array.shape), sha256=hashlib.sha256(memoryview(np.ascontiguousarray(array))).hexdigest())
        with open(record, 'w') as f:
            json.dump(saved, f)
    results = test_script.main(argv)
    out = capsys.readouterr().out
    assert 'stored in' in out and 'reused' not in out
    np.testing.assert_array_equal(results[(2, 1)].accuracies, accuracies)


def test_the_key_is_the_weights_that_were_loaded(run, tmp_path, capsys, monkeypatch):
    """The checkpoint replaced by other weights between its load and the store (train.py saving a new best while
    test.py runs): the embeddings are stored under the loaded weights, so the new file's test encodes again."""
    argv, data, accuracies = run
    best = run_paths(parse_args(argv)).best
    shutil.rmtree(tmp_path / 'saves' / 'features')
    other = train.main(flags(data, tmp_path / 'other', '--seed', '5'))['paths'].best
    loaded = test_script.load_model_checkpoint

    def load_then_replace(*args, **kwargs):
        record = loaded(*args, **kwargs)
        shutil.copyfile(other, best)
        return record
    monkeypatch.setattr(test_script, 'load_model_checkpoint', load_then_replace)
    first = test_script.main(argv)
    np.testing.assert_array_equal(first[(2, 1)].accuracies, accuracies)  # the loaded weights' figures
    monkeypatch.setattr(test_script, 'load_model_checkpoint', loaded)
    capsys.readouterr()
    second = test_script.main(argv)
    assert 'reused' not in capsys.readouterr().out
    fresh = test_script.main(argv + ['--feature_cache', 'off'])
    np.testing.assert_array_equal(second[(2, 1)].accuracies, fresh[(2, 1)].accuracies)


def test_a_small_question_stores_nothing(run, tmp_path, capsys, monkeypatch):
    """Nor does it read the split's files for a key it never uses."""
    argv, _, _ = run
    shutil.rmtree(tmp_path / 'saves' / 'features')
    monkeypatch.setattr(embeddings, 'content_digest', lambda paths: pytest.fail('the split was hashed'))
    test_script.main([a for a in argv if a not in ('--eval_mode', 'cached')] + ['--n_testing_episodes', '1'])
    assert stored(tmp_path / 'saves') == []  # 1 episode runs episodic: no encoding of the split
