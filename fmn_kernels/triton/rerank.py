"""Triton kernels of the sparse re-ranking pipeline (fmn_kernels/rerank_sparse.py has the stages).

pair_sqdist       exact squared distances of the (i, j in R*(i)) pairs, without gathering the
                  (pairs, d) feature blocks that the torch path materialises chunk by chunk.
jaccard_overlap   S(i, j) for a chunk of query rows from the inverted index, written into a dense
                  (rows, g) buffer in a fixed order (no atomics: deterministic).
Both run on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (set before the import).
Only long-standing tl APIs are used (Triton 3.x).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# out[p] = sum_k (x[rows[p], k] - x[cols[p], k])^2      (fp32 accumulation)
# A program owns BLOCK_P pairs and walks the feature dimension in BLOCK_D slices.
@triton.jit
def _pair_sqdist_kernel(
    x_ptr, rows_ptr, cols_ptr, out_ptr,
    n_pairs, d, stride_x,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < n_pairs
    r = tl.load(rows_ptr + p, mask=p_ok, other=0).to(tl.int64)
    c = tl.load(cols_ptr + p, mask=p_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D).to(tl.int64)
        ok = p_ok[:, None] & (k < d)[None, :]
        a = tl.load(x_ptr + r[:, None] * stride_x + k[None, :], mask=ok, other=0.0)
        b = tl.load(x_ptr + c[:, None] * stride_x + k[None, :], mask=ok, other=0.0)
        t = a - b
        acc += t * t
    tl.store(out_ptr + p, tl.sum(acc, axis=1), mask=p_ok)


def pair_sqdist(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """|x[rows[p]] - x[cols[p]]|^2 for every p. x: (N, d) float32 with unit column stride."""
    assert x.dtype == torch.float32 and x.stride(1) == 1
    rows = rows.contiguous()
    cols = cols.contiguous()
    n_pairs = rows.numel()
    out = torch.empty(n_pairs, dtype=torch.float32, device=x.device)
    if n_pairs == 0:
        return out
    block_p = 32
    block_d = min(128, triton.next_power_of_2(x.shape[1]))
    grid = (triton.cdiv(n_pairs, block_p),)
    _pair_sqdist_kernel[grid](x, rows, cols, out, n_pairs, x.shape[1], x.stride(0),
                              BLOCK_P=block_p, BLOCK_D=block_d)
    return out


# For query row i of the chunk (program i):
#   S[i, j] = sum over entries (c, v_i) of Vqe[r0 + i] of sum over (j, v_j) in index[c] of min(v_i, v_j)
# index[c] = item[ptr[c]:ptr[c + 1]], val[ptr[c]:ptr[c + 1]] (gallery items of column c, each once).
# The program walks its entries in order and each column list in BLOCK slices; within a slice the
# items are distinct, so read-add-write needs no atomics, and a barrier orders the slices.
@triton.jit
def _jaccard_overlap_kernel(
    s_ptr, qcols_ptr, qvals_ptr, ptr_ptr, item_ptr, ival_ptr,
    r0, width, g, n,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    row = r0 + i
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    for e in range(0, width):
        c = tl.load(qcols_ptr + row * width + e).to(tl.int64)
        if c < n:
            vi = tl.load(qvals_ptr + row * width + e)
            start = tl.load(ptr_ptr + c)
            stop = tl.load(ptr_ptr + c + 1)
            for p0 in range(start, stop, BLOCK):
                p = p0 + lanes
                ok = p < stop
                j = tl.load(item_ptr + p, mask=ok, other=0).to(tl.int64)
                vj = tl.load(ival_ptr + p, mask=ok, other=0.0)
                dst = s_ptr + i * g + j
                cur = tl.load(dst, mask=ok, other=0.0)
                tl.store(dst, cur + tl.minimum(vj, vi), mask=ok)
                tl.debug_barrier()


def jaccard_overlap(qcols: torch.Tensor, qvals: torch.Tensor, r0: int, r1: int, index, g: int, n: int) -> torch.Tensor:
    """S for query rows r0:r1 as a dense (r1 - r0, g) float32 tensor (see the kernel comment).

    qcols / qvals: padded (q, width) Vqe rows (column sentinel n); index: (ptr, count, item, val)
    of the gallery rows, CSR by column.
    """
    ptr, _, item, ival = index
    qcols = qcols.contiguous()
    qvals = qvals.contiguous()
    s = torch.zeros((r1 - r0, g), dtype=torch.float32, device=qcols.device)
    if r1 <= r0 or item.numel() == 0:
        return s
    _jaccard_overlap_kernel[(r1 - r0,)](
        s, qcols, qvals, ptr.contiguous(), item.contiguous(), ival.contiguous(),
        r0, qcols.shape[1], g, n, BLOCK=64, num_warps=2,
    )
    return s
