"""Sharded exact k-reciprocal re-ranking over torch.distributed (gloo on CPU, nccl on GPU).

    values, indices = fmn.rerank(query_shard, gallery_shard, topk=100, process_group=group)

Every rank of ``group`` passes its own contiguous slice of the queries and of the gallery, the
slices in rank order (any sizes; an empty slice is a (0, d) tensor), and gets back its queries'
rows over the whole gallery: the (q_r, g) re-ranked distances in global gallery order, or with
``topk=m`` the (q_r, m) values and global gallery indices. The semantics are those of one process
(DESIGN section 3, fmn_kernels.rerank): the same neighbour lists (certified exact with the exact
d2 of the backend, ties by global index), the same row maxima and the same formulas in float32
afterwards, summed in other orders in places; the values agree with the single-process result to
float32 rounding (a few 1e-7) and the rankings are identical under the near-tie rule.

No rank ever holds an N x N or q x g matrix (with topk), nor the features of other ranks beyond one
streamed chunk, nor a centred copy of its own features: memory per rank is O(N L) for the
neighbour lists plus O(n_r k) for its own rows plus fixed chunk and tile buffers, reused. Features only (no distance blocks); knn_precision fp32. FMN_RERANK_PROFILE=1
prints each rank's stage times and resident memory.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fmn_kernels import backend as _backend
from fmn_kernels import rerank_sparse as _sparse
from fmn_kernels.collectives import Comm as _Comm
from fmn_kernels.collectives import check_group

__all__ = ["rerank_sharded"]

# Bytes of features per streamed chunk (the owner broadcasts this much at a time; two chunks are
# in flight). Tests lower it to exercise many chunks.
STREAM_BYTES = 1 << 22
# Candidates kept per row beyond the L needed (as the single-process kernels keep).
_EXTRA_CANDIDATES = 16
# Owned rows centred at a time in the kNN (a multiple of the C++ kernel's 512-row blocks, so its
# tiles and their GEMMs are those of one call over all the rows).
_CENTRED_ROWS = 8192
# Staging slots per row of the C++ candidate lists (entries wait there until a compaction).
_STAGING = 16
_PAIRS_PER_CALL = 1 << 20
# Elements of one (query chunk, owned gallery) output block, and of the temporaries of one chunk
# of rows in the sparse stages (the single-process torch pipeline uses more: one rank's memory is
# meant to stay a fraction of one process's).
_OUTPUT_ELEMENTS = 1 << 20
# Owned gallery items per output tile on the cpu engine (their centred features are formed per
# tile and query chunk: 2 MB at d = 256).
_OUTPUT_TILE = 2048
_SPARSE_ELEMENTS = 1 << 18


def _register_fakes() -> None:
    """Fake (meta) kernels of the C++ building blocks (shapes only), for torch.library.opcheck
    and tracing; registered once, when the extension is there."""
    if not (_backend.extension_loaded() and hasattr(torch.ops.fmn, "rerank_overlap")):
        return
    torch.library.register_fake("fmn::rerank_overlap")(lambda qcols, qvals, col_ptr, inv_item, inv_val, item0, item1,
                                                        out: None)
    torch.library.register_fake("fmn::rerank_sqdist_pairs")(lambda a, a_idx, b, b_idx: a.new_empty(a_idx.numel()))
    torch.library.register_fake("fmn::rerank_knn_update")(lambda *args: None)


_register_fakes()


class ShardError(ValueError):
    """Bad use of the process group: raised on every rank with the same message."""


class _StageClock:
    """FMN_RERANK_PROFILE=1 prints each rank's wall time per stage to stderr (as the C++ kernel),
    with the process's resident size now and at its peak (Linux)."""

    def __init__(self, rank: int):
        self.on = os.environ.get("FMN_RERANK_PROFILE") is not None
        self.rank = rank
        self.last = time.perf_counter()

    def mark(self, stage: str) -> None:
        _release_free_memory()
        if self.on:
            now = time.perf_counter()
            print(f"fmn.rerank[rank {self.rank}] {stage:<12} {now - self.last:8.3f} s{_resident()}", file=sys.stderr,
                  flush=True)
            self.last = now


