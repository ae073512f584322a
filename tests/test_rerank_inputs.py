"""k-reciprocal re-ranking from distance blocks as users have them: float64 blocks (kept in float64
until the float32 working distance), squared blocks from |x|^2 + |y|^2 - 2 x.y with their
rounding negatives, and the backend the caller asks for."""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from fmn_kernels import backend as fmn_backend
from fmn_kernels import rerank_sparse
from fmn_kernels.rerank import _NEGATIVE_TOLERANCE, rerank_from_distances, rerank_from_distances_ref

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_TRITON = fmn_backend.triton_available()
SLOW = os.environ.get("FMN_SLOW", "0") == "1"
TOL = 1e-5        # max |backend - reference|
RANK_TOL = 2e-6   # walking the backend's order, the reference never steps down by more

BLOCK_BACKENDS = ["torch",
                  pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]


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


# ---------------------------------------------------------------------------------------------
# squared blocks with the rounding negatives of |x|^2 + |y|^2 - 2 x.y
# ---------------------------------------------------------------------------------------------

def torchreid_squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torchreid.metrics.distance.euclidean_squared_distance, as written there (float32)."""
    m, n = a.size(0), b.size(0)
    mat1 = torch.pow(a, 2).sum(dim=1, keepdim=True).expand(m, n)
    mat2 = torch.pow(b, 2).sum(dim=1, keepdim=True).expand(n, m).t()
    distmat = mat1 + mat2
    distmat.addmm_(a, b.t(), beta=1, alpha=-2)
    return distmat


def raw_features(q, g, d, seed):
    """Unnormalised ReLU features around a few identities, like a backbone's pooled output."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.relu(torch.randn(max(2, (q + g) // 6), d, generator=gen)) * 3.0
    label = torch.randint(0, centres.shape[0], (q + g,), generator=gen)
    x = torch.relu(centres[label] + 0.5 * torch.randn(q + g, d, generator=gen))
    return x[:q].contiguous(), x[q:].contiguous()


def torchreid_blocks(q, g, d, seed):
    qf, gf = raw_features(q, g, d, seed)
    return (torchreid_squared_distance(qf, gf), torchreid_squared_distance(qf, qf),
            torchreid_squared_distance(gf, gf))


def row_scales(blocks):
    """m_i, the largest entry of each row of [[q_q, q_g], [q_g^T, g_g]] (queries, gallery)."""
    qg, qq, gg = blocks
    return (torch.maximum(qq.amax(1), qg.amax(1)).double(), torch.maximum(qg.amax(0), gg.amax(1)).double())


@pytest.mark.parametrize("backend", BLOCK_BACKENDS)
@pytest.mark.parametrize("squared_input", [False, True])
def test_torchreid_squared_blocks_are_accepted(backend, squared_input):
    """torchreid's float32 squared distances of raw features: negative diagonal entries (and
    duplicates') are rounding errors, read as 0: the result is that of the blocks clamped at 0,
    and matches the float64 reference of those."""
    shapes = [(6, 30, 64)] if backend == "triton" else [(6, 30, 64), (20, 90, 512), (12, 60, 2048)]
    for si, (q, g, d) in enumerate(shapes):
        blocks = torchreid_blocks(q, g, d, seed=10 + si)
        assert blocks[0].dtype == torch.float32
        assert min(b.min().item() for b in blocks) < 0          # the case this test is about
        clamped = tuple(b.clamp_min(0.0) for b in blocks)
        p = dict(k1=6, k2=3, lambda_value=0.3, squared_input=squared_input)
        out = rerank_from_distances(*blocks, backend=backend, **p)
        assert torch.equal(out, rerank_from_distances(*clamped, backend=backend, **p))
        assert_close_and_same_ranking(out, rerank_from_distances_ref(*(b.double() for b in clamped), **p))
        v, i = rerank_from_distances(*blocks, backend=backend, topk=5, **p)
        sv, si_ = torch.sort(out, dim=1, stable=True)
        assert torch.equal(v, sv[:, :5]) and torch.equal(i, si_[:, :5])
    # the same blocks stored as float64 (e.g. numpy's default dtype): same tolerance
    out64 = rerank_from_distances(*(b.double() for b in blocks), backend=backend, k1=6, k2=3)
    assert_close_and_same_ranking(out64, rerank_from_distances_ref(*(b.double() for b in clamped), k1=6, k2=3))


