"""A checkpoint is evaluated with the settings it was trained with (test.py, visualize_masks.py, torch.hub), a flag
given that differs is used and named; torch.hub checks its flags as the command line does and leaves the caller's
modules alone."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import test
import train
from conftest import exits_with, tiny_run_flags
from harness.checkpoints import atomic_save, read_file
from base.console import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hub(entry: str, **kwargs):
    return torch.hub.load(REPO, entry, source='local', trust_repo=True, **kwargs)


@pytest.fixture(scope='module')
def trained(tiny_dataset, tmp_path_factory):
    """A run trained with settings that are not the defaults: feat normalisation, delta 0.25, tau 2."""
    save = tmp_path_factory.mktemp('as_trained')
    flags = tiny_run_flags(tiny_dataset, save, '--normalization', 'feat', '--delta', '0.25', '--tau', '2',
                           '--n_testing_episodes', '20')
    result = train.main(flags)
    return flags, result['paths'].best, result['test'], save


def plain_flags(tiny_dataset, save, *extra) -> list[str]:
    """The tiny run's flags without its model settings (what a user types with --model_path)."""
    return tiny_run_flags(tiny_dataset, save, '--n_testing_episodes', '20', '--feature_cache', 'off', *extra)


def test_test_py_evaluates_a_checkpoint_with_its_recorded_settings(trained, tiny_dataset, tmp_path, capsys):
    flags, path, expected, _ = trained
    results = test.main(plain_flags(tiny_dataset, tmp_path, '--model_path', path))
    out = capsys.readouterr().out
    np.testing.assert_array_equal(results[2, 1].accuracies, expected.accuracies)  # train.py's own test
    assert results[2, 1].diagnostics() == expected.diagnostics()  # the masks too (delta, normalisation)
    assert 'note:' not in out  # nothing differs, nothing is missing


def test_a_flag_given_that_differs_is_used_and_named(trained, tiny_dataset, tmp_path, capsys):
    flags, path, _, _ = trained
    test.main(plain_flags(tiny_dataset, tmp_path, '--model_path', path, '--tau', '1'))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and '--tau 1.0' in notes[0] and '2.0' in notes[0] and '--delta' not in notes[0]


def test_a_record_without_the_settings_falls_back_to_the_flags_and_says_so(trained, tiny_dataset, tmp_path, capsys):
    _, path, _, _ = trained
    record = read_file(path, 'checkpoint')
    del record['config']  # an older checkpoint's record
    atomic_save(record, str(tmp_path / 'old.model'))
    test.main(plain_flags(tiny_dataset, tmp_path, '--model_path', str(tmp_path / 'old.model')))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and 'old.model' in notes[0] and '--normalization imagenet' in notes[0]


def test_visualize_masks_draws_the_model_as_trained(trained, tiny_dataset, tmp_path):
    sys.path.insert(0, os.path.join(REPO, 'scripts'))
    try:
        import visualize_masks
    finally:
        sys.path.remove(os.path.join(REPO, 'scripts'))
    _, path, _, _ = trained
    adaptation = visualize_masks.main(plain_flags(tiny_dataset, tmp_path, '--model_path', path, '--out',
                                                  str(tmp_path / 'masks.png')))
    assert float(adaptation.m_task.max()) <= 0.25  # delta 0.25 bounds the masks (the default delta 1 does not)


def test_the_hub_model_and_transform_are_the_checkpoints(trained):
    _, path, _, _ = trained
    model = hub('glofa', checkpoint=path)
    assert (model.tau, model.delta) == (2.0, 0.25)
    from dataloader import eval_transform
    expected = eval_transform('feat').transforms[-1]
    normalize = hub('transform', checkpoint=path).transforms[-1]
    assert (normalize.mean, normalize.std) == (expected.mean, expected.std)
    assert hub('glofa', checkpoint=path, tau=3.0).tau == 3.0  # given: used


@pytest.mark.parametrize('tau', [float('inf'), float('nan'), -1.0, 0.0, 'warm'])
def test_hub_checks_flags_as_the_command_line_does(tau):
    with pytest.raises(UserError, match='tau'):
        hub('glofa', network_name='convnet', tau=tau)


@pytest.mark.parametrize('checkpoint', ['', 5])
def test_hub_refuses_an_empty_checkpoint(checkpoint):
    with pytest.raises(UserError, match='checkpoint'):
        hub('glofa', checkpoint=checkpoint)
    with pytest.raises(UserError, match='checkpoint'):
        hub('encoder', checkpoint=checkpoint)


