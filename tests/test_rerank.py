"""k-reciprocal re-ranking: every backend against the dense float64 reference of DESIGN section 3."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fmn_kernels import backend as fmn_backend
from fmn_kernels import rerank_sparse
from fmn_kernels.rerank import rerank, rerank_from_distances, rerank_from_distances_ref, rerank_ref

HAS_CPU_EXT = fmn_backend.has_compiled_kernel("rerank", "cpu")
HAS_CUDA = torch.cuda.is_available()
SLOW = os.environ.get("FMN_SLOW", "0") == "1"

TOL = 1e-5        # max |backend - reference|
RANK_TOL = 2e-6   # walking the backend's order, the reference never steps down by more


pytestmark = pytest.mark.usefixtures("one_thread")


def _backends_cpu():
    out = ["torch"]
    out.append(pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_EXT, reason="C++ extension not built")))
    return out


def random_feats(q, g, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=gen), torch.randn(g, d, generator=gen)


def clustered_feats(q, g, d, seed, clusters=6):
    """Identities: items scattered around a few centres (re-ID-like neighbourhoods)."""
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(clusters, d, generator=gen)
    n = q + g
    label = torch.randint(0, clusters, (n,), generator=gen)
    x = centres[label] + 0.7 * torch.randn(n, d, generator=gen)
    return x[:q].contiguous(), x[q:].contiguous()


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = (out.double().cpu() - ref).abs().max().item()
    assert err <= TOL, f"max |delta| = {err:.3g}"
    assert_same_ranking(out, ref)


def assert_same_ranking(out: torch.Tensor, ref: torch.Tensor) -> None:
    order = torch.sort(out.cpu(), dim=1, stable=True).indices
    walked = ref.gather(1, order)
    worst = (walked[:, 1:] - walked[:, :-1]).min().item() if walked.shape[1] > 1 else 0.0
    assert worst >= -RANK_TOL, f"reference steps down by {-worst:.3g} along the backend's order"


# (q, g, d): N <= k1 + 1, small, several chunks of the C++ strips
SHAPES = [(3, 8, 5), (12, 40, 16), (40, 160, 24), (70, 500, 32)]
PARAMS = [
    dict(k1=20, k2=6, lambda_value=0.3),
    dict(k1=1, k2=6, lambda_value=0.3),
    dict(k1=20, k2=1, lambda_value=0.3),
    dict(k1=20, k2=6, lambda_value=0.0),
    dict(k1=20, k2=6, lambda_value=1.0),
    dict(k1=7, k2=3, lambda_value=0.5),
]


@pytest.mark.parametrize("backend", _backends_cpu())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_matches_reference(backend, shape, kind):
    q, g, d = shape
    make = random_feats if kind == "random" else clustered_feats
    qf, gf = make(q, g, d, seed=q * 1000 + g)
    params = PARAMS if q * g <= 5000 else PARAMS[:1] + PARAMS[3:5]
    for p in params:
        ref = rerank_ref(qf, gf, **p)
        out = rerank(qf, gf, backend=backend, **p)
        assert_matches_reference(out, ref)


@pytest.mark.parametrize("backend", _backends_cpu())
@pytest.mark.parametrize("variant", [dict(squared_input=True), dict(faiss_compat=True),
                                     dict(squared_input=True, faiss_compat=True)])
def test_variants_match_reference(backend, variant):
    qf, gf = clustered_feats(25, 120, 16, seed=7)
    for p in (PARAMS[0], PARAMS[1], dict(k1=4, k2=2, lambda_value=0.6)):
        ref = rerank_ref(qf, gf, **p, **variant)
        out = rerank(qf, gf, backend=backend, **p, **variant)
        assert_matches_reference(out, ref)
        # the variant must actually change the result
        assert (ref - rerank_ref(qf, gf, **p)).abs().max() > 1e-4


@pytest.mark.parametrize("backend", _backends_cpu())
@pytest.mark.parametrize("m", [1, 7, 120])
def test_topk_equals_first_m_of_dense(backend, m):
    qf, gf = random_feats(30, 120, 16, seed=3)
    dense = rerank(qf, gf, backend=backend)
    values, indices = rerank(qf, gf, backend=backend, topk=m)
    assert values.shape == (30, m) and indices.shape == (30, m) and indices.dtype == torch.long
    sv, si = torch.sort(dense, dim=1, stable=True)
    assert torch.equal(values, sv[:, :m])
    assert torch.equal(indices, si[:, :m])


@pytest.mark.parametrize("backend", _backends_cpu())
def test_deterministic(backend):
    qf, gf = clustered_feats(40, 300, 24, seed=11)
    a = rerank(qf, gf, backend=backend)
    b = rerank(qf, gf, backend=backend)
    assert torch.equal(a, b)
    va, ia = rerank(qf, gf, backend=backend, topk=10)
    vb, ib = rerank(qf, gf, backend=backend, topk=10)
    assert torch.equal(va, vb) and torch.equal(ia, ib)


@pytest.mark.skipif(not HAS_CPU_EXT, reason="C++ extension not built")
def test_cpu_kernel_gives_the_same_bits_on_any_number_of_threads():
    # Tiles of the kNN pass are handed to the threads one at a time and a row's list is offered to
    # by several threads (locks, per-thread maxima); the kept lists and maxima do not depend on
    # the order, and each tile is one single-threaded GEMM call in both passes. Several query and
    # gallery blocks and column blocks (d = 256: 1024 columns a tile).
    qf, gf = clustered_feats(600, 2600, 256, seed=17)
    prev = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            runs.append((rerank(qf, gf, backend="cpu"), rerank(qf, gf, backend="cpu", topk=30)))
    finally:
        torch.set_num_threads(prev)
    (d1, (v1, i1)), (d3, (v3, i3)) = runs
    assert torch.equal(d1, d3) and torch.equal(v1, v3) and torch.equal(i1, i3)
    assert torch.equal(v1, torch.sort(d1, dim=1, stable=True).values[:, :30])
    other = rerank(qf, gf, backend="torch")
    assert (d1 - other).abs().max().item() <= TOL
    assert_same_ranking(d1, other.double())


@pytest.mark.parametrize("backend", _backends_cpu())
def test_dtypes_and_noncontiguous(backend):
    qf, gf = random_feats(20, 80, 12, seed=5)
    ref = rerank_ref(qf, gf)
    for dtype in (torch.float64, torch.float32):
        out = rerank(qf.to(dtype), gf.to(dtype), backend=backend)
        assert_matches_reference(out, ref)
    # non-contiguous views: every other column of a wider tensor, transposed storage
    wide_q = torch.zeros(20, 24)
    wide_q[:, ::2] = qf
    gt = gf.t().contiguous().t()
    out = rerank(wide_q[:, ::2], gt, backend=backend)
    assert_matches_reference(out, ref)
    # half precision inputs are widened to fp32: compare with the reference of the rounded inputs
    qh, gh = qf.to(torch.bfloat16), gf.to(torch.bfloat16)
    assert_matches_reference(rerank(qh, gh, backend=backend), rerank_ref(qh.float(), gh.float()))


def test_small_chunks_exercise_every_chunked_stage(monkeypatch):
    """Tiny budgets force several chunks in every torch stage; the result must not change."""
    qf, gf = clustered_feats(30, 150, 16, seed=13)
    full = rerank(qf, gf, backend="torch")
    full_top = rerank(qf, gf, backend="torch", topk=9)
    monkeypatch.setattr(rerank_sparse, "_element_budget", lambda device: 700)
    monkeypatch.setattr(rerank_sparse, "_pair_budget", lambda device: 300)
    small = rerank(qf, gf, backend="torch")
    assert_matches_reference(small, rerank_ref(qf, gf))
    assert (small - full).abs().max().item() <= 1e-6
    v, i = rerank(qf, gf, backend="torch", topk=9)
    assert (v - full_top[0]).abs().max().item() <= 1e-6


@pytest.mark.skipif(not HAS_CPU_EXT, reason="C++ extension not built")
@pytest.mark.parametrize("topk", [0, 5])
def test_opcheck_cpu(topk):
    from fmn_kernels.rerank import _compiled_op

    qf, gf = random_feats(6, 20, 8, seed=2)
    torch.library.opcheck(_compiled_op(), (qf, gf, 21, 11, 6, 0.3, False, False, False, topk))


@pytest.mark.parametrize("backend", _backends_cpu())
@pytest.mark.parametrize("q,g", [(1, 1), (2, 3), (1, 5), (4, 1)])
def test_tiny_problems(backend, q, g):
    qf, gf = random_feats(q, g, 4, seed=q * 10 + g)
    for p in (dict(k1=20, k2=6), dict(k1=1, k2=6), dict(k1=2, k2=1, lambda_value=0.0),
              dict(k1=20, k2=6, faiss_compat=True), dict(k1=1, k2=1, faiss_compat=True)):
        assert_matches_reference(rerank(qf, gf, backend=backend, **p), rerank_ref(qf, gf, **p))


def test_sorted_sum_path(monkeypatch):
    """The sort + float64 cumsum segment sums used on CUDA, run on CPU."""
    qf, gf = clustered_feats(30, 150, 16, seed=37)
    base = rerank(qf, gf, backend="torch")
    monkeypatch.setattr(rerank_sparse, "_needs_sorted_sums", lambda device: True)
    out = rerank(qf, gf, backend="torch")
    assert_matches_reference(out, rerank_ref(qf, gf))
    assert (out - base).abs().max().item() <= 1e-6
    assert torch.equal(out, rerank(qf, gf, backend="torch"))


def test_backends_agree():
    if not HAS_CPU_EXT:
        pytest.skip("C++ extension not built")
    qf, gf = clustered_feats(60, 400, 32, seed=17)
    a = rerank(qf, gf, backend="torch")
    b = rerank(qf, gf, backend="cpu")
    assert (a - b).abs().max().item() <= 2e-6


@pytest.mark.parametrize("squared_input", [False, True])
def test_from_distances(squared_input):
    qf, gf = clustered_feats(20, 90, 16, seed=19)
    qd, gd = qf.double(), gf.double()
    blocks = (torch.cdist(qd, gd), torch.cdist(qd, qd), torch.cdist(gd, gd))
    ref = rerank_from_distances_ref(*blocks, squared_input=squared_input)
    # the blocks' reference is the features' reference
    assert (ref - rerank_ref(qf, gf, squared_input=squared_input)).abs().max().item() <= 1e-9
    out = rerank_from_distances(*blocks, squared_input=squared_input)
    assert_matches_reference(out, ref)
    v, i = rerank_from_distances(*blocks, squared_input=squared_input, topk=5)
    sv, si = torch.sort(out, dim=1, stable=True)
    assert torch.equal(v, sv[:, :5]) and torch.equal(i, si[:, :5])
    # float32 blocks and the faiss variant
    out32 = rerank_from_distances(*(b.float() for b in blocks), faiss_compat=True)
    assert_matches_reference(out32, rerank_from_distances_ref(*blocks, faiss_compat=True))


def test_reference_known_case():
    """Hand-checkable case: two well separated pairs, k1 = 1, k2 = 1, lambda = 0.

    With k1 = 1 each item's list is itself and its nearest neighbour; the pairs (0, 2) and (1, 3)
    are mutual nearest neighbours, so R(i) = {i, partner}, V puts weights exp(0) and exp(-dn) on
    them, and J(query, gallery) = 1 - S / (2 - S) with S the overlap of the two rows.
    """
    qf = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    gf = torch.tensor([[1.0, 0.0], [10.0, 2.0]])
    out = rerank_ref(qf, gf, k1=1, k2=1, lambda_value=0.0)
    x = torch.cat([qf, gf]).double()
    d2 = torch.cdist(x, x) ** 2
    dn = d2 / d2.max(dim=1, keepdim=True).values
    v = torch.zeros(4, 4, dtype=torch.float64)
    for i, p in ((0, 2), (2, 0), (1, 3), (3, 1)):
        w = torch.exp(-dn[i, [i, p]])
        v[i, [i, p]] = w / w.sum()
    s = torch.minimum(v[:2, None, :], v[None, 2:, :]).sum(-1)
    expect = 1 - s / (2 - s)
    assert torch.allclose(out, expect, atol=1e-12, rtol=0)
    assert out[0, 1].item() == 1.0 and out[1, 0].item() == 1.0  # no overlap: exactly 1
    assert torch.allclose(rerank(qf, gf, k1=1, k2=1, lambda_value=0.0, backend="torch").double(), expect, atol=1e-6)


BAD_FEATURE_CASES = [
    (dict(k1=0), "k1"),
    (dict(k1=2.5), "k1"),
    (dict(k2=0), "k2"),
    (dict(lambda_value=-0.1), "lambda_value"),
    (dict(lambda_value=1.5), "lambda_value"),
    (dict(lambda_value=float("nan")), "lambda_value"),
    (dict(topk=0), "topk"),
    (dict(topk=1000), "topk"),
    (dict(backend="gpu-fast"), "backend"),
]


@pytest.mark.parametrize("kwargs,word", BAD_FEATURE_CASES, ids=[w + str(i) for i, (_, w) in enumerate(BAD_FEATURE_CASES)])
def test_bad_parameters_raise(kwargs, word):
    qf, gf = random_feats(4, 10, 3, seed=0)
    with pytest.raises(ValueError, match=word):
        rerank(qf, gf, **kwargs)


def test_bad_features_raise():
    qf, gf = random_feats(4, 10, 3, seed=0)
    with pytest.raises(ValueError, match="dims differ"):
        rerank(qf, gf[:, :2])
    with pytest.raises(ValueError, match="empty"):
        rerank(qf[:0], gf)
    with pytest.raises(ValueError, match="empty"):
        rerank(qf, gf[:0])
    with pytest.raises(ValueError, match="2-D"):
        rerank(qf[0], gf)
    with pytest.raises(ValueError, match="floating"):
        rerank(qf.long(), gf.long())
    for bad in (float("nan"), float("inf"), -float("inf")):
        g2 = gf.clone()
        g2[3, 1] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            rerank(qf, g2)
        q2 = qf.clone()
        q2[0, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            rerank(q2, gf)


def test_bad_distances_raise():
    qf, gf = random_feats(4, 10, 3, seed=0)
    qg, qq, gg = torch.cdist(qf, gf), torch.cdist(qf, qf), torch.cdist(gf, gf)
    with pytest.raises(ValueError, match="q_q"):
        rerank_from_distances(qg, qq[:3, :3], gg)
    with pytest.raises(ValueError, match="g_g"):
        rerank_from_distances(qg, qq, gg[:, :9])
    with pytest.raises(ValueError, match="negative"):
        rerank_from_distances(-qg, qq, gg)
    bad = qg.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        rerank_from_distances(bad, qq, gg)
    with pytest.raises(ValueError, match="k2"):
        rerank_from_distances(qg, qq, gg, k2=0)
    with pytest.raises(ValueError, match="no query rows"):
        rerank_from_distances(qg[:0], qq[:0, :0], gg)


def test_public_reexport():
    import fmn

    assert fmn.rerank is rerank and fmn.rerank_from_distances is rerank_from_distances


# ---------------------------------------------------------------------------------------------
# Triton kernels on CPU under the interpreter (a subprocess: TRITON_INTERPRET is read at import)
# ---------------------------------------------------------------------------------------------

TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from fmn_kernels.rerank import rerank, rerank_ref
    from fmn_kernels.triton.rerank import pair_sqdist
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 37, generator=gen)
    r = torch.randint(0, 50, (70,), generator=gen)
    c = torch.randint(0, 50, (70,), generator=gen)
    got = pair_sqdist(x, r, c)
    want = ((x[r].double() - x[c].double()) ** 2).sum(1)
    assert (got.double() - want).abs().max() <= 1e-4, "pair_sqdist"
    for q, g, d, k1, k2, lam in ((6, 20, 8, 20, 6, 0.3), (10, 30, 8, 3, 2, 0.5)):
        qf, gf = torch.randn(q, d, generator=gen), torch.randn(g, d, generator=gen)
        ref = rerank_ref(qf, gf, k1, k2, lam)
        out = rerank(qf, gf, k1, k2, lam, backend="triton")
        assert (out.double() - ref).abs().max() <= 1e-5, "triton rerank"
        base = rerank(qf, gf, k1, k2, lam, backend="torch")
        assert (out - base).abs().max() <= 1e-6, "triton vs torch"
        v, i = rerank(qf, gf, k1, k2, lam, backend="triton", topk=4)
        sv, si = torch.sort(out, dim=1, stable=True)
        assert torch.equal(v, sv[:, :4]) and torch.equal(i, si[:, :4]), "triton topk"
        lowp = rerank(qf, gf, k1, k2, lam, backend="triton", knn_precision="bf16")
        assert (lowp.double() - ref).abs().max() <= 1e-5, "triton bf16 candidates"
    print("ok")
    """
)


