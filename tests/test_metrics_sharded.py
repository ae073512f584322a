"""CMC/mAP sharded over torch.distributed (fmn.metrics with process_group) against one process.

Groups of 2 and 3 gloo processes (torch.multiprocessing.spawn, MASTER_ADDR=127.0.0.1 and a free
port); each process loads only its own slices (features, ids, rows) from files the test writes per
rank and runs a list of cases in one group, so that a group starts once per test. Small-integer
features (exact dot products, many exact ties, ties across rank boundaries) give results identical
bit for bit to one process; random float features agree within float rounding. Uneven and empty
slices, junk (-1) and distractor (0) identities, chunks of a few rows; evaluate_topk on the rows of
sharded fmn.rerank(topk=m); bad uses, each one error the same on every rank. Then fmn rerank
--query-ids/--gallery-ids under torchrun prints the numbers of one process.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fmn.cli import main
from fmn.metrics import euclidean_distance, evaluate_from_features, evaluate_topk
from fmn_kernels.rerank import rerank
from test_rerank import clustered_feats
from test_rerank_distributed import _bounds, _free_port
from tests.test_cli_errors import one_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUERY_KEYS = ("qf", "qp", "qc", "values", "indices")      # split by q_sizes; the others by g_sizes


# --------------------------------------------------------------------------------------------
# the worker: one process of the group, running every case of a list
# --------------------------------------------------------------------------------------------

def _largest_allocation(fn):
    """(fn(), the largest single torch CPU allocation while it runs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    return out, max(sizes, default=0)


def _call(kind, t, kwargs, group):
    if kind == "features":
        return evaluate_from_features(t["qf"], t["gf"], t["qp"], t["gp"], t["qc"], t["gc"], process_group=group,
                                      **kwargs)
    if kind == "topk":
        return evaluate_topk(t["values"], t["indices"], t["qp"], t["gp"], t["qc"], t["gc"], process_group=group,
                             **kwargs)
    values, indices = rerank(t["qf"], t["gf"], topk=kwargs["m"], process_group=group)
    res = evaluate_topk(values, indices, t["qp"], t["gp"], t["qc"], t["gc"], max_rank=20, process_group=group)
    return res, values, indices


def _worker(rank, world, port, folder, count):
    from fmn import metrics

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for n in range(count):
            case = torch.load(os.path.join(folder, f"case{n}_r{rank}.pt"), weights_only=False)
            record = {}
            metrics._NUMPY_SORT = case["numpy_sort"]
            call = lambda: _call(case["kind"], case["tensors"], case["kwargs"], dist.group.WORLD)  # noqa: E731
            try:
                if case["profile"]:
                    record["result"], record["largest"] = _largest_allocation(call)
                else:
                    record["result"] = call()
            except (ValueError, TypeError) as exc:
                record["error"] = (type(exc).__name__, str(exc))
            torch.save(record, os.path.join(folder, f"out{n}_r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_group(tmp_path, world: int, cases: list[dict]) -> list[list[dict]]:
    """Runs the cases in one gloo group; returns [case][rank] records. A case: kind ("features",
    "topk" or "rerank"), tensors (whole inputs, split here by q_sizes / g_sizes; per-rank
    replacements in "per_rank": {rank: {key: tensor}}), kwargs (per rank: "rank_kwargs"), profile,
    numpy_sort (False: rows ranked by torch.sort, the GPU path, as fmn.metrics._NUMPY_SORT)."""
    folder = str(tmp_path)
    for n, case in enumerate(cases):
        for r in range(world):
            qa, qb = _bounds(case["q_sizes"], r)
            ga, gb = _bounds(case["g_sizes"], r)
            part = {k: (v[qa:qb] if k in QUERY_KEYS else v[ga:gb]).clone() for k, v in case["tensors"].items()}
            part.update(case.get("per_rank", {}).get(r, {}))
            kwargs = dict(case.get("kwargs", {}), **case.get("rank_kwargs", {}).get(r, {}))
            torch.save({"kind": case["kind"], "tensors": part, "kwargs": kwargs, "profile": case.get("profile", False),
                        "numpy_sort": case.get("numpy_sort", True)}, os.path.join(folder, f"case{n}_r{r}.pt"))
    mp.spawn(_worker, args=(world, _free_port(), folder, len(cases)), nprocs=world)
    return [[torch.load(os.path.join(folder, f"out{n}_r{r}.pt"), weights_only=False) for r in range(world)]
            for n in range(len(cases))]


# --------------------------------------------------------------------------------------------
# data and comparisons
# --------------------------------------------------------------------------------------------

def ids(q: int, g: int, seed: int, num_ids: int = 12, cams: int = 3):
    """Identities 1..num_ids, camera 0..cams-1; in the gallery a few junk (-1) and distractor (0)
    items, and one query of the junk identity (no true match)."""
    gen = torch.Generator().manual_seed(seed)
    qp, qc = torch.randint(1, num_ids + 1, (q,), generator=gen), torch.randint(0, cams, (q,), generator=gen)
    gp, gc = torch.randint(1, num_ids + 1, (g,), generator=gen), torch.randint(0, cams, (g,), generator=gen)
    gp[torch.randperm(g, generator=gen)[:g // 8]] = -1
    gp[torch.randperm(g, generator=gen)[:g // 8]] = 0
    qp[0] = -1
    return {"qp": qp, "gp": gp, "qc": qc, "gc": gc}


def integer_case(q: int, g: int, d: int, seed: int) -> dict:
    """Features of values 0..2 (exact float32 dot products: many exact ties) with their ids."""
    gen = torch.Generator().manual_seed(seed)
    qf = torch.randint(0, 3, (q, d), generator=gen).float()
    gf = torch.randint(0, 3, (g, d), generator=gen).float()
    return dict(ids(q, g, seed), qf=qf, gf=gf)


def float_case(q: int, g: int, d: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(ids(q, g, seed), qf=torch.randn(q, d, generator=gen), gf=torch.randn(g, d, generator=gen))


def single(t: dict, **kwargs):
    return evaluate_from_features(t["qf"], t["gf"], t["qp"], t["gp"], t["qc"], t["gc"], **kwargs)


def assert_same_everywhere(records):
    assert all("error" not in r for r in records), [r.get("error") for r in records]
    first = records[0]["result"]
    for r in records[1:]:
        assert torch.equal(r["result"][0], first[0]) and r["result"][1:] == first[1:]
    return first


def evaluation_of_rerank(records):
    """The evaluate_topk result of a "rerank" case (the same on every rank)."""
    assert all("error" not in r for r in records), [r.get("error") for r in records]
    return assert_same_everywhere([dict(r, result=r["result"][0]) for r in records])


def assert_identical(records, ref):
    got = assert_same_everywhere(records)
    assert torch.equal(got[0], ref[0]), (got[0], ref[0])
    assert got[1:] == ref[1:], (got[1:], ref[1:])          # mAP bit for bit, num_valid (num_complete)


def assert_close(records, ref):
    got = assert_same_everywhere(records)
    assert got[2] == ref[2]
    assert abs(got[1] - ref[1]) <= 1e-6
    assert (got[0] - ref[0]).abs().max().item() <= 1e-6


def ties_across_boundaries(t: dict, g_sizes) -> int:
    """(query, true match, negative) triples at exactly the same distance with the two gallery
    items on different ranks: where the tie rule (gallery index) decides across ranks."""
    d = euclidean_distance(t["qf"], t["gf"])
    owner = torch.repeat_interleave(torch.arange(len(g_sizes)), torch.tensor(g_sizes))
    same = t["gp"][None, :] == t["qp"][:, None]
    pos = same & (t["gc"][None, :] != t["qc"][:, None])
    neg = ~same & (t["gp"] != -1)[None, :]
    eq = d[:, :, None] == d[:, None, :]
    cross = owner[:, None] != owner[None, :]
    return int((eq & pos[:, :, None] & neg[:, None, :] & cross[None]).sum())


def error_of(records) -> tuple[str, str]:
    errors = {r.get("error") for r in records}
    assert len(errors) == 1 and None not in errors, errors        # one error, the same on every rank
    return errors.pop()


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

def test_three_ranks_features_topk_rerank_and_errors(tmp_path):
    a = integer_case(50, 240, 4, 0)
    b = integer_case(31, 120, 5, 1)
    f = float_case(60, 400, 16, 2)
    uneven = dict(q_sizes=[20, 0, 30], g_sizes=[100, 1, 139])
    assert ties_across_boundaries(a, uneven["g_sizes"]) > 100
    dense = euclidean_distance(b["qf"], b["gf"])
    values, indices = torch.sort(dense, dim=1, stable=True)
    lists = dict(b, values=values[:, :25].contiguous(), indices=indices[:, :25].contiguous())
    full = dict(b, values=dense, indices=torch.arange(120).expand(31, 120).contiguous())
    qr, gr = clustered_feats(40, 150, 16, 3)
    rr = dict(ids(40, 150, 3, num_ids=6), qf=qr, gf=gr)
    junk_slice = dict(b, gp=b["gp"].clone())
    junk_slice["gp"][40:80] = -1                                       # rank 1's gallery: junk only
    good = [
        dict(kind="features", tensors=a, kwargs={"max_rank": 30}, **uneven),
        dict(kind="features", tensors=a, kwargs={"chunk_size": 3}, q_sizes=[0, 50, 0], g_sizes=[0, 0, 240]),
        dict(kind="features", tensors=b, kwargs={"chunk_size": 4, "max_rank": 5}, q_sizes=[10, 10, 11],
             g_sizes=[40, 40, 40]),
        dict(kind="features", tensors=junk_slice, kwargs={"chunk_size": 7}, q_sizes=[10, 10, 11],
             g_sizes=[40, 40, 40]),
        dict(kind="features", tensors=f, kwargs={"chunk_size": 16}, q_sizes=[25, 25, 10], g_sizes=[133, 0, 267]),
        dict(kind="topk", tensors=lists, kwargs={"max_rank": 20}, q_sizes=[0, 20, 11], g_sizes=[60, 0, 60]),
        dict(kind="topk", tensors=full, kwargs={"max_rank": 50}, q_sizes=[15, 16, 0], g_sizes=[1, 118, 1]),
        dict(kind="rerank", tensors=rr, kwargs={"m": 15}, q_sizes=[13, 0, 27], g_sizes=[50, 60, 40]),
    ]
    bad_ids = dict(b, qp=torch.full((31,), 99))
    split = dict(q_sizes=[10, 10, 11], g_sizes=[40, 40, 40])
    bad = [
        (dict(kind="features", tensors=b, per_rank={2: {"qf": b["qf"][20:, :3].clone(),
                                                        "gf": b["gf"][80:, :3].clone()}}, **split),
         "feature dims differ across ranks: rank 0 has 5, rank 2 has 3"),
        (dict(kind="features", tensors=b, per_rank={1: {"qf": b["qf"][10:20].double(), "gf": b["gf"][40:80].double()}},
              **split), "feature dtypes differ across ranks"),
        (dict(kind="features", tensors=b, per_rank={1: {"qp": b["qp"][10:19].clone()}}, **split),
         "rank 1: q_pids has 9 entries but this rank's query_feats has 10 rows"),
        (dict(kind="features", tensors=bad_ids, **split), "none of the 31 queries has a true match"),
        (dict(kind="features", tensors=b, kwargs={"max_rank": 10}, rank_kwargs={2: {"max_rank": 9}}, **split),
         "arguments differ across ranks"),
        (dict(kind="topk", tensors=dict(lists, indices=lists["indices"] + 100), **split),
         "indices must lie in 0..119"),
        (dict(kind="topk", tensors=lists, per_rank={0: {"values": lists["values"][:10, :24].clone(),
                                                        "indices": lists["indices"][:10, :24].clone()}}, **split),
         "list lengths m differ across ranks"),
    ]
    after = dict(kind="features", tensors=b, kwargs={}, **split)     # the group still works after the errors
    records = run_group(tmp_path, 3, good + [case for case, _ in bad] + [after])

    for case, recs in zip(good[:4], records):
        assert_identical(recs, single(case["tensors"], **{k: v for k, v in case["kwargs"].items()}))
    assert_close(records[4], single(f, chunk_size=16))
    assert_identical(records[5], evaluate_topk(lists["values"], lists["indices"], b["qp"], b["gp"], b["qc"], b["gc"],
                                               max_rank=20))
    assert_identical(records[6], evaluate_topk(dense, full["indices"], b["qp"], b["gp"], b["qc"], b["gc"]))
    # evaluate_topk on the rows of sharded fmn.rerank equals one process on one process's rerank rows
    got = evaluation_of_rerank(records[7])
    v1, i1 = rerank(qr, gr, topk=15)
    ref = evaluate_topk(v1, i1, rr["qp"], rr["gp"], rr["qc"], rr["gc"], max_rank=20)
    assert torch.equal(got[0], ref[0]) and got[1:] == ref[1:]
    v, i = (torch.cat([r["result"][k] for r in records[7]]) for k in (1, 2))
    assert torch.equal(i, i1) and (v - v1).abs().max().item() <= 1e-6

    for recs, (_, message) in zip(records[len(good):], bad):
        kind, text = error_of(recs)
        assert message in text and kind == "ValueError", (message, text)
    assert_identical(records[-1], single(b))


def test_two_ranks_torch_sort_path_bounded_memory_rerank_and_a_non_finite_distance(tmp_path):
    a = integer_case(64, 300, 6, 4)
    f = float_case(200, 1000, 32, 5)
    big = float_case(1000, 2000, 16, 6)
    qr, gr = clustered_feats(30, 120, 8, 7)
    rr = dict(ids(30, 120, 7, num_ids=5), qf=qr, gf=gr)
    assert ties_across_boundaries(a, [157, 143]) > 100
    cases = [
        dict(kind="features", tensors=a, kwargs={"chunk_size": 5}, q_sizes=[64, 0], g_sizes=[157, 143]),
        dict(kind="features", tensors=a, kwargs={}, q_sizes=[33, 31], g_sizes=[0, 300]),
        dict(kind="features", tensors=a, kwargs={"chunk_size": 9}, q_sizes=[30, 34], g_sizes=[151, 149],
             numpy_sort=False),
        dict(kind="features", tensors=f, kwargs={}, q_sizes=[120, 80], g_sizes=[450, 550]),
        dict(kind="features", tensors=big, kwargs={"chunk_size": 50}, q_sizes=[500, 500], g_sizes=[1000, 1000],
             profile=True),
        dict(kind="features", tensors=big, kwargs={"chunk_size": 500}, q_sizes=[500, 500], g_sizes=[1000, 1000],
             profile=True),
        dict(kind="features", tensors=dict(a, qf=a["qf"].clone().index_fill_(0, torch.tensor([40]), float("inf"))),
             kwargs={"chunk_size": 4}, q_sizes=[32, 32], g_sizes=[150, 150]),
        dict(kind="rerank", tensors=rr, kwargs={"m": 120}, q_sizes=[20, 10], g_sizes=[60, 60]),
    ]
    records = run_group(tmp_path, 2, cases)
    assert_identical(records[0], single(a, chunk_size=5))
    assert_identical(records[1], single(a))
    assert_identical(records[2], single(a))                 # rows ranked by torch.sort (the GPU path)
    assert_close(records[3], single(f))
    assert_close(records[4], single(big))
    # per rank no allocation larger than a (chunk, g_r) block of 8-byte entries (chunks of 50 rows),
    # far from the (q, g) matrix; with chunks of a rank's 500 queries the same measurement sees that block
    assert all(r["largest"] <= 50 * 1000 * 8 for r in records[4]), [r["largest"] for r in records[4]]
    assert all(r["largest"] >= 500 * 1000 * 4 for r in records[5]), [r["largest"] for r in records[5]]
    kind, text = error_of(records[6])                        # raised mid-stream; the group goes on
    assert "distance from query 40 to gallery item 0 is not finite" in text
    got = evaluation_of_rerank(records[7])
    v1, i1 = rerank(qr, gr, topk=120)
    ref = evaluate_topk(v1, i1, rr["qp"], rr["gp"], rr["qc"], rr["gc"], max_rank=20)
    assert torch.equal(got[0], ref[0]) and got[1:] == ref[1:]


def test_process_group_without_torch_distributed():
    t = integer_case(4, 10, 3, 8)
    if dist.is_initialized():
        pytest.skip("a process group is running in this process")
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        single(t, process_group=object())
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        evaluate_topk(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.long), t["qp"], t["gp"], t["qc"], t["gc"],
                      process_group=object())


# --------------------------------------------------------------------------------------------
# fmn rerank --query-ids / --gallery-ids
# --------------------------------------------------------------------------------------------

def _write_inputs(tmp_path):
    q, g = clustered_feats(27, 110, 16, 9)
    t = ids(27, 110, 9, num_ids=6)
    np.save(tmp_path / "q.npy", q.numpy())
    torch.save(g, tmp_path / "g.pt")
    np.save(tmp_path / "qid.npy", torch.stack([t["qp"], t["qc"]], 1).numpy())
    torch.save(torch.stack([t["gp"], t["gc"]], 1).int(), tmp_path / "gid.pt")
    return ["--query", str(tmp_path / "q.npy"), "--gallery", str(tmp_path / "g.pt"),
            "--query-ids", str(tmp_path / "qid.npy"), "--gallery-ids", str(tmp_path / "gid.pt")]


def _evaluation_lines(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("evaluation:"))
    return lines[start:start + 3]


def _torchrun(nproc: int, argv: list[str]):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "fmn.cli", "rerank", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("evaluation:") == 1                      # rank 0 prints
    return _evaluation_lines(proc.stdout)


def test_fmn_rerank_ids_under_torchrun_print_the_numbers_of_one_process(tmp_path, capsys):
    argv = _write_inputs(tmp_path)
    assert main(["rerank", *argv, "--out", str(tmp_path / "one.pt"), "--topk", "20"]) == 0
    one = _evaluation_lines(capsys.readouterr().out)
    assert one[1].startswith("  features   rank-1") and one[2].startswith("  re-ranked  rank-1") and "top-20" in one[2]
    assert _torchrun(2, [*argv, "--out", str(tmp_path / "two.pt"), "--topk", "20"]) == one
    # dense rows: fmn.metrics.evaluate in one process, evaluate_topk over the whole gallery under torchrun
    assert main(["rerank", *argv, "--out", str(tmp_path / "dense.pt")]) == 0
    dense = _evaluation_lines(capsys.readouterr().out)
    assert dense[1] == one[1] and "top-" not in dense[2]
    assert _torchrun(3, [*argv, "--out", str(tmp_path / "dense3.pt")]) == dense


def test_fmn_rerank_bad_ids(tmp_path, capsys):
    argv = _write_inputs(tmp_path)
    np.save(tmp_path / "three.npy", np.zeros((27, 3), dtype=np.int64))
    np.save(tmp_path / "short.npy", np.zeros((26, 2), dtype=np.int64))
    np.save(tmp_path / "float.npy", np.zeros((27, 2), dtype=np.float32))
    out = ["--out", str(tmp_path / "o.pt")]
    cases = [
        (["--query-ids", str(tmp_path / "three.npy")], "expected an (n, 2) integer array of (pid, camid) rows"),
        (["--query-ids", str(tmp_path / "short.npy")], "has 26 rows but --query has 27"),
        (["--query-ids", str(tmp_path / "float.npy")], "got shape (27, 2) and dtype torch.float32"),
        (["--query-ids", str(tmp_path / "missing.npy")], "id file not found"),
    ]
    for extra, message in cases:
        assert main(["rerank", *argv, *out, *extra]) == 2, extra
        assert message in one_error(capsys, "rerank"), (extra, message)
    assert main(["rerank", *argv[:4], "--query-ids", argv[5], *out]) == 2
    assert "--query-ids and --gallery-ids go together" in one_error(capsys, "rerank")
    assert not (tmp_path / "o.pt").exists()
