"""CMC and mAP sharded over torch.distributed ranks (gloo on CPU, nccl on GPU).

    cmc, mAP, n = fmn.metrics.evaluate_from_features(q_shard, g_shard, q_pids, g_pids, q_camids,
                                                      g_camids, process_group=group)
    cmc, mAP, n, complete = fmn.metrics.evaluate_topk(values, indices, q_pids, g_pids, q_camids,
                                                       g_camids, process_group=group)

Every rank of ``group`` passes its own contiguous slice of the queries and of the gallery, the
slices in rank order (any sizes; an empty slice is a (0, d) tensor and ids of length 0), and every
rank returns the same result: that of one process on the concatenated inputs, under the protocol
of fmn.metrics (DESIGN section 4). Bad use (features of other dims or dtypes on one rank, ids whose
lengths do not match the slices, arguments that differ, no valid query at all) is one error, the
same on every rank.

evaluate_from_features. No rank holds the q x g matrix, nor other ranks' features beyond a streamed
chunk of query rows. The owner of each chunk of queries broadcasts its features (the next chunk in
flight while the current one is ranked); every rank computes the chunk's distances to its own
gallery slice, a (chunk, g_r) block, by the GEMM and near-duplicate rule of
fmn.metrics.euclidean_distance. The single-process counting (fmn.metrics) then splits over ranks:
a query's true matches and their global gallery indices follow from the ids alone, which every rank
holds (all_gathered, O(q + g) integers); their distances are summed into place over the ranks
(each entry comes from the one rank that owns the item, the others add 0); the positives are
sorted by (distance, global index); and the number of negatives before positive i,

    n_i = #{j negative : d_j < t_i} + #{j negative : d_j == t_i and j < j_i},

is a sum over ranks of the same count within each rank's slice (junk -1 and the query's identity
seen by its camera left out, ties by global gallery index), an all_reduce. ``r_i = n_i + i``, AP
and CMC are then computed by the single-process code, in the same summation order, on every rank.
Memory per rank: O(chunk x g_r) for the block, its sorted copy and the GEMM temporaries, O(q + g)
for the ids and per-query results, two chunks of query features, and the caller's slices.

Guarantee: the result is that of one process bit for bit (cmc, mAP, num_valid) whenever the
per-pair distances are. A GEMM against a gallery slice can round the last bit of a distance
differently from the GEMM against the whole gallery (BLAS picks its blocking from the shape), so
with general float features mAP and CMC agree to float rounding (a distance that moves by one ulp
can swap two items at a near tie) and num_valid is always equal. Features whose dot products are
exact (small integer values, for example) give identical distances and identical results. Measured
on this project's CPU BLAS: random float32 features, 3,368 x 15,913, d = 256, over 2 and 3 gloo
ranks (uneven slices) gave distances and results identical bit for bit; the tests require 1e-6.

evaluate_topk. Each rank's rows are ranked locally by the single-process code against the whole
gallery's ids (all_gathered); the per-query AP, first hit, validity and completeness are gathered
in query order and reduced as one process reduces them: identical bit for bit.
"""
from __future__ import annotations

from contextlib import closing

from dataclasses import dataclass

import torch
import torch.distributed as dist

import fmn.metrics as _metrics
from fmn_kernels.collectives import Comm as _Comm
from fmn_kernels.collectives import check_group as _check_group
from fmn.metrics import (JUNK_PID, _RANK_CHUNK_ELEMS, _as_tensor, _check_finite_values, _check_ids, _cmc_map,
                         _exact_matmul, _kept_columns, _kind, _negatives_before, _Ranking, _sort_positives,
                         _sq_distance_rows, _sq_norms, _topk_lists, _topk_rows)

__all__ = ["evaluate_from_features_sharded", "evaluate_topk_sharded"]


# --------------------------------------------------------------------------------------------
# the group
# --------------------------------------------------------------------------------------------

def _local(check):
    """``check()``'s dict, or its ValueError / TypeError as {"error", "type"}: every rank then
    sees every rank's outcome (see _agree)."""
    try:
        return check()
    except (ValueError, TypeError) as exc:
        return {"error": str(exc), "type": type(exc).__name__}


