"""The output rule, exact: a file is the programs' by its structure, never by a substring; every file a command
reads is an input, with or without --overwrite; the final name is proven before any work; pipes, devices and '-'
are refused without being read; pretrain.py refuses a file it never wrote without offering --overwrite."""
import json
import os
import threading

import pytest

import test as test_script
import train
from conftest import exits_with, tiny_run_flags as flags
from base.console import UserError
from harness.outputs import OUTPUT_MARK, check_output, save_figure, written_here


def test_a_file_that_merely_contains_the_mark_is_the_users(tmp_path):
    summary = tmp_path / 'summary.json'
    summary.write_text(json.dumps({'earlier': [{'written_by': OUTPUT_MARK}], 'note': OUTPUT_MARK}))
    with pytest.raises(UserError, match='not written by this program'):
        check_output(str(summary), '--json', overwrite=False)
    ours = tmp_path / 'figures.json'
    ours.write_text(json.dumps({'settings': [], 'written_by': OUTPUT_MARK}))
    check_output(str(ours), '--json', overwrite=False)
    table = tmp_path / 'table.csv'
    table.write_text(f'name,value\n{",".join(["file", "prediction", "probability"])},1\n')
    assert not written_here(str(table), ['file', 'prediction', 'probability'])
    table.write_text('file,prediction,probability,a,b\nx.jpg,a,0.5,0.5,0.5\n')
    assert written_here(str(table), ['file', 'prediction', 'probability'])


def test_a_picture_is_the_programs_by_its_metadata_field(tmp_path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    figure = plt.figure(figsize=(1, 1))
    for extension in ('.png', '.pdf', '.svg'):
        save_figure(figure, str(tmp_path / f'ours{extension}'))
        assert written_here(str(tmp_path / f'ours{extension}'))
        figure.savefig(str(tmp_path / f'theirs{extension}'), metadata={'Title': OUTPUT_MARK})  # the mark, elsewhere
        assert not written_here(str(tmp_path / f'theirs{extension}'))
    plt.close(figure)


def test_the_final_name_is_proven_before_any_work(tmp_path):
    with pytest.raises(UserError, match='folder'):
        check_output(str(tmp_path / 'new') + '/', '--json')
    assert not (tmp_path / 'new').exists()  # no folder left under the output's name
    with pytest.raises(UserError, match='shorter'):
        check_output(str(tmp_path / ('x' * 240 + '.json')), '--json')  # valid, but its temporary name is not
    check_output(str(tmp_path / ('x' * 200 + '.json')), '--json')
    with pytest.raises(UserError, match='standard output'):
        check_output('-', '--json')


def test_a_pipe_is_refused_without_being_read(tmp_path):
    fifo = tmp_path / 'pipe.json'
    os.mkfifo(fifo)
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(pytest.raises(UserError, check_output, str(fifo),
                                                                          '--json', overwrite=True)), daemon=True)
    worker.start()
    worker.join(20)
    assert outcome and 'regular file' in str(outcome[0].value)  # answered at once, nothing read from the pipe
    with pytest.raises(UserError, match='regular file'):
        check_output('/dev/null', '--json', overwrite=True)


def test_test_py_never_writes_over_another_split_it_reads(data, tmp_path, capsys):
    argv = flags(data, tmp_path / 'saves')
    train.main(argv)
    for split in ('train', 'val'):
        csv = data / 'split' / f'{split}.csv'
        before = csv.read_bytes()
        line = exits_with(test_script.main, [*argv, '--json', str(csv), '--overwrite'], capsys)
        assert 'input' in line and str(csv) in line and csv.read_bytes() == before


def test_pretrain_refuses_a_file_it_never_wrote_without_offering_overwrite(data, tmp_path, capsys):
    import pretrain
    out = tmp_path / 'weights.pth'
    out.write_bytes(b'my own weights')
    argv = ['--data_path', str(data), '--save_dir', str(tmp_path / 's'), '--network_name', 'convnet', '--epochs', '1',
            '--batch_size', '8', '--val_way', '3', '--val_shot', '1', '--val_query', '2', '--val_episodes', '2',
            '--n_workers', '0', '--out', str(out)]
    line = exits_with(pretrain.main, argv, capsys)
    assert str(out) in line and '--overwrite' not in line and out.read_bytes() == b'my own weights'
