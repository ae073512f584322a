"""The collectives of fmn's sharded algorithms over one torch.distributed process group (gloo on
CPU, nccl on GPU): the sharded re-ranking (fmn_kernels.rerank_distributed) and the sharded
CMC/mAP (fmn.metrics_sharded) use them alike.

Tensors live on the compute device; collectives run on the group's device (CUDA for nccl, the
CPU for gloo), copies made only where the two differ. Every rank must call the same collectives
in the same order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["Comm", "check_group"]


def check_group(group, fn: str) -> None:
    """One clear error for a process group that cannot be used from this process."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{fn}: process_group given but torch.distributed is not initialised "
                         "(call torch.distributed.init_process_group, or run under torchrun)")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"{fn}: process_group must be a torch.distributed ProcessGroup "
                         f"(e.g. torch.distributed.group.WORLD), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{fn}: this process is not a member of process_group")


class Comm:
    """The process group, this rank, the compute device and the device collectives run on."""

    def __init__(self, group, device: torch.device):
        self.group, self.device = group, device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.wire = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def objects(self, obj) -> list:
        """Every rank's picklable ``obj``, in rank order."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_reduce(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        w = t.to(self.wire).clone()
        dist.all_reduce(w, op=op, group=self.group)
        return w.to(self.device)

    def all_gather_rows(self, t: torch.Tensor, sizes) -> torch.Tensor:
        """Every rank's rows (sizes[r] of them) concatenated in rank order; shorter ones padded on
        the wire (gloo all_gather needs equal shapes)."""
        pad = torch.zeros((max(sizes),) + tuple(t.shape[1:]), dtype=t.dtype, device=self.wire)
        pad[: t.shape[0]] = t.to(self.wire)
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad, group=self.group)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(self.device)

    def all_to_all_rows(self, t: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        out = torch.empty((sum(recv_counts),) + tuple(t.shape[1:]), dtype=t.dtype, device=self.wire)
        dist.all_to_all_single(out, t.to(self.wire).contiguous(), recv_counts, send_counts, group=self.group)
        return out.to(self.device)

    def counts(self, send_counts: list[int]) -> list[int]:
        """recv_counts[s] = what rank s sends to this rank, given every rank's send_counts."""
        got = self.all_to_all_rows(torch.tensor(send_counts, dtype=torch.long), [1] * self.world, [1] * self.world)
        return got.tolist()

    def gather_to(self, t: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
        """Every rank's ``t`` (same shapes) on rank ``dst``, in rank order; None elsewhere."""
        w = t.to(self.wire).contiguous()
        parts = [torch.empty_like(w) for _ in range(self.world)] if self.rank == dst else None
        dist.gather(w, parts, group=self.group, group_dst=dst)
        return None if parts is None else [p.to(self.device) for p in parts]

    def stream(self, entries: list, make, shapes):
        """Yields (entry, tensors) for every entry, on every rank in the same order: the tensors
        ``make(entry)`` of the entry's owner (entry.src), broadcast to all; ``shapes(entry)`` gives
        their (shape, dtype) for the others. The next entry's broadcast is posted before the current
        one is handed out, so communication overlaps the caller's work; two entries are in memory.
        The tensors handed out are valid until the next entry is asked for: receive buffers are
        reused then (a steady pair of buffers rather than a fresh allocation per chunk). Closed
        early (contextlib.closing, or an error on every rank), it completes the posted broadcast."""
        pool: dict = {}

        def post(e):
            if e.src == self.rank:
                bufs, mine = [t.to(self.wire).contiguous() for t in make(e)], []
            else:
                bufs = [_take(pool, shape, dtype, self.wire) for shape, dtype in shapes(e)]
                mine = bufs
            works = [dist.broadcast(b, group=self.group, group_src=e.src, async_op=True) for b in bufs]
            return bufs, works, mine

        pending = post(entries[0]) if entries else None
        done: list = []
        try:
            for i, e in enumerate(entries):
                bufs, works, mine = pending
                pending = None
                for w in works:
                    w.wait()
                for b in done:
                    pool.setdefault((tuple(b.shape), b.dtype), []).append(b)
                done = mine
                pending = post(entries[i + 1]) if i + 1 < len(entries) else None
                yield e, [b.to(self.device) for b in bufs]
        finally:
            if pending is not None:
                for w in pending[1]:
                    w.wait()


def _take(pool: dict, shape, dtype, device) -> torch.Tensor:
    free = pool.get((tuple(shape), dtype))
    return free.pop() if free else torch.empty(shape, dtype=dtype, device=device)
