"""k-reciprocal re-ranking from distance blocks as users have them: float64 blocks (kept in float64
until the float32 working distance)."""
from __future__ import annotations

import os

import pytest
import torch

from fmn_kernels import backend as fmn_backend
from fmn_kernels.rerank import rerank_from_distances, rerank_from_distances_ref

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRITON = fmn_backend.triton_available()
SLOW = os.environ.get("FMN_SLOW", "0") == "1"
TOL = 1e-5        # max |backend - reference|
RANK_TOL = 2e-6   # walking the backend's order, the reference never steps down by more

BLOCK_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]


def assert_close_and_same_ranking(out, ref):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL, f"max |delta| = {err:.3g}"
    walked = ref.gather(1, torch.sort(out, dim=1, stable=True).indices)
    if walked.shape[1] > 1:
        worst = (walked[:, 1:] - walked[:, :-1]).min().item()
        assert worst >= -RANK_TOL, f"reference steps down by {-worst:.3g} along the backend's order"


def split(full: torch.Tensor, q: int):
    """(q_g, q_q, g_g) of an (N, N) matrix, queries first."""
    return full[:q, q:], full[:q, :q], full[q:, q:]


def unit_features(n, d, seed, dtype=torch.float64):
    """The issue's features: standard normal rows, L2-normalised, rounded to float32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).float().to(dtype)


def euclidean_blocks(x: torch.Tensor, q: int):
    """float64 Euclidean distances in the difference form (no cancellation), split into blocks."""
    x = x.double()
    return split(((x[:, None] - x[None]) ** 2).sum(-1).sqrt(), q)


# ---------------------------------------------------------------------------------------------
# float64 blocks: squared in float64, rounded to float32 once
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("squared_input", [False, True])
def test_float64_blocks_are_squared_before_rounding(backend, squared_input):
    """With lambda = 1 the result is dn = w / max w in float32, where w must be float64 D^2 (D^4)
    rounded once to float32, as the original squares before its float32 cast. Rounding D first
    moves w by an ulp in a good share of the entries."""
    shapes = [(6, 25, 16)] if backend == "triton" else [(6, 25, 16), (20, 70, 64), (33, 120, 256)]
    for si, (q, g, d) in enumerate(shapes):
        blocks = euclidean_blocks(unit_features(q + g, d, seed=si), q)
        full = torch.cat([torch.cat([blocks[1], blocks[0]], 1), torch.cat([blocks[0].t(), blocks[2]], 1)])
        w = full * full
        if squared_input:
            w = w * w
        w = w.float()
        expect = (w / w.amax(dim=1, keepdim=True))[:q, q:]
        out = rerank_from_distances(*blocks, k1=5, k2=3, lambda_value=1.0, backend=backend,
                                    squared_input=squared_input)
        assert torch.equal(out, expect)
        assert_close_and_same_ranking(out, rerank_from_distances_ref(*blocks, k1=5, k2=3, lambda_value=1.0,
                                                                     squared_input=squared_input))


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="set FMN_SLOW=1")
def test_issue_float64_cdist_blocks():
    """The issue's case: unit features (numpy default_rng(1), q=500, g=2500, d=256, float32),
    blocks from scipy's float64 cdist. Rounding the blocks to float32 before squaring merged two
    neighbours at one item's k2 boundary (1.1e-2 off in 337 entries of one gallery column)."""
    np = pytest.importorskip("numpy")
    distance = pytest.importorskip("scipy.spatial.distance")
    rng = np.random.default_rng(1)
    q, g, d = 500, 2500, 256
    x = rng.standard_normal((q + g, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    blocks = [torch.from_numpy(distance.cdist(a, b)) for a, b in ((x[:q], x[q:]), (x[:q], x[:q]), (x[q:], x[q:]))]
    assert all(b.dtype == torch.float64 for b in blocks)
    ref = rerank_from_distances_ref(*blocks)
    assert_close_and_same_ranking(rerank_from_distances(*blocks, backend="torch"), ref)
