"""The pretraining model: an encoder and a linear classifier over the training split's classes.

Its state-dict keys, ``encoder.<the encoder's keys>``, ``fc.weight`` and ``fc.bias``, are those of
FEAT's pretrained files, so ``{'params': model.state_dict()}`` is one of them.
"""
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import autocast


class EncoderClassifier(nn.Module):
    """images (B, 3, 84, 84) -> encoder -> (B, out_dim) -> fc -> logits (B, n_classes)."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(encoder.out_dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(images))  # (B, n_classes)


def build_optimizer(name: str, parameters: Iterable[torch.Tensor], lr: float, wd: float) -> torch.optim.Optimizer:
    """'sgd': SGD with Nesterov momentum 0.9 (FEAT's ResNet-12 pretraining); 'adam': Adam (its Conv-4)."""
    if name == 'sgd':
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=wd)


def classification_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        amp: bool = False) -> tuple[torch.Tensor, int]:
    """Cross-entropy of a batch (images (B, 3, H, W), labels (B,)) and the number predicted right."""
    with autocast(images.device, amp):
        logits = model(images)  # (B, n_classes)
        loss = F.cross_entropy(logits.float(), labels)
    return loss, int((logits.argmax(dim=1) == labels).sum())
