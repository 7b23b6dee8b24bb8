"""Cached evaluation (encode each image once) gives the episodic evaluation's answers."""
import numpy as np
import pytest
import torch
from harness import embeddings, evaluation
from harness.device import EvalOptions
from dataloader import EpisodeSampler, FewShotDataset, eval_transform
from harness.demo import write_split
from dataloader import query_targets
from models.glofa import GLoFA
from networks import forward_count
from networks.resnet import ResNet12

N_WAY, N_SHOT, N_QUERY, N_EPISODES = 3, 1, 2, 5
CPU = torch.device('cpu')
OPTIONS = EvalOptions(CPU)


def accuracies(model, dataset, n_episodes: int, seed: int, mode: str) -> np.ndarray:
    episodes = evaluation.Episodes(n_episodes, N_WAY, N_SHOT, N_QUERY, torch.Generator().manual_seed(seed))
    return evaluation.run_episodes(model, dataset, episodes, mode, OPTIONS).accuracies


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    model = GLoFA(ResNet12(), 640)
    model.train()
    with torch.no_grad():  # running statistics away from their initial values
        for _ in range(2):
            model.encoder(torch.randn(4, 3, 84, 84) * 2 + 0.5)
    model.eval()
    bn = model.encoder.layer1[0].bn1
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    return model


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """3 classes of 6 images of plain noise: no class is easy, so the accuracies vary between episodes."""
    root = str(tmp_path_factory.mktemp('noise'))
    rng = np.random.default_rng(0)
    write_split(root, 'test', ((f'n{c:08d}_{i}.png', f'n{c:08d}', rng.integers(0, 256, (90, 100, 3), dtype=np.uint8))
                               for c in range(3) for i in range(6)))
    return FewShotDataset(root, 'test', eval_transform())


def test_cached_and_episodic_agree(model, dataset):
    results, advances = {}, {}
    for mode in ('cached', 'episodic'):
        before = forward_count(model.encoder)
        results[mode] = accuracies(model, dataset, N_EPISODES, 7, mode)
        advances[mode] = forward_count(model.encoder) - before
        assert not model.training
    assert results['cached'].shape == (N_EPISODES,)
    np.testing.assert_array_equal(results['cached'], results['episodic'])
    assert len(set(results['cached'].tolist())) > 1, 'a set-up where episodes differ'
    for a in results['cached']:
        assert 0 <= a <= 1 and (a * N_WAY * N_QUERY) == pytest.approx(round(a * N_WAY * N_QUERY))
    assert advances['cached'] == N_EPISODES
    assert advances['episodic'] == N_EPISODES


def test_cached_and_episodic_logits_agree(model, dataset):
    episode = next(iter(EpisodeSampler(dataset.labels, 1, N_WAY, N_SHOT + N_QUERY,
                                       generator=torch.Generator().manual_seed(3))))
    features = embeddings.encode_split(model.encoder, dataset, OPTIONS, desc='')
    assert features.shape == (len(dataset), 640)
    images = torch.stack([dataset[int(i)][0] for i in episode])
    with torch.no_grad():
        cached = model.episode(features[episode], N_WAY, N_SHOT)[0]
        episodic = model.episode(model.encode(images), N_WAY, N_SHOT)[0]
        torch.testing.assert_close(features[episode], model.encoder(images), rtol=1e-4, atol=1e-4)
    assert cached.shape == (N_WAY * N_QUERY, N_WAY)
    torch.testing.assert_close(cached, episodic, rtol=1e-4, atol=1e-4)
    # the accuracy that evaluate reports for this episode is the one of these logits
    accuracy = (episodic.argmax(1) == query_targets(N_WAY, N_QUERY)).float().mean().item()
    reported = accuracies(model, dataset, 1, 3, 'cached')
    assert reported[0] == pytest.approx(accuracy)


def test_encoding_the_split_does_not_count_as_episodes(model, dataset):
    before = forward_count(model.encoder)
    accuracies(model, dataset, 2, 1, 'cached')
    assert forward_count(model.encoder) - before == 2

