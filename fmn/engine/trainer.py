"""The one trainer: every model's stages (``fmn.models.stages``), one loop.

A model declares its stages (``model.training_stages(cfg)``): FMN's Algorithm 1 is two (GRN;
then MN + LAN with GRN frozen), MMGA, MGRAN and PMM one each. For each stage the trainer builds
SGD (momentum, weight decay, Nesterov from ``train``) over the stage's trainable parameters,
follows the step schedule ``train.<stage.schedule>`` after an optional linear warm-up, and runs
AMP (bf16 / fp16 with a GradScaler) and channels_last on GPU, DDP under torchrun (gloo on CPU,
nccl on GPU; the identity sampler splits identities across ranks), gradient clipping, and the
finiteness checks.

Each epoch ends with an atomic checkpoint ``<out>/last.pt``; ``fit(resume=True)`` continues from
it, so a killed run loses at most the epoch that was running. Every epoch reseeds the RNGs from
(seed, stage, epoch) and calls the sampler's and collate function's ``set_epoch`` (and the
model's, where it has one), so a resumed run follows the same data order and
augmentation as an uninterrupted one, bit for bit; ``train_log.jsonl`` is rewritten from the
checkpoint's history, so it too matches. A NaN or Inf loss raises ``NonFiniteLossError`` before
the step is applied, and non-finite weights are never checkpointed: the last good checkpoint
stays in place. A checkpoint written for another model configuration is refused with the
settings that differ.
"""
from __future__ import annotations

import json
import os
import signal
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch
from torch import nn

from fmn import distributed as fdist
from fmn.atomic import remove_stale_temporaries
from fmn.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from fmn.config import architecture
from fmn.engine.health import HealthCheck, TrainingHealthError, relative_spread
from fmn.engine.runtime import (NonFiniteLossError, epoch_seed, loss_is_finite, lr_at, non_finite_weights,
                                resolve_amp, seed_everything, show_progress, stop_advice, unwrap)
from fmn.models.stages import Stage

CHECKPOINT_FORMAT = "fmn-checkpoint-v1"
TIPS = "a lower learning rate, train.grad_clip, train.amp=none (FMN: fmn.mask_max_logit)"


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


def set_loader_epoch(loader, value: int) -> None:
    """Tell the sampler (and a collate function that augments, if it has ``set_epoch``) the epoch."""
    for obj in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None), loader):
        if obj is not None and hasattr(obj, "set_epoch"):
            obj.set_epoch(value)
            break
    collate = getattr(loader, "collate_fn", None)
    if collate is not None and hasattr(collate, "set_epoch"):
        collate.set_epoch(value)


