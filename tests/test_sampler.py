"""EpisodeSampler: the shot-major episode layout, counts, seeding and uniformity."""
from collections import Counter

import pytest
import torch

from dataloader import EpisodeSampler, SeededEpisodes, eval_transform, generate_data_loader, open_split, train_transform
from data.mixing import SourceEpisodeSampler
from base.console import UserError
from dataloader import query_targets


def interleaved_labels(n_classes: int, per_class: int, seed: int = 0) -> torch.Tensor:
    """Labels of n_classes * per_class images, shuffled so that a class's images are not contiguous."""
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize('n_way, n_per_class', [(1, 1), (2, 3), (5, 16), (7, 4)])
def test_layout_is_shot_major(n_way, n_per_class):
    labels = interleaved_labels(9, 20)
    sampler = EpisodeSampler(labels.tolist(), 50, n_way, n_per_class, generator=torch.Generator().manual_seed(1))
    for episode in sampler:
        assert episode.shape == (n_way * n_per_class,)
        assert episode.dtype == torch.long
        grid = episode.view(n_per_class, n_way)  # (S, N): position s*N + n
        grid_labels = labels[grid]
        for n in range(n_way):
            column = grid_labels[:, n]
            assert (column == column[0]).all(), 'column n must hold images of one class'
            assert len(set(grid[:, n].tolist())) == n_per_class, 'images within a class must be distinct'
        assert len(set(grid_labels[0].tolist())) == n_way, 'the N classes must be distinct'
        for s in range(n_per_class):
            for n in range(n_way):
                assert labels[episode[s * n_way + n]] == grid_labels[0, n]


def test_len_and_number_of_episodes():
    labels = interleaved_labels(6, 10)
    for n_episodes in (0, 1, 7, 30):
        sampler = EpisodeSampler(labels.tolist(), n_episodes, 3, 4, generator=torch.Generator().manual_seed(0))
        assert len(sampler) == n_episodes
        assert len(list(sampler)) == n_episodes
        seeded = SeededEpisodes(EpisodeSampler(labels.tolist(), n_episodes, 3, 4,
                                               generator=torch.Generator().manual_seed(0)))
        assert len(seeded) == n_episodes
        assert len(list(seeded)) == n_episodes


def test_seeded_generator_is_deterministic():
    labels = interleaved_labels(10, 12).tolist()

    def episodes(seed):
        return [e.tolist() for e in EpisodeSampler(labels, 20, 5, 6, generator=torch.Generator().manual_seed(seed))]

    assert episodes(3) == episodes(3)
    assert episodes(3) != episodes(4)


