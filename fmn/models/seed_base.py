"""What MMGA, MGRAN and PMM share: the backbone, the neck, the keyword handling and the loss API.

Every model here:
  * is built as ``Model(num_classes=..., backbone=..., input_size=..., pretrained=..., base_width=...,
    last_stride=..., backend=..., <its own options>)``; from a config: the shared model settings,
    the model's own section and the loss settings of ``train`` (``kwargs_from_config``);
  * trains in one stage (``training_stages``): every parameter, the loader's batch passed to
    ``forward``;
  * runs ``forward(img, batch=None)``: in training ``batch`` is the loader's batch on the model's
    device (``pid``, ``parts``) and the output is a dict of logits and features; in eval mode the
    output is the evaluator's dict of branch features plus ``descriptor``;
  * computes its objective with ``loss(outputs, batch) -> (loss, stats)``;
  * passes ``backend`` to every ``fmn_kernels`` call (``set_backend`` changes it).
"""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fmn.config import model_kwargs
from fmn.data.parts import PART_CHANNELS
from fmn.models.heads import ClassifierHead
from fmn.models.stages import Stage, forward_with_batch
from fmn.models.resnet import BACKBONES, build_resnet, check_images, load_pretrained

STAGES = ("layer1", "layer2", "layer3", "layer4")


BASE_KEYS = ("backbone", "input_size", "pretrained", "base_width", "last_stride", "bnneck", "dropout", "backend",
             "label_smoothing", "triplet_weight", "triplet_margin")


def split_kwargs(model: str, kwargs: dict) -> dict:
    """Pop the ``SeedModel`` keywords out of ``kwargs`` and return them; an error for any key
    left that is not the model's own (already taken)."""
    base = {k: kwargs.pop(k) for k in list(kwargs) if k in BASE_KEYS}
    bad = sorted(kwargs)
    if bad:
        raise TypeError(f"{model}: unknown option(s) {', '.join(bad)}")
    return base


def check_names(model: str, key: str, names) -> tuple:
    """``names`` as a tuple of strings; a single string is one name."""
    if isinstance(names, str):
        return (names,)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{model}: {key} must be a list of names, got {names!r}")
    return tuple(names)


def check_number(model: str, key: str, value, lo: float | None = None, lo_open: bool = False,
                 hi: float | None = None, integer: bool = False):
    """``value`` if it is a number (an integer with ``integer``) in the range, else one clear error."""
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        rng = "" if lo is None else f" {'>' if lo_open else '>='} {lo}"
        rng += "" if hi is None else f"{' and' if rng else ''} <= {hi}"
        raise ValueError(f"{model}: {key} must be {'an integer' if integer else 'a number'}{rng}, got {value!r}")
    return value


def check_bool(model: str, key: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{model}: {key} must be true or false, got {value!r}")
    return value


def part_masks(model: str, batch: dict | None, channels: Sequence[int], batch_size: int,
               size: Tuple[int, int] | None = None) -> torch.Tensor:
    """Channels ``channels`` of the loader's part masks ``batch["parts"]`` (B, len(PART_CHANNELS), H, W)
    as float32, bilinearly resized to ``size`` where given; one clear error for a missing tensor or
    one of another shape."""
    parts = batch.get("parts") if isinstance(batch, dict) else None
    if parts is None:
        raise ValueError(f"{model}: training needs the loader's part masks (batch['parts']); use "
                         "fmn.data.parts.make_parts_train_loader")
    expected = f"(B={batch_size}, {len(PART_CHANNELS)}, H, W) with channels {', '.join(PART_CHANNELS)}"
    if not torch.is_tensor(parts) or parts.dim() != 4 or parts.shape[0] != batch_size \
            or parts.shape[1] != len(PART_CHANNELS):
        got = tuple(parts.shape) if torch.is_tensor(parts) else type(parts).__name__
        raise ValueError(f"{model}: batch['parts'] must be {expected}; got {got}")
    if not parts.is_floating_point():
        raise TypeError(f"{model}: batch['parts'] must be floating-point masks in [0, 1]; got {parts.dtype}")
    masks = parts[:, list(channels)].float()
    if size is not None and tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)
    return masks


