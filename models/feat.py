"""FEAT (Ye et al., CVPR 2020), its default variant, on the same encoder and protocol as GLoFA.

One self-attention layer adapts the N prototypes of a task as one sequence; queries are not adapted;
logit(q, n) = -||q - p'_n||^2 / temperature (cosine: <q, p'_n / ||p'_n||> / temperature). In training,
the contrastive regulariser adapts each class's K support and Q query embeddings as a sequence of its
own, and classifies every unadapted embedding against the means c_n of those sequences, with the metric of
the main logits as FEAT's code does: balance * CE(-||x - c_n||^2 / temperature2), or with cosine
balance * CE(<x, c_n / ||c_n||> / temperature2). Parameter names are FEAT's (``slf_attn.*``), so FEAT's
released checkpoints load unchanged.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.protonet import ProtoNet, prototype_logits


class SelfAttention(nn.Module):
    """FEAT's one-head 'transformer': x (..., L, d) -> LayerNorm(dropout(fc(softmax(QK^T / sqrt d) V)) + x),
    with dropout 0.1 on the attention weights."""

    def __init__(self, d: int, attention_dropout: float = 0.1, dropout: float = 0.5):
        super().__init__()
        self.w_qs, self.w_ks, self.w_vs = (nn.Linear(d, d, bias=False) for _ in range(3))
        for w in (self.w_qs, self.w_ks, self.w_vs):
            nn.init.normal_(w.weight, mean=0, std=math.sqrt(2.0 / (d + d)))
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.fc = nn.Linear(d, d)
        nn.init.xavier_normal_(self.fc.weight)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d)
        self.scale = math.sqrt(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.w_qs(x), self.w_ks(x), self.w_vs(x)  # (..., L, d)
        attention = torch.softmax(q @ k.transpose(-1, -2) / self.scale, dim=-1)  # (..., L, L), over the keys
        output = self.attention_dropout(attention) @ v  # (..., L, d)
        return self.layer_norm(self.dropout(self.fc(output)) + x)


def feat_regulariser(args, n_shot: int) -> tuple[float, float]:
    """FEAT's (temperature2, balance): the flags, else FEAT's ResNet-12 values for the shot (its README:
    1-shot 64 and 0.01, 5-shot 32 and 0.1)."""
    one_shot = n_shot == 1
    return (args.temperature2 if args.temperature2 is not None else (64.0 if one_shot else 32.0),
            args.balance if args.balance is not None else (0.01 if one_shot else 0.1))


class FEAT(ProtoNet):
    def __init__(self, encoder: nn.Module, feature_dim: int, metric: str = 'euclidean', temperature: float = 64.0,
                 temperature2: float = 64.0, balance: float = 0.01):
        super().__init__(encoder, metric, temperature)
        self.slf_attn = SelfAttention(feature_dim)
        self.temperature2, self.balance = temperature2, balance

    def head(self, prototypes: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        adapted = self.slf_attn(prototypes)  # (..., N, d): the task's prototypes, one sequence
        return prototype_logits(query, adapted, self.metric, self.temperature)

    def auxiliary_loss(self, features: torch.Tensor, n_way: int, n_shot: int) -> Optional[torch.Tensor]:
        """balance * the contrastive regulariser's cross-entropy, over all N*(K+Q) embeddings (training), with
        the metric of the main logits."""
        per_class = features.unflatten(-2, (-1, n_way)).transpose(-3, -2)  # (N, K+Q, d): class n's sequence
        centres = self.slf_attn(per_class).mean(dim=-2)  # (N, d)
        logits = prototype_logits(features, centres, self.metric, self.temperature2)  # (N*(K+Q), N), FEAT's metric
        targets = torch.arange(features.size(-2), device=features.device) % n_way
        return self.balance * F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)
