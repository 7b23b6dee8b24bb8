"""--tensorboard writes the JSON log's scalars, each step once after a resume; without the package it is refused."""
import json
import os
import sys

import pytest
import pretrain
import train
from arguments import parse_args
from conftest import exits_with
from harness.runs import run_name, run_paths

pytest.importorskip('tensorboard')
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def flags(data, save_dir, episodes=4):
    return ['--data_path', data, '--save_dir', str(save_dir), '--network_name', 'convnet', '--pretrained', 'none',
            '--N', '2', '--K', '1', '--Q', '1', '--n_training_episodes', str(episodes), '--episode_gap', '1',
            '--n_validating_episodes', '2', '--n_testing_episodes', '2', '--n_workers', '0', '--tensorboard']


def scalars(folder: str) -> dict:
    events = EventAccumulator(folder, size_guidance={'scalars': 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()['scalars']}


def log_scalars(path: str, step: str) -> dict:
    found = {}
    with open(path) as f:
        for line in f:
            entry = json.loads(line)
            for key, value in entry.items():
                if key != step and isinstance(value, (int, float)) and not isinstance(value, bool):
                    found.setdefault(key, []).append((entry[step], value))
    return found


def assert_same(events: dict, log: dict) -> None:
    assert set(events) == set(log)
    for tag, values in log.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in values], tag  # each step once, in order
        assert [v for _, v in events[tag]] == pytest.approx([v for _, v in values], rel=1e-6), tag


def test_train_writes_the_logs_scalars_and_resumes_without_repeating_steps(tiny_dataset, tmp_path, monkeypatch,
                                                                            capsys):
    argv = flags(tiny_dataset, tmp_path)
    real_save, calls = train.save_last, []

    def interrupted_save(*args, **kwargs):  # Ctrl-C after the third validation was logged, before its state is saved
        calls.append(1)
        if len(calls) == 4:  # the start's save, then one a gap
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(train, 'save_last', interrupted_save)
        exits_with(train.main, argv, capsys, code=130)
    train.main(argv + ['--resume'])
    assert 'tensorboard --logdir' in capsys.readouterr().out
    folder = os.path.join(tmp_path, 'tensorboard', run_name(parse_args(argv)))
    events, log = scalars(folder), log_scalars(run_paths(parse_args(argv)).log, 'episode')
    assert {'training_loss', 'validating_accuracy', 'validating_ci', 'lr', 'lr_network', 'alpha_task'} <= set(events)
    assert [s for s, _ in events['validating_accuracy']] == [1, 2, 3, 4]
    assert_same(events, log)


def test_pretrain_writes_the_logs_scalars(tiny_dataset, tmp_path, capsys):
    out = tmp_path / 'pre.pth'
    pretrain.main(['--data_path', tiny_dataset, '--network_name', 'convnet', '--epochs', '2', '--batch_size', '8',
                   '--val_every', '1', '--val_way', '2', '--val_query', '2', '--val_episodes', '2', '--n_workers', '0', '--out', str(out),
                   '--save_dir', str(tmp_path), '--tensorboard'])
    events = scalars(os.path.join(tmp_path, 'tensorboard', 'pre'))
    assert_same(events, log_scalars(str(tmp_path / 'pre.log.jsonl'), 'epoch'))
    assert [s for s, _ in events['val_cosine']] == [1, 2]


def test_without_the_package_the_flag_is_refused_with_the_install_command(tiny_dataset, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # as if tensorboard were not installed
    line = exits_with(train.main, flags(tiny_dataset, tmp_path), capsys)
    assert 'pip install tensorboard' in line
    assert not os.path.exists(tmp_path / 'trained_models')  # before any work
