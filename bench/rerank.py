"""Benchmark of k-reciprocal re-ranking: fmn's backends vs the dense references.

Methods
  cpu / torch / triton   fmn.rerank backends available for the device
  numpy                  a dense NumPy implementation of the same semantics (DESIGN section 3),
                         structured like the widely copied re_ranking() code: N x N float32
                         matrices, a Python loop per item (CPU)
  reference              fmn_kernels.rerank.rerank_ref, dense float64 (small N only)
Cases (d = feature dim; features: unit-norm, identity-clustered, like re-ID embeddings)
  200x1000      q=200,   g=1000,   d=256
  1000x5000     q=1000,  g=5000,   d=256
  market        q=3368,  g=15913,  d=2048 on GPU, d=512 on CPU (on CPU with --full or --cases market)
  10kx100k      q=10000, g=100000, d=2048, topk=100 (GPU only)
Scale (--scale): q=10,000 x g=100,000, d=256, topk=100 on the CPU (--scale-size QxGxD for a
smaller one), features written once to .npy files that every worker memory-maps: one process
(the cpu backend, every thread), then --scale-procs gloo processes (default 2, threads split
between them) each reading only its slices. Per run: wall time (rerank only, barriers around it
in the sharded run), peak RSS of each process (VmHWM, imports included) and its rise over the
process with its inputs opened, the stage times (FMN_RERANK_PROFILE), and the ratio to one
N x N x d GEMM (x @ x.T in row blocks into a reused buffer, N = q + g) timed in the single-process
worker of the same run, after the re-ranking. The sharded rows are compared with the single
process's: max |values difference|, rows with identical indices, the near-tie rule.
Each (case, method) runs in a fresh subprocess: wall time (median of --repeat runs after one
warm-up where the case is small, N <= 6000, for every method, and at every size for the GPU
backends; otherwise one run), process CPU time, peak host memory (VmHWM of the worker,
imports included; "host+" is the rise of the resident size over the worker's with the inputs
built), peak device memory (torch.cuda.max_memory_allocated, inputs included). On a shared CPU the wall time depends on the load (printed); "cpu s" is the
process CPU time (all threads, OpenMP spin-waits included).
Ratios are against numpy and the reference when they ran; max|d| and the ranking check compare
the dense output with the reference where available, else with numpy.

    python bench/rerank.py                  # CPU: 200x1000 and 1000x5000
    python bench/rerank.py --full           # + Market size (and the slow NumPy baseline there)
    python bench/rerank.py --device cuda    # GPU cases incl. Market d=2048 and 10k x 100k
    python bench/rerank.py --csv out.csv    # append rows
    python bench/rerank.py --scale          # 10k x 100k, topk 100: one process and 2 gloo processes
    python bench/rerank.py --scale --scale-size 2000x20000x256   # smaller, on a loaded machine
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "200x1000": dict(q=200, g=1000, d=256, topk=None),
    "1000x5000": dict(q=1000, g=5000, d=256, topk=None),
    "market": dict(q=3368, g=15913, d=2048, d_cpu=512, topk=None),
    "10kx100k": dict(q=10000, g=100000, d=2048, topk=100),
}


# --------------------------------------------------------------------------------------------
# the dense NumPy implementation (same semantics as rerank_ref, float32, O(N^2) memory)
# --------------------------------------------------------------------------------------------

def rerank_numpy(query, gallery, k1=20, k2=6, lambda_value=0.3):
    import numpy as np

    x = np.concatenate([query, gallery]).astype(np.float32)
    q, n = query.shape[0], x.shape[0]
    x = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
    sq = (x * x).sum(axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    dist = d2 / d2.max(axis=1, keepdims=True)
    del d2
    rank = np.argsort(dist, axis=1, kind="stable")
    k, h, kq = min(k1 + 1, n), min(int(np.around(k1 / 2.0)) + 1, n), min(k2, n)

    def reciprocal(i, length):
        fwd = rank[i, :length]
        back = rank[fwd, :length]
        return fwd[np.where(back == i)[0]]

    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        r_i = reciprocal(i, k)
        expanded = r_i
        for c in r_i:
            cand = reciprocal(c, h)
            if 3 * len(np.intersect1d(cand, r_i)) > 2 * len(cand):
                expanded = np.append(expanded, cand)
        expanded = np.unique(expanded)
        w = np.exp(-dist[i, expanded])
        v[i, expanded] = w / w.sum()
    if k2 > 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = v[rank[i, :kq]].mean(axis=0)
        v = v_qe
    del rank
    inv = [np.where(v[q:, c] != 0)[0] for c in range(n)]
    final = np.empty((q, n - q), dtype=np.float32)
    for i in range(q):
        s = np.zeros(n - q, dtype=np.float32)
        nz = np.where(v[i] != 0)[0]
        for c in nz:
            rows = inv[c]
            s[rows] += np.minimum(v[i, c], v[q + rows, c])
        jac = 1.0 - s / (2.0 - s)
        final[i] = (1.0 - lambda_value) * jac + lambda_value * dist[i, q:]
    return final


# --------------------------------------------------------------------------------------------
# worker: one (case, method) in this process
# --------------------------------------------------------------------------------------------

def make_features(q, g, d, seed=0, device="cpu"):
    """Unit-norm features clustered by identity (about 8 images per identity)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n = q + g
    ids = max(2, n // 8)
    centres = torch.nn.functional.normalize(torch.randn(ids, d, generator=gen), dim=1)
    label = torch.randint(0, ids, (n,), generator=gen)
    x = centres[label] + 0.6 / d ** 0.5 * torch.randn(n, d, generator=gen)
    x = torch.nn.functional.normalize(x, dim=1)
    return x[:q].contiguous().to(device), x[q:].contiguous().to(device)


def host_rss_kb(field: str):
    """``VmRSS`` (resident now) or ``VmHWM`` (resident peak) of this process in kB; None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def own_peak_kb() -> int:
    """This process's resident peak so far in kB: VmHWM on Linux. Not ru_maxrss, which a process
    started by fork + exec inherits from its parent (the kernel keeps the larger of the two): a
    worker of a parent holding 500 MB would report 500 MB before doing anything."""
    return host_rss_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_host_peak() -> bool:
    """Reset this process's resident high-water mark (VmHWM) to its resident size now."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    import torch

    cfg = json.loads(args.worker)
    q, g, d, topk, method, device = cfg["q"], cfg["g"], cfg["d"], cfg["topk"], cfg["method"], cfg["device"]
    qf, gf = make_features(q, g, d, device=device)
    if device == "cuda":
        torch.cuda.synchronize()

    if method == "numpy":
        qn, gn = qf.cpu().numpy(), gf.cpu().numpy()
        run = lambda: rerank_numpy(qn, gn)  # noqa: E731
    elif method == "reference":
        from fmn_kernels.rerank import rerank_ref

        run = lambda: rerank_ref(qf.cpu(), gf.cpu())  # noqa: E731
    else:
        from fmn_kernels import backend as fb
        from fmn_kernels.rerank import rerank

        runs_as = fb.resolve("rerank", method, qf.device)
        if runs_as != method:
            sys.exit(f"backend {method} is not available on {device} here (it would run as {runs_as})")
        run = lambda: rerank(qf, gf, topk=topk, backend=method)  # noqa: E731

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # The rise is measured from the resident size with the inputs built; the high-water mark is
    # reset there (Linux clear_refs), else it would still hold the import-time peak.
    base_peak_kb = own_peak_kb()
    base_kb, hwm_reset = host_rss_kb("VmRSS"), reset_host_peak()
    if base_kb is None or not hwm_reset:
        base_kb = base_peak_kb
    times, cpu_times = [], []
    reps = cfg["repeat"]
    out = None
    if cfg["warmup"]:
        out = run()
        sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(reps):
        out = None
        sync()
        c0, t0 = time.process_time(), time.perf_counter()
        out = run()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    run_peak_kb = (host_rss_kb("VmHWM") if hwm_reset else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = dict(
        time_s=statistics.median(times),
        cpu_s=statistics.median(cpu_times),
        host_peak_mb=max(base_peak_kb, run_peak_kb) / 1024.0,
        host_rise_mb=max(0, run_peak_kb - base_kb) / 1024.0,
        dev_peak_mb=torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    )
    if cfg["save"] and topk is None:
        import numpy as np

        arr = out if isinstance(out, np.ndarray) else out.detach().cpu().double().numpy()
        np.save(cfg["save"], arr)
    print("RESULT " + json.dumps(res))


# --------------------------------------------------------------------------------------------
# the scale case: one process against P gloo processes on memory-mapped features
# --------------------------------------------------------------------------------------------

SCALE = dict(q=10000, g=100000, d=256, topk=100)


def parse_size(text: str) -> tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--scale-size must be QxGxD with positive integers, e.g. 2000x20000x256; got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def gemm_seconds(x, rows: int = 256) -> float:
    """One N x N x d GEMM, x @ x.T in blocks of rows into a reused buffer (never N x N at once)."""
    import torch

    n = x.shape[0]
    buf = torch.empty(rows, n)
    t0 = time.perf_counter()
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        torch.mm(x[r0:r1], x.t(), out=buf[: r1 - r0])
    return time.perf_counter() - t0


def stage_times(stderr: str) -> dict:
    """Stage -> seconds from the FMN_RERANK_PROFILE lines of a worker (C++ and sharded forms)."""
    import re

    pattern = re.compile(r"^fmn(?:::rerank|\.rerank\[rank \d+\])\s+(.+?)\s+([0-9.]+) s\b")
    out = {}
    for line in stderr.splitlines():
        m = pattern.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def scale_worker(cfg: dict) -> None:
    """One process of the scale case: its slices of the memory-mapped features, re-ranked alone
    (world 1) or with the gloo group; the rows saved; RESULT with time and memory."""
    import numpy as np
    import torch

    from fmn.rerank import shard_bounds
    from fmn_kernels.rerank import rerank

    rank, world = cfg["rank"], cfg["world"]
    qm = np.load(os.path.join(cfg["dir"], "q.npy"), mmap_mode="c")
    gm = np.load(os.path.join(cfg["dir"], "g.npy"), mmap_mode="c")
    (qa, qb), (ga, gb) = shard_bounds(qm.shape[0], rank, world), shard_bounds(gm.shape[0], rank, world)
    qf, gf = torch.from_numpy(qm[qa:qb]), torch.from_numpy(gm[ga:gb])
    group = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=world)
        group = dist.group.WORLD
        dist.barrier()
    import_peak_kb = own_peak_kb()
    base_kb, hwm_reset = host_rss_kb("VmRSS"), reset_host_peak()
    t0 = time.perf_counter()
    values, indices = rerank(qf, gf, topk=cfg["topk"], process_group=group)
    if group is not None:
        dist.barrier()
    seconds = time.perf_counter() - t0
    peak_kb = (host_rss_kb("VmHWM") if hwm_reset else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(os.path.join(cfg["dir"], f"values_{world}_{rank}.npy"), values.numpy())
    np.save(os.path.join(cfg["dir"], f"indices_{world}_{rank}.npy"), indices.numpy())
    res = dict(time_s=seconds, cpu_threads=torch.get_num_threads(), host_peak_mb=max(peak_kb, import_peak_kb) / 1024.0,
               host_rise_mb=max(0, peak_kb - (base_kb or 0)) / 1024.0)
    if group is not None:
        dist.destroy_process_group()
    elif cfg.get("gemm"):
        x = torch.cat([torch.from_numpy(qm), torch.from_numpy(gm)]).contiguous()
        res["gemm_s"] = gemm_seconds(x)
    print("RESULT " + json.dumps(res), flush=True)


def run_scale_workers(folder: str, world: int, spec: dict, threads: int, timeout: float):
    """Runs the scale case on ``world`` processes (1: the plain single process, GEMM included);
    returns (per-rank results, per-rank stage times) or raises RuntimeError."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(world):
        cfg = dict(spec, dir=folder, rank=rank, world=world, gemm=(world == 1))
        env = dict(os.environ, FMN_RERANK_PROFILE="1", OMP_NUM_THREADS=str(max(1, threads // world)),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, os.path.abspath(__file__), "--scale-worker", json.dumps(cfg)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    results, stages = [], []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"timeout after {timeout:.0f}s") from None
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError((err.strip().splitlines() or ["failed"])[-1][:200])
        results.append(json.loads(lines[0][7:]))
        stages.append(stage_times(err))
    return results, stages


def compare_topk(folder: str, world: int) -> dict:
    """The sharded rows against the single process's: max |values difference|, rows whose indices
    are identical, and whether every difference is a near tie (the single process's values, read
    at the sharded indices, equal the sharded values within 1e-6 and never step down by more than
    2e-6)."""
    import numpy as np

    v1, i1 = np.load(os.path.join(folder, "values_1_0.npy")), np.load(os.path.join(folder, "indices_1_0.npy"))
    vp = np.concatenate([np.load(os.path.join(folder, f"values_{world}_{r}.npy")) for r in range(world)])
    ip = np.concatenate([np.load(os.path.join(folder, f"indices_{world}_{r}.npy")) for r in range(world)])
    same_rows = (ip == i1).all(axis=1)
    ok = True
    for row in np.nonzero(~same_rows)[0]:
        ref = dict(zip(i1[row].tolist(), v1[row].tolist()))
        last = v1[row][-1]
        walked = [ref.get(j, None) for j in ip[row].tolist()]
        # an index outside the single process's top-m must tie with its m-th value
        for j, vj, rj in zip(ip[row].tolist(), vp[row].tolist(), walked):
            if (rj is None and abs(vj - last) > 2e-6) or (rj is not None and abs(vj - rj) > 1e-6):
                ok = False
        known = [w for w in walked if w is not None]
        if any(b - a < -2e-6 for a, b in zip(known, known[1:])):
            ok = False
    return dict(max_abs_diff=float(np.abs(vp - v1).max()), same_rows=float(same_rows.mean()), rank_ok=ok)


def run_scale(args) -> list[dict]:
    import torch

    q, g, d = parse_size(args.scale_size)
    spec = dict(q=q, g=g, d=d, topk=min(SCALE["topk"], g))
    threads = torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# rerank scale  q={q} g={g} d={d} topk={spec['topk']}, cpu, {threads} threads, torch {torch.__version__}, "
          f"load average before {load:.2f}; features clustered, memory-mapped .npy")
    folder = tempfile.mkdtemp(prefix="fmn_rerank_scale_")
    try:
        write_scale_features(folder, q, g, d)
        single = run_scale_workers(folder, 1, spec, threads, args.timeout)
        sharded = run_scale_workers(folder, args.scale_procs, spec, threads, args.timeout)
        check = compare_topk(folder, args.scale_procs)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = scale_rows(spec, single, sharded, check, load)
    print_scale(spec, threads, rows, check, load, load_after)
    return rows


def write_scale_features(folder: str, q: int, g: int, d: int) -> None:
    import numpy as np

    qf, gf = make_features(q, g, d)
    np.save(os.path.join(folder, "q.npy"), qf.numpy())
    np.save(os.path.join(folder, "g.npy"), gf.numpy())


def scale_rows(spec: dict, single, sharded, check: dict, load: float) -> list[dict]:
    """One row per process of each run; the time of a run is its slowest process's."""
    gemm = single[0][0]["gemm_s"]
    rows = []
    for name, (res, stages) in (("single", single), ("sharded", sharded)):
        wall = max(r["time_s"] for r in res)
        for rank, (r, st) in enumerate(zip(res, stages)):
            rows.append(dict(date=datetime.datetime.utcnow().isoformat(timespec="seconds"), case="scale", **spec,
                             method=name, procs=len(res), rank=rank, time_s=wall, x_gemm=wall / gemm, gemm_s=gemm,
                             host_peak_mb=r["host_peak_mb"], host_rise_mb=r["host_rise_mb"], load=load, stages=st,
                             **check))
    return rows


def print_scale(spec: dict, threads: int, rows: list[dict], check: dict, load: float, load_after: float) -> None:
    n, gemm = spec["q"] + spec["g"], rows[0]["gemm_s"]
    print(f"N x N x d GEMM ({n} x {n} x {spec['d']}, {threads} threads): {gemm:.2f} s")
    header = f"{'run':<14} {'procs':>5} {'time s':>8} {'x GEMM':>7} {'peak MB':>8} {'rise MB':>8}  stages (s)"
    print(header)
    print("-" * len(header))
    for r in rows:
        name = r["method"] + (f" rank {r['rank']}" if r["procs"] > 1 else "")
        text = " ".join(f"{k}={v:.2f}" for k, v in r["stages"].items())
        print(f"{name:<14} {r['procs']:>5} {r['time_s']:>8.2f} {r['x_gemm']:>7.2f} {r['host_peak_mb']:>8.0f} "
              f"{r['host_rise_mb']:>8.0f}  {text}")
    one = rows[0]
    peak_p = max(r["host_peak_mb"] for r in rows if r["method"] == "sharded")
    rise_p = max(r["host_rise_mb"] for r in rows if r["method"] == "sharded")
    print(f"sharded vs single: max |values diff| {check['max_abs_diff']:.1e}, identical index rows "
          f"{100 * check['same_rows']:.2f} %, near-tie rule {'holds' if check['rank_ok'] else 'BROKEN'}")
    met = one["x_gemm"] <= 1.2 and one["host_peak_mb"] <= 1024
    print(f"targets: single <= 1.2x GEMM and <= 1024 MB: {one['x_gemm']:.2f}x, {one['host_peak_mb']:.0f} MB -> "
          f"{'met' if met else 'NOT met'}; sharded peak per process <= 0.6x single: {peak_p / one['host_peak_mb']:.2f}x "
          f"-> {'met' if peak_p <= 0.6 * one['host_peak_mb'] else 'NOT met'} (rise over the imports "
          f"{rise_p / max(1.0, one['host_rise_mb']):.2f}x) (load average {load:.2f} before, {load_after:.2f} after)")


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def run_worker(cfg: dict, timeout: float):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timeout after {timeout:.0f}s"
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:]), None
    return None, (proc.stderr.strip().splitlines() or ["failed"])[-1][:160]


