"""The CUDA feature-mask kernels (csrc/cuda/feature_mask.cu) in their delicate cases, against
spatial_mask_mul_ref.

- The ReLU gate: du = 0 at u == 0 exactly, du = dm * m for every u > 0, subnormal u included.
  The .cu is built with --use_fast_math (-ftz=true), under which a float compare sees a positive
  subnormal as 0; the gate is taken on the bits. The CPU kernel is the bit-for-bit oracle here.
- NaN logits, max_logit at equality, m == 1 exactly where u <= 0, exact copies of a 0/1 mix.
- The 16-byte packet paths and their element-wise fallbacks: H*W or C not a multiple of the
  packet (4 x float32, 8 x float16/bfloat16), channels_last with C = 3 or 12, misaligned bases
  (a view one element into its storage), sliced tensors.
- Grid limits: a batch over 65535 (grid.y / grid.z are clamped, the loops are grid-stride).
- Zero-size tensors, the skipped df / df_other, a non-default stream and a non-default GPU.

The CUDA cases need a GPU (marked `cuda`, skipped without one); the CPU cases run everywhere the
compiled CPU kernel is built.
"""
import pytest
import torch

from fmn_kernels import backend
from fmn_kernels.feature_mask import spatial_mask_mul_ref

CUDA = pytest.param("cuda", marks=pytest.mark.cuda)
DEVICES = ["cpu", CUDA]
ACTIVATIONS = ("exp_relu", "sigmoid", "identity")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _need(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not backend.has_compiled_kernel("spatial_mask_mul", device):
        pytest.skip(f"the compiled {device} kernel of fmn::spatial_mask_mul is not built")


def _fwd(f, u, fo=None, act="exp_relu", max_logit=None):
    return torch.ops.fmn.spatial_mask_mul(f, u, fo, act, max_logit)


def _bwd(g, f, u, fo=None, act="exp_relu", max_logit=None, need_df=True, need_dother=True):
    return torch.ops.fmn.spatial_mask_mul_backward(g, f, u, fo, act, max_logit, need_df, need_dother)


def _reference(g, f, u, fo, act, max_logit):
    """(o, df, dlogits, df_other) of spatial_mask_mul_ref in float64, by autograd."""
    f64 = f.detach().double().requires_grad_(True)
    u64 = u.detach().double().requires_grad_(True)
    fo64 = None if fo is None else fo.detach().double().requires_grad_(True)
    o = spatial_mask_mul_ref(f64, u64, act, max_logit, fo64)
    inputs = (f64, u64) if fo64 is None else (f64, u64, fo64)
    grads = torch.autograd.grad(o, inputs, g.double())
    return o.detach(), grads[0], grads[1], (None if fo is None else grads[2])


def _close(got, ref, dtype):
    torch.testing.assert_close(got.double(), ref, **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# The ReLU gate and other exact semantics (the CPU kernel is the oracle; CUDA must match it)
@pytest.mark.parametrize("device", DEVICES)
def test_relu_gate_at_zero_and_subnormal(device):
    _need(device)
    tiny = torch.finfo(torch.float32).smallest_normal / 4  # a positive subnormal float32
    u = torch.tensor([[0.0, -0.0, tiny, -tiny, 0.5, -0.5, 1e-30, float("inf")]], device=device)
    f = torch.rand(1, 3, 2, 4, device=device) + 0.5
    g = torch.rand(1, 3, 2, 4, device=device) + 0.5
    df, du, _ = _bwd(g, f, u)
    dm = (g * f).sum(1).reshape(1, 8)
    # gate closed at u == +-0 and u < 0, open for every u > 0 (subnormal and +inf included)
    assert du[0, 0].item() == 0.0 and du[0, 1].item() == 0.0 and du[0, 3].item() == 0.0
    assert du[0, 5].item() == 0.0
    torch.testing.assert_close(du[0, 2], dm[0, 2], rtol=1e-6, atol=0)  # m == 1 there
    torch.testing.assert_close(du[0, 6], dm[0, 6], rtol=1e-6, atol=0)
    assert du[0, 7].item() == float("inf")
    # m == 1 exactly where u <= 0 (and for the subnormal): o == f, df == g bit for bit
    o = _fwd(f, u)
    for k in (0, 1, 2, 3, 5):
        h, w = divmod(k, 4)
        assert torch.equal(o[0, :, h, w], f[0, :, h, w])
        assert torch.equal(df[0, :, h, w], g[0, :, h, w])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_nan_logits_and_max_logit_equality(device, act):
    _need(device)
    f = torch.randn(2, 5, 3, 4, device=device)
    g = torch.randn(2, 5, 3, 4, device=device)
    u = torch.randn(2, 12, device=device)
    u[0, 1] = float("nan")
    u[1, 2] = 0.25  # == max_logit: torch.clamp passes the gradient at equality
    u[1, 3] = 3.0   # above max_logit: no gradient
    o = _fwd(f, u, None, act, 0.25)
    assert torch.isnan(o[0, :, 0, 1]).all()
    _, du, _ = _bwd(g, f, u, None, act, 0.25)
    ref_o, _, ref_du, _ = _reference(g, f, u, None, act, 0.25)
    keep = ~torch.isnan(u)
    torch.testing.assert_close(o.double().reshape(2, 5, 12)[:, :, keep[0] & keep[1]],
                               ref_o.reshape(2, 5, 12)[:, :, keep[0] & keep[1]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(du.double()[keep], ref_du[keep], rtol=1e-5, atol=1e-5)
    assert du[0, 1].item() == 0.0  # NaN fails logit <= max_logit: no gradient, as the CPU kernel
    assert du[1, 3].item() == 0.0
    assert du[1, 2].item() != 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_hard_mix_copies_exactly(device):
    _need(device)
    for layout in (torch.contiguous_format, torch.channels_last):
        f = torch.randn(3, 24, 5, 8, device=device).contiguous(memory_format=layout)
        fo = torch.randn(3, 24, 5, 8, device=device).contiguous(memory_format=layout)
        mask = (torch.rand(3, 40, device=device) > 0.5).float()
        o = _fwd(f, mask, fo, "identity")
        m = mask.reshape(3, 1, 5, 8).bool()
        assert torch.equal(o, torch.where(m, fo, f))


# ---------------------------------------------------------------------------------------------
# Packet paths, tails, fallbacks (GPU: these are the kernel paths the CPU kernel does not have)
def _shaped(x, how):
    if how == "contiguous":
        return x.contiguous()
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "misaligned":  # same layout, base one element into its storage: no 16-byte packets
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        y = flat[1:].view(x.shape)
        y.copy_(x)
        return y
    if how == "misaligned_cl":
        flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
        B, C, H, W = x.shape
        y = flat[1:].view(B, H, W, C).permute(0, 3, 1, 2)
        y.copy_(x)
        return y
    if how == "channel_slice_cl":  # channels_last, channel stride 1, spatial stride C + 8
        B, C, H, W = x.shape
        big = torch.empty(B, C + 8, H, W, dtype=x.dtype, device=x.device).contiguous(memory_format=torch.channels_last)
        y = big[:, 8:]
        y.copy_(x)
        return y
    raise ValueError(how)


PACKET_SHAPES = [
    (2, 3, 5, 7),    # H*W = 35 and C = 3: no packet fits, both layouts
    (2, 12, 4, 6),   # C = 12: float32 packets in channels_last, not 16-bit ones
    (3, 16, 4, 2),   # H*W = 8, C = 16: every packet path
    (1, 40, 3, 12),  # H*W = 36: float32 plane packets only
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", PACKET_SHAPES)
@pytest.mark.parametrize("how", ["contiguous", "channels_last", "misaligned", "misaligned_cl", "channel_slice_cl"])
@pytest.mark.parametrize("mix", [False, True])
def test_cuda_packet_paths_against_reference(dtype, shape, how, mix):
    _need("cuda")
    B, C, H, W = shape
    f = _shaped(torch.randn(shape, device="cuda").to(dtype), how)
    fo = _shaped(torch.randn(shape, device="cuda").to(dtype), how) if mix else None
    g = _shaped(torch.randn(shape, device="cuda").to(dtype), how)
    act = "sigmoid" if mix else "exp_relu"
    u = torch.randn(B, H * W, device="cuda")
    ref_o, ref_df, ref_du, ref_dfo = _reference(g, f, u, fo, act, None)
    _close(_fwd(f, u, fo, act), ref_o, dtype)
    df, du, dfo = _bwd(g, f, u, fo, act)
    _close(df, ref_df, dtype)
    torch.testing.assert_close(du.double(), ref_du, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * C)
    if mix:
        _close(dfo, ref_dfo, dtype)
    # df / df_other skipped when not asked for; dlogits unchanged
    df0, du0, dfo0 = _bwd(g, f, u, fo, act, None, False, False)
    assert df0.numel() == 0 and dfo0.numel() == 0
    torch.testing.assert_close(du0, du, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cuda_batch_over_grid_limit(layout):
    """B > 65535: grid.y / grid.z are clamped and the batch loop strides over the rest."""
    _need("cuda")
    B, C, H, W = 65535 + 70, 4, 2, 4
    f = torch.randn(B, C, H, W, device="cuda").contiguous(memory_format=layout)
    u = torch.randn(B, H * W, device="cuda")
    g = torch.randn(B, C, H, W, device="cuda").contiguous(memory_format=layout)
    ref_o, ref_df, ref_du, _ = _reference(g, f, u, None, "exp_relu", None)
    _close(_fwd(f, u), ref_o, torch.float32)
    df, du, _ = _bwd(g, f, u)
    _close(df, ref_df, torch.float32)
    _close(du, ref_du, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(0, 3, 2, 2), (2, 0, 2, 2), (2, 3, 0, 2)])
def test_cuda_zero_size(shape):
    _need("cuda")
    B, C, H, W = shape
    f = torch.randn(shape, device="cuda")
    u = torch.randn(B, H * W, device="cuda")
    assert _fwd(f, u).shape == shape
    df, du, _ = _bwd(torch.randn(shape, device="cuda"), f, u)
    assert df.shape == shape and du.shape == (B, H * W)
    if C == 0:
        assert torch.equal(du, torch.zeros_like(du))  # dm = 0 over no channels


@pytest.mark.cuda
def test_cuda_side_stream():
    """The kernels run on the current stream: inputs written on a side stream are seen."""
    _need("cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        f = torch.randn(4, 64, 32, 16, device="cuda")
        u = torch.randn(4, 512, device="cuda")
        g = torch.randn(4, 64, 32, 16, device="cuda")
        f.mul_(2.0)  # queued on s, before the op
        o = _fwd(f, u)
        df, du, _ = _bwd(g, f, u)
    s.synchronize()
    ref_o, ref_df, ref_du, _ = _reference(g, f, u, None, "exp_relu", None)
    _close(o, ref_o, torch.float32)
    _close(df, ref_df, torch.float32)
    torch.testing.assert_close(du.double(), ref_du, rtol=1e-5, atol=1e-4)


@pytest.mark.cuda
def test_cuda_non_default_device():
    _need("cuda")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", 1)
    f = torch.randn(2, 8, 4, 4, device=dev)
    u = torch.randn(2, 16, device=dev)
    g = torch.randn(2, 8, 4, 4, device=dev)
    o = _fwd(f, u)
    df, du, _ = _bwd(g, f, u)
    assert o.device == dev and df.device == dev and du.device == dev
    ref_o, ref_df, ref_du, _ = _reference(g, f, u, None, "exp_relu", None)
    _close(o, ref_o, torch.float32)
    _close(df, ref_df, torch.float32)
    _close(du, ref_du, torch.float32)
