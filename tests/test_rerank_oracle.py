"""k-reciprocal re-ranking against an independent oracle written from DESIGN section 3.

`oracle` below is a deliberately slow, loop-by-loop float64 transcription of the 11 numbered
rules (and of the two named variants), written without looking at the library's `rerank_ref`.
Every backend (cpu C++, torch, triton in the interpreter) and the library's own reference are
compared with it on many small random cases, including the edge cases of the rules.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fmn_kernels import backend as fmn_backend
from fmn_kernels.rerank import rerank, rerank_from_distances, rerank_from_distances_ref, rerank_ref

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_CPU_EXT = fmn_backend.has_compiled_kernel("rerank", "cpu")
HAS_TRITON = fmn_backend.triton_available()
TOL = 1e-5
RANK_TOL = 2e-6


def _backends():
    return [
        "torch",
        pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_EXT, reason="C++ extension not built")),
        pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")),
    ]


# --------------------------------------------------------------------------------------------
# the oracle: DESIGN section 3, rule by rule, float64, plain loops
# --------------------------------------------------------------------------------------------

def _first(row: np.ndarray, m: int) -> list[int]:
    """Rule 4: rank a row ascending, ties broken by index (stable); the first m (cut at N)."""
    idx = sorted(range(len(row)), key=lambda j: (row[j], j))
    return idx[: min(m, len(row))]


def oracle_from_d2(d2: np.ndarray, q: int, k1: int, k2: int, lam: float, *,
                   squared_input: bool = False, faiss_compat: bool = False) -> np.ndarray:
    n = d2.shape[0]
    w = d2 ** 2 if squared_input else d2.copy()           # variant: square the squared distance
    # rule 3: row-normalise by the max over all N columns
    dn = np.zeros_like(w)
    for i in range(n):
        mx = max(w[i, k] for k in range(n))
        for j in range(n):
            dn[i, j] = w[i, j] / mx if mx > 0 else 0.0
    # rules 4-6: lists (k1 + 1 with self; faiss: k1), half lists h = round_half_even(k1/2) + 1
    k_fwd = k1 if faiss_compat else k1 + 1
    h = int(np.around(k1 / 2.0)) + 1
    if faiss_compat:
        h = min(h, k1)
    top = [_first(dn[i], k_fwd) for i in range(n)]
    toph = [_first(dn[i], h) for i in range(n)]
    R = [[j for j in top[i] if i in top[j]] for i in range(n)]
    Rh = [[j for j in toph[c] if c in toph[j]] for c in range(n)]
    # rule 7: expansion, strict 2/3 against the original R(i)
    Rstar = []
    for i in range(n):
        s = set(R[i])
        for c in R[i]:
            inter = len(set(Rh[c]) & set(R[i]))
            if 3 * inter > 2 * len(Rh[c]):
                s |= set(Rh[c])
        Rstar.append(sorted(s))
    # rule 8: weights over R*(i), distances looked up for every member
    V = np.zeros((n, n))
    for i in range(n):
        if not Rstar[i]:   # possible with duplicates: a lower-index twin can push i out of T(i)
            continue
        if faiss_compat:   # softmax(-w) on the raw working distance
            lo = min(w[i, j] for j in Rstar[i])
            e = {j: np.exp(-(w[i, j] - lo)) for j in Rstar[i]}
        else:
            e = {j: np.exp(-dn[i, j]) for j in Rstar[i]}
        tot = sum(e.values())
        for j in Rstar[i]:
            V[i, j] = e[j] / tot
    # rule 9: query expansion over the first k2 of row i (k2 > 1)
    if k2 > 1:
        Vqe = np.zeros((n, n))
        for i in range(n):
            first = _first(dn[i], k2)
            for j in first:
                Vqe[i] += V[j]
            Vqe[i] /= len(first)
    else:
        Vqe = V
    # rule 10: Jaccard, query rows against all N
    J = np.zeros((q, n))
    for i in range(q):
        for j in range(n):
            s = 0.0
            for c in range(n):
                s += min(Vqe[i, c], Vqe[j, c])
            J[i, j] = 1.0 - s / (2.0 - s)
            if faiss_compat:
                J[i, j] = max(J[i, j], 0.0)
    # rule 11
    return (1.0 - lam) * J[:, q:] + lam * dn[:q, q:]


def oracle(qf: torch.Tensor, gf: torch.Tensor, k1=20, k2=6, lambda_value=0.3, **variant) -> torch.Tensor:
    x = torch.cat([qf, gf]).double().numpy()
    n = x.shape[0]
    d2 = np.zeros((n, n))       # rule 2: squared Euclidean distance, difference form, float64
    for i in range(n):
        for j in range(n):
            diff = x[i] - x[j]
            d2[i, j] = float(np.dot(diff, diff))
    return torch.from_numpy(oracle_from_d2(d2, qf.shape[0], k1, k2, lambda_value, **variant))


def oracle_blocks(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3, **variant) -> torch.Tensor:
    top = torch.cat([q_q, q_g], 1)
    bottom = torch.cat([q_g.t(), g_g], 1)
    d = torch.cat([top, bottom]).double().numpy()
    return torch.from_numpy(oracle_from_d2(d ** 2, q_g.shape[0], k1, k2, lambda_value, **variant))


# --------------------------------------------------------------------------------------------
# comparison (DESIGN: "identical rankings")
# --------------------------------------------------------------------------------------------

def assert_close_and_same_ranking(out, ref, tol=TOL):
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    err = (out.double().cpu() - ref.double()).abs().max().item()
    assert err <= tol, f"max |delta| = {err:.3g}"
    order = torch.sort(out.cpu(), dim=1, stable=True).indices
    walked = ref.double().gather(1, order)
    if walked.shape[1] > 1:
        worst = (walked[:, 1:] - walked[:, :-1]).min().item()
        assert worst >= -RANK_TOL, f"reference steps down by {-worst:.3g} along the backend's order"


def _feats(q, g, d, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randn(q, d, generator=gen), torch.randn(g, d, generator=gen)
    if kind == "clustered":
        c = 3.0 * torch.randn(4, d, generator=gen)
        lab = torch.randint(0, 4, (q + g,), generator=gen)
        x = c[lab] + 0.6 * torch.randn(q + g, d, generator=gen)
        return x[:q].contiguous(), x[q:].contiguous()
    if kind == "duplicates":   # repeated rows: exact distance ties, the tie-break decides
        base = torch.randint(-2, 3, (max(2, (q + g) // 3), d), generator=gen).float()
        pick = torch.randint(0, base.shape[0], (q + g,), generator=gen)
        x = base[pick]
        return x[:q].contiguous(), x[q:].contiguous()
    if kind == "dup_real":    # repeated real-valued rows (odd d): ties only if d2 depends on the pair alone
        base = torch.randn(max(2, (q + g) // 2), d + 2, generator=gen) * 3.0 + 5.0
        pick = torch.randint(0, base.shape[0], (q + g,), generator=gen)
        x = base[pick]
        return x[:q].contiguous(), x[q:].contiguous()
    if kind == "grid":        # small-integer points: many exact ties between distinct distances
        x = torch.randint(0, 3, (q + g, d), generator=gen).float()
        return x[:q].contiguous(), x[q:].contiguous()
    raise AssertionError(kind)


# --------------------------------------------------------------------------------------------
# the oracle itself on hand-checkable cases
# --------------------------------------------------------------------------------------------

def test_oracle_hand_case():
    # q = 1, g = 2 on a line: 0, 1, 3. k1 = 1 -> lists of 2, h = round(0.5) + 1 = 1.
    qf = torch.tensor([[0.0]])
    gf = torch.tensor([[1.0], [3.0]])
    # d2 rows: [0,1,9] [1,0,4] [9,4,0]; dn: [0,1/9,1] [1/4,0,1] [1,4/9,0]
    # T: 0->{0,1} 1->{1,0} 2->{2,1}; R: 0->{0,1} 1->{1,0} 2->{2}; Rh(c) = {c}
    # expansion adds nothing new. V0 over {0,1}: exp(0), exp(-1/9); V1 over {1,0}: exp(0), exp(-1/4)
    out = oracle(qf, gf, k1=1, k2=1, lambda_value=0.0)
    e1 = np.exp(-1 / 9)
    v0 = np.array([1, e1, 0]) / (1 + e1)
    e2 = np.exp(-1 / 4)
    v1 = np.array([e2, 1, 0]) / (1 + e2)
    s = np.minimum(v0, v1).sum()
    assert out[0, 0].item() == pytest.approx(1 - s / (2 - s), abs=1e-15)
    assert out[0, 1].item() == 1.0      # no overlap: exactly 1


# --------------------------------------------------------------------------------------------
# the library's reference and every backend against the oracle
# --------------------------------------------------------------------------------------------

PARAMS = [
    dict(k1=20, k2=6, lambda_value=0.3),
    dict(k1=3, k2=2, lambda_value=0.3),
    dict(k1=4, k2=1, lambda_value=0.5),
    dict(k1=5, k2=3, lambda_value=0.0),
    dict(k1=2, k2=4, lambda_value=1.0),
    dict(k1=1, k2=1, lambda_value=0.2),
    dict(k1=6, k2=30, lambda_value=0.3),    # k2 > N
]
SHAPES = [(1, 1, 3), (1, 4, 2), (3, 1, 4), (2, 5, 3), (5, 9, 4), (7, 16, 6)]
KINDS = ["random", "clustered", "duplicates", "dup_real", "grid"]


def _cases():
    for kind in KINDS:
        for si, (q, g, d) in enumerate(SHAPES):
            yield kind, q, g, d, 100 * si + len(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_library_reference_equals_oracle(kind):
    for k, q, g, d, seed in _cases():
        if k != kind:
            continue
        qf, gf = _feats(q, g, d, seed, kind)
        for p in PARAMS:
            for variant in ({}, dict(squared_input=True), dict(faiss_compat=True),
                            dict(squared_input=True, faiss_compat=True)):
                ref = rerank_ref(qf, gf, **p, **variant)
                assert_close_and_same_ranking(ref, oracle(qf, gf, **p, **variant), tol=1e-12)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", KINDS)
def test_backends_equal_oracle(backend, kind):
    """Exact ties (duplicates, grid points) must be broken by index: the backends' distances
    for the kNN lists may not depend on anything but the two vectors (no GEMM rounding)."""
    interpreted = backend == "triton"   # ~0.2 s a call in the interpreter: fewer cases
    for k, q, g, d, seed in _cases():
        if k != kind or (interpreted and q < 5):
            continue
        qf, gf = _feats(q, g, d, seed, kind)
        for p in (PARAMS[:2] if interpreted else PARAMS):
            for variant in (({}, dict(faiss_compat=True)) if interpreted else
                            ({}, dict(squared_input=True), dict(faiss_compat=True),
                             dict(squared_input=True, faiss_compat=True))):
                out = rerank(qf, gf, backend=backend, **p, **variant)
                assert out.dtype == torch.float32
                assert_close_and_same_ranking(out, oracle(qf, gf, **p, **variant))


def _far_clusters(seed=1):
    """Three tight clusters on a sphere of radius 1000: the centred norms stay ~1000 while the
    neighbour distances are ~0.1^2 d, far below the GEMM form's rounding (~1e-7 * 1000^2)."""
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(3, 16, generator=gen)
    c = 1000.0 * c / c.norm(dim=1, keepdim=True)
    x = c[torch.arange(36) % 3] + 0.1 * torch.randn(36, 16, generator=gen)
    return x[:6].contiguous(), x[6:].contiguous()


