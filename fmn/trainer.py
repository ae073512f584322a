"""The two-stage FMN trainer (paper Algorithm 1).

Stage 1 trains GRN with cross-entropy (SGD, momentum 0.9, lr 0.1 -> 0.01 after 20 epochs).
Stage 2 freezes GRN (eval mode, no grad: its parameters and BN statistics stay as they are) and
trains MN + LAN with cross-entropy plus the ranking loss max(0, p_t^G - p_t^L + margin)
(lr 0.1 -> 0.01 after 35 epochs). Optional label smoothing and batch-hard triplet.

Each epoch ends with an atomic checkpoint ``<out>/last.pt``; ``fit(resume=True)`` continues from it,
so a killed run loses at most the epoch that was running. Every epoch reseeds the RNGs from
(seed, stage, epoch) and calls the sampler's ``set_epoch``, so a resumed run follows the same
data order and augmentation as an uninterrupted one; ``train_log.jsonl`` is rewritten from the
checkpoint's history, so it too matches. A NaN or Inf loss raises ``NonFiniteLossError`` before
the step is applied, and non-finite weights are never checkpointed: the last good checkpoint
stays in place. A checkpoint written for another model configuration is refused with the
settings that differ.

AMP (bf16 / fp16) and channels_last are used on GPU; under torchrun the model is wrapped in DDP
(gloo on CPU, nccl on GPU) and the identity sampler splits identities across ranks.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from fmn import distributed as fdist
from fmn.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from fmn.losses import accuracy, batch_hard_triplet, cross_entropy, ranking_loss

CHECKPOINT_FORMAT = "fmn-checkpoint-v1"


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    return (seed * 1_000_003 + stage * 10_007 + epoch * 101) % (2**31 - 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine; use cpu or auto")
    return dev


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "none":
        return None
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def lr_at(epoch: int, base_lr: float, milestones: list[int], gamma: float, warmup: int = 0) -> float:
    """Step schedule: base * gamma^(number of milestones <= epoch), after a linear warm-up."""
    lr = base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    if warmup > 0 and epoch < warmup:
        lr *= (epoch + 1) / (warmup + 1)
    return lr


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


class _Meter:
    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def update(self, stats: dict[str, float]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.sums.items()}


def _kill_point() -> tuple[int, int, int] | None:
    """FMN_KILL_AT=stage:epoch:step makes the process SIGKILL itself there (fault-injection tests)."""
    text = os.environ.get("FMN_KILL_AT")
    if not text:
        return None
    s, e, i = (int(v) for v in text.split(":"))
    return s, e, i


# model settings that do not change the network a checkpoint's weights belong to
_NOT_ARCHITECTURE = ("pretrained", "backend", "lan_init")


def architecture(cfg: dict, num_classes: int | None) -> dict[str, Any]:
    """The settings of ``cfg`` that define the network: model.* (less the path of the ImageNet
    weights, the kernel backend and the stage-2 initialisation), the input size and num_classes."""
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    out = {k: v for k, v in model.items() if k not in _NOT_ARCHITECTURE}
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    if "height" in data and "width" in data:
        out["input_size"] = (data["height"], data["width"])
    out["num_classes"] = num_classes
    return out


class Trainer:
    """Runs Algorithm 1 on a model that has ``set_stage``, ``trainable_parameters`` and the
    output dict of ``fmn.models.FeatureMaskNetwork``.

    ``train_loader`` yields dicts with ``img`` and ``pid``; if its ``batch_sampler`` or ``sampler``
    has ``set_epoch`` it is called every epoch.
    """

    def __init__(
        self,
        cfg: dict,
        model: nn.Module,
        train_loader: Iterable,
        device: torch.device,
        out_dir: str,
        dist_info: fdist.DistInfo | None = None,
        log: Callable[[str], None] | None = print,
    ):
        self.cfg = cfg
        self.tcfg = cfg["train"]
        self.loader = train_loader
        self.device = device
        self.out_dir = out_dir
        self.dist = dist_info or fdist.DistInfo()
        self._log = log
        self.amp_dtype = resolve_amp(self.tcfg["amp"], device)
        cl = self.tcfg["channels_last"]
        self.channels_last = (device.type == "cuda") if cl == "auto" else bool(cl)
        self.model = model.to(device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ddp_model: nn.Module = self.model
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = None
        self.history: list[dict[str, Any]] = []
        self.tb = None
        self.last_checkpoint = os.path.join(out_dir, "last.pt")
        self.final_checkpoint = os.path.join(out_dir, "model.pt")
        self.log_file = os.path.join(out_dir, "train_log.jsonl")
        if self.dist.is_main:
            os.makedirs(out_dir, exist_ok=True)

    # ------------------------------------------------------------------ utils
    def log(self, msg: str) -> None:
        if self._log is not None and self.dist.is_main:
            self._log(msg)

    def _open_tensorboard(self) -> None:
        if not (self.tcfg["tensorboard"] and self.dist.is_main) or self.tb is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:
            self.log("tensorboard is not installed; scalars go to train_log.jsonl only")
            self.tcfg = dict(self.tcfg, tensorboard=False)
            return
        self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"))

    def _scalars(self, tag: str, stats: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in stats.items():
                self.tb.add_scalar(f"{tag}/{k}", v, step)

    def _stage_cfg(self, stage: int) -> dict:
        return self.tcfg[f"stage{stage}"]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params = unwrap(self.model).trainable_parameters()
        return torch.optim.SGD(
            params,
            lr=self._stage_cfg(unwrap(self.model).stage)["lr"],
            momentum=self.tcfg["momentum"],
            weight_decay=self.tcfg["weight_decay"],
            nesterov=self.tcfg["nesterov"] and self.tcfg["momentum"] > 0,
        )

    def _wrap(self) -> None:
        self.ddp_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(self.model, device_ids=ids)

    def _set_epoch(self, value: int) -> None:
        """Tell the sampler (and a collate function that augments, if it has ``set_epoch``) the epoch."""
        for obj in (getattr(self.loader, "batch_sampler", None), getattr(self.loader, "sampler", None), self.loader):
            if obj is not None and hasattr(obj, "set_epoch"):
                obj.set_epoch(value)
                break
        collate = getattr(self.loader, "collate_fn", None)
        if collate is not None and hasattr(collate, "set_epoch"):
            collate.set_epoch(value)

    # ------------------------------------------------------------ checkpoints
    def _checkpoint(self, stage: int, epoch: int) -> dict[str, Any]:
        model = unwrap(self.model)
        return {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "stage": stage,
            "epoch": epoch,
            "num_classes": int(getattr(model, "num_classes", 0)),
            "config": self.cfg,
            "history": self.history,
        }

    def _write_log(self) -> None:
        """Start ``train_log.jsonl`` over from the history (empty, or the resumed checkpoint's): a
        fresh run does not append to an old log, and an epoch whose line was written but whose
        checkpoint was not (killed while saving) is not logged twice."""
        if self.dist.is_main:
            with open(self.log_file, "w") as fh:
                fh.writelines(json.dumps(record) + "\n" for record in self.history)

    _TIPS = "a lower learning rate, train.grad_clip, model.mask_max_logit or train.amp=none"

    def _check_finite_weights(self, stage: int, epoch: int) -> None:
        """Refuse to checkpoint non-finite weights."""
        bad = non_finite_weights(unwrap(self.model), self.device, self.dist.enabled)
        if bad:
            raise NonFiniteLossError(
                f"stage {stage} epoch {epoch + 1}: weights are not finite after the epoch ({', '.join(bad[:3])}); "
                f"training stopped without saving them. {stop_advice(self.last_checkpoint, self._TIPS)}")

    def save(self, stage: int, epoch: int, path: str | None = None) -> None:
        if self.dist.is_main:
            save_checkpoint(self._checkpoint(stage, epoch), path or self.last_checkpoint)
        fdist.barrier()

    # ------------------------------------------------------------------ steps
    def compute_loss(self, stage: int, out: dict[str, torch.Tensor], pid: torch.Tensor):
        t = self.tcfg
        if stage == 1:
            logits, feat = out["grn_logits"], out["grn_feat"]
        else:
            logits, feat = out["lan_logits"], out["lan_feat"]
        ce = cross_entropy(logits, pid, t["label_smoothing"])
        loss = ce
        stats = {"ce": ce.detach()}
        if stage == 2 and t["rank_weight"] > 0:
            rank = ranking_loss(out["grn_logits"], logits, pid, t["rank_margin"])
            loss = loss + t["rank_weight"] * rank
            stats["rank"] = rank.detach()
        if t["triplet_weight"] > 0:
            tri = batch_hard_triplet(feat, pid, t["triplet_margin"])
            loss = loss + t["triplet_weight"] * tri
            stats["triplet"] = tri.detach()
        stats["loss"] = loss.detach()
        return loss, stats, logits

    def train_step(self, stage: int, batch: dict[str, Any]) -> dict[str, float]:
        img = batch["img"].to(self.device, non_blocking=True)
        pid = batch["pid"].to(self.device, non_blocking=True).long()
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        amp = (
            torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else nullcontext()
        )
        with amp:
            out = self.ddp_model(img)
            loss, stats, logits = self.compute_loss(stage, out, pid)
        if not loss_is_finite(loss, self.device, self.dist.enabled):
            raise NonFiniteLossError(
                f"stage {stage}: the loss is {loss.item()} (not finite); training stopped before this step was "
                f"applied. {stop_advice(self.last_checkpoint, self._TIPS)}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.tcfg["grad_clip"]:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.tcfg["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.tcfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.tcfg["grad_clip"])
            self.optimizer.step()
        result = {k: float(v.item()) for k, v in stats.items()}
        result["acc"] = accuracy(logits.detach(), pid)
        return result

    def _train_epoch(self, stage: int, epoch: int, kill: tuple[int, int, int] | None) -> dict[str, float]:
        from tqdm import tqdm

        self.ddp_model.train()
        meter = _Meter()
        max_steps = self.tcfg["max_steps_per_epoch"]
        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        if max_steps is not None and total is not None:
            total = min(total, max_steps)
        show = self.tcfg["progress"] and self.dist.is_main
        bar = tqdm(total=total, desc=f"stage {stage} epoch {epoch + 1}/{self._stage_cfg(stage)['epochs']}",
                   disable=not show, dynamic_ncols=True, leave=False)
        images, t0 = 0, time.perf_counter()
        step = 0
        for step, batch in enumerate(self.loader):
            if max_steps is not None and step >= max_steps:
                break
            stats = self.train_step(stage, batch)
            meter.update(stats)
            images += int(batch["img"].shape[0]) * self.dist.world_size
            ips = images / max(1e-9, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['acc']:.3f}", img_s=f"{ips:.1f}")
            if self.tb is not None and step % self.tcfg["log_every"] == 0:
                gstep = self._global_step(stage, epoch) + step
                self._scalars(f"stage{stage}/step", dict(stats, images_per_s=ips), gstep)
            if kill is not None and kill == (stage, epoch, step):
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        elapsed = time.perf_counter() - t0
        means = meter.means()
        means["images_per_s"] = images / max(1e-9, elapsed)
        means["seconds"] = elapsed
        return means

    def _global_step(self, stage: int, epoch: int) -> int:
        steps = self.tcfg["max_steps_per_epoch"] or (len(self.loader) if hasattr(self.loader, "__len__") else 1000)
        offset = 0 if stage == 1 else self.tcfg["stage1"]["epochs"] * steps
        return offset + epoch * steps

    # -------------------------------------------------------------------- fit
    def _start_stage(self, stage: int, fresh: bool) -> None:
        model = unwrap(self.model)
        model.set_stage(stage)
        model.zero_grad(set_to_none=True)  # no stale stage-1 gradients kept alive on the frozen GRN
        if stage == 2 and fresh and self.cfg["model"].get("lan_init") == "grn" and hasattr(model, "copy_grn_into_lan"):
            model.copy_grn_into_lan()
        self._wrap()
        self.optimizer = self._make_optimizer()
        self.scaler = None
        if self.amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(self.device.type)

    def fit(self, resume: bool = True) -> dict[str, Any]:
        """Train both stages (resuming from ``<out>/last.pt`` if present); returns a summary.
        The TensorBoard event file is closed at the end, also when training stops on an error."""
        try:
            return self._fit(resume)
        finally:
            if self.tb is not None:
                self.tb.close()
                self.tb = None

    def _fit(self, resume: bool) -> dict[str, Any]:
        stage, epoch = 1, 0
        state = None
        self.history = []
        if resume and os.path.exists(self.last_checkpoint):
            state = load_checkpoint(self.last_checkpoint, map_location="cpu")
            if state.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"{self.last_checkpoint}: not an fmn training checkpoint")
            model = unwrap(self.model)
            saved_cfg = state.get("config") if isinstance(state.get("config"), dict) else {}
            saved = architecture(saved_cfg, state.get("num_classes"))
            now = architecture(self.cfg, getattr(model, "num_classes", None))
            load_model_weights(model, state["model"], self.last_checkpoint, saved, now, settings_must_match=True)
            stage, epoch = int(state["stage"]), int(state["epoch"])
            self.history = list(state.get("history", []))
            self.log(f"resuming from {self.last_checkpoint}: stage {stage}, {epoch} epoch(s) done")
        self._write_log()
        self._open_tensorboard()
        kill = _kill_point()
        seed = self.tcfg["seed"]
        t_start = time.perf_counter()
        for s in (1, 2):
            n_epochs = self._stage_cfg(s)["epochs"]
            if s < stage:
                continue
            first = epoch if s == stage else 0
            if first >= n_epochs and s == stage and state is not None:
                continue
            self._start_stage(s, fresh=(first == 0))
            if state is not None and s == stage and first > 0:
                if state.get("optimizer"):
                    self.optimizer.load_state_dict(state["optimizer"])
                if self.scaler is not None and state.get("scaler"):
                    self.scaler.load_state_dict(state["scaler"])
            sc = self._stage_cfg(s)
            for e in range(first, n_epochs):
                lr = lr_at(e, sc["lr"], sc["milestones"], sc["gamma"], self.tcfg["warmup_epochs"])
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                seed_everything(epoch_seed(seed, s, e) + self.dist.rank)
                self._set_epoch(epoch_seed(seed, s, e))
                stats = self._train_epoch(s, e, kill)
                stats = {k: round(v, 6) for k, v in stats.items()}
                record = {"stage": s, "epoch": e + 1, "lr": lr, **stats}
                self.history.append(record)
                self.log(
                    f"stage {s} epoch {e + 1}/{n_epochs}  lr {lr:.4g}  loss {stats.get('loss', float('nan')):.4f}  "
                    f"acc {stats.get('acc', float('nan')):.3f}  {stats['images_per_s']:.1f} img/s  {stats['seconds']:.1f}s"
                )
                self._scalars(f"stage{s}/epoch", dict(stats, lr=lr), e + 1)
                if self.dist.is_main:
                    with open(self.log_file, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
                self._check_finite_weights(s, e)
                self.save(s, e + 1)
            state = None
        final_stage = 2 if self.tcfg["stage2"]["epochs"] > 0 else 1
        final_epoch = self.tcfg[f"stage{final_stage}"]["epochs"]
        unwrap(self.model).set_stage(final_stage)
        self.save(final_stage, final_epoch, self.final_checkpoint)
        return {
            "checkpoint": self.final_checkpoint,
            "seconds": time.perf_counter() - t_start,
            "history": self.history,
        }


# ------------------------------------------------------------------------ entry point
def build_model_from_config(cfg: dict, num_classes: int) -> nn.Module:
    from fmn.config import model_kwargs
    from fmn.models import build_model

    return build_model(cfg["model"]["name"], num_classes, **model_kwargs(cfg))


def build_train_loader(cfg: dict, dataset, dist_info: fdist.DistInfo):
    import inspect

    from fmn.data import make_train_loader

    d = cfg["data"]
    kwargs = dict(
        batch_size=d["batch_size"],
        num_instances=d["num_instances"],
        workers=d["workers"],
        seed=cfg["train"]["seed"],
        cache=d["cache"],
        augment=d["augment"],
        flip_p=d["flip_p"],
        pad=d["pad"],
        erase_p=d["erase_p"],
        progress=cfg["train"]["progress"],
    )
    if dist_info.enabled:
        params = inspect.signature(make_train_loader).parameters
        if "num_replicas" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise RuntimeError("fmn.data.make_train_loader does not accept num_replicas/rank; cannot run DDP")
        kwargs.update(num_replicas=dist_info.world_size, rank=dist_info.rank)
    return make_train_loader(dataset, d["height"], d["width"], **kwargs)


def run_training(cfg: dict, resume: bool = True, log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Build the dataset, loader and model from ``cfg`` and train both stages.

    Under torchrun, every process calls this; rank 0 writes checkpoints and logs.
    """
    from fmn.data import build_dataset

    device = resolve_device(cfg["train"]["device"])
    if cfg["train"].get("num_threads"):
        torch.set_num_threads(cfg["train"]["num_threads"])
    info = fdist.init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    seed_everything(cfg["train"]["seed"])
    d = cfg["data"]
    dataset = build_dataset(d["name"], d["root"], **d["options"])
    if info.is_main and log is not None and hasattr(dataset, "summary"):
        log(dataset.summary())
    loader = build_train_loader(cfg, dataset, info)
    model = build_model_from_config(cfg, dataset.num_train_pids)
    trainer = Trainer(cfg, model, loader, device, cfg["output"]["dir"], info, log=log)
    summary = trainer.fit(resume=resume)
    summary["model"] = model
    summary["dataset"] = dataset
    return summary