def _agree(comm: _Comm, mine: dict, fn: str, same=()) -> list[dict]:
    """Every rank's dict; the first rank's error, or the first key of ``same`` ((key, what)
    pairs) whose values differ across ranks, raised on every rank with the same message."""
    metas = comm.objects(mine)
    for r, m in enumerate(metas):
        if "error" in m:
            kind = TypeError if m["type"] == "TypeError" else ValueError
            raise kind(f"{fn} (process group): rank {r}: {m['error']}")
    for key, what in same:
        for r, m in enumerate(metas):
            if m[key] != metas[0][key]:
                raise ValueError(f"{fn} (process group): {what} differ across ranks: rank 0 has {metas[0][key]}, "
                                 f"rank {r} has {m[key]}; every rank must pass slices of the same data with the "
                                 "same arguments")
    return metas


def _gather_ids(comm: _Comm, pids, camids, sizes) -> tuple[torch.Tensor, torch.Tensor]:
    both = comm.all_gather_rows(torch.stack([pids, camids], 1), sizes)
    return both[:, 0].contiguous(), both[:, 1].contiguous()


# --------------------------------------------------------------------------------------------
# evaluate_from_features
# --------------------------------------------------------------------------------------------

def _feature_slices(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids, fn: str):
    """This rank's (query, gallery) features as given and its four id vectors; a ValueError or
    TypeError for features that are not (q_r, d) and (g_r, d) or ids of other lengths."""
    a, b = _as_tensor(query_feats, "query_feats"), _as_tensor(gallery_feats, "gallery_feats")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn} expects query_feats (q_r, d) and gallery_feats (g_r, d) (an empty slice is a "
                         f"(0, d) tensor), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{fn}: query_feats is on {a.device}, gallery_feats on {b.device}")
    ids = _check_ids(q_pids, g_pids, q_camids, g_camids, a.shape[0], b.shape[0], a.device,
                     f"this rank's query_feats has {a.shape[0]} rows and gallery_feats {b.shape[0]}")
    return a, b, ids


def _feature_meta(slices, params: dict) -> dict:
    a, b, _ = slices
    return {"q": a.shape[0], "g": b.shape[0], "d": a.shape[1], "dtypes": (str(a.dtype), str(b.dtype)),
            "device": a.device.type, "params": params}


