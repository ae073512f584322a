"""k-reciprocal re-ranking for the model library: exact DESIGN section 3 semantics, sparse.

    dist = fmn.rerank(query_feats, gallery_feats)                  # (q, g)
    values, indices = fmn.rerank(query_feats, gallery_feats, topk=100)
    dist = fmn.rerank_from_distances(q_g, q_q, g_g)                  # Euclidean blocks
    values, indices = fmn.rerank(query_shard, gallery_shard, topk=100, process_group=group)

See fmn_kernels.rerank for the semantics, the variants and the backends, and
fmn_kernels.rerank_distributed for the sharded form. ``shard_bounds`` and ``write_result`` are
what ``fmn rerank`` uses under torchrun: each rank's contiguous slice of the rows, and the result
rows written by rank 0 a chunk at a time.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np
import torch

from fmn.atomic import atomic_write, temporary_name
from fmn_kernels.rerank import rerank, rerank_from_distances

__all__ = ["rerank", "rerank_from_distances", "shard_bounds", "write_result"]

# Bytes of result rows moved to rank 0 and written at a time.
WRITE_CHUNK_BYTES = 1 << 25


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, stop) of ``rank``'s contiguous slice when n rows are split over ``world``
    ranks in rank order, as evenly as possible (the first n % world ranks get one row more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _arrays(result, topk: int | None) -> list[tuple[str, torch.Tensor]]:
    if topk is None:
        return [("dist", result)]
    return [("values", result[0]), ("indices", result[1])]


def _row_chunks(row_counts: list[int], width_bytes: int):
    """(rank, first global row, local rows) pieces of every rank's rows, in global row order."""
    step = max(1, WRITE_CHUNK_BYTES // max(1, width_bytes))
    start = 0
    for r, count in enumerate(row_counts):
        for a in range(0, count, step):
            yield r, start + a, slice(a, min(count, a + step))
        start += count


def write_result(out: str, result, row_counts: list[int], width: int, topk: int | None, process_group=None) -> None:
    """Write re-ranked rows to ``out`` (rank 0 writes; the other ranks of ``process_group`` send
    their rows there). ``result`` is this rank's rows: the (q_r, width) distances, or with topk
    (values, indices) of shape (q_r, topk); ``row_counts`` the rows of every rank, in rank order.

    Formats by extension: ``.npy`` the dense (q, width) float32 distances; ``.npz`` with arrays
    ``dist`` (dense) or ``values`` and ``indices`` (topk); anything else a torch file holding the
    dense tensor or ``{"values", "indices"}``. The rows go chunk by chunk into .npy files that are
    memory-mapped beside ``out`` and then packed into the format asked for, so rank 0 holds one
    chunk besides its own rows; the file appears atomically.
    """
    import torch.distributed as dist

    rank = dist.get_rank(process_group) if process_group is not None else 0
    names = _arrays(result, topk)
    specs = [(name, t.dtype, (sum(row_counts), width if topk is None else topk)) for name, t in names]
    row_bytes = sum(s[2][1] * t.element_size() for s, (_, t) in zip(specs, names))

    def fill(parts: dict[str, np.ndarray]) -> None:
        for src, g0, local in _row_chunks(row_counts, row_bytes):
            rows = local.stop - local.start
            for (name, t), (_, dtype, shape) in zip(names, specs):
                if src == rank:
                    piece = t[local].contiguous().cpu()
                    if rank != 0:
                        dist.send(piece, group_dst=0, group=process_group)
                        continue
                elif rank == 0:
                    piece = torch.empty(rows, shape[1], dtype=dtype)
                    dist.recv(piece, group_src=src, group=process_group)
                else:
                    continue
                parts[name][g0:g0 + rows] = piece.numpy()

    if rank != 0:
        fill({})
        return
    atomic_write(out, lambda tmp: _write_parts(tmp, out, specs, fill))


def _write_parts(tmp: str, out: str, specs, fill) -> None:
    """Memory-mapped .npy parts beside ``out``, filled by ``fill``, then packed into ``tmp``."""
    folder = os.path.dirname(os.path.abspath(out))
    paths = {name: os.path.join(folder, temporary_name(f"{name}.npy")) for name, _, _ in specs}
    try:
        parts = {name: np.lib.format.open_memmap(paths[name], mode="w+", dtype=_numpy_dtype(dtype), shape=shape)
                 for name, dtype, shape in specs}
        fill(parts)
        for arr in parts.values():
            arr.flush()
        del parts
        if out.endswith(".npy"):
            os.replace(paths["dist"], tmp)
        elif out.endswith(".npz"):
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
                for name in paths:
                    z.write(paths[name], arcname=f"{name}.npy")
        else:
            mapped = {name: torch.from_numpy(np.load(paths[name], mmap_mode="c")) for name in paths}
            torch.save(mapped["dist"] if "dist" in mapped else mapped, tmp)
    finally:
        for p in paths.values():
            if os.path.exists(p):
                os.unlink(p)


def _numpy_dtype(dtype: torch.dtype):
    return np.float32 if dtype == torch.float32 else np.int64