@pytest.mark.parametrize("backend", _backends())
def test_large_norm_features_exact_lists(backend):
    """Rule 2: d2 computed accurately. N = 36 > k1 + 1 + 16 candidates, so the certified
    candidate path and its exact fallback both run."""
    qf, gf = _far_clusters()
    for p in (dict(k1=4, k2=2, lambda_value=0.3), dict(k1=6, k2=1, lambda_value=0.0)):
        assert_close_and_same_ranking(rerank(qf, gf, backend=backend, **p), oracle(qf, gf, **p))
    # and with a common offset (centring alone handles that)
    q2, g2 = _feats(6, 30, 8, 5, "clustered")
    off = 1e4 * torch.ones(8)
    p = dict(k1=5, k2=3, lambda_value=0.3)
    assert_close_and_same_ranking(rerank(q2 + off, g2 + off, backend=backend, **p), oracle(q2 + off, g2 + off, **p))


@pytest.mark.parametrize("backend", _backends())
def test_inputs_as_given(backend):
    """float64 and non-contiguous features, all-identical features (row max 0), k1 >= N."""
    gen = torch.Generator().manual_seed(4)
    qd = torch.randn(6, 9, dtype=torch.float64, generator=gen)
    gd = torch.randn(9, 20, dtype=torch.float64, generator=gen)[:, ::2].t()   # (10, 9) strided
    assert not gd.is_contiguous()
    for p in (dict(k1=3, k2=2, lambda_value=0.3), dict(k1=16, k2=20, lambda_value=0.5)):
        out = rerank(qd.t().contiguous().t(), gd, backend=backend, **p)
        assert out.dtype == torch.float32
        assert_close_and_same_ranking(out, oracle(qd, gd, **p))
    same = torch.full((2, 3), 1.5), torch.full((4, 3), 1.5)
    out = rerank(*same, k1=2, k2=2, backend=backend)
    assert torch.equal(out, torch.zeros(2, 4))            # J = 1 - 1/1 = 0, dn = 0
    assert torch.equal(oracle(*same, k1=2, k2=2), torch.zeros(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("backend", _backends())
def test_topk_against_dense_and_oracle(backend):
    qf, gf = _feats(4, 11, 5, 9, "grid")
    p = dict(k1=3, k2=2, lambda_value=0.3)
    dense = rerank(qf, gf, backend=backend, **p)
    assert_close_and_same_ranking(dense, oracle(qf, gf, **p))
    sv, si = torch.sort(dense, dim=1, stable=True)
    for m in (1, 4, 11):                                   # topk == g included
        v, i = rerank(qf, gf, backend=backend, topk=m, **p)
        assert torch.equal(v, sv[:, :m]) and torch.equal(i, si[:, :m])
    with pytest.raises(ValueError, match="topk=12 exceeds the gallery size 11"):
        rerank(qf, gf, backend=backend, topk=12, **p)


@pytest.mark.parametrize("variant", [{}, dict(squared_input=True), dict(faiss_compat=True)])
def test_from_distances_equals_oracle(variant):
    for kind in ("clustered", "grid"):
        qf, gf = _feats(5, 13, 4, 8, kind)
        x = torch.cat([qf, gf]).double()
        dist = ((x[:, None] - x[None]) ** 2).sum(-1).sqrt()
        qg, qq, gg = dist[:5, 5:], dist[:5, :5], dist[5:, 5:]
        p = dict(k1=4, k2=3, lambda_value=0.3)
        ref = oracle_blocks(qg, qq, gg, **p, **variant)
        assert_close_and_same_ranking(ref, oracle(qf, gf, **p, **variant), tol=1e-12)
        assert_close_and_same_ranking(rerank_from_distances_ref(qg, qq, gg, **p, **variant), ref, tol=1e-12)
        for blocks in ((qg, qq, gg), (qg.float(), qq.float(), gg.float()),
                       (qg.t().contiguous().t(), qq.t(), gg.t())):
            out = rerank_from_distances(*blocks, **p, **variant)
            assert out.dtype == torch.float32
            assert_close_and_same_ranking(out, ref)
        v, i = rerank_from_distances(qg, qq, gg, topk=13, **p, **variant)
        sv, si = torch.sort(rerank_from_distances(qg, qq, gg, **p, **variant), dim=1, stable=True)
        assert torch.equal(v, sv) and torch.equal(i, si)


def test_from_distances_bad_blocks():
    qg, qq, gg = torch.rand(3, 5), torch.rand(3, 3), torch.rand(5, 5)
    cases = [
        ((qg, qq[:2, :2], gg), r"q_q must be \(3, 3\)"),
        ((qg, qq, gg[:, :4]), r"g_g must be \(5, 5\)"),
        ((qg[0], qq, gg), "q_g must be 2-D"),
        ((qg[:0], qq[:0, :0], gg), "no query rows"),
        ((qg[:, :0], qq, gg[:0, :0]), "no gallery columns"),
        ((-qg, qq, gg), "q_g holds negative distances"),
        ((qg, qq, gg * float("nan")), "g_g contains NaN or Inf"),
        ((qg, qq.long(), gg), "q_q must be a floating-point tensor"),
    ]
    for blocks, msg in cases:
        with pytest.raises(ValueError, match=msg):
            rerank_from_distances(*blocks)


@pytest.mark.parametrize("backend", _backends())
def test_bad_inputs_one_clear_error(backend):
    qf, gf = _feats(3, 6, 4, 0, "random")
    cases = [
        (lambda: rerank(qf[None], gf, backend=backend), r"query_feats must be 2-D \(\(q, d\)\)"),
        (lambda: rerank(qf, gf[0], backend=backend), "gallery_feats must be 2-D"),
        (lambda: rerank(qf, gf[:, :3], backend=backend), "feature dims differ: 4 vs 3"),
        (lambda: rerank(qf[:0], gf, backend=backend), r"query_feats is empty \(q = 0\)"),
        (lambda: rerank(qf, gf[:0], backend=backend), r"gallery_feats is empty \(g = 0\)"),
        (lambda: rerank(qf * float("nan"), gf, backend=backend), "query_feats contains NaN or Inf"),
        (lambda: rerank(qf, gf / 0, backend=backend), "gallery_feats contains NaN or Inf"),
        (lambda: rerank(qf.int(), gf.int(), backend=backend), "must be a floating-point tensor, got torch.int32"),
        (lambda: rerank(qf, gf, k1=0, backend=backend), "k1 must be >= 1"),
        (lambda: rerank(qf, gf, k2=0, backend=backend), "k2 must be >= 1"),
        (lambda: rerank(qf, gf, k1=2.5, backend=backend), "k1 must be an integer"),
        (lambda: rerank(qf, gf, lambda_value=-0.01, backend=backend), r"lambda_value must lie in \[0, 1\]"),
        (lambda: rerank(qf, gf, lambda_value=1.01, backend=backend), r"lambda_value must lie in \[0, 1\]"),
        (lambda: rerank(qf, gf, topk=0, backend=backend), "topk must be >= 1"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_EXT, reason="no ext"))])
