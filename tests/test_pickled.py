"""The pickled forms of mini-ImageNet and tiered-ImageNet (MetaOptNet / rfs, learn2learn's caches, Ren et
al.'s PNG lists), written in miniature with their real keys and layouts: read to the same images and
labels as the folder form, converted once, and no pickle runs code."""
import os
import pickle

import numpy as np
import pytest
import train
from dataloader import dataset_format, eval_transform, open_split
from data.forms import CONVERTED, SPLIT_FILES, read_tiered_labels
from tests.small_data import PICKLED_FORMS, write_pickled_dataset
from base.console import UserError

import check_dataset  # from scripts/ (pytest.ini puts it on the path)


@pytest.fixture(params=PICKLED_FORMS)
def pickled(request, tmp_path):
    return request.param, write_pickled_dataset(str(tmp_path / request.param), request.param)


def test_each_form_reads_the_images_and_labels_of_the_folder_form(pickled):
    form, root = pickled
    assert dataset_format(root) == form
    for split in ('train', 'val', 'test'):
        ours, folder = open_split(root, split, eval_transform()), open_split(os.path.join(root, 'folder'), split)
        assert ours.labels == folder.labels and ours.class_names == folder.class_names
        assert ours.root == root and ours.location == os.path.join(root, SPLIT_FILES[form][split])
        for i in range(len(folder)):
            np.testing.assert_array_equal(np.asarray(ours.load_image(i)), np.asarray(folder.load_image(i)))
        assert (ours[3][0] == folder[3][0]).all()  # the same tensor through the transform


def test_a_split_is_converted_once_and_again_when_its_source_changes(pickled, capsys):
    form, root = pickled
    open_split(root, 'test')
    assert 'converting the test split' in capsys.readouterr().out
    converted = os.path.join(root, CONVERTED, 'test_images.npz')
    stamp = os.stat(converted).st_mtime_ns
    assert not os.path.exists(os.path.join(root, CONVERTED, 'train_images.npz'))  # only the split opened
    open_split(root, 'test')
    assert capsys.readouterr().out == '' and os.stat(converted).st_mtime_ns == stamp
    source = os.path.join(root, SPLIT_FILES[form]['test'])
    os.utime(source, (1, 1))  # the source changed: converted again
    open_split(root, 'test')
    assert 'converting' in capsys.readouterr().out


def test_train_py_runs_on_a_pickled_form(tmp_path):
    root = write_pickled_dataset(str(tmp_path / 'mini'), 'metaoptnet')
    result = train.main(['--data_path', root, '--save_dir', str(tmp_path / 'saves'), '--network_name', 'convnet',
                         '--pretrained', 'none', '--N', '3', '--K', '1', '--Q', '2', '--n_training_episodes', '2',
                         '--episode_gap', '1', '--n_validating_episodes', '2', '--n_testing_episodes', '3',
                         '--n_workers', '0'])
    assert len(result['test_accuracies']) == 3


class Shell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / 'ran'
    path = tmp_path / 'test_labels.pkl'
    with open(path, 'wb') as f:
        pickle.dump({'labels': [0, 1], 'x': Shell(marker)}, f)
    with pytest.raises(UserError) as error:
        read_tiered_labels(str(path))
    assert str(path) in str(error.value) and 'system' in str(error.value)
    assert not marker.exists()


def test_wrong_keys_and_a_missing_split_name_the_file(tmp_path):
    root = write_pickled_dataset(str(tmp_path / 'mini'), 'learn2learn')
    path = os.path.join(root, SPLIT_FILES['learn2learn']['val'])
    with open(path, 'wb') as f:
        pickle.dump({'images': np.zeros((2, 84, 84, 3), np.uint8)}, f)
    with pytest.raises(UserError) as error:
        open_split(root, 'val')
    assert path in str(error.value) and 'image_data' in str(error.value)
    os.remove(os.path.join(root, SPLIT_FILES['learn2learn']['test']))
    with pytest.raises(UserError) as error:
        open_split(root, 'test')
    assert SPLIT_FILES['learn2learn']['test'] in str(error.value)


def test_check_dataset_names_each_form(pickled, capsys):
    form, root = pickled
    assert check_dataset.main(['--data_path', root, '--N', '3', '--K', '1', '--Q', '2']) == 0
    out = capsys.readouterr().out
    assert form in out


def verdict(counts, sizes):
    summary = []
    check_dataset.compare_with_benchmarks(counts, {s: list(sizes) for s in counts}, summary)
    return summary[-1]


def test_check_dataset_compares_the_split_with_the_benchmark_it_looks_like():
    counts = lambda classes, n: {split: ([f'{split}{c}' for c in range(k)], [n] * k)  # noqa: E731
                                 for split, k in zip(('train', 'val', 'test'), classes)}
    assert 'verdict: mini-ImageNet' in verdict(counts((64, 16, 20), 600), [(84, 84)])
    short = counts((64, 16, 20), 600)
    short['test'][1][3] = 598
    line = verdict(short, [(500, 375)])
    assert 'looks like mini-ImageNet' in line and 'test class test3: 598' in line
    fewer = counts((64, 15, 20), 600)
    assert 'looks like mini-ImageNet' in verdict(fewer, [(84, 84)]) and 'val has 15' in verdict(fewer, [(84, 84)])
    assert 'verdict: tiered-ImageNet' in verdict(counts((351, 97, 160), 1300), [(84, 84)])
    assert "FEAT's CUB split" in verdict(counts((100, 50, 50), 60), [(500, 400)])
    assert 'no benchmark' in verdict(counts((4, 3, 3), 6), [(84, 84)])
    shared = counts((64, 16, 20), 600)
    shared['val'][0][0] = 'train0'
    assert 'more than one split' in verdict(shared, [(84, 84)])


def test_check_dataset_decode_finds_repeated_images_in_a_pickled_split(tmp_path, capsys):
    from tests.small_data import pickled_split_images, write_pickled_split
    root = str(tmp_path / 'mini')
    for k, split in enumerate(('train', 'val', 'test')):
        images, names = pickled_split_images(split)
        if split == 'val':
            images[5] = images[2]  # one image twice
        write_pickled_split(root, 'metaoptnet', split, images, names, 10 * k)
    assert check_dataset.main(['--data_path', root, '--N', '3', '--Q', '2']) == 0
    assert check_dataset.main(['--data_path', root, '--N', '3', '--Q', '2', '--decode']) == 2
    assert 'val: 1 image of' in capsys.readouterr().out


def test_a_pickled_form_mixes_with_other_roots(tmp_path, tiny_dataset):
    root = write_pickled_dataset(str(tmp_path / 'mini'), 'learn2learn')
    union = open_split([root, str(tiny_dataset)], 'test')
    alone = open_split(root, 'test')
    assert len(union) == len(alone) + len(open_split(str(tiny_dataset), 'test'))
    assert union.class_names[:len(alone.class_names)] == [f'mini/{c}' for c in alone.class_names]
    np.testing.assert_array_equal(np.asarray(union.load_image(2)), np.asarray(alone.load_image(2)))
