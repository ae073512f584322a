"""The public Python API: use a trained model without the command line.

    import fmn
    model = fmn.load_model("runs/demo/model.pt")            # eval mode, model.fmn_config = its config
    feats = fmn.extract_features(model, "photos/")           # (n, D) float32: the retrieval descriptor
    rows = fmn.evaluate(model, dataset_root="runs/demo/data")  # {"GRN": {...}, "FMN": {...}, ...}

``extract_features`` applies the model's own preprocessing (resize to the trained size, ImageNet
mean/std, the test-time flip of ``eval.flip``) and returns the descriptor evaluation ranks by:
FMN's eq. (6) descriptor, a related method's fused descriptor, or the GRN feature of a model
trained in stage 1 only. The same rows come out of ``fmn eval --save-features``.
"""
from __future__ import annotations

import copy
import os
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from fmn.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from fmn.config import (apply_override, architecture, load_config, upgrade_config, validate, with_sections_of)
from fmn.data import build_dataset
from fmn.data.base import list_images, read_image
from fmn.data.loader import make_test_loader
from fmn.data.transforms import to_float_normalized
from fmn.engine.evaluation import evaluate_features, extract_features as extract_branch_features
from fmn.engine.evaluation import eval_mode, retrieval_descriptor
from fmn.engine.runtime import resolve_device, show_progress
from fmn.data.parts import has_parts, make_parts_test_loader
from fmn.models import build_model_from_config, uses_test_parts

Images = Union[str, os.PathLike, Sequence, torch.Tensor]


def load_model(checkpoint: str | os.PathLike, device: str | torch.device | None = None, *,
               overrides: Sequence[str] = (), config: str | None = None) -> nn.Module:
    """The model of a checkpoint written by ``fmn train`` / ``fmn demo`` (``model.pt`` or
    ``last.pt``), in eval mode on ``device`` (default: the config's ``train.device``), with the
    config it was trained with as ``model.fmn_config`` and the last stage it trained as
    ``model.fmn_stage``. ``config`` (a file or shipped config name) replaces every section but the
    model's; ``overrides`` (``key=value``) change single values. A setting that changes the
    network (``model.*``, the model's own section, the input size) must stay as trained: one
    ``CheckpointError`` names what differs."""
    checkpoint = os.fspath(checkpoint)
    state = load_checkpoint(checkpoint)
    saved = state.get("config")
    if not isinstance(saved, dict) or not isinstance(state.get("model"), dict) \
            or not isinstance(state.get("num_classes"), int):
        raise CheckpointError(f"{checkpoint} is not a checkpoint written by `fmn train`")
    saved = upgrade_config(saved)
    cfg = copy.deepcopy(saved) if config is None else with_sections_of(saved, load_config(config))
    cfg["model"]["pretrained"] = None
    for text in overrides:
        apply_override(cfg, text)
    validate(cfg)
    num_classes = state["num_classes"]
    model = build_model_from_config(cfg, num_classes)
    load_model_weights(model, state["model"], checkpoint, saved_config=architecture(saved, num_classes),
                       config=architecture(cfg, num_classes), settings_must_match=True)
    stage = int(state.get("stage", 1))
    if hasattr(model, "set_stage"):
        model.set_stage(stage)
    if hasattr(model, "set_trained_stage"):
        model.set_trained_stage(stage)
    model.fmn_config, model.fmn_stage = cfg, stage
    return model.to(resolve_device(str(device) if device is not None else cfg["train"]["device"])).eval()


def _config_of(model: nn.Module) -> dict:
    cfg = getattr(model, "fmn_config", None)
    if not isinstance(cfg, dict):
        raise ValueError("the model has no fmn_config: load it with fmn.load_model(checkpoint), or give "
                         "height, width and flip")
    return cfg


