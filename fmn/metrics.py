"""Re-ID evaluation metrics: CMC and mAP under the single-query protocol, and distances.

Protocol (DESIGN §4). For query ``i`` with identity ``p`` seen by camera ``c``:

* gallery items with identity ``p`` AND camera ``c`` are removed from its ranking;
* gallery items with the junk identity -1 (Market-1501) are removed from every ranking, and a
  query with identity -1 has no true match; identity 0 (distractors) is an ordinary negative;
* the remaining items with identity ``p`` are its true matches (positives); a query without
  any positive is skipped, and ``num_valid`` counts the queries that were kept;
* the gallery is ranked by ascending distance, ties broken by gallery index (a stable sort:
  of two items at exactly the same distance, the one with the lower gallery index ranks first);
* distances must be finite: NaN or +-inf anywhere in ``dist`` is an error;
* CMC rank-k: fraction of valid queries with a positive among the first k;
* AP: non-interpolated, ``AP = (1/P) * sum_i i / r_i`` where ``r_i`` is the 1-based rank of
  the i-th positive in the filtered ranking; mAP is the mean over valid queries.

How it is computed without a per-query loop or a full argsort. Let the positives of a query
be sorted by (distance, gallery index) with distances ``t_1 <= ... <= t_P`` at gallery
indices ``j_1, ..., j_P``, and let ``n_i`` be the number of negatives (items of another
identity) that come before positive ``i``:

    n_i = #{j negative : d_j < t_i} + #{j negative : d_j == t_i and j < j_i}
    r_i = n_i + i

The first term is a ``searchsorted`` of ``t_i`` in the row's negative distances sorted by
value (same-identity items replaced by +inf). The second term is non-zero only when a
negative has exactly the distance of a positive; those (query, positive) pairs, rare with real
features, are counted exactly by a direct comparison. Rows are processed in chunks so the
working set stays a few tens of MB whatever the gallery size. The value sort runs in numpy on
CPU (a SIMD sort, far faster there than ``torch.sort``) and in torch on GPU.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Tuple

import numpy as np
import torch

__all__ = ["evaluate", "evaluate_reference", "euclidean_distance"]

# CPU rows are sorted by numpy (a SIMD sort, ~10x faster than torch.sort there); the GPU path
# (torch.sort) is used when this is False, which the tests do to check it on CPU.
_NUMPY_SORT = True


# Market-1501's junk identity: removed from every query's ranking (DESIGN §5).
JUNK_PID = -1


def _as_tensor(x, name: str, dtype=None, device=None) -> torch.Tensor:
    try:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x))
        elif not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name} must be numeric (a tensor, array or sequence of numbers), "
                        f"got {type(x).__name__}: {e}") from None
    x = x.detach()
    if dtype is not None and not dtype.is_floating_point and x.is_floating_point():
        if not bool((x == x.round()).all()):
            raise ValueError(f"{name} must hold integer ids, got non-integral values")
    if dtype is not None:
        x = x.to(dtype)
    if device is not None:
        x = x.to(device)
    return x


def _check_inputs(dist, q_pids, g_pids, q_camids, g_camids):
    dist = _as_tensor(dist, "dist")
    if dist.dim() != 2:
        raise ValueError(f"dist must be a (num_query, num_gallery) matrix, got shape {tuple(dist.shape)}")
    dev = dist.device
    # Contiguous: q_pids are searchsorted values, which torch would otherwise copy with a warning.
    q_pids = _as_tensor(q_pids, "q_pids", torch.int64, dev).reshape(-1).contiguous()
    g_pids = _as_tensor(g_pids, "g_pids", torch.int64, dev).reshape(-1).contiguous()
    q_camids = _as_tensor(q_camids, "q_camids", torch.int64, dev).reshape(-1).contiguous()
    g_camids = _as_tensor(g_camids, "g_camids", torch.int64, dev).reshape(-1).contiguous()
    nq, ng = dist.shape
    for name, t, n in (("q_pids", q_pids, nq), ("q_camids", q_camids, nq),
                       ("g_pids", g_pids, ng), ("g_camids", g_camids, ng)):
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} entries but dist has shape {tuple(dist.shape)}")
    if nq == 0:
        raise ValueError("evaluate: the query set is empty (dist has 0 rows)")
    if ng == 0:
        raise ValueError("evaluate: the gallery is empty (dist has 0 columns)")
    if dist.dtype in (torch.float16, torch.bfloat16):
        dist = dist.float()
    elif not dist.is_floating_point():
        dist = dist.double()
    # NaN and +-inf propagate to a row's max or min: two reductions, no matrix-sized temporary.
    finite = torch.isfinite(dist.amax(1)) & torch.isfinite(dist.amin(1))
    if not bool(finite.all()):
        r = int((~finite).nonzero()[0, 0])
        c = int((~torch.isfinite(dist[r])).nonzero()[0, 0])
        raise ValueError(f"evaluate: dist contains a non-finite value (NaN or inf): "
                         f"dist[{r}, {c}] = {float(dist[r, c])} (query row {r}, gallery column {c})")
    # Junk gallery items (identity -1) take no part in any ranking: drop their columns.
    junk = g_pids == JUNK_PID
    if bool(junk.any()):
        keep = ~junk
        if not bool(keep.any()):
            raise ValueError(f"evaluate: all {ng} gallery items have the junk identity {JUNK_PID}")
        dist, g_pids, g_camids = dist[:, keep], g_pids[keep], g_camids[keep]
    return dist, q_pids, g_pids, q_camids, g_camids


def evaluate(dist, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
             chunk_elems: int | None = None) -> Tuple[torch.Tensor, float, int]:
    """CMC and mAP of a query-gallery distance matrix (smaller = more similar).

    Args:
        dist: (q, g) tensor or array of distances; any float dtype, CPU or CUDA. fp16/bf16 are
            widened to fp32 and integers to fp64, both exactly; no value is rounded.
        q_pids, g_pids, q_camids, g_camids: integer identities and cameras, length q or g.
            Gallery items of identity -1 (junk) are left out of every ranking.
        max_rank: length of the returned CMC curve.
        chunk_elems: rows are processed in blocks of about this many matrix entries
            (default 2M on CPU, 64M on GPU).

    Returns:
        ``(cmc, mAP, num_valid)``: ``cmc`` a float32 CPU tensor of length ``max_rank`` with
        ``cmc[k-1]`` = rank-k accuracy in [0, 1]; ``mAP`` in [0, 1]; ``num_valid`` the number
        of queries that have at least one true match.

    Raises:
        ValueError: mismatched shapes, empty query set or gallery (or a gallery of junk only),
            non-finite (NaN or +-inf) distances, non-integral ids, or no query with a true match
            in the gallery.
        TypeError: ids or distances that are not numeric.
    """
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    dist, q_pids, g_pids, q_camids, g_camids = _check_inputs(dist, q_pids, g_pids, q_camids, g_camids)
    dev = dist.device
    nq, ng = dist.shape

    # Gallery grouped by identity (CSR), gallery index ascending inside each group.
    g_order = torch.sort(g_pids, stable=True).indices
    g_sorted_pids = g_pids[g_order]
    uniq, counts = torch.unique_consecutive(g_sorted_pids, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    # For each query: where its identity's group starts and how big it is (0 if absent).
    pos_in_uniq = torch.searchsorted(uniq, q_pids).clamp_(max=max(uniq.numel() - 1, 0))
    present = uniq[pos_in_uniq] == q_pids
    q_start = torch.where(present, starts[pos_in_uniq], torch.zeros_like(pos_in_uniq))
    q_count = torch.where(present, counts[pos_in_uniq], torch.zeros_like(pos_in_uniq))

    if chunk_elems is None:
        chunk_elems = (64 << 20) if dist.is_cuda else (2 << 20)
    rows_per_chunk = max(1, min(nq, chunk_elems // ng))
    first_hit = torch.full((nq,), -1, dtype=torch.int64, device=dev)
    ap = torch.zeros(nq, dtype=torch.float64, device=dev)
    ctx = (dist, g_pids, g_camids, q_pids, q_camids, g_order, q_start, q_count, first_hit, ap)
    bounds = [(s, min(nq, s + rows_per_chunk)) for s in range(0, nq, rows_per_chunk)]
    if dist.is_cuda or not _NUMPY_SORT:
        for s, e in bounds:
            _eval_rows(ctx, s, e, numpy_sort=False)
    else:
        # One chunk per Python thread, each running torch single-threaded and numpy's sort
        # (both release the GIL). Avoids OpenMP barriers on small per-chunk ops.
        n_threads = max(1, torch.get_num_threads())
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if n_threads == 1 or len(bounds) == 1:
                for s, e in bounds:
                    _eval_rows(ctx, s, e, numpy_sort=True)
            else:
                with ThreadPoolExecutor(n_threads) as pool:
                    list(pool.map(lambda b: _eval_rows(ctx, *b, numpy_sort=True), bounds))
        finally:
            torch.set_num_threads(prev)

    valid = first_hit >= 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            f"evaluate: none of the {nq} queries has a true match in the gallery "
            "(same identity seen by a different camera)")
    hits = first_hit[valid]
    ranks = torch.arange(max_rank, device=dev)
    cmc = (hits[None, :] <= ranks[:, None]).sum(1).double() / num_valid
    mAP = float(ap[valid].sum() / num_valid)
    return cmc.float().cpu(), mAP, num_valid


def _eval_rows(ctx, s: int, e: int, numpy_sort: bool) -> None:
    """Fill ``first_hit[s:e]`` (0-based rank of the first match, -1 if none) and ``ap[s:e]``."""
    dist, g_pids, g_camids, q_pids, q_camids, g_order, q_start, q_count, first_hit, ap = ctx
    dev = dist.device
    ng = dist.shape[1]
    c = e - s
    block = dist[s:e]
    # Same-identity gallery items of each query, padded to the widest group in the chunk.
    cnt = q_count[s:e]
    width = int(cnt.max())
    if width == 0:
        return
    ar = torch.arange(width, device=dev)
    slot_ok = ar[None, :] < cnt[:, None]
    gi = g_order[(q_start[s:e, None] + ar[None, :]).clamp_(max=ng - 1)]
    is_pos = slot_ok & (g_camids[gi] != q_camids[s:e, None])
    npos = is_pos.sum(1)
    if int(npos.max()) == 0:
        return
    t_all = block.gather(1, gi)
    t = torch.where(is_pos, t_all, torch.full_like(t_all, float("inf")))
    # Order positives by (distance, gallery index): gi is ascending, a stable sort keeps it.
    t, perm = torch.sort(t, dim=1, stable=True)
    is_pos, gi_s = is_pos.gather(1, perm), gi.gather(1, perm)
    # Positives first (their order kept), so slot k holds the (k+1)-th positive.
    perm = torch.sort((~is_pos).to(torch.uint8), dim=1, stable=True).indices
    t, is_pos, gi_s = t.gather(1, perm), is_pos.gather(1, perm), gi_s.gather(1, perm)

    # Negatives only: same-identity entries become +inf, then each row is sorted by value.
    w = block.clone(memory_format=torch.contiguous_format)
    rows = torch.arange(c, device=dev)[:, None].expand(c, width)
    w[rows[slot_ok], gi[slot_ok]] = float("inf")
    if numpy_sort:
        w.numpy().sort(axis=1)
    else:
        w = torch.sort(w, dim=1).values
    t = t.contiguous()
    n_before = torch.searchsorted(w, t, right=False)
    hi = torch.searchsorted(w, t, right=True)
    tie = is_pos & (hi > n_before)
    if bool(tie.any()):
        r_idx, p_idx = tie.nonzero(as_tuple=True)
        n_before[r_idx, p_idx] += _count_ties(block, g_pids, q_pids[s:e], r_idx,
                                              t[r_idx, p_idx], gi_s[r_idx, p_idx])
    k = ar[None, :].expand(c, width)
    rank0 = n_before + k                       # 0-based rank among the kept gallery items
    prec = (k + 1).double() / (rank0 + 1).double()
    prec = torch.where(is_pos, prec, torch.zeros_like(prec))
    valid = npos > 0
    ap[s:e] = torch.where(valid, prec.sum(1) / npos.clamp(min=1).double(), torch.zeros_like(ap[s:e]))
    first_hit[s:e] = torch.where(valid, rank0[:, 0], torch.full_like(first_hit[s:e], -1))


def _count_ties(block, g_pids, q_pids_chunk, r_idx, t, gi, pairs_per_step: int = 256):
    """For each (row r, value t, index p): #{j : pid_j != pid_r, d[r, j] == t, j < p}."""
    out = torch.empty_like(r_idx)
    ng = block.shape[1]
    ar = torch.arange(ng, device=block.device)
    for s in range(0, r_idx.numel(), pairs_per_step):
        r = r_idx[s:s + pairs_per_step]
        rows = block[r]
        m = (rows == t[s:s + pairs_per_step, None]) & (ar[None, :] < gi[s:s + pairs_per_step, None])
        m &= g_pids[None, :] != q_pids_chunk[r][:, None]
        out[s:s + pairs_per_step] = m.sum(1)
    return out


