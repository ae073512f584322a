"""Losses for FMN training (paper Sec. 3.3).

- ``cross_entropy``: identity classification, eq. (4), with optional label smoothing.
- ``ranking_loss``: eq. (5), ``max(0, p_t^G - p_t^L + margin)`` on the softmax probability of the
  true class t; GRN's probability is a fixed reference (no gradient flows into GRN).
- ``batch_hard_triplet``: optional metric loss (hardest positive / negative per anchor).
- ``soft_margin_triplet``: the same mining with the soft margin log(1 + exp(d_ap - d_an)) in place
  of the hinge (Hermans et al. 2017; PMM's per-head triplet).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean softmax cross-entropy, computed in float32; 0 (with a zero gradient) for an empty batch."""
    if logits.shape[0] == 0:
        return logits.float().sum()
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def true_class_probability(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """p_t = softmax(logits)[t] for each row, in float32."""
    return torch.softmax(logits.float(), dim=1).gather(1, targets.view(-1, 1)).squeeze(1)


def ranking_loss(
    grn_logits: torch.Tensor, lan_logits: torch.Tensor, targets: torch.Tensor, margin: float = 0.05
) -> torch.Tensor:
    """Mean over the batch of max(0, p_t^G - p_t^L + margin); p^G is detached. 0 for an empty batch."""
    p_g = true_class_probability(grn_logits.detach(), targets)
    p_l = true_class_probability(lan_logits, targets)
    if p_l.numel() == 0:
        return p_l.sum()
    return torch.clamp(p_g - p_l + margin, min=0.0).mean()


def _hardest_pairs(feats: torch.Tensor, targets: torch.Tensor):
    """(d_ap, d_an, valid, dist): each anchor's farthest same-identity and nearest other-identity
    Euclidean distance, which anchors have both, and the distance matrix. Distances are computed in
    float32 also under autocast (in bf16/fp16, the cancellation in |a|^2 + |b|^2 - 2 a.b is as
    large as the distances themselves)."""
    with torch.autocast(device_type=feats.device.type, enabled=False):
        x = feats.float()
        sq = (x * x).sum(1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(1e-12)
        dist = d2.sqrt()
    same = targets[:, None] == targets[None, :]
    eye = torch.eye(len(targets), dtype=torch.bool, device=feats.device)
    pos = same & ~eye
    neg = ~same
    d_ap = dist.masked_fill(~pos, float("-inf")).amax(1)
    d_an = dist.masked_fill(~neg, float("inf")).amin(1)
    return d_ap, d_an, pos.any(1) & neg.any(1), dist


def batch_hard_triplet(feats: torch.Tensor, targets: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss on Euclidean distances (Hermans et al. 2017).

    For each anchor: the farthest same-identity sample and the nearest other-identity sample;
    loss = mean(relu(d_ap - d_an + margin)). Anchors without a positive or a negative are skipped
    (0, with a zero gradient, when no anchor has both). Distances in float32 (``_hardest_pairs``).
    """
    d_ap, d_an, valid, dist = _hardest_pairs(feats, targets)
    if not bool(valid.any()):
        return dist.sum() * 0.0
    return F.relu(d_ap - d_an + margin)[valid].mean()


def soft_margin_triplet(feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Batch-hard triplet loss with the soft margin (Hermans et al. 2017, Sec. 2).

    The hardest positive and negative of each anchor as in :func:`batch_hard_triplet` (same
    float32 distances), then mean(softplus(d_ap - d_an)) = mean(log(1 + exp(d_ap - d_an))): no
    margin to choose, and the loss keeps pulling a triplet that a hinge would call satisfied.
    It equals ``torch.nn.SoftMarginLoss()(d_an - d_ap, 1)``. Anchors without a positive or a
    negative are skipped; 0 (with a zero gradient) when no anchor has both.
    """
    d_ap, d_an, valid, dist = _hardest_pairs(feats, targets)
    if not bool(valid.any()):
        return dist.sum() * 0.0
    return F.softplus((d_ap - d_an)[valid]).mean()


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return (logits.argmax(1) == targets).float().mean().item()
