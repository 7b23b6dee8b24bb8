"""Dataset formats behind one interface: tiered-ImageNet npz/pkl, CUB's split files, several roots."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from data import forms
from harness.demo import write_colour_dataset
from tests.small_data import TIERED_PER_CLASS, write_tiered_dataset
from dataloader import (EpisodeSampler, dataset_format, episode_sampler, eval_transform, generate_data_loader,
                        open_split, read_split, train_transform)
from data.forms import TieredDataset, read_tiered_labels
from data.mixing import MultiSourceDataset, episode_group, root_names
from base.console import UserError



def npz_images(root, split):
    with np.load(os.path.join(root, f'{split}_images.npz')) as f:
        return f['images']


@pytest.fixture(scope='module')
def tiered(tmp_path_factory):
    return write_tiered_dataset(tmp_path_factory.mktemp('tiered') / 'tiered')


def test_tiered_stored_npz_is_memory_mapped_in_place(tiered):
    dataset = open_split(tiered, 'train', eval_transform())
    assert isinstance(dataset, TieredDataset) and dataset_format(tiered) == 'tiered'
    assert dataset.array_path == os.path.join(tiered, 'train_images.npz')  # no copy
    assert not os.path.exists(os.path.join(tiered, 'train_images.npy'))
    assert dataset._images is None  # opened on first use only
    images = npz_images(tiered, 'train')
    assert isinstance(dataset.images, np.memmap) and dataset.images.shape == images.shape
    for i in (0, 5, len(dataset) - 1):
        assert np.array_equal(np.asarray(dataset.load_image(i)), images[i])
    x, label = dataset[3]
    assert x.shape == (3, 84, 84) and label == dataset.labels[3]


def test_tiered_labels_numbered_in_order_of_first_appearance(tiered):
    dataset = open_split(tiered, 'val')
    with open(os.path.join(tiered, 'val_labels.pkl'), 'rb') as f:
        values = pickle.load(f)['labels'].tolist()
    order = list(dict.fromkeys(values))
    assert order != sorted(order)
    assert dataset.class_names == [str(v) for v in order]
    assert dataset.labels == [order.index(v) for v in values]
    assert dataset.location == os.path.join(tiered, 'val_labels.pkl')


def test_python2_pickle_needs_latin1_and_is_read(tmp_path):
    root = write_tiered_dataset(tmp_path / 'py2', python2=True)
    path = os.path.join(root, 'train_labels.pkl')
    with open(path, 'rb') as f:
        data = f.read()
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)  # what a plain pickle.load meets
    values = pickle.loads(data, encoding='latin1')['labels'].tolist()
    assert max(values) >= 128
    labels, class_names = read_tiered_labels(path)
    assert [class_names[label] for label in labels] == [str(v) for v in values]
    assert len(open_split(root, 'train')) == len(values)


def test_tiered_compressed_npz_is_copied_once_beside_it(tmp_path, capsys):
    root = write_tiered_dataset(tmp_path / 'compressed', compressed=True)
    dataset = open_split(root, 'test')
    copy = os.path.join(root, 'test_images.npy')
    assert dataset.array_path == copy and os.path.isfile(copy)
    assert 'uncompressed copy' in capsys.readouterr().out
    images = npz_images(root, 'test')
    assert isinstance(dataset.images, np.memmap)
    assert np.array_equal(np.asarray(dataset.images), images)
    assert np.array_equal(np.load(copy, mmap_mode='r'), images)
    stamp = os.stat(copy).st_mtime_ns
    again = open_split(root, 'test')  # reused, not rewritten
    assert again.array_path == copy and os.stat(copy).st_mtime_ns == stamp
    assert 'uncompressed copy' not in capsys.readouterr().out


def test_a_link_planted_at_the_uncompressed_copy_is_replaced_not_written_through(tmp_path):
    root = write_tiered_dataset(tmp_path / 'linked', compressed=True)
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious')
    copy = os.path.join(root, 'test_images.npy')
    for planted in (copy, f'{copy}.part{os.getpid()}', f'{copy}.tmp'):  # the copy, and the names it was written to
        os.symlink(victim, planted)
    dataset = open_split(root, 'test')
    assert victim.read_text() == 'precious' and not os.path.islink(copy)
    assert np.array_equal(np.asarray(dataset.images), npz_images(root, 'test'))


def test_tiered_compressed_copy_goes_to_the_cache_for_a_read_only_folder(tmp_path, monkeypatch, capsys):
    root = write_tiered_dataset(tmp_path / 'readonly', compressed=True)
    monkeypatch.setattr(forms, 'is_writable', lambda folder: False)
    monkeypatch.setenv('GLOFA_CACHE', str(tmp_path / 'cache'))
    dataset = open_split(root, 'val')
    assert dataset.array_path.startswith(str(tmp_path / 'cache')) and os.path.isfile(dataset.array_path)
    assert not os.path.exists(os.path.join(root, 'val_images.npy'))
    assert dataset.array_path in capsys.readouterr().out  # says where
    assert np.array_equal(np.asarray(dataset.images), npz_images(root, 'val'))


class WorkerProbe(TieredDataset):
    """Reports, from inside a loader worker, its process and whether it reads through a memory map."""

    def __getitem__(self, i):
        return os.getpid(), isinstance(self.images, np.memmap), int(np.asarray(self.images[i]).sum())


def test_tiered_dataset_pickles_small_and_workers_map_the_file(tiered):
    dataset = WorkerProbe(tiered, 'train')
    assert isinstance(dataset.images, np.memmap)
    blob = pickle.dumps(dataset)
    assert len(blob) < 5000, len(blob)  # labels and paths only: no pixels (this split holds 24 * 21168 bytes)
    assert pickle.loads(blob)._images is None
    loader = DataLoader(dataset, batch_size=None, num_workers=1, multiprocessing_context='spawn')
    rows = list(loader)  # spawn pickles the dataset into the worker
    assert {pid for pid, _, _ in rows} - {os.getpid()} and all(mapped for _, mapped, _ in rows)
    assert [s for _, _, s in rows] == [int(dataset.images[i].sum()) for i in range(len(dataset))]


@pytest.mark.parametrize('split', ['train', 'val'])
def test_tiered_episodes_do_not_depend_on_the_number_of_workers(tiered, split):
    batches = {}
    for workers in (0, 2):
        loader = generate_data_loader(open_split(tiered, split, train_transform() if split == 'train' else eval_transform()), 3, 3, 4, n_workers=workers, seed=1)
        batches[workers] = list(loader)
    for (a, la), (b, lb) in zip(batches[0], batches[2]):
        assert torch.equal(a, b) and torch.equal(la, lb)
    assert len(batches[0]) == 3


def edit_tiered(tmp_path, tiered, name):
    root = shutil.copytree(tiered, tmp_path / name)
    return str(root)


def test_tiered_errors_name_the_file(tmp_path, tiered):
    root = edit_tiered(tmp_path, tiered, 'short')
    path = os.path.join(root, 'train_labels.pkl')
    with open(path, 'wb') as f:
        pickle.dump({'labels': list(range(5))}, f)
    with pytest.raises(UserError, match=r'train_labels.pkl lists 5 labels but .*train_images.npz holds 24 images'):
        open_split(root, 'train')
    with open(path, 'wb') as f:
        pickle.dump({'label': [0]}, f)
    with pytest.raises(UserError, match="train_labels.pkl holds keys \\['label'\\], expected a dict with 'labels'"):
        open_split(root, 'train')
    with open(path, 'wb') as f:
        f.write(b'not a pickle')
    with pytest.raises(UserError, match='train_labels.pkl cannot be unpickled'):
        open_split(root, 'train')
    np.savez(os.path.join(root, 'val_images.npz'), pixels=np.zeros((18, 84, 84, 3), np.uint8))
    with pytest.raises(UserError, match=r"val_images.npz has no array 'images' \(it holds: pixels\)"):
        open_split(root, 'val')
    np.savez(os.path.join(root, 'val_images.npz'), images=np.zeros((18, 84, 84), np.float32))
    with pytest.raises(UserError, match=r"val_images.npz: 'images' is float32 of shape \(18, 84, 84\)"):
        open_split(root, 'val')
    os.remove(os.path.join(root, 'test_images.npz'))
    with pytest.raises(UserError, match='test_images.npz not found'):
        open_split(root, 'test')


def test_unrecognised_or_missing_root(tmp_path):
    with pytest.raises(UserError, match='nowhere not found'):
        open_split(str(tmp_path / 'nowhere'), 'train')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UserError, match=r'no dataset recognised in .*empty: expected images/ and split/'
                                        r'\{train,val,test\}.csv .* \{train,val,test\}_images.npz'):
        open_split(str(tmp_path / 'empty'), 'train')


# ------------------------------------------------------------------ CUB with FEAT's split files
def test_cub_split_with_many_columns_and_spaces(tmp_path):
    root = write_colour_dataset(tmp_path / 'cub', (2, 2, 2), 3)
    path = os.path.join(root, 'split', 'train.csv')
    with open(path) as f:
        rows = f.read().splitlines()[1:]
    wide = ['filename, label, concept_label'] + [
        f' {name} ,  {label} , {i % 3}, 0, 1, 0, 1, 1' for i, (name, label) in enumerate(r.split(',') for r in rows)]
    with open(path, 'w') as f:
        f.write('\n'.join(wide) + '\n')
    filenames, labels, class_names = read_split(path)
    assert filenames == [r.split(',')[0] for r in rows]
    assert class_names == list(dict.fromkeys(r.split(',')[1] for r in rows))
    dataset = open_split(root, 'train')
    assert len(dataset) == 6 and dataset[5][0].shape == (3, 84, 84)
    with open(path, 'a') as f:
        f.write('lonely.jpg\n')
    with pytest.raises(UserError, match=r"train.csv, line 8: expected 'filename,label', got 'lonely.jpg'"):
        read_split(path)


# ------------------------------------------------------------------ several roots
@pytest.fixture(scope='module')
def roots(tmp_path_factory, tiered):
    """Two folder roots whose label strings coincide (both start at n00000001), plus the tiered one."""
    base = tmp_path_factory.mktemp('roots')
    a = write_colour_dataset(base / 'a' / 'data', (4, 3, 3), TIERED_PER_CLASS, seed=1)
    b = write_colour_dataset(base / 'b' / 'data', (5, 3, 3), TIERED_PER_CLASS, seed=2)
    return a, b, tiered


def test_union_keeps_classes_of_different_roots_apart(roots):
    a, b, tiered = roots
    assert root_names([a, b, tiered]) == ['a/data', 'b/data', 'tiered']
    parts = [open_split(r, 'train') for r in roots]
    assert parts[0].class_names == parts[1].class_names[:4]  # the same label strings
    union = open_split(list(roots), 'train', train_transform())
    assert isinstance(union, MultiSourceDataset)
    assert union.source_names == ['a/data', 'b/data', 'tiered'] and union.roots == list(roots)
    assert len(union) == sum(len(p) for p in parts) and len(union.class_names) == 4 + 5 + 4
    assert union.class_names[:2] == [f'a/data/{parts[0].class_names[0]}', f'a/data/{parts[0].class_names[1]}']
    assert union.class_names[4] == f'b/data/{parts[1].class_names[0]}' and union.class_names[9] == 'tiered/203'  # first seen
    assert len(set(union.class_names)) == len(union.class_names)
    offset = 0
    for k, part in enumerate(parts):
        span = slice(union.starts[k], union.starts[k + 1])
        assert union.labels[span] == [offset + label for label in part.labels]
        assert (union.sources[span] == k).all()
        offset += len(part.class_names)
    i = union.starts[2] + 4  # image 4 of the tiered root, seeded augmentation shared with its reader
    x, label = union[(i, 99)]
    assert torch.equal(x, parts[2].__class__(tiered, 'train', train_transform())[(4, 99)][0])
    assert label == 9 + parts[2].labels[4]


def test_union_single_root_is_the_reader_and_duplicates_are_refused(roots):
    a, _, _ = roots
    assert not isinstance(open_split([a], 'val'), MultiSourceDataset)
    with pytest.raises(UserError, match='twice') as refused:
        open_split([a, os.path.join(a, '.')], 'val')
    assert a in str(refused.value)  # the root named


def test_class_mix_mixes_roots_and_source_mix_keeps_to_one(roots):
    union = open_split(list(roots), 'val')  # 3 + 3 + 3 classes
    g = torch.Generator().manual_seed(0)
    groups = set()
    for episode in episode_sampler(union, 40, 3, 2, g, task_mix='class'):
        groups.add(episode_group(union, episode, 'class'))
    assert groups == {'mixed', 'single-source'}
    seen = set()
    sampler = episode_sampler(union, 60, 3, 2, torch.Generator().manual_seed(0), task_mix='source')
    for episode in sampler:
        sources = union.sources[episode].unique()
        assert len(sources) == 1
        seen.add(int(sources[0]))
        assert episode_group(union, episode, 'source') == union.source_names[int(sources[0])]
        grid = torch.tensor(union.labels)[episode].view(2, 3)  # shot-major
        assert (grid[0] == grid[1]).all() and len(set(grid[0].tolist())) == 3
    assert seen == {0, 1, 2}


def test_class_mix_draws_the_episodes_of_the_plain_sampler(roots):
    union = open_split(list(roots), 'test')
    mixed = episode_sampler(union, 5, 4, 3, torch.Generator().manual_seed(3), task_mix='class')
    plain = EpisodeSampler(union.labels, 5, 4, 3, generator=torch.Generator().manual_seed(3))
    assert [e.tolist() for e in mixed] == [e.tolist() for e in plain]


def test_episode_group_is_none_for_one_root(roots):
    single = open_split(roots[0], 'val')
    assert single.source_names == ['data'] and (single.sources == 0).all()
    for mix in ('class', 'source'):
        assert episode_group(single, torch.arange(6), mix) is None


def test_source_mix_refuses_a_root_with_too_few_classes(roots):
    union = open_split(list(roots), 'val')  # 3 classes a root
    assert episode_sampler(union, 1, 4, 2, task_mix='class')  # 9 classes in all: fine
    with pytest.raises(UserError, match=r'a/data has 3 classes in the val split .*N = 4'):
        episode_sampler(union, 1, 4, 2, task_mix='source')


@pytest.mark.parametrize('task_mix', ['class', 'source'])
def test_union_loader_with_workers_gives_the_same_episodes(roots, task_mix):
    batches = {}
    for workers in (0, 2):
        loader = generate_data_loader(open_split(list(roots), 'train', train_transform()), 2, 3, 3, n_workers=workers, seed=4, task_mix=task_mix)
        batches[workers] = list(loader)
    for (x0, y0), (x2, y2) in zip(batches[0], batches[2]):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