def evaluate_from_features_sharded(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids,
                                   max_rank: int, chunk_size, group):
    """fmn.metrics.evaluate_from_features with ``process_group``: see the module docstring."""
    fn = "evaluate_from_features"
    _check_group(group, fn)
    out = {}

    def check():
        out["slices"] = _feature_slices(query_feats, gallery_feats, q_pids, g_pids, q_camids, g_camids, fn)
        return _feature_meta(out["slices"], {"max_rank": max_rank, "chunk_size": chunk_size})

    dev = query_feats.device if isinstance(query_feats, torch.Tensor) else torch.device("cpu")
    comm = _Comm(group, dev)
    metas = _agree(comm, _local(check), fn, same=(("d", "feature dims"), ("dtypes", "feature dtypes"),
                                                  ("device", "feature devices"), ("params", "arguments")))
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    q_sizes, g_sizes = [m["q"] for m in metas], [m["g"] for m in metas]
    if sum(q_sizes) == 0:
        raise ValueError(f"{fn} (process group): the query set is empty (no rank holds a query row)")
    if sum(g_sizes) == 0:
        raise ValueError(f"{fn} (process group): the gallery is empty (no rank holds a gallery row)")
    a, b, (qp, gp, qc, gc) = out["slices"]
    dtype = torch.float64 if "torch.float64" in metas[0]["dtypes"] else torch.float32
    q_pids_all, q_camids_all = _gather_ids(comm, qp, qc, q_sizes)
    g_pids_all, g_camids_all = _gather_ids(comm, gp, gc, g_sizes)
    gallery = _GallerySlice(b.to(dtype), g_pids_all, g_camids_all, g_sizes, comm.rank, fn)
    ranking = _Ranking(q_pids_all, gallery.kept_pids, q_camids_all, gallery.kept_camids)
    rows = (int(chunk_size) if chunk_size is not None
            else max(1, _RANK_CHUNK_ELEMS[_kind(a)] // max(1, max(g_sizes))))
    chunks = [_QueryChunk(r, s, min(rows, q_sizes[r] - s)) for r in range(comm.world) for s in range(0, q_sizes[r], rows)]
    q_off = [sum(q_sizes[:r]) for r in range(comm.world)]
    make = lambda c: [a[c.start:c.start + c.rows].to(dtype)]  # noqa: E731
    shapes = lambda c: [((c.rows, a.shape[1]), dtype)]  # noqa: E731
    with closing(comm.stream(chunks, make, shapes)) as stream:
        for c, (feats,) in stream:
            block = gallery.distances(feats)
            _check_finite(comm, block, q_off[c.src] + c.start, gallery, fn)
            _rank_chunk(comm, ranking, gallery, gallery.kept(block), q_off[c.src] + c.start)
    return ranking.result(max_rank, fn)


@dataclass(frozen=True)
class _QueryChunk:
    src: int     # owning rank
    start: int   # first row in the owner's query slice
    rows: int


class _GallerySlice:
    """This rank's gallery slice: features, squared norms, which items are not junk, and where its
    kept items lie among the whole gallery's kept items (a contiguous range k0 .. k1, since junk
    removal keeps the order)."""

    def __init__(self, feats, g_pids_all, g_camids_all, g_sizes, rank: int, fn: str):
        keep_all = _kept_columns(g_pids_all, fn)           # raises on every rank for a junk-only gallery
        kept = g_pids_all != JUNK_PID
        g0 = sum(g_sizes[:rank])
        mine = kept[g0:g0 + g_sizes[rank]]
        self.k0 = int(kept[:g0].sum())
        self.k1 = self.k0 + int(mine.sum())
        self.g0, self.g = g0, sum(g_sizes)
        self.keep = None if bool(mine.all()) else mine.nonzero().squeeze(1)
        self.kept_pids = g_pids_all if keep_all is None else g_pids_all[keep_all]
        self.kept_camids = g_camids_all if keep_all is None else g_camids_all[keep_all]
        self.feats = feats.contiguous()
        self.sq = _sq_norms(self.feats)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Euclidean distances (rows of x, every item of the slice), as euclidean_distance computes them."""
        out = torch.empty((x.shape[0], self.feats.shape[0]), dtype=x.dtype, device=x.device)
        if out.numel():
            with _exact_matmul():
                _sq_distance_rows(x, self.feats, self.sq, out)
            out.sqrt_()
        return out

    def kept(self, block: torch.Tensor) -> torch.Tensor:
        return block if self.keep is None else block.index_select(1, self.keep)


def _check_finite(comm: _Comm, block, q0: int, gallery: _GallerySlice, fn: str) -> None:
    """The first non-finite distance of the chunk over all ranks, (query, gallery item) in global
    order, raised on every rank: each rank's first one as row * g + item, the minimum all_reduced."""
    c, ng = block.shape[0], gallery.g
    code = torch.tensor([c * ng], dtype=torch.int64)
    if block.numel():
        bad = ~torch.isfinite(block.amax(1))          # distances are >= 0: the max catches NaN and inf
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            j = int((~torch.isfinite(block[r])).nonzero()[0, 0])
            code[0] = r * ng + gallery.g0 + j
    code = int(comm.all_reduce(code, dist.ReduceOp.MIN)[0])
    if code < c * ng:
        raise ValueError(f"{fn} (process group): the distance from query {q0 + code // ng} to gallery item "
                         f"{code % ng} is not finite: NaN or inf in the features, or values too large for "
                         f"{block.dtype}")


def _rank_chunk(comm: _Comm, ranking: _Ranking, gallery: _GallerySlice, block, s: int) -> None:
    """AP and first hit of queries s .. s + len(block), ``block`` their distances to this rank's
    kept gallery items (global kept columns k0 .. k1); see the module docstring."""
    c = block.shape[0]
    group = ranking.group(s, s + c)
    if group is None:                                   # from the ids: the same on every rank
        return
    gi, slot_ok, is_pos, npos = group
    k0, k1 = gallery.k0, gallery.k1
    rows = torch.arange(c, device=block.device)[:, None].expand_as(gi)
    mine = slot_ok & (gi >= k0) & (gi < k1)
    t_all = torch.zeros(gi.shape, dtype=block.dtype, device=block.device)
    t_all[mine] = block[rows[mine], gi[mine] - k0]
    t_all = comm.all_reduce(t_all)                      # each entry from its owner, 0 from the others
    t, is_pos, gi_s = _sort_positives(t_all, is_pos, gi)
    if k1 > k0:
        numpy_sort = _metrics._NUMPY_SORT and block.device.type == "cpu"
        n_before = _negatives_before(block, rows[mine], gi[mine] - k0, t, is_pos, (gi_s - k0).clamp(0, k1 - k0),
                                     ranking.g_pids[k0:k1], ranking.q_pids[s:s + c], numpy_sort)
    else:
        n_before = torch.zeros(gi.shape, dtype=torch.int64, device=block.device)
    ranking.store(s, comm.all_reduce(n_before), is_pos, npos)


# --------------------------------------------------------------------------------------------
# evaluate_topk
# --------------------------------------------------------------------------------------------

def _topk_slices(values, indices, q_pids, g_pids, q_camids, g_camids, fn: str):
    """This rank's lists and ids, checked locally; the facts the ranks agree on."""
    values, indices = _topk_lists(values, indices, fn)
    q_r, m = values.shape
    g_r = _as_tensor(g_pids, "g_pids").reshape(-1).shape[0]
    ids = _check_ids(q_pids, g_pids, q_camids, g_camids, q_r, g_r, values.device,
                     f"this rank's values has {q_r} rows and g_pids {g_r} entries")
    lo = hi = None
    if q_r and m:
        _check_finite_values(values, fn)
        lo, hi = (int(v) for v in torch.aminmax(indices))
    return values, indices, ids, {"q": q_r, "g": g_r, "m": m, "lo": lo, "hi": hi, "dtype": str(values.dtype),
                                  "device": values.device.type}


def evaluate_topk_sharded(values, indices, q_pids, g_pids, q_camids, g_camids, max_rank: int, group):
    """fmn.metrics.evaluate_topk with ``process_group``: see the module docstring."""
    fn = "evaluate_topk"
    _check_group(group, fn)
    out = {}

    def check():
        v, idx, ids, meta = _topk_slices(values, indices, q_pids, g_pids, q_camids, g_camids, fn)
        out["slices"] = (v, idx, ids)
        return dict(meta, params={"max_rank": max_rank})

    dev = values.device if isinstance(values, torch.Tensor) else torch.device("cpu")
    comm = _Comm(group, dev)
    metas = _agree(comm, _local(check), fn, same=(("m", "list lengths m"), ("dtype", "values dtypes"),
                                                  ("device", "devices"), ("params", "arguments")))
    q_sizes, g_sizes = [m["q"] for m in metas], [m["g"] for m in metas]
    m, ng = metas[0]["m"], sum(g_sizes)
    _check_topk_layout(metas, sum(q_sizes), m, ng, max_rank, fn)
    v, idx, (qp, gp, qc, gc) = out["slices"]
    g_pids_all, g_camids_all = _gather_ids(comm, gp, gc, g_sizes)
    _kept_columns(g_pids_all, fn)                        # a gallery of junk only: the same error everywhere
    res = {}

    def rows():
        res["rows"] = _topk_rows(v, idx, qp, g_pids_all, qc, g_camids_all, fn)
        return {}

    _agree(comm, _local(rows), fn)
    first_hit, ap, valid, complete = res["rows"]
    ap = comm.all_gather_rows(ap, q_sizes)
    flags = comm.all_gather_rows(torch.stack([first_hit, valid.long(), complete.long()], 1), q_sizes)
    cmc, mAP, num_valid = _cmc_map(flags[:, 0], ap, flags[:, 1].bool(), max_rank if m == ng else min(max_rank, m), fn)
    return cmc, mAP, num_valid, int(flags[:, 2].sum())


def _check_topk_layout(metas, nq: int, m: int, ng: int, max_rank: int, fn: str) -> None:
    """The checks of the single-process function on the gathered facts (the same on every rank)."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if nq == 0:
        raise ValueError(f"{fn} (process group): the query set is empty (no rank holds a query row)")
    if ng == 0:
        raise ValueError(f"{fn} (process group): the gallery is empty (no rank holds g_pids)")
    if not 1 <= m <= ng:
        raise ValueError(f"{fn} (process group): lists of {m} items from a gallery of {ng}: m must lie in 1..{ng}")
    for r, meta in enumerate(metas):
        if meta["lo"] is not None and (meta["lo"] < 0 or meta["hi"] >= ng):
            raise ValueError(f"{fn} (process group): rank {r}: indices must lie in 0..{ng - 1} (the whole "
                             f"gallery, global indices), got {meta['lo']}..{meta['hi']}")
