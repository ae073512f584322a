"""PMM: progressive multi-stage feature mix (Zhang, He, Sun, Li; ICASSP 2021).

Multi-stage classifiers: each backbone stage s in ``stages`` has its own pooled feature
f_s = GAP(stage output) and identity classifier. Training is progressive: the classifier of
stage s joins the loss from epoch ``stage_start_epochs[s]`` on (``set_epoch``, called by the
trainer every epoch). The model's default starts them all at epoch 0; configs/pmm.yaml switches the
shallow stages on first ([0, 1, 2]).

Attentive feature Hard-Mix (A-Hard-Mix), in training after each stage in ``mix_stages``: per
sample b, the energy E_b(y, x) = sum_c f_b(c, y, x)^2 is summed over every bh x bw window of
the stage's output (``mix_block`` as fractions of the map's height and width); the window with
the largest sum (the first in row-major order on ties) is the block M_b (B, H, W), 1 inside;
a partner p(b) of another identity is drawn uniformly from the batch, and

    f_b <- f_b * (1 - M_b) + f_p(b) * M_b       (fmn_kernels.spatial_mix)

so the next stage sees the sample with its most salient block taken from a negative and must
find other evidence. The label stays b's. Stage s's own classifier sees the unmixed f_s.
A sample without a partner of another identity, or not drawn with probability ``mix_prob``,
is left unchanged.

Batch DropBlock (``batch_drop=True``, Dai et al. 2019): a branch on the last stage's output in
which one random block of ``drop_block`` (fractions of H and W), the same for the whole batch,
is zeroed: f <- f * (1 - M) (``spatial_mask_mul`` with the identity activation on 1 - M);
global max pooling and its own classifier. At test time nothing is dropped.

Descriptor: ``[f_s/|f_s| for s in stages (+ the drop branch)] / sqrt(n)``.

Outputs: training {"logits": {stage: ...}, "feats": {...}, "mix": {stage: M}}; eval
{<stage>: f_s, ["bdb"], "descriptor"}.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fmn_kernels import spatial_mask_mul, spatial_mix
from fmn.models import register_model
from fmn.models.seed_base import STAGES, SeedModel, check_bool, check_number, check_single_stage, check_stages, kwargs_from_config, split_kwargs
from fmn.models.seed_losses import identity_losses


def _block_size(hw: Tuple[int, int], frac: Sequence[float]) -> Tuple[int, int]:
    return (min(hw[0], max(1, round(hw[0] * float(frac[0])))), min(hw[1], max(1, round(hw[1] * float(frac[1])))))


@torch.no_grad()
def salient_block_mask(f: torch.Tensor, block: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, H, W) float 0/1, top-left corners (B, 2) as (y, x)) of each sample's bh x bw
    window with the largest activation energy sum_c f^2 (first window in row-major order on ties)."""
    B, _, H, W = f.shape
    bh, bw = block
    energy = f.detach().float().pow(2).sum(1, keepdim=True)
    window = F.avg_pool2d(energy, (bh, bw), stride=1)[:, 0]
    ww = window.shape[-1]
    idx = window.flatten(1).argmax(1)
    y, x = idx // ww, idx % ww
    rows = torch.arange(H, device=f.device)[None, :]
    cols = torch.arange(W, device=f.device)[None, :]
    in_y = (rows >= y[:, None]) & (rows < (y + bh)[:, None])
    in_x = (cols >= x[:, None]) & (cols < (x + bw)[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :]).to(torch.float32)
    return mask, torch.stack([y, x], 1)