@pytest.mark.skipif(not fmn_backend.triton_available(), reason="triton not installed")
def test_triton_kernels_interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_cuda_matches_reference(backend, kind):
    make = random_feats if kind == "random" else clustered_feats
    for q, g, d in SHAPES:
        qf, gf = make(q, g, d, seed=q + g)
        for p in PARAMS:
            ref = rerank_ref(qf, gf, **p)
            out = rerank(qf.cuda(), gf.cuda(), backend=backend, **p)
            assert out.device.type == "cuda"
            assert_matches_reference(out, ref)
            v, i = rerank(qf.cuda(), gf.cuda(), backend=backend, topk=min(5, g), **p)
            sv, si = torch.sort(out, dim=1, stable=True)
            m = min(5, g)
            assert torch.equal(v, sv[:, :m]) and torch.equal(i, si[:, :m])
        a = rerank(qf.cuda(), gf.cuda(), backend=backend)
        assert torch.equal(a, rerank(qf.cuda(), gf.cuda(), backend=backend))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_ignores_tf32_setting():
    qf, gf = clustered_feats(50, 400, 64, seed=23)
    ref = rerank_ref(qf, gf)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        out = rerank(qf.cuda(), gf.cuda(), backend="torch", knn_precision="fp32")
        out_auto = rerank(qf.cuda(), gf.cuda(), backend="torch")
    finally:
        torch.set_float32_matmul_precision(prev)
    assert_matches_reference(out, ref)
    assert_matches_reference(out_auto, ref)


