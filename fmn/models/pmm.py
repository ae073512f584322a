"""PMM: progressive multi-stage feature mix (Zhang, He, Sun, Li; ICASSP 2021), as its authors' code
does it (github.com/crazydemo/Progressive-Multi-stage-Feature-Mix-for-Person-Re-Identification,
``models/progressive_networks.py``, class ``BFE``; "pn.py:N" below is a line of that file,
"main_reid.py:N" and "loss.py:N" (``utils/loss.py``) lines of the same repository).

Structure. The backbone runs clean up to layer4 with stride 1 (pn.py:224-232: ``res_part`` is
layer4 with a stride-1 first block; ``model.last_stride``, 1 in the PMM configs). The three
"stages" are heads on the layer4 map x (B, C, H, W); each gives a feature f_k of D = 512 * base_width
/ 64 channels (512 at the standard width) and identity logits:

  stage 1 (pn.py:233-243, 284-289): global average pooling -> 1x1 convolution C -> D (with bias)
          -> BatchNorm2d -> ReLU = f_1 -> linear classifier D -> num_classes;
  shared  (pn.py:246, 292-294): one extra Bottleneck(C, C/4) (C -> C, stride 1) on x gives z;
          stages 2 and 3 both start from this z;
  stage 2 (pn.py:247-258, 297-305): z_2 = A-Hard-Mix(z) -> global max pooling -> linear C -> D
          -> BatchNorm1d -> ReLU = f_2 -> linear classifier;
  stage 3 (pn.py:260-269, 307-316): z_3 = A-Hard-Mix(z) (from the clean z, not from z_2; its own
          partners and patches) -> the same layout with its own weights (reduction2, softmax2).
Stages 2 and 3 differ only in their weights and in where their attention comes from (below).
Initialisation as pn.py:21-33 (``weights_init_kaiming`` on every reduction and classifier):
convolutions Kaiming-normal over fan-in, linear layers over fan-out, biases 0, BatchNorm weights
N(1, 0.02) and biases 0; the extra Bottleneck keeps PyTorch's default initialisation (pn.py:246
builds it without an init). ``model.bnneck`` and ``model.dropout`` do not apply to PMM: its heads
are the authors'.

Attentive Hard-Mix (training only, inside the heads: the backbone and the stage-1 head always see
clean features). The salient region of stage k+1 is the class activation of stage k's classifier
for the true class y_b:

  stage 2's from the stage-1 classifier on x (pn.py:298), stage 3's from the stage-2 classifier
  on the mixed z_2 (pn.py:309).

Form: Grad-CAM (pn.py:176-208): the gradient of s = sum_b logits_k[b, y_b] with respect to the
head's input map, averaged over positions, weights the map's channels:
cam_b(h, w) = relu(sum_c mean_hw(ds/dmap)[b, c] * map[b, c, h, w]). Both heads start with a global
pooling, so ds/dmap[b, c, h, w] is g[b, c] / (H W) at every position for average pooling and g[b, c]
at the channel's maximum (0 elsewhere) for max pooling, where g = ds/dpooled (B, C); either way its
spatial mean is g / (H W), and

    cam_b(h, w) = relu(sum_c g[b, c] * map[b, c, h, w]) / (H W)        (:func:`class_activation`)

is exactly the authors' map. g needs a backward through the head only (a few layers on (B, C)
vectors), never through the backbone: the head is re-run on the detached pooled vector with the
same weights and the same batch statistics (BatchNorm buffers are copied, so the running
statistics move once per step), and differentiated there. The classical CAM (classifier
weights times the map) would be a different map here: the heads are not linear (BatchNorm, ReLU,
and batch statistics in training). The authors' extra ``score.backward`` also filled every
parameter's ``.grad``; their trainer zeroes the gradients after the forward (trainer.py:34-36),
so it had no effect on training, and none is made here.

Patches (pn.py:127-144): the map is cut into a grid of ``mix_grid`` = (rows, columns) patches
(the authors' patches are 3 x 2 cells of their 24 x 8 map at 384 x 128 input: an 8 x 4 grid, the
default); the activation is summed over each patch and the ``mix_top_k`` = 3 patches with the
largest sums (pn.py:133-136; ties to the lower row-major index) form M_b (B, H, W), 1 inside. They
need not be contiguous. A map that does not divide evenly gets patches whose sizes differ by one
cell (cell h is in patch row floor(h * rows / H)); a map smaller than the grid gets one patch per
cell, and at most all patches are taken. A partner p(b) of another identity is drawn uniformly from
the batch for every sample and stage, and

    z_b <- z_b * (1 - M_b) + z_p(b) * M_b        (fmn_kernels.spatial_mix, pn.py:160)

with b's label unchanged (main_reid.py:129-133: every loss uses the batch labels). With
``mix_prob`` < 1 each sample is mixed with that probability (the authors: always). A batch of one
identity cannot be mixed and is one clear error (the PK sampler gives P >= 2 identities; the
config check refuses P = 1). The authors' partner draw (pn.py:153-158) takes any sample outside
the anchor's group of 4 consecutive batch positions, which is another identity only when the batch
is made of aligned groups of 4 images per identity; here the partner is drawn by identity.

``attention="energy"`` replaces the class activation by the previous fmn release's block choice:
the ``mix_block`` window (fractions of the map's height and width) with the largest activation
energy sum_c f^2 of the same source map (x for stage 2, z_2 for stage 3).

Losses (main_reid.py:120-133): per head, cross-entropy with label smoothing (``train.label_smoothing``;
the authors' eps = 0.1, loss.py:126-154, which equals torch's label_smoothing) on its logits and a
batch-hard triplet on its D-d feature f_k (``train.triplet_weight``; the authors' weight 1), in its
soft-margin form log(1 + exp(d_ap - d_an)) (``soft_margin``; ``TripletLoss(margin=None)``,
loss.py:101-123 with config.py ``margin = None``) or the hinge with ``train.triplet_margin``. Every
head trains from the first step.

Descriptor (pn.py:321; trainers/evaluator.py:88-91): [f_1, f_2, f_3] concatenated (3 D = 1,536 at
the standard width), Euclidean distance, not normalised (the authors do not normalise).

Batch DropBlock (``batch_drop=True``; Dai et al. 2019, the network PMM's code derives from): a
fourth head like stages 2 and 3 on the shared z, in which one random block of ``drop_block``
(fractions of H and W), the same for the whole batch, is zeroed before max pooling:
z <- z * (1 - M) (``spatial_mask_mul`` with the identity activation on 1 - M). Off by default;
its feature joins the descriptor. At test time nothing is dropped or mixed.

Outputs: training {"logits": {head: (B, num_classes)}, "feats": {head: (B, D)}, "mix": {stage2,
stage3: M (B, H, W)}, "partner": {stage2, stage3: (B,)}, "attention": {stage2, stage3: the map the
patches were chosen on (B, H, W)}}; eval {stage1, stage2, stage3, [bdb], "descriptor"}.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fmn_kernels import spatial_mask_mul, spatial_mix
from fmn.losses import batch_hard_triplet, soft_margin_triplet
from fmn.models import register_model
from fmn.models.resnet import Bottleneck
from fmn.models.seed_base import SeedModel, check_bool, check_number, check_single_stage, kwargs_from_config, split_kwargs
from fmn.models.seed_losses import identity_losses

ATTENTIONS = ("cam", "energy")
HEADS = ("stage1", "stage2", "stage3")
REMOVED = ("stages", "stage_start_epochs", "mix_stages")


def _block_size(hw: Tuple[int, int], frac: Sequence[float]) -> Tuple[int, int]:
    return (min(hw[0], max(1, round(hw[0] * float(frac[0])))), min(hw[1], max(1, round(hw[1] * float(frac[1])))))


# ------------------------------------------------------------------------------ partners
@torch.no_grad()
def negative_partners(pid: torch.Tensor, generator: torch.Generator | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(partner index (B,), has a partner (B,) bool): for each sample a batch sample of another
    identity, drawn uniformly among them; a sample without one gets an arbitrary index and False."""
    B = pid.shape[0]
    score = torch.rand((B, B), generator=generator, device=pid.device)
    other = pid[:, None] != pid[None, :]
    score = torch.where(other, score, torch.full_like(score, -1.0))
    return score.argmax(1), other.any(1)