def _release_free_memory() -> None:
    """Hands the C heap's free pages back to the system between stages (glibc malloc_trim): the
    stages free large temporaries that the heap would otherwise keep resident."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


def _resident() -> str:
    try:
        with open("/proc/self/status") as fh:
            kb = {line.split(":")[0]: int(line.split()[1]) for line in fh if line.startswith(("VmRSS", "VmHWM"))}
        return f"  (resident {kb['VmRSS'] // 1024} MB, peak {kb['VmHWM'] // 1024} MB)"
    except (OSError, KeyError, ValueError, IndexError):
        return ""


# --------------------------------------------------------------------------------------------
# communication
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Chunk:
    src: int     # owning rank
    local0: int  # first row in the owner's items (its queries, then its gallery)
    rows: int
    gid0: int    # global item id of the first row (ids of a chunk are contiguous)


@dataclass(frozen=True)
class _Layout:
    """Global numbering: N = q + g items, queries first (rank 0's, rank 1's, ...), then the gallery
    in the same rank order; rank r owns its q_r queries and g_r gallery items, in that order."""
    q_sizes: tuple
    g_sizes: tuple
    rank: int

    @property
    def q(self) -> int:
        return sum(self.q_sizes)

    @property
    def g(self) -> int:
        return sum(self.g_sizes)

    @property
    def n(self) -> int:
        return self.q + self.g

    def q_off(self, r: int) -> int:
        return sum(self.q_sizes[:r])

    def g_off(self, r: int) -> int:
        return sum(self.g_sizes[:r])

    def item_ids(self, r: int, device) -> torch.Tensor:
        """Global ids of rank r's items, ascending."""
        q0, g0 = self.q_off(r), self.q + self.g_off(r)
        return torch.cat([torch.arange(q0, q0 + self.q_sizes[r], device=device),
                          torch.arange(g0, g0 + self.g_sizes[r], device=device)])

    def owner(self, gids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(owning rank, row in the owner's items) of global ids."""
        dev, gids = gids.device, gids.long()
        q_end = torch.tensor(self.q_sizes, device=dev).cumsum(0)
        g_end = torch.tensor(self.g_sizes, device=dev).cumsum(0) + self.q
        is_q = gids < self.q
        rank = torch.where(is_q, torch.searchsorted(q_end, gids, right=True),
                           torch.searchsorted(g_end, gids, right=True))
        q_start = q_end - torch.tensor(self.q_sizes, device=dev)
        g_start = g_end - torch.tensor(self.g_sizes, device=dev)
        qs = torch.tensor(self.q_sizes, device=dev)
        local = torch.where(is_q, gids - q_start[rank], qs[rank] + gids - g_start[rank])
        return rank, local

    def chunks(self, rows_per_chunk: int, queries_only: bool = False) -> list[_Chunk]:
        out = []
        for s in range(len(self.q_sizes)):
            spans = [(0, self.q_sizes[s], self.q_off(s))]
            if not queries_only:
                spans.append((self.q_sizes[s], self.g_sizes[s], self.q + self.g_off(s)))
            for local0, count, gid0 in spans:
                for c0 in range(0, count, rows_per_chunk):
                    out.append(_Chunk(s, local0 + c0, min(rows_per_chunk, count - c0), gid0 + c0))
        return out


# --------------------------------------------------------------------------------------------
# agreement: every rank checks the same gathered facts and raises the same error
# --------------------------------------------------------------------------------------------

def _inspect(name: str, t) -> dict:
    if not isinstance(t, torch.Tensor):
        return {"error": f"{name} must be a torch.Tensor, got {type(t).__name__}"}
    if t.dim() != 2:
        return {"error": f"{name} must be 2-D (rows, d); an empty slice is a (0, d) tensor; got shape {tuple(t.shape)}"}
    if not t.is_floating_point():
        return {"error": f"{name} must be a floating-point tensor, got {t.dtype}"}
    info = {"rows": t.shape[0], "d": t.shape[1], "dtype": str(t.dtype).replace("torch.", ""),
            "device": t.device.type, "absmax": 0.0}
    if t.numel():
        lo, hi = (float(v) for v in torch.aminmax(t.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return {"error": f"{name} contains NaN or Inf"}
        info["absmax"] = max(-lo, hi)
    return info


def _first_disagreement(metas: list[dict], key: str, what: str):
    values = [m[key] for m in metas]
    for r, v in enumerate(values):
        if v != values[0]:
            return f"{what} differ across ranks: rank 0 has {values[0]}, rank {r} has {v}"
    return None


def _agree(comm: _Comm, query, gallery, params: dict) -> tuple[_Layout, int, tuple[float, float]]:
    """Gathers every rank's shapes, dtypes, devices, finiteness and parameters; raises the same
    ShardError on every rank where they do not fit together. Returns the layout, the feature
    dimension and (max |query_feats|, max |gallery_feats|) over all ranks."""
    mine = {"query": _inspect("query_feats", query), "gallery": _inspect("gallery_feats", gallery),
            "params": params}
    if "error" not in mine["query"] and "error" not in mine["gallery"]:
        qd, gd = mine["query"], mine["gallery"]
        if qd["d"] != gd["d"]:
            mine["error"] = f"query and gallery feature dims differ: {qd['d']} vs {gd['d']}"
        elif qd["device"] != gd["device"] or (isinstance(query, torch.Tensor) and query.device != gallery.device):
            mine["error"] = f"query_feats is on {query.device}, gallery_feats on {gallery.device}"
        elif qd["dtype"] != gd["dtype"]:
            mine["error"] = f"query_feats is {qd['dtype']}, gallery_feats {gd['dtype']}"
    metas = comm.objects(mine)
    for r, m in enumerate(metas):
        for part in ("query", "gallery"):
            if "error" in m[part]:
                raise ShardError(f"fmn.rerank (process group): rank {r}: {m[part]['error']}")
        if "error" in m:
            raise ShardError(f"fmn.rerank (process group): rank {r}: {m['error']}")
    flat = [{"params": m["params"], "d": m["query"]["d"], "dtype": m["query"]["dtype"],
             "device": m["query"]["device"]} for m in metas]
    for key, what in (("params", "re-ranking parameters"), ("d", "feature dims"), ("dtype", "feature dtypes"),
                      ("device", "feature devices")):
        problem = _first_disagreement(flat, key, what)
        if problem:
            raise ShardError(f"fmn.rerank (process group): {problem}; every rank must pass slices of the same "
                             "features with the same arguments")
    lay = _Layout(tuple(m["query"]["rows"] for m in metas), tuple(m["gallery"]["rows"] for m in metas), comm.rank)
    if lay.q == 0:
        raise ShardError("fmn.rerank (process group): no rank holds a query (q = 0)")
    if lay.g == 0:
        raise ShardError("fmn.rerank (process group): no rank holds a gallery item (g = 0)")
    if flat[0]["d"] == 0:
        raise ShardError("fmn.rerank (process group): features have dimension 0")
    absmax = (max(m["query"]["absmax"] for m in metas), max(m["gallery"]["absmax"] for m in metas))
    return lay, flat[0]["d"], absmax


# --------------------------------------------------------------------------------------------
# stage 1-2: candidate lists from the feature stream, certification, exact rescans
# --------------------------------------------------------------------------------------------

class _Candidates:
    """Per owned row: the cap smallest (d2~, global id) pairs seen so far with their exact d2, and
    the max d2~ over every column seen. ``width`` slots per row (the C++ lists stage entries beyond
    cap); ``kept()`` narrows to the cap kept once every column has been seen."""

    def __init__(self, rows: int, cap: int, width: int, n: int, device):
        self.cap = cap
        self.approx = torch.full((rows, width), float("inf"), device=device)
        self.exact = torch.full((rows, width), float("inf"), device=device)
        self.idx = torch.full((rows, width), n, dtype=torch.long, device=device)
        self.count = torch.zeros(rows, dtype=torch.long, device=device)
        self.rowmax = torch.zeros(rows, device=device)

    def kept(self) -> None:
        self.approx = self.approx[:, :self.cap].contiguous()
        self.exact = self.exact[:, :self.cap].contiguous()
        self.idx = self.idx[:, :self.cap].contiguous()


class _Own:
    """This rank's items: the raw float32 features of its query slice and of its gallery slice
    (the inputs themselves where they are float32 already: no copy), s = |x|^2 of the centred
    x = f - m, and the global ids. Local rows number the queries first, then the gallery. The
    centred features are never held whole: ``centred`` forms a block of rows when it is used
    (f - m elementwise, the same values every time)."""

    def __init__(self, fq: torch.Tensor, fg: torch.Tensor, mean: torch.Tensor, ids: torch.Tensor):
        self.parts = (fq.contiguous(), fg.contiguous())
        self.q_r, self.n_r, self.d = fq.shape[0], fq.shape[0] + fg.shape[0], fq.shape[1]
        self.mean = mean
        self.sq = torch.empty(self.n_r, dtype=torch.float32, device=fq.device)
        for r0, r1 in self.blocks(0, self.n_r):
            xr = self.centred(r0, r1)
            self.sq[r0:r1] = (xr * xr).sum(dim=1)
        self.ids = ids

    def blocks(self, lo: int, hi: int):
        """Local rows [lo, hi) in blocks of ``_CENTRED_ROWS`` that never straddle the two parts."""
        for a, b in ((lo, min(hi, self.q_r)), (max(lo, self.q_r), hi)):
            for r0 in range(a, b, _CENTRED_ROWS):
                yield r0, min(b, r0 + _CENTRED_ROWS)

    def centred(self, r0: int, r1: int, buf: torch.Tensor | None = None) -> torch.Tensor:
        """x = f - m of local rows [r0, r1) (within one part), into the front of ``buf`` if given."""
        f = self.rows(r0, r1 - r0)
        if buf is None:
            return f - self.mean
        return torch.sub(f, self.mean, out=_front(buf, f.shape))

    def spans(self):
        """(raw features, first local row) of the query part and of the gallery part."""
        return ((self.parts[0], 0), (self.parts[1], self.q_r))

    def rows(self, local0: int, count: int) -> torch.Tensor:
        """Raw features of local rows [local0, local0 + count), all in one part."""
        part, start = self.spans()[1] if local0 >= self.q_r else self.spans()[0]
        return part[local0 - start:local0 - start + count]

    def pairs(self, engine: str, rows: torch.Tensor, other: torch.Tensor, other_idx: torch.Tensor) -> torch.Tensor:
        """Exact d2 of (local row rows[p], other[other_idx[p]])."""
        out = torch.empty(rows.numel(), dtype=torch.float32, device=rows.device)
        for part, start in self.spans():
            sel = ((rows >= start) & (rows < start + part.shape[0])).nonzero().squeeze(1)
            if sel.numel():
                out[sel] = _exact_pairs(engine, part, rows[sel] - start, other, other_idx[sel])
        return out


def _front(buf: torch.Tensor, shape) -> torch.Tensor:
    """The first elements of a flat buffer as a contiguous tensor of ``shape``."""
    return buf[:math.prod(shape)].view(shape)


def _exact_pairs(engine: str, a: torch.Tensor, ai: torch.Tensor, b: torch.Tensor, bi: torch.Tensor) -> torch.Tensor:
    """sum_k (a[ai[p], k] - b[bi[p], k])^2 in float32: the C++ kernels' function on the cpu engine,
    the torch pipeline's (FeatureDistances.pairs_d2) otherwise."""
    if engine == "cpu":
        return torch.ops.fmn.rerank_sqdist_pairs(a, ai, b, bi)
    out = torch.empty(ai.numel(), dtype=torch.float32, device=a.device)
    step = max(1, _sparse._element_budget(a.device) // (2 * max(1, a.shape[1])))
    for s in range(0, ai.numel(), step):
        diff = a[ai[s:s + step]] - b[bi[s:s + step]]
        out[s:s + step] = (diff * diff).sum(dim=1)
    return out


def _keep_smallest(vals: torch.Tensor, ids: torch.Tensor, extra: torch.Tensor, k: int):
    """Per row the k smallest (vals, ids) pairs in that order, with ``extra`` carried along."""
    ids, p = torch.sort(ids, dim=1)
    vals, extra = vals.gather(1, p), extra.gather(1, p)
    vals, p = torch.sort(vals, dim=1, stable=True)
    return vals[:, :k], ids.gather(1, p)[:, :k], extra.gather(1, p)[:, :k]


def _update_torch(cand: _Candidates, own: _Own, xc, fc, sqc, gid0: int) -> None:
    """The torch form of fmn::rerank_knn_update (any device)."""
    cap, c = cand.cap, xc.shape[0]
    k = min(cap, c)
    step = _sparse._rows_per_chunk(c, xc.device)
    for b0, b1 in own.blocks(0, own.n_r):
        for r0 in range(b0, b1, step):
            r1 = min(b1, r0 + step)
            with _sparse._ieee_fp32(xc.device):
                d = own.centred(r0, r1) @ xc.t()
            d.mul_(-2.0).add_(own.sq[r0:r1, None] + sqc[None, :]).clamp_min_(0.0)
            rel = own.ids[r0:r1] - gid0
            hit = ((rel >= 0) & (rel < c)).nonzero().squeeze(1)
            d[hit, rel[hit]] = 0.0
            cand.rowmax[r0:r1] = torch.maximum(cand.rowmax[r0:r1], d.amax(dim=1))
            v, j = _sparse.smallest_stable(d, k)
            rows = torch.arange(r0, r1, device=xc.device)[:, None].expand_as(j)
            e = own.pairs("torch", rows.reshape(-1), fc, j.reshape(-1)).view_as(v)
            a, i, x = _keep_smallest(torch.cat([cand.approx[r0:r1], v], 1),
                                     torch.cat([cand.idx[r0:r1], j + gid0], 1),
                                     torch.cat([cand.exact[r0:r1], e], 1), cap)
            cand.approx[r0:r1], cand.idx[r0:r1], cand.exact[r0:r1] = a, i, x


def _knn_stream(comm: _Comm, lay: _Layout, own: _Own, mean, cap: int, engine: str) -> _Candidates:
    """Stage 1: every item's [f | s] streamed from its owner; each chunk merged into the owned
    rows' candidates."""
    d = own.d
    cand = _Candidates(own.n_r, cap, cap + _STAGING if engine == "cpu" else cap, lay.n, comm.device)
    rows = max(1, STREAM_BYTES // (4 * d))
    make = lambda e: [own.rows(e.local0, e.rows), own.sq[e.local0:e.local0 + e.rows]]  # noqa: E731
    shapes = lambda e: [((e.rows, d), torch.float32), ((e.rows,), torch.float32)]  # noqa: E731
    xc_buf = torch.empty(rows * d, device=comm.device)
    x_buf = torch.empty(min(own.n_r, _CENTRED_ROWS) * d, device=comm.device)
    for e, (fc, sqc) in comm.stream(lay.chunks(rows), make, shapes):
        xc = torch.sub(fc, mean, out=_front(xc_buf, fc.shape))
        if engine != "cpu":
            _update_torch(cand, own, xc, fc, sqc, e.gid0)
            continue
        for lo, hi in own.blocks(0, own.n_r):
            torch.ops.fmn.rerank_knn_update(own.centred(lo, hi, x_buf), own.rows(lo, hi - lo), own.sq[lo:hi],
                                            own.ids[lo:hi], xc, fc, sqc, e.gid0, cap, cand.approx[lo:hi],
                                            cand.exact[lo:hi], cand.idx[lo:hi], cand.count[lo:hi], cand.rowmax[lo:hi])
    cand.kept()
    return cand


def _certify(comm: _Comm, own: _Own, cand: _Candidates, n: int, length: int) -> torch.Tensor:
    """Sorts each row's candidates by (exact d2, id) and returns which rows are proven: with
    n_i = |x_i|, M = max_j n_j (over all N), e = 2^-24, gamma = d e / (1 - d e),
        |d2~(i, j) - d2(i, j)| <= delta_i = 1.25 (2 gamma + 10 e) (n_i + M)^2
    and every column outside the candidates has d2~ >= t (their largest d2~), so the L-th exact
    candidate below t - delta_i proves the list (the single-process test)."""
    a = cand.approx
    for r0 in range(0, a.shape[0], _CENTRED_ROWS):      # in place, a block of rows at a time
        rows = slice(r0, r0 + _CENTRED_ROWS)
        i, p = torch.sort(cand.idx[rows], dim=1)
        x, p2 = torch.sort(cand.exact[rows].gather(1, p), dim=1, stable=True)
        cand.idx[rows], cand.exact[rows] = i.gather(1, p2), x
    x = cand.exact
    ok = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    if a.shape[1] >= n:  # every item is a candidate: nothing to prove
        return ok
    d = own.d
    e = 2.0 ** -24
    c_acc = 1.25 * (2.0 * d * e / max(1e-3, 1.0 - d * e) + 10.0 * e)
    grow = 1.0 + 2.0 * d * e
    norms = own.sq.double().sqrt()
    local_max = norms.max().reshape(1) if norms.numel() else torch.zeros(1, dtype=torch.float64, device=a.device)
    nmax = comm.all_reduce(local_max, dist.ReduceOp.MAX) * grow
    delta = c_acc * (norms * grow + nmax) ** 2
    if a.shape[0]:
        ok = x[:, length - 1].double() < a.amax(dim=1).double() - delta
    return ok


def _rescan(comm: _Comm, lay: _Layout, own: _Own, cand: _Candidates, failed: torch.Tensor, length: int,
            engine: str) -> None:
    """Rows whose candidates were not proven: their features go to every rank, which scans them
    exactly against its own items and returns its ``length`` best (exact d2, id); the owners merge
    the lists. Replaces those rows' candidates by the exact lists (padded)."""
    counts = comm.objects(int(failed.numel()))
    if sum(counts) == 0:
        return
    mine = torch.stack([own.rows(int(r), 1)[0] for r in failed.tolist()]) if failed.numel() else \
        torch.empty(0, own.d, device=comm.device)
    feats = comm.all_gather_rows(mine, counts)
    n_own, total = own.n_r, sum(counts)
    best_v = torch.full((total, length), float("inf"), device=comm.device)
    best_i = torch.full((total, length), lay.n, dtype=torch.long, device=comm.device)
    k = min(length, n_own)
    if n_own:
        step = max(1, _PAIRS_PER_CALL // n_own)
        cols = torch.arange(n_own, device=comm.device)
        for r0 in range(0, total, step):
            r = torch.arange(r0, min(total, r0 + step), device=comm.device)
            dd = own.pairs(engine, cols.repeat(r.numel()), feats, r.repeat_interleave(n_own))
            v, j = _sparse.smallest_stable(dd.view(r.numel(), n_own), k)
            best_v[r, :k], best_i[r, :k] = v, own.ids[j]
    all_v = comm.all_gather_rows(best_v.reshape(1, -1), [1] * comm.world).view(comm.world, total, length)
    all_i = comm.all_gather_rows(best_i.reshape(1, -1), [1] * comm.world).view(comm.world, total, length)
    start = sum(counts[:comm.rank])
    mine = slice(start, start + failed.numel())
    v = all_v[:, mine].permute(1, 0, 2).reshape(failed.numel(), -1)
    i = all_i[:, mine].permute(1, 0, 2).reshape(failed.numel(), -1)
    v, i, _ = _keep_smallest(v, i, v, length)
    cand.exact[failed] = float("inf")
    cand.idx[failed] = lay.n
    cand.exact[failed, :length], cand.idx[failed, :length] = v, i


# --------------------------------------------------------------------------------------------
# stages 3-6: lists, R*, V, query expansion, inverted index
# --------------------------------------------------------------------------------------------

def _member_distances(comm: _Comm, lay: _Layout, own: _Own, cand_idx: torch.Tensor, cand_exact: torch.Tensor,
                      members: torch.Tensor, engine: str) -> torch.Tensor:
    """Exact d2 of every (owned row i, j in R*(i)), in row-major order of the valid entries: from the
    candidate lists where j is there, the rest from a second feature stream (only when some rank
    has such members)."""
    n = lay.n
    valid = members < n
    found = torch.zeros(members.shape, dtype=torch.bool, device=members.device)
    value = torch.zeros(members.shape, dtype=torch.float32, device=members.device)
    cap = cand_idx.shape[1]
    step = max(1, _SPARSE_ELEMENTS // max(1, members.shape[1] * cap))
    for r0 in range(0, members.shape[0], step):
        eq = members[r0:r0 + step, :, None] == cand_idx[r0:r0 + step, None, :]
        found[r0:r0 + step] = eq.any(dim=-1)
        pos = eq.to(torch.uint8).argmax(dim=-1)
        value[r0:r0 + step] = cand_exact[r0:r0 + step].gather(1, pos)
    missing = valid & ~found
    total = int(comm.all_reduce(missing.sum().reshape(1).double()).item())
    if total:
        rows, slots = missing.nonzero(as_tuple=True)
        cols = members[rows, slots]
        cols, order = torch.sort(cols)
        rows, slots = rows[order], slots[order]
        d = own.d
        per = max(1, STREAM_BYTES // (4 * d))
        make = lambda e: [own.rows(e.local0, e.rows)]  # noqa: E731
        shapes = lambda e: [((e.rows, d), torch.float32)]  # noqa: E731
        for e, (fc,) in comm.stream(lay.chunks(per), make, shapes):
            lo = int(torch.searchsorted(cols, e.gid0))
            hi = int(torch.searchsorted(cols, e.gid0 + e.rows))
            if hi > lo:
                value[rows[lo:hi], slots[lo:hi]] = own.pairs(engine, rows[lo:hi], fc, cols[lo:hi] - e.gid0)
    return value[valid]


def _fetch_rows(comm: _Comm, lay: _Layout, gids: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor,
                out_cols: torch.Tensor, out_vals: torch.Tensor) -> None:
    """Rows ``gids`` (other ranks' items) of the padded sparse rows (cols, vals) that every rank
    holds for its own items, into (out_cols, out_vals) (as wide as the widest rows on any rank):
    requests and rows exchanged with all_to_all_single."""
    width = out_cols.shape[1]
    owner, local = lay.owner(gids)
    owner, order = torch.sort(owner, stable=True)
    local = local[order]
    send = torch.bincount(owner, minlength=comm.world).tolist()
    recv = comm.counts(send)
    asked = comm.all_to_all_rows(local, send, recv)
    pad = width - cols.shape[1]
    out_cols[order] = comm.all_to_all_rows(torch.nn.functional.pad(cols[asked], (0, pad), value=lay.n), recv, send)
    out_vals[order] = comm.all_to_all_rows(torch.nn.functional.pad(vals[asked], (0, pad), value=0.0), recv, send)


def _expansion_table(comm: _Comm, lay: _Layout, own: _Own, first: torch.Tensor, members, v):
    """The V rows the query expansion of the owned rows reads: the owned rows, then the other
    ranks' rows among ``first`` (fetched), in one table as wide as the widest rows on any rank;
    returns (cols, vals, first as rows of the table)."""
    remote = torch.unique(first)
    remote = remote[~torch.isin(remote, own.ids)]
    width = int(comm.all_reduce(torch.tensor([float(members.shape[1])]), dist.ReduceOp.MAX).item())
    rows = own.n_r + remote.numel()
    cols = torch.full((rows, width), lay.n, dtype=members.dtype, device=members.device)
    vals = torch.zeros(rows, width, dtype=v.dtype, device=v.device)
    cols[:own.n_r, :members.shape[1]], vals[:own.n_r, :v.shape[1]] = members, v
    _fetch_rows(comm, lay, remote, members, v, cols[own.n_r:], vals[own.n_r:])
    ids = torch.cat([own.ids, remote.long()])
    ids, order = torch.sort(ids)
    return cols, vals, order[torch.searchsorted(ids, first.long())]


def _members(lists: torch.Tensor, own: _Own, cfg: _sparse.Config, n: int) -> torch.Tensor:
    """R*(i) of the owned rows, padded (n_r, W) with sentinel n, from the (N, L) lists."""
    k_fwd = min(cfg.k_forward, n)
    k_half = min(cfg.k_half, k_fwd)
    fwd, half = lists[:, :k_fwd], lists[:, :k_half]
    recip = _sparse._reciprocal(fwd, own.ids, _SPARSE_ELEMENTS)
    recip_h = _sparse._reciprocal(half, None, _SPARSE_ELEMENTS)
    return _sparse._expand(fwd[own.ids], recip, half, recip_h, n, _SPARSE_ELEMENTS)


def _weights(members: torch.Tensor, d2: torch.Tensor, rowmax: torch.Tensor, cfg: _sparse.Config, n: int):
    """V of the owned rows on their padded member lists (d2: the valid entries in row-major
    order), a block of rows at a time."""
    w = d2 * d2 if cfg.square_twice else d2
    valid = members < n
    ends = valid.sum(dim=1).cumsum(0).tolist()
    out = torch.empty(members.shape, dtype=torch.float32, device=members.device)
    for r0 in range(0, members.shape[0], _CENTRED_ROWS):
        r1 = min(members.shape[0], r0 + _CENTRED_ROWS)
        e0, e1 = (ends[r0 - 1] if r0 else 0), ends[r1 - 1]
        vb = valid[r0:r1]
        rows = torch.arange(r0, r1, device=members.device)[:, None].expand_as(vb)[vb]
        out[r0:r1] = _sparse.weights_of(w[e0:e1], vb, rowmax[rows], cfg.raw_weights)
    return out


def _csr(cols: torch.Tensor, vals: torch.Tensor, n: int):
    """Padded sparse rows (sentinel n at the end of each row) as (row pointers, cols, vals)."""
    valid = cols < n
    ptr = torch.zeros(cols.shape[0] + 1, dtype=torch.long, device=cols.device)
    ptr[1:] = valid.sum(dim=1).cumsum(0)
    return ptr, cols[valid], vals[valid]


def _padded(ptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, r0: int, r1: int, n: int):
    """Rows r0:r1 of a CSR matrix as padded (cols, vals), as wide as their longest row."""
    lengths = ptr[r0 + 1:r1 + 1] - ptr[r0:r1]
    width = max(1, int(lengths.max())) if r1 > r0 else 1
    slot = torch.arange(width, device=cols.device)
    keep = slot[None, :] < lengths[:, None]
    pc = torch.full((r1 - r0, width), n, dtype=torch.long, device=cols.device)
    pv = torch.zeros(r1 - r0, width, dtype=torch.float32, device=cols.device)
    pc[keep], pv[keep] = cols[ptr[r0]:ptr[r1]].long(), vals[ptr[r0]:ptr[r1]]
    return pc, pv


def _query_expansion(table_cols, table_vals, first: torch.Tensor, q_r: int, n: int):
    """Vqe of the owned rows from the V rows of ``table`` (first: rows of the table), a block of
    rows at a time: (query parts, gallery parts), each a list of CSR blocks in row order, the
    query rows' blocks and the gallery rows' apart (no block straddles the two)."""
    step = max(1, _SPARSE_ELEMENTS // max(1, first.shape[1] * table_cols.shape[1]))
    halves = ([], [])
    for half, (lo, hi) in enumerate(((0, q_r), (q_r, first.shape[0]))):
        for r0 in range(lo, hi, step):
            c, v = _sparse._query_expand(table_cols, table_vals, first[r0:min(hi, r0 + step)], n, _SPARSE_ELEMENTS)
            halves[half].append(_csr(c, v, n))
    return halves


def _concat_csr(parts: list, n: int, device):
    """CSR blocks in row order -> one CSR (row pointers, cols, vals)."""
    if not parts:
        return (torch.zeros(1, dtype=torch.long, device=device), torch.empty(0, dtype=_id_dtype(n), device=device),
                torch.empty(0, device=device))
    offsets = [0]
    for ptr, _, _ in parts[:-1]:
        offsets.append(offsets[-1] + int(ptr[-1]))
    ptr = torch.cat([parts[0][0][:1]] + [p[0][1:] + o for p, o in zip(parts, offsets)])
    return ptr, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _inverted_index(parts: list, n: int, device):
    """Column -> (owned gallery item, Vqe value) over the gallery rows' Vqe (CSR blocks in row
    order, consumed: each block is freed once placed): (col_ptr (n + 1) int64, item int32, val),
    the items of a column ascending. A stable counting sort by column, one block at a time: an
    entry of column c goes to col_ptr[c] + (entries of c in earlier blocks) + (its rank among
    the entries of c in its block, rows ascending)."""
    fill = torch.zeros(n, dtype=torch.long, device=device)
    for _, cols, _ in parts:
        fill.index_add_(0, cols, torch.ones_like(cols, dtype=torch.long))
    col_ptr = torch.zeros(n + 1, dtype=torch.long, device=device)
    col_ptr[1:] = fill.cumsum(0)
    item = torch.empty(int(col_ptr[-1]), dtype=torch.int32, device=device)
    val = torch.empty(int(col_ptr[-1]), dtype=torch.float32, device=device)
    fill.copy_(col_ptr[:-1])
    row0 = 0
    while parts:
        ptr, cols, vals = parts.pop(0)
        rows = torch.repeat_interleave(torch.arange(row0, row0 + ptr.numel() - 1, dtype=torch.int32, device=device),
                                       ptr[1:] - ptr[:-1])
        c, order = torch.sort(cols, stable=True)
        pos = fill[c] + torch.arange(c.numel(), device=device) - torch.searchsorted(c, c)
        item[pos], val[pos] = rows[order], vals[order]
        fill.index_add_(0, c, torch.ones_like(c, dtype=torch.long))
        row0 += ptr.numel() - 1
    return col_ptr, item, val


# --------------------------------------------------------------------------------------------
# stage 7: output from the query stream
# --------------------------------------------------------------------------------------------

def _overlap(qcols, qvals, index, t0: int, t1: int, n: int, engine: str, use_triton: bool, out: torch.Tensor):
    """S (rows, t1 - t0) of a chunk of query rows against the owned gallery items [t0, t1): the
    C++ loop of the single process on the cpu engine (any item range), written into ``out``; else
    over the whole owned gallery (t0 = 0, t1 = g_r) in pieces of at most the pair budget (pairs =
    query entries times index entries sharing a column), a new tensor. ``index``: (col_ptr, item,
    val) on the cpu engine, the torch pipeline's (ptr, count, int64 item, val) else."""
    if engine == "cpu":
        torch.ops.fmn.rerank_overlap(qcols, qvals, *index, t0, t1, out)
        return out
    g_r, count = t1, index[1]
    pairs = torch.where(qcols < n, count[qcols.clamp_max(n - 1)], torch.zeros_like(qcols)).sum(dim=1).tolist()
    s = torch.empty(qcols.shape[0], g_r, dtype=torch.float32, device=qcols.device)
    budget = _sparse._pair_budget(qcols.device)
    r0 = 0
    while r0 < qcols.shape[0]:
        r1, acc = r0, 0
        while r1 < qcols.shape[0] and (r1 == r0 or acc + pairs[r1] <= budget):
            acc += pairs[r1]
            r1 += 1
        if use_triton:
            from fmn_kernels.triton.rerank import jaccard_overlap

            s[r0:r1] = jaccard_overlap(qcols, qvals, r0, r1, index, g_r, n)
        else:
            s[r0:r1] = _sparse._overlap_chunk(qcols, qvals, r0, r1, index, g_r, n)
        r0 = r1
    return s


class _Blocks:
    """Buffers reused for every (query chunk, gallery tile) of the output: the chunk's and the
    tile's centred features, the GEMM block, S, one temporary of their size and a mask."""

    def __init__(self, rows: int, tile: int, d: int, device):
        self.xq = torch.empty(rows * d, device=device)
        self.mask = torch.empty(rows * tile, dtype=torch.bool, device=device)
        self.x = torch.empty(tile * d, device=device)
        self.d = torch.empty(rows * tile, device=device)
        self.s = torch.empty(rows * tile, device=device)
        self.tmp = torch.empty(rows * tile, device=device)


def _final_block(own: _Own, t0: int, t1: int, xq, sqc, scale, qcols, qvals, index, n: int, cfg: _sparse.Config,
                 engine: str, use_triton: bool, bufs: _Blocks) -> torch.Tensor:
    """(1 - lambda) J + lambda dn of a chunk of queries (centred xq, s, row max) against the owned
    gallery items [t0, t1); dn from the d2~ of the single-process output (s_i + s_j - 2 x_i.x_j,
    clamped at 0) over the row max. The result is in the S tensor (bufs.s on the cpu engine: valid
    until the next call); the GEMM block and the temporaries live in ``bufs``."""
    a, b = own.q_r + t0, own.q_r + t1
    shape = (xq.shape[0], b - a)
    with _sparse._ieee_fp32(xq.device):
        d = torch.mm(xq, own.centred(a, b, bufs.x).t(), out=_front(bufs.d, shape))
    tmp = torch.add(sqc[:, None], own.sq[a:b][None, :], out=_front(bufs.tmp, shape))
    d.mul_(-2.0).add_(tmp).clamp_min_(0.0)
    if cfg.square_twice:
        d.mul_(d)
    scale = scale[:, None]
    d.div_(torch.where(scale > 0, scale, torch.ones_like(scale))).mul_(scale > 0)
    s = _overlap(qcols, qvals, index, t0, t1, n, engine, use_triton, _front(bufs.s, shape))
    s.div_(torch.neg(s, out=tmp).add_(2.0)).neg_().add_(1.0)       # 1 - S / (2 - S)
    if cfg.clamp_jaccard:
        s.clamp_min_(0.0)
    return s.mul_(1.0 - cfg.lambda_value).add_(d, alpha=cfg.lambda_value)


def _output_rows(lay: _Layout, d: int, topk, engine: str) -> tuple[int, int]:
    """(query rows per streamed chunk, gallery items per tile), the same on every rank. The cpu
    engine works on tiles of _OUTPUT_TILE owned gallery items, each tile's m best merged into the
    chunk's; the torch engine (and the dense output) on all the owned gallery at once."""
    g_max = max(lay.g_sizes)
    tile = min(g_max, _OUTPUT_TILE) if engine == "cpu" and topk is not None else g_max
    return max(1, min(STREAM_BYTES // (4 * (d + 2)), _OUTPUT_ELEMENTS // max(1, tile))), max(1, tile)


def _chunk_rows_out(own: _Own, tile: int, xq, buf, qc, qv, index, n: int, cfg, topk, g_off: int, g_max: int,
                    engine: str, use_triton: bool, bufs: _Blocks):
    """This rank's part of a query chunk's output: the (rows, g_max) dense piece (owned gallery
    columns first, zero padding after), or with topk the m smallest (value, global gallery index)
    pairs over the owned gallery (inf / index g where it has fewer than m items)."""
    g_r, rows = own.n_r - own.q_r, xq.shape[0]
    sqc, scale = buf[:, 0].contiguous(), buf[:, 1].contiguous()
    if topk is None:
        piece = torch.zeros(rows, g_max, device=xq.device)
        if g_r:
            piece[:, :g_r] = _final_block(own, 0, g_r, xq, sqc, scale, qc, qv, index, n, cfg, engine, use_triton, bufs)
        return piece
    pv = torch.full((rows, topk), float("inf"), device=xq.device)
    pi = torch.full((rows, topk), n, dtype=torch.long, device=xq.device)
    for t0 in range(0, g_r, tile):
        t1 = min(g_r, t0 + tile)
        block = _final_block(own, t0, t1, xq, sqc, scale, qc, qv, index, n, cfg, engine, use_triton, bufs)
        pv, pi = _merge_tile(pv, pi, block, g_off + t0, topk, bufs.mask)
    return pv, pi


def _merge_tile(pv, pi, block, first_index: int, m: int, mask_buf: torch.Tensor | None = None):
    """The m smallest (value, global index) pairs per row of the running best (pv, pi), sorted so,
    and of a tile whose items come after every item seen so far (global indices first_index +
    column). While the running lists are not full, the tile's m smallest join them. Once they are,
    only values below a row's m-th can enter, each after any equal value already kept: those few
    are picked by a mask (in ``mask_buf`` if given), ordered by (row, value, column) and merged by
    one stable sort."""
    rows = block.shape[0]
    if rows == 0:
        return pv, pi
    if not bool(torch.isfinite(pv[:, -1]).all()):
        v, j = _sparse.smallest_stable(block, min(m, block.shape[1]))
    else:
        below = torch.lt(block, pv[:, -1:], out=None if mask_buf is None else _front(mask_buf, block.shape))
        r, c = below.nonzero(as_tuple=True)
        if r.numel() == 0:
            return pv, pi
        val, p = torch.sort(block[r, c], stable=True)
        r, p2 = torch.sort(r[p], stable=True)
        val, c = val[p2], c[p][p2]
        counts = torch.bincount(r, minlength=rows)
        pos = torch.arange(r.numel(), device=r.device) - (counts.cumsum(0) - counts)[r]
        k = min(m, int(counts.max()))
        keep = pos < k
        v = torch.full((rows, k), float("inf"), device=block.device)
        j = torch.zeros((rows, k), dtype=torch.long, device=block.device)
        v[r[keep], pos[keep]], j[r[keep], pos[keep]] = val[keep], c[keep]
    vals, p = torch.sort(torch.cat([pv, v], 1), dim=1, stable=True)
    idx = torch.cat([pi, j + first_index], 1).gather(1, p)
    return vals[:, :m].contiguous(), idx[:, :m].contiguous()


def _output_stream(comm: _Comm, lay: _Layout, own: _Own, rowmax, qrows, index, mean, cfg: _sparse.Config,
                   topk: int | None, engine: str, use_triton: bool):
    """Every query chunk's features, [s | rowmax] and Vqe rows (CSR; the row lengths of every query
    all_gathered first) from its owner; each rank computes the chunk against its own gallery (a
    tile at a time on the cpu engine); the owner gathers the pieces."""
    n, d, dev = lay.n, own.d, comm.device
    q_r = own.q_r
    ptr, vcols, vvals = qrows
    lengths = comm.all_gather_rows(ptr[1:] - ptr[:-1], lay.q_sizes)
    starts = torch.zeros(lay.q + 1, dtype=torch.long)
    starts[1:] = lengths.cpu().cumsum(0)
    g_max, m = max(lay.g_sizes), topk
    rows, tile = _output_rows(lay, d, topk, engine)
    if engine != "cpu":                  # the torch pipeline's form, once
        col_ptr, item, val = index
        index = (col_ptr, col_ptr[1:] - col_ptr[:-1], item.long(), val)
    out = (torch.empty(q_r, lay.g, device=dev) if m is None
           else (torch.empty(q_r, m, device=dev), torch.empty(q_r, m, dtype=torch.long, device=dev)))

    def nnz(e):
        q0 = lay.q_off(e.src) + e.local0
        return int(starts[q0 + e.rows] - starts[q0])

    def make(e):
        sl = slice(e.local0, e.local0 + e.rows)
        a, b = int(ptr[e.local0]), int(ptr[e.local0 + e.rows])
        return [own.rows(e.local0, e.rows), torch.stack([own.sq[sl], rowmax[sl]], 1), vcols[a:b], vvals[a:b]]

    shapes = lambda e: [((e.rows, d), torch.float32), ((e.rows, 2), torch.float32),  # noqa: E731
                        ((nnz(e),), _id_dtype(n)), ((nnz(e),), torch.float32)]
    g_off = lay.g_off(comm.rank)
    bufs = _Blocks(rows, tile, d, dev)
    for e, (fc, buf, ccols, cvals) in comm.stream(lay.chunks(rows, queries_only=True), make, shapes):
        q0 = lay.q_off(e.src) + e.local0
        qc, qv = _padded((starts[q0:q0 + e.rows + 1] - starts[q0]).to(dev), ccols, cvals, 0, e.rows, n)
        xq = torch.sub(fc, mean, out=_front(bufs.xq, fc.shape))
        res = _chunk_rows_out(own, tile, xq, buf, qc, qv, index, n, cfg, m, g_off, g_max, engine, use_triton, bufs)
        sl = slice(e.local0, e.local0 + e.rows)
        if m is None:
            parts = comm.gather_to(res, e.src)
            if parts is not None:
                out[sl] = torch.cat([p[:, :gs] for p, gs in zip(parts, lay.g_sizes)], 1)
            continue
        parts_v, parts_i = comm.gather_to(res[0], e.src), comm.gather_to(res[1], e.src)
        if parts_v is not None:
            v, i, _ = _keep_smallest(torch.cat(parts_v, 1), torch.cat(parts_i, 1), torch.cat(parts_v, 1), m)
            out[0][sl], out[1][sl] = v, i
    return out


# --------------------------------------------------------------------------------------------
# the sharded kernel
# --------------------------------------------------------------------------------------------

# Protocol. P ranks; rank r holds q_r queries and g_r gallery items. The N = q + g items are
# numbered as in one process: the queries first (rank 0's, rank 1's, ...), then the gallery in the
# same rank order; rank r owns the rows of its n_r = q_r + g_r items. Every rank runs the same
# sequence of collectives.
#  0. agreement (all_gather_object): shapes, dtypes, devices, finiteness, max |x| and the arguments
#     of every rank; any misfit is one ShardError on every rank. Then the common power-of-two scale
#     and the centre m = (sum of all N rows, float64 all_reduce) / N; x = f - m, s = |x|^2 per row.
#  1. kNN with row maxima (feature stream): the owners broadcast [f | s] of their items, a chunk
#     of rows at a time, the next chunk in flight while the current one is used. Each rank merges
#     the chunk into the candidates of its rows: the LC = L + 16 smallest (d2~, id) pairs,
#     d2~(i, j) = max(s_i + s_j - 2 x_i.x_j, 0) (0 on the diagonal), each with its exact
#     d2 = sum_k (f_ik - f_jk)^2; rowmax_i = max_j d2~(i, j) over all N. L = max(k1 + 1, k2).
#     The owned rows are centred a block of 8192 at a time into one reused buffer.
#  2. certification, as in one process: the L-th exact candidate below (largest candidate d2~ -
#     delta_i) proves row i's list (the L smallest (d2, id)). Unproven rows (rare) are
#     all_gathered with their features; each rank scans them exactly against its own items; the
#     per-rank L best are all_gathered and merged by their owners.
#  3. lists: all_gather of the fixed-width (n_r, L) lists -> (N, L) on every rank, O(N L). R(i),
#     Rh(c) and R*(i) of the owned rows follow locally. Ids are int32 from here on while N fits.
#  4. V of the owned rows: exact d2 of each member of R*(i) from the candidates where it is one;
#     members further down the row from a second feature stream (only if any rank has some:
#     all_reduce of the count). V[i, j] = exp(-w / rowmax_i) / sum over R*(i).
#  5. query expansion: Vqe[i] = mean of V[j] over the first k2 of row i; the V rows of those j
#     are requested from their owners and returned with all_to_all_single (O(n_r k2 W)).
#  6. inverted index over the owned gallery rows' Vqe (columns: all N items), built by a stable
#     counting sort from the Vqe blocks as they are made (items int32, ascending per column).
#  7. output (query stream): each query chunk's owner broadcasts [f | s | rowmax | Vqe]; every
#     rank computes S, J = 1 - S / (2 - S) and dn = d2~ / rowmax against its own gallery, a
#     (chunk, g_r) block (with topk on the cpu engine: a tile of owned gallery items at a time, each
#     tile's values below the running m-th merged in), and the owner gathers the pieces: the dense
#     rows in global gallery order, or every rank's m smallest merged into the m smallest in
#     (value, global index) order.
# Memory per rank: O(N L) lists, O(n_r (LC + k2 W)) own rows, two stream chunks, the output's
# (chunk, tile) blocks; never an N x N or (with topk) a q x g matrix. Measured at q = 10^4,
# g = 10^5, d = 256 on 2 ranks: 0.58x the peak of one process (bench/RESULTS.md).
def rerank_sharded(query, gallery, *, k1, k2, lambda_value, topk, backend, squared_input, faiss_compat,
                   knn_precision, process_group):
    """fmn.rerank with ``process_group``: see the module docstring and the protocol above."""
    from fmn_kernels import rerank as _rr

    check_group(process_group, "fmn.rerank")
    dev = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    comm = _Comm(process_group, dev)
    params = {"k1": k1, "k2": k2, "lambda_value": lambda_value, "topk": topk, "backend": backend,
              "squared_input": bool(squared_input), "faiss_compat": bool(faiss_compat),
              "knn_precision": knn_precision}
    lay, d, absmax = _agree(comm, query, gallery, params)
    if knn_precision not in ("auto", "fp32"):
        raise ShardError(f"fmn.rerank (process group): knn_precision must be auto or fp32, got {knn_precision!r}")
    k1, k2, lam, topk = _rr._check_params(k1, k2, lambda_value, topk, lay.g)
    if comm.world == 1:
        return _rr.rerank(query, gallery, k1, k2, lam, topk=topk, backend=backend, squared_input=squared_input,
                          faiss_compat=faiss_compat, knn_precision=knn_precision)
    name = _backend.resolve(_rr._OP, backend, dev, triton_ok=True)
    engine = "cpu" if name == "cpu" and _backend.has_compiled_kernel("rerank_knn_update", "cpu") else "torch"
    engines = comm.objects(engine)
    engine = "cpu" if all(e == "cpu" for e in engines) else "torch"
    k_fwd, k_half, raw, clamp = _rr._variant(k1, faiss_compat)
    cfg = _sparse.Config(k_forward=k_fwd, k_half=k_half, k_qe=k2, lambda_value=lam,
                         square_twice=bool(squared_input), raw_weights=raw, clamp_jaccard=clamp)
    exponent = _rr._feature_exponent(absmax, d, bool(squared_input))
    with _rr._no_autocast(dev):
        fq, fg = _rr._float32_features(query, exponent), _rr._float32_features(gallery, exponent)
        total = comm.all_reduce(_sum64(fq) + _sum64(fg))
        mean = (total / lay.n).float()
        own = _Own(fq, fg, mean, lay.item_ids(comm.rank, dev))
        return _run(comm, lay, own, mean, cfg, topk, engine, use_triton=(name == "triton"))


def _run(comm: _Comm, lay: _Layout, own: _Own, mean, cfg: _sparse.Config, topk, engine: str, use_triton: bool):
    n = lay.n
    clock = _StageClock(comm.rank)
    length = max(min(cfg.k_forward, n), min(cfg.k_qe, n))
    cand = _knn_stream(comm, lay, own, mean, min(n, length + _EXTRA_CANDIDATES), engine)
    clock.mark("knn")
    ok = _certify(comm, own, cand, n, length)
    _rescan(comm, lay, own, cand, (~ok).nonzero().squeeze(1), length, engine)
    clock.mark("exact lists")
    rowmax = cand.rowmax * cand.rowmax if cfg.square_twice else cand.rowmax
    cand_idx, cand_exact = cand.idx, cand.exact
    del cand
    mine = cand_idx[:, :length].to(_id_dtype(n))
    lists = torch.cat([comm.all_gather_rows(mine[:own.q_r], lay.q_sizes),
                       comm.all_gather_rows(mine[own.q_r:], lay.g_sizes)])
    clock.mark("gather lists")
    members = _members(lists, own, cfg, n)
    _release_free_memory()
    d2 = _member_distances(comm, lay, own, cand_idx, cand_exact, members, engine)
    del cand_idx, cand_exact, mine
    _release_free_memory()
    v = _weights(members, d2, rowmax, cfg, n)
    del d2
    _release_free_memory()
    k_qe = min(cfg.k_qe, n)
    if k_qe == 1:
        q_parts, g_parts = [_csr(members[:own.q_r], v[:own.q_r], n)], [_csr(members[own.q_r:], v[own.q_r:], n)]
        del members, v, lists
    else:
        first = lists[own.ids, :k_qe]
        del lists
        t_cols, t_vals, rows = _expansion_table(comm, lay, own, first, members, v)
        del members, v
        _release_free_memory()
        q_parts, g_parts = _query_expansion(t_cols, t_vals, rows, own.q_r, n)
        del t_cols, t_vals
    _release_free_memory()
    qrows = _concat_csr(q_parts, n, comm.device)
    del q_parts
    index = _inverted_index(g_parts, n, comm.device)
    clock.mark("V and QE")
    out = _output_stream(comm, lay, own, rowmax, qrows, index, mean, cfg, topk, engine, use_triton)
    clock.mark("output")
    return out


def _id_dtype(n: int) -> torch.dtype:
    """Global item ids (and the sentinel n) in the lists, R*, V, Vqe and the index: int32 while
    they fit, which halves those stages' memory."""
    return torch.int32 if n < 2**31 - 1 else torch.long


def _sum64(f: torch.Tensor) -> torch.Tensor:
    """Column sums of f in float64, a block of rows at a time (no float64 copy of f)."""
    total = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
    step = max(1, (1 << 20) // max(1, f.shape[1]))
    for r0 in range(0, f.shape[0], step):
        total += f[r0:r0 + step].sum(dim=0, dtype=torch.float64)
    return total
