"""Nothing silent, nothing lost: each family of careless or unlucky use ends with one line naming the
culprit (exit 2), or for an interrupt exit 130, with no traceback and every file saved before unchanged."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
import pretrain
from harness import checkpoints, runs
import test as test_script
import train
from arguments import parse_args
from harness.checkpoints import atomic_save
from conftest import digests, exits_with, mounted_tmpfs, tiny_run_flags as flags
from dataloader import FewShotDataset, eval_transform
from harness.demo import write_colour_dataset
from tests.small_data import write_tiered_dataset
from networks import build_encoder
from base.console import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import check_dataset  # from scripts/ (pytest.ini puts it on the path)


# ------------------------------------------------------------------ numeric flags
@pytest.mark.parametrize('flag,value', [('--lr', '-0.1'), ('--lr_network', '-1'), ('--gamma', '-0.2'), ('--gamma', '1.5'),
                                        ('--wd', '-0.0005'), ('--mo', '0'), ('--mo', '1'), ('--N', '1'), ('--delta', '0'),
                                        ('--point', '0'), ('--tau', '0')])
def test_train_refuses_a_flag_outside_its_domain_before_any_work(data, tmp_path, capsys, flag, value):
    line = exits_with(train.main, flags(data, tmp_path / 'saves', flag, value), capsys)
    assert line.startswith(f'error: {flag} must be') and float(line.rsplit('got ', 1)[1]) == float(value)
    assert not os.path.exists(tmp_path / 'saves' / 'trained_models')


@pytest.mark.parametrize('entry,flag,value', [('test', '--N', '1'), ('test', '--mo', '0'),
                                              ('pretrain', '--lr', '-1'), ('pretrain', '--wd', '-1'),
                                              ('pretrain', '--gamma', '2'), ('pretrain', '--val_way', '1')])
def test_every_entry_point_checks_domains(data, tmp_path, capsys, entry, flag, value):
    if entry == 'test':
        line = exits_with(test_script.main, flags(data, tmp_path, '--model_path', __file__, flag, value), capsys)
    else:
        line = exits_with(pretrain.main, ['--data_path', str(data), '--save_dir', str(tmp_path), '--network_name', 'convnet',
                                     '--n_workers', '0', flag, value], capsys)
    assert line.startswith(f'error: {flag} must be')


# ------------------------------------------------------------------ images
def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    root = write_colour_dataset(tmp_path / 'data')
    first = FewShotDataset(root, 'train', eval_transform()).filenames[0]
    path = os.path.join(root, 'images', first)
    Image.fromarray(values).save(path, format='PNG')  # a 16-bit greyscale PNG under the listed name
    image = FewShotDataset(root, 'train', eval_transform()).load_image(0)
    assert Image.open(path).mode in ('I;16', 'I')
    np.testing.assert_array_equal(np.asarray(image)[0, :, 0], [0, 1, 128, 255])  # 65535 -> 255, not white


def test_an_image_mode_without_a_faithful_conversion_is_refused_and_reported(tmp_path, capsys):
    root = write_colour_dataset(tmp_path / 'data')
    first = FewShotDataset(root, 'train', eval_transform()).filenames[0]
    path = os.path.join(root, 'images', first)
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(path, format='TIFF')  # mode F
    with pytest.raises(UserError) as error:
        FewShotDataset(root, 'train', eval_transform()).load_image(0)
    assert path in str(error.value) and 'mode F' in str(error.value)
    assert check_dataset.main(['--data_path', root, '--N', '2', '--Q', '2', '--sample', '1000']) == 2
    assert 'mode F cannot be converted' in capsys.readouterr().out


# ------------------------------------------------------------------ non-finite numbers
@pytest.mark.parametrize('tensor', ['encoder.encoder.0.1.running_var', 'encoder.encoder.0.0.weight'])
def test_a_nan_in_pretrained_weights_is_refused_naming_the_tensor(data, tmp_path, capsys, tensor):
    state = {f'encoder.{k}': v.clone() for k, v in build_encoder('convnet').state_dict().items()}
    assert tensor in state
    state[tensor].view(-1)[0] = float('nan')
    path = tmp_path / 'con-pre.pth'
    torch.save({'params': state}, path)
    line = exits_with(train.main, flags(data, tmp_path / 'saves', '--pretrained', str(path)), capsys)
    assert str(path) in line and tensor[len('encoder.'):] in line and 'non-finite' in line
    assert not os.path.exists(tmp_path / 'saves' / 'trained_models' / 'x')  # nothing trained


# ------------------------------------------------------------------ splits
def rewrite(path, transform):
    with open(path, encoding='utf-8') as f:
        text = f.read()
    with open(path, 'w', encoding='utf-8') as f:
        f.write(transform(text))


def test_a_repeated_row_a_missing_header_and_shared_classes_are_refused(data, tmp_path, capsys):
    test_csv = os.path.join(data, 'split', 'test.csv')
    original = open(test_csv).read()
    rewrite(test_csv, lambda text: text + text.splitlines()[1] + '\n')
    line = exits_with(train.main, flags(data, tmp_path), capsys)
    assert test_csv in line and 'twice' in line
    rewrite(test_csv, lambda text: '\n'.join(original.splitlines()[1:]) + '\n')  # no header line
    line = exits_with(train.main, flags(data, tmp_path), capsys)
    assert test_csv in line and 'no header' in line
    shutil.copyfile(os.path.join(data, 'split', 'train.csv'), test_csv)  # the test split is the train split
    for main in (train.main, test_script.main):
        line = exits_with(main, flags(data, tmp_path, '--model_path', __file__) if main is test_script.main
                     else flags(data, tmp_path), capsys)
        assert 'train split' in line and 'test split' in line and '--allow_overlap' in line
    assert len(train.main(flags(data, tmp_path, '--allow_overlap'))['test_accuracies']) == 2


@pytest.mark.parametrize('encoding', ['utf-16', 'latin-1'])
def test_a_split_file_in_another_encoding_is_one_line(data, tmp_path, capsys, encoding):
    path = os.path.join(data, 'split', 'val.csv')
    text = open(path).read().replace('filename', 'fïlename')
    with open(path, 'w', encoding=encoding) as f:
        f.write(text)
    line = exits_with(train.main, flags(data, tmp_path), capsys)
    assert path in line and 'UTF-8' in line


def test_utf8_with_a_byte_order_mark_is_read(data, tmp_path):
    path = os.path.join(data, 'split', 'val.csv')
    plain = FewShotDataset(str(data), 'val')
    with open(path, 'rb') as f:
        raw = f.read()
    with open(path, 'wb') as f:
        f.write(b'\xef\xbb\xbf' + raw)
    bom = FewShotDataset(str(data), 'val')
    assert bom.filenames == plain.filenames and bom.class_names == plain.class_names


def test_a_folder_where_a_split_file_should_be(data, tmp_path, capsys):
    path = os.path.join(data, 'split', 'val.csv')
    os.remove(path)
    os.mkdir(path)
    line = exits_with(train.main, flags(data, tmp_path), capsys)
    assert path in line and 'is a folder' in line


# ------------------------------------------------------------------ runs
def interrupted_run(data, save_dir, monkeypatch, capsys):
    """A run stopped by Ctrl-C after its first gap: its state is saved, unfinished."""
    argv = flags(data, save_dir, '--n_training_episodes', '4', '--episode_gap', '2')
    real, calls = train.train_one_gap, []

    def stop_on_the_second_gap(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(train, 'train_one_gap', stop_on_the_second_gap)
    exits_with(train.main, argv, capsys, code=130)
    monkeypatch.setattr(train, 'train_one_gap', real)
    return argv


def test_resume_with_overwrite_keeps_the_unfinished_run(data, tmp_path, monkeypatch, capsys):
    argv = interrupted_run(data, tmp_path, monkeypatch, capsys)
    before = digests(tmp_path / 'trained_models')
    line = exits_with(train.main, argv + ['--resume', '--overwrite'], capsys)
    assert '--resume' in line and '--overwrite' in line
    assert digests(tmp_path / 'trained_models') == before


def test_resume_with_a_changed_flag_names_the_unfinished_run(data, tmp_path, monkeypatch, capsys):
    argv = interrupted_run(data, tmp_path, monkeypatch, capsys)
    saved = runs.run_name(parse_args(argv))
    before = digests(tmp_path)
    line = exits_with(train.main, argv + ['--resume', '--lr', '0.02'], capsys)
    assert saved in line and 'lr (0.02 here, 0.01 there)' in line
    assert {path: digest for path, digest in digests(tmp_path).items() if path in before} == before
    assert train.main(argv + ['--resume'])['statistics']['training_loss']  # the flags of the saved run continue it


def test_test_py_takes_a_last_state(data, tmp_path, capsys):
    argv = flags(data, tmp_path)
    trained = train.main(argv)
    last = runs.run_paths(parse_args(argv)).last
    capsys.readouterr()
    result = test_script.main(argv + ['--model_path', last])[(2, 1)]
    assert 'the last state' in capsys.readouterr().out
    assert len(result.accuracies) == len(trained['test_accuracies'])


def test_one_run_in_another_setting_is_evaluated_and_said(data, tmp_path, capsys):
    argv = flags(data, tmp_path)
    train.main(argv)
    capsys.readouterr()
    result = test_script.main(flags(data, tmp_path, '--N', '3', '--K', '2'))
    assert list(result) == [(3, 2)]
    assert 'evaluating the one trained as 2-way 1-shot' in capsys.readouterr().out


def test_a_run_being_trained_by_another_process_is_refused(data, tmp_path, capsys):
    argv = flags(data, tmp_path, '--n_training_episodes', '100000', '--episode_gap', '100000')
    lock = runs.run_paths(parse_args(argv)).identity
    process = subprocess.Popen([sys.executable, 'train.py', *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.isfile(lock) and open(lock).read().strip()):  # written when locked
            time.sleep(0.2)
        line = exits_with(train.main, argv + ['--resume'], capsys)
        assert 'being trained by another process' in line and lock in line
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and 'Traceback' not in err
    runs.lock_run(runs.run_paths(parse_args(argv)))  # the lock went with the process (as with a crash)


# ------------------------------------------------------------------ output paths
def test_output_paths_are_checked_before_any_work(data, tmp_path, capsys):
    (tmp_path / 'a_file').write_text('x')
    line = exits_with(train.main, flags(data, tmp_path / 'a_file'), capsys)
    assert str(tmp_path / 'a_file') in line and '--save_dir' in line and 'is a file' in line
    os.mkdir(tmp_path / 'figures')
    line = exits_with(test_script.main, flags(data, tmp_path, '--model_path', __file__, '--json', str(tmp_path / 'figures')),
                 capsys)
    assert str(tmp_path / 'figures') in line and '--json' in line and 'folder' in line


@pytest.fixture
def full_disk(tmp_path):
    """A real file system of 512 KiB (tmpfs; needs root), unmounted afterwards."""
    yield from mounted_tmpfs(tmp_path / 'small_disk', 'size=512k')


def test_a_full_disk_while_saving_keeps_the_previous_file(full_disk, data, capsys):
    target = full_disk / 'run.model'
    atomic_save({'w': torch.ones(8)}, str(target))
    before = target.read_bytes()
    with pytest.raises(UserError) as error:
        atomic_save({'w': torch.zeros(300_000)}, str(target))  # 1.2 MB on a 512 KiB disk
    assert str(target) in str(error.value)
    assert target.read_bytes() == before and sorted(os.listdir(full_disk)) == ['run.model']
    fd = os.open(full_disk / 'filler', os.O_WRONLY | os.O_CREAT)  # the disk now full (unbuffered writes)
    try:
        while True:
            os.write(fd, b'\0' * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    line = exits_with(train.main, flags(data, full_disk / 'saves'), capsys)
    assert str(full_disk / 'saves') in line and 'Traceback' not in line
    assert target.read_bytes() == before


# ------------------------------------------------------------------ interrupts
def test_sigterm_during_the_test_is_one_line_and_130(tmp_path):
    data = write_colour_dataset(tmp_path / 'data')
    argv = flags(data, tmp_path, '--n_testing_episodes', '100000', '--eval_mode', 'episodic')
    model = checkpoints.build_model(parse_args(argv), pretrained=False)
    atomic_save({'state_dict': model.state_dict()}, str(tmp_path / 'x.model'))
    process = subprocess.Popen([sys.executable, 'test.py', *argv, '--model_path', str(tmp_path / 'x.model')], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    try:
        for line in process.stdout:  # the episodes have started once their way is said
            if 'episodic evaluation' in line:
                break
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and 'Traceback' not in err
    assert err.strip().splitlines()[-1].startswith('interrupted during the test')


def test_ctrl_c_during_the_one_time_conversion_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    root = write_tiered_dataset(str(tmp_path / 'tiered'), compressed=True)
    import zipfile
    real, reads = zipfile.ZipExtFile.read, []

    def interrupted_read(self, *args):
        if args and args[0] == 1 << 24:  # the conversion's chunks, not the header
            reads.append(1)
            if len(reads) == 1:
                raise KeyboardInterrupt
        return real(self, *args)
    monkeypatch.setattr(zipfile.ZipExtFile, 'read', interrupted_read)
    model = checkpoints.build_model(parse_args(flags(root, tmp_path)), pretrained=False)
    atomic_save({'state_dict': model.state_dict()}, str(tmp_path / 'x.model'))
    line = exits_with(test_script.main, flags(root, tmp_path, '--model_path', str(tmp_path / 'x.model')), capsys, code=130)
    assert line.startswith('interrupted')
    assert reads and [f for f in os.listdir(root) if 'part' in f or f.endswith('.npy')] == []


# ------------------------------------------------------------------ files from elsewhere run no code
class Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_a_checkpoint_that_would_run_code_is_refused(data, tmp_path, capsys):
    model = checkpoints.build_model(parse_args(flags(data, tmp_path)), pretrained=False)
    marker = tmp_path / 'ran'
    torch.save({'state_dict': model.state_dict(), 'extra': Shell(marker)}, tmp_path / 'x.model')
    line = exits_with(test_script.main, flags(data, tmp_path, '--model_path', str(tmp_path / 'x.model')), capsys)
    assert str(tmp_path / 'x.model') in line
    assert not marker.exists()


# ------------------------------------------------------------------ the first hour
def test_check_dataset_counts_what_it_lists(tmp_path, capsys):
    root = write_colour_dataset(tmp_path / 'data', classes_per_split=(14, 3, 3), images_per_class=2)
    assert check_dataset.main(['--data_path', root, '--N', '2', '--K', '1', '--Q', '15']) == 2
    out = capsys.readouterr().out
    listed = out.count('images, fewer than K + Q') + sum(int(line.split()[3]) for line in out.splitlines()
                                                         if line.strip().startswith('- ... and'))
    assert f'{listed} problems found' in out and listed == 20


def test_no_document_refers_to_a_file_outside_the_repository():
    for folder, _, files in os.walk(ROOT):
        if '.git' in folder or 'saves' in folder or 'datasets' in folder:
            continue
        for name in files:
            if name.endswith(('.md', '.py', '.ipynb')):
                with open(os.path.join(folder, name), encoding='utf-8') as f:
                    assert '..' + '/shared' not in f.read(), os.path.join(folder, name)
