"""The sparse k-reciprocal re-ranking pipeline in torch ops (any device, no loop per query).

Stages (N = q + g items, K = forward list length, H = half list length, Q = min(k2, N)):
  1. kNN with row maxima: per row the max of w over all N columns and the L = max(K, Q) smallest
     columns in (distance, index) order. From features the order is the exact fp32 d2's: a GEMM
     per row chunk proposes candidates, rescored with d2 and certified by an error bound (else
     the row is scanned exactly), see _knn_candidates. From blocks it is D's, in the blocks'
     precision, see _knn_blocks. Both are the order of w (squaring keeps it) and of dn = w / max
     in exact arithmetic; dn's float32 division could tie distinct values, so it is not ranked.
  2. reciprocal masks: recip[i, s] = i in nbr[nbr[i, s], :K]   (and the same for the first H)
  3. expansion: R*(i) as a padded, sorted, duplicate-free list of columns (sentinel N)
  4. weights: exact distances of every (i, j in R*(i)) pair, V = normalised exp(-dn)
  5. query expansion: Vqe[i] = (1/Q) sum over the first Q of row i of V[j], merged per column
  6. inverted index: for each column c, the gallery rows j with Vqe[j, c] != 0 and the values
  7. output, a chunk of query rows at a time: S by expanding (query entry, index entry) pairs
     sharing a column, summed per (row, gallery item) after a sort on CUDA (atomics would make
     the float sums order-dependent) and by index_add_ on CPU (sequential there); then
     J = 1 - S / (2 - S) (1 where S = 0), final = (1 - lambda) J + lambda dn on a (rows, g)
     chunk; dense output copies it, topk keeps the m smallest per row.
Memory: O(N (K + K H + Q |R*|)) for the sparse stages, plus one chunk of rows.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

__all__ = ["Config", "FeatureDistances", "BlockDistances", "rerank_sparse", "smallest_stable", "mul_pow2"]


@dataclass(frozen=True)
class Config:
    k_forward: int          # forward list length before capping at N (k1 + 1, or k1 for faiss_compat)
    k_half: int             # half list length before capping
    k_qe: int               # k2
    lambda_value: float
    square_twice: bool
    raw_weights: bool       # softmax of the raw working distance (faiss_compat)
    clamp_jaccard: bool     # J clamped at 0 (faiss_compat)
    knn_precision: str = "fp32"  # "fp32", or "tf32" / "bf16" candidates rescored exactly


def _element_budget(device: torch.device) -> int:
    """Elements of one dense (rows x columns) float32 chunk."""
    return 1 << 26 if device.type == "cuda" else 1 << 22


def _pair_budget(device: torch.device) -> int:
    """(query entry, index entry) pairs expanded at once for S."""
    return 1 << 25 if device.type == "cuda" else 1 << 22


def _rows_per_chunk(n_cols: int, device: torch.device, cap: int | None = None) -> int:
    rows = max(1, _element_budget(device) // max(1, n_cols))
    return rows if cap is None else max(1, min(rows, cap))


@contextlib.contextmanager
def _cuda_matmul_precision(precision: str):
    """fp32 CUDA GEMMs in ``precision`` ("ieee" or "tf32") inside the block, then the caller's
    setting back. Uses the fp32_precision API where torch has it (mixing it with the legacy
    allow_tf32 flag is an error in recent torch), else the legacy flag."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        prev = m.fp32_precision
        m.fp32_precision = precision
        try:
            yield
        finally:
            m.fp32_precision = prev
    else:
        prev = m.allow_tf32
        m.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            m.allow_tf32 = prev


@contextlib.contextmanager
def _ieee_fp32(device: torch.device):
    """Full fp32 GEMMs on CUDA (no TF32), whatever the caller's matmul precision setting."""
    if device.type != "cuda":
        yield
        return
    with _cuda_matmul_precision("ieee"):
        yield


