"""GLoFA's masks, strengths, prototypes and logits against a loop-by-loop reading of the spec."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dataloader import query_targets
from models.glofa import GLoFA
from networks.resnet import ResNet12

D = 8  # feature dimension of the stand-in encoder
IMAGE = (3, 4, 4)


# ------------------------------------------------------------------ a naive reading of the spec
def naive_set_function(f, vectors: list[torch.Tensor]) -> list[float]:
    """rho(SUM_x concat(psi(x), x)) written out with explicit sums, from the module's weights."""
    def linear(layer, v):
        return [sum(layer.weight[i, j].item() * v[j] for j in range(len(v))) + layer.bias[i].item()
                for i in range(layer.weight.size(0))]

    def relu(v):
        return [max(a, 0.0) for a in v]

    z = [0.0] * (3 * len(vectors[0]))
    for x in vectors:
        x = [float(a) for a in x]
        psi = relu(linear(f.psi[2], relu(linear(f.psi[0], x))))
        for i, a in enumerate(psi + x):  # psi's output first
            z[i] += a  # a sum over the set, not a mean
    return linear(f.rho[2], relu(linear(f.rho[0], z)))


def naive_mask(f, vectors, delta: float) -> list[float]:
    return [min(max(a, 0.0), 6.0) / 6.0 * delta for a in naive_set_function(f, vectors)]  # relu6 / 6 * delta


def naive_adaptation(model, features: list[list[float]], n_way: int, n_shot: int, delta: float):
    support = features[:n_way * n_shot]  # all N*K support embeddings
    m_task = naive_mask(model.f_task, support, delta)
    m_cls = [naive_mask(model.f_class, [features[k * n_way + n] for k in range(n_shot)], delta)
             for n in range(n_way)]  # class n's set: shot-major positions k*N + n
    a_task, a_cls = [max(a, 0.0) for a in naive_set_function(model.h, support)]  # relu
    return m_task, m_cls, (a_task, a_cls)


def naive_logits(model, features: list[list[float]], n_way: int, n_shot: int, n_query: int,
                 tau: float, delta: float) -> list[list[float]]:
    d = len(features[0])
    m_task, m_cls, (a_task, a_cls) = naive_adaptation(model, features, n_way, n_shot, delta)

    def transform(x, n):  # T_n(x) = x * (1 + a_t m_t) * (1 + a_c m_c[n])
        return [x[i] * (1 + a_task * m_task[i]) * (1 + a_cls * m_cls[n][i]) for i in range(d)]

    prototypes = []
    for n in range(n_way):
        mean = [0.0] * d
        for k in range(n_shot):
            t = transform(features[k * n_way + n], n)
            mean = [mean[i] + t[i] / n_shot for i in range(d)]
        norm = math.sqrt(sum(a * a for a in mean))
        prototypes.append([a / norm for a in mean])
    logits = []
    for j in range(n_way * n_query):
        q = features[n_way * n_shot + j]  # not normalised
        logits.append([sum(a * b for a, b in zip(transform(q, n), prototypes[n])) / tau for n in range(n_way)])
    return logits


# ------------------------------------------------------------------ a small model
def make_model(tau=1.0, delta=1.0, adaptor='both', seed=0) -> GLoFA:
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(IMAGE), D))
    model = GLoFA(encoder, D, tau=tau, delta=delta, adaptor=adaptor).double()
    with torch.no_grad():  # rho's outputs spread over relu6's range, both strengths positive
        for f in (model.f_task, model.f_class):
            f.rho[2].weight.mul_(8.0)
            f.rho[2].bias.fill_(3.0)
        model.h.rho[2].bias.copy_(torch.tensor([0.8, 1.2]))
    return model