def make_optimizer(t: dict, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """``train.optimizer``: SGD with ``momentum`` / ``nesterov`` (the paper's), or Adam; both with
    ``weight_decay`` (L2, as the papers' code adds it)."""
    if t["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=t["weight_decay"])
    return torch.optim.SGD(params, lr=lr, momentum=t["momentum"], weight_decay=t["weight_decay"],
                           nesterov=t["nesterov"] and t["momentum"] > 0)


class Trainer:
    """Runs ``model.training_stages(cfg)`` on batches of ``train_loader`` (dicts with ``img`` and
    ``pid``, and whatever else the model's stages read, e.g. ``parts``)."""

    def __init__(self, cfg: dict, model: nn.Module, train_loader: Iterable, device: torch.device, out_dir: str,
                 dist_info: fdist.DistInfo | None = None, log: Callable[[str], None] | None = print,
                 validator: Callable[[nn.Module], dict] | None = None):
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
        self.stages: list[Stage] = model.training_stages(cfg)
        self.health = HealthCheck(self.tcfg, getattr(model, "num_classes", 2))
        self.validator = validator
        self.best_checkpoint = os.path.join(out_dir, "best.pt")
        self.ddp_model: nn.Module = self.model
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler = None
        self.params: list[nn.Parameter] = []
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
        except ImportError:
            self.log("tensorboard is not installed; scalars go to train_log.jsonl only")
            self.tcfg = dict(self.tcfg, tensorboard=False)
            return
        self.tb = SummaryWriter(os.path.join(self.out_dir, "tb"))

    def _scalars(self, tag: str, stats: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in stats.items():
                self.tb.add_scalar(f"{tag}/{k}", v, step)

    def _epochs(self, stage: Stage) -> int:
        return self.tcfg[stage.schedule]["epochs"]

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

    def _check_finite_weights(self, stage: Stage, epoch: int) -> None:
        """Refuse to checkpoint non-finite weights."""
        bad = non_finite_weights(unwrap(self.model), self.device, self.dist.enabled)
        if bad:
            raise NonFiniteLossError(
                f"{stage.title} epoch {epoch + 1}: weights are not finite after the epoch ({', '.join(bad[:3])}); "
                f"training stopped without saving them. {stop_advice(self.last_checkpoint, TIPS)}")

    def save(self, stage: int, epoch: int, path: str | None = None) -> None:
        if self.dist.is_main:
            save_checkpoint(self._checkpoint(stage, epoch), path or self.last_checkpoint)
        fdist.barrier()

    def _resume(self) -> tuple[int, int, dict | None]:
        """(stage index, epochs done in it, checkpoint) from ``last.pt``, or (first stage, 0, None)."""
        if not os.path.exists(self.last_checkpoint):
            return self.stages[0].index, 0, None
        state = load_checkpoint(self.last_checkpoint, map_location="cpu")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.last_checkpoint}: not an fmn training checkpoint")
        from fmn.config import upgrade_config

        model = unwrap(self.model)
        saved_cfg = upgrade_config(state["config"]) if isinstance(state.get("config"), dict) else {}
        saved = architecture(saved_cfg, state.get("num_classes"))
        now = architecture(self.cfg, getattr(model, "num_classes", None))
        load_model_weights(model, state["model"], self.last_checkpoint, saved, now, settings_must_match=True)
        self.history = list(state.get("history", []))
        stage, epoch = int(state["stage"]), int(state["epoch"])
        self.log(f"resuming from {self.last_checkpoint}: stage {stage}, {epoch} epoch(s) done")
        return stage, epoch, state

    def stage(self, index: int) -> Stage:
        """The stage numbered ``index``."""
        for stage in self.stages:
            if stage.index == index:
                return stage
        raise ValueError(f"the model has no stage {index}; its stages: {[s.index for s in self.stages]}")

    # ------------------------------------------------------------------ steps
    def train_step(self, stage: Stage | int, batch: dict[str, Any]) -> dict[str, float]:
        stage = self.stage(stage) if isinstance(stage, int) else stage
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        batch["pid"] = batch["pid"].long()
        img = batch["img"]
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        amp = (torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
               if self.amp_dtype is not None else nullcontext())
        with amp:
            out = stage.forward(self.ddp_model, img, batch)
            loss, stats = stage.loss(out, batch)
        if not loss_is_finite(loss, self.device, self.dist.enabled):
            raise NonFiniteLossError(
                f"{stage.title}: the loss is {loss.item()} (not finite); training stopped before this step was "
                f"applied. {stop_advice(self.last_checkpoint, TIPS)}")
        if stage.embedding is not None and self.health.mode != "off":
            stats["spread"] = relative_spread(stage.embedding(out))
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.tcfg["grad_clip"]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.optimizer.step()
        return {k: float(v) for k, v in stats.items()}

    def _train_epoch(self, stage: Stage, epoch: int, kill: tuple[int, int, int] | None) -> dict[str, float]:
        from tqdm import tqdm

        stage.train_mode(self.ddp_model)
        meter = _Meter()
        max_steps = self.tcfg["max_steps_per_epoch"]
        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        if max_steps is not None and total is not None:
            total = min(total, max_steps)
        show = show_progress(self.tcfg["progress"]) and self.dist.is_main
        bar = tqdm(total=total, desc=f"{stage.title} epoch {epoch + 1}/{self._epochs(stage)}",
                   disable=not show, dynamic_ncols=True, leave=False)
        images, t0 = 0, time.perf_counter()
        for step, batch in enumerate(self.loader):
            if max_steps is not None and step >= max_steps:
                break
            stats = self.train_step(stage, batch)
            meter.update(stats)
            images += int(batch["img"].shape[0]) * self.dist.world_size
            ips = images / max(1e-9, time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats.get('acc', float('nan')):.3f}",
                            img_s=f"{ips:.1f}")
            if self.tb is not None and step % self.tcfg["log_every"] == 0:
                self._scalars(f"stage{stage.index}/step", dict(stats, images_per_s=ips),
                              self._global_step(stage, epoch) + step)
            if kill is not None and kill == (stage.index, epoch, step):
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        elapsed = time.perf_counter() - t0
        means = meter.means()
        means["images_per_s"] = images / max(1e-9, elapsed)
        means["seconds"] = elapsed
        return means

    def _global_step(self, stage: Stage, epoch: int) -> int:
        steps = self.tcfg["max_steps_per_epoch"] or (len(self.loader) if hasattr(self.loader, "__len__") else 1000)
        before = sum(self._epochs(s) for s in self.stages if s.index < stage.index)
        return (before + epoch) * steps

    # -------------------------------------------------------------------- fit
    def _start_stage(self, stage: Stage | int, fresh: bool) -> None:
        stage = self.stage(stage) if isinstance(stage, int) else stage
        stage.begin(fresh)
        self.ddp_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(self.model, device_ids=ids, find_unused_parameters=stage.find_unused_parameters)
        self.params = stage.parameters()
        self.optimizer = make_optimizer(self.tcfg, self.params, self.tcfg[stage.schedule]["lr"])
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self.health.start_stage()

    def fit(self, resume: bool = True) -> dict[str, Any]:
        """Train every stage (resuming from ``<out>/last.pt`` if present); returns a summary.
        The TensorBoard event file is closed at the end, also when training stops on an error."""
        try:
            return self._fit(resume)
        finally:
            if self.tb is not None:
                self.tb.close()
                self.tb = None

    def _fit(self, resume: bool) -> dict[str, Any]:
        self.history = []
        if self.dist.is_main:   # the temporary checkpoints a killed run left behind
            for name in ("last.pt", "model.pt"):
                for path in remove_stale_temporaries(self.out_dir, name):
                    self.log(f"removed {path}, a temporary file of a run that was stopped while it wrote {name}")
        stage_done, epoch_done, state = self._resume() if resume else (self.stages[0].index, 0, None)
        self._write_log()
        self._open_tensorboard()
        kill, t_start = _kill_point(), time.perf_counter()
        for stage in self.stages:
            if stage.index < stage_done:
                continue
            first = epoch_done if stage.index == stage_done else 0
            if first >= self._epochs(stage) and stage.index == stage_done and state is not None:
                continue
            self._start_stage(stage.index, fresh=(first == 0))
            if state is not None and stage.index == stage_done and first > 0:
                if state.get("optimizer"):
                    self.optimizer.load_state_dict(state["optimizer"])
                if self.scaler is not None and state.get("scaler"):
                    self.scaler.load_state_dict(state["scaler"])
            for e in range(first, self._epochs(stage)):
                self._run_epoch(stage, e, kill)
            state = None
        final = self._final_stage()
        final.begin(fresh=False)
        unwrap(self.model).eval()
        if hasattr(unwrap(self.model), "set_trained_stage"):
            unwrap(self.model).set_trained_stage(final.index)
        if self.tcfg["select_best"]:
            self._load_best(final)
        self.save(final.index, self._epochs(final), self.final_checkpoint)
        return {"checkpoint": self.final_checkpoint, "seconds": time.perf_counter() - t_start,
                "history": self.history, "stage": final.index}

    def _final_stage(self) -> Stage:
        return [s for s in self.stages if self._epochs(s) > 0][-1]

    def _validate(self, stage: Stage, e: int) -> dict[str, float]:
        """Validation rank-1 / mAP every ``train.val_every`` epochs and at the stage's last (rank 0)."""
        if self.validator is None or not self.dist.is_main:
            return {}
        if (e + 1) % self.tcfg["val_every"] and e + 1 != self._epochs(stage):
            return {}
        model = unwrap(self.model)
        if hasattr(model, "set_trained_stage"):
            model.set_trained_stage(stage.index)     # FMN in stage 1: the GRN descriptor
        result = self.validator(model)
        stage.train_mode(self.ddp_model)
        self.log(f"{stage.title} epoch {e + 1}  validation rank-1 {result['val_rank1']:.1f}  mAP {result['val_mAP']:.1f}")
        return result

    def _best_so_far(self, stage: Stage) -> float:
        seen = [h["val_mAP"] for h in self.history[:-1] if h["stage"] == stage.index and "val_mAP" in h]
        return max(seen, default=float("-inf"))

    def _load_best(self, final: Stage) -> None:
        """``train.select_best``: the final stage's weights of its best validation mAP."""
        records = [h for h in self.history if h["stage"] == final.index and "val_mAP" in h]
        if not records or not os.path.exists(self.best_checkpoint):
            return
        best = max(records, key=lambda h: h["val_mAP"])
        state = load_checkpoint(self.best_checkpoint, map_location="cpu")
        unwrap(self.model).load_state_dict(state["model"])
        self.log(f"model.pt: the weights of {final.title} epoch {best['epoch']} (validation mAP {best['val_mAP']:.1f})")

    def _run_epoch(self, stage: Stage, e: int, kill) -> None:
        sc = self.tcfg[stage.schedule]
        lr = lr_at(e, sc["lr"], sc["milestones"], sc["gamma"], self.tcfg["warmup_epochs"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        seed = epoch_seed(self.tcfg["seed"], stage.index, e)
        seed_everything(seed + self.dist.rank)
        set_loader_epoch(self.loader, seed)
        if hasattr(unwrap(self.model), "set_epoch"):
            unwrap(self.model).set_epoch(e)
        stats = {k: round(v, 6) for k, v in self._train_epoch(stage, e, kill).items()}
        self._check_finite_weights(stage, e)
        stats.update(self._validate(stage, e))
        record = {"stage": stage.index, "epoch": e + 1, "lr": lr, **stats}
        self.history.append(record)
        self.log(f"{stage.title} epoch {e + 1}/{self._epochs(stage)}  lr {lr:.4g}  "
                 f"loss {stats.get('loss', float('nan')):.4f}  acc {stats.get('acc', float('nan')):.3f}  "
                 f"{stats['images_per_s']:.1f} img/s  {stats['seconds']:.1f}s")
        self._scalars(f"stage{stage.index}/epoch", dict(stats, lr=lr), e + 1)
        if self.dist.is_main:
            with open(self.log_file, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        self.save(stage.index, e + 1)
        if stage is self._final_stage() and stats.get("val_mAP", float("-inf")) > self._best_so_far(stage):
            self.save(stage.index, e + 1, self.best_checkpoint)
        self._check_health(stage, e, stats)

    def _check_health(self, stage: Stage, e: int, stats: dict[str, float]) -> None:
        """Stop (or warn once per stage) when the epoch shows a collapsed or non-learning run."""
        problem = self.health.verdict(e, stats)
        if self.dist.enabled and fdist.any_true(problem is not None, self.device) and problem is None:
            problem = "the health checks failed on another rank"   # every rank stops together
        if problem is None:
            return
        message = self.health.message(stage.title, e, problem, self.last_checkpoint)
        if self.health.mode == "stop":
            raise TrainingHealthError(message)
        if stage.index not in self.health.warned:
            self.health.warned.add(stage.index)
            self.log(f"warning: {message}")
