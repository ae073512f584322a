"""Single-stage trainer for MMGA, MGRAN and PMM (the related methods of DESIGN.md).

    cfg = load_seed_config("configs/mmga.yaml", ["data.root=/tmp/synth", "seed.attention_weight=0.5"])
    summary = train_seed_model(cfg)            # -> {"checkpoint", "model", "dataset", "history", ...}

Configuration: the sections of ``fmn.config`` (model, data, train, eval, output, synth) plus a
``seed`` section with the options of the model named by ``model.name`` (``SEED_OPTIONS``) and
``parts_root`` / ``kp_sigma`` of the parts-aware loader (``fmn.data.parts``), used for models
whose ``needs_parts`` is true (MMGA, region-level MGRAN); the others take ``fmn.data``'s loader
and need no mask files. The schedule is
``train.stage1`` (epochs, lr, milestones, gamma); ``train.stage2.epochs`` must be 0.
``train.label_smoothing``, ``train.triplet_weight`` and ``train.triplet_margin`` go to the model's
loss. Every model exposes ``loss(outputs, batch) -> (loss, stats)``; the trainer is generic:
SGD with momentum, step schedule with optional warm-up, AMP and channels_last on GPU, DDP under
torchrun (``find_unused_parameters``, since PMM's later stage classifiers join over epochs), an
atomic ``<output>/last.pt`` each epoch (resumed by default) and ``<output>/model.pt`` at the end,
in the checkpoint format of ``fmn.trainer`` (so ``fmn eval`` reads it). As there,
``train_log.jsonl`` is rewritten from the checkpoint's history when a run starts, non-finite
weights are never checkpointed, and a checkpoint written for another model configuration is one
``CheckpointError`` naming the settings that differ. A model with ``set_epoch`` (PMM's
progressive schedule) is told the epoch before each one.

Command line: ``fmn train --model mmga|mgran|pmm [--config FILE] [--set KEY=VALUE] [--eval]``
(``cli_train``) and ``fmn eval --checkpoint runs/mmga/model.pt`` (``load_seed_model``).
"""
from __future__ import annotations

import copy
import json
import os
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn

from fmn import distributed as fdist
from fmn.checkpoint import CheckpointError, load_checkpoint, load_model_weights, save_checkpoint
from fmn.config import (DEFAULTS, ConfigError, _merge, apply_override, load_config, model_kwargs, read_yaml_sections,
                        validate, with_sections_of)

SEED_MODELS = ("mmga", "mgran", "pmm")

COMMON_OPTIONS: dict[str, Any] = {
    "parts_root": None,      # folder holding <split>/<stem>.png|json (default: <data.root>/parts)
    "kp_sigma": 0.1,         # keypoint region width, as a fraction of the input width
}
SEED_OPTIONS: dict[str, dict[str, Any]] = {
    "mmga": {"scales": ["layer2", "layer3", "layer4"], "part_dim": 256, "attention_weight": 1.0},
    "mgran": {"regions": ["body", "kp_upper", "kp_lower"], "alignment": "region", "threshold": 0.5,
              "mask_weight": 1.0, "mask_width": 32, "train_masks": "given"},
    "pmm": {"stages": ["layer2", "layer3", "layer4"], "stage_start_epochs": [0, 0, 0],
            "mix_stages": ["layer2", "layer3"], "mix_block": [0.33, 0.5], "mix_prob": 1.0,
            "batch_drop": False, "drop_block": [0.3, 1.0]},
}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def seed_defaults(name: str) -> dict[str, Any]:
    if name not in SEED_MODELS:
        raise ConfigError(f"model.name={name!r} is not one of the seed models {', '.join(SEED_MODELS)}")
    return {**copy.deepcopy(COMMON_OPTIONS), **copy.deepcopy(SEED_OPTIONS[name])}


