"""What every run needs: the device, mixed precision, seeds, the schedule, progress display and
the finiteness checks of the trainer."""
from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch
from torch import nn

from fmn import distributed as fdist


class NonFiniteLossError(RuntimeError):
    """The training loss, or the weights after an epoch, became NaN or Inf."""


class DeviceError(ValueError):
    """A device that this machine does not have."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but CUDA is not available on this machine; use cpu or auto")
    return dev


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def show_progress(setting) -> bool:
    """``train.progress``: ``auto`` shows progress bars only when stderr is a terminal (a log file
    gets one line per epoch and per evaluation instead)."""
    if setting == "auto":
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(setting)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch * 101) % (2**31 - 1)


def lr_at(epoch: int, base_lr: float, milestones: list[int], gamma: float, warmup: int = 0) -> float:
    """Step schedule: base * gamma^(number of milestones <= epoch), after a linear warm-up."""
    lr = base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    if warmup > 0 and epoch < warmup:
        lr *= (epoch + 1) / (warmup + 1)
    return lr


def loss_is_finite(loss: torch.Tensor, device: torch.device, distributed: bool) -> bool:
    """True if the loss is finite here and (under DDP) on every rank."""
    bad = not bool(torch.isfinite(loss.detach()).item())
    return not (fdist.any_true(bad, device) if distributed else bad)


def non_finite_weights(module: nn.Module, device: torch.device, distributed: bool) -> list[str]:
    """The names of floating-point weights that are not finite here (["on another rank"] when only
    another rank has some); empty when every rank's weights are finite. Checked before saving: an
    update can overflow on a finite loss."""
    bad = [k for k, v in module.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    failed = fdist.any_true(bool(bad), device) if distributed else bool(bad)
    return (bad or ["on another rank"]) if failed else []


def stop_advice(last_checkpoint: str, tips: str) -> str:
    """The end of a NonFiniteLossError message: where the last good checkpoint is, and what to try."""
    where = "" if os.path.exists(last_checkpoint) else " (none written yet)"
    return f"The last good checkpoint is {last_checkpoint}{where}. Try {tips}."


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
