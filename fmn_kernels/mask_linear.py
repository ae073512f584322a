"""The mask GEMM of FMN's mixing network, with its GEMM forms chosen by measurement.

    u  = g @ W + b                 g (B, M), W (M, N), b (N,), u (B, N), N = H*W
    dg = du @ W^T,   dW = g^T @ du,   db = sum_b du

B is small (a batch) and M, N are large (2048 and 2048 for FMN's pool1 mask), so every one of
the three GEMMs is skinny. On CPU, MKL runs the backward's dg markedly faster in the transposed
form

    dg^T = W @ du^T

(on the 2-core CI machine, fp32, B=32, M=N=2048, cold caches, round-robin medians of 110 calls:
3.0 against 3.8-4.4 ms). The forward's transposed form u^T = W^T @ g^T measured 4.0-4.3 against
3.3-4.3 ms for the plain addmm there, so the forward stays addmm; dW = g^T @ du gains nothing
either way. The results are the same sums over the same products; only the blocking of the BLAS
call changes, so values agree with `addmm` to float rounding. cuBLAS gains nothing from this, so
CUDA tensors, autocast regions, dtypes that MKL does not serve (fp16, bf16), GEMMs too small
for the form to pay for its Python autograd (``MIN_MACS``) and calls without autograd take the
plain `addmm` (and its autograd).
"""
from __future__ import annotations

import torch

from fmn_kernels.backend import functorch_active


def mask_linear_ref(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """u = g @ weight + bias (the plain form; autograd of addmm)."""
    return g @ weight if bias is None else torch.addmm(bias, g, weight)


class _MaskLinearCPU(torch.autograd.Function):
    """u = g @ W + b, with dg in the transposed GEMM form (see the module docstring)."""

    # forward(ctx, ...) rather than a setup_context: Function.apply then skips binding the
    # arguments to the signature (inspect.signature on every call, ~40 us of host time).
    # torch.func transforms, which need setup_context, take mask_linear_ref instead.
    @staticmethod
    def forward(ctx, g, weight, bias):
        ctx.save_for_backward(g, weight)
        ctx.has_bias = bias is not None
        return mask_linear_ref(g, weight, bias)

    @staticmethod
    def backward(ctx, du):
        g, weight = ctx.saved_tensors
        need_g, need_w, need_b = ctx.needs_input_grad
        dg = torch.mm(weight, du.t()).t().contiguous() if need_g else None
        dw = torch.mm(g.t(), du) if need_w else None
        db = du.sum(0) if (need_b and ctx.has_bias) else None
        return dg, dw, db


# Below this many multiply-adds per GEMM (B * M * N) the transposed form saves less than the
# host time of its autograd.Function (tens of microseconds), so small problems take addmm.
MIN_MACS = 1 << 22


def _use_cpu_forms(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The transposed forms differ from addmm in the backward only: without autograd (inference,
    torch.export under no_grad) the plain form runs, before the size test reads the batch."""
    return (torch.is_grad_enabled() and g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64)
            and g.dim() == 2 and weight.dim() == 2 and g.shape[0] * weight.numel() >= MIN_MACS
            and weight.dtype == g.dtype and (bias is None or bias.dtype == g.dtype)
            and not torch.is_autocast_enabled("cpu") and not functorch_active())


def mask_linear(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """u = g @ weight + bias, (B, N), differentiable in all three; the fastest GEMM forms here."""
    if _use_cpu_forms(g, weight, bias):
        return _MaskLinearCPU.apply(g, weight, bias)
    return mask_linear_ref(g, weight, bias)
