"""A user's data is never written into, the environment never ends in a traceback, output prints on any
terminal and through a closed pipe, and the tools agree with train.py about what they pass."""
import os
import subprocess
import sys
import time

import pytest
import torch
import pretrain
from harness import checkpoints, runs
import test as test_script
import train
from arguments import parse_args
from harness.checkpoints import atomic_save, model_state_dict
from conftest import digests, exits_with, mounted_tmpfs, tiny_run_flags as flags
from tests.small_data import write_pickled_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import reproduce  # from scripts/ (pytest.ini puts it on the path)


@pytest.fixture
def read_only(tmp_path):
    """A read-only file system (tmpfs mounted ro; needs root and mount), unmounted afterwards."""
    yield from mounted_tmpfs(tmp_path / 'read_only', 'ro,size=64k')


# ------------------------------------------------------------------ the demo writes only where it owns the folder
ENTRY_POINTS = {
    'train.py': lambda root, saves: (train.main, ['--demo', '--data_path', root, '--save_dir', saves]),
    'test.py': lambda root, saves: (test_script.main, ['--demo', '--data_path', root, '--save_dir', saves]),
    'pretrain.py': lambda root, saves: (pretrain.main, ['--demo', '--data_path', root, '--save_dir', saves]),
    'reproduce.py': lambda root, saves: (reproduce.main, ['--demo', '--data_path', root, '--out', saves]),
}


@pytest.mark.parametrize('entry', list(ENTRY_POINTS))
def test_the_demo_never_writes_into_a_users_dataset(data, tmp_path, capsys, entry):
    before = digests(data)
    main, argv = ENTRY_POINTS[entry](str(data), str(tmp_path / 'saves'))
    line = exits_with(main, argv, capsys)
    assert str(data) in line
    assert digests(data) == before  # byte-identical, nothing added
    assert not (tmp_path / 'saves').exists()  # refused before any work


def test_the_demo_writes_into_an_empty_or_its_own_folder(tmp_path):
    from harness.demo import demo_owns, generate_demo_dataset, refuse_unowned
    empty = tmp_path / 'empty'
    empty.mkdir()
    assert demo_owns(str(empty)) and demo_owns(str(tmp_path / 'new'))
    root = generate_demo_dataset(str(empty), images_per_class=1, verbose=False)
    refuse_unowned([root])  # its own: no error
    os.remove(os.path.join(root, '.demo_complete'))  # no marker: no longer the demo's
    with pytest.raises(ValueError, match='empty'):
        refuse_unowned([root])


def test_mixed_demo_checks_both_roots_before_writing_either(data, tmp_path, capsys):
    coarse = tmp_path / 'coarse'
    line = exits_with(train.main, ['--demo', 'mixed', '--data_path', str(coarse), str(data), '--save_dir',
                                   str(tmp_path / 'saves')], capsys)
    assert str(data) in line and not coarse.exists()


# ------------------------------------------------------------------ no tracebacks from the environment
def test_the_demo_in_a_read_only_folder_is_one_line(read_only, capsys, monkeypatch):
    monkeypatch.chdir(read_only)
    line = exits_with(train.main, ['--demo'], capsys)
    assert os.path.join('datasets', 'demo') in line and '--data_path' in line


@pytest.mark.parametrize('form', ['pickled', 'compressed npz'])
def test_a_read_only_root_with_an_unwritable_cache_is_one_line(form, tmp_path, read_only, monkeypatch, capsys):
    from tests.small_data import write_tiered_dataset
    root = tmp_path / 'root'
    if form == 'pickled':
        write_pickled_dataset(str(root), 'metaoptnet')
    else:
        write_tiered_dataset(str(root), compressed=True)
    os.chmod(root, 0o555)
    monkeypatch.setattr(os, 'access', lambda path, mode, real=os.access: False if str(path) == str(root)
                        else real(path, mode))  # root ignores permission bits: the folder reads as read-only
    monkeypatch.setenv('GLOFA_CACHE', str(read_only / 'cache'))
    model = checkpoints.build_model(parse_args(flags(root, tmp_path)), pretrained=False)
    atomic_save({'state_dict': model_state_dict(model)}, str(tmp_path / 'x.model'))
    line = exits_with(test_script.main, flags(root, tmp_path, '--model_path', str(tmp_path / 'x.model')), capsys)
    assert str(read_only / 'cache') in line and 'GLOFA_CACHE' in line