@torch.no_grad()
def negative_partners(pid: torch.Tensor, generator: torch.Generator | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(partner index (B,), has a partner (B,) bool): for each sample a uniformly drawn batch
    sample of another identity."""
    B = pid.shape[0]
    score = torch.rand((B, B), generator=generator, device=pid.device)
    other = pid[:, None] != pid[None, :]
    score = torch.where(other, score, torch.full_like(score, -1.0))
    return score.argmax(1), other.any(1)


def attentive_hard_mix(f: torch.Tensor, pid: torch.Tensor, block: Tuple[int, int], mix_prob: float = 1.0,
                       backend: str | None = None, generator: torch.Generator | None = None):
    """(mixed features, mask (B, H, W), partner (B,)): A-Hard-Mix of the module docstring."""
    mask, _ = salient_block_mask(f, block)
    partner, valid = negative_partners(pid, generator)
    if mix_prob < 1.0:
        valid = valid & (torch.rand(valid.shape, generator=generator, device=pid.device) < mix_prob)
    mask = mask * valid[:, None, None].to(mask.dtype)
    # o = f * (1 - M) + f[partner] * M: the salient block replaced by the partner's same block
    return spatial_mix(f, f[partner], mask.to(f.dtype), backend=backend), mask, partner


def batch_drop_mask(batch: int, hw: Tuple[int, int], block: Tuple[int, int], device=None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, H, W) 0/1 drop mask: one random bh x bw block, the same for every sample."""
    H, W = hw
    bh, bw = block
    y = int(torch.randint(0, H - bh + 1, (1,), generator=generator))
    x = int(torch.randint(0, W - bw + 1, (1,), generator=generator))
    m = torch.zeros((H, W), device=device)
    m[y:y + bh, x:x + bw] = 1.0
    return m[None].expand(batch, H, W).contiguous()


class PMM(SeedModel):
    needs_parts = False

    def __init__(self, num_classes: int, stages: Sequence[str] = ("layer2", "layer3", "layer4"),
                 stage_start_epochs: Sequence[int] | None = None, mix_stages: Sequence[str] = ("layer2", "layer3"),
                 mix_block: Sequence[float] = (0.33, 0.5), mix_prob: float = 1.0, batch_drop: bool = False,
                 drop_block: Sequence[float] = (0.3, 1.0), **kwargs):
        base = split_kwargs("pmm", kwargs)
        super().__init__("pmm", num_classes, **base)
        self.stages = check_stages("pmm", "stages", stages)
        if not self.stages:
            raise ValueError("pmm: stages must name at least one stage")
        starts = [0] * len(self.stages) if stage_start_epochs is None else stage_start_epochs
        if not isinstance(starts, (list, tuple)) or len(starts) != len(self.stages) \
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in starts):
            raise ValueError(f"pmm: stage_start_epochs needs one epoch >= 0 per stage {list(self.stages)}, got {starts}")
        if min(starts) != 0:
            raise ValueError(f"pmm: at least one stage classifier must start at epoch 0, got {starts}")
        self.stage_start = dict(zip(self.stages, (int(v) for v in starts)))
        self.mix_stages = check_stages("pmm", "mix_stages", mix_stages)
        # features mixed after a stage reach a classifier only through a later stage that has one
        # (layer4 has one with batch_drop)
        batch_drop = check_bool("pmm", "batch_drop", batch_drop)
        deepest = STAGES.index(STAGES[-1] if batch_drop else self.stages[-1])
        late = [s for s in self.mix_stages if STAGES.index(s) >= deepest]
        if late:
            raise ValueError(f"pmm: mix_stages {late} come at or after the last stage with a classifier "
                             f"({STAGES[deepest]}): no classifier would see the mixed features")
        for key, frac in (("mix_block", mix_block), ("drop_block", drop_block)):
            if not isinstance(frac, (list, tuple)) or len(frac) != 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v <= 1.0 for v in frac):
                raise ValueError(f"pmm: {key} must be two fractions in (0, 1] (height, width), got {frac!r}")
        self.mix_block = tuple(float(v) for v in mix_block)
        self.mix_prob = float(check_number("pmm", "mix_prob", mix_prob, lo=0, hi=1))
        self.batch_drop = batch_drop
        self.drop_block = tuple(float(v) for v in drop_block)
        self.heads = nn.ModuleDict({s: self.head(self.channels[s]) for s in self.stages})
        if self.batch_drop:
            self.heads["bdb"] = self.head(self.channels["layer4"])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def active_stages(self) -> Tuple[str, ...]:
        return tuple(s for s in self.stages if self.stage_start[s] <= self.epoch)

    def forward(self, img: torch.Tensor, batch: dict | None = None) -> Dict[str, torch.Tensor]:
        self.check_images(img)
        pid = batch.get("pid") if (self.training and batch is not None) else None
        x = self.backbone.stem(img)
        feats, mixes = {}, {}
        last = self.stages[-1]
        for name in STAGES:
            x = getattr(self.backbone, name)(x)
            if name in self.stages:
                feats[name] = x.float().mean((2, 3))
            if self.batch_drop and name == "layer4":
                if self.training:
                    drop = batch_drop_mask(x.shape[0], x.shape[-2:], _block_size(x.shape[-2:], self.drop_block), x.device)
                    # f <- f * (1 - M): identity activation on the keep mask 1 - M
                    kept = spatial_mask_mul(x, (1.0 - drop).to(x.dtype), "identity", backend=self.backend)
                else:
                    kept = x
                feats["bdb"] = kept.float().amax((2, 3))
            if name == last and not self.batch_drop:
                break
            if pid is not None and name in self.mix_stages:
                x, mixes[name], _ = attentive_hard_mix(x, pid, _block_size(x.shape[-2:], self.mix_block),
                                                       self.mix_prob, backend=self.backend)
        if not self.training:
            return {**feats, "descriptor": self.descriptor(list(feats.values()))}
        logits = {k: self.heads[k](v) for k, v in feats.items()}
        return {"logits": logits, "feats": feats, "mix": mixes}

    def loss(self, out: dict, batch: dict):
        pid = batch["pid"]
        active = [s for s in self.active_stages()]
        if self.batch_drop and self.stages[-1] in active:
            active.append("bdb")
        total, stats = identity_losses([(k, out["logits"][k]) for k in active], pid, self.label_smoothing)
        tri = self.metric_loss(self.descriptor([out["feats"][k] for k in active]), pid, stats)
        if tri is not None:
            total = total + tri
        deepest = self.active_stages()[-1]
        stats["acc"] = (out["logits"][deepest].argmax(1) == pid).float().mean().detach()
        stats["active_stages"] = torch.tensor(float(len(self.active_stages())))
        stats["loss"] = total.detach()
        return total, stats


SECTION = {"stages": ["layer2", "layer3", "layer4"], "stage_start_epochs": [0, 0, 0],
           "mix_stages": ["layer2", "layer3"], "mix_block": [0.33, 0.5], "mix_prob": 1.0,
           "batch_drop": False, "drop_block": [0.3, 1.0]}


@register_model("pmm", section=SECTION, check=check_single_stage("pmm"),
                training_only=("stage_start_epochs", "mix_stages", "mix_block", "mix_prob", "drop_block"), kwargs_from_config=kwargs_from_config("pmm"), schedules=("stage1",))
def build_pmm(num_classes: int, **cfg) -> PMM:
    return PMM(num_classes=num_classes, **cfg)
