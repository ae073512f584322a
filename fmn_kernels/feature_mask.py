"""The feature-mask op: FMN's mixing network, fused.

    u = g @ W + b                  (B, H*W)      mask logits
    m = exp(relu(u))               (B, H, W)     the mask; m >= 1, m == 1 exactly where u <= 0
    o[b, c] = f[b, c] * m[b]       broadcast over channels

The GEMM stays a BLAS/cuBLAS call; everything after it (activation, broadcast product, and in the
backward the reduction over channels and the activation's derivative) is one fused kernel:

    df = do * m                    only when f requires grad (skipped in FMN stage 2)
    dm = sum_c do[b, c] * f[b, c]  (B, H, W)
    du = dm * m * [u > 0]          the ReLU gate: the gradient is 0 at u == 0 exactly, as torch.relu
    dW = g^T du,  dg = du W^T,  db = sum_b du   (autograd through the GEMM)

The gates (ReLU, and the clamp of ``max_logit``, which passes the gradient at u == max_logit)
select as torch's backward does: 0 where closed even if dm is inf or NaN; a NaN u gives a NaN
mask and a NaN du (unless clamped away). With create_graph=True the backward is built from the
reference's autograd graph, so gradients of gradients are exact on every backend.

Only ``f`` and the logits ``u`` are saved for backward (never ``o`` or a full-size intermediate).
Half and bfloat16 inputs are computed in float32 and returned in the input's dtype.

The general primitive ``spatial_mask_mul(f, logits, activation)`` (exp_relu | sigmoid | identity)
and the mixing form ``spatial_mix(f, f_other, mask)`` (o = f*(1-mask) + f_other*mask, PMM's
hard-mix) run on the same kernels. ``max_logit`` clamps u from above before the activation.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from fmn_kernels import backend as _backend
from fmn_kernels.mask_linear import mask_linear

ACTIVATIONS = ("exp_relu", "sigmoid", "identity")
FEATURE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OP = "spatial_mask_mul"


# ----------------------------------------------------------------------------------------------
# Reference (the oracle of the tests, and the "torch" backend)
# ----------------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def activation_ref(logits: torch.Tensor, activation: str = "exp_relu", max_logit: float | None = None) -> torch.Tensor:
    """m = act(min(u, max_logit)) in plain PyTorch."""
    u = logits if max_logit is None else logits.clamp(max=max_logit)
    if activation == "exp_relu":
        return torch.exp(torch.relu(u))
    if activation == "sigmoid":
        return torch.sigmoid(u)
    if activation == "identity":
        return u
    raise ValueError(f"fmn: unknown activation '{activation}'; expected one of {', '.join(ACTIVATIONS)}")


def spatial_mask_mul_ref(
    f: torch.Tensor,
    logits: torch.Tensor,
    activation: str = "exp_relu",
    max_logit: float | None = None,
    f_other: torch.Tensor | None = None,
) -> torch.Tensor:
    """o = f * act(u) (or f*(1-m) + f_other*m), computed in fp32 for half inputs."""
    B, C, H, W = f.shape
    acc = _acc_dtype(f.dtype)
    m = activation_ref(logits.to(acc), activation, max_logit).reshape(B, 1, H, W)
    if f_other is None:
        out = f.to(acc) * m
    else:
        out = f.to(acc) * (1 - m) + f_other.to(acc) * m
    return out.to(f.dtype)


def spatial_mix_ref(f: torch.Tensor, f_other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """o = f * (1 - mask) + f_other * mask, mask (B, H, W) broadcast over channels."""
    return spatial_mask_mul_ref(f, mask.reshape(mask.shape[0], -1), "identity", None, f_other)


def feature_mask_ref(
    f: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    max_logit: float | None = None,
) -> torch.Tensor:
    """FMN's mixing network in plain PyTorch: f * exp(relu(g @ W + b)).view(B, 1, H, W)."""
    u = g @ weight if bias is None else torch.addmm(bias, g, weight)
    return spatial_mask_mul_ref(f, u, "exp_relu", max_logit)


