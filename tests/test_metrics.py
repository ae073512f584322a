"""fmn.metrics.evaluate against a plain per-query loop and hand-computed cases; euclidean_distance."""
import pytest
import torch

from fmn.metrics import euclidean_distance, evaluate, evaluate_reference


def _random_problem(g, nq, ng, npid, ncam, ties=False):
    if ties:
        dist = torch.randint(0, 4, (nq, ng), generator=g).float()
    else:
        dist = torch.rand(nq, ng, generator=g)
    qp = torch.randint(0, npid, (nq,), generator=g)
    gp = torch.randint(0, npid, (ng,), generator=g)
    qc = torch.randint(0, ncam, (nq,), generator=g)
    gc = torch.randint(0, ncam, (ng,), generator=g)
    return dist, qp, gp, qc, gc


def _assert_same(a, b):
    assert torch.allclose(a[0], b[0], atol=1e-7), (a[0], b[0])
    assert abs(a[1] - b[1]) < 1e-9
    assert a[2] == b[2]


@pytest.mark.parametrize("ties", [False, True])
def test_random_problems_match_loop(ties):
    g = torch.Generator().manual_seed(1 if ties else 2)
    checked = 0
    for _ in range(40):
        nq, ng = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 60, (1,), generator=g))
        prob = _random_problem(g, nq, ng, int(torch.randint(1, 6, (1,), generator=g)),
                               int(torch.randint(1, 4, (1,), generator=g)), ties)
        try:
            ref = evaluate_reference(*prob, max_rank=10)
        except ValueError:
            with pytest.raises(ValueError):
                evaluate(*prob, max_rank=10)
            continue
        chunk = int(torch.randint(1, 300, (1,), generator=g))
        _assert_same(evaluate(*prob, max_rank=10, chunk_elems=chunk), ref)
        checked += 1
    assert checked > 20


def test_larger_problem_with_heavy_ties_and_float64():
    g = torch.Generator().manual_seed(3)
    dist, qp, gp, qc, gc = _random_problem(g, 300, 900, 40, 5, ties=True)
    ref = evaluate_reference(dist, qp, gp, qc, gc, max_rank=50)
    _assert_same(evaluate(dist, qp, gp, qc, gc), ref)
    _assert_same(evaluate(dist.double(), qp, gp, qc, gc), ref)
    _assert_same(evaluate(dist.half(), qp, gp, qc, gc), ref)          # small integers are exact in fp16
    _assert_same(evaluate(dist.numpy(), qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy()), ref)
    _assert_same(evaluate(dist.t().contiguous().t(), qp, gp, qc, gc), ref)      # non-contiguous


