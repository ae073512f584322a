"""Model registry: ``build_model(name, num_classes, **cfg)``.

Register a builder with ``@register_model("name")``; it is called as
``builder(num_classes=..., **cfg)`` and returns an ``nn.Module``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from fmn.config import ConfigError, model_kwargs, register_section
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
_FROM_CONFIG: dict[str, Callable[[dict], dict]] = {}
_NEEDS_PARTS: dict[str, Callable[[dict], bool]] = {}
_TEST_PARTS: dict[str, Callable[[dict], bool]] = {}


def register_model(name: str, section: dict | None = None, check: Callable[[dict], None] | None = None,
                   training_only: tuple = (), kwargs_from_config: Callable[[dict], dict] | None = None,
                   needs_parts: Callable[[dict], bool] | None = None, schedules: tuple = ("stage1", "stage2"),
                   test_parts: Callable[[dict], bool] | None = None):
    """Register a builder ``builder(num_classes=..., **kwargs) -> nn.Module`` under ``name``, with
    the model's own config section (``section``: its defaults; ``check(cfg)``: raises on a bad
    value; ``training_only``: keys that shape no weight) and ``kwargs_from_config(cfg)``, the
    builder's keyword arguments for a whole config (default: the shared model settings and the
    section's values); ``needs_parts(cfg)``: whether its training batches must carry part masks
    (``fmn.data.parts``); ``schedules``: the ``train.stageN`` sections its stages follow;
    ``test_parts(cfg)``: whether evaluation passes the query's and gallery's own part masks where
    their files exist."""
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = fn
        register_section(name, section or {}, check, training_only, schedules)
        _FROM_CONFIG[name] = kwargs_from_config or (lambda cfg: {**model_kwargs(cfg), **cfg[name]})
        _NEEDS_PARTS[name] = needs_parts or (lambda cfg: False)
        _TEST_PARTS[name] = test_parts or (lambda cfg: False)
        return fn

    return deco


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, **cfg) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model '{name}'; expected one of {', '.join(available_models())}")
    return _REGISTRY[name](num_classes=num_classes, **cfg)


def needs_parts(cfg: dict) -> bool:
    """Whether the model of ``cfg`` trains on batches with part masks (MMGA, region-level MGRAN)."""
    return _NEEDS_PARTS[cfg["model"]["name"]](cfg)


def uses_test_parts(cfg: dict) -> bool:
    """Whether evaluation should pass the test images' part masks (MGRAN's region alignment)."""
    return _TEST_PARTS[cfg["model"]["name"]](cfg)


def build_model_from_config(cfg: dict, num_classes: int) -> nn.Module:
    """The model a validated config describes (``fmn.config.load_config``), with ``num_classes``
    identity classes; a value the model refuses is one ConfigError."""
    name = cfg["model"]["name"]
    try:
        return build_model(name, num_classes, **_FROM_CONFIG[name](cfg))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None


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
    "build_model_from_config",
    "build_resnet",
    "load_pretrained",
    "register_model",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
]

from fmn.models.fmn_net import FMN, LOCAL_LAYERS, FeatureMaskNetwork  # noqa: E402

# Each model registers itself, with its config section, when imported.
from fmn.models import fmn_net, mgran, mmga, pmm  # noqa: E402,F401