def images_for(n_way, n_shot, n_query, seed=1):
    return torch.randn(n_way * (n_shot + n_query), *IMAGE, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


CASES = [(2, 1, 1), (3, 2, 2), (5, 1, 3), (5, 5, 2)]


@pytest.mark.parametrize('delta', [1.0, 0.3])
@pytest.mark.parametrize('tau', [1.0, 0.5])
@pytest.mark.parametrize('n_way, n_shot, n_query', CASES)
def test_logits_equal_the_naive_formulas(n_way, n_shot, n_query, tau, delta):
    model = make_model(tau, delta)
    images = images_for(n_way, n_shot, n_query)
    with torch.no_grad():
        features = torch.stack([model.encoder(image[None])[0] for image in images])  # one image at a time
        expected = torch.tensor(naive_logits(model, features.tolist(), n_way, n_shot, n_query, tau, delta),
                                dtype=torch.float64)
        from_embeddings = model.episode(features, n_way, n_shot)[0]
        from_images = model.episode(model.encode(images), n_way, n_shot)[0]
    assert from_embeddings.shape == (n_way * n_query, n_way)
    torch.testing.assert_close(from_embeddings, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(from_images, expected, rtol=1e-10, atol=1e-10)

    # the set-up is not degenerate: masks inside (0, delta), strengths positive, classes differ
    m_task, m_cls, alpha = naive_adaptation(model, features.tolist(), n_way, n_shot, delta)
    inside = [0 < a < delta for row in [m_task] + m_cls for a in row]
    assert sum(inside) > 0.5 * len(inside)
    assert min(alpha) > 0.1
    assert max(abs(a - b) for a, b in zip(m_cls[0], m_cls[1])) > 1e-3


@pytest.mark.parametrize('delta', [1.0, 0.3])
@pytest.mark.parametrize('n_way, n_shot', [(2, 1), (3, 2), (5, 5)])
def test_adapt_equals_the_naive_masks_and_strengths(n_way, n_shot, delta):
    model = make_model(delta=delta)
    support = torch.randn(n_way * n_shot, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = model.masks_and_strengths(support, n_way, n_shot)
    m_task, m_cls, alpha = naive_adaptation(model, support.tolist(), n_way, n_shot, delta)
    assert a.m_task.shape == (D,) and a.m_cls.shape == (n_way, D) and a.alpha.shape == (2,)
    torch.testing.assert_close(a.m_task, torch.tensor(m_task, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.m_cls, torch.tensor(m_cls, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.alpha, torch.tensor(alpha, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    scale = [[(1 + alpha[0] * m_task[i]) * (1 + alpha[1] * m_cls[n][i]) for i in range(D)] for n in range(n_way)]
    torch.testing.assert_close(a.scale, torch.tensor(scale, dtype=torch.float64), rtol=1e-10, atol=1e-10)


def test_queries_are_not_normalised_and_tau_divides():
    n_way, n_shot, n_query = 3, 2, 2
    model = make_model()
    features = torch.randn(n_way * (n_shot + n_query), D, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(3))
    scaled = features.clone()
    scaled[n_way * n_shot:] *= 3.0
    halved = make_model(tau=0.5)
    with torch.no_grad():
        base = model.episode(features, n_way, n_shot)[0]
        torch.testing.assert_close(model.episode(scaled, n_way, n_shot)[0], 3 * base)
        torch.testing.assert_close(halved.episode(features, n_way, n_shot)[0], 2 * base)
        # with the masks off (adaptor 'none'), scaling the support changes nothing: prototypes are normalised
        none = make_model(adaptor='none')
        support_scaled = features.clone()
        support_scaled[:n_way * n_shot] *= 5.0
        torch.testing.assert_close(none.episode(support_scaled, n_way, n_shot)[0],
                                   none.episode(features, n_way, n_shot)[0])


# ------------------------------------------------------------------ bounds of the masks and strengths
@pytest.mark.parametrize('delta', [1.0, 0.3])
def test_masks_are_bounded_and_reach_their_bounds(delta):
    n_way, n_shot = 4, 2
    model = make_model(delta=delta)
    support = torch.randn(n_way * n_shot, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = model.masks_and_strengths(support, n_way, n_shot)
        for m in (a.m_task, a.m_cls):
            assert (m >= 0).all() and (m <= delta).all()
        assert (a.alpha >= 0).all()
        for value, expected in ((1e3, delta), (-1e3, 0.0)):
            for f in (model.f_task, model.f_class):
                f.rho[2].bias.fill_(value)
            a = model.masks_and_strengths(support, n_way, n_shot)
            assert torch.equal(a.m_task, torch.full((D,), expected, dtype=torch.float64))
            assert torch.equal(a.m_cls, torch.full((n_way, D), expected, dtype=torch.float64))
        model.h.rho[2].bias.fill_(-1e3)
        assert torch.equal(model.masks_and_strengths(support, n_way, n_shot).alpha, torch.zeros(2, dtype=torch.float64))
        model.h.rho[2].bias.fill_(1e3)
        alpha = model.masks_and_strengths(support, n_way, n_shot).alpha
        assert (alpha > 100).all(), 'alpha = relu(h): unbounded above'


def test_random_weights_keep_masks_in_range():
    torch.manual_seed(5)
    model = GLoFA(nn.Sequential(nn.Flatten(), nn.Linear(48, D)), D, delta=0.7)
    with torch.no_grad():
        for seed in range(5):
            support = 10 * torch.randn(10, D, generator=torch.Generator().manual_seed(seed))
            a = model.masks_and_strengths(support, 5, 2)
            assert (a.m_task >= 0).all() and (a.m_task <= 0.7).all()
            assert (a.m_cls >= 0).all() and (a.m_cls <= 0.7).all()
            assert (a.alpha >= 0).all()


# ------------------------------------------------------------------ state dict
def test_state_dict_keys_of_the_whole_model(spec_model_keys):
    model = GLoFA(ResNet12(), 640)
    sd = model.state_dict()
    assert set(sd) == spec_model_keys
    assert sd['f_task.psi.0.weight'].shape == (1280, 640)
    assert sd['f_class.rho.0.weight'].shape == (1280, 1920)
    assert sd['f_task.rho.2.weight'].shape == (640, 1280)
    assert sd['f_class.rho.2.weight'].shape == (640, 1280)
    assert sd['h.rho.2.weight'].shape == (2, 1280)
    assert sd['h.rho.2.bias'].shape == (2,)


# ------------------------------------------------------------------ ablations
@pytest.mark.parametrize('n_way, n_shot, n_query', [(3, 2, 2), (5, 1, 3)])
def test_adaptor_ablations(n_way, n_shot, n_query):
    both = make_model()
    features = torch.randn(n_way * (n_shot + n_query), D, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(6))

    def logits(model):
        with torch.no_grad():
            return model.episode(features, n_way, n_shot)[0]

    def with_adaptor(adaptor):
        model = make_model(adaptor=adaptor)
        model.load_state_dict(both.state_dict())
        return model

    # 'task': the class masks are off; 'both' with f_class pushed to m_cls = 0 gives the same logits
    no_class = copy.deepcopy(both)
    with torch.no_grad():
        no_class.f_class.rho[2].bias.fill_(-1e4)
    torch.testing.assert_close(logits(with_adaptor('task')), logits(no_class), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(logits(with_adaptor('task')), logits(both))

    no_task = copy.deepcopy(both)
    with torch.no_grad():
        no_task.f_task.rho[2].bias.fill_(-1e4)
    torch.testing.assert_close(logits(with_adaptor('class')), logits(no_task), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(logits(with_adaptor('class')), logits(both))

    # 'none': <q, normalise(mean support of class n)> / tau
    support, query = features[:n_way * n_shot], features[n_way * n_shot:]
    expected = torch.zeros(n_way * n_query, n_way, dtype=torch.float64)
    for n in range(n_way):
        mean = sum(support[k * n_way + n] for k in range(n_shot)) / n_shot
        p = mean / mean.norm()
        for j in range(n_way * n_query):
            expected[j, n] = (query[j] * p).sum()
    torch.testing.assert_close(logits(with_adaptor('none')), expected, rtol=1e-12, atol=1e-12)
    none_half = make_model(tau=0.5, adaptor='none')
    none_half.load_state_dict(both.state_dict())
    torch.testing.assert_close(logits(none_half), 2 * expected, rtol=1e-12, atol=1e-12)


def test_unknown_adaptor_is_refused():
    with pytest.raises(ValueError):
        GLoFA(nn.Linear(2, 2), 2, adaptor='global')


# ------------------------------------------------------------------ targets and loss
@pytest.mark.parametrize('n_way, n_query', [(1, 1), (2, 3), (5, 15)])
def test_query_targets(n_way, n_query):
    t = query_targets(n_way, n_query)
    assert t.dtype == torch.long
    assert t.tolist() == [j % n_way for j in range(n_way * n_query)]


def test_cross_entropy_on_the_logits_uses_positions_as_labels():
    n_way, n_shot, n_query = 3, 1, 2
    model = make_model()
    images = images_for(n_way, n_shot, n_query, seed=7)
    logits = model.episode(model.encode(images), n_way, n_shot)[0]
    loss = F.cross_entropy(logits, query_targets(n_way, n_query))
    expected = -sum(torch.log_softmax(logits[j], 0)[j % n_way] for j in range(n_way * n_query)) / (n_way * n_query)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f'{name} gets no gradient'


# ------------------------------------------------------------------ --h_bias_init (opt-in)
def test_default_h_bias_init_leaves_the_reference_initialisation():
    from networks.convnet import ConvNet
    from networks.set_function import SetFunction
    torch.manual_seed(3)
    model = GLoFA(ConvNet(), 64, h_bias_init=None)
    torch.manual_seed(3)  # the reference construction order: encoder, f_task, f_class, h
    modules = {'encoder': ConvNet(), 'f_task': SetFunction(64, 64), 'f_class': SetFunction(64, 64),
               'h': SetFunction(64, 2)}
    reference = {f'{name}.{k}': v for name, m in modules.items() for k, v in m.state_dict().items()}
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
    torch.manual_seed(3)
    shifted = GLoFA(ConvNet(), 64, h_bias_init=0.5).state_dict()
    assert torch.equal(shifted['h.rho.2.bias'], torch.full((2,), 0.5))
    assert all(torch.equal(shifted[k], state[k]) for k in state if k != 'h.rho.2.bias')


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_h_bias_init_makes_both_strengths_positive(seed):
    from networks.convnet import ConvNet
    torch.manual_seed(seed)
    model = GLoFA(ConvNet(), 64, h_bias_init=1.0).eval()
    generator = torch.Generator().manual_seed(seed)
    for n_shot in (1, 5):
        images = torch.rand(5 * n_shot, 3, 84, 84, generator=generator)  # a random support set
        with torch.no_grad():
            alpha = model.masks_and_strengths(model.encode(images), 5, n_shot).alpha
        assert (alpha > 0).all(), alpha
