"""Sharded re-ranking (fmn.rerank with process_group) against one process.

Groups of 2-4 gloo processes (torch.multiprocessing.spawn, MASTER_ADDR=127.0.0.1 and a free
port); each process loads only its own slices of the queries and of the gallery (files the test
writes per rank) and runs a list of cases in one group, so that a group is started once per test.
A case's rows from every rank, concatenated, are compared with fmn.rerank on the whole problem in
this process: values within float32 rounding and rankings identical under the near-tie rule of
DESIGN section 3.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fmn_kernels import backend as fmn_backend
from fmn_kernels import rerank_distributed as rd
from fmn_kernels import rerank_sparse
from fmn_kernels.rerank import rerank
from test_rerank import assert_same_ranking, clustered_feats, random_feats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-6       # max |sharded - one process|: float32 rounding of the later stages
RANK_TOL = 2e-6  # the near-tie rule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bounds(sizes, r):
    return sum(sizes[:r]), sum(sizes[:r + 1])


# --------------------------------------------------------------------------------------------
# the worker: one process of the group, running every case of a list
# --------------------------------------------------------------------------------------------

def _peak_bytes(fn):
    """(largest total of live torch CPU allocations, largest single allocation) while fn runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = largest = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
        largest = max(largest, e.nbytes())
    return out, peak, largest


def _run_case(rank, folder, n, case):
    q = torch.load(os.path.join(folder, f"case{n}_q{rank}.pt"))
    g = torch.load(os.path.join(folder, f"case{n}_g{rank}.pt"))
    q, g = q.to(case.get("device", "cpu")), g.to(case.get("device", "cpu"))
    saved = {}
    for (mod, attr), value in case.get("patch", {}).items():
        target = rd if mod == "rd" else rerank_sparse
        saved[(target, attr)] = getattr(target, attr)
        setattr(target, attr, value)
    record = {"streams": 0, "rescanned": 0}
    stream, rescan, members = rd._Comm.stream, rd._rescan, rd._members

    def count_streams(self, *a):
        record["streams"] += 1
        return stream(self, *a)

    def count_rescans(comm, lay, own, cand, failed, *a):
        record["rescanned"] += int(failed.numel())
        return rescan(comm, lay, own, cand, failed, *a)

    def keep_lists(lists, *a):
        record["lists"] = lists.clone()
        return members(lists, *a)

    rd._Comm.stream, rd._rescan, rd._members = count_streams, count_rescans, keep_lists
    try:
        call = lambda: rerank(q, g, process_group=dist.group.WORLD, **case["kwargs"])  # noqa: E731
        if case.get("profile"):
            record["result"], record["peak"], record["largest"] = _peak_bytes(call)
        else:
            out = call()
            record["result"] = tuple(t.cpu() for t in out) if isinstance(out, tuple) else out.cpu()
    except ValueError as exc:
        record["error"] = (type(exc).__name__, str(exc))
    finally:
        rd._Comm.stream, rd._rescan, rd._members = stream, rescan, members
        for (target, attr), value in saved.items():
            setattr(target, attr, value)
    torch.save(record, os.path.join(folder, f"out{n}_r{rank}.pt"))


def _worker(rank, world, port, folder, count):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cases = torch.load(os.path.join(folder, f"cases_r{rank}.pt"), weights_only=False)
        for n in range(count):
            _run_case(rank, folder, n, cases[n])
    finally:
        dist.destroy_process_group()