def test_a_start_that_fails_leaves_no_identity_file(data, tmp_path, capsys):
    exits_with(train.main, flags(data, tmp_path, '--pretrained', str(tmp_path / 'missing.pth')), capsys)
    statistics = tmp_path / 'statistics'
    assert not statistics.exists() or os.listdir(statistics) == []


# ------------------------------------------------------------------ printing never breaks a run
def trained(data, tmp_path) -> list:
    argv = flags(data, tmp_path)
    train.main(argv)
    return argv


def test_ascii_output_prints_every_line(data, tmp_path):
    argv = flags(data, tmp_path)
    for script in ('train.py', 'test.py'):  # a run trained and tested in processes of their own
        done = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True,
                              env={**os.environ, 'PYTHONIOENCODING': 'ascii'})
        assert done.returncode == 0 and b'Traceback' not in done.stderr, done.stderr.decode()
        assert b'test accuracy: 100.00 +- 0.00 %' in done.stdout


def test_a_closed_pipe_ends_quietly(data, tmp_path):
    """`python test.py ... | head -1` once head has gone: every write meets a closed pipe."""
    argv = trained(data, tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    done = subprocess.run([sys.executable, 'test.py', *argv], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    assert done.stderr == b'' and done.returncode == 141


# ------------------------------------------------------------------ what a result is
def test_test_py_says_a_run_is_unfinished(data, tmp_path, capsys):
    argv = flags(data, tmp_path, '--n_training_episodes', '4', '--episode_gap', '2')
    train.main(argv)
    paths = runs.run_paths(parse_args(argv))
    state = torch.load(paths.last, weights_only=True)
    state.update(finished=False, episode=2)  # as a run stopped after its first validation leaves it
    atomic_save(state, paths.last)
    capsys.readouterr()
    test_script.main(argv)
    assert 'unfinished (episode 2 of 4' in capsys.readouterr().out


def test_protonet_on_an_untrained_encoder_is_evaluated(data, tmp_path, capsys):
    results = test_script.main(flags(data, tmp_path, '--model_name', 'protonet'))
    assert {key[2] for key in results} == {'euclidean', 'cosine'}
    out = capsys.readouterr().out
    assert 'untrained' in out and 'quoted' not in out  # FEAT's mini-ImageNet figures belong beside mini-ImageNet only


def test_a_checkpoint_trained_elsewhere_is_not_called_unfinished(data, tmp_path, capsys):
    args = parse_args(flags(data, tmp_path))
    model = checkpoints.build_model(args, pretrained=False)
    atomic_save({'state_dict': model_state_dict(model)}, str(tmp_path / 'x.model'))
    test_script.main(flags(data, tmp_path, '--model_path', str(tmp_path / 'x.model')))
    assert 'unfinished' not in capsys.readouterr().out


# ------------------------------------------------------------------ reproduce.py: stages and interrupts
def test_reproduce_says_how_far_it_got_when_interrupted(tmp_path, monkeypatch, capsys):
    calls = []

    def stage(command, log, done):
        calls.append(command)
        if len(calls) == 2:
            raise KeyboardInterrupt
        done.append(' '.join(command))
    monkeypatch.setattr(reproduce, 'run_stage', stage)
    monkeypatch.setattr(reproduce, 'pretraining_finished', lambda weights: False)
    line = exits_with(reproduce.main, ['--demo', '--out', str(tmp_path / 'out'), '--models', 'protonet',
                                       '--shots', '1'], capsys, code=130)
    assert '1 of 3 stages' in line and 'same command' in line
    assert (tmp_path / 'out' / 'results.md').exists()  # written after each stage


def test_progress_off_a_terminal_is_a_few_plain_lines(monkeypatch):
    import io
    from base import console
    stream = io.StringIO()  # not a terminal, as a log file or a cluster job's output
    monkeypatch.setattr(sys, 'stderr', stream)
    monkeypatch.setattr(console, 'PLAIN_PROGRESS_INTERVAL', 0.1)
    for _ in console.progress(range(10), desc='quick'):  # ends before the first interval: says nothing
        pass
    assert stream.getvalue() == ''
    for _ in console.progress(range(500), desc='work'):  # about 0.6 s
        time.sleep(0.001)
    text = stream.getvalue()
    assert '\r' not in text and 2 <= text.count('\n') < 20  # a line per interval, not one per refresh
    assert text.splitlines()[-1].startswith('work: 100%')
