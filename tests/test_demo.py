"""Tests for the procedural demo dataset generator."""
import csv
import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from harness import demo
from harness.demo import DEMO_SPLITS, FINE_FAMILY_SIZE, FINE_SPLITS, generate_demo_dataset

N_IMAGES = 3


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    return generate_demo_dataset(str(tmp_path_factory.mktemp('demo') / 'a'), seed=0, images_per_class=N_IMAGES)


def read_split(root, split):
    with open(os.path.join(root, 'split', f'{split}.csv'), newline='') as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def all_files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_splits_constant():
    assert set(DEMO_SPLITS) == {'train', 'val', 'test'}
    assert all(n >= 5 for n in DEMO_SPLITS.values())


def test_miniimagenet_format(demo_root):
    labels = {}
    listed = set()
    for split in ('train', 'val', 'test'):
        header, rows = read_split(demo_root, split)
        assert header == ['filename', 'label']
        counts = {}
        for filename, label in rows:
            assert filename.endswith('.jpg') and filename.startswith(label)
            assert len(label) == 9 and label[0] == 'n' and label[1:].isdigit()
            counts[label] = counts.get(label, 0) + 1
            listed.add(filename)
        assert len(counts) == DEMO_SPLITS[split]
        assert all(c == N_IMAGES for c in counts.values())
        labels[split] = set(counts)
    assert not labels['train'] & labels['val']
    assert not labels['train'] & labels['test']
    assert not labels['val'] & labels['test']
    image_dir = os.path.join(demo_root, 'images')
    assert set(os.listdir(image_dir)) == listed
    for filename in sorted(listed)[::7]:
        with Image.open(os.path.join(image_dir, filename)) as img:
            assert img.format == 'JPEG' and img.mode == 'RGB' and img.size == (84, 84)


def test_requested_image_size(tmp_path):
    root = generate_demo_dataset(str(tmp_path / 'small'), images_per_class=1, image_size=32)
    _, rows = read_split(root, 'val')
    with Image.open(os.path.join(root, 'images', rows[0][0])) as img:
        assert img.size == (32, 32)


def test_deterministic(demo_root, tmp_path):
    same = all_files(generate_demo_dataset(str(tmp_path / 'b'), seed=0, images_per_class=N_IMAGES))
    assert same == all_files(demo_root)
    other = all_files(generate_demo_dataset(str(tmp_path / 'c'), seed=1, images_per_class=N_IMAGES))
    assert set(other) == set(same)
    images = [k for k in same if k.endswith('.jpg')]
    assert all(other[k] != same[k] for k in images)


def test_idempotent_and_force(tmp_path):
    root = str(tmp_path / 'd')
    generate_demo_dataset(root, images_per_class=2)
    with open(os.path.join(root, '.demo_complete')) as f:
        assert json.load(f)['images_per_class'] == 2
    stamp = 1_000_000_000
    paths = [os.path.join(dp, n) for dp, _, ns in os.walk(root) for n in ns]
    for p in paths:
        os.utime(p, (stamp, stamp))
    generate_demo_dataset(root, images_per_class=2)
    assert all(os.stat(p).st_mtime == stamp for p in paths)
    generate_demo_dataset(root, images_per_class=2, force=True)
    assert all(os.stat(p).st_mtime != stamp for p in paths)


def test_changed_parameters_regenerate_without_stale_files(tmp_path):
    root = str(tmp_path / 'e')
    generate_demo_dataset(root, images_per_class=3)
    generate_demo_dataset(root, images_per_class=1)
    _, rows = read_split(root, 'train')
    assert len(rows) == DEMO_SPLITS['train']
    n_listed = sum(len(read_split(root, s)[1]) for s in DEMO_SPLITS)
    assert len(os.listdir(os.path.join(root, 'images'))) == n_listed


def test_incomplete_dataset_is_regenerated(tmp_path):
    root = str(tmp_path / 'f')
    generate_demo_dataset(root, images_per_class=1)
    with open(os.path.join(root, '.demo_complete'), 'w') as f:  # as an interrupted generation leaves it
        json.dump({'complete': False}, f)
    os.remove(os.path.join(root, 'split', 'test.csv'))
    generate_demo_dataset(root, images_per_class=1)
    assert os.path.isfile(os.path.join(root, 'split', 'test.csv'))
    assert os.path.isfile(os.path.join(root, '.demo_complete'))


