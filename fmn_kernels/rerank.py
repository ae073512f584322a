"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), exact and sparse.

Public functions:
  rerank(query_feats, gallery_feats, k1=20, k2=6, lambda_value=0.3, *, topk=None, ...)
  rerank_from_distances(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3, *, topk=None, ...)
  rerank_ref(...), rerank_from_distances_ref(...)   dense float64 oracles (small N only)

Semantics (DESIGN.md section 3), N = q + g, queries first:
  d2      squared Euclidean distance over the full N x N problem (query-query pairs included):
          from features the fp32 sum of squared differences; from Euclidean blocks D, D**2
          computed in the blocks' precision (float64 stays float64), then rounded to float32
  w       the working distance: d2 (d2**2 with squared_input)
  dn      w[i, j] / max_k w[i, k], the max over all N columns (0 where a row's max is 0)
  order   each row ranked ascending by w, ties (equal values) broken by column index: a stable
          sort. It is the order of dn (w divided by a positive constant per row) without the
          float32 division, which can round two distinct values to one. Features are ranked by
          their fp32 d2, blocks by their entries in their own precision: the order of w before
          any rounding of w (squaring keeps the order).
  T(i)    the first k1 + 1 of row i (self included);  Th(i) the first h = round_half_even(k1/2) + 1
  R(i)    {j in T(i) : i in T(j)};  Rh(c) the same with Th
  R*(i)   R(i) united with every Rh(c), c in R(i), for which 3 |Rh(c) & R(i)| > 2 |Rh(c)|
  V[i,j]  exp(-dn[i, j]) / sum_{j' in R*(i)} exp(-dn[i, j'])  for j in R*(i), else 0
  Vqe[i]  mean of V[j] over the first k2 of row i (self included); Vqe = V when k2 = 1
  S(i,j)  sum_c min(Vqe[i, c], Vqe[j, c]);   J = 1 - S / (2 - S)
  final   (1 - lambda) J + lambda dn, for query rows and gallery columns (a q x g result)
Lists longer than the problem are cut at N (k1 + 1 > N takes every item).

Variants (off by default; each changes the result, use them only to reproduce other code):
  squared_input=True   the torchreid / layumi convention that squares an already squared
                       distance: the working distance is d2**2 = |x - y|**4 (ranking is unchanged,
                       dn and the weights change).
  faiss_compat=True    the faiss-based ports (SpCL, OpenUnReID, fast-reid): neighbour lists of k1
                       items (the item itself counts as its own first neighbour, no extra slot),
                       Th of min(round_half_even(k1/2) + 1, k1) items, V = softmax(-w) over R*(i)
                       on the raw working distance w (not divided by the row max), and J clamped
                       at 0. The final mix (1 - lambda) J + lambda dn keeps the row-normalised dn.

Inputs: NaN or Inf raise ValueError. Inputs whose float32 working distances would overflow or
underflow are multiplied by a power of two first (exact; the result is scale-invariant), so
tiny and huge features or distances give the result of the same inputs at a moderate scale.

Output: float32 on the input's device. Dense: a (q, g) tensor. topk=m: (values, indices), each
(q, m), the m smallest of each query row in (value, gallery index) order, computed one chunk of
query rows at a time; it equals the first m of the dense result (same chunked arithmetic).

Backends: "cpu" (C++ in csrc/cpu/rerank.cpp), "torch" (the sparse pipeline of
fmn_kernels/rerank_sparse.py in torch ops, any device), "triton" (the same pipeline with the
Triton kernels of fmn_kernels/triton/rerank.py), "auto" (cpu on CPU when built; triton on CUDA
when Triton is installed; else torch). rerank_from_distances runs torch or triton: the C++ kernel
takes features only. No path builds a dense N x N matrix; the dense output is the only q x g
allocation.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch

from fmn_kernels import backend as _backend
from fmn_kernels import rerank_sparse as _sparse

__all__ = ["rerank", "rerank_from_distances", "rerank_ref", "rerank_from_distances_ref"]

