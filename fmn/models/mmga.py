"""MMGA: multi-scale body-part mask guided attention (Cai, Wang, Cheng; Market-1501 95.0 / 87.2).

After each backbone stage s in ``scales`` a 1x1 convolution predicts three attention logits
u_s = (u_body, u_upper, u_lower), each (B, h_s, w_s):

    whole body   f_s <- f_s * sigmoid(u_body)      the trunk continues with the attended features
    part body    p_{s,k} = sum_hw(f_s * sigmoid(u_k)) / sum_hw(sigmoid(u_k)),  k in {upper, lower}
                 (the attention-weighted mean of the stage's features, before the whole-body gate)

Every product f * sigmoid(u) is ``fmn_kernels.spatial_mask_mul(f, u, "sigmoid")`` (the mask
broadcast over channels). Each attention map is supervised by the matching body-part mask of
``fmn.data.parts`` (body, upper, lower), area-averaged to (h_s, w_s), with a binary
cross-entropy (``seed_losses.attention_loss``), averaged over scales and weighted by
``attention_weight``.

Features: g = GAP of the last (attended) stage; upper / lower = Linear + BN of the concatenated
multi-scale part features [p_{s,k}]_s. Each has its own identity classifier. The descriptor is
``[g/|g|, upper/|upper|, lower/|lower|] / sqrt(3)``.

Outputs: training {"logits": {global, upper, lower}, "feats": {...}, "attention": {stage: u_s}};
eval {"global", "upper", "lower", "descriptor"}.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn

from fmn_kernels import spatial_mask_mul
from fmn.data.parts import part_index
from fmn.models import register_model
from fmn.models.seed_base import STAGES, SeedModel, check_number, check_single_stage, check_stages, kwargs_from_config, part_masks, split_kwargs
from fmn.models.seed_losses import attention_loss, identity_losses

ATTENTION_PARTS = ("body", "upper", "lower")


class MMGA(SeedModel):
    def __init__(self, num_classes: int, scales: Sequence[str] = ("layer2", "layer3", "layer4"),
                 part_dim: int = 256, attention_weight: float = 1.0, **kwargs):
        base = split_kwargs("mmga", kwargs)
        super().__init__("mmga", num_classes, **base)
        self.scales = check_stages("mmga", "scales", scales)
        if not self.scales:
            raise ValueError("mmga: scales must name at least one stage")
        check_number("mmga", "part_dim", part_dim, lo=1, integer=True)
        self.attention_weight = float(check_number("mmga", "attention_weight", attention_weight, lo=0))
        self.attention = nn.ModuleDict({s: nn.Conv2d(self.channels[s], len(ATTENTION_PARTS), 1) for s in self.scales})
        for conv in self.attention.values():
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        part_in = sum(self.channels[s] for s in self.scales)
        self.part_embed = nn.ModuleDict({
            k: nn.Sequential(nn.Linear(part_in, part_dim, bias=False), nn.BatchNorm1d(part_dim))
            for k in ("upper", "lower")})
        self.feature_dim = self.channels["layer4"]
        self.heads = nn.ModuleDict({"global": self.head(self.feature_dim), "upper": self.head(part_dim),
                                    "lower": self.head(part_dim)})
        self._mask_channels = part_index(ATTENTION_PARTS)

    def _part_pool(self, f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        # p = sum_hw(f * sigmoid(u)) / sum_hw(sigmoid(u)): the attention-weighted spatial mean
        weighted = spatial_mask_mul(f, u, "sigmoid", backend=self.backend)
        mass = torch.sigmoid(u.float()).sum((1, 2)).clamp_min(1e-6)
        return weighted.float().sum((2, 3)) / mass[:, None]

    def _run(self, img: torch.Tensor):
        self.check_images(img)
        x = self.backbone.stem(img)
        att: Dict[str, torch.Tensor] = {}
        parts = {"upper": [], "lower": []}
        for name in STAGES:
            x = getattr(self.backbone, name)(x)
            if name not in self.scales:
                continue
            u = self.attention[name](x)
            att[name] = u
            parts["upper"].append(self._part_pool(x, u[:, 1].contiguous()))
            parts["lower"].append(self._part_pool(x, u[:, 2].contiguous()))
            # whole-body attention: f <- f * sigmoid(u_body)
            x = spatial_mask_mul(x, u[:, 0].contiguous(), "sigmoid", backend=self.backend)
        g = x.float().mean((2, 3))
        feats = {"global": g}
        for k in ("upper", "lower"):
            feats[k] = self.part_embed[k](torch.cat(parts[k], 1))
        return feats, att

    def forward(self, img: torch.Tensor, batch: dict | None = None) -> Dict[str, torch.Tensor]:
        feats, att = self._run(img)
        if not self.training:
            return {**feats, "descriptor": self.descriptor(list(feats.values()))}
        logits = {k: self.heads[k](v) for k, v in feats.items()}
        return {"logits": logits, "feats": feats, "attention": att}

    def loss(self, out: dict, batch: dict):
        pid = batch["pid"]
        total, stats = identity_losses(out["logits"], pid, self.label_smoothing)
        masks = part_masks("mmga", batch, self._mask_channels, pid.shape[0])
        att = torch.stack([attention_loss(u, masks) for u in out["attention"].values()]).mean()
        stats["attention"] = att.detach()
        total = total + self.attention_weight * att
        tri = self.metric_loss(self.descriptor(list(out["feats"].values())), pid, stats)
        if tri is not None:
            total = total + tri
        stats["acc"] = (out["logits"]["global"].argmax(1) == pid).float().mean().detach()
        stats["loss"] = total.detach()
        return total, stats

    @torch.no_grad()
    def attention_maps(self, img: torch.Tensor) -> Dict[str, torch.Tensor]:
        """sigmoid(u_s) per scale, (B, 3, h_s, w_s) in the order body, upper, lower."""
        return {k: torch.sigmoid(v.float()) for k, v in self._run(img)[1].items()}


SECTION = {"scales": ["layer2", "layer3", "layer4"], "part_dim": 256, "attention_weight": 1.0}


@register_model("mmga", section=SECTION, check=check_single_stage("mmga"),
                training_only=("attention_weight",), kwargs_from_config=kwargs_from_config("mmga"), schedules=("stage1",),
                needs_parts=lambda cfg: True)
def build_mmga(num_classes: int, **cfg) -> MMGA:
    return MMGA(num_classes=num_classes, **cfg)
