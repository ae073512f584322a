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
