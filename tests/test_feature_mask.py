"""The feature-mask op (fmn_kernels/feature_mask.py) on every backend this machine has, against
the pure-PyTorch reference: forward, backward, gradcheck, opcheck, torch.compile, bad input."""
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fmn
import sys

import fmn_kernels
from fmn_kernels import backend as B
from fmn_kernels.feature_mask import (
    FusedFeatureMask,
    activation_ref,
    feature_mask,
    feature_mask_ref,
    spatial_mask_mul,
    spatial_mask_mul_ref,
    spatial_mix,
    spatial_mix_ref,
)
from conftest import HAS_CUDA

fm = sys.modules["fmn_kernels.feature_mask"]


def _backends(device):
    return ["torch"] + B.available("spatial_mask_mul", device)


CASES = [(d, b) for d in (["cpu"] + (["cuda"] if HAS_CUDA else [])) for b in _backends(d)]
KERNEL_CASES = [c for c in CASES if c[1] != "torch"]
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 7), (3, 16, 8, 4), (2, 5, 16, 8)]


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channel_slice":  # a view with a channel stride of 2
        big = torch.empty(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype, device=x.device)
        big[:, ::2] = x
        return big[:, ::2]
    if layout == "batch_slice_cl":  # channels_last, every other batch item
        big = torch.empty(2 * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
        big = big.contiguous(memory_format=torch.channels_last)
        big[::2] = x
        return big[::2]
    if layout == "hw_transposed":  # H and W do not collapse into one stride
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


LAYOUTS = ["contiguous", "channels_last", "channel_slice", "batch_slice_cl", "hw_transposed"]


def _tol(dtype):
    return {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6),
            torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 1e-3)}[dtype]


def _inputs(shape, dtype, device, mix, layout="contiguous", logit_scale=1.0):
    b, c, h, w = shape
    f = _layout(torch.randn(shape, dtype=dtype, device=device), layout)
    u = (logit_scale * torch.randn(b, h * w, dtype=torch.float64, device=device)).to(dtype)
    fo = _layout(torch.randn(shape, dtype=dtype, device=device), layout) if mix else None
    return f, u, fo


# ---------------------------------------------------------------------------------------------
def test_reference_is_the_paper_formula():
    f = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    g = torch.randn(3, 7, dtype=torch.float64)
    w = torch.randn(7, 30, dtype=torch.float64)
    b = torch.randn(30, dtype=torch.float64)
    expected = f * torch.exp(torch.relu(g @ w + b)).view(3, 1, 6, 5)
    torch.testing.assert_close(feature_mask_ref(f, g, w, b), expected, rtol=1e-13, atol=1e-13)
    m = torch.rand(3, 6, 5, dtype=torch.float64)
    f2 = torch.randn_like(f)
    torch.testing.assert_close(spatial_mix_ref(f, f2, m), f * (1 - m[:, None]) + f2 * m[:, None])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["exp_relu", "sigmoid", "identity"])
