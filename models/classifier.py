"""The pretraining model: an encoder and a linear classifier over the training split's classes.

Its state-dict keys, ``encoder.<the encoder's keys>``, ``fc.weight`` and ``fc.bias``, are those of
FEAT's pretrained files, so ``{'params': model.state_dict()}`` is one of them.
"""
import torch
import torch.nn as nn



class EncoderClassifier(nn.Module):
    """images (B, 3, 84, 84) -> encoder -> (B, out_dim) -> fc -> logits (B, n_classes)."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(encoder.out_dim, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(images))  # (B, n_classes)
