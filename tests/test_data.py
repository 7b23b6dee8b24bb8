"""Split files, datasets and transforms in mini-ImageNet's on-disk format."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from harness.demo import write_colour_dataset
from dataloader import FewShotDataset, eval_transform, read_split, train_transform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def write(path, text):
    with open(path, 'w') as f:
        f.write(text)
    return str(path)


def test_read_split_numbers_classes_in_order_of_first_appearance(tmp_path):
    path = write(tmp_path / 'train.csv',
                 'filename,label\n'
                 'a.jpg,n0300\n'
                 'b.jpg,n0100\n'
                 '\n'
                 'c.jpg,n0300\n'
                 'd.jpg,n0200\n'
                 '   \n'
                 'e.jpg,n0100\n'
                 '\n')
    filenames, labels, class_names = read_split(path)
    assert filenames == ['a.jpg', 'b.jpg', 'c.jpg', 'd.jpg', 'e.jpg']
    assert class_names == ['n0300', 'n0100', 'n0200']  # not sorted order
    assert class_names != sorted(class_names)
    assert labels == [0, 1, 0, 2, 1]


def test_read_split_skips_the_header_whatever_it_says(tmp_path):
    # a header that looks like a data row is still skipped
    path = write(tmp_path / 'val.csv', 'x.jpg,n9999\ny.jpg,n0001\nz.jpg,n0002\n')
    filenames, labels, class_names = read_split(path)
    assert filenames == ['y.jpg', 'z.jpg']
    assert class_names == ['n0001', 'n0002']
    assert labels == [0, 1]
    path = write(tmp_path / 'test.csv', 'filename,label\ny.jpg,n0001\n')
    assert read_split(path)[2] == ['n0001']


def test_read_split_of_a_generated_dataset(tiny_dataset):
    filenames, labels, class_names = read_split(os.path.join(tiny_dataset, 'split', 'train.csv'))
    assert len(filenames) == 24 and len(class_names) == 4
    assert labels == [i // 6 for i in range(24)]
    assert all(name.startswith(class_names[label]) for name, label in zip(filenames, labels))


@pytest.fixture(scope='module')
def odd_shapes(tmp_path_factory):
    """A dataset of tall images (60 wide, 130 high), next to the wide ones of tiny_dataset."""
    return write_colour_dataset(tmp_path_factory.mktemp('tall') / 'tall', (2, 2, 2), 2, size=(60, 130), seed=1)


@pytest.mark.parametrize('which', ['tiny', 'tall'])
@pytest.mark.parametrize('transform', [eval_transform, train_transform])
def test_items_are_84_by_84(tiny_dataset, odd_shapes, which, transform):
    root = tiny_dataset if which == 'tiny' else odd_shapes
    with Image.open(os.path.join(root, 'images', os.listdir(os.path.join(root, 'images'))[0])) as image:
        assert image.size[0] != image.size[1]
    dataset = FewShotDataset(root, 'train', transform())
    for i in (0, len(dataset) - 1):
        x, label = dataset[i]
        assert x.shape == (3, 84, 84)
        assert x.dtype == torch.float32
        assert label == dataset.labels[i]
        x, label = dataset[(i, 17)]
        assert x.shape == (3, 84, 84)


def test_seeded_item_is_deterministic_and_keeps_global_random_state(tiny_dataset):
    dataset = FewShotDataset(tiny_dataset, 'train', train_transform())
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    a, label_a = dataset[(3, 77)]
    assert torch.equal(state, torch.get_rng_state())
    b, label_b = dataset[(3, 77)]
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b) and label_a == label_b == dataset.labels[3]
    c, _ = dataset[(3, 78)]
    assert not torch.equal(a, c), 'another seed gives another augmentation'
    # the seeded item is the transform applied under that seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(77)
        expected = train_transform()(dataset.load_image(3))
    assert torch.equal(a, expected)


def test_training_transform_is_random_without_a_seed(tiny_dataset):
    dataset = FewShotDataset(tiny_dataset, 'train', train_transform())
    torch.manual_seed(0)
    draws = [dataset[0][0] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


def find(transform, kind):
    found = [t for t in transform.transforms if isinstance(t, kind)]
    assert len(found) == 1, f'expected one {kind.__name__} in {transform}'
    return found[0]


@pytest.mark.parametrize('transform', [eval_transform, train_transform])
def test_normalisation_is_imagenet(transform):
    normalize = find(transform(), transforms.Normalize)
    assert tuple(normalize.mean) == pytest.approx(IMAGENET_MEAN, abs=1e-12)
    assert tuple(normalize.std) == pytest.approx(IMAGENET_STD, abs=1e-12)
    assert isinstance(transform().transforms[-1], transforms.Normalize)
    assert isinstance(transform().transforms[-2], transforms.ToTensor)


def test_training_transform_parameters():
    t = train_transform()
    crop = find(t, transforms.RandomResizedCrop)
    assert tuple(crop.size) == (84, 84)
    assert crop.scale == pytest.approx((0.08, 1.0)) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    jitter = find(t, transforms.ColorJitter)
    assert jitter.brightness == pytest.approx((0.6, 1.4))
    assert jitter.contrast == pytest.approx((0.6, 1.4))
    assert jitter.saturation == pytest.approx((0.6, 1.4))
    assert jitter.hue is None
    assert find(t, transforms.RandomHorizontalFlip).p == 0.5


def reference_eval(image: Image.Image) -> np.ndarray:
    """Resize the shorter side to 92 (bilinear), crop the centre 84 x 84, scale to [0, 1], normalise."""
    w, h = image.size
    if w <= h:
        size = (92, int(92 * h / w))
    else:
        size = (int(92 * w / h), 92)
    image = image.resize(size, Image.BILINEAR)
    w, h = image.size
    top, left = int(round((h - 84) / 2)), int(round((w - 84) / 2))
    image = image.crop((left, top, left + 84, top + 84))
    a = np.asarray(image, dtype=np.float64) / 255.0  # (84, 84, 3)
    a = (a - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return a.transpose(2, 0, 1)  # (3, 84, 84)


@pytest.mark.parametrize('which', ['tiny', 'tall'])
def test_eval_transform_is_resize_92_and_centre_crop_84(tiny_dataset, odd_shapes, which):
    root = tiny_dataset if which == 'tiny' else odd_shapes
    dataset = FewShotDataset(root, 'val', eval_transform())
    for i in (0, 1):
        with Image.open(os.path.join(root, 'images', dataset.filenames[i])) as image:
            expected = reference_eval(image.convert('RGB'))
        x, _ = dataset[i]
        np.testing.assert_allclose(x.numpy(), expected, atol=1e-5, rtol=0)
        x_seeded, _ = dataset[(i, 5)]  # the evaluation transform ignores the seed
        assert torch.equal(x, x_seeded)


@pytest.mark.parametrize('layout', ['tiered', 'union'])
def test_every_reader_seeds_items_alike(tiny_dataset, tmp_path, layout):
    """The seeded-item logic is shared: the tiered reader and a union of roots behave as the folder reader."""
    from tests.small_data import write_tiered_dataset
    from dataloader import open_split
    tiered = write_tiered_dataset(tmp_path / 'tiered')
    dataset = open_split(tiered if layout == 'tiered' else [tiny_dataset, tiered], 'train', train_transform())
    i = len(dataset) - 2  # in the tiered root either way
    torch.manual_seed(2024)
    state = torch.get_rng_state()
    a, label = dataset[(i, 77)]
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, dataset[(i, 77)][0]) and not torch.equal(a, dataset[(i, 78)][0])
    assert label == dataset.labels[i]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(77)
        expected = train_transform()(dataset.load_image(i))
    assert torch.equal(a, expected)