_OP = "rerank"
_OP_BLOCKS = "rerank_from_distances"  # no compiled kernel: resolves to torch or triton


# --------------------------------------------------------------------------------------------
# parameters and validation
# --------------------------------------------------------------------------------------------

def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"fmn.rerank: {name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"fmn.rerank: {name} must be >= {minimum}, got {value}")
    return int(value)


def _check_params(k1, k2, lambda_value, topk, g: int):
    k1 = _check_int("k1", k1, 1)
    k2 = _check_int("k2", k2, 1)
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, numbers.Real):
        raise ValueError(f"fmn.rerank: lambda_value must be a number in [0, 1], got {lambda_value!r}")
    lam = float(lambda_value)
    if not (0.0 <= lam <= 1.0):  # also rejects NaN
        raise ValueError(f"fmn.rerank: lambda_value must lie in [0, 1], got {lambda_value}")
    if topk is not None:
        topk = _check_int("topk", topk, 1)
        if topk > g:
            raise ValueError(f"fmn.rerank: topk={topk} exceeds the gallery size {g}")
    return k1, k2, lam, topk


def _check_matrix(name: str, t, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"fmn.rerank: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"fmn.rerank: {name} must be 2-D ({what}), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"fmn.rerank: {name} must be a floating-point tensor, got {t.dtype}")


