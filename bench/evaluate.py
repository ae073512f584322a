"""Benchmark of fmn.metrics.evaluate (CMC + mAP) at Market-1501 size.

Problem: 3,368 queries x 15,913 gallery (750 test identities over 6 cameras, 2,798 distractors
with identity 0; other gallery sizes keep those proportions), float32 distances where same-identity pairs are pulled closer so the ranking
looks like a trained model's. Reports the median wall time of ``evaluate`` over ``--repeats``
runs after one warm-up, per device (CPU; CUDA when present, timed with CUDA events), the CPU
time the process used for it (all threads; on a shared machine it shows the work apart from
waiting for a core), and as a
baseline the plain per-query loop (``fmn.metrics.evaluate_reference``, numpy argsort) timed the
same way (median after warm-up) on ``--ref-queries`` queries and scaled to all queries. The
results of both are checked to agree on that subset.

    python bench/evaluate.py [--repeats 5] [--csv results.csv] [--queries 3368 --gallery 15913]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

from fmn.metrics import evaluate, evaluate_reference


def market_like(nq: int, ng: int, num_ids: int | None = None, num_cams: int = 6, distractors: int | None = None,
                seed: int = 0):
    """Market-1501's test split scaled to ``ng`` gallery images: 750 identities and 2,798
    distractors at 15,913."""
    if num_ids is None:
        num_ids = max(1, round(750 * ng / 15913))
    if distractors is None:
        distractors = round(2798 * ng / 15913)
    if not 0 <= distractors < ng:
        raise ValueError(f"market_like: {distractors} distractors do not fit a gallery of {ng}")
    g = torch.Generator().manual_seed(seed)
    n_id_imgs = ng - distractors
    g_pids = torch.cat([torch.arange(1, num_ids + 1).repeat_interleave(n_id_imgs // num_ids + 1)[:n_id_imgs],
                        torch.zeros(distractors, dtype=torch.long)])
    g_pids = g_pids[torch.randperm(ng, generator=g)]
    g_cams = torch.randint(0, num_cams, (ng,), generator=g)
    q_pids = torch.arange(1, num_ids + 1).repeat(nq // num_ids + 1)[:nq]
    q_cams = torch.randint(0, num_cams, (nq,), generator=g)
    dist = torch.rand(nq, ng, generator=g)
    same = q_pids[:, None] == g_pids[None, :]
    dist -= 0.4 * same * torch.rand(nq, ng, generator=g)
    return dist, q_pids, g_pids, q_cams, g_cams


def time_cpu(fn, repeats: int):
    """Median wall time and median process CPU time (all threads) of ``fn``."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def time_cuda(fn, repeats: int):
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1000)
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=15913)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-queries", type=int, default=200, help="queries the per-query baseline is timed on")
    ap.add_argument("--csv", default=None, help="append the rows to this CSV file")
    args = ap.parse_args(argv)
    for flag in ("queries", "gallery", "repeats", "ref_queries"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")

    dist, qp, gp, qc, gc = market_like(args.queries, args.gallery)
    nq, ng = dist.shape
    rows = []

    # Baseline: the per-query loop on a subset, scaled to all queries; also the agreement check.
    sub = slice(0, min(args.ref_queries, nq))
    ref_args = (dist[sub], qp[sub], gp, qc[sub], gc)
    t_ref = time_cpu(lambda: evaluate_reference(*ref_args, max_rank=50), args.repeats)[0] * nq / (sub.stop - sub.start)
    ref = evaluate_reference(*ref_args, max_rank=50)
    mine = evaluate(*ref_args, max_rank=50)
    if not (torch.allclose(ref[0], mine[0]) and abs(ref[1] - mine[1]) < 1e-9 and ref[2] == mine[2]):
        raise SystemExit(f"bench/evaluate.py: evaluate and evaluate_reference disagree on the first {sub.stop} "
                         f"queries: rank-1 {float(mine[0][0])} vs {float(ref[0][0])}, mAP {mine[1]} vs {ref[1]}, "
                         f"valid {mine[2]} vs {ref[2]}")

    fn = lambda: evaluate(dist, qp, gp, qc, gc, max_rank=50)
    t_cpu, cpu_s = time_cpu(fn, args.repeats)
    cmc, mAP, nv = fn()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows.append(dict(device=f"cpu ({torch.get_num_threads()} threads, load {load:.1f})", dtype="float32",
                     shape=f"{nq}x{ng}", median_ms=1000 * t_cpu, cpu_ms=1000 * cpu_s, baseline_ms=1000 * t_ref,
                     speedup=t_ref / t_cpu, rank1=float(cmc[0]), mAP=mAP, valid=nv))
    if torch.cuda.is_available():
        d_gpu = [x.cuda() for x in (dist, qp, gp, qc, gc)]
        fn_gpu = lambda: evaluate(*d_gpu, max_rank=50)
        t_gpu = time_cuda(fn_gpu, args.repeats)
        cmc_g, mAP_g, nv_g = fn_gpu()
        if not (torch.allclose(cmc, cmc_g) and abs(mAP - mAP_g) < 1e-9 and nv == nv_g):
            raise SystemExit(f"bench/evaluate.py: CPU and GPU results disagree: rank-1 {float(cmc[0])} vs "
                             f"{float(cmc_g[0])}, mAP {mAP} vs {mAP_g}, valid {nv} vs {nv_g}")
        rows.append(dict(device=torch.cuda.get_device_name(), dtype="float32", shape=f"{nq}x{ng}",
                         median_ms=1000 * t_gpu, cpu_ms=float("nan"), baseline_ms=1000 * t_ref, speedup=t_ref / t_gpu,
                         rank1=float(cmc_g[0]), mAP=mAP_g, valid=nv_g))

    head = ["device", "dtype", "shape", "median_ms", "cpu_ms", "baseline_ms", "speedup", "rank1", "mAP", "valid"]
    fmt = {"median_ms": "{:.1f}", "cpu_ms": "{:.0f}", "baseline_ms": "{:.0f}", "speedup": "{:.1f}x", "rank1": "{:.4f}", "mAP": "{:.4f}"}
    table = [[fmt.get(k, "{}").format(r[k]) for k in head] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    print("evaluate (CMC + mAP, max_rank=50); baseline = per-query numpy loop, scaled from "
          f"{sub.stop} queries; medians of {args.repeats} after a warm-up")
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in table:
        print(" | ".join(x.ljust(w) for x, w in zip(r, widths)))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=head)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow(r)


if __name__ == "__main__":
    main()
