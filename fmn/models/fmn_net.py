"""The Feature Mask Network (Ding et al., arXiv 1711.07155, Sec. 3; DESIGN.md Sec. 6).

    GRN  global representation network: ResNet backbone -> global average pool -> g -> classifier
    MN   mixing network: m = exp(relu(g W + b)) reshaped to the local layer's H x W (eq. 1-2),
         applied to the local features f by a channel-broadcast product o = f * m (eq. 3),
         computed by ``fmn_kernels.FusedFeatureMask``
    LAN  locally attentive network: copies of the residual stages after the local layer
         (separate parameters) -> global average pool -> l -> classifier

Local layers (paper Table 5): ``pool1`` (the max-pool output, default), ``res2`` (layer1 output),
``res3`` (layer2 output), ``res4`` (layer3 output).

Training follows Algorithm 1 in two stages, declared by ``training_stages`` for the engine's
trainer and selected with ``set_stage``: stage 1 trains GRN only; stage 2 freezes GRN (kept in
eval mode by ``train()``, run under ``torch.no_grad``, so its BN statistics do not move) and trains
MN + LAN. The model's config section ``fmn`` holds ``local_layer``, ``mask_max_logit`` and
``lan_init``.

Outputs of ``forward(x)``:
  training, stage 1: {"grn_logits", "grn_feat"}
  training, stage 2: {"grn_logits", "grn_feat", "lan_logits", "lan_feat"}
  eval:              {"grn": g, "lan": l}   (the evaluator builds D = [a g/|g|, (1-a) l/|l|]);
                     {"grn": g} when only stage 1 was trained (``set_trained_stage(1)``)
``return_mask=True`` adds "mask" (B, H, W) whenever the MN runs.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

from fmn_kernels import FusedFeatureMask
from fmn.config import model_kwargs
from fmn.losses import accuracy, batch_hard_triplet, cross_entropy, ranking_loss
from fmn.models import register_model
from fmn.models.heads import ClassifierHead
from fmn.models.stages import Stage
from fmn.models.resnet import BACKBONES, build_resnet, check_images, load_pretrained

STAGES = ("layer1", "layer2", "layer3", "layer4")

# local layer -> number of GRN residual stages that run before it
LOCAL_LAYERS = {"pool1": 0, "res2": 1, "res3": 2, "res4": 3}


def _half_up(n: int, times: int) -> int:
    for _ in range(times):
        n = (n + 1) // 2
    return n


class LocallyAttentiveStages(nn.Module):
    """The residual stages of the LAN, named as in the backbone (``layer2`` .. ``layer4``)."""

    def __init__(self, backbone: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        for name in names:
            self.add_module(name, copy.deepcopy(getattr(backbone, name)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = getattr(self, name)(x)
        return x


class FeatureMaskNetwork(nn.Module):
    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        local_layer: str = "pool1",
        input_size: tuple[int, int] = (256, 128),
        pretrained: str | os.PathLike | None = None,
        base_width: int = 64,
        last_stride: int = 2,
        bnneck: bool = False,
        dropout: float = 0.0,
        mask_bias: bool = True,
        mask_init_std: float | None = None,
        mask_max_logit: float | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"unknown backbone '{backbone}'; expected one of {', '.join(BACKBONES)}")
        if local_layer not in LOCAL_LAYERS:
            raise ValueError(f"unknown local_layer '{local_layer}'; expected one of {', '.join(LOCAL_LAYERS)}")
        height, width = (int(v) for v in input_size)
        if height < 32 or width < 32:
            raise ValueError(f"input_size must be at least 32x32, got {height}x{width}")
        self.num_classes = num_classes
        self.backbone_name = backbone
        self.local_layer = local_layer
        self.input_size = (height, width)
        self.n_before = LOCAL_LAYERS[local_layer]

        self.grn = build_resnet(backbone, num_classes=0, base_width=base_width, last_stride=last_stride)
        if pretrained:
            load_pretrained(self.grn, pretrained)
        self.feature_dim = self.grn.feature_dim
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.grn_head = ClassifierHead(self.feature_dim, num_classes, bnneck=bnneck, dropout=dropout)

        self.mask_hw = self.local_hw(height, width)
        self.mn = FusedFeatureMask(
            self.feature_dim, self.mask_hw, bias=mask_bias, max_logit=mask_max_logit, backend=backend
        )
        if mask_init_std is not None:
            with torch.no_grad():
                self.mn.weight.normal_(0.0, mask_init_std)
                if self.mn.bias is not None:
                    self.mn.bias.zero_()

        # Algorithm 1 initialises LAN from the same (pre-trained) weights as GRN: theta_o -> theta_l
        self.lan = LocallyAttentiveStages(self.grn, STAGES[self.n_before:])
        self.lan_head = ClassifierHead(self.feature_dim, num_classes, bnneck=bnneck, dropout=dropout)

        self.stage = 1
        self.lan_trained = True
        self.set_stage(1)

    def local_hw(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the local layer for (height, width) images: the stem halves twice (conv1,
        maxpool), then every stage after layer1 once, each rounding up."""
        strides = 2 + max(0, self.n_before - 1)
        return _half_up(int(height), strides), _half_up(int(width), strides)

    def _check_input(self, x: torch.Tensor, mask: bool) -> None:
        check_images("fmn", x)
        if mask and self.local_hw(*x.shape[-2:]) != self.mask_hw:
            h, w = self.input_size
            raise ValueError(
                f"fmn: the model was built for input_size ({h}, {w}) (a {self.mask_hw[0]}x{self.mask_hw[1]} mask "
                f"over {self.local_layer}); got images of size {x.shape[-2]}x{x.shape[-1]} "
                f"({self.local_layer} {self.local_hw(*x.shape[-2:])}): resize them to {h}x{w}")

    # ------------------------------------------------------------------ stages
    def grn_modules(self) -> list[nn.Module]:
        return [self.grn, self.grn_head]

    def local_modules(self) -> list[nn.Module]:
        return [self.mn, self.lan, self.lan_head]

    def set_stage(self, stage: int) -> "FeatureMaskNetwork":
        """Stage 1: GRN trainable, MN + LAN frozen. Stage 2: GRN frozen (eval mode), MN + LAN trainable."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.stage = stage
        for m in self.grn_modules():
            m.requires_grad_(stage == 1)
        for m in self.local_modules():
            m.requires_grad_(stage == 2)
        self.train(self.training)
        return self

    def set_trained_stage(self, stage: int) -> None:
        """The last stage training reached. After stage 1 alone the MN and LAN are untrained: in eval
        mode the model then gives the GRN feature only, ``{"grn": g}``, and evaluation reports GRN."""
        self.lan_trained = int(stage) >= 2

    def copy_grn_into_lan(self) -> None:
        """Initialise the LAN stages from the (trained) GRN stages."""
        with torch.no_grad():
            for name in self.lan.names:
                getattr(self.lan, name).load_state_dict(getattr(self.grn, name).state_dict())

    def train(self, mode: bool = True) -> "FeatureMaskNetwork":
        super().train(mode)
        if self.stage == 2:
            for m in self.grn_modules():
                m.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ----------------------------------------------------------------- forward
    def grn_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(local features, final GRN feature map, pooled global feature g)."""
        f = self.grn.stem(x)
        local = f
        for i, name in enumerate(STAGES):
            f = getattr(self.grn, name)(f)
            if i + 1 == self.n_before:
                local = f
        return local, f, torch.flatten(self.pool(f), 1)

    def lan_features(
        self, local: torch.Tensor, g: torch.Tensor, return_mask: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(mask (B, H, W) or None, final LAN feature map, pooled local-attentive feature l)."""
        if return_mask:
            mixed, mask = self.mn(local, g, return_mask=True)
        else:
            mixed, mask = self.mn(local, g), None
        fmap = self.lan(mixed)
        return mask, fmap, torch.flatten(self.pool(fmap), 1)

    def forward(self, x: torch.Tensor, return_mask: bool = False) -> dict[str, torch.Tensor]:
        frozen = self.stage == 2 and self.training
        self._check_input(x, mask=return_mask or not (self.training and self.stage == 1))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            local, _, g = self.grn_features(x)
            grn_logits = self.grn_head(g) if self.training else None
        if not self.training and not self.lan_trained and not return_mask:
            return {"grn": g}
        if self.training and self.stage == 1:
            out = {"grn_logits": grn_logits, "grn_feat": g}
            if return_mask:
                # the mask only: the LAN does not run in stage 1 (its BN statistics must not move)
                with torch.no_grad():
                    out["mask"] = self.mn(local, g, return_mask=True)[1]
            return out
        mask, _, l = self.lan_features(local, g, return_mask)
        if self.training:
            out = {"grn_logits": grn_logits, "grn_feat": g, "lan_logits": self.lan_head(l), "lan_feat": l}
        else:
            out = {"grn": g, "lan": l}
        if return_mask:
            out["mask"] = mask
        return out

    def training_stages(self, cfg: dict) -> list[Stage]:
        """Algorithm 1: stage 1 trains GRN with cross-entropy; stage 2 freezes GRN (eval mode, no
        grad) and trains MN + LAN with cross-entropy plus the ranking loss
        max(0, p_t^G - p_t^L + margin) (eq. 5). ``train.label_smoothing`` and a batch-hard triplet
        on the branch feature (``train.triplet_weight``) apply to both. ``fmn.lan_init: grn``
        starts the LAN from the trained GRN when stage 2 begins."""
        t = cfg["train"]
        copy_grn = cfg["fmn"]["lan_init"] == "grn"

        def start(stage: int):
            def begin(fresh: bool) -> None:
                self.set_stage(stage)
                self.zero_grad(set_to_none=True)   # no stale stage-1 gradients on the frozen GRN
                if stage == 2 and fresh and copy_grn:
                    self.copy_grn_into_lan()
            return begin

        return [
            Stage(1, "stage1", "stage 1", tuple(self.grn_modules()), _branch_loss(t, "grn"),
                  frozen=tuple(self.local_modules()), start=start(1), embedding=lambda out: out["grn_feat"]),
            Stage(2, "stage2", "stage 2", tuple(self.local_modules()), _branch_loss(t, "lan"),
                  frozen=tuple(self.grn_modules()), start=start(2), embedding=lambda out: out["lan_feat"]),
        ]

    @torch.no_grad()
    def activation_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Maps for heatmaps (paper Fig. 4): the predicted mask (B, H, W) over the local layer and
        the GRN and LAN activation maps (B, h, w): the channel mean of the final feature maps.
        Runs in the model's current mode: in training mode BatchNorm uses and updates batch
        statistics, so call it under ``fmn.evaluator.eval_mode(model)`` (as fmn.heatmap does)."""
        self._check_input(x, mask=True)
        local, grn_map, g = self.grn_features(x)
        mask, lan_map, _ = self.lan_features(local, g)
        return {"mask": mask.float(), "grn": grn_map.float().mean(1), "lan": lan_map.float().mean(1)}


FMN = FeatureMaskNetwork


def _branch_loss(t: dict, branch: str):
    """The loss of the stage that trains ``branch`` (grn: stage 1, lan: stage 2)."""
    def loss(out: dict, batch: dict):
        pid = batch["pid"]
        logits, feat = out[f"{branch}_logits"], out[f"{branch}_feat"]
        ce = cross_entropy(logits, pid, t["label_smoothing"])
        total, stats = ce, {"ce": ce.detach()}
        if branch == "lan" and t["rank_weight"] > 0:
            rank = ranking_loss(out["grn_logits"], logits, pid, t["rank_margin"])
            total = total + t["rank_weight"] * rank
            stats["rank"] = rank.detach()
        if t["triplet_weight"] > 0:
            tri = batch_hard_triplet(feat, pid, t["triplet_margin"])
            total = total + t["triplet_weight"] * tri
            stats["triplet"] = tri.detach()
        stats["loss"] = total.detach()
        stats["acc"] = torch.tensor(accuracy(logits.detach(), pid))
        return total, stats
    return loss


SECTION = {
    "local_layer": "pool1",       # pool1 | res2 | res3 | res4 (paper Table 5)
    "mask_max_logit": None,       # clamp of the mask logits before exp (paper: none)
    "lan_init": "backbone",       # backbone: theta_o -> theta_l (Alg. 1); grn: copy the trained GRN
}


def _check_section(cfg: dict) -> None:
    s = cfg["fmn"]
    if s["local_layer"] not in LOCAL_LAYERS:
        raise ValueError(f"config value fmn.local_layer={s['local_layer']!r} is invalid: expected one of "
                         f"{', '.join(LOCAL_LAYERS)}")
    v = s["mask_max_logit"]
    if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")):
        raise ValueError(f"config value fmn.mask_max_logit={v!r} is invalid: expected a number > 0 or null")
    if s["lan_init"] not in ("backbone", "grn"):
        raise ValueError(f"config value fmn.lan_init={s['lan_init']!r} is invalid: expected one of backbone, grn")


def _kwargs(cfg: dict) -> dict:
    return {**model_kwargs(cfg), "local_layer": cfg["fmn"]["local_layer"],
            "mask_max_logit": cfg["fmn"]["mask_max_logit"]}


@register_model("fmn", section=SECTION, check=_check_section, training_only=("lan_init",), kwargs_from_config=_kwargs)
def build_fmn(num_classes: int, **kwargs) -> FeatureMaskNetwork:
    return FeatureMaskNetwork(num_classes=num_classes, **kwargs)
