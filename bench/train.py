"""Training-step throughput of FMN: a stage-1 step (GRN) vs a stage-2 step (frozen GRN forward +
MN + LAN forward/backward), in images/s, and the estimated time of the whole two-stage schedule.

    python bench/train.py                       # CPU-sized defaults (ResNet-18/2, 128x64, batch 16)
    python bench/train.py --backbone resnet50 --height 256 --width 128 --batch 64 --amp bf16   # GPU
    python bench/train.py --csv bench_train.csv # append the rows to a CSV

Target (issue 5, H200, bf16, ResNet-50, 256x128, batch 64): stage-2 step <= 1.4x a stage-1 step,
the whole schedule (30 + 45 epochs over 12,936 images) <= 20 min. On CPU only the ratio means much.
Steps use synthetic tensors (no data loading); timings are medians after warm-up, with CUDA
synchronisation on GPU.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fmn.config import load_config  # noqa: E402
from fmn.engine.trainer import Trainer  # noqa: E402
from fmn.models import build_model_from_config  # noqa: E402


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50" if cuda else "resnet18")
    p.add_argument("--base-width", type=int, default=64 if cuda else 32)
    p.add_argument("--local-layer", default="pool1")
    p.add_argument("--height", type=int, default=256 if cuda else 128)
    p.add_argument("--width", type=int, default=128 if cuda else 64)
    p.add_argument("--batch", type=int, default=64 if cuda else 16)
    p.add_argument("--classes", type=int, default=751)
    p.add_argument("--amp", default="bf16" if cuda else "none", choices=["none", "bf16", "fp16"])
    p.add_argument("--channels-last", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--backend", default=None, help="FusedFeatureMask backend (auto, torch, cpu, cuda, triton)")
    p.add_argument("--warmup", type=int, default=10 if cuda else 2)
    p.add_argument("--iters", type=int, default=50 if cuda else 5)
    p.add_argument("--train-images", type=int, default=12936, help="images per epoch for the schedule estimate")
    p.add_argument("--epochs1", type=int, default=30)
    p.add_argument("--epochs2", type=int, default=45)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--mask-max-logit", type=float, default=10.0,
                   help="clamp of the mask logits (random data at lr 0.1 grows them without bound; "
                   "the clamp keeps the steps finite and does not change their cost)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--csv", help="append results to this CSV file")
    a = p.parse_args(argv)
    if a.iters < 1 or a.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    try:
        device = torch.device(a.device)
    except RuntimeError as e:
        p.error(f"--device {a.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device} but CUDA is not available")
    from fmn_kernels import backend as fb

    try:
        a.mask_backend = fb.resolve("spatial_mask_mul", a.backend, device)
    except ValueError as e:
        p.error(f"--backend: {e}")
    requested = fb.requested(a.backend)
    if requested != "auto" and a.mask_backend != requested:
        p.error(f"--backend {requested} is not available on {device.type} here (it would run as {a.mask_backend})")
    return a


def time_steps(trainer: Trainer, stage: int, batch: dict, warmup: int, iters: int, device: torch.device):
    trainer._start_stage(stage, fresh=True)
    trainer.model.train()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        trainer.train_step(stage, batch)
    sync()
    times, cpu = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train_step(stage, batch)
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


@torch.no_grad()
def settle_grn_batchnorm(model, img, passes: int = 3) -> None:
    """Give GRN's BN layers the running statistics of the benchmark batch, as a trained GRN would
    have; with the init statistics (mean 0, var 1) a random deep GRN in eval mode gives huge
    features and the stage-2 mask overflows."""
    bns = [m for m in model.grn.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    was = model.grn.training
    model.grn.train()
    for _ in range(passes):
        model.grn_features(img)
    model.grn.train(was)
    for bn in bns:
        bn.momentum = 0.1


def main(argv=None):
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cl = {"auto": "auto", "true": True, "false": False}[a.channels_last]
    cfg = load_config(None, [
        f"model.backbone={a.backbone}", f"model.base_width={a.base_width}", f"fmn.local_layer={a.local_layer}",
        f"data.height={a.height}", f"data.width={a.width}", f"data.batch_size={a.batch}",
        f"train.amp={a.amp}", f"train.channels_last={cl}", f"train.device={a.device}",
        "train.progress=false", "train.tensorboard=false", "output.dir=/tmp/fmn-bench",
        f"fmn.mask_max_logit={a.mask_max_logit}",
    ] + ([f"model.backend={a.backend}"] if a.backend else []))
    torch.manual_seed(0)
    model = build_model_from_config(cfg, a.classes)
    trainer = Trainer(cfg, model, [], device, "/tmp/fmn-bench", log=None)
    batch = {
        "img": torch.randn(a.batch, 3, a.height, a.width, device=device),
        "pid": torch.arange(a.batch, device=device) // 4 % a.classes,
    }
    t1, c1 = time_steps(trainer, 1, batch, a.warmup, a.iters, device)
    settle_grn_batchnorm(model, batch["img"])
    t2, c2 = time_steps(trainer, 2, batch, a.warmup, a.iters, device)
    ips1, ips2 = a.batch / t1, a.batch / t2
    schedule = a.train_images * (a.epochs1 / ips1 + a.epochs2 / ips2)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = [
        ("stage 1 step (GRN)", t1 * 1e3, c1 * 1e3, ips1),
        ("stage 2 step (MN + LAN)", t2 * 1e3, c2 * 1e3, ips2),
    ]
    print(f"device: {dev_name}   torch {torch.__version__}   amp: {a.amp}   channels_last: {trainer.channels_last}")
    print(f"model: FMN {a.backbone} (base width {a.base_width}), local layer {a.local_layer}, "
          f"input {a.height}x{a.width}, batch {a.batch}, {a.classes} classes, "
          f"mask backend: {a.mask_backend} (requested {model.mn.backend or os.environ.get('FMN_BACKEND', 'auto')})")
    print(f"{'step':<26}{'median ms':>12}{'cpu ms':>10}{'images/s':>12}")
    for name, ms, cms, ips in rows:
        print(f"{name:<26}{ms:>12.1f}{cms:>10.1f}{ips:>12.1f}")
    print(f"stage-2 / stage-1 step time: {t2 / t1:.2f}x   (target <= 1.4x on an H200 with bf16)")
    print(f"estimated schedule ({a.epochs1} + {a.epochs2} epochs x {a.train_images} images, no data loading): "
          f"{schedule / 60:.1f} min   (target <= 20 min on an H200)")
    if a.csv:
        new = not os.path.exists(a.csv)
        with open(a.csv, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(["device", "backbone", "base_width", "height", "width", "batch", "amp",
                            "channels_last", "stage1_ms", "stage2_ms", "ratio", "stage1_img_s", "stage2_img_s",
                            "schedule_min"])
            w.writerow([dev_name, a.backbone, a.base_width, a.height, a.width, a.batch, a.amp,
                        trainer.channels_last, f"{t1 * 1e3:.2f}", f"{t2 * 1e3:.2f}", f"{t2 / t1:.3f}",
                        f"{ips1:.1f}", f"{ips2:.1f}", f"{schedule / 60:.2f}"])
    return {"stage1_s": t1, "stage2_s": t2, "ratio": t2 / t1, "schedule_min": schedule / 60}


if __name__ == "__main__":
    main()