def _check_finite(name: str, t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of ``t`` as Python floats, (0, 0) when empty; NaN or inf is an error. One
    aminmax pass (NaN propagates through it), a fraction of the time of isfinite(t).all(): the
    callers take the sign and the range checks from the same two numbers."""
    if not t.numel():
        return 0.0, 0.0
    lo, hi = (float(v) for v in torch.aminmax(t.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"fmn.rerank: {name} contains NaN or Inf")
    return lo, hi


def _check_features(query_feats, gallery_feats) -> tuple[float, float]:
    """Shapes, device and finiteness; returns (max |query_feats|, max |gallery_feats|)."""
    _check_matrix("query_feats", query_feats, "(q, d)")
    _check_matrix("gallery_feats", gallery_feats, "(g, d)")
    if query_feats.shape[0] == 0:
        raise ValueError("fmn.rerank: query_feats is empty (q = 0)")
    if gallery_feats.shape[0] == 0:
        raise ValueError("fmn.rerank: gallery_feats is empty (g = 0)")
    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(
            "fmn.rerank: query and gallery feature dims differ: "
            f"{query_feats.shape[1]} vs {gallery_feats.shape[1]}"
        )
    if query_feats.shape[1] == 0:
        raise ValueError("fmn.rerank: features have dimension 0")
    if query_feats.device != gallery_feats.device:
        raise ValueError(
            f"fmn.rerank: query_feats is on {query_feats.device}, gallery_feats on {gallery_feats.device}"
        )
    lo_q, hi_q = _check_finite("query_feats", query_feats)
    lo_g, hi_g = _check_finite("gallery_feats", gallery_feats)
    return max(-lo_q, hi_q), max(-lo_g, hi_g)


# The float32 working distance w (d2, or d2**2 with squared_input) must stay in float32's normal
# range: the largest w at most _W_LIMIT (float32's max with a factor 2 for the rounding of the
# sums), and the inputs' scale (a^2 for features of magnitude a, D^2 for distances) at least
# _W_TINY, 2^48 above float32's smallest normal number, so that the squares and products d2 is
# made of stay normal down to 2^-48 of it. Inputs outside are multiplied by a power of two 2^k
# first (exact): every float32 operation then scales exactly, and the result is scale-invariant
# (dn = w / max w; J is built on dn), so it equals the result of the inputs at a moderate scale.
_W_LIMIT = torch.finfo(torch.float32).max / 2
_W_TINY = 2.0 ** -78


def _working(d2: float, squared_input: bool) -> float:
    """The working distance of a squared distance d2: d2, or d2**2 with squared_input."""
    return d2 * d2 if squared_input else d2


def _pow2_exponent(m: float) -> int:
    """k with m * 2^k in [1, 2), for a finite m > 0."""
    return 1 - math.frexp(m)[1]


def _feature_exponent(abs_max: tuple[float, float], d: int, squared_input: bool) -> int:
    """The power of two k that the features are multiplied by: 0 when their float32 working
    distances stay in range, else the k that brings a = max |x| into [1, 2).

    ``abs_max`` is (max |query_feats|, max |gallery_feats|) from ``_check_features``. Each centred
    row has norm <= 2 a sqrt(d), so d2 <= 16 d a^2 (overflow); a^2 is the scale of the squared
    differences (underflow).
    """
    a = max(abs_max)
    if a == 0.0:
        return 0
    if _W_TINY <= _working(a * a, squared_input) and _working(16.0 * d * a * a, squared_input) <= _W_LIMIT:
        return 0
    return _pow2_exponent(a)


def _block_exponent(d_max: float, squared_input: bool) -> int:
    """The power of two k that the distance blocks are multiplied by before squaring: 0 when the
    working distance of their largest entry d_max (D^2, or D^4 with squared_input) is in range,
    else the k that brings d_max into [1, 2)."""
    if d_max == 0.0:
        return 0
    if _W_TINY <= _working(d_max * d_max, squared_input) <= _W_LIMIT:
        return 0
    return _pow2_exponent(d_max)


def _float32_features(t: torch.Tensor, k: int) -> torch.Tensor:
    """t (detached) as float32 times 2^k: float64 features are scaled before they are rounded to
    float32 (the rounding is then that of the unscaled features), narrower ones after widening."""
    t = t.detach()
    if k == 0:
        return t.float()
    return _sparse.mul_pow2(t if t.dtype == torch.float64 else t.float(), k).float()


# Negative entries accepted in distance blocks, relative to the rows' scale: squared distances
# computed as |x|^2 + |y|^2 - 2 x.y in float32 (torchreid's euclidean_squared_distance) are
# negative where the distance is ~0 (the diagonal, duplicates), by a few float32 eps times
# |x|^2 + |y|^2; 256 eps also covers features whose common offset makes |x|^2 up to ~30 times
# the largest distance of their row (measured: 2-8 eps for unnormalised ReLU features, up to
# ~120 eps of the row maxima with an offset of 5, d = 128 to 2048).
_NEGATIVE_TOLERANCE = 256 * torch.finfo(torch.float32).eps


def _check_rounding_negatives(q_g, q_q, g_g, lows: dict[str, float]) -> None:
    """Every negative entry (i, j) must be >= -_NEGATIVE_TOLERANCE (m_i + m_j), m_i the largest
    entry of row i of [[q_q, q_g], [q_g^T, g_g]]. Runs only when a block holds a negative entry."""
    qg, qq, gg = (t.detach() for t in (q_g, q_q, g_g))
    m_q = torch.maximum(qq.amax(dim=1).double(), qg.amax(dim=1).double())
    m_g = torch.maximum(qg.amax(dim=0).double(), gg.amax(dim=1).double())
    for name, t, m_row, m_col in (("q_g", qg, m_q, m_g), ("q_q", qq, m_q, m_q), ("g_g", gg, m_g, m_g)):
        if lows[name] >= 0:
            continue
        i, j = (t < 0).nonzero(as_tuple=True)
        v = t[i, j].double()
        bound = _NEGATIVE_TOLERANCE * (m_row[i] + m_col[j])
        bad = -v > bound
        if bool(bad.any()):
            p = int(torch.argmin(torch.where(bad, v, torch.zeros_like(v))))
            raise ValueError(
                f"fmn.rerank: {name} holds negative distances: {name}[{int(i[p])}, {int(j[p])}] = {float(v[p]):.6g}, "
                f"below the rounding error accepted there (-{float(bound[p]):.3g} = -256 eps (m_i + m_j), "
                "m the largest entry of each row)"
            )


def _check_distances(q_g, q_q, g_g) -> tuple[float, bool]:
    """Shapes, device, finite entries, negative ones only within rounding (see
    ``_check_rounding_negatives``). Returns the largest entry and whether negative entries are
    to be read as 0."""
    _check_matrix("q_g", q_g, "(q, g)")
    _check_matrix("q_q", q_q, "(q, q)")
    _check_matrix("g_g", g_g, "(g, g)")
    q, g = q_g.shape
    if q == 0:
        raise ValueError("fmn.rerank: q_g has no query rows (q = 0)")
    if g == 0:
        raise ValueError("fmn.rerank: q_g has no gallery columns (g = 0)")
    if tuple(q_q.shape) != (q, q):
        raise ValueError(f"fmn.rerank: q_q must be ({q}, {q}) to match q_g {tuple(q_g.shape)}, got {tuple(q_q.shape)}")
    if tuple(g_g.shape) != (g, g):
        raise ValueError(f"fmn.rerank: g_g must be ({g}, {g}) to match q_g {tuple(q_g.shape)}, got {tuple(g_g.shape)}")
    if not (q_g.device == q_q.device == g_g.device):
        raise ValueError("fmn.rerank: q_g, q_q and g_g must be on the same device")
    d_max, lows = 0.0, {}
    for name, t in (("q_g", q_g), ("q_q", q_q), ("g_g", g_g)):
        lows[name], hi = _check_finite(name, t)
        d_max = max(d_max, hi)
    if min(lows.values()) >= 0:
        return d_max, False
    _check_rounding_negatives(q_g, q_q, g_g, lows)
    return d_max, True


_fake_registered = {"done": False}


def _compiled_op():
    """torch.ops.fmn.rerank (C++), with its fake (meta) kernel registered once."""
    if not _fake_registered["done"]:

        def fake(query, gallery, k_forward, k_half, k_qe, lambda_value, square_twice, raw_weights,
                 clamp_jaccard, topk):
            q, g = query.shape[0], gallery.shape[0]
            if topk == 0:
                return query.new_empty(q, g), query.new_empty(0, dtype=torch.long)
            return query.new_empty(q, topk), query.new_empty(q, topk, dtype=torch.long)

        torch.library.register_fake("fmn::rerank")(fake)
        _fake_registered["done"] = True
    return torch.ops.fmn.rerank.default


# The fake kernel is registered as soon as the extension is there: registering inside a
# torch.compile trace is not possible, so a compiled first call would otherwise fail.
if _backend.extension_loaded() and hasattr(torch.ops.fmn, "rerank"):
    _compiled_op()


def _no_autocast(device: torch.device):
    """Autocast off on the inputs' device: under an enclosing autocast region the kNN and output
    GEMMs would run in bf16 / fp16 (wrong dn values, candidate bounds that no longer hold) and the
    C++ kernel would receive a reduced-precision strip."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _variant(k1: int, faiss_compat: bool) -> tuple[int, int, bool, bool]:
    """(forward list length, half list length, raw weights, clamp J) before capping at N."""
    half = int(round(k1 / 2.0)) + 1  # Python's round is round-half-even, like numpy.around
    if faiss_compat:
        return k1, min(half, k1), True, True
    return k1 + 1, half, False, False


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def rerank(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    topk: int | None = None,
    backend: str | None = "auto",
    squared_input: bool = False,
    faiss_compat: bool = False,
    knn_precision: str = "auto",
    process_group=None,
):
    """k-reciprocal re-ranked distance between queries (q, d) and gallery (g, d).

    Returns a float32 (q, g) tensor on the inputs' device, or with ``topk=m`` a pair
    ``(values, indices)`` of shape (q, m): the m smallest re-ranked distances of each query in
    ascending (value, gallery index) order. Exact DESIGN section 3 semantics (see the module
    docstring); memory O(N (k1 + k2) ) besides the output and one chunk of rows. The arithmetic
    is float32 also inside an autocast region. Features whose float32 working distances would
    overflow or underflow (max |x| too large or too small; float64 features beyond float32's range
    included) are first multiplied by a power of two that brings max |x| into [1, 2): exact, and
    the result is scale-invariant, so it is that of the same features at a moderate scale.

    knn_precision (torch / triton backends): the precision of the kNN GEMM that proposes
    candidates: "fp32" IEEE fp32 (TF32 off whatever the global setting), "tf32" / "bf16" tensor
    cores. Candidates are always rescored with the exact fp32 d2 (sum of squared differences of
    the features as given), with an error bound that sends any row it cannot certify to an exact
    scan, so the neighbour lists and row maxima are those of the exact d2 whatever the precision
    (ties stay exact and go to the lower index). "auto": "tf32" on CUDA, else "fp32".

    process_group: a torch.distributed process group (gloo on CPU, nccl on GPU; e.g.
    ``torch.distributed.group.WORLD`` under torchrun). Every rank passes its own contiguous slice
    of the queries and of the gallery, slices in rank order (sizes may differ, a slice may be an
    empty (0, d) tensor), and gets back its queries' rows over the whole gallery: (q_r, g) in
    global gallery order, or with ``topk`` the values and global gallery indices. The result is
    the single-process one; no rank holds another rank's features beyond one streamed chunk, nor
    an N x N or (with topk) q x g matrix. See fmn_kernels.rerank_distributed for the protocol.
    knn_precision fp32 (or auto) only.
    """
    if process_group is not None:
        from fmn_kernels.rerank_distributed import rerank_sharded

        return rerank_sharded(query_feats, gallery_feats, k1=k1, k2=k2, lambda_value=lambda_value, topk=topk,
                              backend=backend, squared_input=squared_input, faiss_compat=faiss_compat,
                              knn_precision=knn_precision, process_group=process_group)
    abs_max = _check_features(query_feats, gallery_feats)
    q, g = query_feats.shape[0], gallery_feats.shape[0]
    k1, k2, lam, topk = _check_params(k1, k2, lambda_value, topk, g)
    exponent = _feature_exponent(abs_max, query_feats.shape[1], bool(squared_input))
    if knn_precision not in ("auto", "fp32", "tf32", "bf16"):
        raise ValueError(f"fmn.rerank: knn_precision must be auto, fp32, tf32 or bf16, got {knn_precision!r}")
    if knn_precision == "auto":
        knn_precision = "tf32" if query_feats.device.type == "cuda" else "fp32"
    k_fwd, k_half, raw, clamp = _variant(k1, faiss_compat)
    name = _backend.resolve(_OP, backend, query_feats.device, triton_ok=True)
    cfg = _sparse.Config(
        k_forward=k_fwd, k_half=k_half, k_qe=k2, lambda_value=lam, square_twice=bool(squared_input),
        raw_weights=raw, clamp_jaccard=clamp, knn_precision=knn_precision,
    )
    with _no_autocast(query_feats.device):
        qf, gf = _float32_features(query_feats, exponent), _float32_features(gallery_feats, exponent)
        if name == "cpu":
            n = q + g  # lists are cut at N anyway; the op takes int64 lengths
            values, indices = _compiled_op()(
                qf.contiguous(), gf.contiguous(),
                min(cfg.k_forward, n), min(cfg.k_half, n), min(cfg.k_qe, n), cfg.lambda_value,
                cfg.square_twice, cfg.raw_weights, cfg.clamp_jaccard, 0 if topk is None else topk,
            )
            return values if topk is None else (values, indices)
        source = _sparse.FeatureDistances(qf, gf, square_twice=cfg.square_twice, use_triton=(name == "triton"))
        return _sparse.rerank_sparse(source, cfg, topk=topk, use_triton=(name == "triton"))


def rerank_from_distances(
    q_g: torch.Tensor,
    q_q: torch.Tensor,
    g_g: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    topk: int | None = None,
    backend: str | None = "auto",
    squared_input: bool = False,
    faiss_compat: bool = False,
):
    """Re-ranking from Euclidean distance blocks: q_g (q, g), q_q (q, q), g_g (g, g).

    The blocks hold Euclidean distances (not squared); the squared distance of section 3 is
    ``d2 = block**2``, so ``rerank_from_distances(cdist(Q, G), cdist(Q, Q), cdist(G, G))`` equals
    ``rerank(Q, G)`` up to float32 rounding. With ``squared_input=True`` the working distance is
    ``block**4`` (the torchreid / layumi convention), equal to ``rerank(Q, G, squared_input=True)``.
    Code that feeds *squared* Euclidean blocks to the original re_ranking() gets the same result
    from this function with those blocks and ``squared_input=False``.

    The blocks are used as given (the g x q block is ``q_g.T``), in their own precision up to the
    float32 working distance: float64 blocks are squared in float64 and rounded to float32 once,
    as the original does, and each row is ranked by the blocks' values themselves (the order of w;
    see the module docstring). Blocks whose working distance would overflow or underflow float32
    are first multiplied by a power of two that brings their largest entry into [1, 2) (exact; the
    result is scale-invariant).

    Negative entries: squared blocks computed as |x|^2 + |y|^2 - 2 x.y (torchreid's
    euclidean_squared_distance) are slightly negative where the distance is ~0. An entry (i, j)
    down to -256 eps (m_i + m_j), eps float32's machine epsilon (2^-23) and m_i the largest entry
    of row i of [[q_q, q_g], [q_g^T, g_g]], is a rounding error of that formula and read as 0;
    anything more negative raises ValueError.

    backend: "torch" runs the sparse torch pipeline on the blocks' device, "triton" the same with
    the Triton Jaccard kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "auto"
    picks triton on CUDA when Triton is installed, else torch. The C++ kernel takes features
    only: "cpu" falls back to torch with one warning, like any backend not available here.
    """
    d_max, clamp_negatives = _check_distances(q_g, q_q, g_g)
    q, g = q_g.shape
    k1, k2, lam, topk = _check_params(k1, k2, lambda_value, topk, g)
    exponent = _block_exponent(d_max, bool(squared_input))
    name = _backend.resolve(_OP_BLOCKS, backend, q_g.device, triton_ok=True)
    k_fwd, k_half, raw, clamp = _variant(k1, faiss_compat)
    cfg = _sparse.Config(
        k_forward=k_fwd, k_half=k_half, k_qe=k2, lambda_value=lam, square_twice=bool(squared_input),
        raw_weights=raw, clamp_jaccard=clamp,
    )
    source = _sparse.BlockDistances(q_g, q_q, g_g, square_twice=cfg.square_twice, exponent=exponent,
                                    clamp=clamp_negatives)
    return _sparse.rerank_sparse(source, cfg, topk=topk, use_triton=(name == "triton"))


# --------------------------------------------------------------------------------------------
# dense float64 reference, written straight from section 3 (small N only: O(N^2) memory)
# --------------------------------------------------------------------------------------------

def _ref_core(w: torch.Tensor, q: int, k1: int, k2: int, lam: float, faiss_compat: bool) -> torch.Tensor:
    """w: (N, N) float64 working distance (d2, or d2**2 for squared_input). Returns (q, g)."""
    n = w.shape[0]
    k_fwd, k_half, raw, clamp = _variant(k1, faiss_compat)
    k_fwd, k_half, k_qe = min(k_fwd, n), min(k_half, n), min(k2, n)

    # point 3: row-normalise by the max over all N columns
    rowmax = w.max(dim=1, keepdim=True).values
    dn = torch.where(rowmax > 0, w / torch.where(rowmax > 0, rowmax, torch.ones_like(rowmax)), torch.zeros_like(w))
    # point 4: ascending, ties by index; ranked by w, the order of dn without the division's rounding
    order = torch.sort(w, dim=1, stable=True).indices.tolist()

    # points 5 and 6: k-reciprocal sets
    top = [set(order[i][:k_fwd]) for i in range(n)]
    top_h = [set(order[i][:k_half]) for i in range(n)]
    recip = [[j for j in order[i][:k_fwd] if i in top[j]] for i in range(n)]
    recip_h = [[j for j in order[i][:k_half] if i in top_h[j]] for i in range(n)]

    # point 7: expansion against the original R(i)
    v = torch.zeros_like(w)
    for i in range(n):
        r_i = set(recip[i])
        expanded = set(r_i)
        for c in recip[i]:
            cand = recip_h[c]
            if 3 * len(set(cand) & r_i) > 2 * len(cand):
                expanded.update(cand)
        if not expanded:  # a lower-index duplicate can push i out of its own list: V[i] = 0
            continue
        members = torch.tensor(sorted(expanded), dtype=torch.long)
        # point 8: weights from exact distances (faiss_compat: softmax of the raw distance)
        x = w[i, members] if raw else dn[i, members]
        e = torch.exp(-(x - x.min())) if raw else torch.exp(-x)
        v[i, members] = e / e.sum()

    # point 9: query expansion over the first k2 of each row
    if k2 > 1:
        first = torch.tensor([order[i][:k_qe] for i in range(n)], dtype=torch.long)
        v = v[first].mean(dim=1)

    # point 10: Jaccard distance of the query rows against every column
    jac = torch.empty(q, n, dtype=torch.float64)
    for i in range(q):
        s = torch.minimum(v[i].unsqueeze(0), v).sum(dim=1)
        jac[i] = 1.0 - s / (2.0 - s)
    if clamp:
        jac = jac.clamp_min(0.0)

    # point 11
    final = (1.0 - lam) * jac + lam * dn[:q]
    return final[:, q:]


def rerank_ref(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    squared_input: bool = False,
    faiss_compat: bool = False,
) -> torch.Tensor:
    """Dense float64 reference of :func:`rerank` (CPU, small N). Returns a float64 (q, g) tensor.
    The features are scaled by the same power of two as in :func:`rerank` (exact in float64)."""
    abs_max = _check_features(query_feats, gallery_feats)
    k1, k2, lam, _ = _check_params(k1, k2, lambda_value, None, gallery_feats.shape[0])
    x = torch.cat([query_feats, gallery_feats]).detach().to("cpu", torch.float64)
    x = _sparse.mul_pow2(x, _feature_exponent(abs_max, x.shape[1], bool(squared_input)))
    d2 = torch.empty(x.shape[0], x.shape[0], dtype=torch.float64)
    step = max(1, (1 << 22) // max(1, x.shape[0] * x.shape[1]))
    for r0 in range(0, x.shape[0], step):  # point 2, directly: sum_k (x_ik - x_jk)^2
        d2[r0:r0 + step] = ((x[r0:r0 + step, None, :] - x[None, :, :]) ** 2).sum(-1)
    w = d2 * d2 if squared_input else d2
    return _ref_core(w, query_feats.shape[0], k1, k2, lam, faiss_compat)


def rerank_from_distances_ref(
    q_g: torch.Tensor,
    q_q: torch.Tensor,
    g_g: torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    *,
    squared_input: bool = False,
    faiss_compat: bool = False,
) -> torch.Tensor:
    """Dense float64 reference of :func:`rerank_from_distances` (Euclidean blocks; accepted
    negative entries read as 0, the same power-of-two scale)."""
    d_max, _ = _check_distances(q_g, q_q, g_g)
    k1, k2, lam, _ = _check_params(k1, k2, lambda_value, None, q_g.shape[1])
    qg, qq, gg = (t.detach().to("cpu", torch.float64) for t in (q_g, q_q, g_g))
    dist = torch.cat([torch.cat([qq, qg], 1), torch.cat([qg.t(), gg], 1)], 0).clamp_min(0.0)
    dist = _sparse.mul_pow2(dist, _block_exponent(d_max, bool(squared_input)))
    d2 = dist * dist
    w = d2 * d2 if squared_input else d2
    return _ref_core(w, q_g.shape[0], k1, k2, lam, faiss_compat)
