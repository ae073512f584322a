"""fmn.metrics.evaluate against an independent per-query loop written from the protocol (DESIGN §4),
and its handling of junk ids, float64, non-finite distances and bad inputs.

``_protocol_reference`` is deliberately written without looking at fmn.metrics: plain Python
floats and lists, one query at a time, ``sorted`` on (distance, gallery index).
"""
import math
import warnings

import numpy as np
import pytest
import torch

import fmn.metrics as M
from fmn.metrics import evaluate

JUNK = -1


def _protocol_reference(dist, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Returns (cmc list, mAP, num_valid, num_skipped).

    For query i: drop gallery items of the junk id -1 and those with the query's id AND camera;
    rank the rest by (distance, gallery index); the true matches are the remaining items of the
    query's id. AP = mean over the true matches of (matches so far) / (rank of the match).
    A query with no true match is excluded from CMC and mAP and counted as skipped.
    """
    rows = torch.as_tensor(dist).tolist()          # exact: fp16/fp32/fp64 all fit a Python float
    qp, gp = [int(x) for x in q_pids], [int(x) for x in g_pids]
    qc, gc = [int(x) for x in q_camids], [int(x) for x in g_camids]
    hits_at = [0] * max_rank
    aps, skipped = [], 0
    for i, row in enumerate(rows):
        kept = [j for j in range(len(gp)) if gp[j] != JUNK and not (gp[j] == qp[i] and gc[j] == qc[i])]
        ranked = sorted(kept, key=lambda j: (row[j], j))
        match_ranks = [r + 1 for r, j in enumerate(ranked) if gp[j] == qp[i]]
        if not match_ranks:
            skipped += 1
            continue
        precisions = [(n + 1) / r for n, r in enumerate(match_ranks)]
        aps.append(sum(precisions) / len(precisions))
        for k in range(max_rank):
            if match_ranks[0] <= k + 1:
                hits_at[k] += 1
    n = len(aps)
    if n == 0:
        return None, None, 0, skipped
    return [h / n for h in hits_at], sum(aps) / n, n, skipped


def _problem(g, nq, ng, npid, ncam, kind):
    if kind == "ties":
        dist = torch.randint(0, 4, (nq, ng), generator=g).float()
    elif kind == "float64":
        # Differences far below fp32 resolution: a cast to fp32 would create ties.
        dist = 1.0 + torch.randint(0, 5, (nq, ng), generator=g).double() * 1e-12
    else:
        dist = torch.rand(nq, ng, generator=g)
    # Ids from -1 (junk) and 0 (distractor) upwards; few cameras, so same-camera items are common.
    qp = torch.randint(-1, npid, (nq,), generator=g)
    gp = torch.randint(-1, npid, (ng,), generator=g)
    qc = torch.randint(1, ncam + 1, (nq,), generator=g)
    gc = torch.randint(1, ncam + 1, (ng,), generator=g)
    return dist, qp, gp, qc, gc


def _check(prob, max_rank, **kw):
    ref_cmc, ref_map, ref_n, skipped = _protocol_reference(*prob, max_rank)
    if ref_n == 0:
        with pytest.raises(ValueError, match="none of the|junk identity"):
            evaluate(*prob, max_rank=max_rank, **kw)
        return False
    cmc, mAP, n = evaluate(*prob, max_rank=max_rank, **kw)
    assert n == ref_n and n + skipped == prob[0].shape[0]
    assert cmc.tolist() == pytest.approx(ref_cmc, abs=1e-7)
    assert mAP == pytest.approx(ref_map, abs=1e-12)
    return True


@pytest.mark.parametrize("kind", ["distinct", "ties", "float64"])
@pytest.mark.parametrize("numpy_sort", [True, False])
def test_many_random_problems_match_protocol_reference(kind, numpy_sort, monkeypatch):
    monkeypatch.setattr(M, "_NUMPY_SORT", numpy_sort)
    g = torch.Generator().manual_seed(["distinct", "ties", "float64"].index(kind) * 2 + numpy_sort)
    checked = 0
    for _ in range(80):
        nq = int(torch.randint(1, 25, (1,), generator=g))
        ng = int(torch.randint(1, 50, (1,), generator=g))
        prob = _problem(g, nq, ng, int(torch.randint(1, 7, (1,), generator=g)),
                        int(torch.randint(1, 4, (1,), generator=g)), kind)
        chunk = int(torch.randint(1, 400, (1,), generator=g))
        checked += _check(prob, max_rank=int(torch.randint(1, 12, (1,), generator=g)), chunk_elems=chunk)
    assert checked > 40


def test_larger_problem_with_junk_distractors_and_ties():
    g = torch.Generator().manual_seed(11)
    prob = _problem(g, 150, 700, 30, 6, "ties")
    assert (prob[2] == JUNK).any() and (prob[2] == 0).any()
    assert _check(prob, max_rank=50)
    assert _check(prob, max_rank=50, chunk_elems=3000)


def test_hand_computed_market_convention():
    # Query id 4, camera 2. Gallery (distance, id, camera):
    # g0 (0.1, -1, 1) junk: removed        g1 (0.2, 4, 2) same id and camera: removed
    # g2 (0.3, 0, 1) distractor: negative  g3 (0.4, 4, 1) match    g4 (0.5, 8, 3) negative
    # g5 (0.6, 4, 3) match
    # Ranking g2, g3, g4, g5: matches at ranks 2 and 4, AP = (1/2 + 2/4) / 2 = 0.5, rank-1 miss.
    dist = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    cmc, mAP, n = evaluate(dist, [4], [-1, 4, 0, 4, 8, 4], [2], [1, 2, 1, 1, 3, 3], max_rank=4)
    assert n == 1 and mAP == pytest.approx(0.5) and cmc.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_junk_gallery_items_are_removed():
    # Without the junk removal g0 would be a negative ahead of the match: AP 1/2 instead of 1.
    dist = torch.tensor([[0.1, 0.2, 0.3]])
    cmc, mAP, n = evaluate(dist, [5], [-1, 5, 7], [0], [1, 1, 1], max_rank=3)
    assert (n, mAP, cmc.tolist()) == (1, 1.0, [1.0, 1.0, 1.0])


def test_junk_query_is_skipped_and_all_junk_gallery_raises():
    # A query of id -1 must not "match" junk gallery items.
    dist = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    cmc, mAP, n = evaluate(dist, [-1, 5], [-1, 5, 7], [0, 0], [1, 1, 1], max_rank=3)
    assert n == 1 and mAP == pytest.approx(0.5)
    with pytest.raises(ValueError, match="junk"):
        evaluate(dist, [-1, 5], [-1, -1, -1], [0, 0], [1, 1, 1])


def test_query_whose_matches_are_all_filtered_is_excluded_from_map():
    # Query 0's only same-id item shares its camera; query 1 ranks its match first.
    dist = torch.tensor([[0.1, 0.5, 0.9], [0.9, 0.1, 0.5]])
    cmc, mAP, n = evaluate(dist, [1, 2], [1, 2, 3], [1, 1], [1, 2, 2], max_rank=2)
    assert n == 1 and mAP == 1.0 and cmc.tolist() == [1.0, 1.0]     # not averaged with a 0


def test_float64_is_not_rounded_to_float32():
    # The match (g0) is 1e-12 farther than the negative: in fp32 both are 1.0 and the tie
    # (broken by index) would put the match first.
    dist = torch.tensor([[1.0 + 1e-12, 1.0]], dtype=torch.float64)
    cmc, mAP, n = evaluate(dist, [5], [5, 7], [0], [1, 1], max_rank=2)
    assert mAP == 0.5 and cmc.tolist() == [0.0, 1.0]
    cmc, mAP, n = evaluate(dist.float(), [5], [5, 7], [0], [1, 1], max_rank=2)
    assert mAP == 1.0


def test_ties_are_broken_by_gallery_index_and_order_is_otherwise_irrelevant():
    g = torch.Generator().manual_seed(12)
    dist, qp, gp, qc, gc = _problem(g, 40, 120, 8, 3, "distinct")
    base = evaluate(dist, qp, gp, qc, gc)
    perm = torch.randperm(120, generator=g)
    shuffled = evaluate(dist[:, perm], qp, gp[perm], qc, gc[perm])      # distinct values: same result
    assert torch.equal(base[0], shuffled[0]) and base[1] == pytest.approx(shuffled[1], abs=1e-12)
    # All distances equal: the ranking is the gallery order, so reversing it changes the result.
    flat = torch.ones(1, 4)
    assert evaluate(flat, [1], [1, 2, 2, 2], [0], [1] * 4, max_rank=1)[1] == 1.0
    assert evaluate(flat, [1], [2, 2, 2, 1], [0], [1] * 4, max_rank=1)[1] == 0.25


@pytest.mark.parametrize("chunk_elems", [None, 4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_distances_raise_whatever_the_chunking(bad, chunk_elems):
    # Row 2's query id (9) is not in the gallery, so that row's chunk has no true match at all.
    dist = torch.rand(3, 4)
    dist[2, 1] = bad
    with pytest.raises(ValueError, match=r"finite.*dist\[2, 1\]"):
        evaluate(dist, [1, 2, 9], [1, 2, 3, 4], [0, 0, 0], [1, 1, 1, 1], chunk_elems=chunk_elems)
    dist = torch.rand(3, 4, dtype=torch.float64)
    dist[0, 3] = bad                                      # on a junk column: still an error
    with pytest.raises(ValueError, match="finite"):
        evaluate(dist, [1, 2, 3], [1, 2, 3, -1], [0, 0, 0], [1, 1, 1, 1], chunk_elems=chunk_elems)


def test_dist_that_requires_grad():
    a = torch.randn(6, 5, requires_grad=True)
    d = torch.cdist(a, torch.randn(9, 5))
    ids = torch.arange(9) % 3
    out = evaluate(d, ids[:6], ids, torch.zeros(6), torch.ones(9))
    ref = evaluate(d.detach(), ids[:6], ids, torch.zeros(6), torch.ones(9))
    assert torch.equal(out[0], ref[0]) and out[1:] == ref[1:]


@pytest.mark.parametrize("which", range(4))
def test_mismatched_id_arrays_name_the_array(which):
    names = ["q_pids", "g_pids", "q_camids", "g_camids"]
    args = [[1, 2], [1, 2, 3], [0, 0], [1, 1, 1]]
    args[which] = args[which] + [1]
    with pytest.raises(ValueError, match=names[which]):
        evaluate(torch.rand(2, 3), *args)


def test_empty_inputs_and_bad_ids():
    with pytest.raises(ValueError, match="query set is empty"):
        evaluate(torch.rand(0, 3), [], [1, 2, 3], [], [1, 1, 1])
    with pytest.raises(ValueError, match="gallery is empty"):
        evaluate(torch.rand(2, 0), [1, 2], [], [0, 0], [])
    with pytest.raises(ValueError, match="max_rank"):
        evaluate(torch.rand(1, 2), [1], [1, 2], [0], [1, 1], max_rank=0)
    # Float ids that are not integers would be truncated (1.5 and 1.2 -> 1, a false match).
    with pytest.raises(ValueError, match="q_pids must hold integer"):
        evaluate(torch.rand(1, 2), [1.5], [1.2, 2.0], [0], [1, 1])
    assert evaluate(torch.tensor([[0.2, 0.1]]), [1.0], np.array([2.0, 1.0]), [0], [1, 1])[1] == 1.0
    with pytest.raises(TypeError, match="g_camids"):
        evaluate(torch.rand(1, 2), [1], [1, 2], [0], ["c1", "c2"])


def test_half_and_integer_distances_are_exact():
    g = torch.Generator().manual_seed(13)
    prob = _problem(g, 30, 80, 6, 3, "ties")
    ref = _protocol_reference(*prob, 10)
    for d in (prob[0].half(), prob[0].bfloat16(), prob[0].long(), prob[0].numpy()):
        cmc, mAP, n = evaluate(d, *prob[1:], max_rank=10)
        assert n == ref[2] and mAP == pytest.approx(ref[1], abs=1e-12)
        assert cmc.tolist() == pytest.approx(ref[0], abs=1e-7)
    assert not math.isnan(ref[1])


@pytest.mark.parametrize("numpy_sort", [True, False])
def test_non_contiguous_distances_and_ids_match_and_do_not_warn(numpy_sort, monkeypatch):
    # Every input a strided view of a larger tensor, as when evaluating a slice of a bigger run.
    monkeypatch.setattr(M, "_NUMPY_SORT", numpy_sort)
    g = torch.Generator().manual_seed(14)
    big = _problem(g, 2 * 60, 3 * 150, 12, 4, "ties")
    dist = big[0][1::2, ::3]
    qp, gp = big[1][::2], big[2][1::3]
    qc, gc = big[3][1::2], big[4][::3]
    pair = torch.stack([qp, qc], 1)                        # ids as columns of a 2-D tensor
    assert not any(t.is_contiguous() for t in (dist, qp, gp, qc, gc, pair[:, 0], pair[:, 1]))
    ref = _protocol_reference(dist, qp, gp, qc, gc, 20)
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)                            # torch's one-time warnings every time
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for args in ((dist, qp, gp, qc, gc), (dist, pair[:, 0], gp, pair[:, 1], gc)):
                cmc, mAP, n = evaluate(*args, max_rank=20, chunk_elems=1000)
                assert n == ref[2] and mAP == pytest.approx(ref[1], abs=1e-12)
                assert cmc.tolist() == pytest.approx(ref[0], abs=1e-7)
    finally:
        torch.set_warn_always(warn_always)
