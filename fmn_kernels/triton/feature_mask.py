"""Triton kernels of the spatial mask op (fmn_kernels/feature_mask.py has the math and reference).

Both kernels view f as (B, C, P) with P = H*W and strides (sb, sc, sp): NCHW gives sp == 1,
channels_last gives sc == 1 and sp == C. Triton specialises stride arguments equal to 1, so one
kernel is coalesced along whichever axis is contiguous. A program owns one batch item and one
block of BLOCK_P positions, computes the mask for them once, and walks the channels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT_CODES = {"exp_relu": 0, "sigmoid": 1, "identity": 2}


@triton.jit
def _activation(u, ACT: tl.constexpr):
    # exp_relu: m = exp(max(u, 0)); sigmoid: m = 1 / (1 + exp(-u)); identity: m = u
    # (max by tl.where, so that a NaN u gives a NaN m as torch.relu does; tl.maximum may drop it)
    if ACT == 0:
        m = tl.exp(tl.where(u < 0.0, 0.0, u))
    elif ACT == 1:
        m = 1.0 / (1.0 + tl.exp(-u))
    else:
        m = u
    return m


# o[b, c, p] = f[b, c, p] * m[b, p]                          (MIX == False)
# o[b, c, p] = f[b, c, p] * (1 - m[b, p]) + g[b, c, p] * m[b, p]   (MIX == True, g = f_other)
# m[b, p] = act(min(u[b, p], max_logit))   (a NaN u stays NaN, as torch.clamp)
@triton.jit
def _spatial_mask_mul_fwd(
    f_ptr, g_ptr, u_ptr, o_ptr,
    C, P,
    f_sb, f_sc, f_sp,
    g_sb, g_sc, g_sp,
    o_sb, o_sc, o_sp,
    max_logit,
    ACT: tl.constexpr, HAS_MAX: tl.constexpr, MIX: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < P
    u = tl.load(u_ptr + b * P + p, mask=p_ok, other=0.0).to(ACC)
    if HAS_MAX:
        u = tl.where(u > max_logit, max_logit, u)
    m = _activation(u, ACT)[None, :]
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        ok = (c < C)[:, None] & p_ok[None, :]
        x = tl.load(f_ptr + b * f_sb + c[:, None] * f_sc + p[None, :] * f_sp, mask=ok, other=0.0).to(ACC)
        if MIX:
            y = tl.load(g_ptr + b * g_sb + c[:, None] * g_sc + p[None, :] * g_sp, mask=ok, other=0.0).to(ACC)
            out = x * (1.0 - m) + y * m
        else:
            out = x * m
        tl.store(o_ptr + b * o_sb + c[:, None] * o_sc + p[None, :] * o_sp,
                 out.to(o_ptr.dtype.element_ty), mask=ok)


# no mix: df = do * m;            dm = sum_c do * f
# mix:    df = do * (1 - m);  dg = do * m;  dm = sum_c do * (g - f)
# du = dm * act'(u):  exp_relu m, and 0 where u <= 0;  sigmoid m * (1 - m);  identity 1;
#      and 0 unless u <= max_logit (the clamp passes the gradient at equality). The gates select
#      (as torch's relu and clamp backward): 0 even where dm is inf or NaN.
@triton.jit
def _spatial_mask_mul_bwd(
    do_ptr, f_ptr, g_ptr, u_ptr, df_ptr, dg_ptr, du_ptr,
    C, P,
    do_sb, do_sc, do_sp,
    f_sb, f_sc, f_sp,
    g_sb, g_sc, g_sp,
    df_sb, df_sc, df_sp,
    dg_sb, dg_sc, dg_sp,
    max_logit,
    ACT: tl.constexpr, HAS_MAX: tl.constexpr, MIX: tl.constexpr, ACC: tl.constexpr,
    NEED_DF: tl.constexpr, NEED_DG: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < P
    u_raw = tl.load(u_ptr + b * P + p, mask=p_ok, other=0.0).to(ACC)
    u = u_raw
    if HAS_MAX:
        u = tl.where(u > max_logit, max_logit, u)
    m1 = _activation(u, ACT)
    m = m1[None, :]
    dm = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        ok = (c < C)[:, None] & p_ok[None, :]
        d = tl.load(do_ptr + b * do_sb + c[:, None] * do_sc + p[None, :] * do_sp, mask=ok, other=0.0).to(ACC)
        x = tl.load(f_ptr + b * f_sb + c[:, None] * f_sc + p[None, :] * f_sp, mask=ok, other=0.0).to(ACC)
        if MIX:
            y = tl.load(g_ptr + b * g_sb + c[:, None] * g_sc + p[None, :] * g_sp, mask=ok, other=0.0).to(ACC)
            dm += tl.sum(d * (y - x), axis=0)
            if NEED_DF:
                tl.store(df_ptr + b * df_sb + c[:, None] * df_sc + p[None, :] * df_sp,
                         (d * (1.0 - m)).to(df_ptr.dtype.element_ty), mask=ok)
            if NEED_DG:
                tl.store(dg_ptr + b * dg_sb + c[:, None] * dg_sc + p[None, :] * dg_sp,
                         (d * m).to(dg_ptr.dtype.element_ty), mask=ok)
        else:
            dm += tl.sum(d * x, axis=0)
            if NEED_DF:
                tl.store(df_ptr + b * df_sb + c[:, None] * df_sc + p[None, :] * df_sp,
                         (d * m).to(df_ptr.dtype.element_ty), mask=ok)
    if ACT == 0:
        du = tl.where(u <= 0.0, 0.0, dm * m1)
    elif ACT == 1:
        du = dm * m1 * (1.0 - m1)
    else:
        du = dm
    if HAS_MAX:
        du = tl.where(u_raw <= max_logit, du, 0.0)
    tl.store(du_ptr + b * P + p, du.to(du_ptr.dtype.element_ty), mask=p_ok)


def _flat_strides(t: torch.Tensor):
    """(t, (sb, sc, sp)) with t viewed as (B, C, H*W); a copy only if H and W do not collapse."""
    B, C, H, W = t.shape
    sb, sc, sh, sw = t.stride()
    if H == 1:
        return t, (sb, sc, sw)
    if W == 1 or sh == W * sw:
        return t, (sb, sc, sh if W == 1 else sw)
    t = t.contiguous()
    return _flat_strides(t)


def _finish(t: torch.Tensor, buf: torch.Tensor) -> None:
    """Copy into an output ``t`` the buffer the kernel wrote, when _flat_strides(t) had to
    make ``buf`` a contiguous stand-in (H and W of ``t`` do not collapse)."""
    if buf is not t and buf.numel():
        t.copy_(buf)


def _blocks(C: int, P: int, channel_contiguous: bool):
    block_p = min(128 if not channel_contiguous else 32, triton.next_power_of_2(P))
    block_c = max(1, min(triton.next_power_of_2(C), 4096 // block_p))
    return block_c, block_p


_TILES: dict = {"tiles": None}   # an override of (BLOCK_C, BLOCK_P, num_warps), set by tiles()

# Candidate (BLOCK_C, BLOCK_P, num_warps) for tuning sweeps, by layout ("plane": NCHW, "channel":
# channels_last), the default first; tests/test_triton_codegen.py compiles each for sm_90.
SWEEP_TILES = {
    "plane": [(32, 128, 4), (16, 128, 4), (16, 256, 8), (32, 64, 4), (64, 64, 8), (8, 512, 8)],
    "channel": [(128, 32, 4), (64, 32, 4), (128, 32, 8), (64, 64, 8), (256, 16, 8), (32, 64, 4)],
}


class tiles:
    """Launch both mask kernels with tiles of ``block_c`` channels x ``block_p`` positions and
    ``num_warps`` warps while the block is active (for tuning sweeps: ``bench/mixer.py
    --triton-tiles``); outside it, the tiles of ``_blocks`` and 4 warps. Results do not depend on
    the tiles except through the order of dm's channel sum (float rounding)."""

    def __init__(self, block_c: int, block_p: int, num_warps: int = 4):
        for name, v in (("block_c", block_c), ("block_p", block_p), ("num_warps", num_warps)):
            if not isinstance(v, int) or v < 1 or v & (v - 1):
                raise ValueError(f"fmn triton tiles: {name} must be a power of two >= 1; got {v!r}")
        if block_c * block_p > 16384 or num_warps > 16:
            raise ValueError(f"fmn triton tiles: block_c * block_p <= 16384 and num_warps <= 16 expected; "
                             f"got {block_c} x {block_p}, {num_warps} warps")
        self.value = (block_c, block_p, num_warps)

    def __enter__(self):
        self._saved, _TILES["tiles"] = _TILES["tiles"], self.value
        return self

    def __exit__(self, *exc):
        _TILES["tiles"] = self._saved
        return False


