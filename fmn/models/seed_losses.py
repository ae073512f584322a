"""Losses of the mask-guided and multi-stage models (MMGA, MGRAN, PMM).

- ``attention_loss``: mean binary cross-entropy between attention logits u (B, K, h, w) and soft
  body-part targets y in [0, 1] at the attention's resolution:
  ``-mean(y log sigmoid(u) + (1 - y) log(1 - sigmoid(u)))``.
- ``downsample_masks``: masks (B, K, H, W) -> (B, K, h, w) by area averaging (the fraction of
  each feature cell covered by the part).
- ``identity_losses``: the sum of cross-entropies of several classifiers on the same labels.
The batch-hard triplet and the cross-entropy themselves come from ``fmn.losses``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
import torch.nn.functional as F

from fmn.losses import batch_hard_triplet, cross_entropy

__all__ = ["attention_loss", "downsample_masks", "identity_losses", "batch_hard_triplet", "cross_entropy"]


def downsample_masks(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Area-average (B, K, H, W) masks to (B, K, h, w)."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.adaptive_avg_pool2d(masks.float(), size)


def attention_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """BCE(sigmoid(logits), masks resized to the logits' size), in float32; 0 for an empty batch."""
    if logits.numel() == 0:
        return logits.float().sum()
    target = downsample_masks(masks, logits.shape[-2:]).to(torch.float32)
    return F.binary_cross_entropy_with_logits(logits.float(), target)


def identity_losses(logits: Dict[str, torch.Tensor] | Iterable[Tuple[str, torch.Tensor]], pid: torch.Tensor,
                    label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(sum of the cross-entropies, {"ce_<name>": value}) over named logits."""
    items = logits.items() if isinstance(logits, dict) else logits
    total, stats = None, {}
    for name, lg in items:
        ce = cross_entropy(lg, pid, label_smoothing)
        stats[f"ce_{name}"] = ce.detach()
        total = ce if total is None else total + ce
    if total is None:
        raise ValueError("identity_losses: no classifier outputs")
    return total, stats