# ---------------------------------------------------------------------------------------------
# larger sizes (FMN_SLOW=1)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="set FMN_SLOW=1")
@pytest.mark.parametrize("backend", _backends_cpu())
def test_larger_against_reference(backend):
    qf, gf = clustered_feats(150, 900, 48, seed=29, clusters=40)
    ref = rerank_ref(qf, gf)
    assert_matches_reference(rerank(qf, gf, backend=backend), ref)


# ---------------------------------------------------------------------------------------------
# low-precision kNN candidates (bf16 inputs on CPU stand in for tensor cores)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("squared_input", [False, True])
def test_lowp_candidates_match_reference(kind, squared_input, monkeypatch):
    """bf16 proposals + exact rescoring + exact fallback give the fp32 neighbour lists.

    Random features certify every row from the candidates; tight clusters make the bf16 error
    bound fail on most rows, which must then be recomputed exactly. Both must match.
    """
    fallback_rows = []
    rows_d2 = rerank_sparse.FeatureDistances.rows_d2

    def counting(self, rows):
        fallback_rows.append(rows.numel())
        return rows_d2(self, rows)

    monkeypatch.setattr(rerank_sparse.FeatureDistances, "rows_d2", counting)
    make = random_feats if kind == "random" else clustered_feats
    qf, gf = make(30, 250, 32, seed=31)
    ref = rerank_ref(qf, gf, squared_input=squared_input)
    out = rerank(qf, gf, backend="torch", knn_precision="bf16", squared_input=squared_input)
    assert_matches_reference(out, ref)
    fp32 = rerank(qf, gf, backend="torch", knn_precision="fp32", squared_input=squared_input)
    assert (out - fp32).abs().max().item() <= 1e-6
    if kind == "random":
        assert sum(fallback_rows) == 0
    else:
        assert sum(fallback_rows) > 0


