"""Model registry: ``build_model(name, num_classes, **cfg)``.

Register a builder with ``@register_model("name")``; it is called as
``builder(num_classes=..., **cfg)`` and returns an ``nn.Module``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from fmn.models.heads import ClassifierHead
from fmn.models.resnet import (
    BACKBONES,
    BasicBlock,
    Bottleneck,
    ResNet,
    build_resnet,
    load_pretrained,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, **cfg) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; expected one of {', '.join(available_models())}")
    return _REGISTRY[name](num_classes=num_classes, **cfg)


@register_model("fmn")
def _build_fmn(num_classes: int, **cfg) -> nn.Module:
    from fmn.models.fmn_net import FeatureMaskNetwork

    return FeatureMaskNetwork(num_classes=num_classes, **cfg)


def __getattr__(name: str):
    if name in ("FeatureMaskNetwork", "FMN", "LOCAL_LAYERS"):
        from fmn.models import fmn_net

        return getattr(fmn_net, name)
    raise AttributeError(name)


__all__ = [
    "BACKBONES",
    "BasicBlock",
    "Bottleneck",
    "ClassifierHead",
    "FMN",
    "FeatureMaskNetwork",
    "LOCAL_LAYERS",
    "ResNet",
    "available_models",
    "build_model",
    "build_resnet",
    "load_pretrained",
    "register_model",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
]

# MMGA, MGRAN and PMM register themselves ("mmga", "mgran", "pmm") when imported.
from fmn.models import mgran, mmga, pmm  # noqa: E402,F401