def run_group(tmp_path, world: int, cases: list[dict]) -> list[list[dict]]:
    """Runs the cases in one gloo group of ``world`` processes; returns [case][rank] records.
    A case: q, g (whole features, split here by q_sizes / g_sizes; per-rank overrides in
    "per_rank": {rank: (q_slice, g_slice)}), kwargs (per-rank overrides in "rank_kwargs"),
    patch ({("rd" | "sparse", attr): value} set in the workers), profile, device (of the slices)."""
    folder = str(tmp_path)
    per_rank_cases = {r: [] for r in range(world)}
    for n, case in enumerate(cases):
        for r in range(world):
            qa, qb = _bounds(case["q_sizes"], r)
            ga, gb = _bounds(case["g_sizes"], r)
            qs, gs = case["q"][qa:qb].clone(), case["g"][ga:gb].clone()
            qs, gs = case.get("per_rank", {}).get(r, (qs, gs))
            torch.save(qs, os.path.join(folder, f"case{n}_q{r}.pt"))
            torch.save(gs, os.path.join(folder, f"case{n}_g{r}.pt"))
            kwargs = dict(case.get("kwargs", {}), **case.get("rank_kwargs", {}).get(r, {}))
            per_rank_cases[r].append({"kwargs": kwargs, "patch": case.get("patch", {}),
                                      "profile": case.get("profile", False), "device": case.get("device", "cpu")})
    for r in range(world):
        torch.save(per_rank_cases[r], os.path.join(folder, f"cases_r{r}.pt"))
    mp.spawn(_worker, args=(world, _free_port(), folder, len(cases)), nprocs=world)
    return [[torch.load(os.path.join(folder, f"out{n}_r{r}.pt"), weights_only=False) for r in range(world)]
            for n in range(len(cases))]


# --------------------------------------------------------------------------------------------
# comparisons with one process
# --------------------------------------------------------------------------------------------

def assert_dense_equal(records, q, g, kwargs):
    assert all("error" not in r for r in records), [r.get("error") for r in records]
    got = torch.cat([r["result"] for r in records])
    ref = rerank(q, g, **kwargs)
    assert got.shape == ref.shape and got.dtype == torch.float32
    err = (got - ref).abs().max().item()
    assert err <= TOL, f"max |sharded - one process| = {err:.3g}"
    assert_same_ranking(got, ref.double())


def assert_topk_equal(records, q, g, kwargs):
    """Values within rounding of one process's top-m; the indices are the m smallest of one
    process's dense rows and in their order, up to near ties."""
    assert all("error" not in r for r in records), [r.get("error") for r in records]
    values = torch.cat([r["result"][0] for r in records])
    indices = torch.cat([r["result"][1] for r in records])
    m = kwargs["topk"]
    dense_kwargs = {k: v for k, v in kwargs.items() if k != "topk"}
    ref_v, _ = rerank(q, g, **kwargs)
    dense = rerank(q, g, **dense_kwargs)
    assert values.shape == indices.shape == (q.shape[0], m) and indices.dtype == torch.long
    assert (values - ref_v).abs().max().item() <= TOL
    assert ((indices >= 0) & (indices < g.shape[0])).all()
    assert all(len(set(row)) == m for row in indices.tolist())
    at = dense.gather(1, indices)
    assert (at - values).abs().max().item() <= TOL               # the values of those gallery items
    assert_same_ranking(at, at.double())                          # in order
    walked = at.double()
    assert ((walked[:, 1:] - walked[:, :-1]) >= -RANK_TOL).all()
    mth = torch.sort(dense, dim=1).values[:, m - 1]
    assert (at.max(dim=1).values <= mth + RANK_TOL).all()         # and the m smallest


