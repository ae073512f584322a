"""Identity classification heads shared by the re-ID models."""
from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """Pooled feature -> identity logits.

    The paper's head is a single fully connected layer (``bnneck=False``, ``dropout=0``).
    ``bnneck=True`` inserts a BatchNorm1d before the classifier.
    The classifier starts at N(0, 0.001) weights and zero bias.
    """

    def __init__(self, in_dim: int, num_classes: int, bnneck: bool = False, dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.bn = None
        if bnneck:
            self.bn = nn.BatchNorm1d(in_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        if self.bn is not None:
            feat = self.bn(feat)
        return self.classifier(self.dropout(feat))
