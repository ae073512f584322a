"""``train(cfg)``: the dataset, the loader the model needs, the model, and the one trainer, under
the output folder's lock. Every model and command trains through here."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch

from fmn import distributed as fdist
from fmn.data import build_dataset, make_train_loader
from fmn.data.parts import make_parts_train_loader
from fmn.engine.lock import output_lock
from fmn.engine.runtime import resolve_device, seed_everything, show_progress
from fmn.engine.trainer import Trainer
from fmn.engine.validation import Validator, split_validation
from fmn.models import build_model_from_config, needs_parts


def build_train_loader(cfg: dict, dataset, dist_info: fdist.DistInfo, parts: bool = False):
    """The PK-sampled training loader of ``cfg``; with ``parts`` the batches also hold the part
    masks (``fmn.data.parts``), for the models that train on them."""
    d = cfg["data"]
    kwargs = dict(batch_size=d["batch_size"], num_instances=d["num_instances"], workers=d["workers"],
                  seed=cfg["train"]["seed"], cache=d["cache"], augment=d["augment"], flip_p=d["flip_p"],
                  pad=d["pad"], erase_p=d["erase_p"], num_replicas=dist_info.world_size, rank=dist_info.rank,
                  progress=show_progress(cfg["train"]["progress"]) and dist_info.is_main)
    if parts:
        return make_parts_train_loader(dataset, d["height"], d["width"], parts_root=d["parts_root"],
                                       kp_sigma=d["kp_sigma"], **kwargs)
    return make_train_loader(dataset, d["height"], d["width"], **kwargs)


def train(cfg: dict, resume: bool = True, log: Callable[[str], None] | None = print,
          dataset=None, lock: bool = True) -> dict[str, Any]:
    """Train the model ``cfg`` describes on its dataset (or ``dataset``), resuming from
    ``<output.dir>/last.pt`` unless ``resume=False``. Under torchrun every process calls this;
    rank 0 holds the output folder's lock (``lock=False``: the caller holds it) and writes
    checkpoints and logs. Returns
    {"checkpoint", "seconds", "history", "stage", "model" (eval mode), "dataset"}."""
    device = resolve_device(cfg["train"]["device"])
    if cfg["train"].get("num_threads"):
        torch.set_num_threads(cfg["train"]["num_threads"])
    info = fdist.init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    out_dir = cfg["output"]["dir"]
    seed_everything(cfg["train"]["seed"])
    if dataset is None:
        d = cfg["data"]
        dataset = build_dataset(d["name"], d["root"], **d["options"])
    if hasattr(dataset, "require_train"):
        dataset.require_train()
    validator = None
    if cfg["train"]["val_ids"]:
        dataset, val = split_validation(dataset, cfg["train"]["val_ids"], cfg["train"]["seed"])
        validator = Validator(val, cfg, device)
        if info.is_main and log is not None:
            log(f"validation: {cfg['train']['val_ids']} training identities held out "
                f"({len(val.query)} queries, {len(val.gallery)} gallery images)")
    if info.is_main and log is not None:
        log(dataset.summary())
        warning = from_scratch_warning(cfg)
        if warning:
            log(f"warning: {warning}")
    with output_lock(out_dir, enabled=info.is_main and lock):
        loader = build_train_loader(cfg, dataset, info, parts=needs_parts(cfg))
        model = build_model_from_config(cfg, dataset.num_train_pids)
        trainer = Trainer(cfg, model, loader, device, out_dir, info, log=log, validator=validator)
        summary = trainer.fit(resume=resume)
    summary.update(model=model.eval(), dataset=dataset)
    return summary


def from_scratch_warning(cfg: dict) -> str | None:
    """The words a user needs when a paper-sized model (ResNet-50 or deeper) starts without ImageNet
    weights: the papers fine-tune them, and from scratch the paper recipe memorises small datasets."""
    m = cfg["model"]
    if m["pretrained"] or m["backbone"] not in ("resnet50", "resnet101"):
        return None
    return (f"{m['name']} with {m['backbone']} starts from random weights: the paper fine-tunes ImageNet weights "
            "(--pretrained PATH, a local torchvision state dict); trained from scratch on a few thousand images "
            "the paper recipe learns the training identities but generalises poorly. For training without "
            "ImageNet weights use a small backbone and standard re-ID practice (BN neck, label smoothing, "
            "warm-up, triplet; --config demo is one such recipe)")