def compare(out_path, ref_path):
    import numpy as np

    a, b = np.load(out_path), np.load(ref_path)
    err = float(np.abs(a - b).max())
    order = np.argsort(a, axis=1, kind="stable")
    walked = np.take_along_axis(b, order, axis=1)
    worst = float(np.diff(walked, axis=1).min()) if walked.shape[1] > 1 else 0.0
    return err, worst >= -2e-6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--cases", default=None, help="comma list of " + ", ".join(CASES))
    ap.add_argument("--methods", default=None, help="comma list (default: every available backend + baselines)")
    ap.add_argument("--full", action="store_true",
                    help="Market size on CPU; the reference up to N = 6000 and numpy up to Market size")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per (case, method) where the case is small; every case for the GPU backends")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--csv", default=None, help="append the rows to this CSV file")
    ap.add_argument("--scale", action="store_true",
                    help="the scale case: one process and --scale-procs gloo processes on memory-mapped features")
    ap.add_argument("--scale-size", default="10000x100000x256", help="QxGxD of the scale case (default 10000x100000x256)")
    ap.add_argument("--scale-procs", type=int, default=2, help="processes of the sharded scale run (default 2)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scale-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.scale_worker:
        scale_worker(json.loads(args.scale_worker))
        return
    if args.scale:
        try:
            parse_size(args.scale_size)
        except ValueError as exc:
            ap.error(str(exc))
        if args.scale_procs < 2:
            ap.error("--scale-procs must be >= 2")
        rows = run_scale(args)
        if args.csv:
            write_csv(args.csv, rows, ["date", "case", "q", "g", "d", "topk", "method", "procs", "rank", "time_s",
                                       "x_gemm", "gemm_s", "host_peak_mb", "host_rise_mb", "max_abs_diff", "same_rows",
                                       "rank_ok", "load"])
        return

    import torch

    from fmn_kernels import backend as fb

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/rerank.py: --device cuda but CUDA is not available")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.cases:
        cases = args.cases.split(",")
        for case in cases:
            if case not in CASES:
                ap.error(f"unknown case {case!r}; choose from {', '.join(CASES)}")
            if dev != "cuda" and CASES[case]["topk"] is not None:
                ap.error(f"case {case} is GPU only (--device cuda)")
    elif dev == "cuda":
        cases = list(CASES)
    else:
        cases = ["200x1000", "1000x5000"] + (["market"] if args.full else [])
    backends = []
    if dev == "cpu":
        if fb.has_compiled_kernel("rerank", "cpu"):
            backends.append("cpu")
        backends.append("torch")
    else:
        backends += ["triton"] if fb.triton_runs_on("cuda") else []
        backends.append("torch")
    methods_all = args.methods.split(",") if args.methods else backends + ["numpy", "reference"]
    for method in methods_all:
        if method not in ("cpu", "torch", "triton", "numpy", "reference"):
            ap.error(f"unknown method {method!r}; choose from cpu, torch, triton, numpy, reference")

    dev_name = torch.cuda.get_device_name() if dev == "cuda" else (platform.processor() or platform.machine())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# rerank benchmark  device={dev} ({dev_name}), torch {torch.__version__}, "
          f"threads={torch.get_num_threads()}, load average {load:.2f}, k1=20 k2=6 lambda=0.3, fp32")
    header = f"{'case':<10} {'q':>6} {'g':>7} {'d':>5} {'topk':>5} {'method':<10} {'time s':>9} {'cpu s':>9} " \
             f"{'host MB':>9} {'host+ MB':>9} {'dev MB':>9} {'x numpy':>8} {'x ref':>8} {'max|d|':>9} {'rank':>5}"
    print(header)
    print("-" * len(header))
    rows = []
    tmp = tempfile.mkdtemp(prefix="fmn_rerank_bench_")
    for case in cases:
        spec = CASES[case]
        d = spec["d"] if dev == "cuda" else spec.get("d_cpu", spec["d"])
        q, g, topk = spec["q"], spec["g"], spec["topk"]
        n = q + g
        small = n <= 6000
        results = {}
        for method in methods_all:
            if method == "reference" and not (n <= 1200 or (args.full and n <= 6000)):
                continue
            if method == "numpy" and (topk is not None or n > 20000 or (n > 6000 and not args.full)):
                continue
            dense_method = method in ("numpy", "reference")
            timed = small or (dev == "cuda" and not dense_method)
            cfg = dict(q=q, g=g, d=d, topk=None if dense_method else topk, method=method,
                       device="cpu" if dense_method else dev,
                       repeat=args.repeat if timed else 1, warmup=timed,
                       save=os.path.join(tmp, f"{case}_{method}.npy") if (topk is None and n <= 20000) else None)
            res, err = run_worker(cfg, args.timeout)
            results[method] = (res, err, cfg["save"])
        base_num = results.get("numpy", (None,))[0]
        base_ref = results.get("reference", (None,))[0]
        for method, (res, err, save) in results.items():
            row = dict(date=datetime.datetime.utcnow().isoformat(timespec="seconds"), device=dev, device_name=dev_name,
                       case=case, q=q, g=g, d=d, topk=topk if method not in ("numpy", "reference") else None,
                       method=method, error=err)
            if res:
                row.update(res)
                if base_num and method != "numpy":
                    row["x_numpy"] = base_num["time_s"] / res["time_s"]
                if base_ref and method != "reference":
                    row["x_ref"] = base_ref["time_s"] / res["time_s"]
                against = "reference" if results.get("reference", (None,))[0] else "numpy"
                if save and method != against and results.get(against, (None,))[0] and os.path.exists(save):
                    row["max_abs_diff"], row["rank_ok"] = compare(save, results[against][2])
                    row["compared_with"] = against
            rows.append(row)
            fmt = lambda v, f: (format(v, f) if isinstance(v, (int, float)) else "-")  # noqa: E731
            if res:
                print(f"{case:<10} {q:>6} {g:>7} {d:>5} {fmt(row['topk'], 'd'):>5} {method:<10} {fmt(row['time_s'], '.3f'):>9} "
                      f"{fmt(row['cpu_s'], '.2f'):>9} {fmt(row['host_peak_mb'], '.0f'):>9} {fmt(row['host_rise_mb'], '.0f'):>9} "
                      f"{fmt(row['dev_peak_mb'], '.0f'):>9} {fmt(row.get('x_numpy'), '.1f'):>8} {fmt(row.get('x_ref'), '.1f'):>8} "
                      f"{fmt(row.get('max_abs_diff'), '.1e'):>9} {str(row.get('rank_ok', '-')):>5}")
            else:
                print(f"{case:<10} {q:>6} {g:>7} {d:>5} {'-':>5} {method:<10} failed: {err}")
    # the issue's targets, checked against the fastest fmn backend of each case
    targets = {("cpu", "1000x5000"): (1.0, None), ("cpu", "market"): (15.0, 2048.0),
               ("cuda", "market"): (0.010, None), ("cuda", "10kx100k"): (2.0, 20480.0)}
    for (tdev, tcase), (t_max, mem_max) in targets.items():
        if tdev != dev:
            continue
        done = [r for r in rows if r["case"] == tcase and r["method"] in backends and r.get("time_s") is not None]
        if not done:
            continue
        best = min(done, key=lambda r: r["time_s"])
        mem = best["dev_peak_mb"] if dev == "cuda" else best["host_peak_mb"]
        verdict = best["time_s"] <= t_max and (mem_max is None or mem <= mem_max)
        limit = f"<= {t_max:g} s" + (f", <= {mem_max:.0f} MB" if mem_max else "")
        print(f"target {tcase} on {dev} ({limit}): {best['method']} {best['time_s']:.3f} s wall, "
              f"{best['cpu_s']:.2f} s CPU, {mem:.0f} MB peak -> {'met' if verdict else 'NOT met'} (load average {load:.2f})")
    if args.csv:
        write_csv(args.csv, rows, ["date", "device", "device_name", "case", "q", "g", "d", "topk", "method", "time_s",
                                   "cpu_s", "host_peak_mb", "host_rise_mb", "dev_peak_mb", "x_numpy", "x_ref",
                                   "max_abs_diff", "rank_ok", "compared_with", "error"])


def write_csv(path: str, rows: list[dict], fields: list[str]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
