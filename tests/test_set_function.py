"""The DeepSets set function: rho(SUM_x concat(psi(x), x)), with the parameter names of the reference."""
import pytest
import torch

from networks.set_function import SetFunction

D, OUT = 6, 4


@pytest.fixture
def f():
    torch.manual_seed(0)
    return SetFunction(D, OUT).double()


def by_hand(f: SetFunction, x: torch.Tensor, psi_first: bool = True) -> torch.Tensor:
    """x: (K, d) one set -> (out,), computed from the module's weights one element at a time."""
    w0, b0 = f.psi[0].weight, f.psi[0].bias
    w2, b2 = f.psi[2].weight, f.psi[2].bias
    z = torch.zeros(3 * x.size(1), dtype=x.dtype)
    for v in x:
        psi = torch.relu(w2 @ torch.relu(w0 @ v + b0) + b2)  # (2d,)
        z = z + (torch.cat([psi, v]) if psi_first else torch.cat([v, psi]))
    r0, c0 = f.rho[0].weight, f.rho[0].bias
    r2, c2 = f.rho[2].weight, f.rho[2].bias
    return r2 @ torch.relu(r0 @ z + c0) + c2


def test_parameter_names_and_shapes():
    f = SetFunction(D, OUT)
    shapes = {name: tuple(p.shape) for name, p in f.named_parameters()}
    assert shapes == {
        'psi.0.weight': (2 * D, D), 'psi.0.bias': (2 * D,),
        'psi.2.weight': (2 * D, 2 * D), 'psi.2.bias': (2 * D,),
        'rho.0.weight': (2 * D, 3 * D), 'rho.0.bias': (2 * D,),
        'rho.2.weight': (OUT, 2 * D), 'rho.2.bias': (OUT,),
    }
    assert set(f.state_dict()) == set(shapes)


@pytest.mark.parametrize('set_size', [1, 3, 7])
def test_output_equals_the_formula(f, set_size):
    x = torch.randn(set_size, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(f(x), by_hand(f, x), rtol=1e-12, atol=1e-12)


def test_psi_output_comes_first_in_the_concatenation(f):
    x = torch.randn(3, D, dtype=torch.float64)
    with torch.no_grad():
        y = f(x)
        assert not torch.allclose(y, by_hand(f, x, psi_first=False), rtol=1e-6, atol=1e-6)


def pooled(f: SetFunction, x: torch.Tensor) -> torch.Tensor:
    """The vector z that rho receives."""
    seen = []
    handle = f.rho.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    try:
        with torch.no_grad():
            f(x)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def test_pooling_is_a_sum_not_a_mean(f):
    x = torch.randn(4, D, dtype=torch.float64)
    z = pooled(f, x)
    assert z.shape == (3 * D,)
    z_twice = pooled(f, torch.cat([x, x]))  # every element duplicated
    torch.testing.assert_close(z_twice, 2 * z, rtol=1e-12, atol=1e-12)
    # z = sum over the set of concat(psi(x), x): its last d entries are the sum of the elements
    torch.testing.assert_close(z[2 * D:], x.sum(0), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(z[:2 * D], f.psi(x).sum(0), rtol=1e-12, atol=1e-12)
        assert (f.psi(x) >= 0).all(), 'psi ends with a ReLU'
        assert not torch.allclose(f(torch.cat([x, x])), f(x))


def test_permutation_invariance(f):
    x = torch.randn(6, D, dtype=torch.float64)
    with torch.no_grad():
        y = f(x)
        for seed in range(3):
            perm = torch.randperm(6, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(f(x[perm]), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('n_sets, set_size', [(1, 1), (5, 1), (5, 5), (3, 2)])
def test_batched_sets_equal_a_loop(f, n_sets, set_size):
    x = torch.randn(n_sets, set_size, D, dtype=torch.float64)
    with torch.no_grad():
        y = f(x)
        assert y.shape == (n_sets, OUT)
        for n in range(n_sets):
            torch.testing.assert_close(y[n], f(x[n]), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(y[n], by_hand(f, x[n]), rtol=1e-12, atol=1e-12)