# ----------------------------------------------------------------------------------------------
# Input checks: one clear error per bad input
# ----------------------------------------------------------------------------------------------
def _check_f(f):
    """f (the local features): a dense 4-D tensor of a floating dtype the kernels take."""
    if not isinstance(f, torch.Tensor) or f.dim() != 4:
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"fmn.spatial_mask_mul: f must be a 4-D tensor (B, C, H, W); got {got}")
    _check_f_dtype(f)


def _check_f_dtype(f):
    """The dtype and layout of a 4-D tensor f."""
    if f.dtype not in FEATURE_DTYPES:
        if not f.is_floating_point():
            raise TypeError(f"fmn.spatial_mask_mul: f must be a floating-point tensor; got {f.dtype}")
        raise TypeError(
            f"fmn.spatial_mask_mul: f must be float32, float64, float16 or bfloat16; got {f.dtype}")
    if f.layout != torch.strided:
        raise TypeError(f"fmn.spatial_mask_mul: f must be a dense (strided) tensor; got {f.layout}")


def _check_inputs(f, logits, f_other, activation, max_logit):
    _check_f(f)
    B, C, H, W = f.shape
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"fmn.spatial_mask_mul: the mask logits must be a tensor; got {type(logits).__name__}")
    if logits.dim() == 3:
        if tuple(logits.shape) != (B, H, W):
            raise ValueError(
                f"fmn.spatial_mask_mul: mask of shape (B, H, W) = {(B, H, W)} expected for f of shape "
                f"{tuple(f.shape)}; got {tuple(logits.shape)}")
        logits = logits.reshape(B, H * W)
    elif logits.dim() != 2 or tuple(logits.shape) != (B, H * W):
        raise ValueError(
            f"fmn.spatial_mask_mul: mask logits of shape (B, H*W) = {(B, H * W)} expected for f of shape "
            f"{tuple(f.shape)}; got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"fmn.spatial_mask_mul: mask logits must be floating point; got {logits.dtype}")
    if logits.layout != torch.strided:
        raise TypeError(f"fmn.spatial_mask_mul: the mask logits must be a dense (strided) tensor; got {logits.layout}")
    if logits.device != f.device:
        raise ValueError(
            f"fmn.spatial_mask_mul: f is on {f.device} but the mask logits are on {logits.device}; "
            "both must be on the same device")
    if f_other is not None:
        if not isinstance(f_other, torch.Tensor) or f_other.shape != f.shape:
            got = tuple(f_other.shape) if isinstance(f_other, torch.Tensor) else type(f_other).__name__
            raise ValueError(f"fmn.spatial_mix: f_other must have f's shape {tuple(f.shape)}; got {got}")
        if f_other.dtype != f.dtype:
            raise TypeError(f"fmn.spatial_mix: f_other must have f's dtype {f.dtype}; got {f_other.dtype}")
        if f_other.device != f.device:
            raise ValueError(f"fmn.spatial_mix: f is on {f.device} but f_other is on {f_other.device}")
        if f_other.layout != torch.strided:
            raise TypeError(f"fmn.spatial_mix: f_other must be a dense (strided) tensor; got {f_other.layout}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"fmn: unknown activation '{activation}'; expected one of {', '.join(ACTIVATIONS)}")
    return logits, _check_max_logit(max_logit)


def _check_max_logit(max_logit):
    if max_logit is None:
        return None
    try:
        value = float(max_logit)
    except (TypeError, ValueError, RuntimeError):
        value = math.nan
    if math.isnan(value):
        raise ValueError(f"fmn.spatial_mask_mul: max_logit must be a number or None; got {max_logit!r}")
    return value


# ----------------------------------------------------------------------------------------------
# Fake kernels of both ops; the Triton op's autograd (the compiled op's is in C++)
# ----------------------------------------------------------------------------------------------
def _empty_grad(f: torch.Tensor) -> torch.Tensor:
    return f.new_empty((0,))


def _fake_forward(f, logits, f_other, activation, max_logit):
    return torch.empty_like(f)


def _fake_backward(grad_out, f, logits, f_other, activation, max_logit, need_df, need_dother):
    df = torch.empty_like(f) if need_df else _empty_grad(f)
    dother = torch.empty_like(f) if (f_other is not None and need_dother) else _empty_grad(f)
    return df, torch.empty_like(logits), dother


_BACKWARD_OPS: dict[str, object] = {}  # forward op name -> its backward op


def _make_autograd(opname: str):
    def setup_context(ctx, inputs, output):
        f, logits, f_other, activation, max_logit = inputs
        ctx.save_for_backward(f, logits, f_other)
        ctx.activation = activation
        ctx.max_logit = max_logit

    def backward(ctx, grad_out):
        f, logits, f_other = ctx.saved_tensors
        need_df, need_logits, need_other = ctx.needs_input_grad[:3]
        need_other = need_other and f_other is not None
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (grad_out, f, logits, f_other)):
            # create_graph=True (double backward): the fused backward is not differentiable, so
            # the gradients are built from the reference's autograd graph instead.
            return _backward_through_reference(
                grad_out, f, logits, f_other, ctx.activation, ctx.max_logit, (need_df, need_logits, need_other))
        df, dlogits, dother = _BACKWARD_OPS[opname](
            grad_out, f, logits, f_other, ctx.activation, ctx.max_logit, need_df, need_other)
        return (df if need_df else None, dlogits if need_logits else None,
                dother if need_other else None, None, None)

    return setup_context, backward


def _backward_through_reference(grad_out, f, logits, f_other, activation, max_logit, needs):
    """The backward as a differentiable graph (for gradients of gradients)."""
    inputs = [t for t, need in zip((f, logits, f_other), needs) if need]
    with torch.enable_grad():
        out = spatial_mask_mul_ref(f, logits, activation, max_logit, f_other)
    grads = iter(torch.autograd.grad(out, inputs, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs) + (None, None)


def _register(opname: str, backward_opname: str, compiled: bool = False) -> None:
    torch.library.register_fake(opname)(_fake_forward)
    torch.library.register_fake(backward_opname)(_fake_backward)
    _BACKWARD_OPS[opname] = getattr(torch.ops.fmn, backward_opname.split("::")[1]).default
    if compiled and torch._C._dispatch_has_kernel_for_dispatch_key(opname, "Autograd"):
        # The extension registers its autograd in C++ (csrc/feature_mask_autograd.h, the same
        # math at a fraction of the host time); an op defined by torch.library.custom_op (Triton)
        # always has an Autograd kernel, the one that asks for register_autograd. A compiled op
        # without one comes from an extension built before the C++ autograd (an in-place build of
        # `pip install -e .` not rebuilt since): the Python autograd below keeps it differentiable.
        return
    setup_context, backward = _make_autograd(opname)
    torch.library.register_autograd(opname, backward, setup_context=setup_context)


_registered = {"compiled": False}


def _compiled_op():
    """torch.ops.fmn.spatial_mask_mul (C++/CUDA), with fake and autograd registered once."""
    if not _registered["compiled"]:
        _register("fmn::spatial_mask_mul", "fmn::spatial_mask_mul_backward", compiled=True)
        _registered["compiled"] = True
    return torch.ops.fmn.spatial_mask_mul.default


# Fake kernels and autograd are registered as soon as the extension is there, so that the op is
# differentiable and traceable by torch.compile from its first call (registering inside a
# torch.compile trace is not possible) and when torch.ops.fmn.spatial_mask_mul is called directly.
if _backend.extension_loaded() and hasattr(torch.ops.fmn, "spatial_mask_mul"):
    _compiled_op()


def _triton_op():
    from fmn_kernels.triton import feature_mask as tfm  # imports triton; only on this path

    return tfm.triton_spatial_mask_mul


# ----------------------------------------------------------------------------------------------
# Public functional API
# ----------------------------------------------------------------------------------------------
def spatial_mask_mul(
    f: torch.Tensor,
    logits: torch.Tensor,
    activation: str = "exp_relu",
    max_logit: float | None = None,
    *,
    f_other: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Multiply ``f`` (B, C, H, W) by the spatial mask ``act(logits)`` broadcast over channels.

    ``logits`` is (B, H*W) or (B, H, W). ``activation`` is ``exp_relu`` (FMN), ``sigmoid`` or
    ``identity``. With ``f_other`` the result is the mix ``f*(1-m) + f_other*m``. The output has
    f's dtype and memory format (contiguous or channels_last). Inside torch.func transforms
    (vmap, grad, jacrev, ...) the pure-PyTorch reference runs, whatever the backend.
    """
    logits, max_logit = _check_inputs(f, logits, f_other, activation, max_logit)
    return _run(f, logits, activation, max_logit, f_other, backend)


def _run(f, logits, activation, max_logit, f_other, backend):
    """The op on checked inputs (logits (B, H*W)): the backend's kernel, or the reference."""
    name = _backend.resolve(_OP, backend, f.device)
    if name == "torch" or _backend.functorch_active():
        return spatial_mask_mul_ref(f, logits, activation, max_logit, f_other)
    op = _compiled_op() if name in ("cpu", "cuda") else _triton_op()
    return op(f, logits, f_other, activation, max_logit)


def spatial_mix(
    f: torch.Tensor, f_other: torch.Tensor, mask: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """o = f * (1 - mask) + f_other * mask; ``mask`` (B, H, W) or (B, H*W), broadcast over channels.
    A bool mask selects: True takes f_other, False keeps f."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and isinstance(f, torch.Tensor):
        mask = mask.to(f.dtype)   # a non-float f is refused by the checks
    return spatial_mask_mul(f, mask, "identity", None, f_other=f_other, backend=backend)


def feature_mask(
    f: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    max_logit: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """FMN's mixing network: ``f * exp(relu(g @ weight + bias)).view(B, 1, H, W)``."""
    _check_f(f)
    logits = _mask_logits(f, g, weight, bias)
    return _run(f, logits, "exp_relu", _check_max_logit(max_logit), None, backend)


def _mask_logits(f, g, weight, bias):
    """u = g @ weight + bias, (B, H*W), after checking g, weight and bias, and their fit to ``f``
    (a checked 4-D tensor, or None). The logits this returns need no further check."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"fmn.FusedFeatureMask: the weight must be 2-D (M, H*W); got {got}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[1],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"fmn.FusedFeatureMask: the bias must have shape (H*W,) = ({weight.shape[1]},); got {got}")
    if not isinstance(g, torch.Tensor) or g.dim() != 2:
        got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"fmn.FusedFeatureMask: global features must be 2-D (B, M); got {got}")
    if f is not None:
        if g.shape[0] != f.shape[0]:
            raise ValueError(
                f"fmn.FusedFeatureMask: batch sizes differ: local features {tuple(f.shape)}, "
                f"global features {tuple(g.shape)}")
        if weight.shape[1] != f.shape[2] * f.shape[3]:
            raise ValueError(
                f"fmn.FusedFeatureMask: the mask has {weight.shape[1]} positions but the local features "
                f"{tuple(f.shape)} have H*W = {f.shape[2] * f.shape[3]}")
        if g.device != f.device:
            raise ValueError(
                f"fmn.FusedFeatureMask: local features are on {f.device} but global features are on {g.device}")
    if g.shape[1] != weight.shape[0]:
        raise ValueError(
            f"fmn.FusedFeatureMask: global features have {g.shape[1]} dims, the weight expects {weight.shape[0]}")
    if not g.is_floating_point():
        raise TypeError(f"fmn.FusedFeatureMask: global features must be floating point; got {g.dtype}")
    if g.dtype != weight.dtype and not (torch.is_autocast_enabled(g.device.type)
                                        and torch.float64 not in (g.dtype, weight.dtype)):
        raise TypeError(
            f"fmn.FusedFeatureMask: global features are {g.dtype} but the weight is {weight.dtype}; "
            "cast one to the other's dtype, or run under torch.autocast")
    return mask_linear(g, weight, bias)


class FusedFeatureMask(nn.Module):
    """FMN's mixing network as a drop-in module.

    ``out = local * exp(relu(global_feat @ weight + bias)).view(B, 1, H, W)``

    Args:
        global_dim: M, the size of the global feature (2048 for a ResNet-50's pooled output).
        mask_hw: (H, W) of the local feature map it masks (an int means square).
        bias: learn a bias of shape (H*W,).
        max_logit: clamp the logits from above before exp (None: no clamp, as in the paper).
        backend: "auto" (default), "torch", "cpu", "cuda" or "triton"; env FMN_BACKEND.

    Example: attend to early features of any CNN with its own pooled feature::

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
                self.body = nn.Sequential(nn.Conv2d(64, 512, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
                self.mixer = FusedFeatureMask(global_dim=512, mask_hw=(64, 32))
                self.local_body = nn.Sequential(nn.Conv2d(64, 256, 3, 2, 1), nn.AdaptiveAvgPool2d(1))

            def forward(self, x):                       # x: (B, 3, 256, 128)
                f = self.stem(x)                        # (B, 64, 64, 32)
                g = self.body(f).flatten(1)             # (B, 512)
                attended = self.mixer(f, g)             # (B, 64, 64, 32)
                return g, self.local_body(attended).flatten(1)
    """

    def __init__(self, global_dim: int, mask_hw, bias: bool = True, *, max_logit: float | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if isinstance(mask_hw, numbers.Integral):
            mask_hw = (mask_hw, mask_hw)
        sizes = (global_dim, *mask_hw) if isinstance(mask_hw, (tuple, list, torch.Size)) else ()
        integers = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in sizes)
        if len(sizes) != 3 or not integers or min(sizes) < 1:
            raise ValueError(
                f"fmn.FusedFeatureMask: an integer global_dim >= 1 and mask_hw = (H, W) of integers >= 1 "
                f"expected; got global_dim={global_dim!r}, mask_hw={mask_hw!r}")
        if backend is not None:
            _backend.requested(backend)
        self.global_dim = int(global_dim)
        self.mask_hw = (int(mask_hw[0]), int(mask_hw[1]))
        self.max_logit = _check_max_logit(max_logit)
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        n = mask_hw[0] * mask_hw[1]
        self.weight = nn.Parameter(torch.empty(self.global_dim, n, **factory))
        self.bias = nn.Parameter(torch.empty(n, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small logits at start: the mask begins near 1 (exp(relu(u)) with |u| << 1).
        bound = 1.0 / math.sqrt(self.global_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def mask_logits(self, global_feat: torch.Tensor, local: torch.Tensor | None = None) -> torch.Tensor:
        """u = global_feat @ weight + bias, (B, H*W); checked against ``local`` when it is given."""
        if local is not None:
            self._check_local(local)
        return _mask_logits(local, global_feat, self.weight, self.bias)

    def _check_local(self, local) -> None:
        if not isinstance(local, torch.Tensor) or local.dim() != 4:
            got = tuple(local.shape) if isinstance(local, torch.Tensor) else type(local).__name__
            raise ValueError(f"fmn.FusedFeatureMask: local features must be 4-D (B, C, H, W); got {got}")
        if local.shape[2:] != self.mask_hw:
            raise ValueError(
                f"fmn.FusedFeatureMask: built for local features of spatial size {self.mask_hw}; "
                f"got {tuple(local.shape)}")
        _check_f_dtype(local)

    def forward(self, local: torch.Tensor, global_feat: torch.Tensor, return_mask: bool = False):
        # Every input is checked once, here and in _mask_logits; _run takes checked inputs.
        self._check_local(local)
        logits = _mask_logits(local, global_feat, self.weight, self.bias)
        out = _run(local, logits, "exp_relu", self.max_logit, None, self.backend)
        if return_mask:
            mask = activation_ref(logits, "exp_relu", self.max_logit).view(-1, *self.mask_hw)
            return out, mask
        return out

    def extra_repr(self) -> str:
        s = f"global_dim={self.global_dim}, mask_hw={self.mask_hw}, bias={self.bias is not None}"
        if self.max_logit is not None:
            s += f", max_logit={self.max_logit}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s