def smallest_stable(d: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The m smallest of each row of d in (value, column index) order: (values, indices).

    topk of m + 1 gives the candidates; where the m-th and (m+1)-th values differ the first m are
    unique and only need a stable reorder; rows with a tie there take a full stable sort.
    """
    n_cols = d.shape[1]
    if m >= n_cols:
        v, i = torch.sort(d, dim=1, stable=True)
        return v[:, :m], i[:, :m]
    v, i = torch.topk(d, m + 1, dim=1, largest=False, sorted=True)
    i, p = torch.sort(i, dim=1)
    v = v.gather(1, p)
    v, p = torch.sort(v, dim=1, stable=True)
    i = i.gather(1, p)
    tied = v[:, m - 1] == v[:, m]
    v, i = v[:, :m].contiguous(), i[:, :m].contiguous()
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        fv, fi = torch.sort(d[rows], dim=1, stable=True)
        v[rows], i[rows] = fv[:, :m], fi[:, :m]
    return v, i


# --------------------------------------------------------------------------------------------
# distance sources
# --------------------------------------------------------------------------------------------

class FeatureDistances:
    """Working distance from features: w = |x_i - x_j|^2 (squared again with square_twice).

    The exact d2 of section 3 is sum_k (x_ik - x_jk)^2 in fp32 on the features as given (pairs,
    rows_d2): a function of the two vectors only, so equal distances stay exactly equal and ties
    go to the lower index. Blocks use the GEMM form n_i + n_j - 2 x_i.x_j in fp32 (clamped at 0,
    exact 0 on the diagonal) on centred features (distances are translation invariant, smaller
    norms cancel less): it proposes kNN candidates (rescored exactly) and gives the output's dn.
    """

    def __init__(self, query: torch.Tensor, gallery: torch.Tensor, *, square_twice: bool, use_triton: bool = False):
        x = torch.cat([query.detach(), gallery.detach()]).float().contiguous()
        self.raw = x
        x = (x - x.mean(dim=0, dtype=torch.float64).float()).contiguous()
        self.x = x
        self.sq = (x * x).sum(dim=1)
        self.q, self.g, self.n = query.shape[0], gallery.shape[0], x.shape[0]
        self.device = x.device
        self.square_twice = square_twice
        self.use_triton = use_triton

    def block(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        with _ieee_fp32(self.device):
            d = self.x[r0:r1] @ self.x[c0:c1].t()
        d.mul_(-2.0).add_(self.sq[r0:r1, None]).add_(self.sq[None, c0:c1]).clamp_min_(0.0)
        lo, hi = max(r0, c0), min(r1, c1)
        if lo < hi:
            k = torch.arange(lo, hi, device=self.device)
            d[k - r0, k - c0] = 0.0
        if self.square_twice:
            d.mul_(d)
        return d

    def rows_d2(self, rows: torch.Tensor) -> torch.Tensor:
        """Exact d2 (as pairs_d2, unsquared) of the given rows against all N columns."""
        out = torch.empty(rows.numel(), self.n, dtype=torch.float32, device=self.device)
        cols = torch.arange(self.n, device=self.device)
        step = max(1, (1 << 22) // self.n)  # index pairs per call
        for s in range(0, rows.numel(), step):
            r = rows[s:s + step]
            out[s:s + step] = self.pairs_d2(r.repeat_interleave(self.n), cols.repeat(r.numel())).view(-1, self.n)
        return out

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        out = self.pairs_d2(rows, cols)
        return out * out if self.square_twice else out

    def pairs_d2(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """sum_k (x_ik - x_jk)^2 for every (rows[p], cols[p])."""
        if self.use_triton:
            from fmn_kernels.triton.rerank import pair_sqdist

            out = pair_sqdist(self.raw, rows, cols)
        else:
            out = torch.empty(rows.numel(), device=self.device, dtype=torch.float32)
            step = max(1, _element_budget(self.device) // (2 * self.x.shape[1]))
            for s in range(0, rows.numel(), step):
                diff = self.raw[rows[s:s + step]] - self.raw[cols[s:s + step]]
                out[s:s + step] = (diff * diff).sum(dim=1)
        return out


def mul_pow2(t: torch.Tensor, k: int) -> torch.Tensor:
    """t * 2^k in t's dtype, in steps of at most 2^100 (a float32 scalar): exact wherever the
    result is a normal number of that dtype (scaling up always is, below the dtype's maximum)."""
    while k:
        step = max(-100, min(100, k))
        t = t * (2.0 ** step)
        k -= step
    return t


class BlockDistances:
    """Working distance from Euclidean blocks: w = D^2 (D^4 with square_twice), D the matrix
    [[q_q, q_g], [q_g^T, g_g]] used as given.

    D stays in the blocks' precision (float64 if any block is float64, else float32) until w is
    rounded to float32: float64 blocks are squared in float64 (rounding D to float32 first can
    merge distances that the square keeps apart), and the kNN ranks D itself (``distances``),
    the order of w without its float32 rounding. ``exponent`` k: D is multiplied by 2^k before
    squaring (exact), which keeps w inside float32's range; ``clamp``: negative entries (rounding
    errors the caller accepted) are read as 0.
    """

    def __init__(self, q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor, *, square_twice: bool,
                 exponent: int = 0, clamp: bool = False):
        dtype = torch.float64 if torch.float64 in (q_g.dtype, q_q.dtype, g_g.dtype) else torch.float32
        self.qg = q_g.detach().to(dtype).contiguous()
        self.qq = q_q.detach().to(dtype).contiguous()
        self.gg = g_g.detach().to(dtype).contiguous()
        self.q, self.g = self.qg.shape
        self.n = self.q + self.g
        self.device = self.qg.device
        self.square_twice = square_twice
        self.exponent = exponent
        self.clamp = clamp

    def working(self, d: torch.Tensor) -> torch.Tensor:
        """float32 w of distances d in the blocks' precision: (2^k d)^2 (squared again with
        square_twice) computed in that precision, then rounded once."""
        d = mul_pow2(d, self.exponent) if self.exponent else d
        d = d * d
        if self.square_twice:
            d = d * d
        return d.float()

    def distances(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """D[r0:r1, c0:c1] in the blocks' precision (negatives read as 0 with clamp)."""
        q = self.q
        parts = []
        if r0 < q:
            parts.append(torch.cat([self.qq[r0:min(r1, q)], self.qg[r0:min(r1, q)]], dim=1))
        if r1 > q:
            a, b = max(r0, q) - q, r1 - q
            parts.append(torch.cat([self.qg[:, a:b].t(), self.gg[a:b]], dim=1))
        rows = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        rows = rows[:, c0:c1]
        return rows.clamp_min(0.0) if self.clamp else rows

    def block(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        return self.working(self.distances(r0, r1, c0, c1))

    def pairs(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        q = self.q
        rq, cq = rows < q, cols < q
        rg, cg = (rows - q).clamp_min(0), (cols - q).clamp_min(0)
        rqi, cqi = rows.clamp_max(q - 1), cols.clamp_max(q - 1)
        val = torch.where(
            rq,
            torch.where(cq, self.qq[rqi, cqi], self.qg[rqi, cg]),
            torch.where(cq, self.qg[cqi, rg], self.gg[rg, cg]),
        )
        return self.working(val.clamp_min(0.0) if self.clamp else val)


# --------------------------------------------------------------------------------------------
# pipeline stages
# --------------------------------------------------------------------------------------------

def _knn_blocks(src: BlockDistances, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima of w over all N columns and the n_keep smallest columns of every row, ranked by
    D in the blocks' precision, ties by index: the order of w (a power of two and squaring keep
    it) without the ties that rounding w to float32 can make."""
    n, dev = src.n, src.device
    nbr = torch.empty(n, n_keep, dtype=torch.long, device=dev)
    rowmax = torch.empty(n, dtype=torch.float32, device=dev)
    step = _rows_per_chunk(n, dev)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        d = src.distances(r0, r1, 0, n)
        rowmax[r0:r1] = src.working(d.amax(dim=1))  # rounding is monotone: the max of the rounded w
        nbr[r0:r1] = smallest_stable(d, n_keep)[1]
    return nbr, rowmax


# Relative error of one input element rounded to the low-precision format (conservative: chopping).
_INPUT_ROUNDING = {"fp32": 0.0, "tf32": 2.0 ** -10, "bf16": 2.0 ** -8}
_EXTRA_CANDIDATES = 16
_MAX_CANDIDATES = 8


def _lowp_dots(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b.T with low-precision inputs and fp32 accumulation (tensor cores on CUDA)."""
    if precision == "fp32":
        with _ieee_fp32(a.device):
            return a @ b.t()
    if precision == "tf32" and a.is_cuda:
        with _cuda_matmul_precision("tf32"):
            return a @ b.t()
    if precision == "bf16" and a.is_cuda:
        try:
            return torch.mm(a.bfloat16(), b.bfloat16().t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype): bf16 output, within the bound
            return (a.bfloat16() @ b.bfloat16().t()).float()
    # CPU: inputs rounded to bf16 (8 bits), products and sums in fp32
    return a.bfloat16().float() @ b.bfloat16().float().t()


def _knn_candidates(src, n_keep: int, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Row maxima and the n_keep smallest columns of every row in (exact d2, index) order, from
    GEMM candidates with exact rescoring and a per-row exact fallback.

    With x centred, d2~(i, j) = s_i + s_j - 2 <x_i, x_j>~ (inputs rounded to the GEMM precision,
    u = 0 for fp32; fp32 accumulation) and the exact d2 (pairs_d2: fp32 sum of squared
    differences of the features as given) satisfy, with n_i = |x_i|, M = max_j n_j,
        |d2~(i, j) - d2(i, j)| <= delta_i = c_in n_i M + c_acc (n_i + M)^2
    c_in = 2 (2u + u^2) (rounded inputs), c_acc = 1.25 (2 gamma_d + 10 e), e = 2^-24,
    gamma_d = d e / (1 - d e): the GEMM form's dot, norms and additions, the centring and the
    exact sum's own rounding.
    Per row: the P = n_keep + 16 smallest d2~ are rescored exactly (sum_k (x_ik - x_jk)^2); every
    other column has d2~ >= t (the largest kept d2~), hence d2 >= t - delta_i, so the exact
    n_keep smallest are among the candidates when the n_keep-th exact value is < t - delta_i.
    The row max: the 8 largest d2~ are rescored; the rest have d2 <= m + delta_i (m the smallest of
    those 8 d2~), so the exact max is found when it exceeds m + delta_i. Rows failing either test
    are recomputed exactly. Works on d2 (square_twice is monotone and applied at the end).
    """
    n, dev, x = src.n, src.device, src.x
    d = x.shape[1]
    u = _INPUT_ROUNDING[precision]
    e = 2.0 ** -24
    c_in = 2.0 * (2.0 * u + u * u)
    c_acc = 1.25 * (2.0 * d * e / max(1e-3, 1.0 - d * e) + 10.0 * e)
    norms = src.sq.sqrt() * (1.0 + 2.0 * d * e)  # upper bounds despite the rounding of sq
    nmax = norms.max()
    n_cand = min(n, n_keep + _EXTRA_CANDIDATES)
    n_top = min(n, _MAX_CANDIDATES)
    nbr = torch.empty(n, n_keep, dtype=torch.long, device=dev)
    rowmax = torch.empty(n, dtype=torch.float32, device=dev)
    step = _rows_per_chunk(n, dev)
    failed = []
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        approx = _lowp_dots(x[r0:r1], x, precision)
        approx.mul_(-2.0).add_(src.sq[r0:r1, None]).add_(src.sq[None, :])
        delta = c_in * norms[r0:r1] * nmax + c_acc * (norms[r0:r1] + nmax) ** 2
        rows = torch.arange(r0, r1, device=dev)
        # smallest: rescore, order by (exact, index), test the bound
        va, ja = torch.topk(approx, n_cand, dim=1, largest=False, sorted=False)
        exact = src.pairs_d2(rows[:, None].expand_as(ja).reshape(-1), ja.reshape(-1)).view_as(ja)
        ja, p = torch.sort(ja, dim=1)
        exact = exact.gather(1, p)
        exact, p = torch.sort(exact, dim=1, stable=True)
        ja = ja.gather(1, p)
        ok = torch.ones(r1 - r0, dtype=torch.bool, device=dev)
        if n_cand < n:
            ok &= exact[:, n_keep - 1] < va.amax(dim=1) - delta
        nbr[r0:r1] = ja[:, :n_keep]
        # largest
        vb, jb = torch.topk(approx, n_top, dim=1, largest=True, sorted=False)
        top_exact = src.pairs_d2(rows[:, None].expand_as(jb).reshape(-1), jb.reshape(-1)).view_as(jb)
        mx = top_exact.amax(dim=1)
        if n_top < n:
            ok &= mx > vb.amin(dim=1) + delta
        rowmax[r0:r1] = mx
        del approx
        failed.append(rows[~ok])
    failed = torch.cat(failed)
    for f0 in range(0, failed.numel(), step):
        rows = failed[f0:f0 + step]
        dd = src.rows_d2(rows)
        rowmax[rows] = dd.amax(dim=1)
        nbr[rows] = smallest_stable(dd, n_keep)[1]
    if src.square_twice:
        rowmax.mul_(rowmax)
    return nbr, rowmax


def _reciprocal(lst: torch.Tensor, rows: torch.Tensor | None = None, budget: int | None = None) -> torch.Tensor:
    """recip[r, s] = i appears in lst[lst[i, s]], i = rows[r]   (lst: (N, K) neighbour lists;
    rows: the items to answer for, default all N; budget: elements of a chunk's temporaries)."""
    n, k = lst.shape
    items = torch.arange(n, device=lst.device) if rows is None else rows
    out = torch.empty(items.numel(), k, dtype=torch.bool, device=lst.device)
    step = max(1, (budget or _element_budget(lst.device)) // (k * k))
    for r0 in range(0, items.numel(), step):
        me = items[r0:r0 + step]
        out[r0:r0 + step] = (lst[lst[me]] == me[:, None, None]).any(dim=-1)
    return out


def _dedup_sorted(cols: torch.Tensor, sentinel: int) -> torch.Tensor:
    """Rows of column ids -> sorted, duplicate-free rows, sentinel-padded at the end."""
    s = torch.sort(cols, dim=1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    return torch.sort(s.masked_fill(dup, sentinel), dim=1).values


def _pad_cat(chunks: list[torch.Tensor], fill) -> torch.Tensor:
    width = max(1, max(c.shape[1] for c in chunks))
    out = [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=fill) if c.shape[1] < width else c for c in chunks]
    return torch.cat(out, dim=0)


def _expand(fwd, recip, half, recip_h, n: int, budget: int | None = None) -> torch.Tensor:
    """R*(i): R(i) plus each Rh(c), c in R(i), with 3 |Rh(c) & R(i)| > 2 |Rh(c)|. Padded (rows, W)
    for the rows of fwd / recip (any subset of the N items); half, recip_h: all N items; sentinel n."""
    k, h = fwd.shape[1], half.shape[1]
    step = max(1, (budget or _element_budget(fwd.device)) // (k * h * k))
    chunks = []
    for r0 in range(0, fwd.shape[0], step):
        r1 = min(fwd.shape[0], r0 + step)
        f, rf = fwd[r0:r1], recip[r0:r1]
        m, vm = half[f], recip_h[f]                                           # (B, K, H)
        in_r = ((m.unsqueeze(-1) == f[:, None, None, :]) & rf[:, None, None, :]).any(dim=-1)
        size = vm.sum(dim=-1)
        common = (vm & in_r).sum(dim=-1)
        accept = rf & (3 * common > 2 * size)                                 # (B, K)
        cand = torch.cat(
            [f.masked_fill(~rf, n), m.masked_fill(~(accept.unsqueeze(-1) & vm), n).flatten(1)], dim=1
        )
        s = _dedup_sorted(cand, n)
        width = int((s < n).sum(dim=1).max())
        chunks.append(s[:, :width].contiguous())   # a view would keep all of s alive
    if not chunks:
        return torch.full((0, 1), n, dtype=fwd.dtype, device=fwd.device)
    return _pad_cat(chunks, n)


def _weights(src, members: torch.Tensor, rowmax: torch.Tensor, raw: bool) -> torch.Tensor:
    """V on the padded member lists: exp(-dn) (or exp(-(w - min w)) when raw) normalised per row."""
    valid = members < src.n
    rows = torch.arange(members.shape[0], device=members.device)[:, None].expand_as(members)[valid]
    return weights_of(src.pairs(rows, members[valid]), valid, rowmax[rows], raw)


def weights_of(w: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor, raw: bool) -> torch.Tensor:
    """V from the working distances w of the valid entries of padded member lists (row-major order)
    and each entry's row maximum ``scale``: exp(-w / scale) (0 where scale is 0), or with raw
    exp(-(w - min w)), normalised per row."""
    x = torch.full(valid.shape, float("inf"), dtype=torch.float32, device=valid.device)
    if raw:
        x[valid] = w
        x = x - x.amin(dim=1, keepdim=True)
    else:
        x[valid] = torch.where(scale > 0, w / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(w))
    e = torch.exp(-x)
    return e / e.sum(dim=1, keepdim=True)


def _query_expand(members, v, first, n: int, budget: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vqe[i] = (1/Q) sum_{j in first[i]} V[j], merged per column, for the rows of ``first`` (rows
    of members / v, column ids < n, sentinel n). Returns padded (cols, vals)."""
    qn = first.shape[1]
    step = max(1, (budget or _element_budget(members.device)) // (4 * qn * members.shape[1]))
    col_chunks, val_chunks = [], []
    if first.shape[0] == 0:
        return (torch.full((0, 1), n, dtype=members.dtype, device=members.device),
                torch.zeros(0, 1, dtype=torch.float32, device=members.device))
    for r0 in range(0, first.shape[0], step):
        r1 = min(first.shape[0], r0 + step)
        nb = first[r0:r1]
        c = members[nb].flatten(1)
        val = v[nb].flatten(1)
        c, p = torch.sort(c, dim=1, stable=True)
        val = val.gather(1, p)
        run = val.clone()
        # a column occurs at most once per source row, so a run of equal columns is <= Q long
        for t in range(1, qn):
            run[:, t:] += torch.where(c[:, :-t] == c[:, t:], val[:, :-t], torch.zeros_like(val[:, t:]))
        last = torch.ones_like(c, dtype=torch.bool)
        last[:, :-1] = c[:, :-1] != c[:, 1:]
        keep = last & (c < n)
        c2, p2 = torch.sort(c.masked_fill(~keep, n), dim=1, stable=True)
        run = run.gather(1, p2).masked_fill(c2 >= n, 0.0) * (1.0 / qn)
        width = max(1, int((c2 < n).sum(dim=1).max()))
        col_chunks.append(c2[:, :width].contiguous())   # views would keep c2 and run whole
        val_chunks.append(run[:, :width].contiguous())
    return _pad_cat(col_chunks, n), _pad_cat(val_chunks, 0.0)


def _inverted_index(cols, vals, q: int, n: int):
    """Column -> (gallery item, Vqe value) lists over the gallery rows (rows q: of cols / vals,
    items numbered from 0 there), CSR by column over n columns."""
    gc, gv = cols[q:], vals[q:]
    valid = gc < n
    col = gc[valid]
    item = torch.arange(gc.shape[0], device=cols.device)[:, None].expand_as(gc)[valid]
    val = gv[valid]
    col, p = torch.sort(col, stable=True)
    item, val = item[p], val[p]
    count = torch.bincount(col, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.long, device=cols.device)
    ptr[1:] = torch.cumsum(count, 0)
    return ptr, count, item, val


def _needs_sorted_sums(device: torch.device) -> bool:
    """True where index_add_ on floats uses atomics (CUDA): sum after a sort instead."""
    return device.type != "cpu"


def _overlap_chunk(qcols, qvals, r0, r1, index, g: int, n: int) -> torch.Tensor:
    """S for query rows r0:r1 as a dense (r1 - r0, g) chunk: S(i, j) = sum_c min(Vqe[i,c], Vqe[j,c])."""
    ptr, count, item, ival = index
    ec, ev = qcols[r0:r1], qvals[r0:r1]
    ok = ec < n
    e_row = torch.arange(r1 - r0, device=ec.device)[:, None].expand_as(ec)[ok]
    e_col, e_val = ec[ok], ev[ok]
    cnt = count[e_col]
    s = torch.zeros((r1 - r0) * g, dtype=torch.float32, device=ec.device)
    total = int(cnt.sum())
    if total == 0:
        return s.view(r1 - r0, g)
    ent = torch.repeat_interleave(torch.arange(e_col.numel(), device=ec.device), cnt, output_size=total)
    excl = torch.cumsum(cnt, 0) - cnt
    pos = ptr[e_col][ent] + (torch.arange(total, device=ec.device) - excl[ent])
    key = e_row[ent] * g + item[pos]
    contrib = torch.minimum(e_val[ent], ival[pos])
    if not _needs_sorted_sums(ec.device):
        # CPU index_add_ accumulates in index order: deterministic, no sort needed
        s.index_add_(0, key, contrib)
        return s.view(r1 - r0, g)
    key, p = torch.sort(key, stable=True)
    csum = torch.cumsum(contrib[p].double(), 0)
    last = torch.ones_like(key, dtype=torch.bool)
    last[:-1] = key[:-1] != key[1:]
    ends = csum[last]
    sums = torch.diff(ends, prepend=ends.new_zeros(1))
    s[key[last]] = sums.float()
    return s.view(r1 - r0, g)


def rerank_sparse(src, cfg: Config, *, topk: int | None = None, use_triton: bool = False):
    """Run the pipeline on a distance source (FeatureDistances or BlockDistances).

    use_triton: S per query chunk from the Triton kernel (fmn_kernels/triton/rerank.py) instead
    of the expand-sort-sum torch path; the result is the same up to float32 summation order.
    """
    n, q, g, dev = src.n, src.q, src.g, src.device
    k_fwd = min(cfg.k_forward, n)
    k_half = min(cfg.k_half, k_fwd)
    k_qe = min(cfg.k_qe, n)

    if isinstance(src, FeatureDistances):
        nbr, rowmax = _knn_candidates(src, max(k_fwd, k_qe), cfg.knn_precision)
    else:
        nbr, rowmax = _knn_blocks(src, max(k_fwd, k_qe))
    fwd, half = nbr[:, :k_fwd].contiguous(), nbr[:, :k_half].contiguous()
    recip = _reciprocal(fwd)
    recip_h = _reciprocal(half)
    members = _expand(fwd, recip, half, recip_h, n)
    del recip, recip_h
    v = _weights(src, members, rowmax, cfg.raw_weights)
    if k_qe > 1:
        cols, vals = _query_expand(members, v, nbr[:, :k_qe].contiguous(), n)
    else:
        cols, vals = members, v
    del members, v, fwd, half
    index = _inverted_index(cols, vals, q, n)
    qcols, qvals = cols[:q], vals[:q]

    # pairs each query row will expand to, for chunking by work as well as by rows
    count = index[1]
    row_pairs = torch.where(qcols < n, count[qcols.clamp_max(n - 1)], torch.zeros_like(qcols)).sum(dim=1)
    pair_budget = _pair_budget(dev)
    step = _rows_per_chunk(g, dev)
    bounds = []
    r0 = 0
    row_pairs = row_pairs.tolist()
    while r0 < q:
        r1, acc = r0, 0
        while r1 < q and r1 - r0 < step and (r1 == r0 or acc + row_pairs[r1] <= pair_budget):
            acc += row_pairs[r1]
            r1 += 1
        bounds.append((r0, r1))
        r0 = r1

    lam = cfg.lambda_value
    if topk is None:
        out = torch.empty(q, g, dtype=torch.float32, device=dev)
    else:
        out_v = torch.empty(q, topk, dtype=torch.float32, device=dev)
        out_i = torch.empty(q, topk, dtype=torch.long, device=dev)
    for r0, r1 in bounds:
        if use_triton:
            from fmn_kernels.triton.rerank import jaccard_overlap

            s = jaccard_overlap(qcols, qvals, r0, r1, index, g, n)
        else:
            s = _overlap_chunk(qcols, qvals, r0, r1, index, g, n)
        jac = 1.0 - s / (2.0 - s)
        if cfg.clamp_jaccard:
            jac.clamp_min_(0.0)
        dn = src.block(r0, r1, q, n)
        scale = rowmax[r0:r1, None]
        dn = torch.where(scale > 0, dn / torch.where(scale > 0, scale, torch.ones_like(scale)), torch.zeros_like(dn))
        final = jac.mul_(1.0 - lam).add_(dn, alpha=lam)
        if topk is None:
            out[r0:r1] = final
        else:
            out_v[r0:r1], out_i[r0:r1] = smallest_stable(final, topk)
    return out if topk is None else (out_v, out_i)
