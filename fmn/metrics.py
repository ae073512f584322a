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

Entry points: :func:`evaluate` (a dense (q, g) distance matrix), :func:`evaluate_from_features`
(query and gallery features: distances computed one block of query rows at a time, no (q, g)
matrix is ever held, the numbers those of ``evaluate(euclidean_distance(qf, gf), ...)`` bit for
bit) and :func:`evaluate_topk` (each query's m nearest gallery items, e.g. from
``fmn.rerank(..., topk=m)``). The last two take ``process_group=group`` to run sharded over
torch.distributed ranks, each holding its slice of the queries and of the gallery
(fmn.metrics_sharded).

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
CPU (a SIMD sort, far faster there than ``torch.sort``) and in torch on GPU. A query's AP sums
its precisions in a fixed pairwise order that does not depend on the other rows of its chunk,
so every chunking gives the same numbers bit for bit.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Tuple

import numpy as np
import torch

__all__ = ["evaluate", "evaluate_from_features", "evaluate_topk", "evaluate_reference", "euclidean_distance"]

# CPU rows are sorted by numpy (a SIMD sort, ~10x faster than torch.sort there); the GPU path
# (torch.sort) is used when this is False, which the tests do to check it on CPU.
_NUMPY_SORT = True

# Market-1501's junk identity: removed from every query's ranking (DESIGN §5).
JUNK_PID = -1

# euclidean_distance computes its GEMM in blocks of about this many entries (whole query rows);
# evaluate_from_features computes the same blocks, which is what makes its distances equal.
_DIST_BLOCK_ELEMS = {"cpu": 8 << 20, "cuda": 64 << 20}
# Ranking chunk: rows of the distance matrix ranked at a time, about this many entries.
_RANK_CHUNK_ELEMS = {"cpu": 2 << 20, "cuda": 64 << 20}


def _kind(t: torch.Tensor) -> str:
    return "cuda" if t.is_cuda else "cpu"


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


def _check_ids(q_pids, g_pids, q_camids, g_camids, nq: int, ng: int, dev, shapes: str):
    """The four id arrays as contiguous int64 vectors on ``dev``, of lengths nq, ng, nq, ng."""
    out = []
    # Contiguous: q_pids are searchsorted values, which torch would otherwise copy with a warning.
    for name, x, n in (("q_pids", q_pids, nq), ("g_pids", g_pids, ng),
                       ("q_camids", q_camids, nq), ("g_camids", g_camids, ng)):
        t = _as_tensor(x, name, torch.int64, dev).reshape(-1).contiguous()
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} entries but {shapes}")
        out.append(t)
    return out


def _kept_columns(g_pids: torch.Tensor, fn: str):
    """Indices of the gallery items that are not junk, or None when none is junk."""
    junk = g_pids == JUNK_PID
    if not bool(junk.any()):
        return None
    keep = (~junk).nonzero().squeeze(1)
    if keep.numel() == 0:
        raise ValueError(f"{fn}: all {g_pids.numel()} gallery items have the junk identity {JUNK_PID}")
    return keep