def test_bad_knn_precision_raises():
    qf, gf = random_feats(4, 10, 3, seed=0)
    with pytest.raises(ValueError, match="knn_precision"):
        rerank(qf, gf, knn_precision="fp8")


def test_fake_kernel_registered_at_import():
    """torch.compile can trace fmn::rerank from its first call: the fake (Meta) kernel is there
    once the module is imported, not only after an eager call."""
    import subprocess
    import sys

    from fmn_kernels import backend as fb

    if not fb.has_compiled_kernel("rerank", "cpu"):
        pytest.skip("the compiled re-ranking kernel is not built")
    code = ("import torch, fmn_kernels.rerank; "
            "print(torch._C._dispatch_has_kernel_for_dispatch_key('fmn::rerank', 'Meta'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def _largest_allocation(fn) -> int:
    """The largest single torch CPU allocation made while ``fn`` runs (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), default=0)


@pytest.mark.parametrize("backend", _backends_cpu())
def test_topk_never_allocates_a_query_by_gallery_block(backend, monkeypatch):
    # With topk the output is computed a block of query rows at a time (C++: rq rows of tiles,
    # here 256, and tiles of at most 512 x 4096; torch: the chunk budget, lowered here): no
    # allocation comes near the (q, g) matrix, while the dense output's own allocation is that
    # matrix, seen by the same measurement.
    monkeypatch.setattr(rerank_sparse, "_element_budget", lambda device: 1 << 18)
    qf, gf = clustered_feats(3000, 5000, 8, seed=19)
    qg = 3000 * 5000 * 4
    assert _largest_allocation(lambda: rerank(qf, gf, backend=backend)) >= qg
    assert _largest_allocation(lambda: rerank(qf, gf, backend=backend, topk=50)) <= qg / 6