def test_hub_leaves_the_callers_modules_of_the_same_names(tmp_path):
    """A caller with its own models, networks, harness, arguments and dataloader loads the model, and keeps its
    modules afterwards."""
    for name in ('models', 'networks', 'harness'):
        (tmp_path / name).mkdir()
        (tmp_path / name / '__init__.py').write_text(f'MINE = {name!r}\n')
    for name in ('arguments', 'dataloader'):
        (tmp_path / f'{name}.py').write_text(f'MINE = {name!r}\n')
    script = textwrap.dedent(f'''
        import sys, torch
        import models, networks, harness, arguments, dataloader
        mine = {{name: sys.modules[name] for name in ('models', 'networks', 'harness', 'arguments', 'dataloader')}}
        model = torch.hub.load({REPO!r}, 'glofa', source='local', trust_repo=True, network_name='convnet')
        logits, _ = model.episode(model.encode(torch.randn(4, 3, 84, 84)), 2, 1)
        assert logits.shape == (2, 2)
        for name, module in mine.items():
            assert sys.modules[name] is module, name
        assert not [n for n in sys.modules if n.startswith(('models.', 'networks.', 'harness.'))]
        import models
        assert models.MINE == 'models'
        print('ok')
    ''')
    done = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == 'ok'


# ------------------------------------------------------------------ a run's identity: the data, not what lies beside it
def test_a_run_is_found_again_after_files_that_are_not_data_appear(data, tmp_path, capsys):
    """A README beside the splits, an empty .DS_Store in images/ and split/, an image that no split names: test.py
    with the training's flags still finds the checkpoint, and --resume still finds the run."""
    flags = tiny_run_flags(data, tmp_path / 'saves')
    train.main(flags)
    (data / 'README.txt').write_text('where this data came from')
    for folder in (data, data / 'images', data / 'split'):
        (folder / '.DS_Store').write_bytes(b'')
    (data / 'images' / 'extra.jpg').write_bytes((data / 'images' / os.listdir(data / 'images')[0]).read_bytes())
    (data / 'split' / 'notes.csv').write_text('filename,label\n')
    test.main(flags)  # found by its flags
    assert 'already done' in exits_with(train.main, flags, capsys)  # the same run, not a new one


def test_the_converted_copy_of_a_compressed_array_does_not_change_the_identity(tmp_path):
    from small_data import write_tiered_dataset
    from dataloader import open_split
    from harness.runs import root_digest
    root = write_tiered_dataset(str(tmp_path / 'tiered'), compressed=True)
    before = root_digest(root)
    open_split(root, 'train')  # writes train_images.npy beside the compressed .npz
    assert os.path.isfile(os.path.join(root, 'train_images.npy'))
    assert root_digest(root) == before and set(before) >= {'train_images.npz', 'train_labels.pkl'}


def test_a_pickled_forms_converted_copies_do_not_change_the_identity(tmp_path):
    from small_data import write_pickled_dataset
    from dataloader import open_split
    from harness.runs import root_digest
    root = write_pickled_dataset(str(tmp_path / 'pickled'), 'metaoptnet')
    before = root_digest(root)
    for split in ('train', 'val', 'test'):
        open_split(root, split)
    assert root_digest(root) == before


@pytest.mark.parametrize('change, named', [('image', 'the images split/test.csv names'),
                                           ('split', 'split/test.csv')])
def test_a_change_of_the_data_names_what_changed(data, tmp_path, capsys, change, named):
    flags = tiny_run_flags(data, tmp_path / 'saves')
    train.main(flags)
    csv = data / 'split' / 'test.csv'
    if change == 'image':
        first = csv.read_text().splitlines()[1].split(',')[0]
        (data / 'images' / first).write_bytes((data / 'images' / first).read_bytes() + b'\0')  # another size
    else:
        csv.write_text(''.join(csv.read_text().splitlines(keepends=True)[:-1]))  # one image less
    line = exits_with(test.main, flags, capsys)
    assert 'not found' in line and named in line and 'split/train.csv' not in line


# ------------------------------------------------------------------ a model you can call
@pytest.mark.parametrize('model_name', ['glofa', 'protonet', 'feat'])
def test_a_model_is_called_as_the_reference_calls_it(model_name, tiny_dataset, tmp_path):
    """model(images, N, K) is model.episode(model.encode(images), N, K)'s logits, for a model built from flags, one
    loaded from a checkpoint and one through torch.hub; N and K default to the setting it was trained in."""
    from arguments import parse_args
    from harness.checkpoints import build_model, load_model_checkpoint
    flags = tiny_run_flags(tiny_dataset, tmp_path, '--model_name', model_name, '--N', '3', '--K', '2')
    best = train.main(flags)['paths'].best
    built = build_model(parse_args(flags), pretrained=False).eval()
    loaded = build_model(parse_args(tiny_run_flags(tiny_dataset, tmp_path, '--model_name', model_name)),
                         pretrained=False)  # built as 2-way 1-shot: the checkpoint says 3-way 2-shot
    load_model_checkpoint(loaded, best)
    images = torch.randn(3 * (2 + 1), 3, 84, 84, generator=torch.Generator().manual_seed(0))
    for model in (built, loaded.eval(), hub(model_name, checkpoint=best)):
        with torch.no_grad():
            expected = model.episode(model.encode(images), 3, 2)[0]
            torch.testing.assert_close(model(images, 3, 2), expected, rtol=0, atol=0)
            torch.testing.assert_close(model(images), expected, rtol=0, atol=0)  # trained as 3-way 2-shot
            assert model(images[:2 * 2], 2, 1).shape == (2, 2)  # any setting: 2-way 1-shot, one query each
