"""ProtoNet (Snell et al., 2017) on the same encoder and protocol as GLoFA.

p_n is the mean of class n's K support embeddings (not normalised); the logit of query q for class n is
-||q - p_n||^2 / temperature (Euclidean, the default) or <q, p_n / ||p_n||> / temperature (cosine:
GLoFA with both adaptors off, at tau = temperature). No parameters besides the encoder.
"""
from typing import Optional

import torch
import torch.nn as nn

from models import FewShotModel

METRICS = ('euclidean', 'cosine')


class ProtoNet(FewShotModel):
    """Also the base of FEAT, which adapts the prototypes before the same logits (``head``)."""

    def __init__(self, encoder: nn.Module, metric: str = 'euclidean', temperature: float = 64.0):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
        self.encoder, self.metric, self.temperature = encoder, metric, temperature

    def head(self, prototypes: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return prototype_logits(query, prototypes, self.metric, self.temperature)

    def episode(self, features: torch.Tensor, n_way: int, n_shot: int) -> tuple[torch.Tensor, None]:
        """``head`` on the prototypes, each the mean of its class's K support embeddings; no adaptation."""
        _, query, prototypes = split_episode(features, n_way, n_shot)
        return self.head(prototypes, query), None

    def uneven_logits(self, sets: list[torch.Tensor], query: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple]]:
        """Classes of different sizes: ``head`` on the prototypes, each the mean of its class's set."""
        return self.head(torch.stack([s.mean(dim=0) for s in sets]), query), None


def split_episode(features: torch.Tensor, n_way: int, n_shot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (..., N*(K+Q), d) -> support (..., N*K, d), query (..., N*Q, d), prototypes (..., N, d):
    the mean of each class's K support embeddings."""
    support, query = features[..., :n_way * n_shot, :], features[..., n_way * n_shot:, :]
    return support, query, support.unflatten(-2, (n_shot, n_way)).mean(dim=-3)


def prototype_logits(query: torch.Tensor, prototypes: torch.Tensor, metric: str, temperature: float) -> torch.Tensor:
    """query (..., M, d), prototypes (..., N, d) -> (..., M, N).
    'euclidean': -||q - p_n||^2 / temperature; 'cosine': <q, p_n / ||p_n||> / temperature (q as it is)."""
    if metric == 'cosine':
        return query @ nn.functional.normalize(prototypes, dim=-1).transpose(-1, -2) / temperature
    # ||q||^2 - 2 <q, p> + ||p||^2: no (M, N, d) difference tensor, so many episodes fit at once
    distances = (query.pow(2).sum(-1, keepdim=True) - 2 * query @ prototypes.transpose(-1, -2)
                 + prototypes.pow(2).sum(-1).unsqueeze(-2))
    return -distances / temperature