def test_a_second_generation_waits_for_the_first_and_takes_its_data(tmp_path):
    """Two runs started at once on a fresh folder: the second waits while the first writes (its lock on the
    marker), then finds the data complete and rewrites nothing, so no image vanishes under the first."""
    import fcntl
    import threading
    root = str(tmp_path / 'g')
    os.makedirs(root)
    with open(os.path.join(root, '.demo_complete'), 'a') as first:  # a process writing the data holds this
        fcntl.flock(first, fcntl.LOCK_EX)
        second = threading.Thread(target=generate_demo_dataset, args=(root,), kwargs={'images_per_class': 1})
        second.start()
        second.join(timeout=1.0)
        assert second.is_alive() and not os.path.exists(os.path.join(root, 'images'))  # waiting, nothing written
        written = generate_demo_dataset(str(tmp_path / 'h'), images_per_class=1)  # what the first one writes
        for name in ('images', 'split', '.demo_complete'):
            os.rename(os.path.join(written, name), os.path.join(root, name))
        stamp = 1_000_000_000
        paths = [os.path.join(dp, n) for dp, _, ns in os.walk(root) for n in ns]
        for p in paths:
            os.utime(p, (stamp, stamp))
    second.join(timeout=60)
    assert not second.is_alive()
    assert all(os.stat(p).st_mtime == stamp for p in paths)  # the second took the first's data as it was


# ------------------------------------------------------------------ the coarse demo stays what it was
PINNED_PIXELS = '8519108e283ef31187ba48653682479eb5b6e84d5c49f2eb51585afd8108f804'
PINNED_TEXT_FILES = 'f3314632b46a498f916026accfdd9e9ee61a806bf042969d5a93cb37fe862945'


def test_coarse_demo_is_unchanged(tmp_path, monkeypatch):
    """Pixels (as drawn, before JPEG encoding), split files and marker of a 2-image-per-class demo,
    pinned from the generator as it was before the fine-grained sibling was added."""
    pixels = hashlib.sha256()
    render = demo._render_image

    def recording(cls, size, rng):
        image = render(cls, size, rng)
        pixels.update(np.asarray(image).tobytes())
        return image

    monkeypatch.setattr(demo, '_render_image', recording)
    root = generate_demo_dataset(str(tmp_path / 'coarse'), images_per_class=2)
    assert pixels.hexdigest() == PINNED_PIXELS
    files = hashlib.sha256()
    for name in ('split/train.csv', 'split/val.csv', 'split/test.csv', '.demo_complete'):
        with open(os.path.join(root, name), 'rb') as f:
            files.update(f.read())
    assert files.hexdigest() == PINNED_TEXT_FILES


# ------------------------------------------------------------------ the fine-grained sibling
@pytest.fixture(scope='module')
def fine_root(tmp_path_factory):
    return generate_demo_dataset(str(tmp_path_factory.mktemp('fine') / 'a'), images_per_class=N_IMAGES, kind='fine')


def test_fine_dataset_format_and_families(fine_root):
    design = demo._design_fine_classes(0)
    coarse_labels = {c['label'] for classes in demo._design_classes(0).values() for c in classes}
    families = {}
    for split in ('train', 'val', 'test'):
        header, rows = read_split(fine_root, split)
        assert header == ['filename', 'label']
        labels = [c['label'] for c in design[split]]
        assert sorted({label for _, label in rows}) == labels
        assert len(labels) == FINE_SPLITS[split] * FINE_FAMILY_SIZE and len(rows) == len(labels) * N_IMAGES
        assert not set(labels) & coarse_labels
        for c in design[split]:
            families.setdefault(c['family'], set()).add((split, c['texture'], c['shape']))
    # a family: one split, one texture, one shape; its classes differ by the hue only
    assert all(len(v) == 1 for v in families.values())
    assert len({next(iter(v))[1:] for v in families.values()}) == len(families)
    for classes in design.values():
        for start in range(0, len(classes), FINE_FAMILY_SIZE):
            hues = [c['hue'] for c in classes[start:start + FINE_FAMILY_SIZE]]
            steps = np.diff(np.unwrap(np.array(hues) * 2 * np.pi) / (2 * np.pi))
            assert np.allclose(steps, demo.FINE_HUE_STEP)
            assert 2 * demo.FINE_HUE_JITTER < demo.FINE_HUE_STEP  # classes do not overlap in hue
    name = rows[0][0]
    with Image.open(os.path.join(fine_root, 'images', name)) as img:
        assert img.format == 'JPEG' and img.size == (84, 84)


def test_fine_dataset_deterministic_and_idempotent(fine_root, tmp_path, capsys):
    assert all_files(generate_demo_dataset(str(tmp_path / 'b'), images_per_class=N_IMAGES, kind='fine')) == all_files(fine_root)
    out = capsys.readouterr().out
    assert 'wrote 120 images' in out and str(tmp_path / 'b') in out and ' s' in out
    with open(os.path.join(fine_root, '.demo_complete')) as f:
        assert json.load(f)['kind'] == 'fine'
    stamp = os.stat(os.path.join(fine_root, 'split', 'train.csv')).st_mtime_ns
    generate_demo_dataset(fine_root, images_per_class=N_IMAGES, kind='fine')
    assert os.stat(os.path.join(fine_root, 'split', 'train.csv')).st_mtime_ns == stamp
    assert 'already generated' in capsys.readouterr().out
