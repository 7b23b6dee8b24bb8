"""scripts/make_mini_imagenet.py on a miniature ILSVRC2012 train set (folders and per-class tars) against
hand-made split files: the mapping, copies and resized copies, the refusals, a resumed run."""
import csv
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from dataloader import open_split

import make_mini_imagenet  # from scripts/ (pytest.ini puts it on the path)

SUFFIXES = [9, 10, 100, 23, 5]  # numeric order 5, 9, 10, 23, 100; not the order of the names as text
CLASSES = {'train': ['n00000001', 'n00000002'], 'val': ['n00000003'], 'test': ['n00000004']}


def jpeg(wnid: str, suffix: int) -> bytes:
    buffer = io.BytesIO()
    colour = (int(wnid[-1]) * 40, suffix % 256, 7)
    Image.new('RGB', (30 + suffix % 7, 20), colour).save(buffer, format='JPEG', quality=95)
    return buffer.getvalue()


@pytest.fixture
def ilsvrc(tmp_path):
    """Folders and tars of the same classes, and split files naming indices 1, 2 and 4 of each class."""
    folders, tars, splits = tmp_path / 'folders', tmp_path / 'tars', tmp_path / 'splits'
    for root in (folders, tars, splits):
        root.mkdir()
    for wnid in [w for ws in CLASSES.values() for w in ws]:
        (folders / wnid).mkdir()
        with tarfile.open(tars / f'{wnid}.tar', 'w') as tar:
            for suffix in SUFFIXES:
                data = jpeg(wnid, suffix)
                (folders / wnid / f'{wnid}_{suffix}.JPEG').write_bytes(data)
                info = tarfile.TarInfo(f'{wnid}_{suffix}.JPEG')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for split, wnids in CLASSES.items():
        with open(splits / f'{split}.csv', 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['filename', 'label'])
            for wnid in wnids:
                for index in (1, 2, 4):
                    writer.writerow([f'{wnid}{index:08d}.jpg', wnid])
    return folders, tars, splits


def convert(imagenet, splits, out, *extra):
    return make_mini_imagenet.main(['--imagenet', str(imagenet), '--split_dir', str(splits), '--out', str(out), *extra])


def fails(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        convert(*argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize('form', ['folders', 'tars'])
def test_the_kth_file_by_numeric_suffix_is_copied_as_it_is(ilsvrc, tmp_path, form):
    folders, tars, splits = ilsvrc
    out = tmp_path / 'out'
    result = convert(folders if form == 'folders' else tars, splits, out)
    assert result == {'written': 12, 'total': 12}
    by_index = sorted(SUFFIXES)  # 1-based index -> the suffix in numeric order
    for wnids in CLASSES.values():
        for wnid in wnids:
            for index in (1, 2, 4):
                assert (out / 'images' / f'{wnid}{index:08d}.jpg').read_bytes() == jpeg(wnid, by_index[index - 1])
    for split in CLASSES:
        assert (out / 'split' / f'{split}.csv').read_bytes() == (splits / f'{split}.csv').read_bytes()
    dataset = open_split(str(out), 'train')
    assert dataset.class_names == CLASSES['train'] and len(dataset) == 6


def test_size_writes_resized_copies(ilsvrc, tmp_path):
    folders, _, splits = ilsvrc
    convert(folders, splits, tmp_path / 'out', '--size', '8')
    with Image.open(tmp_path / 'out' / 'images' / 'n0000000100000004.jpg') as image:
        assert image.size == (8, 8) and image.format == 'JPEG'
        assert abs(int(np.asarray(image)[4, 4, 1]) - sorted(SUFFIXES)[3]) <= 6  # the 4th file's colour


def test_a_missing_class_or_index_is_one_line_and_nothing_is_written(ilsvrc, tmp_path, capsys):
    folders, _, splits = ilsvrc
    (folders / 'n00000004' / 'n00000004_100.JPEG').unlink()
    (folders / 'n00000004' / 'n00000004_23.JPEG').unlink()  # 3 files left, test.csv wants the 4th
    line = fails(capsys, folders, splits, tmp_path / 'out')
    assert 'n00000004' in line and 'test.csv' in line and '3 files' in line
    assert not (tmp_path / 'out' / 'images').exists() or not os.listdir(tmp_path / 'out' / 'images')
    for path in (folders / 'n00000004').iterdir():
        path.unlink()
    (folders / 'n00000004').rmdir()
    line = fails(capsys, folders, splits, tmp_path / 'out')
    assert 'class n00000004 not found' in line


def test_a_rerun_writes_only_what_is_missing(ilsvrc, tmp_path, capsys):
    folders, _, splits = ilsvrc
    out = tmp_path / 'out'
    convert(folders, splits, out)
    (out / 'images' / 'n0000000200000002.jpg').unlink()
    kept = out / 'images' / 'n0000000100000001.jpg'
    kept.write_bytes(b'not rewritten')
    assert convert(folders, splits, out) == {'written': 1, 'total': 12}
    assert kept.read_bytes() == b'not rewritten'
    assert (out / 'images' / 'n0000000200000002.jpg').read_bytes() == jpeg('n00000002', sorted(SUFFIXES)[1])
