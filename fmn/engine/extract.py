"""``fmn extract``: the retrieval descriptor of a set of images, written for ``fmn rerank``.

Images come from a folder (its image files, sorted by name), a CSV (the ``path`` column when the
header row names one, else the first column) or a text list (one path per line; blank lines and
``#`` comments ignored); relative paths are relative to the list's folder. The features are one
(n, D) float32 tensor (``.pt``) or array (``.npy``); ``<out>.images.json`` beside them names the
image of each row, in row order.
"""
from __future__ import annotations

import csv
import json
import os
import time
from typing import Callable, Sequence

import numpy as np
import torch

from fmn.atomic import atomic_write
from fmn.data.base import DatasetError, ImageReadError, IMAGE_EXTENSIONS, is_image_name, list_images, read_image
from fmn.engine.api import extract_features, load_model

Log = Callable[[str], None]

FEATURE_EXTENSIONS = (".pt", ".npy")
_LISTED_BAD = 10   # bad images named in the error; the rest are counted


class OutputOverwritesInputError(ValueError):
    """An output path names one of the command's inputs."""


# ------------------------------------------------------------------------------- image lists
def read_image_list(spec: str) -> list[str]:
    """The image paths named by ``spec``: a folder, a .csv file, a text list or one image."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        paths = list_images(spec, "image files (" + ", ".join(IMAGE_EXTENSIONS) + ")")
        if not paths:
            raise DatasetError(f"{spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return paths
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--images {spec}: no such folder or file")
    if is_image_name(os.path.basename(spec)):
        return [spec]
    entries = _csv_paths(spec) if spec.lower().endswith(".csv") else _text_paths(spec)
    if not entries:
        raise DatasetError(f"{spec}: lists no image paths")
    base = os.path.dirname(os.path.abspath(spec))
    return [p if os.path.isabs(p) else os.path.join(base, p) for p in entries]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a text file; expected a CSV or one image path per line") from None


def _text_paths(path: str) -> list[str]:
    lines = (line.strip() for line in _read_text(path).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _csv_paths(path: str) -> list[str]:
    rows = [row for row in csv.reader(_read_text(path).splitlines()) if any(c.strip() for c in row)]
    column = 0
    if rows and "path" in [c.strip().lower() for c in rows[0]]:
        column = [c.strip().lower() for c in rows[0]].index("path")
        rows = rows[1:]
    out = []
    for i, row in enumerate(rows):
        if column >= len(row) or not row[column].strip():
            raise DatasetError(f"{path}: row {i + 1} has no image path in column {column + 1}")
        out.append(row[column].strip())
    return out


def scan_images(paths: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(paths that decode, [(path, why) for those that do not]), each in input order."""
    good, bad = [], []
    for path in paths:
        try:
            read_image(path)
            good.append(path)
        except ImageReadError as exc:
            bad.append((path, str(exc)))
    return good, bad


def bad_images_error(bad: list[tuple[str, str]]) -> ImageReadError:
    listed = "; ".join(why for _, why in bad[:_LISTED_BAD])
    more = f"; and {len(bad) - _LISTED_BAD} more" if len(bad) > _LISTED_BAD else ""
    return ImageReadError(f"{len(bad)} image(s) cannot be read (--skip-bad leaves them out): {listed}{more}")


# ------------------------------------------------------------------------------------ outputs
def images_json_path(out: str) -> str:
    """``feats.pt`` -> ``feats.images.json`` (query and gallery can share a folder)."""
    return os.path.splitext(out)[0] + ".images.json"


def check_outputs(outputs: Sequence[str], inputs: Sequence[str], force: bool) -> None:
    """Refuse an output that names an input, is a folder, is given twice, or exists (unless
    ``force``); before any work is done."""
    real_inputs = {os.path.realpath(p): p for p in inputs if p}
    seen = set()
    for out in outputs:
        real = os.path.realpath(out)
        if real in real_inputs:
            raise OutputOverwritesInputError(f"{out} would write over the input {real_inputs[real]}; "
                                             "give another path")
        if real in seen:
            raise ValueError(f"{out} is given as two outputs; give two paths")
        seen.add(real)
        if os.path.isdir(out):
            raise IsADirectoryError(f"{out} is a folder; give a file name")
        if os.path.lexists(out) and not force:
            raise FileExistsError(f"{out} exists; --force replaces it")


def write_features(out: str, feats: torch.Tensor) -> str:
    """(n, D) float32 features as a .pt tensor or a .npy array, atomically."""
    if out.endswith(".npy"):
        return atomic_write(out, lambda tmp: _save_npy(tmp, feats))
    return atomic_write(out, lambda tmp: torch.save(feats.contiguous(), tmp))


def _save_npy(tmp: str, feats: torch.Tensor) -> None:
    with open(tmp, "wb") as f:   # a file object: np.save would append .npy to the temporary's name
        np.save(f, feats.numpy())


def _write_json(path: str, content: dict) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
            f.write("\n")

    return atomic_write(path, write)


def describe(model: torch.nn.Module) -> str:
    """What the retrieval descriptor of a model loaded by ``fmn.load_model`` is, in words."""
    name = model.fmn_config["model"]["name"]
    if name == "fmn" and getattr(model, "fmn_stage", 2) < 2:
        return "GRN descriptor (the checkpoint is an FMN trained in stage 1 only: no MN/LAN; L2-normalised g)"
    if name == "fmn":
        return "FMN descriptor (eq. 6: [a g/|g|, (1-a) l/|l|])"
    return f"{name.upper()} fused descriptor"


# ------------------------------------------------------------------------------------ command
def run_extract(checkpoint: str, images: str, out: str, *, batch_size: int = 64, device: str | None = None,
                skip_bad: bool = False, force: bool = False, progress: bool | str = "auto",
                log: Log = print) -> dict:
    """``fmn extract``: write the descriptor of every readable image of ``images`` to ``out``
    (.pt or .npy) and the row order to ``<out>.images.json``. Returns that JSON's content."""
    if not out.endswith(FEATURE_EXTENSIONS):
        raise ValueError(f"--out {out}: expected a .pt or .npy file name")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    json_path = images_json_path(out)
    list_file = images if os.path.isfile(images) else None
    check_outputs([out, json_path], [checkpoint, list_file], force)
    paths = read_image_list(images)
    model = load_model(checkpoint, device=device or "auto")
    good, bad = scan_images(paths)
    if bad and not skip_bad:
        raise bad_images_error(bad)
    if not good:
        raise ImageReadError(f"{images}: none of the {len(paths)} images can be read")
    log(f"{len(good)} images, {describe(model)}, batch {batch_size} on {next(model.parameters()).device}")
    for path, why in bad:
        log(f"skipped: {why}")
    t0 = time.time()
    feats = extract_features(model, good, batch_size=batch_size, progress=progress)
    seconds = time.time() - t0
    content = {"checkpoint": os.path.abspath(checkpoint), "features": os.path.basename(out),
               "shape": list(feats.shape), "images": good,
               "skipped": [{"path": p, "error": why} for p, why in bad]}
    write_features(out, feats)
    _write_json(json_path, content)
    log(f"wrote {out} ({feats.shape[0]} x {feats.shape[1]} float32) and {json_path}: "
        f"{len(good) / max(seconds, 1e-9):.1f} images/s" + (f", {len(bad)} unreadable skipped" if bad else ""))
    return content
