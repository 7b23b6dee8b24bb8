"""Weight files: FEAT's pretrained format, strict refusals, atomic saves, and the records train.py writes."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import test as test_script
from harness import runs
import train
from arguments import parse_args
from harness.checkpoints import atomic_save, load_pretrained
from networks.resnet import ResNet12
from base.console import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randomised_state_dict(seed: int = 0) -> dict:
    """A ResNet-12 state dict whose every tensor (running statistics and counters too) is random."""
    torch.manual_seed(seed)
    sd = ResNet12().state_dict()
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            out[k] = torch.randn_like(v).abs() + 0.1 if 'running_var' in k else torch.randn_like(v)
        else:
            out[k] = torch.randint_like(v, 1, 1000)
    return out


def assert_loaded(encoder: nn.Module, expected: dict) -> None:
    sd = encoder.state_dict()
    assert set(sd) == set(expected)
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k


@pytest.fixture(scope='module')
def weights():
    return randomised_state_dict()


# ------------------------------------------------------------------ accepted formats
def test_feat_format(tmp_path, weights):
    params = {f'encoder.{k}': v for k, v in weights.items()}
    params['fc.weight'] = torch.randn(64, 640)
    params['fc.bias'] = torch.randn(64)
    path = str(tmp_path / 'Res12-pre.pth')
    torch.save({'params': params}, path)
    encoder = ResNet12()
    assert load_pretrained(encoder, path) == len(weights)
    assert_loaded(encoder, weights)


def test_bare_encoder_state_dict(tmp_path, weights):
    path = str(tmp_path / 'bare.pth')
    torch.save(weights, path)
    encoder = ResNet12()
    assert load_pretrained(encoder, path) == len(weights)
    assert_loaded(encoder, weights)


def test_dataparallel_prefix(tmp_path, weights):
    path = str(tmp_path / 'dp.pth')
    torch.save({'params': {f'module.encoder.{k}': v for k, v in weights.items()}}, path)
    encoder = ResNet12()
    assert load_pretrained(encoder, path) == len(weights)
    assert_loaded(encoder, weights)


def test_file_without_batch_counters(tmp_path, weights):
    path = str(tmp_path / 'old.pth')
    kept = {k: v for k, v in weights.items() if not k.endswith('num_batches_tracked')}
    torch.save({'params': {f'encoder.{k}': v for k, v in kept.items()}}, path)
    encoder = ResNet12()
    assert load_pretrained(encoder, path) == len(kept)
    sd = encoder.state_dict()
    for k, v in kept.items():
        assert torch.equal(sd[k], v), k


# ------------------------------------------------------------------ refusals
def refusal(path: str, *words: str) -> str:
    with pytest.raises(UserError) as info:
        load_pretrained(ResNet12(), path)
    message = str(info.value)
    assert path in message
    assert '\n' not in message.strip()
    for word in words:
        assert word in message
    return message


def test_missing_file(tmp_path):
    refusal(str(tmp_path / 'nowhere.pth'), 'not found')


def test_file_without_encoder_tensors(tmp_path):
    path = str(tmp_path / 'classifier.pth')
    torch.save({'params': {'fc.weight': torch.randn(64, 640), 'fc.bias': torch.randn(64)}}, path)
    refusal(path)


def test_shape_mismatch_names_the_key(tmp_path, weights):
    path = str(tmp_path / 'wrong_shape.pth')
    bad = dict(weights)
    bad['layer2.0.conv1.weight'] = torch.randn(160, 64, 1, 1)
    torch.save({'params': {f'encoder.{k}': v for k, v in bad.items()}}, path)
    refusal(path, 'layer2.0.conv1.weight')


def test_missing_key_is_named(tmp_path, weights):
    path = str(tmp_path / 'incomplete.pth')
    bad = {k: v for k, v in weights.items() if k != 'layer3.0.bn2.weight'}
    torch.save({'params': {f'encoder.{k}': v for k, v in bad.items()}}, path)
    refusal(path, 'layer3.0.bn2.weight')


def test_state_dict_of_another_network(tmp_path):
    path = str(tmp_path / 'mlp.pth')
    torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).state_dict(), path)
    refusal(path)
    path = str(tmp_path / 'mlp_encoder.pth')
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.save({'params': {f'encoder.{k}': v for k, v in net.state_dict().items()}}, path)
    refusal(path)


def test_random_bytes(tmp_path):
    path = str(tmp_path / 'noise.pth')
    with open(path, 'wb') as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    refusal(path)


def test_refused_load_leaves_the_encoder_unchanged(tmp_path, weights):
    path = str(tmp_path / 'wrong_shape.pth')
    bad = dict(weights)
    bad['layer4.0.conv3.weight'] = torch.randn(1, 1, 3, 3)
    torch.save(bad, path)
    encoder = ResNet12()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(UserError):
        load_pretrained(encoder, path)
    assert_loaded(encoder, before)


# ------------------------------------------------------------------ atomic saves
def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / 'deep' / 'er' / 'record.pth')
    atomic_save({'a': torch.ones(2)}, path)
    assert torch.equal(torch.load(path)['a'], torch.ones(2))
    atomic_save({'a': torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)['a'], torch.zeros(3))
    assert os.listdir(os.path.dirname(path)) == ['record.pth']


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = str(tmp_path / 'record.pth')
    atomic_save({'a': torch.ones(2)}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b'half a fi')  # the open temporary file
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(UserError) as error:  # one line naming the file
        atomic_save({'a': torch.zeros(3)}, path)
    assert path in str(error.value)
    monkeypatch.setattr(torch, 'save', real_save)
    assert torch.equal(torch.load(path)['a'], torch.ones(2))
    assert os.listdir(tmp_path) == ['record.pth']  # the temporary file is gone


# ------------------------------------------------------------------ what train.py and test.py write
def run_flags(data: str, save_dir: str) -> list[str]:
    return ['--data_path', data, '--device', 'cpu', '--network_name', 'resnet', '--pretrained', 'none',
            '--N', '2', '--K', '1', '--Q', '1', '--n_training_episodes', '2', '--episode_gap', '1',
            '--n_validating_episodes', '2', '--n_testing_episodes', '3', '--n_workers', '0',
            '--save_dir', save_dir]


ACCURACY_LINE = re.compile(r'^test accuracy: (\d+\.\d\d) ± (\d+\.\d\d) % \(2-way 1-shot, 3 episodes\)$', re.M)


@pytest.fixture(scope='module')
def trained(tiny_dataset, tmp_path_factory):
    save_dir = str(tmp_path_factory.mktemp('saves'))
    flags = run_flags(tiny_dataset, save_dir)
    result = train.main(flags)
    return flags, result


def test_checkpoint_record(trained, spec_model_keys):
    flags, result = trained
    paths = result['paths']
    record = torch.load(paths.best, map_location='cpu', weights_only=True)
    assert {'state_dict', 'validating_accuracy', 'epoch'} <= set(record) <= {'state_dict', 'validating_accuracy',
                                                                               'epoch', 'config'}
    assert set(record['state_dict']) == spec_model_keys
    accuracies = result['statistics']['validating_accuracy']
    # the checkpoint is written when validation accuracy strictly beats the best so far (from 0)
    best = int(np.argmax(accuracies))
    assert record['validating_accuracy'] == pytest.approx(accuracies[best])
    assert record['epoch'] == best + 1  # one episode per gap
    assert not any(name.endswith('.tmp') for name in os.listdir(os.path.dirname(paths.best)))


def test_statistics_record_and_log(trained):
    flags, result = trained
    paths = result['paths']
    stats = torch.load(paths.stat, map_location='cpu', weights_only=False)
    assert set(stats) >= {'training_loss', 'validating_accuracy'}
    assert len(stats['training_loss']) == 2 and len(stats['validating_accuracy']) == 2
    assert stats['training_loss'] == pytest.approx(result['statistics']['training_loss'])
    assert stats['validating_accuracy'] == pytest.approx(result['statistics']['validating_accuracy'])
    assert all(np.isfinite(stats['training_loss']))
    # 2-way 1-query episodes: accuracies are multiples of 1/4 over 2 episodes
    for a in stats['validating_accuracy']:
        assert 0 <= a <= 1 and (4 * a) == pytest.approx(round(4 * a))
    with open(paths.log) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    assert len(lines) == 2
    assert [line['episode'] for line in lines] == [1, 2]
    assert [line['validating_accuracy'] for line in lines] == pytest.approx(stats['validating_accuracy'])
    assert [line['training_loss'] for line in lines] == pytest.approx(stats['training_loss'])


def test_test_script_reproduces_the_training_run_test(trained, capsys):
    flags, result = trained
    capsys.readouterr()
    accuracies = next(iter(test_script.main(flags).values())).accuracies
    out = capsys.readouterr().out
    match = ACCURACY_LINE.search(out)
    assert match, out
    assert len(accuracies) == 3
    np.testing.assert_array_equal(np.asarray(accuracies), np.asarray(result['test_accuracies']))
    assert float(match.group(1)) == pytest.approx(100 * np.mean(accuracies), abs=0.006)


def run(script: str, flags: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script] + flags, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_command_line_end_to_end(tiny_dataset, tmp_path):
    flags = run_flags(tiny_dataset, str(tmp_path / 'saves'))
    trained_run = run('train.py', flags)
    assert trained_run.returncode == 0, trained_run.stderr[-3000:]
    assert ACCURACY_LINE.search(trained_run.stdout), trained_run.stdout
    assert 'Traceback' not in trained_run.stderr
    tested = run('test.py', flags)
    assert tested.returncode == 0, tested.stderr[-3000:]
    assert ACCURACY_LINE.search(tested.stdout), tested.stdout
    assert ACCURACY_LINE.search(tested.stdout).group(0) == ACCURACY_LINE.search(trained_run.stdout).group(0)

    missing = str(tmp_path / 'no_such_weights.pth')
    save_dir = str(tmp_path / 'saves2')
    flags = run_flags(tiny_dataset, save_dir)
    flags[flags.index('--pretrained') + 1] = missing
    failed = run('train.py', flags)
    assert failed.returncode == 2
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, failed.stderr
    assert lines[0].startswith('error:') and missing in lines[0]
    assert 'Traceback' not in failed.stderr + failed.stdout
    # nothing that a rerun would take for an unfinished run is left behind
    assert not os.path.exists(runs.run_paths(parse_args(flags)).last)
