"""The mask GEMM of FMN's mixing network, with its GEMM forms chosen by measurement.

    u  = g @ W + b                 g (B, M), W (M, N), b (N,), u (B, N), N = H*W
    dg = du @ W^T,   dW = g^T @ du,   db = sum_b du

B is small (a batch) and M, N are large (2048 and 2048 for FMN's pool1 mask), so every one of
the three GEMMs is skinny. On CPU, MKL runs the same products markedly faster in the transposed
forms

    u^T = W^T @ g^T        (forward)
    dg^T = W @ du^T        (backward)

(on the 2-core CI machine, fp32, B=32, M=N=2048, cold caches: forward 5.6 -> 4.4 ms, dg
6.1 -> 3.5 ms; `python bench/mixer.py --gemm-forms` shows the gain inside the mixing network's
forward+backward). The results are the same sums over the
same products; only the blocking of the BLAS call changes, so values agree with `addmm` to
float rounding. cuBLAS gains nothing from this, so CUDA tensors, autocast regions and dtypes
that MKL does not serve (fp16, bf16) take the plain `addmm`.
"""
from __future__ import annotations

import torch


def mask_linear_ref(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """u = g @ weight + bias (the plain form; autograd of addmm)."""
    return g @ weight if bias is None else torch.addmm(bias, g, weight)


class _MaskLinearCPU(torch.autograd.Function):
    """u = g @ W + b through the transposed GEMM forms (see the module docstring)."""

    @staticmethod
    def forward(g, weight, bias):
        if bias is None:
            u_t = torch.mm(weight.t(), g.t())
        else:
            u_t = torch.addmm(bias.unsqueeze(1), weight.t(), g.t())
        return u_t.t().contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, weight, bias = inputs
        ctx.save_for_backward(g, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, du):
        g, weight = ctx.saved_tensors
        need_g, need_w, need_b = ctx.needs_input_grad
        dg = torch.mm(weight, du.t()).t().contiguous() if need_g else None
        dw = torch.mm(g.t(), du) if need_w else None
        db = du.sum(0) if (need_b and ctx.has_bias) else None
        return dg, dw, db


def _use_cpu_forms(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (g.device.type == "cpu" and g.dtype in (torch.float32, torch.float64)
            and weight.dtype == g.dtype and (bias is None or bias.dtype == g.dtype)
            and not torch.is_autocast_enabled("cpu"))


def mask_linear(g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """u = g @ weight + bias, (B, N), differentiable in all three; the fastest GEMM forms here."""
    if _use_cpu_forms(g, weight, bias):
        return _MaskLinearCPU.apply(g, weight, bias)
    return mask_linear_ref(g, weight, bias)
