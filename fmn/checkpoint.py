"""Atomic checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint holds only tensors and plain containers of numbers and strings. It is written to a
temporary file in the same folder, flushed and fsynced, then moved over the target with
``os.replace``, so a kill at any moment leaves either the previous file or the new one.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import torch


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not an fmn checkpoint (expected a dict, got {type(obj).__name__})")
    return obj


def model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of an fmn checkpoint (or of a bare state dict file)."""
    obj = load_checkpoint(path)
    state = obj.get("model", obj)
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