def _as_uint8(image, height: int, width: int, index: int) -> torch.Tensor:
    """One PIL image or (H, W, 3) uint8 array -> uint8 (3, height, width), resized as the loaders do."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise TypeError(f"images[{index}]: expected a uint8 (H, W, 3) RGB array, got {image.dtype} "
                            f"{tuple(image.shape)}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"images[{index}]: expected a path, a PIL image or a uint8 (H, W, 3) array, "
                        f"got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def image_paths(images: str | os.PathLike | Sequence) -> list[str] | None:
    """The image paths of a folder (its image files, sorted) or of a list of paths; None when
    ``images`` holds images rather than paths."""
    if isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        if os.path.isdir(path):
            found = list_images(path, "image files (.jpg, .jpeg, .png, .bmp)")
            if not found:
                raise ValueError(f"{path}: no image files (.jpg, .jpeg, .png, .bmp) in this folder")
            return found
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such image or folder")
        return [path]
    items = list(images)
    if items and all(isinstance(i, (str, os.PathLike)) for i in items):
        return [os.fspath(i) for i in items]
    return None


def _batches(images, height: int, width: int, batch_size: int, workers: int, progress: bool):
    """Preprocessed float batches (B, 3, height, width) of ``images``, in order."""
    if torch.is_tensor(images):
        if not images.is_floating_point() or images.dim() != 4 or images.shape[1] != 3:
            raise TypeError(f"a tensor of images must be preprocessed float (N, 3, H, W), got {images.dtype} "
                            f"{tuple(images.shape)}")
        for i in range(0, images.shape[0], batch_size):
            yield images[i:i + batch_size]
        return
    paths = image_paths(images)
    if paths is not None:
        loader = make_test_loader([(p, -1, -1) for p in paths], height, width, batch_size=batch_size,
                                  workers=workers, progress=progress)
        for batch in loader:
            yield batch["img"]
        return
    items = list(images)
    for i in range(0, len(items), batch_size):
        chunk = [_as_uint8(im, height, width, i + j) for j, im in enumerate(items[i:i + batch_size])]
        yield to_float_normalized(torch.stack(chunk))


@torch.no_grad()
def extract_features(model: nn.Module, images: Images, batch_size: int = 64, device=None, *,
                     flip: bool | None = None, height: int | None = None, width: int | None = None,
                     workers: int = 0, progress: bool | str = "auto") -> torch.Tensor:
    """The retrieval descriptor of every image, (n, D) float32 on the CPU, in input order.

    ``images``: image paths, a folder (its image files, sorted by name), PIL images or uint8
    (H, W, 3) RGB arrays, or a float tensor (N, 3, H, W) taken as already preprocessed. The model's
    config (``model.fmn_config``, set by ``fmn.load_model``) gives the input size and the test-time
    flip; ``flip``, ``height`` and ``width`` override it (and are needed for a model built by hand)."""
    cfg = getattr(model, "fmn_config", None)
    if cfg is None and (height is None or width is None or flip is None):
        _config_of(model)
    height = height or cfg["data"]["height"]
    width = width or cfg["data"]["width"]
    flip = cfg["eval"]["flip"] if flip is None else bool(flip)
    alpha = cfg["eval"]["alpha"] if cfg is not None else 0.5
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    batches = ({"img": x, "pid": torch.zeros(len(x)), "camid": torch.zeros(len(x)), "path": [""] * len(x)}
               for x in _batches(images, height, width, batch_size, workers, show_progress(progress)))
    feats, *_ = extract_branch_features(model, batches, device, flip=flip, progress=False)
    return retrieval_descriptor(feats, alpha).float().cpu().contiguous()


def evaluate(model: nn.Module, dataset=None, *, dataset_root: str | None = None, rerank: bool | None = None,
             device=None, batch_size: int | None = None, progress: bool | str = "auto") -> dict:
    """CMC rank-1/5/10/20 and mAP (percent) of every row the model gives (GRN, LAN, FMN, or a
    related method's branches and fused descriptor; ``+RR`` rows with k-reciprocal re-ranking),
    as ``{row: {"rank1", "rank5", "rank10", "rank20", "mAP", "valid_queries"}}``. ``dataset``: an
    ``fmn.data.ReIDDataset`` (default: the one of the model's config, at ``dataset_root`` if
    given). Descriptors and distances are computed once."""
    cfg = copy.deepcopy(_config_of(model))
    if dataset is None:
        d = cfg["data"]
        dataset = build_dataset(d["name"], dataset_root or d["root"], **d["options"])
    if rerank is not None:
        cfg["eval"]["rerank"] = bool(rerank)
    if batch_size is not None:
        cfg["eval"]["batch_size"] = int(batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    return evaluate_dataset(model.to(device), dataset, cfg, device, progress=show_progress(progress))["results"]


def evaluate_dataset(model: nn.Module, dataset, cfg: dict, device, progress: bool = False,
                     keep_distances=None) -> dict:
    """Branch features of the query and gallery images once, then every results row:
    {"results", "query", "gallery" (each (features, pids, camids, paths)), "distances",
    "test_masks"}. A model that uses the test images' part masks (MGRAN) gets them where every
    query and gallery image has its files ("test_masks": "given"), else predicts them ("predicted").
    ``keep_distances(features) -> row names``: the plain rows whose (q, g) distances to keep."""
    d, e = cfg["data"], cfg["eval"]
    given = uses_test_parts(cfg) and all(has_parts(s, d["parts_root"]) for s in (dataset.query, dataset.gallery))
    out = []
    with eval_mode(model):
        for samples in (dataset.query, dataset.gallery):
            if given:
                loader = make_parts_test_loader(samples, d["height"], d["width"], batch_size=e["batch_size"],
                                                workers=d["workers"], parts_root=d["parts_root"],
                                                kp_sigma=d["kp_sigma"])
            else:
                loader = make_test_loader(samples, d["height"], d["width"], batch_size=e["batch_size"],
                                          workers=d["workers"], progress=progress)
            out.append(extract_branch_features(model, loader, device, flip=e["flip"], progress=progress))
    (qf, qp, qc, _), (gf, gp, gc, _) = out
    results = evaluate_features(qf, gf, qp, gp, qc, gc, rerank=e["rerank"], alpha=e["alpha"], device=device,
                                keep_distances=tuple(keep_distances(qf)) if keep_distances else ())
    distances = results.pop("distances", {})
    masks = ("given" if given else "predicted") if uses_test_parts(cfg) else None
    return {"results": results, "query": out[0], "gallery": out[1], "distances": distances, "test_masks": masks}