def draw_partners(pid: torch.Tensor, mix_prob: float = 1.0, generator: torch.Generator | None = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(partner (B,), mixed (B,) bool): a uniformly drawn sample of another identity for every
    sample, and which samples are mixed (each with probability ``mix_prob``). A batch of one
    identity is a ValueError when anything is to be mixed."""
    partner, valid = negative_partners(pid, generator)
    if mix_prob <= 0:
        return partner, torch.zeros_like(valid)
    if not bool(valid.all()):
        ids = sorted(set(pid.tolist()))
        raise ValueError(f"pmm: A-Hard-Mix replaces patches by those of a batch sample of another identity, but the "
                         f"batch holds one identity only ({ids[0]}, {pid.numel()} images); train with the PK sampler "
                         "and at least 2 identities per batch (data.batch_size >= 2 * data.num_instances)")
    if mix_prob < 1.0:
        valid = valid & (torch.rand(valid.shape, generator=generator, device=pid.device) < mix_prob)
    return partner, valid


# ------------------------------------------------------------------------------ attention
def class_activation(head: nn.Module, pooled: torch.Tensor, fmap: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (B, H, W) of ``head``'s classifier for the true classes ``pid`` on the map ``fmap``
    that ``pooled`` (B, C) was pooled from: relu(sum_c g[b, c] fmap[b, c]) / (H W) with g the
    gradient of sum_b logits[b, pid_b] w.r.t. ``pooled`` (module docstring). The head is re-run on
    the detached pooled vector with its weights and copies of its buffers (the batch statistics
    are the same, the running statistics are not moved again); no gradient reaches any parameter."""
    with torch.enable_grad():
        leaf = pooled.detach().requires_grad_(True)
        state = {name: p.detach() for name, p in head.named_parameters()}
        state.update({name: b.clone() for name, b in head.named_buffers()})
        _, logits = torch.func.functional_call(head, state, (leaf,))
        score = logits.float().gather(1, pid.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(score, leaf)
    H, W = fmap.shape[-2:]
    cam = torch.einsum("bc,bchw->bhw", grad.float(), fmap.detach().float())
    return F.relu(cam) / (H * W)


def patch_index(hw: Tuple[int, int], grid: Sequence[int], device=None) -> Tuple[torch.Tensor, int]:
    """(the patch of every cell (H, W) as a row-major index, the number of patches) of a ``grid``
    (rows, columns) of patches over an H x W map: cell (h, w) is in patch row floor(h * rows / H)
    and column floor(w * columns / W), with rows and columns capped at H and W."""
    H, W = hw
    rows, cols = min(int(grid[0]), H), min(int(grid[1]), W)
    r = torch.arange(H, device=device) * rows // H
    c = torch.arange(W, device=device) * cols // W
    return r[:, None] * cols + c[None, :], rows * cols


@torch.no_grad()
def top_patch_mask(attention: torch.Tensor, grid: Sequence[int], k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask (B, H, W) float 0/1, chosen patches (B, k') row-major): the k' = min(k, patches)
    patches of the ``grid`` with the largest sums of ``attention`` (B, H, W); ties go to the lower
    index."""
    B, H, W = attention.shape
    cell, n = patch_index((H, W), grid, attention.device)
    sums = torch.zeros((B, n), dtype=torch.float32, device=attention.device)
    sums.index_add_(1, cell.flatten(), attention.float().flatten(1))
    top = torch.sort(sums, dim=1, descending=True, stable=True).indices[:, :min(int(k), n)]
    chosen = torch.zeros((B, n), dtype=torch.bool, device=attention.device).scatter_(1, top, True)
    return chosen[:, cell.flatten()].view(B, H, W).to(torch.float32), top


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


def hard_mix(f: torch.Tensor, mask: torch.Tensor, partner: torch.Tensor, mixed: torch.Tensor,
             backend: str | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(f_b * (1 - M_b) + f_partner(b) * M_b, the mask applied (B, H, W)): samples with ``mixed``
    False keep M_b = 0."""
    mask = mask * mixed[:, None, None].to(mask.dtype)
    # o = f * (1 - M) + f[partner] * M: the chosen cells replaced by the partner's same cells
    return spatial_mix(f, f[partner], mask.to(f.dtype), backend=backend), mask


def attentive_hard_mix(f: torch.Tensor, pid: torch.Tensor, block: Tuple[int, int], mix_prob: float = 1.0,
                       backend: str | None = None, generator: torch.Generator | None = None):
    """(mixed features, mask (B, H, W), partner (B,)): the energy form (``attention="energy"``) on
    ``f`` itself: its most energetic bh x bw block replaced by that of a sample of another identity."""
    partner, mixed = draw_partners(pid, mix_prob, generator)
    mask, _ = salient_block_mask(f, block)
    out, mask = hard_mix(f, mask, partner, mixed, backend)
    return out, mask, partner


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


# ------------------------------------------------------------------------------ heads
def _init_like_authors(module: nn.Module) -> None:
    """pn.py:21-33 (weights_init_kaiming)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
            nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class GlobalHead(nn.Module):
    """Stage 1 on the average-pooled vector (B, C): 1x1 conv C -> D (bias), BatchNorm2d, ReLU = the
    feature; a linear classifier (pn.py:233-243). Returns (feature (B, D), logits)."""

    def __init__(self, in_ch: int, dim: int, num_classes: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Conv2d(in_ch, dim, 1), nn.BatchNorm2d(dim), nn.ReLU())
        self.classifier = nn.Linear(dim, num_classes)
        _init_like_authors(self)

    def forward(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feat = self.reduction(pooled[:, :, None, None]).flatten(1)
        return feat, self.classifier(feat)


class PartHead(nn.Module):
    """Stages 2 and 3 on the max-pooled vector (B, C): linear C -> D, BatchNorm1d, ReLU = the
    feature; a linear classifier (pn.py:251-258, 262-269). Returns (feature (B, D), logits)."""

    def __init__(self, in_ch: int, dim: int, num_classes: int):
        super().__init__()
        self.reduction = nn.Sequential(nn.Linear(in_ch, dim), nn.BatchNorm1d(dim), nn.ReLU())
        self.classifier = nn.Linear(dim, num_classes)
        _init_like_authors(self)

    def forward(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        feat = self.reduction(pooled)
        return feat, self.classifier(feat)


def _fractions(key: str, frac) -> Tuple[float, float]:
    if not isinstance(frac, (list, tuple)) or len(frac) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v <= 1.0 for v in frac):
        raise ValueError(f"pmm: {key} must be two fractions in (0, 1] (height, width), got {frac!r}")
    return float(frac[0]), float(frac[1])


class PMM(SeedModel):
    needs_parts = False

    def __init__(self, num_classes: int, attention: str = "cam", mix_grid: Sequence[int] = (8, 4),
                 mix_top_k: int = 3, mix_prob: float = 1.0, mix_block: Sequence[float] = (0.33, 0.5),
                 soft_margin: bool = True, batch_drop: bool = False, drop_block: Sequence[float] = (0.33, 1.0),
                 **kwargs):
        removed = sorted(k for k in kwargs if k in REMOVED)
        if removed:
            raise ValueError(f"pmm: option(s) {', '.join(removed)} no longer exist: PMM's stages are three heads on "
                             "layer4, all trained from the start, mixed inside the heads (fmn/models/pmm.py)")
        base = split_kwargs("pmm", kwargs)
        base.setdefault("last_stride", 1)
        super().__init__("pmm", num_classes, **base)
        if attention not in ATTENTIONS:
            raise ValueError(f"pmm: attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.attention = attention
        if not isinstance(mix_grid, (list, tuple)) or len(mix_grid) != 2 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in mix_grid):
            raise ValueError(f"pmm: mix_grid must be two integers >= 1 (patch rows, patch columns), got {mix_grid!r}")
        self.mix_grid = (int(mix_grid[0]), int(mix_grid[1]))
        self.mix_top_k = int(check_number("pmm", "mix_top_k", mix_top_k, lo=1, integer=True))
        self.mix_prob = float(check_number("pmm", "mix_prob", mix_prob, lo=0, hi=1))
        self.mix_block = _fractions("mix_block", mix_block)
        self.soft_margin = check_bool("pmm", "soft_margin", soft_margin)
        self.batch_drop = check_bool("pmm", "batch_drop", batch_drop)
        self.drop_block = _fractions("drop_block", drop_block)
        C = self.channels["layer4"]
        self.feat_dim = max(1, 512 * self.backbone.base_width // 64)
        self.part_block = Bottleneck(C, max(1, C // Bottleneck.expansion))
        heads = {"stage1": GlobalHead(C, self.feat_dim, self.num_classes),
                 "stage2": PartHead(C, self.feat_dim, self.num_classes),
                 "stage3": PartHead(C, self.feat_dim, self.num_classes)}
        if self.batch_drop:
            heads["bdb"] = PartHead(C, self.feat_dim, self.num_classes)
        self.heads = nn.ModuleDict(heads)

    @staticmethod
    def descriptor(feats) -> torch.Tensor:
        """The heads' features concatenated, not normalised (pn.py:321; the authors rank by the
        Euclidean distance between these, trainers/evaluator.py:88-91)."""
        return torch.cat([f.float() for f in feats], dim=1)

    def _mix_region(self, source: torch.Tensor, pooled: torch.Tensor, head: nn.Module, pid: torch.Tensor):
        """(attention map (B, H, W), region mask (B, H, W)) of the next stage from the previous
        head's input map ``source`` and pooled vector."""
        if self.attention == "cam":
            att = class_activation(head, pooled, source, pid)
            return att, top_patch_mask(att, self.mix_grid, self.mix_top_k)[0]
        mask, _ = salient_block_mask(source, _block_size(source.shape[-2:], self.mix_block))
        return source.detach().float().pow(2).sum(1), mask

    def forward(self, img: torch.Tensor, batch: dict | None = None) -> Dict[str, torch.Tensor]:
        self.check_images(img)
        mixing = self.training and self.mix_prob > 0
        pid = batch.get("pid") if (mixing and isinstance(batch, dict)) else None
        if mixing and pid is None:
            raise ValueError("pmm: training needs the identities of the batch (batch['pid']) for A-Hard-Mix")
        b = self.backbone
        x = b.layer4(b.layer3(b.layer2(b.layer1(b.stem(img)))))
        feats, logits = {}, {}
        pooled1 = x.mean((2, 3))
        feats["stage1"], logits["stage1"] = self.heads["stage1"](pooled1)
        z = self.part_block(x)
        mixes, attention = {}, {}
        # each stage draws its own partners (pn.py:299, 310), before any map is computed
        draws = {name: draw_partners(pid, self.mix_prob) for name in ("stage2", "stage3")} if mixing else {}
        partners = {name: d[0] for name, d in draws.items()}
        source, pooled, prev = x, pooled1, self.heads["stage1"]
        for name in ("stage2", "stage3"):
            zk = z
            if mixing:
                attention[name], region = self._mix_region(source, pooled, prev, pid)
                zk, mixes[name] = hard_mix(z, region, *draws[name], backend=self.backend)
            pooled = zk.amax((2, 3))
            feats[name], logits[name] = self.heads[name](pooled)
            source, prev = zk, self.heads[name]
        if self.batch_drop:
            kept = z
            if self.training:
                drop = batch_drop_mask(z.shape[0], z.shape[-2:], _block_size(z.shape[-2:], self.drop_block), z.device)
                # z <- z * (1 - M): identity activation on the keep mask 1 - M
                kept = spatial_mask_mul(z, (1.0 - drop).to(z.dtype), "identity", backend=self.backend)
            feats["bdb"], logits["bdb"] = self.heads["bdb"](kept.amax((2, 3)))
        if not self.training:
            return {**feats, "descriptor": self.descriptor(list(feats.values()))}
        return {"logits": logits, "feats": feats, "mix": mixes, "partner": partners, "attention": attention}

    def loss(self, out: dict, batch: dict):
        pid = batch["pid"]
        names = list(out["logits"])
        total, stats = identity_losses([(k, out["logits"][k]) for k in names], pid, self.label_smoothing)
        if self.triplet_weight > 0:
            for k in names:
                f = out["feats"][k]
                tri = soft_margin_triplet(f, pid) if self.soft_margin else batch_hard_triplet(f, pid, self.triplet_margin)
                stats[f"triplet_{k}"] = tri.detach()
                total = total + self.triplet_weight * tri
        for k in names:
            stats[f"acc_{k}"] = (out["logits"][k].argmax(1) == pid).float().mean().detach()
        stats["acc"] = stats["acc_stage1"]
        stats["loss"] = total.detach()
        return total, stats


SECTION = {"attention": "cam", "mix_grid": [8, 4], "mix_top_k": 3, "mix_prob": 1.0, "mix_block": [0.33, 0.5],
           "soft_margin": True, "batch_drop": False, "drop_block": [0.33, 1.0]}


def check_pmm(cfg: dict) -> None:
    """One stage on ``train.stage1``; A-Hard-Mix needs P >= 2 identities in every batch."""
    check_single_stage("pmm")(cfg)
    d = cfg["data"]
    mix_prob = cfg["pmm"]["mix_prob"]
    sizes = (d["batch_size"], d["num_instances"])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
        return                                  # the data checks name the bad value
    if isinstance(mix_prob, (int, float)) and mix_prob > 0 and sizes[0] < 2 * sizes[1]:
        raise ValueError(f"config value data.batch_size={d['batch_size']!r} is invalid: pmm mixes each sample with one "
                         f"of another identity, so a batch needs at least 2 identities of data.num_instances "
                         f"({d['num_instances']}) images (or pmm.mix_prob=0)")


@register_model("pmm", section=SECTION, check=check_pmm,
                training_only=("attention", "mix_grid", "mix_top_k", "mix_prob", "mix_block", "soft_margin",
                               "drop_block"),
                kwargs_from_config=kwargs_from_config("pmm"), schedules=("stage1",))
def build_pmm(num_classes: int, **cfg) -> PMM:
    return PMM(num_classes=num_classes, **cfg)
