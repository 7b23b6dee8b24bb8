"""The opt-in strength rules (--strengths) beside the reference's relu(h(S)), each against a naive computation on a
tiny float64 case: the strengths they give, which gradients reach h, and that the logits are the method's."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import adaptor_study  # from scripts/ (pytest.ini puts it on the path)
from arguments import parse_args
from dataloader import query_targets
from models import model_on
from models.glofa import GLoFA

N, K, Q, D = 3, 2, 2, 6


def model_and_episode(strengths: str, seed: int = 0):
    torch.manual_seed(seed)
    model = GLoFA(nn.Identity(), D, tau=0.5, strengths=strengths).double()
    episode = torch.randn(N * (K + Q), D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return model, episode


def loss_and_grads(model, episode):
    model.zero_grad()
    logits, adaptation = model.episode(episode, N, K)
    loss = F.cross_entropy(logits, query_targets(N, Q))
    loss.backward()
    return logits.detach(), adaptation, {name: None if p.grad is None else p.grad.clone()
                                         for name, p in model.named_parameters()}


def test_constant_strengths_are_one_and_leave_h_without_gradient():
    model, episode = model_and_episode('constant')
    _, adaptation, grads = loss_and_grads(model, episode)
    assert torch.equal(adaptation.alpha, torch.ones(2, dtype=torch.float64))
    assert all(grads[name] is None for name in grads if name.startswith('h.'))
    assert all(grads[name] is not None and grads[name].abs().sum() > 0 for name in grads if name.startswith('f_'))


def test_mix_strengths_are_the_sigmoid_of_h():
    model, episode = model_and_episode('mix')
    _, adaptation, grads = loss_and_grads(model, episode)
    support = episode[:N * K]
    torch.testing.assert_close(adaptation.alpha, torch.sigmoid(model.h(support)), rtol=0, atol=1e-15)
    assert all(grads[name].abs().sum() > 0 for name in grads if name.startswith('h.'))


def test_mix_direction_has_the_logits_of_mix_and_its_strengths_learn_from_the_direction_alone():
    mix, episode = model_and_episode('mix')
    direction, _ = model_and_episode('mix-direction')
    logits, adaptation, grads = loss_and_grads(mix, episode)
    held_logits, _, held_grads = loss_and_grads(direction, episode)
    torch.testing.assert_close(held_logits, logits, rtol=1e-13, atol=1e-13)  # the same numbers
    for name in grads:  # the masks learn as under mix; h differs
        if name.startswith('f_'):
            torch.testing.assert_close(held_grads[name], grads[name], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(held_grads['h.rho.2.bias'], grads['h.rho.2.bias'])
    # d loss / d alpha under mix-direction is the part of the pull through the directions alone (naive: the
    # adapted queries' lengths held, the cosines with the prototypes moving)
    logits_d, adaptation_d = direction.episode(episode, N, K)
    pull = torch.autograd.grad(F.cross_entropy(logits_d, query_targets(N, Q)), adaptation_d.alpha)[0].numpy()
    m_task, m_cls, a = adaptation_d.m_task.detach(), adaptation_d.m_cls.detach(), adaptation_d.alpha.detach()
    leaf = a.clone().requires_grad_(True)
    support, query = episode[:N * K], episode[N * K:]
    prototypes = F.normalize(support.unflatten(0, (K, N)).mean(0) * GLoFA.scale(m_task, m_cls, leaf), dim=-1)
    length = (query[:, None, :] * GLoFA.scale(m_task, m_cls, a)).norm(dim=-1)  # held
    adapted = query[:, None, :] * GLoFA.scale(m_task, m_cls, leaf)
    cosine = (adapted / adapted.norm(dim=-1, keepdim=True) * prototypes).sum(-1)
    naive = torch.autograd.grad(F.cross_entropy(length * cosine / direction.tau, query_targets(N, Q)), leaf)[0]
    np.testing.assert_allclose(pull, naive.numpy(), rtol=1e-10, atol=1e-12)


def test_the_reference_rule_is_the_default_everywhere():
    args = parse_args([])
    assert args.strengths == 'reference'
    model = model_on(args, nn.Identity(), D)
    assert model.strengths == 'reference'
    with pytest.raises(SystemExit):
        parse_args(['--model_name', 'protonet', '--strengths', 'constant'])  # a flag of GLoFA alone


def test_the_study_knows_every_rule():
    assert {'glofa-constant', 'glofa-mix', 'glofa-mix-direction'} <= set(adaptor_study.FEATURE_HEADS)