def integer_feats(q, g, d, seed):
    """Small integer features with duplicate rows: exact ties everywhere."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (q + g, d), generator=gen).float()
    x[q + g // 2: q + g // 2 + 10] = x[q: q + 10]
    return x[:q].contiguous(), x[q:].contiguous()


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

def test_three_ranks_uneven_and_empty_slices_dense_and_topk(tmp_path):
    qc, gc = clustered_feats(75, 170, 16, 0)
    qr, gr = random_feats(60, 220, 24, 1)
    qi, gi = integer_feats(30, 150, 6, 2)
    qt, gt = clustered_feats(3, 5, 4, 3)
    qs, gs = torch.randn(20, 12, dtype=torch.float64) * 1e-23, torch.randn(90, 12, dtype=torch.float64) * 1e-23
    cases = [
        dict(q=qc, g=gc, q_sizes=[30, 0, 45], g_sizes=[100, 70, 0], kwargs={}),
        dict(q=qc, g=gc, q_sizes=[30, 0, 45], g_sizes=[100, 70, 0], kwargs={"topk": 10}),
        dict(q=qr, g=gr, q_sizes=[0, 40, 20], g_sizes=[120, 0, 100], kwargs={"topk": 7, "squared_input": True}),
        dict(q=qr, g=gr, q_sizes=[25, 25, 10], g_sizes=[1, 200, 19], kwargs={"k1": 7, "k2": 3, "faiss_compat": True}),
        dict(q=qr, g=gr, q_sizes=[25, 25, 10], g_sizes=[73, 74, 73], kwargs={"k2": 1, "lambda_value": 0.0}),
        dict(q=qc, g=gc, q_sizes=[75, 0, 0], g_sizes=[0, 0, 170], kwargs={"lambda_value": 1.0, "k1": 3}),
        dict(q=qt, g=gt, q_sizes=[2, 1, 0], g_sizes=[3, 0, 2], kwargs={}),
        dict(q=qi, g=gi, q_sizes=[10, 10, 10], g_sizes=[50, 60, 40], kwargs={}),
        dict(q=qi, g=gi, q_sizes=[10, 10, 10], g_sizes=[50, 60, 40], kwargs={"topk": 20},
             patch={("rd", "_OUTPUT_TILE"): 16}),   # ties across tiles, more than a tile's m
        dict(q=qs, g=gs, q_sizes=[7, 7, 6], g_sizes=[30, 30, 30], kwargs={}),
    ]
    records = run_group(tmp_path, 3, cases)
    for case, recs in zip(cases, records):
        check = assert_topk_equal if "topk" in case["kwargs"] else assert_dense_equal
        check(recs, case["q"], case["g"], case["kwargs"])


def exact_lists(q, g, length, engine):
    """The L smallest (exact d2, id) of every row over all N items, d2 computed by the engine's
    exact function (the C++ kernels' sum of squared differences, or the torch pipeline's)."""
    x = torch.cat([q, g]).float().contiguous()
    n = x.shape[0]
    rows, cols = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    if engine == "cpu":
        d2 = torch.ops.fmn.rerank_sqdist_pairs(x, rows, x, cols)
    else:
        diff = x[rows] - x[cols]
        d2 = (diff * diff).sum(dim=1)
    return torch.sort(d2.view(n, n), dim=1, stable=True).indices[:, :length]


def test_neighbour_lists_are_the_exact_ones_with_rescans_and_far_members(tmp_path):
    # Candidate lists exactly L long (no spare candidates): most rows cannot be proven from their
    # candidates and are rescanned against every rank, and members of R* lie beyond the lists, so
    # their distances come from a second feature stream. Chunks of 3-4 rows. The (N, L) lists every
    # rank gathers are the exact ones, compared entry by entry, for the C++ building blocks and the
    # torch ones.
    q, g = clustered_feats(57, 300, 16, 4)
    patch = {("rd", "_EXTRA_CANDIDATES"): 0, ("rd", "STREAM_BYTES"): 200, ("rd", "_OUTPUT_TILE"): 7}
    split = dict(q=q, g=g, q_sizes=[54, 3], g_sizes=[20, 280], patch=patch)
    backends = (["auto"] if fmn_backend.has_compiled_kernel("rerank_knn_update", "cpu") else []) + ["torch"]
    cases = [dict(split, kwargs=dict(kw, backend=b)) for b in backends for kw in ({}, {"topk": 25})]
    records = run_group(tmp_path, 2, cases)
    for case, recs in zip(cases, records):
        check = assert_topk_equal if "topk" in case["kwargs"] else assert_dense_equal
        check(recs, q, g, case["kwargs"])
        want = exact_lists(q, g, 21, "cpu" if case["kwargs"]["backend"] == "auto" else "torch")
        assert sum(r["rescanned"] for r in recs) > 100
        assert all(r["streams"] == 3 for r in recs)
        for r in recs:
            assert torch.equal(r["lists"], want)


def test_four_ranks_idle_ranks_torch_engine_and_bad_group_use(tmp_path):
    # Ranks without queries, without gallery items or without either; the torch building blocks.
    # Then each bad use of the group is one error, the same on every rank, and the group still
    # works after them.
    qa, ga = clustered_feats(40, 200, 8, 5)
    good = [
        dict(q=qa, g=ga, q_sizes=[10, 0, 25, 5], g_sizes=[0, 90, 60, 50], kwargs={"topk": 9, "backend": "torch"}),
        dict(q=qa, g=ga, q_sizes=[20, 0, 0, 20], g_sizes=[100, 0, 0, 100], kwargs={"backend": "torch"}),
        dict(q=qa, g=ga, q_sizes=[20, 0, 0, 20], g_sizes=[100, 0, 0, 100], kwargs={}),
    ]
    q, g = clustered_feats(20, 80, 16, 7)
    split = dict(q=q, g=g, q_sizes=[5, 5, 5, 5], g_sizes=[20, 20, 20, 20])
    cases = [
        dict(split, kwargs={}, per_rank={2: (q[10:15, :8].clone(), g[40:60, :8].clone())}),
        dict(split, kwargs={}, per_rank={1: (q[5:10].double(), g[20:40].double())}),
        dict(split, kwargs={}, per_rank={3: (q[15:20].clone(), torch.full((20, 16), float("nan")))}),
        dict(split, kwargs={}, rank_kwargs={0: {"k1": 10}}),
        dict(split, kwargs={"knn_precision": "bf16"}),
        dict(split, kwargs={}, per_rank={1: (q[5:10].clone(), g[20:40, 0].clone())}),
        dict(q=q, g=g, q_sizes=[0, 0, 0, 0], g_sizes=[20, 20, 20, 20], kwargs={}),
        dict(split, kwargs={"topk": 81}),
        dict(split, kwargs={"topk": 5}),
    ]
    records = run_group(tmp_path, 4, good + cases)
    for case, recs in zip(good, records):
        check = assert_topk_equal if "topk" in case["kwargs"] else assert_dense_equal
        check(recs, case["q"], case["g"], case["kwargs"])
    assert [r["result"].shape[0] for r in records[1]] == [20, 0, 0, 20]
    records = records[len(good):]
    expected = [
        "feature dims differ across ranks: rank 0 has 16, rank 2 has 8",
        "feature dtypes differ across ranks: rank 0 has float32, rank 1 has float64",
        "rank 3: gallery_feats contains NaN or Inf",
        "re-ranking parameters differ across ranks",
        "knn_precision must be auto or fp32",
        "rank 1: gallery_feats must be 2-D",
        "no rank holds a query (q = 0)",
        "topk=81 exceeds the gallery size 80",
    ]
    for n, message in enumerate(expected):
        errors = {r["error"] for r in records[n]}
        assert len(errors) == 1, errors              # the same error on every rank
        kind, text = errors.pop()
        assert message in text, (message, text)
    assert_topk_equal(records[-1], q, g, {"topk": 5})  # the group still works after them


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_ranks_sharing_one_cuda_device(tmp_path):
    # CUDA slices: the torch building blocks (Triton's overlap where it runs) on the GPU, the
    # collectives over gloo through the CPU; both ranks share the one device (nccl needs a device
    # per rank). Compared with one CPU process.
    q, g = clustered_feats(60, 300, 32, 11)
    split = dict(q=q, g=g, q_sizes=[25, 35], g_sizes=[170, 130], device="cuda")
    cases = [dict(split, kwargs={}), dict(split, kwargs={"topk": 15}),
             dict(split, kwargs={"topk": 15, "backend": "torch"})]
    records = run_group(tmp_path, 2, cases)
    for case, recs in zip(cases, records):
        check = assert_topk_equal if "topk" in case["kwargs"] else assert_dense_equal
        check(recs, q, g, case["kwargs"])


def test_process_group_without_torch_distributed():
    q, g = clustered_feats(4, 10, 8, 8)
    if dist.is_initialized():
        pytest.skip("a process group is running in this process")
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        rerank(q, g, process_group=object())


def _small_budget(device):
    return 1 << 15


def test_topk_memory_is_bounded_by_chunks_not_q_times_g(tmp_path):
    # Per rank, no torch allocation with topk comes near the rank's (q_r, g) rows, let alone the
    # (q, g) matrix: the largest are O(n_r k) lists and chunk-sized blocks (chunk budgets lowered
    # here to 2^15 elements). The dense output's own allocation is q_r x g: the same measurement is seen
    # to catch such a block.
    q, g = clustered_feats(800, 4000, 8, 9)
    patch = {("sparse", "_element_budget"): _small_budget, ("sparse", "_pair_budget"): _small_budget,
             ("rd", "STREAM_BYTES"): 1 << 14, ("rd", "_OUTPUT_ELEMENTS"): 1 << 15, ("rd", "_SPARSE_ELEMENTS"): 1 << 15,
             ("rd", "_OUTPUT_TILE"): 512}
    split = dict(q=q, g=g, q_sizes=[400, 400], g_sizes=[2000, 2000], patch=patch, profile=True)
    records = run_group(tmp_path, 2, [dict(split, kwargs={"topk": 20}), dict(split, kwargs={})])
    block = 400 * 4000 * 4
    for topk_rec, dense_rec in zip(*records):
        assert dense_rec["largest"] >= block
        assert topk_rec["largest"] <= block / 3, (topk_rec["largest"], block)
    assert_topk_equal(records[0], q, g, {"topk": 20})


# --------------------------------------------------------------------------------------------
# fmn rerank under torchrun
# --------------------------------------------------------------------------------------------

def _torchrun(nproc, argv, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "fmn.cli", "rerank", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)


@pytest.mark.parametrize("nproc, q_ext, g_ext, out_name, topk", [
    (1, ".pt", ".pt", "out.pt", 12),
    (2, ".npy", ".npy", "out.npz", 12),
    (3, ".pt", ".npy", "out.pt", 12),
    (4, ".npy", ".pt", "out.npy", None),
])
def test_fmn_rerank_under_torchrun_equals_one_process(tmp_path, nproc, q_ext, g_ext, out_name, topk):
    q, g = clustered_feats(23, 130, 16, 10)
    paths = {}
    for name, t, ext in (("q", q, q_ext), ("g", g, g_ext)):
        paths[name] = str(tmp_path / f"{name}{ext}")
        np.save(paths[name], t.numpy()) if ext == ".npy" else torch.save(t, paths[name])
    out = tmp_path / out_name
    argv = ["--query", paths["q"], "--gallery", paths["g"], "--out", str(out)] + (["--topk", str(topk)] if topk else [])
    proc = _torchrun(nproc, argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("re-ranked 23 x 130") == 1          # rank 0 reports
    if topk is None:
        got = torch.from_numpy(np.load(out))
        ref = rerank(q, g)
        assert (got - ref).abs().max().item() <= TOL
        assert_same_ranking(got, ref.double())
        return
    if out_name.endswith(".npz"):
        with np.load(out) as z:
            values, indices = torch.from_numpy(z["values"]), torch.from_numpy(z["indices"])
    else:
        res = torch.load(out, weights_only=True)
        values, indices = res["values"], res["indices"]
    assert_topk_equal([{"result": (values, indices)}], q, g, {"topk": topk})
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def _slices_worker(rank, world, port, folder):
    from fmn.engine import commands
    from fmn.rerank import shard_bounds

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    seen = {}
    real = __import__("fmn_kernels.rerank", fromlist=["rerank"]).rerank

    def spy(qf, gf, **kw):
        seen["shapes"] = (tuple(qf.shape), tuple(gf.shape))
        seen["mapped"] = _mapped_files(("q.npy", "g.pt"))
        return real(qf, gf, **kw)

    import fmn_kernels.rerank as fr
    fr.rerank = spy
    try:
        commands.run_rerank(os.path.join(folder, "q.npy"), os.path.join(folder, "g.pt"),
                            os.path.join(folder, "o.pt"), 20, 6, 0.3, 5, lambda line: None)
    finally:
        fr.rerank = real
        if dist.is_initialized():
            dist.destroy_process_group()
    seen["bounds"] = (shard_bounds(31, rank, world), shard_bounds(101, rank, world))
    torch.save(seen, os.path.join(folder, f"seen{rank}.pt"))


def _mapped_files(names):
    with open("/proc/self/maps") as fh:
        lines = fh.read().splitlines()
    return sorted(n for n in names if any(line.endswith(os.sep + n) for line in lines))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc/self/maps")
def test_each_rank_reads_its_slice_of_memory_mapped_files(tmp_path):
    q, g = clustered_feats(31, 101, 8, 11)
    np.save(tmp_path / "q.npy", q.numpy())
    torch.save(g, tmp_path / "g.pt")
    mp.spawn(_slices_worker, args=(3, _free_port(), str(tmp_path)), nprocs=3)
    for r in range(3):
        seen = torch.load(tmp_path / f"seen{r}.pt", weights_only=False)
        (qa, qb), (ga, gb) = seen["bounds"]
        assert seen["shapes"] == ((qb - qa, 8), (gb - ga, 8))
        assert seen["mapped"] == ["g.pt", "q.npy"]          # both files memory-mapped, not read whole
    res = torch.load(tmp_path / "o.pt", weights_only=True)
    assert_topk_equal([{"result": (res["values"], res["indices"])}], q, g, {"topk": 5})


# --------------------------------------------------------------------------------------------
# the C++ building blocks and the inverted index, in one process
# --------------------------------------------------------------------------------------------

def _sparse_rows(rows, n, per_row, gen):
    """Random sparse rows as padded (cols, vals): per_row distinct columns < n, ascending."""
    cols = torch.stack([torch.randperm(n, generator=gen)[:per_row].sort().values for _ in range(rows)])
    return cols, torch.rand(rows, per_row, generator=gen)


@pytest.mark.skipif(not fmn_backend.has_compiled_kernel("rerank_overlap", "cpu"), reason="needs the C++ extension")
def test_overlap_on_item_tiles_equals_the_whole_range_and_the_dense_reference():
    # S(i, j) = sum_c min(Vq[i, c], Vg[j, c]) over the index built from gallery rows given in three
    # blocks; any item tile gives the columns of the whole range bit for bit.
    gen = torch.Generator().manual_seed(3)
    n, g_r = 60, 37
    gcols, gvals = _sparse_rows(g_r, n, 9, gen)
    qcols, qvals = _sparse_rows(5, n, 11, gen)
    qcols[0, -3:] = n                                   # padding is skipped
    parts = [rd._csr(gcols[a:b], gvals[a:b], n) for a, b in ((0, 10), (10, 11), (11, g_r))]
    col_ptr, item, val = rd._inverted_index(parts, n, torch.device("cpu"))
    assert parts == [] and item.dtype == torch.int32
    for c in range(n):                                  # items ascending within each column
        seg = item[col_ptr[c]:col_ptr[c + 1]]
        assert torch.equal(seg, seg.sort().values)
    dense_q, dense_g = torch.zeros(5, n + 1), torch.zeros(g_r, n)
    dense_q.scatter_(1, qcols, qvals)
    dense_g.scatter_(1, gcols, gvals)
    want = torch.minimum(dense_q[:, None, :n].double(), dense_g[None].double()).sum(-1)
    def overlap(a, b):
        out = torch.full((5, b - a), float("nan"))       # written over entirely
        torch.ops.fmn.rerank_overlap(qcols, qvals, col_ptr, item, val, a, b, out)
        return out

    whole = overlap(0, g_r)
    torch.testing.assert_close(whole.double(), want, rtol=1e-6, atol=1e-6)
    tiles = torch.cat([overlap(a, min(g_r, a + 8)) for a in range(0, g_r, 8)], 1)
    assert torch.equal(tiles, whole)
    torch.library.opcheck(torch.ops.fmn.rerank_overlap.default, (qcols, qvals, col_ptr, item, val, 5, 30,
                                                                torch.empty(5, 25)))
    a, b = torch.randn(7, 4, generator=gen), torch.randn(9, 4, generator=gen)
    ai, bi = torch.randint(0, 7, (20,), generator=gen), torch.randint(0, 9, (20,), generator=gen)
    torch.testing.assert_close(torch.ops.fmn.rerank_sqdist_pairs(a, ai, b, bi), ((a[ai] - b[bi]) ** 2).sum(1))
    torch.library.opcheck(torch.ops.fmn.rerank_sqdist_pairs.default, (a, ai, b, bi))


@pytest.mark.parametrize("rows,tile,g,m", [(9, 64, 700, 20), (7, 30, 200, 100), (5, 50, 60, 60), (4, 7, 30, 5)])
def test_tile_merges_give_the_smallest_of_the_whole_row(rows, tile, g, m):
    # The output's running m best over tiles of gallery items equals the m smallest (value,
    # index) of whole rows, exact ties across tiles and within them included.
    gen = torch.Generator().manual_seed(rows + g)
    full = (torch.rand(rows, g, generator=gen) * 10).round() / 10
    full[:, g // 2:g // 2 + 5] = full[:, 1:6]
    pv, pi = torch.full((rows, m), float("inf")), torch.full((rows, m), g, dtype=torch.long)
    for a in range(0, g, tile):
        pv, pi = rd._merge_tile(pv, pi, full[:, a:a + tile].contiguous(), a, m)
    v, i = rerank_sparse.smallest_stable(full, m)
    assert torch.equal(pv, v) and torch.equal(pi, i)