def test_same_result_any_thread_count(backend):
    qf, gf = _feats(40, 260, 24, 6, "clustered")
    prev = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            outs.append((rerank(qf, gf, backend=backend), rerank(qf, gf, backend=backend, topk=9)))
    finally:
        torch.set_num_threads(prev)
    for dense, (v, i) in outs[1:]:
        assert torch.equal(dense, outs[0][0]) and torch.equal(v, outs[0][1][0]) and torch.equal(i, outs[0][1][1])


def _near_tie_blocks(q, g, d, seed):
    """float64 Euclidean blocks of grid points moved by ~1e-9: many distances distinct in float64
    but equal once rounded to float32 (a relative step of 6e-8), so a float32 ranking would break
    them by index where the float64 one does not."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (q + g, d), generator=gen).double()
    x = x + 1e-9 * torch.randn(q + g, d, generator=gen, dtype=torch.float64)
    dist = ((x[:, None] - x[None]) ** 2).sum(-1).sqrt()
    return dist[:q, q:], dist[:q, :q], dist[q:, q:]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton not installed"))])
@pytest.mark.parametrize("variant", [{}, dict(squared_input=True), dict(faiss_compat=True)])
def test_float64_blocks_ranked_in_float64(backend, variant):
    """float64 blocks keep their precision through the ranking: the neighbour lists are those of
    the float64 oracle, not of the float32-rounded blocks (which differ on these inputs)."""
    shapes = [(7, 16, 6)] if backend == "triton" else [(5, 13, 4), (7, 16, 6), (9, 30, 5)]
    for si, (q, g, d) in enumerate(shapes):
        blocks = _near_tie_blocks(q, g, d, seed=70 + si)
        for p in (dict(k1=4, k2=3, lambda_value=0.3), dict(k1=2, k2=2, lambda_value=0.1)):
            ref = oracle_blocks(*blocks, **p, **variant)
            rounded = oracle_blocks(*(b.float() for b in blocks), **p, **variant)
            assert (ref - rounded).abs().max().item() > 1e-3      # the float32 rounding matters here
            out = rerank_from_distances(*blocks, backend=backend, **p, **variant)
            assert_close_and_same_ranking(out, ref)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton not installed"))])
def test_rows_ranked_by_w_ties_by_index(backend):
    """Rule 4 as documented: each row is ranked by the working distance, ties (equal values) by
    index. Query 0's nearest gallery items are D = b (item 1) and D = a (item 2), a < b adjacent
    float32 values whose dn = D^2 / max rounds to one float32: item 2 is the neighbour (a float32
    dn ranking would take item 1, the lower index). With a == b, item 1 (the lower index)."""
    gen = torch.Generator().manual_seed(0)
    while True:   # adjacent a < b in [0.5, 1) whose float32 dn coincide for a row max m^2
        a = torch.rand((), generator=gen) * 0.5 + 0.5
        b = torch.nextafter(a, torch.tensor(2.0))
        m = torch.rand((), generator=gen) * 2.0 + 2.0
        if torch.equal((a * a) / (m * m), (b * b) / (m * m)):
            break
    p = dict(k1=1, k2=1, lambda_value=0.3)
    for d01, d02, nearest in ((b, a, 2), (a, a, 1)):
        qg = torch.stack([d01, d02, m]).view(1, 3)
        qq = torch.zeros(1, 1)
        gg = torch.tensor([[0.0, 5.0, 6.0], [5.0, 0.0, 7.0], [6.0, 7.0, 0.0]])
        gg = gg * m   # the gallery items lie farther from each other than from the query
        ref = oracle_blocks(qg, qq, gg, **p)
        out = rerank_from_distances(qg, qq, gg, backend=backend, **p)
        assert_close_and_same_ranking(out, ref)
        # R(0) = {0, nearest}: the nearest item shares the query's weights, the other none
        assert out[0, nearest - 1] < 0.5 < out[0, 2 - nearest]
