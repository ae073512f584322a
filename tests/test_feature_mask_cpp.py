"""The compiled CPU kernels of fmn::spatial_mask_mul(_backward), called directly as torch ops.

Compared with a plain-PyTorch formula (forward) and with autograd through it (backward), on fresh
random inputs of several odd shapes, in float32 and float64, for contiguous, channels_last and
sliced (non-contiguous) features, with grad_out in another layout than f.
"""
import itertools

import pytest
import torch

from fmn_kernels import backend

pytestmark = pytest.mark.skipif(
    not backend.has_compiled_kernel("spatial_mask_mul", "cpu"),
    reason="the compiled CPU kernel of fmn::spatial_mask_mul is not built",
)

ACTIVATIONS = ("exp_relu", "sigmoid", "identity")
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 5), (1, 16, 16, 8), (3, 1, 16, 8), (3, 16, 1, 1), (2, 5, 1, 9)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def forward_op(*args):
    return torch.ops.fmn.spatial_mask_mul(*args)


def backward_op(*args):
    return torch.ops.fmn.spatial_mask_mul_backward(*args)


def reference(f, logits, f_other, activation, max_logit):
    """o = f * m or f * (1 - m) + f_other * m, m = act(min(logits, max_logit)) broadcast over C."""
    B, C, H, W = f.shape
    u = logits if max_logit is None else logits.clamp(max=max_logit)
    if activation == "exp_relu":
        m = torch.exp(torch.relu(u))
    elif activation == "sigmoid":
        m = torch.sigmoid(u)
    else:
        m = u
    m = m.reshape(B, 1, H, W)
    return f * m if f_other is None else f * (1 - m) + f_other * m


def make_features(shape, dtype, layout, gen):
    """A (B, C, H, W) tensor in the given layout; 'sliced' views are non-contiguous."""
    B, C, H, W = shape
    if layout == "contiguous":
        return torch.randn(shape, dtype=dtype, generator=gen)
    if layout == "channels_last":
        return torch.randn(shape, dtype=dtype, generator=gen).contiguous(memory_format=torch.channels_last)
    if layout == "batch_slice":
        return torch.randn(2 * B, C, H, W, dtype=dtype, generator=gen)[::2]
    if layout == "channel_slice":
        return torch.randn(B, C + 3, H, W, dtype=dtype, generator=gen)[:, 2 : 2 + C]
    if layout == "channels_last_channel_slice":
        x = torch.randn(B, C + 3, H, W, dtype=dtype, generator=gen).contiguous(memory_format=torch.channels_last)
        return x[:, 1 : 1 + C]
    if layout == "width_slice":
        return torch.randn(B, C, H, 2 * W, dtype=dtype, generator=gen)[..., ::2]
    if layout == "permuted":
        return torch.randn(B, H, C, W, dtype=dtype, generator=gen).permute(0, 2, 1, 3)
    raise ValueError(layout)


def make_logits(B, HW, dtype, gen, activation):
    # exp_relu keeps logits small so exp stays well-conditioned; values cross 0 either way.
    scale = 1.0 if activation == "exp_relu" else 2.0
    return scale * torch.randn(B, HW, dtype=dtype, generator=gen)


