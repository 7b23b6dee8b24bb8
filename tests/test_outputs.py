"""What the programs write: never an input of the same command, never a file they did not write without
--overwrite, never through a planted link, always whole; the result before anything optional; and damaged or
odd input as one line with exit code 2 (or a note where the work goes on)."""
import json
import os
import shutil
import struct
import subprocess
import sys
import types
import zlib

import pytest
import torch
import test as test_script
import train
from arguments import parse_args
from harness.checkpoints import atomic_save
from conftest import digests, exits_with, mounted_tmpfs, tiny_run_flags as flags
from harness.runs import run_paths
from base.console import UserError
from harness.outputs import OUTPUT_MARK, check_output, claim_output_folder

import adaptor_study  # from scripts/ (pytest.ini puts it on the path)
import classify
import plot_curves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def trained(tiny_dataset, tmp_path_factory):
    """A tiny finished run (its checkpoint and its flags), trained once for the module."""
    saves = tmp_path_factory.mktemp('saves')
    argv = flags(tiny_dataset, saves)
    train.main(argv)
    return argv, run_paths(parse_args(argv)).best


def bomb_png(path) -> None:
    """A PNG whose header claims 20000 x 20000 pixels (PIL refuses it as a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 20000, 20000, 8, 2, 0, 0, 0))
                + chunk(b'IDAT', zlib.compress(b'\0')) + chunk(b'IEND', b''))


# ------------------------------------------------------------------ the one rule
def test_the_rule_refuses_inputs_foreign_files_folders_and_formats(tmp_path):
    given = tmp_path / 'weights.pth'
    given.write_bytes(b'weights')
    os.symlink(given, tmp_path / 'link.json')
    for path in (given, tmp_path / 'link.json'):  # by any name
        with pytest.raises(UserError, match='input'):
            check_output(str(path), '--json', [str(given)])
    foreign = tmp_path / 'notes.json'
    foreign.write_text('{"mine": 1}')
    with pytest.raises(UserError, match='--overwrite'):
        check_output(str(foreign), '--json', overwrite=False)
    with pytest.raises(UserError, match=str(foreign)):  # a command without --overwrite
        check_output(str(foreign), '--json')
    check_output(str(foreign), '--json', overwrite=True)
    ours = tmp_path / 'figures.json'
    ours.write_text(json.dumps({'written_by': OUTPUT_MARK}))
    check_output(str(ours), '--json')  # its own file: replaced without a word
    with pytest.raises(UserError, match='folder'):
        check_output(str(tmp_path), '--json')
    with pytest.raises(UserError, match=r'\.png'):
        check_output(str(tmp_path / 'picture.xyz'), '--picture', formats=['.png'])
    assert digests(tmp_path)[str(given)] and given.read_bytes() == b'weights'


def test_a_folder_of_outputs_is_new_empty_or_the_programs(tmp_path):
    users = tmp_path / 'mine'
    users.mkdir()
    (users / 'results.md').write_text('my notes')
    with pytest.raises(UserError, match='not empty'):
        claim_output_folder(str(users), '--out')
    assert (users / 'results.md').read_text() == 'my notes'
    claim_output_folder(str(tmp_path / 'new'), '--out')
    (tmp_path / 'new' / 'results.md').write_text('written by the study')
    claim_output_folder(str(tmp_path / 'new'), '--out')  # the programs' own: fine


def test_test_py_never_writes_onto_its_inputs(trained, tiny_dataset, tmp_path):
    """Through the real process: --json at the checkpoint or at the split file exits 2, both byte-identical."""
    argv, best = trained
    before = {**digests(os.path.dirname(best)), **digests(tiny_dataset)}
    for target in (best, os.path.join(tiny_dataset, 'split', 'test.csv')):
        done = subprocess.run([sys.executable, os.path.join(ROOT, 'test.py'), *argv, '--json', target],
                              capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 2 and 'Traceback' not in done.stderr
        assert '--json' in done.stderr and target in done.stderr
    assert {**digests(os.path.dirname(best)), **digests(tiny_dataset)} == before


def test_json_replaces_its_own_file_and_a_foreign_one_only_with_overwrite(trained, tmp_path, capsys):
    argv, _ = trained
    mine = tmp_path / 'figures.json'
    mine.write_text('my own figures')
    assert str(mine) in exits_with(test_script.main, argv + ['--json', str(mine)], capsys)
    assert mine.read_text() == 'my own figures'
    test_script.main(argv + ['--json', str(mine), '--overwrite'])
    assert json.loads(mine.read_text())['settings'][0]['episodes'] == 2
    test_script.main(argv + ['--json', str(mine)])  # now the program's own: replaced without --overwrite


def test_classify_never_writes_onto_a_photo_and_checks_formats_first(trained, tiny_dataset, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, best = trained
    support = tmp_path / 'support'
    images = sorted(os.listdir(os.path.join(tiny_dataset, 'images')))
    for c, name in enumerate(images[:2]):
        os.makedirs(support / f'class{c}')
        shutil.copy(os.path.join(tiny_dataset, 'images', name), support / f'class{c}' / name)
    query = tmp_path / 'photo.jpg'
    shutil.copy(os.path.join(tiny_dataset, 'images', images[2]), query)
    before = digests(tmp_path)
    base = ['--model_path', best, '--support', str(support), '--query', str(query)]
    for flag in ('--out', '--picture'):
        assert flag in exits_with(classify.main, base + [flag, str(query)], capsys)
        assert flag in exits_with(classify.main, base + [flag, str(support / 'class0' / images[0])], capsys)
    assert '.png' in exits_with(classify.main, base + ['--picture', str(tmp_path / 'p.xyz')], capsys)
    assert '.csv' in exits_with(classify.main, base + ['--out', str(tmp_path / 'p.xlsx')], capsys)
    assert 'encoding' not in capsys.readouterr().out and digests(tmp_path) == before  # refused before any work
    result = classify.main(base + ['--out', str(tmp_path / 'p.csv'), '--picture', str(tmp_path / 'p.png')])
    classify.main(base + ['--out', str(tmp_path / 'p.csv'), '--picture', str(tmp_path / 'p.png')])  # its own
    assert len(result['predictions']) == 1
    notes = tmp_path / 'notes.csv'
    notes.write_text('my,own,table\n')
    assert '--out' in exits_with(classify.main, base + ['--out', str(notes)], capsys)
    assert notes.read_text() == 'my,own,table\n'
    classify.main(base + ['--out', str(notes), '--overwrite'])
    assert notes.read_text().startswith('file,prediction,probability')


def test_a_picture_replaces_a_foreign_file_only_with_overwrite(trained, tmp_path, capsys):
    argv, _ = trained
    stat = run_paths(parse_args(argv)).stat
    mine = tmp_path / 'curves.png'
    mine.write_bytes(b'my own picture')
    assert str(mine) in exits_with(plot_curves.main, ['--stat', stat, '--out', str(mine)], capsys)
    assert mine.read_bytes() == b'my own picture'
    plot_curves.main(['--stat', stat, '--out', str(mine), '--overwrite'])
    assert mine.read_bytes().startswith(b'\x89PNG')
    plot_curves.main(['--stat', stat, '--out', str(mine)])  # now the script's own: replaced without --overwrite


def test_a_study_out_is_new_empty_or_its_own(tmp_path, capsys):
    users = tmp_path / 'mine'
    users.mkdir()
    for name in ('results.md', 'results.json', 'study.png'):
        (users / name).write_text('the user\'s own')
    before = digests(users)
    assert str(users) in exits_with(adaptor_study.main, ['--out', str(users), '--quick', '--levels', 'feature'], capsys)
    assert digests(users) == before


def test_a_stage_path_holding_another_torch_file_is_named(tmp_path, capsys):
    out = tmp_path / 'out'
    claim_output_folder(str(out), '--out')
    stage = out / 'feature' / 'quick-sigma0.5-s0-tau1-seed960402.pt'
    atomic_save({'something': torch.zeros(2)}, str(stage))
    line = exits_with(adaptor_study.main, ['--out', str(out), '--quick', '--levels', 'feature'], capsys)
    assert str(stage) in line


# ------------------------------------------------------------------ stored embeddings: links, the result first
def test_a_link_planted_in_the_features_folder_is_never_written_through(trained, tmp_path, capsys):
    argv, _ = trained
    saves = tmp_path / 'saves'
    shutil.copytree(os.path.dirname(os.path.dirname(trained[1])), saves)
    argv = [a if a != argv[argv.index('--save_dir') + 1] else str(saves) for a in argv] + ['--eval_mode', 'cached']
    test_script.main(argv)
    features = saves / 'features'
    names = sorted(os.listdir(features))
    shutil.rmtree(features)
    features.mkdir()
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious')
    for name in names:  # the final names, and every name the writer used to write before its rename
        for planted in (name, name + '.tmp', name + '.part', name + '.part.npy'):
            os.symlink(victim, features / planted)
    capsys.readouterr()
    test_script.main(argv)
    assert 'stored in' in capsys.readouterr().out
    assert victim.read_text() == 'precious'
    for name in names:
        assert not os.path.islink(features / name)
    test_script.main(argv)
    assert 'reused from' in capsys.readouterr().out


@pytest.fixture
def read_only(tmp_path):
    yield from mounted_tmpfs(tmp_path / 'read_only', 'ro,size=64k')


def test_a_store_that_cannot_be_written_comes_after_the_result(trained, tmp_path, read_only):
    """test.py and train.py print the accuracy, then one warning, and exit 0 when the features folder cannot be
    written (a read-only file system)."""
    argv, _ = trained
    saves = tmp_path / 'saves'
    shutil.copytree(os.path.dirname(os.path.dirname(trained[1])), saves)
    os.symlink(read_only, saves / 'features')
    argv = [a if a != argv[argv.index('--save_dir') + 1] else str(saves) for a in argv] + ['--eval_mode', 'cached']
    for script, extra in (('test.py', []), ('train.py', ['--overwrite'])):
        done = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, *extra], capture_output=True,
                              text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        result = next(i for i, line in enumerate(lines) if line.startswith('test accuracy'))
        warning = next(i for i, line in enumerate(lines) if line.startswith('warning: the embeddings were not stored'))
        assert result < warning


# ------------------------------------------------------------------ damaged or odd input: one line
def test_damaged_or_odd_input_is_one_line(trained, tiny_dataset, tmp_path, capsys):
    argv, best = trained
    text = tmp_path / 'notes.model'
    text.write_text('this is not a checkpoint\n' * 20)
    assert str(text) in exits_with(test_script.main, argv + ['--model_path', str(text)], capsys)
    assert '--tau' in exits_with(test_script.main, argv + ['--tau', 'inf'], capsys)
    assert '--delta' in exits_with(test_script.main, argv + ['--delta', 'nan'], capsys)
    assert '--seed' in exits_with(test_script.main, argv + ['--seed', str(2 ** 64)], capsys)
    line = exits_with(train.main, flags(tiny_dataset, tmp_path / 's', '--freeze_encoder'), capsys)
    assert '--freeze_encoder' in line and '--pretrained' in line
    assert '--pretrained' in exits_with(classify.main, ['--pretrained', 'none', '--support', str(tmp_path),
                                                        '--query', str(text)], capsys)


def test_an_image_past_pils_limit_is_named(trained, data, tmp_path, capsys):
    argv, best = trained
    images = os.path.join(data, 'images')
    with open(os.path.join(data, 'split', 'test.csv')) as f:
        name = f.read().splitlines()[1].split(',')[0]
    bomb_png(os.path.join(images, name))  # the file keeps its name: the loader reads it by content
    test_argv = [a if a != argv[argv.index('--data_path') + 1] else str(data) for a in argv]
    line = exits_with(test_script.main, test_argv + ['--model_path', best], capsys)
    assert name in line and 'pixels' in line
    query = tmp_path / 'huge.png'
    bomb_png(query)
    support = tmp_path / 'support'
    for c in range(2):
        os.makedirs(support / f'c{c}')
        shutil.copy(os.path.join(images, sorted(os.listdir(images))[-1 - c]), support / f'c{c}')
    line = exits_with(classify.main, ['--model_path', best, '--support', str(support), '--query', str(query)], capsys)
    assert str(query) in line and 'pixels' in line


def test_a_split_row_leaving_the_data_root_is_refused(trained, data, tmp_path, capsys):
    argv, best = trained
    outside = tmp_path / 'outside.jpg'
    shutil.copy(os.path.join(data, 'images', sorted(os.listdir(os.path.join(data, 'images')))[0]), outside)
    csv_path = os.path.join(data, 'split', 'test.csv')
    with open(csv_path) as f:
        lines = f.read().splitlines()
    test_argv = [a if a != argv[argv.index('--data_path') + 1] else str(data) for a in argv] + ['--model_path', best]
    for row in (f'../../outside.jpg,{lines[1].split(",")[1]}', f'{outside},{lines[1].split(",")[1]}'):
        with open(csv_path, 'w') as f:
            f.write('\n'.join([lines[0], row, *lines[2:]]) + '\n')
        assert 'line 2' in exits_with(test_script.main, test_argv, capsys)
        done = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'check_dataset.py'), '--data_path',
                               str(data)], capture_output=True, text=True)
        assert done.returncode == 2 and 'line 2' in done.stderr + done.stdout


def test_a_run_record_whose_name_leaves_save_dir_is_ignored(trained, tmp_path, capsys):
    """A record differing only in N (the one run test.py would evaluate in another setting) whose name climbs out
    of --save_dir: not used, so its checkpoint elsewhere is never loaded."""
    argv, best = trained
    saves = tmp_path / 'saves'
    os.makedirs(saves / 'statistics')
    argv = [a if a != argv[argv.index('--save_dir') + 1] else str(saves) for a in argv]
    with open(run_paths(parse_args(trained[0])).identity) as f:
        identity = json.load(f)
    escape = tmp_path / 'elsewhere'
    os.makedirs(escape / 'trained_models')
    shutil.copy(best, escape / 'trained_models' / 'x.model')
    identity.update(N=3, run=os.path.join('..', '..', 'elsewhere', 'trained_models', 'x'))
    with open(saves / 'statistics' / 'x.run.json', 'w') as f:
        json.dump(identity, f)
    capsys.readouterr()
    exits_with(test_script.main, argv, capsys)
    assert 'loaded' not in capsys.readouterr().out


def test_a_tensorboard_that_breaks_on_import_is_one_line(tiny_dataset, tmp_path, capsys, monkeypatch):
    broken = types.ModuleType('torch.utils.tensorboard')

    def fail(name):
        raise TypeError('Descriptors cannot be created directly')
    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', broken)
    line = exits_with(train.main, flags(tiny_dataset, tmp_path / 's', '--tensorboard'), capsys)
    assert '--tensorboard' in line and 'tensorboard' in line


def test_a_torchvision_that_does_not_fit_torch_is_named_before_any_work(tmp_path):
    fake = tmp_path / 'torchvision'
    fake.mkdir()
    (fake / '__init__.py').write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, 'test.py'), '--demo'], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, 'PYTHONPATH': str(tmp_path)})
    assert done.returncode == 2 and 'Traceback' not in done.stderr
    assert 'torchvision' in done.stderr and 'pip install' in done.stderr
    assert not (tmp_path / 'datasets').exists()


def test_classify_says_what_it_skipped(trained, tiny_dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, best = trained
    images = os.path.join(tiny_dataset, 'images')
    support = tmp_path / 'support'
    for c, name in enumerate(sorted(os.listdir(images))[:2]):
        os.makedirs(support / f'c{c}' / 'nested')
        shutil.copy(os.path.join(images, name), support / f'c{c}')
    queries = tmp_path / 'queries'
    (queries / 'sub').mkdir(parents=True)
    (queries / 'readme.txt').write_text('not an image')
    shutil.copy(os.path.join(images, sorted(os.listdir(images))[3]), queries)
    result = classify.main(['--model_path', best, '--support', str(support), '--query', str(queries)])
    assert result['skipped'] == [('class c0', 1, 0), ('class c1', 1, 0), (f'query folder {queries}', 1, 1)]
    assert len(capsys.readouterr().out.split('note:')) == 4  # each said
    assert len(result['predictions']) == 1
