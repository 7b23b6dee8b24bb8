"""Flags of the speed issue through the entry points: --channels_last, --eval_mode, --amp, --flag_debug."""
import pytest
import torch
import test as test_script
import train
from arguments import parse_args


def flags(data, save_dir, *extra):
    return ['--data_path', data, '--save_dir', str(save_dir), '--network_name', 'convnet', '--pretrained', 'none',
            '--N', '3', '--K', '1', '--Q', '2', '--n_training_episodes', '4', '--episode_gap', '2',
            '--n_validating_episodes', '3', '--n_testing_episodes', '6', '--n_workers', '0', *extra]


def test_channels_last_run_and_both_eval_modes_agree(tiny_dataset, tmp_path):
    trained = train.main(flags(tiny_dataset, tmp_path, '--channels_last', '--eval_mode', 'episodic'))
    cached = test_script.main(flags(tiny_dataset, tmp_path, '--eval_mode', 'cached'))[(3, 1)]
    assert cached.mode == 'cached' and trained['test'].mode == 'episodic'
    assert list(cached.accuracies) == list(trained['test_accuracies'])


def test_amp_needs_cuda(tiny_dataset, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip('this machine has a GPU')
    with pytest.raises(SystemExit) as exit_info:
        train.main(flags(tiny_dataset, tmp_path, '--amp'))
    assert exit_info.value.code == 2
    assert '--amp needs a CUDA device' in capsys.readouterr().err


def test_flag_debug_preset(tiny_dataset, tmp_path):
    args = parse_args(['--flag_debug'])
    assert (args.n_training_episodes, args.episode_gap, args.n_validating_episodes, args.n_testing_episodes) == \
        (10, 5, 5, 10)
    args = parse_args(['--flag_debug', '--episode_gap', '2'])
    assert args.episode_gap == 2 and args.n_training_episodes == 10


def test_episode_batch_changes_no_result(tiny_dataset, tmp_path, capsys):
    train.main(flags(tiny_dataset, tmp_path))
    runs_of = {batch: test_script.main(flags(tiny_dataset, tmp_path, '--eval_mode', 'cached', '--episode_batch', batch,
                                             '--n_testing_episodes', '20'))[(3, 1)]
               for batch in ('1', '3', '0')}
    for other in ('3', '0'):
        assert list(runs_of[other].accuracies) == list(runs_of['1'].accuracies)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        test_script.main(flags(tiny_dataset, tmp_path, '--episode_batch', '-1'))
    assert exit_info.value.code == 2 and '--episode_batch' in capsys.readouterr().err
