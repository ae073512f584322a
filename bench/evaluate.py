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

With ``--features DIM`` it compares, instead, the two ways of evaluating features of DIM
dimensions: the dense path ``evaluate(euclidean_distance(qf, gf))`` (a (q, g) matrix) and
``evaluate_from_features(qf, gf)`` (one block of query rows at a time). Features are
Market-like: unit vectors around one centre per identity. Reports the median wall and CPU time
of each (round robin, after a warm-up of each), their peak memory and checks that both give the
same numbers bit for bit. Peak memory: on CPU the largest total of live torch allocations during
a separate run with one thread (torch's profiler sees the calling thread only; the ranking's
thread pool adds one ranking chunk per extra thread), on CUDA ``torch.cuda.max_memory_allocated``
above what was allocated before the call.

    python bench/evaluate.py --features 2048 [--chunk-size ROWS] [--queries 3368 --gallery 15913]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

from fmn.metrics import euclidean_distance, evaluate, evaluate_from_features, evaluate_reference


def market_ids(nq: int, ng: int, num_ids: int | None = None, num_cams: int = 6, distractors: int | None = None,
               g: torch.Generator | None = None):
    """Identities and cameras of Market-1501's test split scaled to ``ng`` gallery images: 750
    identities and 2,798 distractors (identity 0) at 15,913. Returns q_pids, g_pids, q_cams, g_cams."""
    if num_ids is None:
        num_ids = max(1, round(750 * ng / 15913))
    if distractors is None:
        distractors = round(2798 * ng / 15913)
    if not 0 <= distractors < ng:
        raise ValueError(f"market_like: {distractors} distractors do not fit a gallery of {ng}")
    g = torch.Generator().manual_seed(0) if g is None else g
    n_id_imgs = ng - distractors
    g_pids = torch.cat([torch.arange(1, num_ids + 1).repeat_interleave(n_id_imgs // num_ids + 1)[:n_id_imgs],
                        torch.zeros(distractors, dtype=torch.long)])
    g_pids = g_pids[torch.randperm(ng, generator=g)]
    g_cams = torch.randint(0, num_cams, (ng,), generator=g)
    q_pids = torch.arange(1, num_ids + 1).repeat(nq // num_ids + 1)[:nq]
    q_cams = torch.randint(0, num_cams, (nq,), generator=g)
    return q_pids, g_pids, q_cams, g_cams


def market_like(nq: int, ng: int, num_ids: int | None = None, num_cams: int = 6, distractors: int | None = None,
                seed: int = 0):
    """Market-1501's test split scaled to ``ng`` gallery images: 750 identities and 2,798
    distractors at 15,913; distances of same-identity pairs pulled closer."""
    g = torch.Generator().manual_seed(seed)
    q_pids, g_pids, q_cams, g_cams = market_ids(nq, ng, num_ids, num_cams, distractors, g)
    dist = torch.rand(nq, ng, generator=g)
    same = q_pids[:, None] == g_pids[None, :]
    dist -= 0.4 * same * torch.rand(nq, ng, generator=g)
    return dist, q_pids, g_pids, q_cams, g_cams


def market_like_features(nq: int, ng: int, dim: int, seed: int = 0):
    """Unit-norm (q, dim) and (g, dim) float32 features with market_ids' identities: one random
    centre per identity plus noise (distractors: noise only), scaled so that the retrieval is
    neither trivial nor hopeless at any ``dim``. Returns qf, gf, q_pids, g_pids, q_cams, g_cams."""
    g = torch.Generator().manual_seed(seed)
    q_pids, g_pids, q_cams, g_cams = market_ids(nq, ng, g=g)
    centres = torch.randn(int(max(q_pids.max(), g_pids.max())) + 1, dim, generator=g) * (3.0 / dim ** 0.5) ** 0.5
    centres[0] = 0

    def feats(pids):
        f = centres[pids] + torch.randn(pids.numel(), dim, generator=g)
        return f / f.norm(dim=1, keepdim=True)

    return feats(q_pids), feats(g_pids), q_pids, g_pids, q_cams, g_cams


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


def time_round_robin(fns, repeats: int):
    """Median wall and process CPU time of each function: one warm-up of each, then ``repeats``
    rounds that run each once (on a shared machine, drifting load reaches all of them alike)."""
    for fn in fns:
        fn()
    wall, cpu = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[i].append(time.perf_counter() - t)
            cpu[i].append(time.process_time() - c)
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def peak_cpu_bytes(fn) -> int:
    """Largest total of live torch CPU allocations made while ``fn`` runs, on one thread."""
    from torch.profiler import ProfilerActivity, profile

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        torch.set_num_threads(prev)
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def peak_cuda_bytes(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


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
    ap.add_argument("--features", type=int, default=None, metavar="DIM",
                    help="compare evaluate_from_features with evaluate(euclidean_distance(...)) on DIM-dimensional "
                         "features instead")
    ap.add_argument("--chunk-size", type=int, default=None, help="evaluate_from_features' chunk_size (with --features)")
    args = ap.parse_args(argv)
    for flag in ("queries", "gallery", "repeats", "ref_queries", "features", "chunk_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.chunk_size is not None and args.features is None:
        ap.error("--chunk-size goes with --features")
    if args.features is not None:
        return features_main(args)

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
    print_table("evaluate (CMC + mAP, max_rank=50); baseline = per-query numpy loop, scaled from "
                f"{sub.stop} queries; medians of {args.repeats} after a warm-up", head, fmt, rows)
    if args.csv:
        append_csv(args.csv, head, rows)


def features_main(args):
    """--features: the dense path against evaluate_from_features on the same features."""
    qf, gf, qp, gp, qc, gc = market_like_features(args.queries, args.gallery, args.features)
    nq, ng = qp.numel(), gp.numel()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev in devices:
        data = [x.to(dev) for x in (qf, gf, qp, gp, qc, gc)]
        dense = lambda: evaluate(euclidean_distance(data[0], data[1]), *data[2:], max_rank=50)
        chunked = lambda: evaluate_from_features(*data, max_rank=50, chunk_size=args.chunk_size)
        if dev == "cuda":
            times = [(time_cuda(fn, args.repeats), float("nan")) for fn in (dense, chunked)]
            peaks = [peak_cuda_bytes(fn) for fn in (dense, chunked)]
            name = torch.cuda.get_device_name()
        else:
            times = time_round_robin([dense, chunked], args.repeats)
            peaks = [peak_cpu_bytes(fn) for fn in (dense, chunked)]
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            name = f"cpu ({torch.get_num_threads()} threads, load {load:.1f})"
        res = [dense(), chunked()]
        (cmc_d, map_d, nv_d), (cmc_c, map_c, nv_c) = res
        if not (torch.equal(cmc_d, cmc_c) and map_d == map_c and nv_d == nv_c):
            raise SystemExit(f"bench/evaluate.py: evaluate_from_features and the dense path disagree on {dev}: "
                             f"rank-1 {float(cmc_c[0])} vs {float(cmc_d[0])}, mAP {map_c!r} vs {map_d!r}, "
                             f"valid {nv_c} vs {nv_d}")
        for path, (wall, cpu_s), peak, (cmc, mAP, nv) in zip(("dense", "chunked"), times, peaks, res):
            rows.append(dict(device=name, dtype="float32", shape=f"{nq}x{ng}x{args.features}", path=path,
                             chunk="-" if path == "dense" else str(args.chunk_size or "default"),
                             median_ms=1000 * wall, cpu_ms=1000 * cpu_s, peak_MB=peak / 2 ** 20,
                             rank1=float(cmc[0]), mAP=mAP, valid=nv))
    head = ["device", "dtype", "shape", "path", "chunk", "median_ms", "cpu_ms", "peak_MB", "rank1", "mAP", "valid"]
    fmt = {"median_ms": "{:.1f}", "cpu_ms": "{:.0f}", "peak_MB": "{:.1f}", "rank1": "{:.4f}", "mAP": "{:.4f}"}
    print_table("features to CMC + mAP (max_rank=50): dense = evaluate(euclidean_distance(qf, gf)), chunked = "
                f"evaluate_from_features; medians of {args.repeats} after a warm-up; peak_MB: torch allocations "
                "(CPU: a separate one-thread run)", head, fmt, rows)
    if args.csv:
        append_csv(args.csv, head, rows)


def print_table(title, head, fmt, rows):
    table = [[fmt.get(k, "{}").format(r[k]) for k in head] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    print(title)
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in table:
        print(" | ".join(x.ljust(w) for x, w in zip(r, widths)))


def append_csv(path, head, rows):
    """Append ``rows`` to the CSV at ``path``, writing the header if the file is new; a file
    whose header is another one (the other mode's) is an error."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            have = next(csv.reader(f), [])
        if have != head:
            raise SystemExit(f"bench/evaluate.py: {path} holds columns {have}, not {head}: "
                             "write this mode's rows to another file")
        new = False
    else:
        new = True
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=head)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)


if __name__ == "__main__":
    main()
