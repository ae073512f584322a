"""Benchmark of descriptor extraction: PyTorch eager against the exported artefacts.

On the CPU, for a checkpoint (default: the demo model, runs/demo/model.pt), the descriptor of one
batch of preprocessed images (``--batch`` rows at the trained size: the first images of
``--images``, or random values without it) by

  eager        fmn.extract_features(model, batch) (the fused op on its C++ kernel)
  torch.export the .pt2 program, ``torch.export.load(...).module()`` (the fused op kept)
  onnxruntime  the ONNX model (the fused op as standard operators), CPUExecutionProvider

as images/s from the median and from the fastest of ``--repeats`` timed calls per method, taken
round robin after one warm-up call of each, on ``--threads`` threads for torch and onnxruntime
alike (default: torch's). On a machine shared with other work a call can take several times
its undisturbed time; the fastest call is then the better estimate of the method's own speed.
With ``--images DIR`` the table adds ``fmn.extract_features`` on that folder's files (decoding
and resizing included). Each method's largest difference from eager on the batch is checked,
and the size of each artefact reported next to the checkpoint's.

    python bench/extract.py [--checkpoint runs/demo/model.pt] [--batch 64] [--repeats 15]
                            [--images DIR] [--out-dir DIR] [--csv results.csv]
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import tempfile
import time

import torch

import fmn
from fmn.engine import export as fexport
from fmn.engine.extract import read_image_list


def exported(checkpoint: str, folder: str) -> dict:
    """{"onnx": path, "pt2": path} written by fmn export, and the seconds it took."""
    paths = {"onnx": os.path.join(folder, "model.onnx"), "pt2": os.path.join(folder, "model.pt2")}
    t0 = time.perf_counter()
    fexport.run_export(checkpoint, **paths, force=True, log=lambda line: print("  " + line))
    return {**paths, "seconds": time.perf_counter() - t0}


def runners(model, paths: dict, threads: int) -> dict:
    """method -> callable(batch) -> (n, D) float32 tensor."""
    import onnxruntime as ort

    program = torch.export.load(paths["pt2"]).module()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no spin-waiting after a run: its threads would take the cores from the next method's call
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(paths["onnx"], options, providers=["CPUExecutionProvider"])

    def run_pt2(x):
        with torch.no_grad():
            return program(x)

    return {"eager": lambda x: fmn.extract_features(model, x, batch_size=len(x), progress=False),
            "torch.export": run_pt2,
            "onnxruntime": lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])}


def round_robin(methods: dict, arg, repeats: int) -> dict:
    """method -> seconds of each timed call (``repeats`` calls, round robin after one warm-up
    call each)."""
    for fn in methods.values():
        fn(arg)
    times = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(arg)
            times[name].append(time.perf_counter() - t0)
    return times


def row(method: str, images: int, times: list[float], eager: dict | None, max_diff: float | None) -> dict:
    best, median = images / min(times), images / statistics.median(times)
    return {"method": method, "images_per_s": median, "best_images_per_s": best,
            "ratio": median / eager["images_per_s"] if eager else 1.0,
            "best_ratio": best / eager["best_images_per_s"] if eager else 1.0, "max_diff": max_diff}


def table(rows: list[dict]) -> str:
    head = ("method", "images/s median", "images/s best", "x eager (median)", "x eager (best)", "max |diff| vs eager")
    body = [(r["method"], f"{r['images_per_s']:.1f}", f"{r['best_images_per_s']:.1f}", f"{r['ratio']:.2f}",
             f"{r['best_ratio']:.2f}", "-" if r["max_diff"] is None else f"{r['max_diff']:.1e}") for r in rows]
    widths = [max(len(x[i]) for x in body + [head]) for i in range(len(head))]
    fmt = lambda row: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in body])


def input_batch(model, args) -> torch.Tensor:
    """The first ``--batch`` images of ``--images`` (repeated if fewer), preprocessed as
    fmn.extract_features does; random values without ``--images``."""
    from fmn.data.transforms import load_resized, to_float_normalized

    height, width = fexport.input_size(model)
    if not args.images:
        return fexport.example_batch(height, width, batch=args.batch, seed=1)
    files = read_image_list(args.images)
    files = (files * (args.batch // len(files) + 1))[:args.batch]
    return to_float_normalized(torch.stack([load_resized(p, height, width) for p in files]))


def measure(model, paths: dict, args) -> list[dict]:
    x = input_batch(model, args)
    methods = runners(model, paths, args.threads)
    times = round_robin(methods, x, args.repeats)
    want = methods["eager"](x)
    rows = []
    for name, fn in methods.items():
        rows.append(row(name, args.batch, times[name], rows[0] if rows else None,
                        float((fn(x) - want).abs().max())))
    if args.images:
        files = read_image_list(args.images)
        run = lambda _: fmn.extract_features(model, files, batch_size=args.batch, progress=False)
        t = round_robin({"files": run}, None, max(1, args.repeats // 3))["files"]
        rows.append(row(f"eager from {len(files)} files", len(files), t, rows[0], None))
    return rows


def sizes(checkpoint: str, paths: dict) -> str:
    mib = lambda p: os.path.getsize(p) / 2**20
    return (f"artefacts: checkpoint {mib(checkpoint):.1f} MiB, model.onnx {mib(paths['onnx']):.1f} MiB, "
            f"model.pt2 {mib(paths['pt2']):.1f} MiB")


def append_csv(path: str, rows: list[dict], info: dict) -> None:
    fields = list(info) + ["method", "images_per_s", "best_images_per_s", "ratio", "best_ratio", "max_diff"]
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({**info, **r})


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/demo/model.pt", help="a model.pt (default: the demo's)")
    ap.add_argument("--batch", type=int, default=64, help="images per call (default 64)")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per method (default 15)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for torch and onnxruntime")
    ap.add_argument("--images", help="also time fmn.extract_features on this folder's (or list's) image files")
    ap.add_argument("--out-dir", help="write model.onnx and model.pt2 here (default: a temporary folder)")
    ap.add_argument("--csv", help="append the rows to this CSV file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.out_dir or tmp
        os.makedirs(folder, exist_ok=True)
        model = fmn.load_model(args.checkpoint, device="cpu")
        height, width = fexport.input_size(model)
        cfg = model.fmn_config
        info = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                "threads": args.threads, "dtype": "float32", "batch": args.batch,
                "input": f"3x{height}x{width}", "model": f"{cfg['model']['name']} {cfg['model']['backbone']}",
                "flip": cfg["eval"]["flip"], "torch": torch.__version__, "onnxruntime": _ort_version()}
        print("exporting " + args.checkpoint)
        paths = exported(args.checkpoint, folder)
        rows = measure(model, paths, args)
        print(", ".join(f"{k} {v}" for k, v in info.items()))
        print(f"descriptor extraction: {args.repeats} calls per method after a warm-up, round robin")
        print(table(rows))
        print(sizes(args.checkpoint, paths) + f" (export took {paths['seconds']:.0f}s)")
        if args.csv:
            append_csv(args.csv, rows, info)


if __name__ == "__main__":
    main()
