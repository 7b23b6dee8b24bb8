"""Shared fixtures: a small dataset in the real on-disk format (written by demo.py, the one writer), the spec's
keys; ``exits_with``, how the tests run an entry point that must stop; a pretrained Conv-4 file; the flags of a
tiny run and the digests of a folder's files (what must stay byte-identical)."""
import hashlib
import os
import shutil
import subprocess

import pytest
import torch
from harness.checkpoints import atomic_save
from harness.demo import write_colour_dataset
from networks import build_encoder


@pytest.fixture(scope='session')
def tiny_dataset(tmp_path_factory):
    """4 / 3 / 3 classes of 6 images: enough for 3-way episodes with K + Q <= 6."""
    return write_colour_dataset(tmp_path_factory.mktemp('data') / 'tiny')


@pytest.fixture(scope='session')
def spec_encoder_keys() -> set:
    """The state-dict keys of the ResNet-12, as the spec lists them."""
    keys = set()
    for i in range(1, 5):
        for conv in ('conv1', 'conv2', 'conv3', 'downsample.0'):
            keys.add(f'layer{i}.0.{conv}.weight')
        for bn in ('bn1', 'bn2', 'bn3', 'downsample.1'):
            for name in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked'):
                keys.add(f'layer{i}.0.{bn}.{name}')
    return keys


@pytest.fixture(scope='session')
def spec_model_keys(spec_encoder_keys) -> set:
    """The state-dict keys of GLoFA on the ResNet-12, as the spec lists them."""
    keys = {f'encoder.{k}' for k in spec_encoder_keys}
    for f in ('f_task', 'f_class', 'h'):
        for part in ('psi', 'rho'):
            for layer in (0, 2):
                for name in ('weight', 'bias'):
                    keys.add(f'{f}.{part}.{layer}.{name}')
    return keys


def exits_with(main, argv, capsys, code=2) -> str:
    """Run an entry point's ``main(argv)``, which must exit with ``code`` (2: a user mistake, 130: an
    interrupt) and no traceback; returns the last line it printed on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return err.strip().splitlines()[-1]


def pretrained_file(path, seed=3):
    """A Conv-4 from ``seed`` saved at ``path`` in FEAT's pretrained format (with a 4-class fc); the encoder."""
    torch.manual_seed(seed)
    encoder = build_encoder('convnet')
    state = {f'encoder.{k}': v for k, v in encoder.state_dict().items()}
    state.update({'fc.weight': torch.randn(4, encoder.out_dim), 'fc.bias': torch.zeros(4)})
    atomic_save({'params': state}, str(path))
    return encoder


def tiny_run_flags(data, save_dir, *extra) -> list[str]:
    """train.py / test.py flags of a 2-way 1-shot Conv-4 run of 2 episodes on ``data`` (the tiny dataset)."""
    return ['--data_path', str(data), '--save_dir', str(save_dir), '--network_name', 'convnet', '--pretrained',
            'none', '--N', '2', '--K', '1', '--Q', '1', '--n_training_episodes', '2', '--episode_gap', '1',
            '--n_validating_episodes', '2', '--n_testing_episodes', '2', '--n_workers', '0', *extra]


def digests(folder) -> dict:
    """{path: SHA-256} of every file under ``folder``."""
    found = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(directory, name), 'rb') as f:
                found[os.path.join(directory, name)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture
def data(tiny_dataset, tmp_path):
    """A copy of the tiny dataset that a test may change."""
    return shutil.copytree(tiny_dataset, tmp_path / 'data')


def mounted_tmpfs(mount, options: str):
    """A real tmpfs mounted at ``mount`` with ``options`` (e.g. 'size=512k', 'ro'), unmounted afterwards; the
    test is skipped where mounting needs a root this machine does not give. A generator, for fixtures."""
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip('a tmpfs needs root and mount')
    yield mount
    if subprocess.run(['umount', str(mount)], capture_output=True).returncode != 0:
        subprocess.run(['umount', '-l', str(mount)], check=False)  # busy: detached now, freed when released
