"""The mask GEMM (fmn_kernels/mask_linear.py): the transposed CPU forms against addmm, values
and every gradient, with and without bias, under gradcheck, torch.compile and autocast."""
import pytest
import torch

from fmn_kernels import mask_linear as ml
from conftest import HAS_CUDA

SHAPES = [(1, 1, 1), (3, 5, 7), (32, 64, 48), (5, 130, 17)]  # (B, M, N)


def _inputs(B, M, N, dtype, device="cpu", bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(B, M, generator=gen, dtype=dtype).to(device)
    w = torch.randn(M, N, generator=gen, dtype=dtype).to(device)
    b = torch.randn(N, generator=gen, dtype=dtype).to(device) if bias else None
    return g, w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_addmm_values_and_grads(shape, dtype, bias, monkeypatch):
    monkeypatch.setattr(ml, "MIN_MACS", 0)
    g, w, b = _inputs(*shape, dtype, bias=bias, seed=sum(shape))
    leaves = [t.clone().requires_grad_(True) for t in (g, w, b) if t is not None]
    ref_leaves = [t.clone().requires_grad_(True) for t in (g, w, b) if t is not None]
    args = leaves + ([None] if not bias else [])
    ref_args = ref_leaves + ([None] if not bias else [])
    assert ml._use_cpu_forms(*args)
    out, ref = ml.mask_linear(*args), ml.mask_linear_ref(*ref_args)
    assert out.is_contiguous() and out.shape == (shape[0], shape[2])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ref, **tol)
    du = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, du)
    ref_grads = torch.autograd.grad(ref, ref_leaves, du)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, True), (True, True, False)])
def test_only_the_needed_grads(needs):
    g, w, b = _inputs(4, 6, 5, torch.float64)
    for t, need in zip((g, w, b), needs):
        t.requires_grad_(need)
    out = ml.mask_linear(g, w, b)
    out.sum().backward()
    ref = [x.detach().clone().requires_grad_(True) for x in (g, w, b)]
    ml.mask_linear_ref(*ref).sum().backward()
    for t, r, need in zip((g, w, b), ref, needs):
        assert (t.grad is not None) == need
        if need:
            torch.testing.assert_close(t.grad, r.grad)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(bias):
    g, w, b = _inputs(3, 5, 4, torch.float64, bias=bias, seed=3)
    args = tuple(t.requires_grad_(True) for t in (g, w, b) if t is not None)
    fn = (lambda g, w, b: ml.mask_linear(g, w, b)) if bias else (lambda g, w: ml.mask_linear(g, w))
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_strided_inputs():
    g_nc = torch.randn(10, 6).t()                 # (6, 10), transposed view
    w_nc = torch.randn(8, 10).t()                 # (10, 8), transposed view
    b_nc = torch.randn(16)[::2]                   # stride 2
    torch.testing.assert_close(ml.mask_linear(g_nc, w_nc, b_nc), ml.mask_linear_ref(g_nc, w_nc, b_nc),
                               rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    g, w, b = _inputs(4, 9, 7, torch.float32, seed=7)
    w.requires_grad_(True)
    fn = torch.compile(lambda g, w, b: torch.exp(torch.relu(ml.mask_linear(g, w, b))).sum(),
                       fullgraph=True, backend="aot_eager")
    out = fn(g, w, b)
    ref = torch.exp(torch.relu(ml.mask_linear_ref(g, w, b))).sum()
    torch.testing.assert_close(out, ref)
    (dw,) = torch.autograd.grad(out, [w])
    (dw_ref,) = torch.autograd.grad(ref, [w])
    torch.testing.assert_close(dw, dw_ref)


def test_plain_form_where_mkl_forms_do_not_apply():
    g, w, b = _inputs(4, 9, 7, torch.float32)
    assert not ml._use_cpu_forms(g, w, b)                    # too small to pay for the Function
    assert ml._use_cpu_forms(*_inputs(32, 2048, 2048, torch.float32))
    g, w, b = _inputs(ml.MIN_MACS // 63 // 64 + 1, 63, 64, torch.float32)
    assert ml._use_cpu_forms(g, w, b) and not ml._use_cpu_forms(g[:-1], w, b)
    assert not ml._use_cpu_forms(g.bfloat16(), w.bfloat16(), b.bfloat16())
    assert not ml._use_cpu_forms(g.double(), w, b)           # mixed dtypes: addmm's own error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ml._use_cpu_forms(g, w, b)
        out = ml.mask_linear(g, w, b)
    assert out.dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_takes_addmm():
    g, w, b = _inputs(4, 9, 7, torch.float32, device="cuda")
    assert not ml._use_cpu_forms(g, w, b)
    torch.testing.assert_close(ml.mask_linear(g, w, b), torch.addmm(b, g, w))
