"""Resuming: an interrupted run continues to exactly the parameters and statistics of an uninterrupted one."""
import os

import pytest
import torch
from harness import runs
import train
from arguments import parse_args


def flags(data, save_dir, episodes):
    return ['--data_path', data, '--save_dir', str(save_dir), '--network_name', 'resnet', '--pretrained', 'none',
            '--N', '2', '--K', '1', '--Q', '1', '--n_training_episodes', str(episodes), '--episode_gap', '1',
            '--n_validating_episodes', '2', '--n_testing_episodes', '2', '--n_workers', '0', '--point', '1', '2',
            '--lr_network', '0.05', '--lr', '0.05']


def last_record(save_dir, data, episodes):
    path = runs.run_paths(parse_args(flags(data, save_dir, episodes))).last
    return torch.load(path, map_location='cpu', weights_only=False)


def assert_same_run(a, b):
    assert a['episode'] == b['episode']
    assert a['statistics'] == b['statistics']
    assert a['best_accuracy'] == b['best_accuracy']
    assert a['forward_count'] == b['forward_count']
    assert a['state_dict'].keys() == b['state_dict'].keys()
    for key in a['state_dict']:
        assert torch.equal(a['state_dict'][key], b['state_dict'][key]), key
    assert a['scheduler'] == b['scheduler']
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['momentum_buffer'], sb['momentum_buffer'])


@pytest.fixture(scope='module')
def uninterrupted(tiny_dataset, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp('straight')
    result = train.main(flags(tiny_dataset, save_dir, 3))
    return last_record(save_dir, tiny_dataset, 3), result


def test_uninterrupted_run_trains(uninterrupted):
    record, result = uninterrupted
    assert record['episode'] == 3 and record['finished']
    assert len(result['statistics']['training_loss']) == 3
    assert record['forward_count'] > 3  # training and evaluation passes both count


def interrupt_third_gap(data, save_dir, monkeypatch):
    """Run the 3-episode training (one episode a gap) with a Ctrl-C during its third episode, after its
    random draws and its backward pass; returns train.main's exit code."""
    real_step, calls = torch.optim.SGD.step, []

    def interrupted_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            torch.manual_seed(12345)  # the lost episode's random draws must not matter
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.SGD, 'step', interrupted_step)
        with pytest.raises(SystemExit) as exit_info:
            train.main(flags(data, save_dir, 3))
    return exit_info.value.code


def test_ctrl_c_saves_and_resume_matches_uninterrupted(tiny_dataset, tmp_path, monkeypatch, uninterrupted, capsys):
    assert interrupt_third_gap(tiny_dataset, tmp_path, monkeypatch) == 130
    err = capsys.readouterr().err
    assert 'interrupted during episode 3; the state after episode 2 is saved' in err and '--resume' in err
    record = last_record(tmp_path, tiny_dataset, 3)
    assert record['episode'] == 2 and not record['finished']

    # without --resume an unfinished run is never overwritten
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags(tiny_dataset, tmp_path, 3))
    assert exit_info.value.code == 2
    assert 'add --resume' in capsys.readouterr().err
    assert last_record(tmp_path, tiny_dataset, 3)['episode'] == 2

    train.main(flags(tiny_dataset, tmp_path, 3) + ['--resume'])
    assert_same_run(last_record(tmp_path, tiny_dataset, 3), uninterrupted[0])
    log = os.path.join(tmp_path, 'statistics', runs.run_name(parse_args(flags(tiny_dataset, tmp_path, 3))) + '.log.jsonl')
    with open(log) as f:
        assert len(f.readlines()) == 3  # one line per validation, none repeated by the resume