@pytest.mark.parametrize("mix", [False, True])
def test_forward_matches_reference(device, backend, shape, activation, mix):
    f, u, fo = _inputs(shape, torch.float32, device, mix)
    out = spatial_mask_mul(f, u, activation, f_other=fo, backend=backend)
    ref = spatial_mask_mul_ref(f.double(), u.double(), activation, None, None if fo is None else fo.double())
    rtol, atol = _tol(torch.float32)
    torch.testing.assert_close(out, ref.float(), rtol=rtol, atol=atol)
    assert out.dtype == f.dtype and out.shape == f.shape


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layouts_forward_backward(device, backend, layout, dtype):
    shape = (2, 6, 5, 4)
    f, u, fo = _inputs(shape, dtype, device, mix=False, layout=layout)
    f.requires_grad_(True)
    u.requires_grad_(True)
    out = spatial_mask_mul(f, u, "exp_relu", backend=backend)
    if layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)
    grad = _layout(torch.randn(shape, dtype=dtype, device=device), "channels_last" if layout == "contiguous" else "contiguous")
    df, du = torch.autograd.grad(out, (f, u), grad)
    f_ref, u_ref = f.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    out_ref = spatial_mask_mul_ref(f_ref, u_ref)
    df_ref, du_ref = torch.autograd.grad(out_ref, (f_ref, u_ref), grad.double())
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(out, out_ref.to(dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(df, df_ref.to(dtype), rtol=rtol, atol=atol)
    torch.testing.assert_close(du, du_ref.to(dtype), rtol=rtol, atol=atol * shape[1])


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("activation", ["exp_relu", "sigmoid", "identity"])
@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("max_logit", [None, 0.3])
def test_backward_matches_reference(device, backend, shape, activation, mix, max_logit):
    f, u, fo = _inputs(shape, torch.float32, device, mix)
    leaves = [t.requires_grad_(True) for t in (f, u, fo) if t is not None]
    out = spatial_mask_mul(f, u, activation, max_logit, f_other=fo, backend=backend)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    ref_leaves = [t.detach().double().requires_grad_(True) for t in leaves]
    fo_ref = ref_leaves[2] if mix else None
    out_ref = spatial_mask_mul_ref(ref_leaves[0], ref_leaves[1], activation, max_logit, fo_ref)
    want = torch.autograd.grad(out_ref, ref_leaves, grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("mix", [False, True])
def test_gradcheck_float64(device, backend, mix):
    f, u, fo = _inputs((2, 2, 2, 3), torch.float64, device, mix)
    interpreted = backend == "triton" and device == "cpu"  # Triton's interpreter: slow, so fast_mode
    for activation, max_logit in (("exp_relu", None), ("exp_relu", 0.4), ("sigmoid", None), ("identity", None)):
        inputs = tuple(t.detach().requires_grad_(True) for t in (f, u, fo) if t is not None)

        def fn(*xs):
            return spatial_mask_mul(xs[0], xs[1], activation, max_logit,
                                    f_other=xs[2] if mix else None, backend=backend)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, fast_mode=interpreted)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_relu_gate_at_zero(device, backend):
    """du is 0 where u <= 0 (also at u == 0 exactly, as torch.relu's backward) and m * dm above."""
    f = torch.randn(1, 3, 2, 2, device=device)
    u = torch.tensor([[-1.0, 0.0, 1e-7, 2.0]], device=device, requires_grad=True)
    out = spatial_mask_mul(f, u, backend=backend)
    (du,) = torch.autograd.grad(out, u, torch.ones_like(out))
    u_ref = u.detach().clone().requires_grad_(True)
    (du_ref,) = torch.autograd.grad(spatial_mask_mul_ref(f, u_ref), u_ref, torch.ones_like(out))
    assert du[0, 0] == 0 and du[0, 1] == 0
    torch.testing.assert_close(du, du_ref)


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
def test_df_skipped_when_f_needs_no_grad(device, backend):
    f, u, _ = _inputs((2, 4, 3, 5), torch.float32, device, mix=False)
    u.requires_grad_(True)
    calls = []
    spatial_mask_mul(f[:1, :1, :1, :1], u[:1, :1].detach(), backend=backend)  # registers the op
    _, real = _op_names(backend)

    class Spy(TorchDispatchMode):   # sees the backward op whether autograd calls it from C++ or Python
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func == real:
                calls.append(args[6])
            return func(*args, **(kwargs or {}))

    out = spatial_mask_mul(f, u, backend=backend)
    with Spy():
        (du,) = torch.autograd.grad(out, u, torch.ones_like(out))
    assert calls == [False]
    df, dlogits, dother = real(torch.ones_like(f), f, u.detach(), None, "exp_relu", None, False, False)
    assert df.numel() == 0 and dother.numel() == 0
    u_ref = u.detach().clone().requires_grad_(True)
    (du_ref,) = torch.autograd.grad(spatial_mask_mul_ref(f, u_ref), u_ref, torch.ones_like(out))
    torch.testing.assert_close(du, du_ref)


def _op_names(backend):
    if backend in ("cpu", "cuda"):
        return torch.ops.fmn.spatial_mask_mul.default, torch.ops.fmn.spatial_mask_mul_backward.default
    return torch.ops.fmn.triton_spatial_mask_mul.default, torch.ops.fmn.triton_spatial_mask_mul_backward.default


@pytest.mark.parametrize("device,backend", KERNEL_CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, backend, layout):
    spatial_mask_mul(torch.randn(1, 1, 1, 1, device=device), torch.randn(1, 1, device=device), backend=backend)
    fwd, bwd = _op_names(backend)
    f, u, fo = _inputs((2, 3, 4, 5), torch.float32, device, mix=True, layout=layout)
    f.requires_grad_(True)
    u.requires_grad_(True)
    torch.library.opcheck(fwd, (f, u, None, "exp_relu", None))
    torch.library.opcheck(fwd, (f, u, fo, "identity", None))
    torch.library.opcheck(fwd, (f, u, None, "sigmoid", 0.5))
    g = torch.randn(2, 3, 4, 5, device=device)
    torch.library.opcheck(bwd, (g, f.detach(), u.detach(), None, "exp_relu", None, True, False))
    torch.library.opcheck(bwd, (g, f.detach(), u.detach(), fo, "sigmoid", 1.0, False, True))


class _TinyNet(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 6)
        self.mixer = FusedFeatureMask(6, (4, 3), backend=backend)

    def forward(self, x):
        f = torch.relu(self.stem(x))
        g = self.head(f.mean((2, 3)))
        return self.mixer(f, g).sum((2, 3))


@pytest.mark.parametrize("device,backend", CASES)
def test_torch_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    net = _TinyNet(backend).to(device)
    x = torch.randn(2, 3, 4, 3, device=device)
    eager = net(x)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), list(net.parameters()))
    eager_grads = torch.autograd.grad(net(x).sum(), list(net.parameters()))
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Half precision: the kernel's error is bounded by a small multiple of PyTorch's own error.
def _half_cases():
    cases = []
    for device, backend in KERNEL_CASES:
        if device == "cuda" or backend == "cpu":
            cases += [(device, backend, torch.bfloat16)]
        if device == "cuda":
            cases += [(device, backend, torch.float16)]
    return cases