def _check_inputs(dist, q_pids, g_pids, q_camids, g_camids):
    dist = _as_tensor(dist, "dist")
    if dist.dim() != 2:
        raise ValueError(f"dist must be a (num_query, num_gallery) matrix, got shape {tuple(dist.shape)}")
    nq, ng = dist.shape
    q_pids, g_pids, q_camids, g_camids = _check_ids(q_pids, g_pids, q_camids, g_camids, nq, ng, dist.device,
                                                    f"dist has shape {tuple(dist.shape)}")
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
    keep = _kept_columns(g_pids, "evaluate")
    if keep is not None:
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
            (default 2M on CPU, 64M on GPU). The result does not depend on it.

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
    nq, ng = dist.shape
    ranking = _Ranking(q_pids, g_pids, q_camids, g_camids)
    if chunk_elems is None:
        chunk_elems = _RANK_CHUNK_ELEMS[_kind(dist)]
    with _rank_pool(dist.device) as pool:
        ranking.rank(dist, 0, max(1, min(nq, chunk_elems // ng)), pool)
    return ranking.result(max_rank, "evaluate")


def evaluate_from_features(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids,
                           max_rank: int = 50, chunk_size: int | None = None,
                           process_group=None) -> Tuple[torch.Tensor, float, int]:
    """CMC and mAP straight from features: :func:`evaluate` on the Euclidean distances, without a
    (q, g) matrix.

    Returns exactly (bit for bit) what ``evaluate(euclidean_distance(query_feats, gallery_feats),
    q_pids, g_pids, q_camids, g_camids, max_rank)`` returns, under the same protocol, on the
    features' device. The distances of each block of query rows are computed by the very GEMM
    calls :func:`euclidean_distance` makes for those rows: its blocks of ``R`` rows (``R`` = 8M
    entries // g on CPU, 64M // g on CUDA). A GEMM's rows are not the same when computed in
    blocks of another height (BLAS picks its blocking and threading from the shape: the last
    bits differ), so the blocks are not cut to ``chunk_size``.

    Args:
        query_feats, gallery_feats: (q, d) and (g, d) features, tensors or arrays; fp16/bf16 are
            widened to fp32, fp64 stays fp64 (as in euclidean_distance).
        q_pids, g_pids, q_camids, g_camids, max_rank: as in :func:`evaluate`.
        chunk_size: query rows ranked at a time (default: evaluate's chunk, about 2M distances
            on CPU, 64M on CUDA). At most ``max(R, chunk_size)`` rows of distances are held at
            once (whole blocks of R rows; all q rows when chunk_size >= q), plus the GEMM's
            temporaries for one block (R rows of distance-sized values and of bools) and the
            ranking's for the chunks in flight: memory is O(chunk_size * g + 8M entries)
            whatever q is (at 3,368 x 15,913 fp32: 72 MB at the peak against 245 MB for the
            dense path). The result does not depend on it.
        process_group: a torch.distributed group: every rank passes its contiguous slice of the
            queries and of the gallery (features and ids, slices in rank order, any sizes, an
            empty slice a (0, d) tensor) and every rank gets the result of one process on the
            concatenation, without a q x g matrix anywhere (fmn.metrics_sharded: the guarantee,
            bit for bit where the per-pair distances are, and the memory).

    Returns:
        ``(cmc, mAP, num_valid)`` as :func:`evaluate`.

    Raises:
        ValueError: features that are not (q, d) and (g, d), mismatched id lengths, an empty
            query set or gallery (or a gallery of junk only), a non-finite distance (NaN or inf
            features, or features too large for their dtype), no query with a true match.
        TypeError: features or ids that are not numeric.
    """
    if process_group is not None:
        from fmn.metrics_sharded import evaluate_from_features_sharded

        return evaluate_from_features_sharded(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids,
                                              max_rank, chunk_size, process_group)
    fn = "evaluate_from_features"
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    a, b = _feature_pair(query_feats, gallery_feats, ("query_feats", "gallery_feats"), fn)
    nq, ng = a.shape[0], b.shape[0]
    q_pids, g_pids, q_camids, g_camids = _check_ids(q_pids, g_pids, q_camids, g_camids, nq, ng, a.device,
                                                    f"query_feats has {nq} rows and gallery_feats {ng}")
    if nq == 0:
        raise ValueError(f"{fn}: the query set is empty (query_feats has 0 rows)")
    if ng == 0:
        raise ValueError(f"{fn}: the gallery is empty (gallery_feats has 0 rows)")
    keep = _kept_columns(g_pids, fn)
    if keep is not None:
        g_pids, g_camids = g_pids[keep], g_camids[keep]
    ranking = _Ranking(q_pids, g_pids, q_camids, g_camids)
    block = _block_rows(ng, _kind(a))
    rows = min(nq, int(chunk_size) if chunk_size is not None
               else max(1, _RANK_CHUNK_ELEMS[_kind(a)] // g_pids.numel()))
    # Whole blocks, aligned with euclidean_distance's; all queries at once when the chunk covers them.
    step = nq if rows == nq else block * max(1, rows // block)
    b2 = _sq_norms(b)
    buf = torch.empty((min(step, nq), ng), dtype=a.dtype, device=a.device)
    with _rank_pool(a.device) as pool:
        for s in range(0, nq, step):
            d = buf[:min(nq, s + step) - s]
            with _exact_matmul():
                for r in range(0, d.shape[0], block):
                    _sq_distance_rows(a[s + r:s + r + block], b, b2, d[r:r + block])
            d.sqrt_()
            bad = ~torch.isfinite(d.amax(1))        # distances are >= 0: the max catches NaN and inf
            if bool(bad.any()):
                r = int(bad.nonzero()[0, 0])
                c = int((~torch.isfinite(d[r])).nonzero()[0, 0])
                raise ValueError(f"{fn}: the distance from query {s + r} to gallery item {c} is not finite "
                                 f"({float(d[r, c])}): NaN or inf in the features, or values too large "
                                 f"for {a.dtype}")
            ranking.rank(d if keep is None else d.index_select(1, keep), s, rows, pool)
    return ranking.result(max_rank, fn)


def evaluate_topk(values, indices, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50, process_group=None):
    """CMC and mAP from each query's m nearest gallery items, e.g. the ``(values, indices)`` of
    ``fmn.rerank(query_feats, gallery_feats, topk=m)``.

    Each row is ranked by (value, gallery index), as :func:`evaluate` ranks a dense row (rows may
    come in any order), then filtered by the protocol (junk items and items of the query's
    identity and camera removed). A query is valid when it has a true match anywhere in the
    gallery, counted from the ids as evaluate does, so ``num_valid`` is evaluate's.

    * ``cmc[k-1]``: fraction of valid queries with a true match among the first k kept items of
      their list; exact for every k up to the number of items left in the shortest filtered
      list, a lower bound beyond. Length ``min(max_rank, m)``, or ``max_rank`` when m is the
      whole gallery.
    * AP over the truncated list: ``(1/P) * sum i / r_i`` over the true matches inside the list,
      ``P`` the query's number of true matches in the whole gallery (a match outside the list
      adds nothing). This is the standard mAP@m approximation: a lower bound on the full
      ranking's AP, equal to it for every query whose true matches all lie inside its list;
      ``num_complete`` counts those queries, and mAP is exact when it equals ``num_valid``.

    With m equal to the gallery size the result is :func:`evaluate`'s on the dense matrix, bit
    for bit (the CMC, mAP and num_valid).

    Args:
        values: (q, m) distances (smaller = more similar), finite, any float dtype.
        indices: (q, m) gallery indices of those distances, distinct within a row.
        q_pids, g_pids, q_camids, g_camids: as in :func:`evaluate`; g_pids and g_camids cover
            the whole gallery the indices point into.
        max_rank: CMC length (capped at m).
        process_group: a torch.distributed group: every rank passes its queries' rows (values and
            GLOBAL gallery indices, e.g. from ``fmn.rerank(..., topk=m, process_group=group)``; a
            rank without queries passes (0, m) tensors) with their q_pids/q_camids, and its
            contiguous slice of the gallery's g_pids/g_camids (slices in rank order); every rank
            gets the result of one process on the concatenation, bit for bit.

    Returns:
        ``(cmc, mAP, num_valid, num_complete)``.

    Raises:
        ValueError: shapes that do not match, m = 0 or larger than the gallery, indices out of
            range or repeated in a row, non-finite values, no query with a true match.
        TypeError: inputs that are not numeric.
    """
    if process_group is not None:
        from fmn.metrics_sharded import evaluate_topk_sharded

        return evaluate_topk_sharded(values, indices, q_pids, g_pids, q_camids, g_camids, max_rank, process_group)
    fn = "evaluate_topk"
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    values, indices = _topk_lists(values, indices, fn)
    nq, m = values.shape
    ng = _as_tensor(g_pids, "g_pids").reshape(-1).shape[0]
    q_pids, g_pids, q_camids, g_camids = _check_ids(q_pids, g_pids, q_camids, g_camids, nq, ng, values.device,
                                                    f"values has {nq} rows and g_pids {ng} entries")
    if nq == 0:
        raise ValueError(f"{fn}: the query set is empty (values has 0 rows)")
    if ng == 0:
        raise ValueError(f"{fn}: the gallery is empty (g_pids has 0 entries)")
    if not 1 <= m <= ng:
        raise ValueError(f"{fn}: lists of {m} items from a gallery of {ng}: m must lie in 1..{ng}")
    _check_finite_values(values, fn)
    lo, hi = torch.aminmax(indices)
    if int(lo) < 0 or int(hi) >= ng:
        raise ValueError(f"{fn}: indices must lie in 0..{ng - 1} (the gallery), got {int(lo)}..{int(hi)}")
    _kept_columns(g_pids, fn)                                  # a gallery of junk only is an error
    first_hit, ap, valid, complete = _topk_rows(values, indices, q_pids, g_pids, q_camids, g_camids, fn)
    cmc, mAP, num_valid = _cmc_map(first_hit, ap, valid, max_rank if m == ng else min(max_rank, m), fn)
    return cmc, mAP, num_valid, int(complete.sum())


def _topk_lists(values, indices, fn: str):
    """``values`` (q, m) as a float tensor (fp16/bf16 widened to fp32, integers to fp64) and
    ``indices`` as int64 of the same shape, on values' device."""
    values = _as_tensor(values, "values")
    if values.dim() != 2:
        raise ValueError(f"{fn}: values must be a (num_query, m) matrix, got shape {tuple(values.shape)}")
    indices = _as_tensor(indices, "indices", torch.int64, values.device)
    if indices.shape != values.shape:
        raise ValueError(f"{fn}: indices has shape {tuple(indices.shape)} but values {tuple(values.shape)}")
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    elif not values.is_floating_point():
        values = values.double()
    return values, indices


def _check_finite_values(values, fn: str) -> None:
    """``values`` (q, m >= 1) must be finite."""
    finite = torch.isfinite(values.amax(1)) & torch.isfinite(values.amin(1))
    if not bool(finite.all()):
        r = int((~finite).nonzero()[0, 0])
        raise ValueError(f"{fn}: values has a non-finite entry (NaN or inf) in row {r}")


def _topk_rows(values, indices, q_pids, g_pids, q_camids, g_camids, fn: str):
    """Per query of the lists (values, indices) over the gallery (g_pids, g_camids): the 0-based
    rank of the first true match in its filtered list (-1: none), the AP over the list, whether it
    is valid (a true match anywhere in the gallery) and complete (all its true matches in the list)."""
    dev = values.device
    nq, m = values.shape
    # Rank each list by (value, gallery index): sort by index, then stably by value.
    idx, order = torch.sort(indices, dim=1)
    repeated = (idx[:, 1:] == idx[:, :-1]).any(1)
    if bool(repeated.any()):
        r = int(repeated.nonzero()[0, 0])
        raise ValueError(f"{fn}: row {r} of indices names a gallery item twice")
    order = torch.sort(values.gather(1, order), dim=1, stable=True).indices
    idx = idx.gather(1, order)
    gp, gc = g_pids[idx], g_camids[idx]
    same = gp == q_pids[:, None]
    kept = (gp != JUNK_PID) & ~(same & (gc == q_camids[:, None]))
    match = kept & same
    rank = kept.cumsum(1)                       # 1-based rank of a kept item in the filtered list
    nhit = match.cumsum(1)
    npos = _true_match_counts(q_pids, g_pids, q_camids, g_camids)
    valid = npos > 0
    prec = torch.where(match, nhit.double() / rank.double(), torch.zeros((), dtype=torch.float64, device=dev))
    # The hits' precisions in rank order at the front of the row (the rest 0), summed as evaluate sums.
    col = torch.where(match, nhit - 1, torch.full_like(nhit, m))
    prec = torch.zeros(nq, m + 1, dtype=torch.float64, device=dev).scatter_(1, col, prec)[:, :m]
    ap = torch.where(valid, _pairwise_row_sum(prec) / npos.clamp(min=1).double(),
                     torch.zeros((), dtype=torch.float64, device=dev))
    first = rank.gather(1, match.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1) - 1
    first_hit = torch.where(match.any(1), first, torch.full_like(first, -1))
    return first_hit, ap, valid, valid & (nhit[:, -1] == npos)


def _true_match_counts(q_pids, g_pids, q_camids, g_camids) -> torch.Tensor:
    """Per query: gallery items (not junk) of its identity seen by another camera."""
    keep = g_pids != JUNK_PID
    gp, gc = g_pids[keep], g_camids[keep]
    up, uc = torch.unique(gp), torch.unique(gc)
    gpi = torch.searchsorted(up, gp)
    per_pid = torch.bincount(gpi, minlength=up.numel())
    pairs = torch.sort(gpi * uc.numel() + torch.searchsorted(uc, gc)).values      # (identity, camera) keys
    qpi = torch.searchsorted(up, q_pids).clamp_(max=up.numel() - 1)
    qci = torch.searchsorted(uc, q_camids).clamp_(max=uc.numel() - 1)
    has_pid = up[qpi] == q_pids
    key = (qpi * uc.numel() + qci).contiguous()
    same_cam = torch.searchsorted(pairs, key, right=True) - torch.searchsorted(pairs, key)
    same_cam = torch.where(uc[qci] == q_camids, same_cam, torch.zeros_like(same_cam))
    return torch.where(has_pid, per_pid[qpi] - same_cam, torch.zeros_like(same_cam))


def _cmc_map(first_hit, ap, valid, length: int, fn: str):
    """CMC of the valid queries' first-hit ranks (0-based, -1: none) and their mean AP."""
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(
            f"{fn}: none of the {valid.numel()} queries has a true match in the gallery "
            "(same identity seen by a different camera)")
    hits = first_hit[valid]
    hits = torch.where(hits >= 0, hits, torch.full_like(hits, length))
    ranks = torch.arange(length, device=hits.device)
    cmc = (hits[None, :] <= ranks[:, None]).sum(1).double() / num_valid
    mAP = float(ap[valid].sum() / num_valid)
    return cmc.float().cpu(), mAP, num_valid


@contextmanager
def _rank_pool(device):
    """Threads that rank CPU chunks side by side (each running torch single-threaded and numpy's
    sort, both of which release the GIL), or None where chunks run one after the other."""
    n = torch.get_num_threads()
    if device.type != "cpu" or not _NUMPY_SORT or n == 1:
        yield None
        return
    with ThreadPoolExecutor(n) as pool:
        yield pool


class _Ranking:
    """The gallery grouped by identity and the per-query results (0-based rank of the first true
    match, -1 if none; AP), filled chunk by chunk."""

    def __init__(self, q_pids, g_pids, q_camids, g_camids):
        dev = q_pids.device
        # Gallery grouped by identity (CSR), gallery index ascending inside each group.
        self.g_order = torch.sort(g_pids, stable=True).indices
        uniq, counts = torch.unique_consecutive(g_pids[self.g_order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        # For each query: where its identity's group starts and how big it is (0 if absent).
        pos = torch.searchsorted(uniq, q_pids).clamp_(max=max(uniq.numel() - 1, 0))
        present = uniq[pos] == q_pids
        self.q_start = torch.where(present, starts[pos], torch.zeros_like(pos))
        self.q_count = torch.where(present, counts[pos], torch.zeros_like(pos))
        self.g_pids, self.g_camids, self.q_pids, self.q_camids = g_pids, g_camids, q_pids, q_camids
        self.first_hit = torch.full((q_pids.numel(),), -1, dtype=torch.int64, device=dev)
        self.ap = torch.zeros(q_pids.numel(), dtype=torch.float64, device=dev)

    def rank(self, block: torch.Tensor, s0: int, rows: int, pool) -> None:
        """Rank queries ``s0 .. s0 + len(block)``, ``block`` their distances to the kept gallery,
        ``rows`` rows at a time."""
        n = block.shape[0]
        bounds = [(s, min(n, s + rows)) for s in range(0, n, rows)]
        if block.device.type != "cpu" or not _NUMPY_SORT:
            for s, e in bounds:
                self._rank_rows(block[s:e], s0 + s, numpy_sort=False)
            return
        # One chunk per Python thread, torch single-threaded: no OpenMP barriers on small ops.
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if pool is None or len(bounds) == 1:
                for s, e in bounds:
                    self._rank_rows(block[s:e], s0 + s, numpy_sort=True)
            else:
                list(pool.map(lambda b: self._rank_rows(block[b[0]:b[1]], s0 + b[0], numpy_sort=True), bounds))
        finally:
            torch.set_num_threads(prev)

    def result(self, max_rank: int, fn: str):
        return _cmc_map(self.first_hit, self.ap, self.first_hit >= 0, max_rank, fn)

    def _rank_rows(self, block: torch.Tensor, s: int, numpy_sort: bool) -> None:
        """Fill ``first_hit`` and ``ap`` of queries ``s .. s + len(block)``."""
        group = self.group(s, s + block.shape[0])
        if group is None:
            return
        gi, slot_ok, is_pos, npos = group
        t, is_pos, gi_s = _sort_positives(block.gather(1, gi), is_pos, gi)
        rows = torch.arange(block.shape[0], device=block.device)[:, None].expand_as(gi)
        n_before = _negatives_before(block, rows[slot_ok], gi[slot_ok], t, is_pos, gi_s, self.g_pids,
                                     self.q_pids[s:s + block.shape[0]], numpy_sort)
        self.store(s, n_before, is_pos, npos)

    def group(self, s: int, e: int):
        """Queries ``s .. e``: the gallery items of each one's identity (``gi`` (c, w), gallery
        index ascending, padded to the widest group), which slots are real (``slot_ok``) and true
        matches (``is_pos``, another camera), and the number of true matches; None when no query
        of the range has one."""
        cnt = self.q_count[s:e]
        width = int(cnt.max()) if cnt.numel() else 0
        if width == 0:
            return None
        ng = self.g_pids.numel()
        ar = torch.arange(width, device=cnt.device)
        slot_ok = ar[None, :] < cnt[:, None]
        gi = self.g_order[(self.q_start[s:e, None] + ar[None, :]).clamp_(max=ng - 1)]
        is_pos = slot_ok & (self.g_camids[gi] != self.q_camids[s:e, None])
        npos = is_pos.sum(1)
        if int(npos.max()) == 0:
            return None
        return gi, slot_ok, is_pos, npos

    def store(self, s: int, n_before: torch.Tensor, is_pos: torch.Tensor, npos: torch.Tensor) -> None:
        """AP and first hit of queries ``s .. s + len(n_before)`` from the negatives before each
        positive (slot k: the (k+1)-th positive, ``r_k = n_k + k + 1``)."""
        c, width = n_before.shape
        e = s + c
        k = torch.arange(width, device=n_before.device)[None, :].expand(c, width)
        rank0 = n_before + k                       # 0-based rank among the kept gallery items
        prec = (k + 1).double() / (rank0 + 1).double()
        prec = torch.where(is_pos, prec, torch.zeros_like(prec))
        valid = npos > 0
        self.ap[s:e] = torch.where(valid, _pairwise_row_sum(prec) / npos.clamp(min=1).double(),
                                   torch.zeros_like(self.ap[s:e]))
        self.first_hit[s:e] = torch.where(valid, rank0[:, 0], torch.full_like(self.first_hit[s:e], -1))


def _sort_positives(t_all: torch.Tensor, is_pos: torch.Tensor, gi: torch.Tensor):
    """The distances ``t_all`` of each query's identity group (``gi`` ascending), the true matches
    ordered by (distance, gallery index) and moved to the front: slot k holds the (k+1)-th
    positive (other slots +inf). Returns (t, is_pos, gallery index) in that order."""
    t = torch.where(is_pos, t_all, torch.full_like(t_all, float("inf")))
    # Order positives by (distance, gallery index): gi is ascending, a stable sort keeps it.
    t, perm = torch.sort(t, dim=1, stable=True)
    is_pos, gi_s = is_pos.gather(1, perm), gi.gather(1, perm)
    # Positives first (their order kept), so slot k holds the (k+1)-th positive.
    perm = torch.sort((~is_pos).to(torch.uint8), dim=1, stable=True).indices
    return t.gather(1, perm), is_pos.gather(1, perm), gi_s.gather(1, perm)


def _negatives_before(block, same_rows, same_cols, t, is_pos, limit, g_pids, q_pids, numpy_sort: bool):
    """Per (row r, slot k) with ``is_pos``: the negatives of ``block`` (columns of another identity
    than the row's query) before (t[r, k], limit[r, k]) in (distance, column) order, i.e.
    ``#{j : d[r, j] < t} + #{j : d[r, j] == t, j < limit}``. ``(same_rows, same_cols)`` lists the
    entries of the query's identity, which are no negatives; ``g_pids`` are the columns' ids."""
    # Negatives only: same-identity entries become +inf, then each row is sorted by value.
    w = block.clone(memory_format=torch.contiguous_format)
    w[same_rows, same_cols] = float("inf")
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
        n_before[r_idx, p_idx] += _count_ties(block, g_pids, q_pids, r_idx, t[r_idx, p_idx], limit[r_idx, p_idx])
    return n_before


def _pairwise_row_sum(x: torch.Tensor) -> torch.Tensor:
    """Row sums of ``x`` (c, w) by adding adjacent pairs over w padded with zeros to a power of
    two. The sum of a row's leading entries does not change with the number of zeros after them
    (each level adds x + 0 == x), so a query's AP does not depend on the width of its chunk."""
    w = x.shape[1]
    p = 1 << (w - 1).bit_length()
    if p != w:
        x = torch.nn.functional.pad(x, (0, p - w))
    while x.shape[1] > 1:
        x = x[:, 0::2] + x[:, 1::2]
    return x[:, 0]


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


def _feature_pair(a, b, names=("a", "b"), fn: str = "euclidean_distance"):
    """``a`` (m, d) and ``b`` (n, d) in their common dtype (fp64 if either is, else fp32) on
    ``a``'s device."""
    a = _as_tensor(a, names[0])
    b = _as_tensor(b, names[1])
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn} expects {names[0]} (m, d) and {names[1]} (n, d), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.float64 if (a.dtype == torch.float64 or b.dtype == torch.float64) else torch.float32
    return a.to(dtype), b.to(dtype=dtype, device=a.device)


def _block_rows(n: int, kind: str) -> int:
    """euclidean_distance's default row block for a gallery of ``n``."""
    return max(1, _DIST_BLOCK_ELEMS[kind] // max(n, 1))


@contextmanager
def _exact_matmul():
    """fp32 GEMMs without TF32 or reduced-precision matmul."""
    prev_prec = torch.get_float32_matmul_precision()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev_prec)
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32


def _sq_norms(b: torch.Tensor) -> torch.Tensor:
    """Squared norms of the rows of ``b``, in blocks of rows (no temporary the size of ``b``)."""
    rows = max(1, (1 << 20) // max(b.shape[1], 1))
    if b.shape[0] <= rows:
        return (b * b).sum(1)
    return torch.cat([(c * c).sum(1) for c in b.split(rows)])


def _sq_distance_rows(x, b, b2, o) -> None:
    """Squared distances of the rows of ``x`` to those of ``b`` (``b2`` their squared norms) into ``o``."""
    x2 = (x * x).sum(1)
    scale = x2[:, None] + b2[None, :]
    torch.addmm(scale, x, b.t(), beta=1.0, alpha=-2.0, out=o)
    bad = o < scale.mul_(1e-3)
    if bool(bad.any()):
        r, cidx = bad.nonzero(as_tuple=True)
        for t in range(0, r.numel(), 4096):
            rr, cc = r[t:t + 4096], cidx[t:t + 4096]
            o[rr, cc] = ((x[rr] - b[cc]) ** 2).sum(1)
    o.clamp_(min=0)


def euclidean_distance(a, b, squared: bool = False, chunk_rows: int | None = None) -> torch.Tensor:
    """Pairwise Euclidean distance between the rows of ``a`` (m, d) and ``b`` (n, d).

    Computed as ``|a|^2 + |b|^2 - 2 a.b`` with an fp32 GEMM (TF32 and reduced-precision
    matmul are switched off for the call), in row blocks of ``a`` (default: about 8M entries
    on CPU, 64M on CUDA). Where that expansion cancels badly (the result is below 1e-3 of
    ``|a|^2 + |b|^2``, i.e. near-duplicates), the entry is recomputed directly as
    ``sum((a - b)^2)``, so every entry carries fp32 accuracy relative to the distance itself.
    fp16/bf16 inputs are widened to fp32; fp64 inputs stay fp64. Returns an (m, n) tensor on
    the inputs' device.
    """
    a, b = _feature_pair(a, b)
    m, n = a.shape[0], b.shape[0]
    out = torch.empty((m, n), dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if chunk_rows is None:
        chunk_rows = _block_rows(n, _kind(a))
    b2 = _sq_norms(b)
    with _exact_matmul():
        for s in range(0, m, chunk_rows):
            _sq_distance_rows(a[s:s + chunk_rows], b, b2, out[s:s + chunk_rows])
    if not squared:
        out.sqrt_()
    return out
