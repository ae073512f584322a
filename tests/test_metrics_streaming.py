"""fmn.metrics.evaluate_from_features (CMC/mAP from features, one block of query rows at a time)
against evaluate(euclidean_distance(qf, gf)), its memory bound, and fmn.metrics.evaluate_topk
(top-m lists, e.g. from fmn.rerank(..., topk=m)) against the dense path and a per-query loop."""
import re

import numpy as np
import pytest
import torch

import fmn
import fmn.metrics as M
from fmn.metrics import euclidean_distance, evaluate, evaluate_from_features, evaluate_topk
from test_metrics_protocol import _protocol_reference

JUNK = -1


def _ids(g, nq, ng, npid, ncam):
    # Junk (-1) and distractor (0) ids included; few cameras, so some queries have no valid match.
    return (torch.randint(-1, npid, (nq,), generator=g), torch.randint(-1, npid, (ng,), generator=g),
            torch.randint(0, ncam, (nq,), generator=g), torch.randint(0, ncam, (ng,), generator=g))


def _features(g, nq, ng, d, dtype, kind):
    if kind == "ties":
        # Small integer features: many exactly equal distances, duplicate gallery rows and queries
        # equal to gallery rows (distance 0, the near-duplicate recomputation of euclidean_distance).
        qf = torch.randint(0, 3, (nq, d), generator=g).to(dtype)
        gf = torch.randint(0, 3, (ng, d), generator=g).to(dtype)
        gf[: ng // 3] = gf[ng // 3: 2 * (ng // 3)]
        qf[: min(nq, ng) // 2] = gf[: min(nq, ng) // 2]
    else:
        qf = torch.randn(nq, d, generator=g, dtype=dtype)
        gf = torch.randn(ng, d, generator=g, dtype=dtype)
    return qf, gf


def _same_or_both_raise(feats, ids, **kw):
    """evaluate_from_features == evaluate(euclidean_distance(...)) bit for bit; True if checked."""
    try:
        ref = evaluate(euclidean_distance(*feats), *ids, **{k: v for k, v in kw.items() if k == "max_rank"})
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e).split(": ", 1)[1])):
            evaluate_from_features(*feats, *ids, **kw)
        return False
    out = evaluate_from_features(*feats, *ids, **kw)
    assert out[2] == ref[2]
    assert torch.equal(out[0], ref[0]), (out[0], ref[0])
    assert out[1] == ref[1], (out[1], ref[1])
    return True