@pytest.mark.parametrize("name,index", [("q_g", 0), ("q_q", 1), ("g_g", 2)])
def test_negatives_beyond_rounding_are_refused(name, index):
    """The bound is -256 eps (m_i + m_j): an entry at 1.5 times it is refused (naming the entry),
    at 0.5 times it accepted; negated distances are refused."""
    blocks = [b.clone() for b in torchreid_blocks(7, 25, 128, seed=3)]
    m_q, m_g = row_scales(blocks)
    m_row, m_col = {"q_g": (m_q, m_g), "q_q": (m_q, m_q), "g_g": (m_g, m_g)}[name]
    i, j = 2, 4
    bound = _NEGATIVE_TOLERANCE * (m_row[i] + m_col[j]).item()
    assert bound > 1e-4
    blocks[index][i, j] = -1.5 * bound
    with pytest.raises(ValueError, match=rf"{name} holds negative distances: {name}\[{i}, {j}\]"):
        rerank_from_distances(*blocks)
    with pytest.raises(ValueError, match=rf"{name} holds negative distances"):
        rerank_from_distances_ref(*blocks)
    blocks[index][i, j] = -0.5 * bound
    out = rerank_from_distances(*blocks, k1=6, k2=3)
    assert torch.isfinite(out).all()
    flipped = list(blocks)
    flipped[index] = -blocks[index].abs()
    with pytest.raises(ValueError, match=rf"{name} holds negative distances"):
        rerank_from_distances(*flipped)


def test_negatives_refused_relative_to_their_rows():
    """The tolerance follows the rows' scale: blocks scaled by 1e-3 keep their negatives within
    it; a negative entry within the rounding of rows at scale 1 is refused between two items
    whose rows are 1e6 times smaller."""
    blocks = torchreid_blocks(6, 20, 64, seed=5)
    small = tuple(b * 1e-3 for b in blocks)
    assert_close_and_same_ranking(rerank_from_distances(*small, k1=4, k2=2),
                                  rerank_from_distances_ref(*(b.double().clamp_min(0) for b in small), k1=4, k2=2))
    m_q, _ = row_scales(blocks)
    qg, qq, gg = blocks
    full = torch.cat([torch.cat([qq, qg], 1), torch.cat([qg.t(), gg], 1)])
    for item in (1, 3):                     # two query items near everything else
        full[item] *= 1e-6
        full[:, item] *= 1e-6
    full[1, 3] = full[3, 1] = -0.5 * _NEGATIVE_TOLERANCE * (m_q[1] + m_q[3]).item()
    with pytest.raises(ValueError, match=r"q_q holds negative distances: q_q\[1, 3\]"):
        rerank_from_distances(*split(full, 6))
    full[1, 3] = full[3, 1] = 0.0
    assert torch.isfinite(rerank_from_distances(*split(full, 6), k1=4, k2=2)).all()


# ---------------------------------------------------------------------------------------------
# backend routing
# ---------------------------------------------------------------------------------------------

def test_from_distances_runs_the_chosen_backend(monkeypatch):
    """backend picks the pipeline's S stage: torch's expand-and-sum, or the Triton kernel;
    "cpu" (no C++ kernel for blocks) falls back to torch with a warning; FMN_BACKEND is read
    when backend is None; an unknown name is an error."""
    calls = []
    overlap = rerank_sparse._overlap_chunk

    def torch_spy(*args, **kwargs):
        calls.append("torch")
        return overlap(*args, **kwargs)

    monkeypatch.setattr(rerank_sparse, "_overlap_chunk", torch_spy)
    if HAS_TRITON:
        import fmn_kernels.triton.rerank as triton_rerank

        kernel = triton_rerank.jaccard_overlap

        def triton_spy(*args, **kwargs):
            calls.append("triton")
            return kernel(*args, **kwargs)

        monkeypatch.setattr(triton_rerank, "jaccard_overlap", triton_spy)
    monkeypatch.setattr(fmn_backend, "_warned", set())
    monkeypatch.delenv("FMN_BACKEND", raising=False)

    blocks = euclidean_blocks(unit_features(20, 8, seed=7), 5)
    ref = rerank_from_distances_ref(*blocks, k1=4, k2=2)

    def run(backend):
        calls.clear()
        out = rerank_from_distances(*blocks, k1=4, k2=2, backend=backend)
        assert_close_and_same_ranking(out, ref)
        return out, set(calls)

    base, used = run("torch")
    assert used == {"torch"}
    out, used = run("auto")
    assert used == {"torch"} and torch.equal(out, base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, used = run("cpu")
    assert used == {"torch"} and torch.equal(out, base)
    assert any("backend 'cpu' for rerank_from_distances" in str(w.message) for w in caught)
    if HAS_TRITON:
        out, used = run("triton")
        assert used == {"triton"}
        assert (out - base).abs().max().item() <= 1e-6
        monkeypatch.setenv("FMN_BACKEND", "triton")
        _, used = run(None)
        assert used == {"triton"}
    with pytest.raises(ValueError, match="unknown backend 'gpu-fast'"):
        rerank_from_distances(*blocks, backend="gpu-fast")
