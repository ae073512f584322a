"""k-reciprocal re-ranking: the float32 arithmetic of DESIGN section 3 whatever the caller's context
(autocast regions, inputs whose distances leave the float32 range: rescaled by a power of two,
so tiny and huge inputs give the result of the same inputs at a moderate scale)."""
from __future__ import annotations

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
    ]


def _all_backends():
    """Every backend that runs on CPU tensors here (triton in its interpreter, set by conftest)."""
    triton = pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))
    return _backends() + [triton]


def _close_same_ranking(out, ref):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL, f"max |delta| = {err:.3g}"
    walked = ref.gather(1, torch.sort(out, dim=1, stable=True).indices)
    if walked.shape[1] > 1:
        assert (walked[:, 1:] - walked[:, :-1]).min().item() >= -RANK_TOL


def _feats(q, g, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(q, d, generator=gen), torch.randn(g, d, generator=gen)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_region_does_not_change_the_result(backend, dtype):
    """Inside torch.autocast the GEMMs must still be fp32: the same result as outside, bit for bit."""
    qf, gf = _feats(20, 300, 32, seed=3)
    base = rerank(qf, gf, backend=backend)
    base_v, base_i = rerank(qf, gf, backend=backend, topk=7)
    with torch.autocast("cpu", dtype=dtype):
        out = rerank(qf, gf, backend=backend)
        v, i = rerank(qf, gf, backend=backend, topk=7)
    assert out.dtype == torch.float32
    assert torch.equal(out, base)
    assert torch.equal(v, base_v) and torch.equal(i, base_i)
    assert (out.double() - rerank_ref(qf, gf)).abs().max().item() <= 1e-5


@pytest.mark.skipif(not HAS_CPU_EXT, reason="C++ extension not built")
def test_compiled_op_inside_autocast():
    """torch.ops.fmn.rerank called directly in an autocast region keeps its fp32 strips."""
    from fmn_kernels.rerank import _compiled_op

    qf, gf = _feats(6, 40, 8, seed=5)
    args = (qf, gf, 21, 11, 6, 0.3, False, False, False, 0)
    base = _compiled_op()(*args)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _compiled_op()(*args)[0]
    assert torch.equal(out, base)


def _power_of_two_below(limit: float) -> float:
    """The largest power of two not above limit."""
    return 2.0 ** torch.tensor(limit, dtype=torch.float64).log2().floor().item()


# (q, g, d) and parameters: N beyond the 16 extra GEMM candidates in the larger shape, so the
# certified candidate path runs on the scaled features too
SCALE_SHAPES = [(5, 17, 6), (9, 40, 12)]
SCALE_PARAMS = dict(k1=5, k2=3, lambda_value=0.3)


@pytest.mark.parametrize("backend", _all_backends())
@pytest.mark.parametrize("squared_input", [False, True])
def test_tiny_and_huge_features_give_the_unscaled_result(backend, squared_input):
    """Features scaled by a power of two far outside float32's comfortable range (their float32
    distances would underflow to 0 or overflow) give the unscaled result bit for bit: the inputs
    are brought back by an exact power of two. float64 features beyond float32's range included."""
    shapes = SCALE_SHAPES[:1] if backend == "triton" else SCALE_SHAPES
    for si, (q, g, d) in enumerate(shapes):
        qf, gf = _feats(q, g, d, seed=40 + si)
        base = rerank(qf, gf, backend=backend, squared_input=squared_input, **SCALE_PARAMS)
        base_v, base_i = rerank(qf, gf, backend=backend, squared_input=squared_input, topk=4, **SCALE_PARAMS)
        _close_same_ranking(base, rerank_ref(qf, gf, squared_input=squared_input, **SCALE_PARAMS))
        cases = [(torch.float32, -100), (torch.float32, -45), (torch.float32, 100),
                 (torch.float64, -1000), (torch.float64, 1000)]
        if squared_input:
            cases.append((torch.float32, -22))   # d2**2 ~ 2^-84: too small for the squared variant only
        for dtype, k in cases:
            s = 2.0 ** k
            qs, gs = qf.to(dtype) * s, gf.to(dtype) * s
            assert torch.equal(qs.double() / s, qf.double())   # the scaled inputs are exact
            out = rerank(qs, gs, backend=backend, squared_input=squared_input, **SCALE_PARAMS)
            assert torch.equal(out, base), (dtype, k)
            v, i = rerank(qs, gs, backend=backend, squared_input=squared_input, topk=4, **SCALE_PARAMS)
            assert torch.equal(v, base_v) and torch.equal(i, base_i), (dtype, k)


@pytest.mark.parametrize("backend", _all_backends())
@pytest.mark.parametrize("squared_input", [False, True])
def test_features_at_1e_minus_23_match_the_reference(backend, squared_input):
    """The issue's scales (not powers of two, so the inputs themselves are rounded): 1e-23 in
    float32 and float64, 1e-12 with squared_input, 1e30: the float64 reference of the unscaled
    features within the usual tolerance."""
    qf, gf = _feats(8, 30, 10, seed=50)
    ref = rerank_ref(qf, gf, squared_input=squared_input, **SCALE_PARAMS)
    for dtype in (torch.float32, torch.float64):
        for s in ((1e-23, 1e-12, 1e30) if dtype == torch.float32 else (1e-23, 1e-200, 1e200)):
            out = rerank(qf.to(dtype) * s, gf.to(dtype) * s, backend=backend, squared_input=squared_input,
                         **SCALE_PARAMS)
            _close_same_ranking(out, ref)


def _blocks(qf, gf, dtype):
    x = torch.cat([qf, gf]).double()
    dist = ((x[:, None] - x[None]) ** 2).sum(-1).sqrt().to(dtype)
    q = qf.shape[0]
    return dist[:q, q:], dist[:q, :q], dist[q:, q:]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton not installed"))])
@pytest.mark.parametrize("squared_input", [False, True])
def test_tiny_and_huge_distance_blocks_give_the_unscaled_result(backend, squared_input):
    """Distance blocks whose float32 working distance (D^2, D^4) would underflow or overflow:
    the unscaled result bit for bit, float32 and float64 blocks."""
    for si, (q, g, d) in enumerate(SCALE_SHAPES[:1] if backend == "triton" else SCALE_SHAPES):
        qf, gf = _feats(q, g, d, seed=60 + si)
        for dtype in (torch.float32, torch.float64):
            blocks = _blocks(qf, gf, dtype)
            base = rerank_from_distances(*blocks, backend=backend, squared_input=squared_input, **SCALE_PARAMS)
            _close_same_ranking(base, rerank_from_distances_ref(*blocks, squared_input=squared_input, **SCALE_PARAMS))
            ks = (-100, -45, 70, 100) if dtype == torch.float32 else (-1000, -300, 300, 1000)
            for k in ks + ((-22, 40) if squared_input else ()):
                scaled = tuple(b * 2.0 ** k for b in blocks)
                out = rerank_from_distances(*scaled, backend=backend, squared_input=squared_input, **SCALE_PARAMS)
                assert torch.equal(out, base), (dtype, k)
                v, i = rerank_from_distances(*scaled, backend=backend, squared_input=squared_input, topk=3,
                                             **SCALE_PARAMS)
                bv, bi = torch.sort(base, dim=1, stable=True)
                assert torch.equal(v, bv[:, :3]) and torch.equal(i, bi[:, :3])
        # not a power of two: close to the reference of the unscaled blocks
        blocks = _blocks(qf, gf, torch.float64)
        ref = rerank_from_distances_ref(*blocks, squared_input=squared_input, **SCALE_PARAMS)
        for s in (1e-23, 1e-160, 1e160):
            out = rerank_from_distances(*(b * s for b in blocks), backend=backend, squared_input=squared_input,
                                        **SCALE_PARAMS)
            _close_same_ranking(out, ref)


@pytest.mark.parametrize("backend", _backends())
def test_non_finite_inputs_still_raise(backend):
    """The rescale is for finite inputs only: NaN and Inf stay one clear error, also next to
    values that would be rescaled."""
    qf, gf = _feats(3, 6, 4, seed=0)
    for bad in (float("nan"), float("inf")):
        q2 = qf.double() * 1e-300
        q2[1, 2] = bad
        with pytest.raises(ValueError, match="query_feats contains NaN or Inf"):
            rerank(q2, gf.double(), backend=backend)
        blocks = list(_blocks(qf, gf, torch.float64))
        blocks[2] = blocks[2] * 1e300
        blocks[2][0, 1] = bad
        with pytest.raises(ValueError, match="g_g contains NaN or Inf"):
            rerank_from_distances(*blocks, backend="torch")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("squared_input", [False, True])
def test_large_features_within_range_are_exact(backend, squared_input):
    """Just inside the range where no rescale is needed: a power-of-two scale changes nothing
    (section 3 is scale invariant and every float32 operation scales exactly), so the result
    equals the unscaled one; twice that scale (rescaled) too."""
    qf, gf = _feats(8, 30, 6, seed=1)
    x = torch.cat([qf, gf]).double()
    m2 = ((x - x.mean(0)) ** 2).sum(1).max().item()
    limit = torch.finfo(torch.float32).max / 2
    s = _power_of_two_below((limit ** 0.5 if squared_input else limit) / (4.0 * m2)) ** 0.5
    s = _power_of_two_below(s)
    base = rerank(qf, gf, backend=backend, squared_input=squared_input, k1=5, k2=3)
    for scale in (s, 2.0 * s):
        out = rerank(qf * scale, gf * scale, backend=backend, squared_input=squared_input, k1=5, k2=3)
        assert torch.isfinite(out).all()
        assert torch.equal(out, base)


@pytest.mark.parametrize("backend", _backends())
def test_list_lengths_beyond_int64(backend):
    """k1 and k2 larger than the problem are cut at N (section 3 lists), however large."""
    qf, gf = _feats(3, 6, 4, seed=2)
    n = 9
    k1_all = 2 * n  # both the list and the half list (k1 / 2 + 1) cover all N items
    assert torch.equal(rerank(qf, gf, k1=2 ** 63 - 1, backend=backend), rerank(qf, gf, k1=k1_all, backend=backend))
    assert torch.equal(rerank(qf, gf, k2=10 ** 20, backend=backend), rerank(qf, gf, k2=n, backend=backend))
    assert torch.equal(rerank(qf, gf, k1=10 ** 20, faiss_compat=True, backend=backend),
                       rerank(qf, gf, k1=k1_all, faiss_compat=True, backend=backend))
