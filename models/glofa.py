"""GLoFA: a task mask, one mask per class and two strengths adapt a pretrained embedding per task.

For a task with support set S, class n is compared in its own space
    T_n(x) = x * (1 + alpha_task * m_task) * (1 + alpha_cls * m_cls[n])      (element-wise)
with m_task = relu6(f_task(S)) / 6 * delta, m_cls[n] = relu6(f_class(S_n)) / 6 * delta and
(alpha_task, alpha_cls) = relu(h(S)). Prototype p_n = normalise(mean_k T_n(s_{k,n})); the logit of
query q for class n is <T_n(q), p_n> / tau.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import FewShotModel
from networks.set_function import SetFunction

ADAPTORS = ('both', 'task', 'class', 'none')
# how the two strengths are made (--strengths): the reference's relu(h(S)); opt-in rules beside it (see GLoFA)
STRENGTH_RULES = ('reference', 'constant', 'mix', 'mix-direction')


class Adaptation(NamedTuple):
    """What the set functions make of one support set (of each of E episodes: a leading (E,))."""
    m_task: torch.Tensor  # (..., d) in [0, delta]
    m_cls: torch.Tensor   # (..., N, d) in [0, delta]
    alpha: torch.Tensor   # (..., 2) = (alpha_task, alpha_cls) >= 0
    scale: torch.Tensor   # (..., N, d) = (1 + alpha_task * m_task) * (1 + alpha_cls * m_cls[n])
    h_output: torch.Tensor  # (..., 2) = h(S), the strengths before the relu: at or below 0, h gets no gradient


class GLoFA(FewShotModel):
    """GLoFA on top of an encoder (B, 3, H, W) -> (B, feature_dim).

    ``adaptor`` selects an ablation: 'both' (the method), 'task' (class masks off), 'class' (task
    mask off), 'none' (no masks: ProtoNet-style normalised prototypes on the same encoder).
    ``h_bias_init`` (opt-in; None keeps the reference initialisation) starts the bias of h's last
    layer, the two strengths' offset, at that value: with B > 0 larger than the rest of h's output,
    alpha = relu(h(S)) starts above 0 and f_task, f_class and h receive gradients from the first episode.

    ``strengths`` (opt-in; 'reference' is the method) makes the two strengths otherwise: 'constant' holds both at 1
    (h unused: it gets no gradient), the ablation that isolates the masks; 'mix' is sigmoid(h(S)), a bounded mix
    between no adaptation (0) and the constant's (1) that never stops h's gradient; 'mix-direction' is 'mix' whose
    strengths learn only from what they do to the logits' direction: the logits are the same numbers, but the
    adapted query's length, |q * s_n|, is held for the strengths' gradient (the pull through the logits' size,
    measured by scripts/adaptor_study.py's pull_parts, does not reach h).
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, tau: float = 1.0, delta: float = 1.0,
                 adaptor: str = 'both', h_bias_init: Optional[float] = None, strengths: str = 'reference'):
        super().__init__()
        if adaptor not in ADAPTORS:
            raise ValueError(f'adaptor must be one of {ADAPTORS}, got {adaptor!r}')
        if strengths not in STRENGTH_RULES:
            raise ValueError(f'strengths must be one of {STRENGTH_RULES}, got {strengths!r}')
        self.encoder = encoder
        self.f_task = SetFunction(feature_dim, feature_dim)
        self.f_class = SetFunction(feature_dim, feature_dim)
        self.h = SetFunction(feature_dim, 2)
        if h_bias_init is not None:
            nn.init.constant_(self.h.rho[2].bias, h_bias_init)  # (2,): alpha_task, alpha_cls before relu
        self.tau, self.delta, self.adaptor, self.strengths = tau, delta, adaptor, strengths

    def masks_and_strengths(self, support: torch.Tensor, n_way: int, n_shot: int) -> Adaptation:
        """support: (..., N*K, d), shot-major; any leading dimensions (E episodes at once) are kept.
        Returns the masks, the strengths and the per-class scale."""
        per_class = support.unflatten(-2, (n_shot, n_way)).transpose(-3, -2)  # (..., N, K, d): class n's set
        return self.masks_and_strengths_of(support, lambda: self.f_class(per_class))

    def masks_and_strengths_of(self, support: torch.Tensor, class_outputs) -> Adaptation:
        """The masks, strengths and scale from all support embeddings (..., S, d) and ``class_outputs()``, f_class
        of each class's set (..., N, d); called in this order, as the reference computes them (so autograd sums
        the gradients reaching the support in the reference's order)."""
        m_task = F.relu6(self.f_task(support)) / 6 * self.delta  # (..., d)
        m_cls = F.relu6(class_outputs()) / 6 * self.delta  # (..., N, d)
        h_output = self.h(support)  # (..., 2)
        if self.strengths == 'reference':
            alpha = F.relu(h_output)
        elif self.strengths == 'constant':
            alpha = torch.ones_like(h_output.detach())  # h unused: no gradient reaches it
        else:
            alpha = torch.sigmoid(h_output)
        if self.adaptor in ('class', 'none'):
            m_task = torch.zeros_like(m_task)
        if self.adaptor in ('task', 'none'):
            m_cls = torch.zeros_like(m_cls)
        return Adaptation(m_task, m_cls, alpha, self.scale(m_task, m_cls, alpha), h_output)

    @staticmethod
    def scale(m_task: torch.Tensor, m_cls: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """(1 + alpha_task * m_task) * (1 + alpha_cls * m_cls[n]): (..., N, d)."""
        alpha_task, alpha_cls = alpha[..., 0, None, None], alpha[..., 1, None, None]  # (..., 1, 1)
        return (1 + alpha_task * m_task.unsqueeze(-2)) * (1 + alpha_cls * m_cls)

    def episode(self, features: torch.Tensor, n_way: int, n_shot: int) -> tuple[torch.Tensor, Adaptation]:
        """features: (..., N*(K+Q), d), shot-major -> (logits (..., N*Q, N), the episode's Adaptation).

        Leading dimensions are episodes computed at once (evaluation on cached embeddings); each gets
        the numbers it would get alone, up to float rounding. Query j's target is j % N.
        """
        support, query = features[..., :n_way * n_shot, :], features[..., n_way * n_shot:, :]  # (..., N*K | N*Q, d)
        adaptation = self.masks_and_strengths(support, n_way, n_shot)
        # the mean after the set functions, as the reference orders it: autograd then sums the gradients reaching
        # the support in the same order (float64: the reference's logits, loss and gradients to about 1e-13 after
        # three steps; float32 differs at about 1e-6 where the order of operations does)
        mean_support = support.unflatten(-2, (n_shot, n_way)).mean(dim=-3)  # (..., N, d)
        return self.logits(query, mean_support, adaptation), adaptation  # (..., N*Q, N)

    def logits(self, query: torch.Tensor, mean_support: torch.Tensor, adaptation: Adaptation) -> torch.Tensor:
        """query (..., M, d), each class's mean support embedding (..., N, d) and the task's Adaptation -> (..., M, N)."""
        scale = adaptation.scale
        prototypes = F.normalize(mean_support * scale, dim=-1)  # (..., N, d): p_n = normalise(mean_k T_n(s))
        # <T_n(q), p_n> = sum_d q_d * scale_{n,d} * p_{n,d}
        logits = query @ (scale * prototypes).transpose(-1, -2) / self.tau  # (..., M, N)
        if self.strengths != 'mix-direction':
            return logits
        # the same numbers, |q * s_n| held for the strengths: |q * s_n(alpha held)| / |q * s_n| = 1 in value
        held = self.scale(adaptation.m_task, adaptation.m_cls, adaptation.alpha.detach())
        squares = query.pow(2)
        return logits * (squares @ held.pow(2).transpose(-1, -2)).sqrt() / (squares @ scale.pow(2).transpose(-1, -2)).sqrt()

    def uneven_logits(self, sets: list[torch.Tensor], query: torch.Tensor) -> tuple[torch.Tensor, Adaptation]:
        """Classes with K_n support images each (sets: N tensors (K_n, d)), as the method defines them: f_class
        takes each class's set as it is, f_task and h the whole support (sums, in any order)."""
        adaptation = self.masks_and_strengths_of(torch.cat(sets), lambda: torch.stack([self.f_class(s) for s in sets]))
        mean_support = torch.stack([s.mean(dim=0) for s in sets])  # (N, d)
        return self.logits(query, mean_support, adaptation), adaptation