def check_stages(model: str, key: str, names: Sequence[str]) -> tuple:
    names = check_names(model, key, names)
    for n in names:
        if n not in STAGES:
            raise ValueError(f"{model}: {key} has unknown stage {n!r}; expected some of {', '.join(STAGES)}")
    if list(names) != sorted(set(names), key=STAGES.index):
        raise ValueError(f"{model}: {key} must list distinct stages in network order, got {list(names)}")
    return names


class SeedModel(nn.Module):
    """Backbone + identity heads, and the shared plumbing of the models above.

    ``needs_parts``: training batches must carry the part masks of ``fmn.data.parts``."""

    needs_parts = True

    def __init__(self, name: str, num_classes: int, backbone: str = "resnet50",
                 input_size: Sequence[int] = (256, 128), pretrained: str | os.PathLike | None = None,
                 base_width: int = 64, last_stride: int = 2, bnneck: bool = True, dropout: float = 0.0,
                 backend: str | None = None, label_smoothing: float = 0.0, triplet_weight: float = 0.0,
                 triplet_margin: float = 0.3):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"{name}: unknown backbone '{backbone}'; expected one of {', '.join(BACKBONES)}")
        self.model_name = name
        self.num_classes = int(num_classes)
        self.input_size = tuple(int(v) for v in input_size)
        self.backend = backend
        self.bnneck = bool(bnneck)
        self.dropout = float(dropout)
        self.label_smoothing = float(label_smoothing)
        self.triplet_weight = float(triplet_weight)
        self.triplet_margin = float(triplet_margin)
        self.backbone = build_resnet(backbone, num_classes=0, base_width=base_width, last_stride=last_stride)
        if pretrained:
            load_pretrained(self.backbone, pretrained)
        self.channels = self.backbone.stage_channels()

    def set_backend(self, backend: str | None) -> "SeedModel":
        self.backend = backend
        return self

    def check_images(self, img: torch.Tensor) -> None:
        """One clear error for anything but a float (B, 3, H, W) batch of images."""
        check_images(self.model_name, img)

    def head(self, dim: int) -> ClassifierHead:
        return ClassifierHead(dim, self.num_classes, bnneck=self.bnneck, dropout=self.dropout)

    @staticmethod
    def descriptor(feats: List[torch.Tensor]) -> torch.Tensor:
        """[f_1/|f_1|, ..., f_n/|f_n|] / sqrt(n): unit length, each branch weighted equally."""
        return torch.cat([F.normalize(f.float(), dim=1) for f in feats], dim=1) / (len(feats) ** 0.5)

    def metric_loss(self, feat: torch.Tensor, pid: torch.Tensor, stats: Dict[str, torch.Tensor]):
        if self.triplet_weight <= 0:
            return None
        from fmn.losses import batch_hard_triplet

        tri = batch_hard_triplet(feat, pid, self.triplet_margin)
        stats["triplet"] = tri.detach()
        return self.triplet_weight * tri

    def training_stages(self, cfg: dict) -> list[Stage]:
        """One stage on ``train.stage1``: every parameter trains on the model's own ``loss``. DDP
        looks for unused parameters, so that a branch an option leaves out of a step is no error."""
        return [Stage(1, "stage1", self.model_name, (self,), self.loss, forward=forward_with_batch,
                      find_unused_parameters=True,
                      embedding=lambda out: self.descriptor(list(out["feats"].values())))]


def kwargs_from_config(name: str):
    """``kwargs_from_config`` of a related method: the shared model settings, its own section and
    the loss settings of ``train``."""
    def kwargs(cfg: dict) -> dict:
        t = cfg["train"]
        return {**model_kwargs(cfg), **cfg[name], "label_smoothing": t["label_smoothing"],
                "triplet_weight": t["triplet_weight"], "triplet_margin": t["triplet_margin"]}
    return kwargs


def check_single_stage(name: str):
    """The section check of a one-stage model: ``train.stage1`` holds its epochs."""
    def check(cfg: dict) -> None:
        epochs = cfg["train"]["stage2"]["epochs"]
        if epochs != 0:
            raise ValueError(f"config value train.stage2.epochs={epochs!r} is invalid: {name} trains in one stage "
                             "(train.stage1); set train.stage2.epochs=0")
        if cfg["train"]["stage1"]["epochs"] < 1:
            raise ValueError(f"config value train.stage1.epochs={cfg['train']['stage1']['epochs']!r} is invalid: "
                             f"expected >= 1 for {name}")
    return check