def test_sampler_does_not_touch_global_random_state():
    labels = interleaved_labels(10, 12).tolist()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    list(EpisodeSampler(labels, 10, 5, 6, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(before, torch.get_rng_state())


def test_class_and_image_choice_is_roughly_uniform():
    n_classes, per_class, n_way, n_per_class, n_episodes = 10, 8, 3, 2, 3000
    labels = interleaved_labels(n_classes, per_class)
    sampler = EpisodeSampler(labels.tolist(), n_episodes, n_way, n_per_class,
                             generator=torch.Generator().manual_seed(11))
    class_counts, first_class_counts, image_counts = Counter(), Counter(), Counter()
    for episode in sampler:
        classes = labels[episode[:n_way]].tolist()
        class_counts.update(classes)
        first_class_counts[classes[0]] += 1
        image_counts.update(episode.tolist())
    # each class is in an episode with probability N / C = 0.3: 900 expected, std ~ 25
    expected = n_episodes * n_way / n_classes
    assert set(class_counts) == set(range(n_classes))
    for c in range(n_classes):
        assert abs(class_counts[c] - expected) < 0.12 * expected, class_counts
        # the class at position 0 is uniform too: 300 expected, std ~ 16
        assert abs(first_class_counts[c] - n_episodes / n_classes) < 0.25 * n_episodes / n_classes
    # an image appears with probability 0.3 * 2 / 8: 225 expected, std ~ 14
    expected_image = n_episodes * n_way / n_classes * n_per_class / per_class
    assert len(image_counts) == len(labels)
    for count in image_counts.values():
        assert abs(count - expected_image) < 0.3 * expected_image


@pytest.mark.parametrize('split, n_way, n_shot, n_query', [('val', 3, 1, 2), ('test', 2, 2, 3), ('train', 3, 2, 1)])
def test_query_targets_match_loader_labels(tiny_dataset, split, n_way, n_shot, n_query):
    loader = generate_data_loader(open_split(tiny_dataset, split, train_transform() if split == 'train' else eval_transform()), 4, n_way, n_shot + n_query, n_workers=0, seed=5)
    targets = query_targets(n_way, n_query)
    assert targets.tolist() == [j % n_way for j in range(n_way * n_query)]
    n_batches = 0
    for images, labels in loader:
        n_batches += 1
        assert images.shape == (n_way * (n_shot + n_query), 3, 84, 84)
        class_order = labels[:n_way]  # the class of position n in every row
        assert len(set(class_order.tolist())) == n_way
        support = labels[:n_way * n_shot].view(n_shot, n_way)
        assert (support == class_order).all()
        query = labels[n_way * n_shot:]
        # the label of query j is the class at position j % N: that position is its target
        assert torch.equal(query, class_order[targets])
        positions = torch.tensor([class_order.tolist().index(label) for label in query.tolist()])
        assert torch.equal(positions, targets)
    assert n_batches == 4


def test_loader_draws_the_episodes_of_a_sampler_seeded_alike(tiny_dataset):
    loader = generate_data_loader(open_split(tiny_dataset, 'val', eval_transform()), 3, 3, 4, n_workers=0, seed=9)
    sampler = EpisodeSampler(loader.dataset.labels, 3, 3, 4, generator=torch.Generator().manual_seed(9))
    for (images, labels), episode in zip(loader, sampler):
        assert torch.equal(labels, torch.tensor(loader.dataset.labels)[episode])
        assert torch.equal(images[0], loader.dataset[int(episode[0])][0])


def test_episodes_are_those_of_earlier_versions():
    """The class mix draws exactly the episodes it always drew (pinned from the single-root sampler)."""
    labels = interleaved_labels(6, 5).tolist()
    sampler = EpisodeSampler(labels, 2, 3, 2, generator=torch.Generator().manual_seed(7))
    assert [e.tolist() for e in sampler] == [[20, 16, 19, 24, 26, 23], [2, 26, 8, 25, 27, 5]]


def two_sources(classes=(4, 6), per_class=5):
    """Labels and sources of two roots, classes numbered root after root, images interleaved."""
    labels = torch.arange(sum(classes)).repeat_interleave(per_class)
    sources = (labels >= classes[0]).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return labels[order], sources[order]


def test_source_mix_layout_determinism_and_random_state():
    labels, sources = two_sources()

    def episodes(seed):
        return [e.tolist() for e in SourceEpisodeSampler(labels, sources, 30, 3, 4,
                                                         generator=torch.Generator().manual_seed(seed))]

    torch.manual_seed(5)
    before = torch.get_rng_state()
    first = episodes(1)
    assert torch.equal(before, torch.get_rng_state())
    assert first == episodes(1) and first != episodes(2)
    roots = Counter()
    for episode in first:
        grid = labels[torch.tensor(episode)].view(4, 3)  # (S, N), shot-major
        assert (grid == grid[0]).all() and len(set(grid[0].tolist())) == 3
        assert len(set(episode)) == 12
        assert len(set(sources[torch.tensor(episode)].tolist())) == 1
        roots[int(sources[episode[0]])] += 1
    assert set(roots) == {0, 1}


def test_source_mix_draws_roots_uniformly_then_their_classes():
    labels, sources = two_sources((3, 9), 2)  # the roots are equally likely, whatever their sizes
    sampler = SourceEpisodeSampler(labels, sources, 2000, 2, 1, generator=torch.Generator().manual_seed(3))
    roots, classes = Counter(), Counter()
    for episode in sampler:
        roots[int(sources[episode[0]])] += 1
        classes.update(labels[episode].tolist())
    assert abs(roots[0] - 1000) < 100  # std ~ 22
    assert all(abs(classes[c] - roots[0] * 2 / 3) < 0.15 * roots[0] * 2 / 3 for c in range(3))
    assert all(abs(classes[c] - roots[1] * 2 / 9) < 0.2 * roots[1] * 2 / 9 for c in range(3, 12))


def test_source_mix_needs_n_classes_in_every_root():
    labels, sources = two_sources((2, 6))
    with pytest.raises(UserError, match='small has 2 classes in the train split, fewer than N = 3'):
        SourceEpisodeSampler(labels, sources, 1, 3, 2, split='train split', roots=['small', 'large'])


def test_training_episodes_come_in_passes_that_continue_one_stream():
    """SeededEpisodes in passes of per_pass (the gaps between validations) from episode done on: the passes
    together are the one long stream, and a stream resumed at done with the generator's state continues it."""
    labels = interleaved_labels(6, 10).tolist()

    def stream(per_pass=None, done=0, state=None):
        generator = torch.Generator().manual_seed(7)
        if state is not None:
            generator.set_state(state)
        return SeededEpisodes(EpisodeSampler(labels, 10, 3, 4, generator=generator), per_pass, done)

    whole = list(stream())
    passes = stream(per_pass=4)
    drawn = [list(passes), list(passes), list(passes), list(passes)]
    assert [len(p) for p in drawn] == [4, 4, 2, 0] and sum(drawn, []) == whole
    resumed = stream(per_pass=4)
    list(resumed)
    state = resumed.sampler.generator.get_state()
    assert list(stream(per_pass=4, done=4, state=state)) == whole[4:8]
