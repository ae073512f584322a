"""Atomic checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint holds only tensors and plain containers of numbers and strings. It is written to a
temporary file in the same folder, flushed and fsynced, then moved over the target with
``os.replace`` and the folder fsynced, so a kill at any moment leaves either the previous file or
the new one. A file that cannot be read (truncated, corrupt, not a weights-only checkpoint; the
CRC-32 of every record is checked, which ``torch.load`` does not do) or whose weights do not fit
the model gives one ``CheckpointError`` naming the file.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any

import torch
from torch import nn

from fmn.atomic import atomic_write


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> str:
    """Write ``obj`` to ``path`` atomically (fmn.atomic); returns ``path``. A full disk is one
    ``fmn.atomic.NoSpaceError`` (an OSError naming ``path``), the previous file kept. Before a
    resumed run writes again, ``fmn.atomic.remove_stale_temporaries(folder, name)`` deletes the
    temporary files a killed save left beside ``path``."""
    def write(tmp):
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    return atomic_write(path, write)


def load_failure(path: str | os.PathLike, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` raised ``exc``, in words for a user. Torch's own
    weights-only message is long and ends by advising ``weights_only=False``, which fmn never does."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        head = b""
    if not head:
        return "the file is empty"
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        # neither torch.save's zip format nor its legacy pickle format (which starts with PROTO)
        return "it is not a file written by torch.save"
    if "Weights only load failed" in str(exc):
        return ("it holds pickled Python objects besides tensors and plain containers (a whole nn.Module, "
                "say); fmn loads with weights_only=True: save a state_dict instead")
    reason = (str(exc).strip().splitlines() or [""])[0][:200] or "unexpected end of file"
    return f"{type(exc).__name__}: {reason}"


def corrupt_record(path: str | os.PathLike) -> str | None:
    """The name of the first record of a zip-format torch file whose stored CRC-32 does not match
    its bytes, or None. ``torch.load`` does not check these checksums, so damage inside the tensor
    data (a bad disk or copy) would otherwise load as wrong weights. Files that are not zip archives
    (torch's legacy format) are not checked."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except Exception:  # not a zip archive, or one zipfile cannot parse: torch.load's verdict stands
        return None


def torch_load(path: str | os.PathLike, what: str = "checkpoint",
               map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, checked: a folder, an unreadable file (``load_failure``)
    or a record whose CRC-32 does not match its bytes is one ``CheckpointError`` naming ``path``;
    a missing file is ``FileNotFoundError``. ``what`` names the file in the messages."""
    path = os.fspath(path)
    if os.path.isdir(path):
        inside = os.path.join(path, "model.pt")
        hint = f" ({inside} is there)" if os.path.isfile(inside) else ""
        raise CheckpointError(f"{path}: a folder; expected a {what} file{hint}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as exc:
        reason = load_failure(path, exc)
    else:
        bad = corrupt_record(path)
        if bad is None:
            return obj
        reason = f"the checksum of its record {bad} does not match its bytes"
    raise CheckpointError(
        f"{path}: cannot load this {what} ({reason}). The file is truncated, corrupt, or not a {what} "
        "of tensors and plain containers (fmn loads with weights_only=True)")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    obj = torch_load(path, "checkpoint", map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{os.fspath(path)}: not an fmn checkpoint (expected a dict, got {type(obj).__name__})")
    return obj


def key_examples(keys: list[str], n: int = 3) -> str:
    """The first ``n`` keys, and how many there are in all when there are more."""
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_model_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: str | os.PathLike,
                       saved_config: dict | None = None, config: dict | None = None,
                       settings_must_match: bool = False) -> None:
    """``model.load_state_dict(weights)``, or one ``CheckpointError`` naming ``path`` when the
    weights were written for a different model (missing or extra keys, other shapes), listing the
    model settings that differ between ``saved_config`` and ``config`` when both are given.
    With ``settings_must_match`` a difference in those settings is an error even when every tensor
    fits (e.g. ``last_stride`` or ``dropout``, which change no tensor shape)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} is {tuple(weights[k].shape)} in the checkpoint, {tuple(own[k].shape)} here"
              for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    keys = []
    if isinstance(saved_config, dict) and isinstance(config, dict):
        keys = sorted(k for k in set(saved_config) | set(config) if saved_config.get(k) != config.get(k))
    if not (missing or unexpected or shapes or (settings_must_match and keys)):
        model.load_state_dict(weights)
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) of another shape ({key_examples(shapes, 2)})")
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({key_examples(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({key_examples(unexpected)})")
    if keys:
        parts.append("model settings that differ (checkpoint -> now): " + ", ".join(
            f"{k}: {saved_config.get(k)!r} -> {config.get(k)!r}" for k in keys))
    raise CheckpointError(f"{os.fspath(path)} was written for a different model: {'; '.join(parts)}")


def model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict of an fmn checkpoint (or of a bare state dict file)."""
    obj = load_checkpoint(path)
    state = obj.get("model", obj)
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
