"""The helper scripts: the Colab notebook, check_dataset.py, plot_curves.py and visualize_masks.py."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import check_dataset  # scripts/ is on pytest's path (pytest.ini)
import plot_curves
from harness import checkpoints, runs
import visualize_masks
from arguments import get_parser, parse_args
from harness.checkpoints import model_state_dict
from tests.small_data import write_tiered_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, 'scripts')
NOTEBOOK = os.path.join(SCRIPTS, 'glofa_colab.ipynb')
# what the notebook's steps do, in the order they must come
STEP_KEYS = ['nvidia-smi', 'drive.mount', 'sample_data/GLoFA', 'mini_imagenet.tar', 'pretrained_weights.pth',
             'pip install', '--model_name protonet --model_path none', 'python train.py', 'python test.py --N',
             'plot_curves', 'visualize_masks']
# scripts whose flags other than their own are train.py's
RUN_FLAG_SCRIPTS = ('plot_curves', 'visualize_masks')


SCRIPT_MODULES = {'check_dataset': check_dataset, 'plot_curves': plot_curves, 'visualize_masks': visualize_masks}


def option_strings(parser) -> set[str]:
    return set(parser._option_string_actions)


# ------------------------------------------------------------------ the notebook
@pytest.fixture(scope='module')
def notebook() -> dict:
    with open(NOTEBOOK) as f:
        return json.load(f)


def source(cell: dict) -> str:
    return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def code_cells(notebook: dict) -> list[str]:
    return [source(c) for c in notebook['cells'] if c['cell_type'] == 'code']


def shell_lines(notebook: dict) -> list[str]:
    return [line.strip()[1:].strip() for cell in code_cells(notebook) for line in cell.splitlines()
            if line.strip().startswith('!')]


def as_python(cell: str) -> str:
    """The cell with its shell (!) and magic (%) lines replaced by ``pass`` at the same indentation."""
    lines = []
    for line in cell.splitlines():
        stripped = line.lstrip()
        lines.append(line[:len(line) - len(stripped)] + 'pass' if stripped.startswith(('!', '%')) else line)
    return '\n'.join(lines) + '\n'


def test_notebook_is_nbformat_4(notebook):
    assert notebook['nbformat'] == 4
    assert isinstance(notebook['cells'], list) and notebook['cells']
    for cell in notebook['cells']:
        assert cell['cell_type'] in ('markdown', 'code')
        assert isinstance(cell['source'], (list, str)) and source(cell).strip()
        if cell['cell_type'] == 'code':
            assert cell['outputs'] == [] and 'execution_count' in cell


def test_notebook_code_cells_compile(notebook):
    for i, cell in enumerate(code_cells(notebook)):
        compile(as_python(cell), f'code cell {i}', 'exec')


def test_notebook_steps_come_in_order(notebook):
    cells = code_cells(notebook)
    first = []
    for key in STEP_KEYS:
        where = [i for i, cell in enumerate(cells) if key in cell]
        assert where, f'no code cell contains {key!r}'
        first.append(where[0])
    assert all(a < b for a, b in zip(first, first[1:])), dict(zip(STEP_KEYS, first))


def test_notebook_flags_exist(notebook):
    run_flags = option_strings(get_parser())
    checked = set()
    for line in shell_lines(notebook):
        match = re.match(r'python\s+(\S+\.py)\b(.*)', line)
        if not match:
            continue
        script, rest = match.groups()
        flags = set(re.findall(r'(?<!\S)(--[A-Za-z_]+)', rest))
        name = os.path.splitext(os.path.basename(script))[0]
        if script in ('train.py', 'test.py'):
            known = run_flags
        else:
            assert script == f'scripts/{name}.py' and name in SCRIPT_MODULES, line
            known = option_strings(SCRIPT_MODULES[name].get_parser())
            if name in RUN_FLAG_SCRIPTS:
                known |= run_flags
        assert flags <= known, f'{line}: unknown {sorted(flags - known)}'
        checked.add(script)
    assert checked == {'train.py', 'test.py', 'scripts/check_dataset.py', 'scripts/plot_curves.py',
                       'scripts/visualize_masks.py'}


def test_notebook_shell_variables_are_defined_before_use(notebook):
    defined = set()
    for cell in code_cells(notebook):
        defined |= set(re.findall(r'^\s*([A-Za-z_]\w*)\s*=', cell, flags=re.M))
        for line in cell.splitlines():
            if line.strip().startswith(('!', '%')):
                used = set(re.findall(r'\{([A-Za-z_]\w*)\}', line))
                assert used <= defined, f'{line.strip()}: {sorted(used - defined)} not defined yet'


def filled_config(notebook, code_source: str) -> str:
    cell = code_cells(notebook)[0]
    assert "CODE_SOURCE = 'https://github.com/<user>/GLoFA.git'" in cell
    return cell.replace('https://github.com/<user>/GLoFA.git', code_source)


def test_notebook_stops_at_a_placeholder(notebook):
    with pytest.raises(Exception) as error:
        exec(as_python(code_cells(notebook)[0]), {})
    assert type(error.value).__name__ == 'FillInThisCell'
    assert 'CODE_SOURCE still holds a placeholder' in str(error.value)
    exec(as_python(filled_config(notebook, 'https://example.org/GLoFA.git')), {})  # filled in: no stop


@pytest.mark.parametrize('needed', ['mini_imagenet.tar', 'Res12-pre.pth'])
def test_notebook_stops_where_a_file_from_drive_is_missing(notebook, tmp_path, monkeypatch, needed):
    cell = next(c for c in code_cells(notebook) if needed in c and 'raise FileNotFoundError' in c)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=f'{tmp_path / "drive"}/{needed} not found'):
        exec(as_python(cell), {'DRIVE_DIR': str(tmp_path / 'drive')})


def test_notebook_takes_the_code_from_a_folder_or_a_git_address(notebook, tmp_path, monkeypatch):
    cell = next(c for c in code_cells(notebook) if 'REPO_DIR =' in c)
    repo_dir = tmp_path / 'sample_data' / 'GLoFA'
    cell = cell.replace("'/content/sample_data/GLoFA'", repr(str(repo_dir)))
    monkeypatch.chdir(tmp_path)
    code = tmp_path / 'drive' / 'code'  # a copy of the repository on Drive
    code.mkdir(parents=True)
    (code / 'train.py').write_text('# the code\n')
    exec(as_python(cell), {'CODE_SOURCE': str(code)})
    assert (repo_dir / 'train.py').read_text() == '# the code\n' and os.getcwd() == str(repo_dir)
    clones = []
    monkeypatch.setattr(subprocess, 'run', lambda argv, check: clones.append(argv) or os.makedirs(argv[-1]))
    os.chdir(tmp_path)
    shutil.rmtree(repo_dir)
    exec(as_python(cell), {'CODE_SOURCE': 'https://example.org/GLoFA.git'})
    assert clones == [['git', 'clone', 'https://example.org/GLoFA.git', str(repo_dir)]]
    os.chdir(tmp_path)
    shutil.rmtree(repo_dir)
    with pytest.raises(FileNotFoundError, match='neither a git address nor a folder'):
        exec(as_python(cell), {'CODE_SOURCE': str(tmp_path / 'not_mounted')})


def test_notebook_trains_from_local_data_and_saves_to_drive(notebook):
    config = {}
    exec(as_python(filled_config(notebook, 'https://example.org/GLoFA.git')), config)
    assert config['SAVE_DIR'].startswith('/content/drive/') and config['K'] == 1 and config['N'] == 5
    lines = shell_lines(notebook)
    train_line = next(line for line in lines if line.startswith('python train.py'))
    assert '--resume' in train_line and '--save_dir {SAVE_DIR}' in train_line
    assert not any('--data_path /content/drive' in line for line in lines)
    assert any('/content/mini_imagenet.tar' in line for line in lines)
    assert any(line.startswith('python scripts/check_dataset.py --data_path datasets/mini_imagenet') for line in lines)


# ------------------------------------------------------------------ check_dataset.py
@pytest.fixture
def dataset_copy(tiny_dataset, tmp_path):
    """A fresh copy of the tiny dataset (4 / 3 / 3 classes of 6 images) to break."""
    return shutil.copytree(tiny_dataset, tmp_path / 'copy')


EPISODE = ['--N', '3', '--K', '1', '--Q', '5']


def run_check(capsys, root, *flags) -> tuple[int, str]:
    code = check_dataset.main(['--data_path', str(root), *(flags or EPISODE)])
    out, err = capsys.readouterr()
    assert 'Traceback' not in out + err
    return code, out


def rows(root, split: str) -> list[str]:
    with open(os.path.join(root, 'split', f'{split}.csv')) as f:
        return f.read().splitlines()


def write_rows(root, split: str, lines: list[str]) -> None:
    with open(os.path.join(root, 'split', f'{split}.csv'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def test_check_dataset_accepts_a_good_dataset(capsys, tiny_dataset):
    code, out = run_check(capsys, tiny_dataset)
    assert code == 0
    assert 'no problems found' in out
    assert 'train: 4 classes, 24 images, min 6 / max 6 images per class' in out
    assert 'test: 3 classes, 18 images' in out
    assert '100x90' in out  # image size read from the headers
    summary, problems = check_dataset.check_dataset(tiny_dataset, 3, 1, 5, decode=True)
    assert problems == [] and any('decoded' in line for line in summary)


def break_missing_split(root):
    os.remove(os.path.join(root, 'split', 'val.csv'))
    return ['val.csv', 'not found']


def break_malformed_row(root):
    lines = rows(root, 'train')
    write_rows(root, 'train', lines[:3] + ['lonely_field'] + lines[3:])
    return [os.path.join('split', 'train.csv') + ', line 4', 'lonely_field']


def break_missing_image(root):
    name = rows(root, 'test')[1].split(',')[0]
    os.remove(os.path.join(root, 'images', name))
    return [f'image {name} listed in', 'is missing']


def break_undecodable_image(root):
    name = rows(root, 'val')[2].split(',')[0]
    with open(os.path.join(root, 'images', name), 'wb') as f:
        f.write(b'this is not a JPEG at all' * 10)
    return [name, 'cannot be']


def break_too_few_images(root):
    lines = rows(root, 'test')
    label = lines[1].split(',')[1]
    kept = [line for line in lines[1:] if not line.endswith(label)] + [line for line in lines[1:] if line.endswith(label)][:2]
    write_rows(root, 'test', lines[:1] + kept)
    return [f'class {label} has 2 images, fewer than K + Q = 6']


def break_shared_class(root):
    write_rows(root, 'val', rows(root, 'val') + [rows(root, 'train')[1]])
    label = rows(root, 'train')[1].split(',')[1]
    name = rows(root, 'train')[1].split(',')[0]  # the loader's check, each shared class and image named
    return [f'classes are in both the train split', f'e.g. {label}', 'images are in both the train split', f'e.g. {name}']


def break_duplicate_filename(root):
    write_rows(root, 'test', rows(root, 'test') + [rows(root, 'test')[3]])
    return [f"{rows(root, 'test')[3].split(',')[0]} is listed 2 times"]


def break_images_folder(root):
    shutil.rmtree(os.path.join(root, 'images'))
    return ['image folder', 'not found']


def listed_image(root, split='train', row=4):
    name = rows(root, split)[row].split(',')[0]
    path = os.path.join(root, 'images', name)
    os.remove(path)
    return name, path


def break_empty_file(root):
    name, path = listed_image(root)
    open(path, 'wb').close()
    return [name, 'cannot be']


def break_folder_as_image(root):
    name, path = listed_image(root)
    os.mkdir(path)
    return [name, 'cannot be']


def break_text_as_image(root):
    name, path = listed_image(root, 'val', 2)
    with open(path, 'w') as f:
        f.write('filename,label\n' * 40)
    return [name, 'cannot be']


def break_dangling_link(root):
    name, path = listed_image(root, 'test', 3)
    os.symlink(os.path.join(root, 'nowhere.jpg'), path)
    return [name, 'cannot be']


def break_missing_header(root):
    write_rows(root, 'train', rows(root, 'train')[1:])  # train.py refuses it: its first row would be skipped
    return ['train.csv', 'no header']


@pytest.mark.parametrize('breaker', [break_missing_split, break_malformed_row, break_missing_image,
                                     break_undecodable_image, break_too_few_images, break_shared_class,
                                     break_duplicate_filename, break_images_folder, break_empty_file,
                                     break_folder_as_image, break_text_as_image, break_dangling_link,
                                     break_missing_header])
def test_check_dataset_reports_each_problem(capsys, dataset_copy, breaker):
    expected = breaker(dataset_copy)
    code, out = run_check(capsys, dataset_copy)
    assert code == 2
    problems = out.split('found:', 1)[1]
    for text in expected:
        assert text in problems, out


def test_check_dataset_reports_missing_folder_and_small_splits(capsys, tmp_path, tiny_dataset):
    code, out = run_check(capsys, tmp_path / 'nowhere')
    assert code == 2 and 'data folder' in out and 'not found' in out
    code, out = run_check(capsys, tiny_dataset, '--N', '4', '--K', '1', '--Q', '5')
    assert code == 2
    assert 'val: 3 classes, fewer than N = 4' in out and 'test: 3 classes, fewer than N = 4' in out
    assert 'train: 4 classes, fewer' not in out


def test_check_dataset_decode_finds_truncated_images(dataset_copy):
    name = rows(dataset_copy, 'train')[5].split(',')[0]
    path = os.path.join(dataset_copy, 'images', name)
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])  # the header is intact: only decoding fails
    for problems in (check_dataset.check_dataset(str(dataset_copy), 3, 1, 5)[1],  # a sample is decoded: here all
                     check_dataset.check_dataset(str(dataset_copy), 3, 1, 5, decode=True)[1]):
        assert len(problems) == 1 and name in problems[0] and 'cannot be decoded' in problems[0]
    summary, problems = check_dataset.check_dataset(str(dataset_copy), 3, 1, 5, sample=0)  # headers only
    assert problems == [] and any('--decode' in line for line in summary)  # and the summary says so


def test_check_dataset_and_the_loader_warn_of_tiny_images(capsys, dataset_copy, tmp_path):
    name = rows(dataset_copy, 'train')[3].split(',')[0]
    Image.new('RGB', (1, 1), (200, 10, 10)).save(os.path.join(dataset_copy, 'images', name))
    code, out = run_check(capsys, dataset_copy)
    assert code == 0 and name in out and '1x1' in out  # a warning, named; not a problem
    import train
    argv = ['--data_path', str(dataset_copy), '--save_dir', str(tmp_path / 'saves'), '--network_name', 'convnet',
            '--pretrained', 'none', '--N', '3', '--K', '1', '--Q', '5', '--n_training_episodes', '6',
            '--episode_gap', '3', '--n_validating_episodes', '1', '--n_testing_episodes', '1', '--n_workers', '2']
    train.main(argv)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith('warning: image')]
    assert len(warnings) == 1 and name in warnings[0] and '1x1' in warnings[0]  # once per run, workers or not


def test_a_file_given_as_the_data_folder_is_named_as_one(capsys, tmp_path):
    archive = tmp_path / 'mini_imagenet.tar'
    archive.write_bytes(b'x' * 100)
    code, out = run_check(capsys, archive)
    assert code == 2 and 'archive' in out and 'tar -xf' in out
    import train
    with pytest.raises(SystemExit):
        train.main(['--data_path', str(archive), '--save_dir', str(tmp_path / 's'), '--network_name', 'convnet'])
    err = capsys.readouterr().err
    assert str(archive) in err and 'tar -xf' in err


def test_check_dataset_command_exits_2_without_traceback(dataset_copy):
    break_malformed_row(dataset_copy)
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'check_dataset.py'), '--data_path',
                             str(dataset_copy), *EPISODE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr + result.stdout
    assert 'line 4' in result.stdout


def test_check_dataset_reads_the_tiered_format(capsys, tmp_path):
    stored = write_tiered_dataset(tmp_path / 'stored')
    compressed = write_tiered_dataset(tmp_path / 'compressed', compressed=True)
    code = check_dataset.main(['--data_path', stored, compressed, *EPISODE])  # two roots, one after the other
    out = capsys.readouterr().out
    assert code == 0 and out.count('no problems found') == 2
    assert 'train: 4 classes, 24 images, min 6 / max 6 images per class (train_labels.pkl)' in out
    assert 'test: images uint8 of shape (18, 84, 84, 3) (test_images.npz, stored: memory-mapped in place' in out
    assert 'compressed: an uncompressed copy of 0.4 MiB is written once' in out
    assert not os.path.exists(os.path.join(compressed, 'train_images.npy'))  # checking writes nothing
    summary, problems = check_dataset.check_dataset(compressed, 3, 1, 5, decode=True)
    assert problems == [] and sum('zip checksum correct' in line for line in summary) == 3


def test_check_dataset_reports_tiered_problems(capsys, tmp_path):
    import pickle
    import numpy as np
    root = write_tiered_dataset(tmp_path / 'broken')
    with open(os.path.join(root, 'val_labels.pkl'), 'wb') as f:
        pickle.dump({'labels': [7] * 17}, f)  # one class, one label short
    np.savez(os.path.join(root, 'test_images.npz'), images=np.zeros((18, 84, 84), np.float32))
    code, out = run_check(capsys, root, '--N', '2', '--K', '1', '--Q', '5')
    assert code == 2
    problems = out.split('found:', 1)[1]
    assert 'val_labels.pkl lists 17 labels but' in problems and 'val_images.npz holds 18 images' in problems
    assert 'val: 1 classes, fewer than N = 2' in problems
    assert "test: " in problems and "'images' is float32 of shape (18, 84, 84)" in problems
    assert 'train' not in problems
    os.remove(os.path.join(root, 'train_images.npz'))
    code, out = run_check(capsys, root, *EPISODE)
    assert 'train: image file' in out and 'train_images.npz not found' in out
    empty = tmp_path / 'empty'
    empty.mkdir()
    code, out = run_check(capsys, empty, *EPISODE)
    assert code == 2 and 'no dataset recognised' in out


# ------------------------------------------------------------------ plot_curves.py
def write_stat(path, n: int = 6) -> dict:
    stat = {'training_loss': [1.5 - 0.1 * i for i in range(n)], 'validating_accuracy': [0.4 + 0.03 * i for i in range(n)]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(stat, path)
    return stat


def assert_png(path):
    assert os.path.getsize(path) > 1000
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.size[0] > 500 and image.size[1] > 200


def test_plot_curves_writes_a_png(capsys, tmp_path):
    stat = tmp_path / 'run.stat'
    write_stat(stat)
    out = tmp_path / 'figures' / 'curves.png'
    plot_curves.main(['--stat', str(stat), '--episode_gap', '50', '--out', str(out)])
    assert_png(out)
    printed = capsys.readouterr().out
    assert '6 validations up to episode 300' in printed and 'best validation accuracy 55.00 % at episode 300' in printed


def test_plot_curves_takes_episodes_from_the_log(capsys, tmp_path):
    stat = tmp_path / 'run.stat'
    write_stat(stat, n=3)
    entries = [{'episode': e, 'training_loss': 1.0, 'validating_accuracy': 0.5, 'validating_ci': 0.01,
                'best_validating_accuracy': 0.5, 'lr_network': 1e-4, 'lr': lr}
               for e, lr in ((70, 0.01), (140, 0.01), (70, 0.01), (140, 0.01), (210, 0.002))]  # a restarted run
    with open(tmp_path / 'run.log.jsonl', 'w') as f:
        f.write(''.join(json.dumps(e) + '\n' for e in entries))
    assert plot_curves.episodes_of(str(stat), 3, 200)[0] == [70, 140, 210]
    assert plot_curves.episodes_of(str(stat), 4, 200)[0] == [200, 400, 600, 800]  # log does not match: the gap
    plot_curves.main(['--stat', str(stat), '--out', str(tmp_path / 'c.png')])
    assert_png(tmp_path / 'c.png')
    assert 'up to episode 210' in capsys.readouterr().out


def test_plot_curves_adds_the_adaptors_in_training_when_the_statistics_have_them(capsys, tmp_path):
    plain, glofa = tmp_path / 'plain.stat', tmp_path / 'glofa.stat'
    write_stat(plain)
    stat = write_stat(glofa)
    n = 12  # GLoFA's per-episode record: alive for 3 episodes, then dead with no gradient
    stat['training_episodes'] = {'episode': list(range(1, n + 1)), 'alpha_task': [0.3] * 3 + [0.0] * 9,
                                 'alpha_cls': [0.1] * 3 + [0.0] * 9, 'h_task': [0.3] * 3 + [-0.5] * 9,
                                 'h_cls': [0.1] * 3 + [-0.4] * 9, 'grad_h': [0.02] * 3 + [0.0] * 9,
                                 'grad_f_task': [0.1] * n, 'grad_f_class': [0.1] * n}
    torch.save(stat, glofa)
    assert plot_curves.training_episodes(str(plain)) is None
    assert plot_curves.training_episodes(str(glofa))['h_task'][3] == -0.5
    sizes = {}
    for path in (plain, glofa):
        plot_curves.main(['--stat', str(path), '--episode_gap', '50', '--out', str(tmp_path / f'{path.stem}.png')])
        assert_png(tmp_path / f'{path.stem}.png')
        with Image.open(tmp_path / f'{path.stem}.png') as image:
            sizes[path.stem] = image.size
    assert sizes['glofa'] == (sizes['plain'][0], 2 * sizes['plain'][1])  # one more panel: two a row, a second row
    stat['training_episodes']['grad_h'] = stat['training_episodes']['grad_h'][:5]  # lengths disagree: no panel
    torch.save(stat, glofa)
    assert plot_curves.training_episodes(str(glofa)) is None


def test_plot_curves_finds_the_run_from_its_flags(capsys, tmp_path):
    flags = ['--save_dir', str(tmp_path / 'saves'), '--N', '2', '--K', '1', '--episode_gap', '25']
    write_stat(runs.run_paths(parse_args(flags)).stat)
    plot_curves.main([*flags, '--out', str(tmp_path / 'c.png')])
    assert_png(tmp_path / 'c.png')
    assert 'up to episode 150' in capsys.readouterr().out


def test_pictures_go_beside_the_run_by_default(capsys, tmp_path, monkeypatch, checkpoint_flags):
    monkeypatch.chdir(tmp_path)  # nothing is written here
    flags = ['--save_dir', str(tmp_path / 'saves'), '--N', '2', '--K', '1', '--episode_gap', '25']
    stat = runs.run_paths(parse_args(flags)).stat
    write_stat(stat)
    plot_curves.main(flags)
    assert_png(stat[:-len('.stat')] + '.curves.png')
    visualize_masks.main(checkpoint_flags)
    assert_png(runs.run_paths(parse_args(checkpoint_flags)).best[:-len('.model')] + '.masks.png')
    assert os.listdir(tmp_path) == ['saves']


@pytest.mark.parametrize('content', [None, b'not a torch file', {'training_loss': [1.0]},
                                     {'training_loss': [], 'validating_accuracy': []}])
def test_plot_curves_rejects_bad_statistics(capsys, tmp_path, content):
    stat = tmp_path / 'bad.stat'
    if isinstance(content, bytes):
        stat.write_bytes(content)
    elif content is not None:
        torch.save(content, stat)
    with pytest.raises(SystemExit) as exit_info:
        plot_curves.main(['--stat', str(stat), '--out', str(tmp_path / 'c.png')])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and len(err.strip().splitlines()) == 1 and str(stat) in err
    assert not os.path.exists(tmp_path / 'c.png')


# ------------------------------------------------------------------ visualize_masks.py
@pytest.fixture(scope='module')
def checkpoint_flags(tiny_dataset, tmp_path_factory):
    """Flags of a 2-way 1-shot ResNet-12 run whose best checkpoint holds random weights."""
    flags = ['--network_name', 'resnet', '--pretrained', 'none', '--N', '2', '--K', '1', '--Q', '1',
             '--data_path', tiny_dataset, '--save_dir', str(tmp_path_factory.mktemp('saves')), '--device', 'cpu']
    args = parse_args(flags)
    torch.manual_seed(0)
    model = checkpoints.build_model(args, pretrained=False)
    path = runs.run_paths(args).best
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({'state_dict': model_state_dict(model), 'validating_accuracy': 0.5, 'epoch': 1,
                'config': runs.run_identity(args)}, path)
    return flags


def test_visualize_masks_draws_and_prints_the_masks(capsys, tmp_path, checkpoint_flags):
    out = tmp_path / 'masks.png'
    adaptation = visualize_masks.main([*checkpoint_flags, '--split', 'val', '--episode_seed', '3', '--out', str(out)])
    assert_png(out)
    assert adaptation.m_task.shape == (640,) and adaptation.m_cls.shape == (2, 640) and adaptation.alpha.shape == (2,)
    printed = capsys.readouterr().out
    assert re.search(r'alpha_task = \d+\.\d{4}, alpha_cls = \d+\.\d{4}', printed)
    mask_lines = [line for line in printed.splitlines() if re.search(r'mask: mean .* features above delta/2', line)]
    assert len(mask_lines) == 3 and mask_lines[0].startswith('task mask:')
    assert all(re.match(r'class n\d{8} +mask:', line) for line in mask_lines[1:])
    assert f'wrote {out}' in printed


def test_visualize_masks_episode_depends_on_the_seed_only(capsys, tmp_path, checkpoint_flags):
    first = visualize_masks.main([*checkpoint_flags, '--episode_seed', '5', '--out', str(tmp_path / 'a.png')])
    again = visualize_masks.main([*checkpoint_flags, '--episode_seed', '5', '--out', str(tmp_path / 'b.png')])
    assert torch.equal(first.m_cls, again.m_cls) and torch.equal(first.alpha, again.alpha)


def test_visualize_masks_feature_order_follows_the_task_mask():
    adaptation = visualize_masks.Adaptation(torch.tensor([0.1, 0.9, 0.0, 0.5]), torch.rand(3, 4), torch.ones(2),
                                            torch.ones(3, 4), torch.ones(2))
    assert visualize_masks.feature_order(adaptation).tolist() == [1, 3, 0, 2]
    line = visualize_masks.mask_line('task mask', adaptation.m_task, 1.0)
    assert line == 'task mask: mean 0.3750, min 0.0000, max 0.9000, 25.0 % of 4 features above delta/2 = 0.5'


def test_visualize_masks_without_checkpoint_is_a_user_error(capsys, tmp_path, tiny_dataset):
    with pytest.raises(SystemExit) as exit_info:
        visualize_masks.main(['--network_name', 'resnet', '--N', '2', '--K', '1', '--data_path', tiny_dataset,
                              '--save_dir', str(tmp_path), '--device', 'cpu', '--out', str(tmp_path / 'm.png')])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('error: checkpoint ') and 'not found' in err


def test_missing_runs_are_listed_by_plot_curves_and_visualize_masks(capsys, tmp_path, checkpoint_flags):
    save_dir = checkpoint_flags[checkpoint_flags.index('--save_dir') + 1]
    existing = os.path.basename(runs.run_paths(parse_args(checkpoint_flags)).best)[:-len('.model')]
    write_stat(runs.run_paths(parse_args(checkpoint_flags)).stat)
    other = [f if f != '2' else '3' for f in checkpoint_flags]  # --N 3: a run that does not exist
    for main in (plot_curves.main, visualize_masks.main):
        with pytest.raises(SystemExit) as exit_info:
            main([*other, '--out', str(tmp_path / 'x.png')])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f'not found; runs under {save_dir}: {existing}' in err, err
    with pytest.raises(SystemExit):
        plot_curves.main(['--save_dir', str(tmp_path / 'empty'), '--out', str(tmp_path / 'x.png')])
    assert 'there are no runs under' in capsys.readouterr().err


def test_plot_curves_draws_the_strengths(capsys, tmp_path):
    stat = tmp_path / 'run.stat'
    write_stat(stat, n=3)
    entries = [{'episode': 50 * (i + 1), 'validating_ci': 0.01, 'lr': 0.01, 'alpha_task': a, 'alpha_cls': a / 2}
               for i, a in enumerate((0.3, 0.1, 0.0))]
    with open(tmp_path / 'run.log.jsonl', 'w') as f:
        f.write(''.join(json.dumps(e) + '\n' for e in entries))
    plot_curves.main(['--stat', str(stat), '--out', str(tmp_path / 'c.png')])
    with Image.open(tmp_path / 'c.png') as image:
        assert image.size == (12 * 120, 10 * 120)  # a third panel, the strengths: on a second row
    plot_curves.main(['--stat', str(stat), '--out', str(tmp_path / 'd.png')])
    (tmp_path / 'run.log.jsonl').unlink()
    plot_curves.main(['--stat', str(stat), '--episode_gap', '50', '--out', str(tmp_path / 'e.png')])
    with Image.open(tmp_path / 'e.png') as image:
        assert image.size[0] == 12 * 120  # no log, no strengths


def test_help_shows_each_default_once():
    parser = get_parser()
    text = parser.format_help()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.dest != 'help':
            assert formatter._get_help_string(action).count('(default:') == (
                action.default not in (None, False) or '(default:' in action.help), action.dest
    assert '(default: None)' not in text and '(default: False)' not in text
    assert 'datasets/<data_name>) (default' not in ' '.join(text.split())