@pytest.mark.parametrize("block_elems", [None, 700])
@pytest.mark.parametrize("kind", ["randn", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_features_path_equals_dense_path_bit_for_bit(dtype, kind, block_elems, monkeypatch):
    # block_elems=700: euclidean_distance's row blocks (of both paths) only a few rows high, so a
    # problem spans many blocks and chunks end inside and across them.
    if block_elems is not None:
        monkeypatch.setitem(M._DIST_BLOCK_ELEMS, "cpu", block_elems)
    g = torch.Generator().manual_seed((dtype == torch.float64) + 2 * (kind == "ties") + 4 * (block_elems is None))
    checked = 0
    for _ in range(12):
        nq, ng = int(torch.randint(1, 60, (1,), generator=g)), int(torch.randint(1, 150, (1,), generator=g))
        d = int(torch.randint(1, 40, (1,), generator=g))
        feats = _features(g, nq, ng, d, dtype, kind)
        ids = _ids(g, nq, ng, int(torch.randint(1, 8, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g)))
        for chunk in (1, 2, 7, nq, nq + 5, None):
            checked += _same_or_both_raise(feats, ids, chunk_size=chunk, max_rank=int(torch.randint(1, 30, (1,), generator=g)))
    assert checked > 30


def test_features_path_at_several_natural_blocks_and_d_2048():
    # Default block sizes: 8M entries // 20000 = 419 rows per GEMM block, 3 blocks; d = 2048 is
    # where GEMMs of different heights disagree in the last bits on MKL.
    g = torch.Generator().manual_seed(21)
    nq, ng = 1000, 20000
    qf, gf = torch.randn(nq, 8, generator=g), torch.randn(ng, 8, generator=g)
    ids = _ids(g, nq, ng, 400, 6)
    for chunk in (1000, 37, None):
        assert _same_or_both_raise((qf, gf), ids, chunk_size=chunk)
    qf, gf = torch.randn(200, 2048, generator=g), torch.randn(1500, 2048, generator=g)
    ids = _ids(g, 200, 1500, 50, 3)
    for chunk in (1, 13, None):
        assert _same_or_both_raise((qf, gf), ids, chunk_size=chunk)


@pytest.mark.parametrize("d, dtype", [(512, torch.float32), (64, torch.float64), (33, torch.float32)])
def test_the_ranked_distance_blocks_are_euclidean_distance_rows(d, dtype, monkeypatch):
    # Every distance the ranking sees equals the dense matrix's entry bit for bit (junk columns
    # dropped), whatever the chunk size: also where a GEMM of the chunk's own height would differ.
    monkeypatch.setitem(M._DIST_BLOCK_ELEMS, "cpu", 701 * 8)
    g = torch.Generator().manual_seed(d)
    nq, ng = 90, 701
    qf, gf = _features(g, nq, ng, d, dtype, "randn")
    ids = _ids(g, nq, ng, 20, 3)
    keep = ids[1] != JUNK
    full = euclidean_distance(qf, gf)[:, keep]
    rank = M._Ranking.rank
    for chunk in (1, 3, 8, 20, None):
        seen = torch.full_like(full, float("nan"))

        def record(self, block, s0, rows, pool):
            seen[s0:s0 + block.shape[0]] = block
            return rank(self, block, s0, rows, pool)

        monkeypatch.setattr(M._Ranking, "rank", record)
        evaluate_from_features(qf, gf, *ids, chunk_size=chunk)
        monkeypatch.setattr(M._Ranking, "rank", rank)
        assert torch.equal(seen, full), chunk


def test_matches_the_independent_protocol_reference():
    g = torch.Generator().manual_seed(22)
    qf, gf = _features(g, 70, 260, 6, torch.float64, "ties")
    ids = _ids(g, 70, 260, 12, 3)
    ref_cmc, ref_map, ref_n, skipped = _protocol_reference(euclidean_distance(qf, gf), *ids, 20)
    assert skipped > 0 and (ids[1] == JUNK).any()
    cmc, mAP, n = evaluate_from_features(qf, gf, *ids, max_rank=20, chunk_size=9)
    assert n == ref_n and mAP == pytest.approx(ref_map, abs=1e-12)
    assert cmc.tolist() == pytest.approx(ref_cmc, abs=1e-7)


def test_largest_distance_block_is_bounded_by_the_chunk_not_the_query_set(monkeypatch):
    # Distances are computed in euclidean_distance's blocks of R rows (here 8), aligned as there;
    # a step holds max(R, chunk) rows rounded down to whole blocks, never the (q, g) matrix.
    nq, ng = 300, 500
    monkeypatch.setitem(M._DIST_BLOCK_ELEMS, "cpu", 8 * ng)
    g = torch.Generator().manual_seed(23)
    qf, gf = _features(g, nq, ng, 16, torch.float32, "randn")
    ids = _ids(g, nq, ng, 30, 4)
    sq_rows = M._sq_distance_rows
    for chunk, held in ((1, 8), (5, 8), (8, 8), (30, 24), (299, 296), (300, 300), (1000, 300)):
        gemm, ranked = [], []
        rank = M._Ranking.rank

        def gemm_rows(x, b, b2, o):
            gemm.append((x.data_ptr(), o.shape[0]))
            return sq_rows(x, b, b2, o)

        def rank_rows(self, block, s0, rows, pool):
            ranked.append((s0, block.shape[0], rows))
            return rank(self, block, s0, rows, pool)

        monkeypatch.setattr(M, "_sq_distance_rows", gemm_rows)
        monkeypatch.setattr(M._Ranking, "rank", rank_rows)
        evaluate_from_features(qf, gf, *ids, chunk_size=chunk)
        monkeypatch.setattr(M._Ranking, "rank", rank)
        assert [h for _, h in gemm] == [8] * 37 + [4]                        # 300 = 37 * 8 + 4
        assert [p for p, _ in gemm] == [qf[s:].data_ptr() for s in range(0, nq, 8)]
        assert max(n for _, n, _ in ranked) == held
        assert all(rows == min(chunk, nq) for _, _, rows in ranked)
        assert sum(n for _, n, _ in ranked) == nq


def _peak_cpu_bytes(fn):
    """Largest total of live torch CPU allocations made while ``fn`` runs (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("numpy_sort", [True, False])
def test_peak_allocation_is_order_chunk_times_gallery(numpy_sort, monkeypatch):
    # One thread: every chunk runs on this thread, which the profiler records. The dense path's
    # peak is measured the same way, so the measurement is seen to catch a (q, g) matrix.
    monkeypatch.setattr(M, "_NUMPY_SORT", numpy_sort)
    nq, ng, block_rows, chunk = 3000, 2000, 16, 4
    monkeypatch.setitem(M._DIST_BLOCK_ELEMS, "cpu", block_rows * ng)
    g = torch.Generator().manual_seed(24)
    qf, gf = _features(g, nq, ng, 32, torch.float32, "randn")
    ids = _ids(g, nq, ng, 100, 6)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense = _peak_cpu_bytes(lambda: evaluate(euclidean_distance(qf, gf), *ids))
        chunked = _peak_cpu_bytes(lambda: evaluate_from_features(qf, gf, *ids, chunk_size=chunk))
    finally:
        torch.set_num_threads(prev)
    qg = nq * ng * 4
    assert dense >= qg
    # The held block (16 rows), a chunk's sort and gathers (a few (4, g) tensors of 8 bytes),
    # and O(q + g) vectors of ids and per-query results.
    assert chunked <= 8 * block_rows * ng * 8 + 64 * (nq + ng) * 8 < qg / 2, (chunked, qg)


def test_no_temporary_the_size_of_the_gallery_features():
    # Squared norms of a (g, d) gallery were computed through a (g, d) product: as large as the
    # gallery features themselves (8 GB at 10^6 x 2048 fp32).
    g = torch.Generator().manual_seed(32)
    qf, gf = torch.randn(50, 4096, generator=g), torch.randn(3000, 4096, generator=g)
    ids = _ids(g, 50, 3000, 40, 3)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = _peak_cpu_bytes(lambda: evaluate_from_features(qf, gf, *ids))
    finally:
        torch.set_num_threads(prev)
    assert peak < gf.numel() * 4 / 4, peak


def test_inputs_of_other_types_and_layouts():
    g = torch.Generator().manual_seed(25)
    qf, gf = _features(g, 40, 120, 12, torch.float32, "randn")
    ids = _ids(g, 40, 120, 10, 3)
    ref = evaluate(euclidean_distance(qf, gf), *ids)
    for args in ((qf.numpy(), gf.numpy()), (qf.t().contiguous().t(), gf[::1]),
                 (qf.clone().requires_grad_(), gf)):
        out = evaluate_from_features(*args, *[x.numpy() for x in ids], chunk_size=7)
        assert torch.equal(out[0], ref[0]) and out[1:] == ref[1:]
    # fp16 features are widened to fp32, as euclidean_distance does.
    half = evaluate(euclidean_distance(qf.half(), gf.half()), *ids)
    out = evaluate_from_features(qf.half(), gf.half(), *ids, chunk_size=3)
    assert torch.equal(out[0], half[0]) and out[1:] == half[1:]
    big = torch.randn(3 * 40, 12, generator=g)[::3]                      # strided rows
    ref = evaluate(euclidean_distance(big, gf), *ids)
    out = evaluate_from_features(big, gf, *ids, chunk_size=5)
    assert torch.equal(out[0], ref[0]) and out[1:] == ref[1:]


def test_bad_inputs():
    qf, gf = torch.randn(3, 4), torch.randn(5, 4)
    ids = ([1, 2, 3], [1, 2, 3, 1, 2], [0, 0, 0], [1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"query_feats \(m, d\) and gallery_feats \(n, d\)"):
        evaluate_from_features(qf, torch.randn(5, 3), *ids)
    with pytest.raises(ValueError, match="g_pids has 4 entries but query_feats has 3 rows and gallery_feats 5"):
        evaluate_from_features(qf, gf, ids[0], ids[1][:4], *ids[2:])
    with pytest.raises(ValueError, match="query set is empty"):
        evaluate_from_features(qf[:0], gf, [], ids[1], [], ids[3])
    with pytest.raises(ValueError, match="gallery is empty"):
        evaluate_from_features(qf, gf[:0], ids[0], [], ids[2], [])
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        evaluate_from_features(qf, gf, *ids, chunk_size=0)
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_from_features(qf, gf, *ids, max_rank=0)
    with pytest.raises(ValueError, match="junk identity"):
        evaluate_from_features(qf, gf, ids[0], [-1] * 5, *ids[2:])
    with pytest.raises(ValueError, match="none of the 3 queries"):
        evaluate_from_features(qf, gf, ids[0], ids[1], ids[2], [0] * 5)
    with pytest.raises(TypeError, match="q_camids"):
        evaluate_from_features(qf, gf, ids[0], ids[1], ["a", "b", "c"], ids[3])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("chunk", [1, None])
def test_non_finite_distances_name_the_pair(bad, chunk, monkeypatch):
    monkeypatch.setitem(M._DIST_BLOCK_ELEMS, "cpu", 10)
    qf, gf = torch.randn(6, 4), torch.randn(5, 4)
    ids = ([1, 2, 3, 1, 2, 9], [1, 2, 3, 1, -1], [0] * 6, [1] * 5)
    gf[4, 2] = bad                                          # a junk item: still an error
    with pytest.raises(ValueError, match="query 0 to gallery item 4 is not finite"):
        evaluate_from_features(qf, gf, *ids, chunk_size=chunk)
    gf[4, 2] = 0.0
    qf[5] = 3e19                                            # finite, but its square overflows fp32
    with pytest.raises(ValueError, match="query 5 to gallery item 0 is not finite.*too large"):
        evaluate_from_features(qf, gf, *ids, chunk_size=chunk)
    assert evaluate_from_features(qf.double(), gf.double(), *ids, chunk_size=chunk)[2] == 5


@pytest.mark.cuda
def test_cuda_features_path_equals_cuda_dense_path():
    g = torch.Generator().manual_seed(26)
    qf, gf = _features(g, 700, 3000, 256, torch.float32, "randn")
    ids = _ids(g, 700, 3000, 80, 6)
    cuda = [x.cuda() for x in (qf, gf, *ids)]
    ref = evaluate(euclidean_distance(*cuda[:2]), *cuda[2:])
    for chunk in (1, 100, None):
        out = evaluate_from_features(*cuda, chunk_size=chunk)
        assert torch.equal(out[0], ref[0]) and out[1:] == ref[1:]


# ------------------------------------------------------------------------------------------
# evaluate_topk
# ------------------------------------------------------------------------------------------

def _topk_reference(dist, q_pids, g_pids, q_camids, g_camids, m):
    """Per query, from the dense row: its m nearest by (distance, index), filtered; AP over that
    list divided by the query's true matches in the whole gallery. Returns the first-hit ranks
    (1-based, None), APs, valid flags and complete flags."""
    rows = torch.as_tensor(dist).tolist()
    firsts, aps, valid, complete = [], [], [], []
    for i, row in enumerate(rows):
        top = sorted(range(len(row)), key=lambda j: (row[j], j))[:m]
        matches_all = [j for j in range(len(row)) if g_pids[j] == q_pids[i] != JUNK and g_camids[j] != q_camids[i]]
        kept = [j for j in top if g_pids[j] != JUNK and not (g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i])]
        hit_ranks = [r + 1 for r, j in enumerate(kept) if g_pids[j] == q_pids[i]]
        valid.append(bool(matches_all))
        complete.append(bool(matches_all) and len(hit_ranks) == len(matches_all))
        firsts.append(hit_ranks[0] if hit_ranks else None)
        aps.append(sum((n + 1) / r for n, r in enumerate(hit_ranks)) / len(matches_all) if matches_all else 0.0)
    return firsts, aps, valid, complete


def _problem_topk(g, nq, ng, kind):
    if kind == "ties":
        dist = torch.randint(0, 4, (nq, ng), generator=g).float()
    else:
        dist = torch.rand(nq, ng, generator=g, dtype=torch.float64)
    return (dist, *_ids(g, nq, ng, 6, 3))


@pytest.mark.parametrize("kind", ["distinct", "ties"])
def test_topk_of_the_whole_gallery_equals_dense(kind):
    g = torch.Generator().manual_seed(27 + (kind == "ties"))
    checked = 0
    for _ in range(30):
        nq, ng = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 60, (1,), generator=g))
        dist, *ids = _problem_topk(g, nq, ng, kind)
        values, indices = torch.sort(dist, dim=1, stable=True)
        shuffle = torch.randperm(ng, generator=g)                    # any order within a row
        try:
            ref = evaluate(dist, *ids, max_rank=10)
        except ValueError:
            with pytest.raises(ValueError):
                evaluate_topk(values, indices, *ids, max_rank=10)
            continue
        for v, i in ((values, indices), (values[:, shuffle], indices[:, shuffle])):
            cmc, mAP, n, complete = evaluate_topk(v, i, *ids, max_rank=10)
            assert torch.equal(cmc, ref[0]) and mAP == ref[1] and n == ref[2] == complete
        checked += 1
    assert checked > 15


def test_topk_of_rerank_with_the_whole_gallery_equals_dense_rerank():
    g = torch.Generator().manual_seed(29)
    nq, ng = 40, 150
    qf, gf = torch.randn(nq, 16, generator=g), torch.randn(ng, 16, generator=g)
    ids = _ids(g, nq, ng, 12, 3)
    dense = evaluate(fmn.rerank(qf, gf), *ids)
    values, indices = fmn.rerank(qf, gf, topk=ng)
    cmc, mAP, n, complete = evaluate_topk(values, indices, *ids)
    assert torch.equal(cmc, dense[0]) and mAP == dense[1] and n == dense[2] == complete
    values, indices = fmn.rerank(qf, gf, topk=10)
    cmc, mAP, n, complete = evaluate_topk(values, indices, *ids, max_rank=20)
    assert cmc.shape == (10,) and n == dense[2] and complete < n and mAP < dense[1]


@pytest.mark.parametrize("m", [1, 3, 10, 25])
def test_truncated_lists_match_the_per_query_reference(m):
    g = torch.Generator().manual_seed(30 + m)
    dist, *ids = _problem_topk(g, 60, 40, "ties")
    values, indices = torch.sort(dist, dim=1, stable=True)
    firsts, aps, valid, complete = _topk_reference(dist, *ids, m)
    cmc, mAP, n, n_complete = evaluate_topk(values[:, :m], indices[:, :m], *ids, max_rank=50)
    assert n == sum(valid) and n_complete == sum(complete)
    assert mAP == pytest.approx(sum(a for a, v in zip(aps, valid) if v) / n, abs=1e-12)
    assert cmc.shape == (min(50, m),)
    expect = [sum(1 for f, v in zip(firsts, valid) if v and f is not None and f <= k) / n for k in range(1, len(cmc) + 1)]
    assert cmc.tolist() == pytest.approx(expect, abs=1e-7)
    # CMC equals the dense one up to the shortest filtered list, is a lower bound after it;
    # mAP@m is a lower bound on mAP.
    dense = evaluate(dist, *ids, max_rank=50)
    gp, gc = ids[1][indices[:, :m]], ids[3][indices[:, :m]]
    kept = (gp != JUNK) & ~((gp == ids[0][:, None]) & (gc == ids[2][:, None]))
    shortest = int(kept.sum(1).min())
    assert torch.equal(cmc[:shortest], dense[0][:shortest]) and (cmc <= dense[0][:len(cmc)]).all()
    assert mAP <= dense[1] + 1e-12


def test_topk_is_exact_for_queries_whose_matches_are_all_inside():
    # Every true match placed among each query's 5 nearest: mAP@5 is the full mAP.
    g = torch.Generator().manual_seed(31)
    nq, ng = 30, 90
    q_pids, g_pids = torch.arange(nq) % 10 + 1, torch.arange(ng) % 30 + 1
    q_cams, g_cams = torch.zeros(nq, dtype=torch.long), torch.ones(ng, dtype=torch.long)
    dist = torch.rand(nq, ng, generator=g) + 1
    same = q_pids[:, None] == g_pids[None, :]
    dist[same] = 0.5 * torch.rand(int(same.sum()), generator=g)      # 3 matches per query
    neg = (g_pids[None, :] == (q_pids[:, None] % 10 + 1)).int().argmax(1)
    dist[torch.arange(nq), neg] = 0.5 * torch.rand(nq, generator=g)  # and one negative among them
    values, indices = torch.topk(dist, 5, dim=1, largest=False)
    cmc, mAP, n, complete = evaluate_topk(values, indices, q_pids, g_pids, q_cams, g_cams, max_rank=5)
    ref = evaluate(dist, q_pids, g_pids, q_cams, g_cams, max_rank=5)
    assert n == complete == nq
    assert mAP == pytest.approx(ref[1], abs=1e-12) and torch.equal(cmc, ref[0])


def test_topk_hand_computed():
    # Query id 4, camera 2. List (value, gallery index -> id, camera):
    # g5 (0.1 -> -1, 1) junk   g1 (0.2 -> 4, 2) same id and camera   g2 (0.3 -> 0, 1) negative
    # g3 (0.4 -> 4, 1) match   g0 (0.4 -> 4, 3) match (0.4 tie: index 0 ranks before index 3)
    # The gallery holds a third match (g4) outside the list: P = 3.
    # Filtered ranking g2, g0, g3: matches at ranks 2 and 3, AP = (1/2 + 2/3) / 3.
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.4]])
    indices = torch.tensor([[5, 1, 2, 3, 0]])
    g_pids, g_cams = [4, 4, 0, 4, 4, -1], [3, 2, 1, 1, 1, 1]
    cmc, mAP, n, complete = evaluate_topk(values, indices, [4], g_pids, [2], g_cams, max_rank=4)
    assert (n, complete) == (1, 0)
    assert mAP == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert cmc.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_topk_bad_inputs():
    v, i = torch.rand(2, 3), torch.tensor([[0, 1, 2], [2, 1, 0]])
    ids = ([1, 2], [1, 2, 3, 1], [0, 0], [1, 1, 1, 1])
    assert evaluate_topk(v, i, *ids)[2] == 2
    with pytest.raises(ValueError, match="names a gallery item twice"):
        evaluate_topk(v, torch.tensor([[0, 1, 2], [2, 2, 0]]), *ids)
    with pytest.raises(ValueError, match=r"indices must lie in 0\.\.3"):
        evaluate_topk(v, torch.tensor([[0, 1, 4], [2, 1, 0]]), *ids)
    with pytest.raises(ValueError, match="indices has shape"):
        evaluate_topk(v, i[:, :2], *ids)
    with pytest.raises(ValueError, match="m must lie in 1..4"):
        evaluate_topk(torch.rand(2, 5), torch.arange(5).repeat(2, 1), *ids)
    bad = v.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite entry .* row 1"):
        evaluate_topk(bad, i, *ids)
    with pytest.raises(ValueError, match="g_camids has 3 entries"):
        evaluate_topk(v, i, *ids[:3], [1, 1, 1])
    with pytest.raises(ValueError, match="junk identity"):
        evaluate_topk(v, i, ids[0], [-1] * 4, *ids[2:])
    with pytest.raises(ValueError, match="none of the 2 queries"):
        evaluate_topk(v, i, [7, 8], *ids[1:])
    ref = evaluate_topk(v, i, *ids)
    out = evaluate_topk(v.numpy(), i.numpy(), *[np.asarray(x) for x in ids])
    assert torch.equal(out[0], ref[0]) and out[1:] == ref[1:]
