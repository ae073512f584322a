"""k-reciprocal re-ranking: the float32 arithmetic of DESIGN section 3 whatever the caller's context
(autocast regions, inputs whose distances leave the float32 range)."""
from __future__ import annotations

import pytest
import torch

from fmn_kernels import backend as fmn_backend
from fmn_kernels.rerank import rerank, rerank_ref

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_CPU_EXT = fmn_backend.has_compiled_kernel("rerank", "cpu")


def _backends():
    return [
        "torch",
        pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_EXT, reason="C++ extension not built")),
    ]


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


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("squared_input", [False, True])
def test_features_whose_distances_overflow_raise(backend, squared_input):
    """Finite features with float32 distances beyond float32's range: one clear error, not NaN."""
    qf, gf = _feats(3, 6, 4, seed=0)
    big = 1e15 if squared_input else 1e19
    with pytest.raises(ValueError, match="beyond float32"):
        rerank(qf * big, gf * big, backend=backend, squared_input=squared_input)
    # float64 features beyond float32's range (the arithmetic is float32)
    with pytest.raises(ValueError, match="query_feats holds values beyond the float32 range"):
        rerank(qf.double() * 1e300, gf.double(), backend=backend)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("squared_input", [False, True])
def test_large_features_within_range_are_exact(backend, squared_input):
    """Just inside the accepted range: a power-of-two scale changes nothing (section 3 is scale
    invariant and every float32 operation scales exactly), so the result equals the unscaled one."""
    qf, gf = _feats(8, 30, 6, seed=1)
    x = torch.cat([qf, gf]).double()
    m2 = ((x - x.mean(0)) ** 2).sum(1).max().item()
    limit = torch.finfo(torch.float32).max / 2
    s = _power_of_two_below((limit ** 0.5 if squared_input else limit) / (4.0 * m2)) ** 0.5
    s = _power_of_two_below(s)
    base = rerank(qf, gf, backend=backend, squared_input=squared_input, k1=5, k2=3)
    out = rerank(qf * s, gf * s, backend=backend, squared_input=squared_input, k1=5, k2=3)
    assert torch.isfinite(out).all()
    assert torch.equal(out, base)


@pytest.mark.parametrize("squared_input", [False, True])
def test_distance_blocks_that_overflow_raise(squared_input):
    from fmn_kernels.rerank import rerank_from_distances

    qf, gf = _feats(3, 6, 4, seed=0)
    big = 1e10 if squared_input else 1e20
    blocks = (torch.cdist(qf, gf).double() * big, torch.cdist(qf, qf).double() * big, torch.cdist(gf, gf).double() * big)
    with pytest.raises(ValueError, match="beyond float32"):
        rerank_from_distances(*blocks, squared_input=squared_input)


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