def test_queries_without_valid_match_are_skipped():
    # Query 0: its only same-id item is in its own camera -> skipped. Query 1: valid.
    dist = torch.tensor([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    qp, gp = torch.tensor([1, 2]), torch.tensor([1, 2, 3])
    qc, gc = torch.tensor([0, 0]), torch.tensor([0, 1, 1])
    cmc, mAP, n = evaluate(dist, qp, gp, qc, gc, max_rank=3)
    assert n == 1
    # Query 1 ranking: g2 (id 3), g1 (id 2, camera 1 != 0) -> first hit at rank 2, AP = 1/2.
    assert cmc.tolist() == [0.0, 1.0, 1.0]
    assert mAP == pytest.approx(0.5)


def test_all_gallery_in_query_camera_raises():
    dist = torch.rand(2, 4)
    with pytest.raises(ValueError, match="none of the 2 queries"):
        evaluate(dist, [1, 2], [1, 2, 1, 2], [0, 0], [0, 0, 0, 0])


def test_hand_computed_ap_and_tie_break_by_index():
    # One query (id 7, camera 0). Gallery (distance, id, cam):
    # 0: (0.5, 3, 1)  1: (0.2, 7, 1)  2: (0.5, 7, 2)  3: (0.2, 7, 0) same-id same-cam -> removed
    # 4: (0.1, 9, 1)
    # Kept order by (distance, index): g4 (0.1), g1 (0.2), g0 (0.5, index 0), g2 (0.5, index 2)
    # Hits at ranks 2 and 4: AP = (1/2 + 2/4) / 2 = 0.5; first hit at rank 2.
    dist = torch.tensor([[0.5, 0.2, 0.5, 0.2, 0.1]])
    cmc, mAP, n = evaluate(dist, [7], [3, 7, 7, 7, 9], [0], [1, 1, 2, 0, 1], max_rank=5)
    assert n == 1 and mAP == pytest.approx(0.5)
    assert cmc.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    # Swapping which tied item has the lower index moves the hit ahead of the negative.
    cmc, mAP, _ = evaluate(dist, [7], [7, 7, 3, 7, 9], [0], [2, 1, 1, 0, 1], max_rank=5)
    assert mAP == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_distractor_identity_zero_counts_as_negative_and_perfect_ranking():
    dist = torch.tensor([[0.0, 0.1, 0.9], [0.9, 0.1, 0.0]])
    cmc, mAP, n = evaluate(dist, [1, 2], [1, 0, 2], [0, 0], [1, 1, 1], max_rank=2)
    assert n == 2 and mAP == pytest.approx(1.0) and cmc.tolist() == [1.0, 1.0]


def test_max_rank_longer_than_gallery_and_shapes():
    cmc, mAP, n = evaluate(torch.tensor([[0.3, 0.1]]), [1], [2, 1], [0], [1, 1], max_rank=50)
    assert cmc.shape == (50,) and cmc.dtype == torch.float32
    assert cmc[0] == 1.0 and cmc[-1] == 1.0


def test_bad_inputs():
    with pytest.raises(ValueError, match="q_pids"):
        evaluate(torch.rand(2, 3), [1], [1, 2, 3], [0, 0], [1, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        evaluate(torch.rand(0, 3), [], [1, 2, 3], [], [1, 1, 1])
    d = torch.rand(2, 3)
    d[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluate(d, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1])


@pytest.mark.parametrize("numpy_sort", [True, False])
def test_chunking_does_not_change_a_bit(numpy_sort, monkeypatch):
    # Two queries whose identities have few and many gallery items: ranked in one chunk, the
    # first query's precisions are padded to the second's width. Its AP must not change with that
    # padding (a plain row sum over a wider row can round differently in the last bit).
    import fmn.metrics as M

    monkeypatch.setattr(M, "_NUMPY_SORT", numpy_sort)
    g = torch.Generator().manual_seed(7)
    for _ in range(60):
        ng = 300
        dist = torch.rand(2, ng, generator=g, dtype=torch.float64)
        gp = torch.full((ng,), 9)
        gp[:int(torch.randint(2, 30, (1,), generator=g))] = 1
        gp[100:100 + int(torch.randint(30, 150, (1,), generator=g))] = 2
        args = (dist, [1, 2], gp, [0, 0], torch.ones(ng))
        one, both = evaluate(*args, chunk_elems=1), evaluate(*args)
        assert torch.equal(one[0], both[0]) and one[1] == both[1], (one[1], both[1])


def test_torch_sort_path_matches(monkeypatch):
    import fmn.metrics as M

    g = torch.Generator().manual_seed(6)
    prob = _random_problem(g, 120, 400, 20, 4, ties=True)
    ref = evaluate_reference(*prob)
    monkeypatch.setattr(M, "_NUMPY_SORT", False)
    _assert_same(evaluate(*prob, chunk_elems=5000), ref)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(5)
    prob = _random_problem(g, 500, 3000, 60, 6, ties=True)
    ref = evaluate(*prob)
    out = evaluate(*[x.cuda() for x in prob])
    _assert_same(out, ref)


def test_euclidean_distance_accuracy():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(50, 64, generator=g) * 10 + 100       # large norms: the expansion cancels badly
    b = torch.cat([a[:10] + 1e-3 * torch.randn(10, 64, generator=g), torch.randn(30, 64, generator=g) + 100])
    ref = torch.cdist(a.double(), b.double())
    out = euclidean_distance(a, b, chunk_rows=7)
    assert out.dtype == torch.float32 and out.shape == (50, 40)
    rel = ((out.double() - ref).abs() / ref.clamp(min=1e-12))
    assert rel.max() < 1e-4, rel.max()
    sq = euclidean_distance(a.double(), b.double(), squared=True)
    assert torch.allclose(sq, ref ** 2, rtol=1e-10)
    assert euclidean_distance(a[:3], a[:3]).diagonal().abs().max() == 0