def evaluate_reference(dist, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50):
    """Plain per-query loop of the same protocol; the oracle for :func:`evaluate` in tests."""
    dist = np.asarray(torch.as_tensor(dist).detach().double().cpu())
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    keep = g_pids != JUNK_PID
    dist, g_pids, g_camids = dist[:, keep], g_pids[keep], g_camids[keep]
    cmc_sum = np.zeros(max_rank)
    aps = []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        match = (g_pids[order] == q_pids[i])[keep]
        if not match.any():
            continue
        first = int(np.flatnonzero(match)[0])
        cmc_sum[first:] += 1
        hit_ranks = np.flatnonzero(match) + 1
        aps.append(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
    n = len(aps)
    if n == 0:
        raise ValueError("evaluate_reference: no query has a true match in the gallery")
    return torch.tensor(cmc_sum / n, dtype=torch.float32), float(np.mean(aps)), n


def euclidean_distance(a, b, squared: bool = False, chunk_rows: int | None = None) -> torch.Tensor:
    """Pairwise Euclidean distance between the rows of ``a`` (m, d) and ``b`` (n, d).

    Computed as ``|a|^2 + |b|^2 - 2 a.b`` with an fp32 GEMM (TF32 and reduced-precision
    matmul are switched off for the call), in row blocks of ``a``. Where that expansion
    cancels badly (the result is below 1e-3 of ``|a|^2 + |b|^2``, i.e. near-duplicates),
    the entry is recomputed directly as ``sum((a - b)^2)``, so every entry carries fp32
    accuracy relative to the distance itself. fp16/bf16 inputs are widened to fp32; fp64
    inputs stay fp64. Returns an (m, n) tensor on the inputs' device.
    """
    a = _as_tensor(a, "a")
    b = _as_tensor(b, "b")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"euclidean_distance expects (m, d) and (n, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.float64 if (a.dtype == torch.float64 or b.dtype == torch.float64) else torch.float32
    a = a.to(dtype)
    b = b.to(dtype=dtype, device=a.device)
    m, n = a.shape[0], b.shape[0]
    out = torch.empty((m, n), dtype=dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if chunk_rows is None:
        chunk_rows = max(1, (64 << 20 if a.is_cuda else 8 << 20) // max(n, 1))
    b2 = (b * b).sum(1)
    prev_prec = torch.get_float32_matmul_precision()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for s in range(0, m, chunk_rows):
            x = a[s:s + chunk_rows]
            x2 = (x * x).sum(1)
            o = out[s:s + chunk_rows]
            torch.addmm(x2[:, None] + b2[None, :], x, b.t(), beta=1.0, alpha=-2.0, out=o)
            scale = x2[:, None] + b2[None, :]
            bad = o < 1e-3 * scale
            if bool(bad.any()):
                r, cidx = bad.nonzero(as_tuple=True)
                for t in range(0, r.numel(), 4096):
                    rr, cc = r[t:t + 4096], cidx[t:t + 4096]
                    o[rr, cc] = ((x[rr] - b[cc]) ** 2).sum(1)
            o.clamp_(min=0)
    finally:
        torch.set_float32_matmul_precision(prev_prec)
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    if not squared:
        out.sqrt_()
    return out