@pytest.mark.parametrize("device,backend,dtype", _half_cases())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision(device, backend, dtype, layout):
    shape = (3, 32, 8, 8)
    f, u, _ = _inputs(shape, dtype, device, mix=False, layout=layout)
    f.requires_grad_(True)
    u.requires_grad_(True)
    out = spatial_mask_mul(f, u, backend=backend)
    assert out.dtype == dtype
    grad = torch.randn_like(out)
    df, du = torch.autograd.grad(out, (f, u), grad)
    f64, u64 = f.detach().double().requires_grad_(True), u.detach().double().requires_grad_(True)
    o64 = spatial_mask_mul_ref(f64, u64)
    df64, du64 = torch.autograd.grad(o64, (f64, u64), grad.double())
    # PyTorch's own error in this dtype: the naive formula evaluated in `dtype`.
    fl, ul = f.detach().requires_grad_(True), u.detach().requires_grad_(True)
    o_lo = fl * torch.exp(torch.relu(ul)).view(shape[0], 1, *shape[2:])
    df_lo, du_lo = torch.autograd.grad(o_lo, (fl, ul), grad)
    for got, lo, exact in ((out, o_lo, o64), (df, df_lo, df64), (du, du_lo, du64)):
        err = (got.double() - exact).abs().max().item()
        torch_err = (lo.double() - exact).abs().max().item()
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", [b for b in _backends("cuda") if b != "torch"] if HAS_CUDA else [])
def test_large_index_cuda(backend):
    """More than 2^31 elements: int64 indexing (about 8.6 GB of bf16 input plus output)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    f = torch.ones(2, 2**15 + 1, 256, 128, dtype=torch.bfloat16, device="cuda")
    u = torch.zeros(2, 256 * 128, device="cuda")
    u[1, -1] = 1.0
    out = spatial_mask_mul(f, u, backend=backend)
    assert out[1, -1, -1, -1].item() == pytest.approx(2.71875, rel=1e-2)
    assert out[0, -1, -1, -1].item() == 1.0


# ---------------------------------------------------------------------------------------------
def test_fused_feature_mask_module():
    mixer = FusedFeatureMask(7, (5, 4))
    assert fmn.FusedFeatureMask is FusedFeatureMask and fmn_kernels.FusedFeatureMask is FusedFeatureMask
    assert mixer.weight.shape == (7, 20) and mixer.bias.shape == (20,)
    with torch.no_grad():
        mixer.bias.normal_()
    f, g = torch.randn(3, 2, 5, 4), torch.randn(3, 7)
    out, mask = mixer(f, g, return_mask=True)
    expected = f * torch.exp(torch.relu(g @ mixer.weight + mixer.bias)).view(3, 1, 5, 4)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(mask, torch.exp(torch.relu(g @ mixer.weight + mixer.bias)).view(3, 5, 4))
    assert (mask >= 1).all()
    no_bias = FusedFeatureMask(7, 6, bias=False)
    assert no_bias.bias is None and no_bias.weight.shape == (7, 36)
    torch.testing.assert_close(feature_mask(torch.ones(1, 1, 6, 6), g[:1], no_bias.weight),
                               torch.exp(torch.relu(g[:1] @ no_bias.weight)).view(1, 1, 6, 6))


class _Queries(TorchFunctionMode):
    """Records the tensor methods and properties read on one tensor (dim, dtype, layout, ...)."""

    def __init__(self, watched):
        super().__init__()
        self.watched, self.names = watched, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if args and args[0] is self.watched:
            name = getattr(func, "__name__", "")
            self.names.append(func.__self__.__name__ if name == "__get__" else name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device,backend", CASES)
def test_local_features_are_checked_once_per_call(device, backend):
    """The module and feature_mask check f at their boundary only: the functional op they call
    does not check it again (a repeated check costs host time on every step)."""
    mixer = FusedFeatureMask(16, (4, 2), backend=backend).to(device)
    f, g = torch.randn(2, 4, 4, 2, device=device), torch.randn(2, 16, device=device)
    for call in (lambda: mixer(f, g), lambda: feature_mask(f, g, mixer.weight, mixer.bias, backend=backend),
                 lambda: spatial_mask_mul(f, g @ mixer.weight, backend=backend)):
        with _Queries(f) as seen:
            call()
        for query in ("dim", "is_floating_point", "layout"):
            assert seen.names.count(query) <= 1, seen.names


@pytest.mark.parametrize("device,backend", CASES)
def test_module_gradients_match_reference(device, backend):
    mixer = FusedFeatureMask(9, (4, 6), backend=backend).to(device)
    with torch.no_grad():
        mixer.bias.normal_()
    f, g = torch.randn(4, 3, 4, 6, device=device), torch.randn(4, 9, device=device, requires_grad=True)
    out = mixer(f, g)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (g, mixer.weight, mixer.bias), grad)
    ref = feature_mask_ref(f, g, mixer.weight, mixer.bias)
    want = torch.autograd.grad(ref, (g, mixer.weight, mixer.bias), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_max_logit_clamps():
    f, u = torch.randn(2, 3, 2, 2), 10 * torch.randn(2, 4)
    out = spatial_mask_mul(f, u, max_logit=1.0, backend="torch")
    torch.testing.assert_close(out, f * torch.exp(torch.relu(u.clamp(max=1.0))).view(2, 1, 2, 2))
    assert activation_ref(u, max_logit=1.0).max() <= torch.e + 1e-6


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 16, 8, 8)])
def test_spatial_mix_with_a_hard_mask_copies_exactly(device, backend, layout, shape):
    """PMM's Hard-Mix: where the mask is 1 the output is the partner's feature, bit for bit."""
    b, c, h, w = shape
    f = _layout(torch.randn(shape, device=device) * 100, layout)
    fo = _layout(torch.randn(shape, device=device) * 100, layout)
    mask = (torch.rand(b, h, w, device=device) > 0.5).float()
    out = spatial_mix(f, fo, mask, backend=backend)
    assert torch.equal(out, torch.where(mask[:, None] > 0, fo, f))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for _, b in CASES if _ == "cpu"])
def test_bad_input_errors(backend):
    f, u = torch.randn(2, 3, 4, 5), torch.randn(2, 20)
    with pytest.raises(ValueError, match="4-D"):
        spatial_mask_mul(torch.randn(3, 4, 5), u, backend=backend)
    with pytest.raises(ValueError, match=r"\(B, H\*W\)"):
        spatial_mask_mul(f, torch.randn(2, 19), backend=backend)
    with pytest.raises(ValueError, match=r"\(B, H\*W\)"):
        spatial_mask_mul(f, torch.randn(3, 20), backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        spatial_mask_mul(torch.ones(2, 3, 4, 5, dtype=torch.int32), u, backend=backend)
    with pytest.raises(TypeError, match="floating point"):
        spatial_mask_mul(f, torch.ones(2, 20, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match="unknown activation"):
        spatial_mask_mul(f, u, "tanh", backend=backend)
    with pytest.raises(ValueError, match="f_other"):
        spatial_mix(f, torch.randn(2, 3, 4, 4), torch.rand(2, 4, 5), backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        spatial_mix(f, torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.rand(2, 4, 5), backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        spatial_mask_mul(f, u, backend="metal")
    with pytest.raises(ValueError, match="f must be a 4-D tensor"):
        feature_mask(torch.randn(3, 4, 5), torch.randn(3, 8), torch.randn(8, 20), backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        feature_mask(f.int(), torch.randn(2, 8), torch.randn(8, 20), backend=backend)
    mixer = FusedFeatureMask(8, (4, 5), backend=backend)
    with pytest.raises(ValueError, match="local features must be 4-D"):
        mixer(torch.randn(3, 4, 5), torch.randn(3, 8))
    with pytest.raises(TypeError, match="floating-point"):
        mixer(f.int(), torch.randn(2, 8))
    with pytest.raises(TypeError, match="dense"):
        mixer(f.to_sparse(), torch.randn(2, 8))
    with pytest.raises(ValueError, match="spatial size"):
        mixer(torch.randn(2, 3, 5, 4), torch.randn(2, 8))
    with pytest.raises(ValueError, match="batch sizes differ"):
        mixer(f, torch.randn(3, 8))
    with pytest.raises(ValueError, match="global features have 7"):
        mixer(f, torch.randn(2, 7))
    with pytest.raises(ValueError, match="2-D"):
        mixer(f, torch.randn(2, 8, 1))
    with pytest.raises(ValueError, match="mask_hw"):
        FusedFeatureMask(8, (0, 5))


@pytest.mark.cuda
def test_device_mismatch_errors():
    f, u = torch.randn(2, 3, 4, 5), torch.randn(2, 20, device="cuda")
    with pytest.raises(ValueError, match="same device"):
        spatial_mask_mul(f, u)
    with pytest.raises(ValueError, match="runs on cpu tensors"):
        spatial_mask_mul(f.cuda(), u, backend="cpu")


def test_backend_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(B, "_state", {"ext": False, "ext_error": "not built", "triton": False})
    monkeypatch.setattr(B, "_warned", set())
    f, u = torch.randn(2, 3, 4, 5), torch.randn(2, 20)
    with pytest.warns(RuntimeWarning, match="falling back"):
        out = spatial_mask_mul(f, u, backend="cpu")
    torch.testing.assert_close(out, spatial_mask_mul_ref(f, u))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spatial_mask_mul(f, u, backend="cpu")  # the second call is silent
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        spatial_mask_mul(f, u, backend="triton")
    assert B.resolve("spatial_mask_mul", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("FMN_BACKEND", "torch")
    assert B.resolve("spatial_mask_mul", None, torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        B.resolve("spatial_mask_mul", "cuda", torch.device("cpu"))
