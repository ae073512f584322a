"""ResNet-18/34/50/101 with torchvision-compatible state-dict keys.

The module names follow torchvision (``conv1``, ``bn1``, ``layer1`` .. ``layer4`` made of
``BasicBlock`` or ``Bottleneck`` blocks with ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and
``downsample.0/downsample.1``, and ``fc``), so an ImageNet checkpoint saved by torchvision loads
with ``load_pretrained``. Nothing is downloaded.

``base_width`` scales every stage (64 is the standard network; 32 or 16 give small, fast variants
for CPU runs and tests; their checkpoints are not ImageNet-compatible). ``last_stride`` sets the
stride of ``layer4`` (2 in the standard network).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """The torchvision (v1.5) bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet whose ``forward`` returns logits (pooled features when ``num_classes=0``, which
    also drops ``fc``); re-ID models use its stages directly.

    ``stem(x)`` gives the pool1 output; ``layer1`` .. ``layer4`` follow. ``feature_dim`` is the
    number of channels after ``layer4`` (2048 for ResNet-50/101, 512 for ResNet-18/34 at the
    standard width).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        base_width: int = 64,
        last_stride: int = 2,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        if base_width < 1:
            raise ValueError(f"base_width must be >= 1, got {base_width}")
        if last_stride not in (1, 2):
            raise ValueError(f"last_stride must be 1 or 2, got {last_stride}")
        self.block = block
        self.base_width = base_width
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0])
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=last_stride)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = base_width * 8 * block.expansion
        self.fc = nn.Linear(self.feature_dim, num_classes) if num_classes > 0 else None

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """conv1 -> bn1 -> relu -> maxpool: the 'pool1' features (stride 4)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stage_channels(self) -> dict[str, int]:
        """Channels of the pool1 and layer1..layer4 outputs."""
        e = self.block.expansion
        w = self.base_width
        return {"pool1": w, "layer1": w * e, "layer2": 2 * w * e, "layer3": 4 * w * e, "layer4": 8 * w * e}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return x if self.fc is None else self.fc(x)


def check_images(owner: str, x) -> None:
    """One clear error for anything but a float batch of RGB images (B, 3, H, W)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{owner}: expected a batch of RGB images of shape (B, 3, H, W); got {got}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: expected floating-point (normalised) images; got {x.dtype}")


_SPECS: dict[str, tuple[type, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
}

BACKBONES = tuple(_SPECS)


def build_resnet(name: str, **kwargs) -> ResNet:
    """``build_resnet('resnet50', base_width=64, last_stride=2)``."""
    if name not in _SPECS:
        raise ValueError(f"unknown backbone '{name}'; expected one of {', '.join(_SPECS)}")
    block, layers = _SPECS[name]
    return ResNet(block, layers, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return build_resnet("resnet18", **kwargs)


def resnet34(**kwargs) -> ResNet:
    return build_resnet("resnet34", **kwargs)


def resnet50(**kwargs) -> ResNet:
    return build_resnet("resnet50", **kwargs)


def resnet101(**kwargs) -> ResNet:
    return build_resnet("resnet101", **kwargs)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict.

    Accepts a plain state dict or one nested under ``state_dict`` / ``model``; strips a
    ``module.`` prefix left by DataParallel/DDP. Loaded with ``weights_only=True``. A file that is
    not such a checkpoint (not a torch file, a pickled module, no tensors, a record whose CRC-32
    does not match) raises one ``CheckpointError`` naming it.
    """
    from fmn.checkpoint import CheckpointError, torch_load

    path = os.fspath(path)
    obj = torch_load(path, "pretrained checkpoint")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if not torch.is_tensor(v):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = v
    if not out:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors (keys: {', '.join(map(str, list(obj)[:8]))})")
    return out


def load_pretrained(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    skip_prefixes: tuple[str, ...] = ("fc.",),
    strict: bool = True,
    log: Callable[[str], None] | None = print,
) -> tuple[list[str], list[str]]:
    """Load a local ImageNet checkpoint into ``module`` and report what did not match.

    Keys starting with ``skip_prefixes`` (the ImageNet classifier by default) are not loaded.
    A tensor whose shape differs from the module's raises ``CheckpointError`` naming the key(s) and
    both shapes (e.g. an ImageNet checkpoint for a ``base_width`` != 64 network), and so does a
    checkpoint of which no tensor fits the module. With ``strict=True`` (the default) so does a
    checkpoint that lacks a tensor of the module (other than BatchNorm's ``num_batches_tracked``,
    absent from torchvision's original files) or holds one the module does not have (e.g. a
    ResNet-101 file for a ResNet-50): a partial or other-depth file would leave part of the network
    at its random initialisation. Nothing is loaded when an error is raised. Returns
    ``(missing, unexpected)`` key lists (empty unless ``strict=False``); ``log`` receives a
    one-paragraph report.
    """
    from fmn.checkpoint import CheckpointError, key_examples

    state = read_state_dict(path)
    own = module.state_dict()
    load, mismatched, skipped = {}, [], []
    for k, v in state.items():
        if any(k.startswith(p) for p in skip_prefixes):
            skipped.append(k)
        elif k in own and own[k].shape != v.shape:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}")
        else:
            load[k] = v
    if mismatched:
        raise CheckpointError(
            f"{os.fspath(path)}: {len(mismatched)} tensor(s) do not fit the model (checkpoint vs model shape): "
            + ", ".join(mismatched[:8]) + (" ..." if len(mismatched) > 8 else ""))
    own_keys = set(own)
    if not any(k in own_keys for k in load):
        raise CheckpointError(
            f"{os.fspath(path)}: none of the checkpoint's {len(state)} tensors matches a parameter of the model "
            f"(checkpoint keys: {', '.join(list(state)[:4])}; model keys: {', '.join(list(own)[:4])})")
    if strict:
        missing = [k for k in own if k not in load and not k.endswith("num_batches_tracked")
                   and not any(k.startswith(p) for p in skip_prefixes)]
        unexpected = [k for k in load if k not in own_keys]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensor(s) of the model missing ({key_examples(missing, 4)})")
            if unexpected:
                parts.append(f"{len(unexpected)} tensor(s) the model does not have ({key_examples(unexpected, 4)})")
            raise CheckpointError(
                f"{os.fspath(path)}: not a complete checkpoint of this network: {'; '.join(parts)}. "
                "Is it for another depth (e.g. resnet101 for resnet50) or a partial file? Nothing was loaded")
    result = module.load_state_dict(load, strict=False)
    missing = [k for k in result.missing_keys if not any(k.startswith(p) for p in skip_prefixes)]
    unexpected = list(result.unexpected_keys)
    if log is not None:
        lines = [f"loaded {len(load) - len(unexpected)} tensors from {os.fspath(path)}"]
        if skipped:
            lines.append(f"  not loaded (classifier): {len(skipped)} keys")
        lines.append(f"  missing keys ({len(missing)}): " + (", ".join(missing[:12]) or "none"))
        lines.append(f"  unexpected keys ({len(unexpected)}): " + (", ".join(unexpected[:12]) or "none"))
        log("\n".join(lines))
    return missing, unexpected
