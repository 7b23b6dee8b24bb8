"""Cached evaluation computes many episodes at once: each gets what it gets alone, whatever the batch."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from harness import embeddings
from benchmark import Labels, given  # scripts/dev/ (pytest.ini puts it on the path)
from dataloader import episode_sampler
from harness.embeddings import episode_batch_size
from harness.device import EvalOptions
from harness.evaluation import Episodes, run_episodes
from dataloader import query_targets
from models.glofa import ADAPTORS, GLoFA

D = 640
CPU = torch.device('cpu')


def labelled_split(n_classes: int, per_class: int) -> Labels:
    return Labels([c for c in range(n_classes) for _ in range(per_class)], [f'n{c:08d}' for c in range(n_classes)])


def realistic_features(split: Labels, seed: int = 0) -> torch.Tensor:
    """(n, 640) non-negative features, as after a ReLU network: a class direction plus per-image noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(split.class_names), D, generator=g).relu()
    noise = torch.randn(len(split), D, generator=g)
    return (centres[torch.tensor(split.labels)] + 2.5 * noise).relu()


def head(adaptor: str, h_bias: float = 1.5) -> GLoFA:
    """GLoFA on cached features (no encoder); h's bias, larger than the rest of its output, makes both
    strengths act."""
    torch.manual_seed(1)
    model = GLoFA(nn.Identity(), D, adaptor=adaptor, h_bias_init=h_bias).eval()
    with torch.no_grad():
        model.h.rho[2].weight.mul_(0.1)
    return model


def one_at_a_time(model: GLoFA, features: torch.Tensor, episodes: list, n_way: int, n_shot: int, n_query: int):
    """The reference loop: model.episode on one episode's (N*(K+Q), d) embeddings at a time."""
    targets, rows = query_targets(n_way, n_query), []
    with torch.no_grad():
        for indices in episodes:
            logits, a = model.episode(features[indices], n_way, n_shot)
            rows.append([(logits.argmax(1) == targets).float().mean().item(), a.alpha[0].item(), a.alpha[1].item(),
                         a.m_task.mean().item(), a.m_cls.mean().item()])
    return np.array(rows)


@pytest.mark.parametrize('adaptor', ADAPTORS)
@pytest.mark.parametrize('n_way,n_shot', [(5, 1), (5, 5), (3, 2), (10, 1)])
def test_batched_head_equals_each_episode_alone(adaptor, n_way, n_shot):
    split = labelled_split(12, 12)
    features = realistic_features(split)
    model = head(adaptor)
    n_query = 3
    episodes = list(episode_sampler(split, 6, n_way, n_shot + n_query, torch.Generator().manual_seed(2)))
    batch = torch.stack(episodes)  # (6, N*S)
    with torch.no_grad():
        logits, adaptation = model.episode(features[batch], n_way, n_shot)  # (6, N*Q, N)
        for e, indices in enumerate(episodes):
            alone_logits, alone = model.episode(features[indices], n_way, n_shot)
            torch.testing.assert_close(logits[e], alone_logits, rtol=1e-5, atol=1e-5)
            assert torch.equal(logits[e].argmax(1), alone_logits.argmax(1))
            for batched, single in zip(adaptation, alone):
                torch.testing.assert_close(batched[e], single, rtol=1e-5, atol=1e-6)
    assert logits.shape == (6, n_way * n_query, n_way)
    if adaptor == 'both':
        assert (adaptation.alpha > 0).all() and (adaptation.m_task > 0).any() and (adaptation.m_cls > 0).any()


@pytest.mark.parametrize('adaptor', ADAPTORS)
@pytest.mark.parametrize('n_way,n_shot', [(5, 1), (5, 5), (10, 1)])
def test_run_episodes_cached_equals_one_at_a_time(adaptor, n_way, n_shot):
    """Same episodes, same order, identical accuracies; strengths and masks equal up to float rounding."""
    split = labelled_split(20, 30)
    features = realistic_features(split, seed=3)
    model, n_query, n_episodes = head(adaptor), 15, 30
    results = run_episodes(model, split, Episodes(n_episodes, n_way, n_shot, n_query, torch.Generator().manual_seed(5)),
                           'cached', EvalOptions(CPU, episode_batch=16), given(features))
    drawn = list(episode_sampler(split, n_episodes, n_way, n_shot + n_query, torch.Generator().manual_seed(5)))
    reference = one_at_a_time(model, features, drawn, n_way, n_shot, n_query)
    np.testing.assert_array_equal(results.accuracies, reference[:, 0])
    assert 1 / n_way < results.accuracies.mean() < 1 and len(set(results.accuracies)) > 1, 'a set-up where episodes differ'
    np.testing.assert_allclose(results.alphas, reference[:, 1:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results.mask_task, reference[:, 3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results.mask_cls, reference[:, 4], rtol=1e-5, atol=1e-6)


def test_batch_size_never_changes_a_result():
    split = labelled_split(8, 20)
    features = realistic_features(split, seed=4)
    model = head('both')
    outcomes = []
    for batch in (1, 7, 64, 0):  # 0: chosen by memory
        outcomes.append(run_episodes(model, split, Episodes(50, 5, 2, 4, torch.Generator().manual_seed(9)), 'cached',
                                     EvalOptions(CPU, episode_batch=batch), given(features)))
    for other in outcomes[1:]:
        np.testing.assert_array_equal(other.accuracies, outcomes[0].accuracies)
        np.testing.assert_allclose(other.alphas, outcomes[0].alphas, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other.mask_cls, outcomes[0].mask_cls, rtol=1e-5, atol=1e-6)
        assert other.diagnostics() == pytest.approx(outcomes[0].diagnostics(), rel=1e-5)


def test_batch_size_is_bounded_by_memory():
    five_one, five_five = Episodes(10000, 5, 1, 15), Episodes(10000, 5, 5, 15)
    b1, b5 = episode_batch_size(EvalOptions(CPU), five_one, D), episode_batch_size(EvalOptions(CPU), five_five, D)
    budget = embeddings.EPISODE_BATCH_MEMORY['cpu']
    assert b1 == budget // (4 * D * (80 + 24 * 5 + 40)) and b5 == budget // (4 * D * (100 + 24 * 25 + 40))
    assert 1 <= b5 < b1 <= embeddings.MAX_EPISODE_BATCH
    assert episode_batch_size(EvalOptions(CPU), Episodes(3, 5, 1, 15), D) == 3  # never more than the episodes
    assert episode_batch_size(EvalOptions(CPU, episode_batch=5), five_one, D) == 5  # the flag wins
    huge = Episodes(10, 500, 500, 15)
    assert episode_batch_size(EvalOptions(CPU), huge, D) == 1


def test_the_way_is_given_not_guessed():
    split = labelled_split(5, 5)
    with pytest.raises(ValueError, match='choose_eval_mode'):
        run_episodes(head('both'), split, Episodes(1, 5, 1, 1), 'auto', EvalOptions(CPU))