def _launch_tiles(C: int, P: int, channel_contiguous: bool):
    """(BLOCK_C, BLOCK_P, num_warps) for this launch."""
    if _TILES["tiles"] is not None:
        return _TILES["tiles"]
    return (*_blocks(C, P, channel_contiguous), 4)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def spatial_mask_mul_forward(f, logits, f_other, activation, max_logit):
    B, C, H, W = f.shape
    P = H * W
    out = torch.empty_like(f)
    if out.numel() == 0:
        return out
    f, fs = _flat_strides(f)
    g, gs = _flat_strides(f_other) if f_other is not None else (f, fs)
    obuf, os_ = _flat_strides(out)
    u = logits.contiguous()
    block_c, block_p, num_warps = _launch_tiles(C, P, fs[1] == 1 and fs[2] != 1)
    grid = (B, triton.cdiv(P, block_p))
    _spatial_mask_mul_fwd[grid](
        f, g, u, obuf, C, P, *fs, *gs, *os_,
        float(max_logit) if max_logit is not None else 0.0,
        ACT=ACT_CODES[activation], HAS_MAX=max_logit is not None, MIX=f_other is not None,
        ACC=_acc(f.dtype), BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )
    _finish(out, obuf)
    return out


def spatial_mask_mul_backward(grad_out, f, logits, f_other, activation, max_logit, need_df, need_dother):
    B, C, H, W = f.shape
    P = H * W
    mix = f_other is not None
    need_dother = bool(need_dother and mix)
    df = torch.empty_like(f) if need_df else f.new_empty((0,))
    dother = torch.empty_like(f) if need_dother else f.new_empty((0,))
    dlogits = torch.empty_like(logits)
    if f.numel() == 0:
        return df, dlogits.zero_(), dother
    f, fs = _flat_strides(f)
    d, ds = _flat_strides(grad_out)
    g, gs = _flat_strides(f_other) if mix else (f, fs)
    dfbuf, dfs = _flat_strides(df) if need_df else (f, fs)
    dgbuf, dgs = _flat_strides(dother) if need_dother else (f, fs)
    u = logits.contiguous()
    du = dlogits if dlogits.is_contiguous() else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    block_c, block_p, num_warps = _launch_tiles(C, P, fs[1] == 1 and fs[2] != 1)
    grid = (B, triton.cdiv(P, block_p))
    _spatial_mask_mul_bwd[grid](
        d, f, g, u, dfbuf, dgbuf, du,
        C, P, *ds, *fs, *gs, *dfs, *dgs,
        float(max_logit) if max_logit is not None else 0.0,
        ACT=ACT_CODES[activation], HAS_MAX=max_logit is not None, MIX=mix, ACC=_acc(f.dtype),
        NEED_DF=bool(need_df), NEED_DG=need_dother,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )
    if need_df:
        _finish(df, dfbuf)
    if need_dother:
        _finish(dother, dgbuf)
    _finish(dlogits, du)
    return df, dlogits, dother


@torch.library.custom_op("fmn::triton_spatial_mask_mul", mutates_args=())
def triton_spatial_mask_mul(
    f: torch.Tensor, logits: torch.Tensor, f_other: torch.Tensor | None, activation: str, max_logit: float | None
) -> torch.Tensor:
    return spatial_mask_mul_forward(f, logits, f_other, activation, max_logit)


@torch.library.custom_op("fmn::triton_spatial_mask_mul_backward", mutates_args=())
def triton_spatial_mask_mul_backward(
    grad_out: torch.Tensor, f: torch.Tensor, logits: torch.Tensor, f_other: torch.Tensor | None,
    activation: str, max_logit: float | None, need_df: bool, need_dother: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return spatial_mask_mul_backward(grad_out, f, logits, f_other, activation, max_logit, need_df, need_dother)


def _register():
    from fmn_kernels.feature_mask import _register as register

    register("fmn::triton_spatial_mask_mul", "fmn::triton_spatial_mask_mul_backward")


_register()
