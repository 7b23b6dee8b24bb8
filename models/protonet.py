"""ProtoNet (Snell et al., 2017) on the same encoder and protocol as GLoFA.

p_n is the mean of class n's K support embeddings (not normalised); the logit of query q for class n is
-||q - p_n||^2 / temperature (Euclidean, the default) or <q, p_n / ||p_n||> / temperature (cosine:
GLoFA with both adaptors off, at tau = temperature). No parameters besides the encoder.
"""
import torch
import torch.nn as nn

from models import METRICS, FewShotModel, prototype_logits


class ProtoNet(FewShotModel):
    def __init__(self, encoder: nn.Module, metric: str = 'euclidean', temperature: float = 64.0):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f'metric must be one of {METRICS}, got {metric!r}')
        self.encoder, self.metric, self.temperature = encoder, metric, temperature

    def head(self, prototypes: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return prototype_logits(query, prototypes, self.metric, self.temperature)
