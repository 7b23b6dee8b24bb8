"""Few-shot models: GLoFA (models/glofa.py) and the baselines it is compared with, ProtoNet
(models/protonet.py) and FEAT (models/feat.py), all on one contract (``FewShotModel``)."""
from typing import Optional

import torch
import torch.nn as nn


class FewShotModel(nn.Module):
    """The contract every model keeps: an ``encoder`` (B, 3, H, W) -> (B, d), and a head that turns one
    episode's embeddings, shot-major (position s*N + n is image s of class n; the first N*K are the
    support set), into logits (N*Q, N) whose query j has target j % N.

    ``episode`` also returns what the head adapted per task (GLoFA's masks and strengths; None for
    the baselines). Leading dimensions are episodes computed at once (evaluation). In training,
    ``auxiliary_loss`` may add a term to the cross-entropy. No parameter depends on N, K or Q.
    """
    encoder: nn.Module
    n_way, n_shot = 5, 1  # the setting the model was trained in (its flags, its checkpoint's record): forward's default

    def forward(self, images: torch.Tensor, n_way: Optional[int] = None, n_shot: Optional[int] = None) -> torch.Tensor:
        """The reference's call: one shot-major episode's images (N*(K+Q), 3, H, W) -> its logits (N*Q, N), N and K
        by default those the model was trained with: ``episode(encode(images), N, K)``'s logits."""
        return self.episode(self.encode(images), n_way or self.n_way, n_shot or self.n_shot)[0]

    def loss(self, features: torch.Tensor, targets: torch.Tensor, n_way: int, n_shot: int) -> tuple[torch.Tensor, Optional[tuple]]:
        """One training episode's loss from its embeddings: the cross-entropy of its logits (plus FEAT's regulariser),
        and the head's adaptation (GLoFA's masks and strengths; None for the others)."""
        logits, adaptation = self.episode(features, n_way, n_shot)  # (N*Q, N)
        loss = nn.functional.cross_entropy(logits.float(), targets)
        auxiliary = self.auxiliary_loss(features, n_way, n_shot)
        return (loss if auxiliary is None else loss + auxiliary), adaptation

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, d). One forward pass of the encoder (advances its DropBlock ramp once)."""
        return self.encoder(images)

    def episode(self, features: torch.Tensor, n_way: int, n_shot: int) -> tuple[torch.Tensor, Optional[tuple]]:
        """features (..., N*(K+Q), d) -> (logits (..., N*Q, N), the head's per-task adaptation or None)."""
        raise NotImplementedError

    def auxiliary_loss(self, features: torch.Tensor, n_way: int, n_shot: int) -> Optional[torch.Tensor]:
        """Training only: a term added to the cross-entropy (features (N*(K+Q), d)); None when there is none."""
        return None

    def head_parameters(self) -> list:
        """Everything but the encoder: the second learning-rate group (--lr)."""
        return [p for name, p in self.named_parameters() if not name.startswith('encoder.')]

    def logits_for_sets(self, sets: list[torch.Tensor], query: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple]]:
        """One task as N support sets (K_n, d), any K_n >= 1, and M queries (M, d) -> (logits (M, N), the
        adaptation). Sets of one size run as the shot-major episode; others through ``uneven_logits``."""
        if len({len(s) for s in sets}) == 1:
            support = torch.stack(sets, dim=1).flatten(0, 1)  # (K, N, d) -> (K*N, d): position k*N + n, shot-major
            return self.episode(torch.cat([support, query]), len(sets), len(sets[0]))
        return self.uneven_logits(sets, query)

    def uneven_logits(self, sets: list[torch.Tensor], query: torch.Tensor) -> tuple[torch.Tensor, Optional[tuple]]:
        """Classes of different sizes (N sets (K_n, d)): (logits (M, N), the adaptation)."""
        raise NotImplementedError


def model_on(args, encoder: nn.Module, feature_dim: int) -> FewShotModel:
    """--model_name and its flags on ``encoder`` (embeddings of ``feature_dim``), its head freshly initialised; its
    call's default setting --N, --K."""
    if args.model_name == 'protonet':
        from models.protonet import ProtoNet
        model = ProtoNet(encoder, metric=args.metric, temperature=args.temperature)
    elif args.model_name == 'feat':
        from models.feat import FEAT, feat_regulariser
        temperature2, balance = feat_regulariser(args, args.K)
        model = FEAT(encoder, feature_dim, metric=args.metric, temperature=args.temperature,
                     temperature2=temperature2, balance=balance)
    else:
        from models.glofa import GLoFA
        model = GLoFA(encoder, feature_dim, tau=args.tau, delta=args.delta, adaptor=args.adaptor,
                      h_bias_init=args.h_bias_init, strengths=args.strengths)
    model.n_way, model.n_shot = args.N, args.K
    return model