def load_seed_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                     model: str | None = None) -> dict:
    """DEFAULTS <- the YAML file (its ``seed`` section apart) <- ``model`` <- overrides.

    ``seed.*`` overrides set the model's options; every other override goes through
    ``fmn.config.apply_override``. Unknown keys raise ``ConfigError``."""
    cfg = copy.deepcopy(DEFAULTS)
    cfg["train"]["stage2"]["epochs"] = 0
    seed_section: dict = {}
    if path is not None:
        path = os.fspath(path)
        data = read_yaml_sections(path)
        seed_section = data.pop("seed", None) or {}
        if not isinstance(seed_section, dict):
            raise ConfigError(f"{path}: the seed section must be a mapping")
        try:
            _merge(cfg, data, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    seed_over, other_over = [], []
    for text in overrides or []:
        (seed_over if text.strip().startswith("seed.") else other_over).append(text)
    for text in other_over:
        apply_override(cfg, text)
    if model is not None:
        cfg["model"]["name"] = model
    cfg["seed"] = seed_defaults(cfg["model"]["name"])
    try:
        _merge(cfg["seed"], seed_section, "seed")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for text in seed_over:
        apply_override(cfg, text)
    return validate_seed(cfg)


def validate_seed(cfg: dict) -> dict:
    """``fmn.config.validate`` plus the single-stage schedule and the seed section's keys."""
    validate(cfg)
    name = cfg["model"]["name"]
    known = seed_defaults(name)
    seed = cfg.get("seed")
    if not isinstance(seed, dict):
        raise ConfigError(f"config section 'seed' (the options of {name}) is missing")
    unknown = sorted(set(seed) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key 'seed.{unknown[0]}' for model {name}; known keys: {', '.join(sorted(known))}")
    if cfg["train"]["stage2"]["epochs"] != 0:
        raise ConfigError(f"train.stage2.epochs={cfg['train']['stage2']['epochs']!r}: {name} trains in one stage "
                          "(train.stage1); set train.stage2.epochs=0")
    if cfg["train"]["stage1"]["epochs"] < 1:
        raise ConfigError("train.stage1.epochs must be >= 1 for a seed model")
    if not (isinstance(seed["kp_sigma"], (int, float)) and seed["kp_sigma"] > 0):
        raise ConfigError(f"config value seed.kp_sigma={seed['kp_sigma']!r} is invalid: expected a number > 0")
    return cfg


def seed_model_kwargs(cfg: dict) -> dict:
    kw = model_kwargs(cfg)
    kw.update({k: v for k, v in cfg["seed"].items() if k not in COMMON_OPTIONS})
    t = cfg["train"]
    kw.update(label_smoothing=t["label_smoothing"], triplet_weight=t["triplet_weight"],
              triplet_margin=t["triplet_margin"])
    return kw


def build_seed_model(cfg: dict, num_classes: int) -> nn.Module:
    from fmn.models import build_model

    try:
        return build_model(cfg["model"]["name"], num_classes, **seed_model_kwargs(cfg))
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def build_parts_loader(cfg: dict, dataset, info: fdist.DistInfo):
    from fmn.data.parts import make_parts_train_loader

    d, s = cfg["data"], cfg["seed"]
    return make_parts_train_loader(
        dataset, d["height"], d["width"], batch_size=d["batch_size"], num_instances=d["num_instances"],
        workers=d["workers"], seed=cfg["train"]["seed"], cache=d["cache"], augment=d["augment"],
        num_replicas=info.world_size, rank=info.rank, parts_root=s["parts_root"], kp_sigma=s["kp_sigma"],
        flip_p=d.get("flip_p", 0.5), pad=d.get("pad", 10), erase_p=d.get("erase_p", 0.0),
        progress=cfg["train"]["progress"] and info.is_main)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train_seed_model(cfg: dict, resume: bool = True, log: Callable[[str], None] | None = print,
                     dataset=None) -> dict[str, Any]:
    """Train ``cfg["model"]["name"]`` (mmga | mgran | pmm) for ``train.stage1.epochs`` epochs.

    Returns {"checkpoint", "seconds", "history", "model" (eval mode), "dataset"}."""
    from tqdm import tqdm

    from fmn.data import build_dataset
    from fmn.trainer import (CHECKPOINT_FORMAT, NonFiniteLossError, epoch_seed, loss_is_finite, lr_at,
                             non_finite_weights, resolve_amp, resolve_device, seed_everything, stop_advice)

    validate_seed(cfg)
    t, d = cfg["train"], cfg["data"]
    device = resolve_device(t["device"])
    if t.get("num_threads"):
        torch.set_num_threads(t["num_threads"])
    info = fdist.init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    say = (lambda msg: log(msg)) if (log is not None and info.is_main) else (lambda msg: None)
    seed_everything(t["seed"])
    if dataset is None:
        dataset = build_dataset(d["name"], d["root"], **d["options"])
    say(dataset.summary())
    model = build_seed_model(cfg, dataset.num_train_pids).to(device)
    if getattr(model, "needs_parts", True):
        loader = build_parts_loader(cfg, dataset, info)
    else:
        from fmn.trainer import build_train_loader

        loader = build_train_loader(cfg, dataset, info)
    channels_last = (device.type == "cuda") if t["channels_last"] == "auto" else bool(t["channels_last"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = resolve_amp(t["amp"], device)
    run_model: nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        find_unused_parameters=True)
    sc = t["stage1"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=sc["lr"], momentum=t["momentum"], weight_decay=t["weight_decay"],
                                nesterov=t["nesterov"] and t["momentum"] > 0)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    out_dir = cfg["output"]["dir"]
    last, final = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "model.pt")
    tips = "a lower learning rate, train.amp=none or train.grad_clip"
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
    history: list[dict] = []
    first = 0
    if resume and os.path.exists(last):
        state = load_checkpoint(last)
        saved_cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
        if state.get("format") != CHECKPOINT_FORMAT or saved_cfg.get("model", {}).get("name") != cfg["model"]["name"]:
            raise CheckpointError(f"{last}: not a {cfg['model']['name']} training checkpoint; use another output.dir "
                                  "or --no-resume")
        load_model_weights(model, state["model"], last, _model_settings(saved_cfg, state.get("num_classes")),
                           _model_settings(cfg, model.num_classes))
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        first, history = int(state["epoch"]), list(state.get("history", []))
        say(f"resuming from {last}: {first} epoch(s) done")
    if info.is_main:
        # a fresh run starts a new log; a resumed one keeps exactly the checkpoint's epochs
        with open(os.path.join(out_dir, "train_log.jsonl"), "w") as fh:
            fh.writelines(json.dumps(record) + "\n" for record in history)

    def checkpoint(epoch: int) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler is not None else {},
                "stage": 1, "epoch": epoch, "num_classes": int(model.num_classes), "config": cfg,
                "history": history}

    t_start = time.perf_counter()
    max_steps = t["max_steps_per_epoch"]
    for epoch in range(first, sc["epochs"]):
        lr = lr_at(epoch, sc["lr"], sc["milestones"], sc["gamma"], t["warmup_epochs"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        seed_everything(epoch_seed(t["seed"], 1, epoch) + info.rank)
        for obj in (loader.sampler, loader.collate_fn):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch_seed(t["seed"], 1, epoch))
        if hasattr(model, "set_epoch"):
            model.set_epoch(epoch)
        run_model.train()
        sums: dict[str, float] = {}
        steps, images, t0 = 0, 0, time.perf_counter()
        total = len(loader) if max_steps is None else min(len(loader), max_steps)
        bar = tqdm(total=total, desc=f"{cfg['model']['name']} epoch {epoch + 1}/{sc['epochs']}",
                   disable=not (t["progress"] and info.is_main), dynamic_ncols=True, leave=False)
        for step, batch in enumerate(loader):
            if max_steps is not None and step >= max_steps:
                break
            batch = _to_device(batch, device)
            img = batch["img"]
            if channels_last:
                img = img.contiguous(memory_format=torch.channels_last)
            amp = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
            with amp:
                out = run_model(img, batch=batch)
                loss, stats = model.loss(out, batch)
            if not loss_is_finite(loss, device, info.enabled):
                raise NonFiniteLossError(
                    f"{cfg['model']['name']} epoch {epoch + 1} step {step}: the loss is {loss.item()} (not finite); "
                    f"stopped before the step. {stop_advice(last, tips)}")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if t["grad_clip"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if t["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_(params, t["grad_clip"])
                optimizer.step()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
            images += int(img.shape[0]) * info.world_size
            bar.update(1)
            bar.set_postfix(loss=f"{float(stats['loss']):.3f}", acc=f"{float(stats.get('acc', 0.0)):.3f}")
        bar.close()
        seconds = time.perf_counter() - t0
        record = {"stage": 1, "epoch": epoch + 1, "lr": lr,
                  **{k: round(v / max(1, steps), 6) for k, v in sums.items()},
                  "images_per_s": round(images / max(1e-9, seconds), 3), "seconds": round(seconds, 3)}
        history.append(record)
        say(f"{cfg['model']['name']} epoch {epoch + 1}/{sc['epochs']}  lr {lr:.4g}  loss {record.get('loss', float('nan')):.4f}"
            f"  acc {record.get('acc', float('nan')):.3f}  {record['images_per_s']:.1f} img/s  {seconds:.1f}s")
        bad_weights = non_finite_weights(model, device, info.enabled)
        if bad_weights:
            raise NonFiniteLossError(
                f"{cfg['model']['name']} epoch {epoch + 1}: weights are not finite after the epoch "
                f"({', '.join(bad_weights[:3])}); stopped without saving them. {stop_advice(last, tips)}")
        if info.is_main:
            with open(os.path.join(out_dir, "train_log.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")
            save_checkpoint(checkpoint(epoch + 1), last)
        fdist.barrier()
    if info.is_main:
        save_checkpoint(checkpoint(sc["epochs"]), final)
    fdist.barrier()
    model.eval()
    return {"checkpoint": final, "seconds": time.perf_counter() - t_start, "history": history, "model": model,
            "dataset": dataset}


def load_seed_model(checkpoint: str, overrides: list[str] | None = None,
                    config: str | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode, config) from a checkpoint written by ``train_seed_model``. ``config``:
    a config file whose sections other than the model replace the checkpoint's."""
    state = load_checkpoint(checkpoint)
    if "config" not in state or "model" not in state or state["config"].get("model", {}).get("name") not in SEED_MODELS:
        raise ConfigError(f"{checkpoint} is not a checkpoint of {', '.join(SEED_MODELS)} written by the seed trainer")
    cfg = copy.deepcopy(state["config"])
    if config is not None:
        cfg = with_sections_of(cfg, load_any_config(config))
    cfg["model"]["pretrained"] = None
    for text in overrides or []:
        apply_override(cfg, text)
    validate_seed(cfg)
    if not isinstance(state.get("num_classes"), int) or not isinstance(state["model"], dict):
        raise CheckpointError(f"{checkpoint}: a seed checkpoint without its num_classes or model weights")
    model = build_seed_model(cfg, state["num_classes"])
    load_model_weights(model, state["model"], checkpoint, _model_settings(state["config"], state["num_classes"]),
                       _model_settings(cfg, state["num_classes"]))
    return model.eval(), cfg


def _model_settings(cfg: dict, num_classes) -> dict:
    """The settings that shape a seed model's weights, for a checkpoint mismatch message."""
    settings = {f"model.{k}": v for k, v in (cfg.get("model") or {}).items() if k != "pretrained"}
    settings.update({f"seed.{k}": v for k, v in (cfg.get("seed") or {}).items() if k not in COMMON_OPTIONS})
    return dict(settings, num_classes=num_classes)


# ----------------------------------------------------------------------------- command line
def default_config(model: str) -> str | None:
    path = os.path.join(CONFIG_DIR, f"{model}.yaml")
    return path if os.path.isfile(path) else None


def config_model_name(path: str | os.PathLike | None) -> str | None:
    """``model.name`` of the YAML file at ``path``, or None (no file, no name, or a file the real
    loader will reject with its own message)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        data = read_yaml_sections(os.fspath(path))
    except ConfigError:
        return None
    model = data.get("model")
    return model.get("name") if isinstance(model, dict) else None


def is_seed_run(args) -> bool:
    """True when ``fmn train`` arguments name a seed model: ``--model``, the config file's
    ``model.name``, or a ``--set model.name=...`` override."""
    names = [getattr(args, "model", None), config_model_name(getattr(args, "config", None))]
    for text in getattr(args, "overrides", []) or []:
        if text.replace(" ", "").startswith("model.name="):
            names.append(text.split("=", 1)[1].strip())
    return any(n in SEED_MODELS for n in names if n)


def load_any_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> dict:
    """The config of an FMN file (``fmn.config.load_config``) or of a related method's file
    (``load_seed_config``, chosen by the file's ``model.name``), for commands that need only its
    data, synth and eval sections."""
    if config_model_name(path) in SEED_MODELS:
        return load_seed_config(path, overrides)
    return load_config(path, overrides)


def cli_train(args) -> int:
    """``fmn train --model NAME`` (argparse namespace with model, config, overrides, data_root, output,
    device, pretrained, no_resume, eval)."""
    overrides = list(getattr(args, "overrides", []) or [])
    for attr, key in (("data_root", "data.root"), ("output", "output.dir"), ("device", "train.device"),
                      ("pretrained", "model.pretrained")):
        if getattr(args, attr, None):
            overrides.append(f"{key}={getattr(args, attr)}")
    config = getattr(args, "config", None) or (default_config(args.model) if getattr(args, "model", None) else None)
    cfg = load_seed_config(config, overrides, model=getattr(args, "model", None))
    root = cfg["data"]["root"]
    if cfg["data"]["name"] == "synthetic" and not os.path.exists(root) and fdist.current().is_main:
        from fmn.data.synthetic import generate

        sy = cfg["synth"]
        _log(f"writing the synthetic dataset to {root}")
        generate(root, num_ids=sy["num_ids"], num_cams=sy["num_cams"], seed=sy["seed"],
                 images_per_id_per_cam=sy["images_per_id_per_cam"], height=sy["height"], width=sy["width"],
                 progress=cfg["train"]["progress"])
    summary = train_seed_model(cfg, resume=not getattr(args, "no_resume", False), log=_log)
    info = fdist.current()
    if info.is_main:
        _log(f"final model: {summary['checkpoint']}  ({summary['seconds']:.1f}s)")
        if getattr(args, "eval", False):
            evaluate_seed(summary["model"], summary["dataset"], cfg,
                          os.path.join(cfg["output"]["dir"], "results.json"))
    fdist.cleanup()
    return 0


def evaluate_seed(model: nn.Module, dataset, cfg: dict, json_path: str | None = None) -> dict:
    from fmn.evaluator import evaluate_model
    from fmn.trainer import resolve_device

    device = resolve_device(cfg["train"]["device"])
    model.to(device).eval()
    d, e = cfg["data"], cfg["eval"]
    return evaluate_model(model, dataset, d["height"], d["width"], device, batch_size=e["batch_size"],
                          flip=e["flip"], rerank=e["rerank"], alpha=e["alpha"], json_path=json_path,
                          workers=d["workers"], progress=cfg["train"]["progress"])


def _log(msg: str) -> None:
    print(msg, flush=True)