def check_case(shape, dtype, activation, max_logit, mix, f_layout, grad_layout, seed):
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    f = make_features(shape, dtype, f_layout, gen)
    f_other = make_features(shape, dtype, f_layout, gen) if mix else None
    logits = make_logits(B, H * W, dtype, gen, activation)
    grad_out = make_features(shape, dtype, grad_layout, gen)

    out = forward_op(f, logits, f_other, activation, max_logit)
    fr = f.detach().clone().requires_grad_(True)
    lr = logits.detach().clone().requires_grad_(True)
    gr = f_other.detach().clone().requires_grad_(True) if mix else None
    expected = reference(fr, lr, gr, activation, max_logit)
    assert out.dtype == f.dtype and out.shape == f.shape
    torch.testing.assert_close(out, expected.detach(), **TOL[dtype])
    if f_layout in ("contiguous", "channels_last"):
        assert out.stride() == f.stride()

    inputs = [fr, lr] + ([gr] if mix else [])
    grads = torch.autograd.grad(expected, inputs, grad_out)
    df, dlogits, dother = backward_op(grad_out, f, logits, f_other, activation, max_logit, True, True)
    torch.testing.assert_close(df, grads[0], **TOL[dtype])
    torch.testing.assert_close(dlogits, grads[1], **TOL[dtype])
    assert dlogits.shape == logits.shape and dlogits.dtype == logits.dtype
    if mix:
        torch.testing.assert_close(dother, grads[2], **TOL[dtype])
    else:
        assert dother.numel() == 0
    if f_layout in ("contiguous", "channels_last"):
        assert df.stride() == f.stride()
    # Without df (and df_other) the kernels take their reduction-only path.
    no_df, dlogits_only, no_dother = backward_op(grad_out, f, logits, f_other, activation, max_logit, False, False)
    assert no_df.numel() == 0 and no_dother.numel() == 0
    torch.testing.assert_close(dlogits_only, grads[1], **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference_all_activations(shape, activation, dtype):
    for i, (max_logit, mix) in enumerate(itertools.product([None, 0.5], [False, True])):
        check_case(shape, dtype, activation, max_logit, mix, "contiguous", "contiguous", seed=100 + i)


LAYOUT_PAIRS = [
    ("channels_last", "channels_last"),
    ("channels_last", "contiguous"),
    ("contiguous", "channels_last"),
    ("batch_slice", "contiguous"),
    ("channel_slice", "channels_last"),
    ("channels_last_channel_slice", "contiguous"),
    ("width_slice", "channel_slice"),
    ("permuted", "batch_slice"),
]


@pytest.mark.parametrize("f_layout,grad_layout", LAYOUT_PAIRS)
@pytest.mark.parametrize("shape", [(3, 5, 7, 5), (2, 16, 16, 8), (3, 16, 1, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_layouts(f_layout, grad_layout, shape, dtype):
    for i, (activation, mix) in enumerate([("exp_relu", False), ("sigmoid", True), ("identity", False)]):
        check_case(shape, dtype, activation, 0.75 if i == 0 else None, mix, f_layout, grad_layout, seed=7 + i)


def test_clamp_gate_at_max_logit_and_relu_at_zero():
    # exp_relu: no gradient at u == 0 exactly (relu's convention); clamp passes the gradient at
    # logits == max_logit and stops it above.
    f = torch.randn(1, 3, 1, 4, dtype=torch.float64)
    logits = torch.tensor([[0.0, 0.5, 0.75, 2.0]], dtype=torch.float64)
    grad_out = torch.randn(1, 3, 1, 4, dtype=torch.float64)
    _, dlogits, _ = backward_op(grad_out, f, logits, None, "exp_relu", 0.5, False, False)
    dm = (grad_out * f).sum(1).reshape(1, 4)
    expected = torch.stack([torch.zeros(()), dm[0, 1] * torch.exp(torch.tensor(0.5, dtype=torch.float64)),
                            torch.zeros(()), torch.zeros(())]).reshape(1, 4).to(torch.float64)
    torch.testing.assert_close(dlogits, expected)


def test_need_flags_give_empty_tensors():
    gen = torch.Generator().manual_seed(3)
    f, g, do = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    logits = torch.randn(2, 9, generator=gen)
    df, dlogits, dother = backward_op(do, f, logits, g, "sigmoid", None, False, False)
    assert df.numel() == 0 and dother.numel() == 0 and dlogits.shape == (2, 9)
    df, _, dother = backward_op(do, f, logits, g, "sigmoid", None, False, True)
    assert df.numel() == 0 and dother.shape == f.shape
    df, _, dother = backward_op(do, f, logits, None, "sigmoid", None, True, True)
    assert df.shape == f.shape and dother.numel() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_accumulates_in_float32(dtype):
    gen = torch.Generator().manual_seed(11)
    f32 = torch.randn(2, 64, 8, 4, generator=gen)
    g32 = torch.randn(2, 64, 8, 4, generator=gen)
    do32 = torch.randn(2, 64, 8, 4, generator=gen)
    logits = torch.randn(2, 32, generator=gen)
    f, g, do = f32.to(dtype), g32.to(dtype), do32.to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        fl, gl, dol = (t.contiguous(memory_format=layout) for t in (f, g, do))
        out = forward_op(fl, logits, gl, "exp_relu", None)
        assert out.dtype == dtype
        expected = reference(f.float(), logits, g.float(), "exp_relu", None)
        torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
        df, dlogits, dother = backward_op(dol, fl, logits, gl, "exp_relu", None, True, True)
        m = torch.exp(torch.relu(logits)).reshape(2, 1, 8, 4)
        dm = (do.float() * (g.float() - f.float())).sum(1).reshape(2, 32)
        torch.testing.assert_close(dlogits, dm * m.reshape(2, 32) * (logits > 0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(df.float(), do.float() * (1 - m), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(dother.float(), do.float() * m, rtol=1e-2, atol=1e-2)


def test_logits_in_another_dtype_than_f():
    gen = torch.Generator().manual_seed(5)
    f = torch.randn(2, 3, 4, 4, generator=gen)
    logits = torch.randn(2, 16, dtype=torch.float64, generator=gen)
    do = torch.randn(2, 3, 4, 4, generator=gen)
    out = forward_op(f, logits, None, "sigmoid", None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference(f, logits.float(), None, "sigmoid", None))
    _, dlogits, _ = backward_op(do, f, logits, None, "sigmoid", None, False, False)
    assert dlogits.dtype == torch.float64
    m = torch.sigmoid(logits.float())
    expected = (do * f).sum(1).reshape(2, 16) * m * (1 - m)
    torch.testing.assert_close(dlogits.float(), expected, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    f = torch.randn(2, 3, 4, 4)
    logits = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="unknown activation 'relu'"):
        forward_op(f, logits, None, "relu", None)
    with pytest.raises(RuntimeError, match=r"logits must have shape \(B, H\*W\)"):
        forward_op(f, torch.randn(2, 15), None, "exp_relu", None)
    with pytest.raises(RuntimeError, match="f must be 4-D"):
        forward_op(f[0], logits, None, "exp_relu", None)
    with pytest.raises(RuntimeError, match="f_other must have the shape of f"):
        forward_op(f, logits, torch.randn(2, 3, 4, 5), "exp_relu", None)
    with pytest.raises(RuntimeError, match="f_other must have f's dtype"):
        forward_op(f, logits, torch.randn(2, 3, 4, 4, dtype=torch.float64), "exp_relu", None)
    with pytest.raises(RuntimeError, match="f must be float32, float64, float16 or bfloat16"):
        forward_op(torch.ones(2, 3, 4, 4, dtype=torch.int32), logits, None, "exp_relu", None)
    with pytest.raises(RuntimeError, match="logits must be a floating-point tensor"):
        forward_op(f, torch.ones(2, 16, dtype=torch.int64), None, "exp_relu", None)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of f"):
        backward_op(torch.randn(2, 3, 4, 3), f, logits, None, "exp_relu", None, True, False)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_larger_tensors(layout):
    # 2 x 80 x 120 x 119 float32 (9 MB per tensor): several parallel chunks, and rows whose length
    # is not a multiple of any vector width.
    gen = torch.Generator().manual_seed(21)
    shape = (2, 80, 120, 119)
    f, g, do = (torch.randn(shape, generator=gen).contiguous(memory_format=layout) for _ in range(3))
    logits = torch.randn(2, 120 * 119, generator=gen)
    for f_other in (None, g):
        out = forward_op(f, logits, f_other, "exp_relu", None)
        torch.testing.assert_close(out, reference(f, logits, f_other, "exp_relu", None))
        df, dlogits, dother = backward_op(do, f, logits, f_other, "exp_relu", None, True, True)
        m = torch.exp(torch.relu(logits)).reshape(2, 1, 120, 119)
        if f_other is None:
            torch.testing.assert_close(df, do * m)
            dm = (do * f).sum(1).reshape(2, -1)
        else:
            torch.testing.assert_close(df, do * (1 - m))
            torch.testing.assert_close(dother, do * m)
            dm = (do * (g - f)).sum(1).reshape(2, -1)
        torch.testing.assert_close(dlogits, dm * m.reshape(2, -1) * (logits > 0), rtol=1e-4, atol=1e-3)
