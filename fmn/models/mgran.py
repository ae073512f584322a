"""MGRAN: mask-guided region attention network (Zhou and Yu; Market-1501 88.9 / 78.0).

Two parts, trained independently as in the paper:

MRA (mask-guided region attention) gives R region masks M_r (B, H, W) at the input's size:
  a pedestrian mask and keypoint region masks (``regions``, channel names of
  ``fmn.data.parts``; default body, kp_upper, kp_lower). The masks are binarised at
  ``threshold`` (0.5): M_r = [m_r >= 0.5]; masks of another size than the image are resized
  bilinearly first. In training they come from the loader's masks (the
  parser / pose outputs the paper took from Mask R-CNN); a small convolutional mask predictor
  learns them with a binary cross-entropy on the binarised targets, and supplies them at test
  time (M_r = [sigmoid(v_r) >= 0.5]) where only images are available; where the query and gallery
  images have mask files too, evaluation uses them, as the published pipeline does. ``train_masks="predicted"``
  uses the predictor's masks in training as well. No gradient flows from MA into MRA (the
  threshold is a step).

MA (multi-feature alignment): one weight-shared backbone runs over the global input and the R
  region inputs

      x_0 = x,    x_r = x * M_r     (fmn_kernels.spatial_mask_mul, identity activation)

  (outside the region the normalised image becomes 0, the mean colour). Each stream has its own
  identity classifier on its pooled feature f_r. The descriptor aligns the streams:
  ``D = [f_0/|f_0|, f_1/|f_1|, ..., f_R/|f_R|] / sqrt(R + 1)``, so the distance between two
  images is the mean over streams of the distance between corresponding regions
  (|D_a - D_b|^2 = sum_r |f_r^a/|f_r^a| - f_r^b/|f_r^b||^2 / (R + 1)); a batch-hard triplet on D
  (``triplet_weight``) trains that alignment.

``alignment="part"`` is the seed's part-level ablation (MGRAN-PL): the R region masks are
replaced by R equal horizontal stripes (rigid parts); no mask predictor is used.

Outputs: training {"logits": {global, <regions>}, "feats": {...}, "mask_logits": (B, R, H, W) or
absent}; eval {"global", <regions>..., "descriptor"}.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fmn_kernels import spatial_mask_mul
from fmn.data.parts import part_index
from fmn.models import register_model
from fmn.models.seed_base import STAGES, SeedModel, check_names, check_number, check_single_stage, kwargs_from_config, part_masks, split_kwargs
from fmn.models.seed_losses import identity_losses

ALIGNMENTS = ("region", "part")
TRAIN_MASKS = ("given", "predicted")


def _conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MaskPredictor(nn.Module):
    """Image -> R region mask logits at the input's size: four 3x3 conv-BN-ReLU (two with
    stride 2, two dilated), a 1x1 convolution, bilinear upsampling by 4."""

    def __init__(self, regions: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(3, width, 2), _conv_bn(width, 2 * width, 2),
                                  _conv_bn(2 * width, 2 * width, dilation=2), _conv_bn(2 * width, 2 * width, dilation=4))
        self.out = nn.Conv2d(2 * width, regions, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        v = self.out(self.body(img))
        return F.interpolate(v, size=img.shape[-2:], mode="bilinear", align_corners=False)


def stripe_masks(batch: int, regions: int, height: int, width: int, device=None) -> torch.Tensor:
    """(B, R, H, W) 0/1: R horizontal stripes of equal height (rows floor(r H / R) .. floor((r+1) H / R))."""
    rows = torch.arange(height, device=device)
    bounds = [(r * height) // regions for r in range(regions + 1)]
    m = torch.stack([((rows >= bounds[r]) & (rows < bounds[r + 1])) for r in range(regions)]).float()
    return m[None, :, :, None].expand(batch, regions, height, width).contiguous()


class MGRAN(SeedModel):
    def __init__(self, num_classes: int, regions: Sequence[str] = ("body", "kp_upper", "kp_lower"),
                 alignment: str = "region", threshold: float = 0.5, mask_weight: float = 1.0,
                 mask_width: int = 32, train_masks: str = "given", **kwargs):
        base = split_kwargs("mgran", kwargs)
        super().__init__("mgran", num_classes, **base)
        self.regions = check_names("mgran", "regions", regions)
        if not self.regions:
            raise ValueError("mgran: regions must name at least one mask channel")
        self._region_channels = part_index(self.regions)
        if alignment not in ALIGNMENTS:
            raise ValueError(f"mgran: alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
        if train_masks not in TRAIN_MASKS:
            raise ValueError(f"mgran: train_masks must be one of {', '.join(TRAIN_MASKS)}, got {train_masks!r}")
        if not 0.0 < check_number("mgran", "threshold", threshold) < 1.0:
            raise ValueError(f"mgran: threshold must be in (0, 1), got {threshold}")
        check_number("mgran", "mask_weight", mask_weight, lo=0)
        check_number("mgran", "mask_width", mask_width, lo=1, integer=True)
        if alignment == "region" and mask_weight == 0:
            raise ValueError("mgran: mask_weight=0 leaves the mask predictor untrained, yet it supplies the region "
                             "masks at test time; use mask_weight > 0 (or alignment='part')")
        self.alignment = alignment
        self.needs_parts = alignment == "region"
        self.threshold = float(threshold)
        self.mask_weight = float(mask_weight)
        self.train_masks = train_masks
        self.mask_predictor = MaskPredictor(len(self.regions), mask_width) if alignment == "region" else None
        self.stream_names = ("global",) + (self.regions if alignment == "region"
                                           else tuple(f"part{r + 1}" for r in range(len(self.regions))))
        self.feature_dim = self.channels["layer4"]
        self.heads = nn.ModuleDict({n: self.head(self.feature_dim) for n in self.stream_names})

    def binarize(self, masks: torch.Tensor) -> torch.Tensor:
        """[m >= threshold] as float."""
        return (masks >= self.threshold).to(torch.float32)

    def region_masks(self, img: torch.Tensor, batch: dict | None, mask_logits: torch.Tensor | None) -> torch.Tensor:
        """The binary region masks (B, R, H, W) the streams use."""
        B, _, H, W = img.shape
        if self.alignment == "part":
            return stripe_masks(B, len(self.regions), H, W, img.device)
        if self.training and self.train_masks == "given" or mask_logits is None:
            return self.binarize(part_masks("mgran", batch, self._region_channels, B, (H, W)))
        # sigmoid(v) >= t  <=>  v >= log(t / (1 - t))
        return (mask_logits.float() >= math.log(self.threshold / (1.0 - self.threshold))).to(torch.float32)

    def forward(self, img: torch.Tensor, batch: dict | None = None) -> Dict[str, torch.Tensor]:
        self.check_images(img)
        # at test time the images' own mask files, where the evaluation gives them, replace the predictor
        given = not self.training and isinstance(batch, dict) and batch.get("parts") is not None
        mask_logits = self.mask_predictor(img) if self.mask_predictor is not None and not given else None
        masks = self.region_masks(img, batch, mask_logits).to(img.dtype)
        # region attention at the input: x_r = x * M_r, the 0/1 mask broadcast over the colour channels
        inputs = [img] + [spatial_mask_mul(img, masks[:, r].contiguous(), "identity", backend=self.backend)
                          for r in range(masks.shape[1])]
        x = self.backbone.stem(torch.cat(inputs, 0))
        for name in STAGES:
            x = getattr(self.backbone, name)(x)
        pooled = x.float().mean((2, 3)).unflatten(0, (len(inputs), -1)).unbind(0)   # batch left symbolic
        feats = dict(zip(self.stream_names, pooled))
        if not self.training:
            return {**feats, "descriptor": self.descriptor(list(feats.values()))}
        out = {"logits": {k: self.heads[k](v) for k, v in feats.items()}, "feats": feats}
        if mask_logits is not None:
            out["mask_logits"] = mask_logits
        return out

    def loss(self, out: dict, batch: dict):
        pid = batch["pid"]
        total, stats = identity_losses(out["logits"], pid, self.label_smoothing)
        if "mask_logits" in out and self.mask_weight > 0:
            logits = out["mask_logits"]
            target = self.binarize(part_masks("mgran", batch, self._region_channels, logits.shape[0],
                                              logits.shape[-2:]))
            mask = F.binary_cross_entropy_with_logits(logits.float(), target)
            stats["mask"] = mask.detach()
            total = total + self.mask_weight * mask
        tri = self.metric_loss(self.descriptor(list(out["feats"].values())), pid, stats)
        if tri is not None:
            total = total + tri
        stats["acc"] = (out["logits"]["global"].argmax(1) == pid).float().mean().detach()
        stats["loss"] = total.detach()
        return total, stats


SECTION = {"regions": ["body", "kp_upper", "kp_lower"], "alignment": "region", "threshold": 0.5,
           "mask_weight": 1.0, "mask_width": 32, "train_masks": "given"}


def _test_parts(cfg: dict) -> bool:
    """MGRAN's published pipeline gives every image, test images included, its pedestrian and keypoint
    masks: region alignment uses the query's and gallery's own mask files when they exist."""
    return cfg["mgran"]["alignment"] == "region"


@register_model("mgran", section=SECTION, check=check_single_stage("mgran"), test_parts=_test_parts,
                training_only=("mask_weight", "train_masks"), kwargs_from_config=kwargs_from_config("mgran"), schedules=("stage1",),
                needs_parts=lambda cfg: cfg["mgran"]["alignment"] == "region")
def build_mgran(num_classes: int, **cfg) -> MGRAN:
    return MGRAN(num_classes=num_classes, **cfg)
