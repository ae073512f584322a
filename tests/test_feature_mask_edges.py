"""The feature-mask op at its edges: non-finite values through the gates, NaN logits, gradients of
gradients, registration before the first call, and one clear error for each bad argument."""
import os
import subprocess
import sys

import pytest
import torch

from fmn_kernels import backend as B
from fmn_kernels.feature_mask import FusedFeatureMask, feature_mask, spatial_mask_mul, spatial_mask_mul_ref, spatial_mix

NAN, INF = float("nan"), float("inf")
KERNELS = B.available("spatial_mask_mul", "cpu")
BACKENDS = ["torch"] + KERNELS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _grads(backend, f, logits, f_other, activation, max_logit, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (f, logits, f_other) if t is not None]
    fo = leaves[2] if f_other is not None else None
    if backend == "reference":
        out = spatial_mask_mul_ref(leaves[0], leaves[1], activation, max_logit, fo)
    else:
        out = spatial_mask_mul(leaves[0], leaves[1], activation, max_logit, f_other=fo, backend=backend)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad_out))


def _assert_same_as_reference(backend, *args):
    want = _grads("reference", *args)
    got = _grads(backend, *args)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("activation,max_logit", [("exp_relu", None), ("exp_relu", 0.5), ("sigmoid", 0.5),
                                                  ("identity", 0.5)])
@pytest.mark.parametrize("where", ["grad_out", "f"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_values_behind_a_closed_gate_give_zero(backend, activation, max_logit, where, value):
    """Where the ReLU or the clamp stops the gradient, dlogits is 0 even if dm is inf or NaN
    (torch's relu and clamp backward select; 0 * inf would be NaN)."""
    f = torch.randn(2, 3, 2, 3)
    logits = torch.tensor([[-1.0, 0.0, 0.25, 0.5, 2.0, -0.1], [1.5, -2.0, 0.0, 0.3, 0.9, 0.5]])
    grad_out = torch.randn(2, 3, 2, 3)
    (grad_out if where == "grad_out" else f)[:, 1] = value
    _assert_same_as_reference(backend, f, logits, None, activation, max_logit, grad_out)
    dlogits = _grads(backend, f, logits, None, activation, max_logit, grad_out)[2]
    closed = logits > (max_logit if max_logit is not None else INF)
    if activation == "exp_relu":
        closed |= logits <= 0
    assert closed.any() and (dlogits[closed] == 0).all()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("activation", ["exp_relu", "sigmoid", "identity"])
@pytest.mark.parametrize("max_logit", [None, 0.5])
@pytest.mark.parametrize("mix", [False, True])
def test_nan_logits_propagate_as_in_the_reference(backend, activation, max_logit, mix):
    """A NaN logit gives a NaN mask (torch.relu and torch.clamp keep NaN) and a NaN gradient unless
    the clamp stops it."""
    f, grad_out = torch.randn(2, 4, 1, 5), torch.randn(2, 4, 1, 5)
    f_other = torch.randn(2, 4, 1, 5) if mix else None
    logits = torch.tensor([[NAN, -1.0, 0.0, 0.7, 2.0], [0.3, NAN, NAN, -0.5, 1.0]])
    _assert_same_as_reference(backend, f, logits, f_other, activation, max_logit, grad_out)
    out = spatial_mask_mul(f, logits, activation, max_logit, f_other=f_other, backend=backend)
    assert out[0, :, 0, 0].isnan().all() and out[1, :, 0, 1:3].isnan().all()
    assert not out[0, :, 0, 1:].isnan().any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,max_logit", [("exp_relu", None), ("exp_relu", 0.4), ("sigmoid", None)])
@pytest.mark.parametrize("mix", [False, True])
def test_gradients_of_gradients(backend, activation, max_logit, mix):
    """create_graph=True gives a differentiable backward (it was silently wrong on the C++ op)."""
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(2, 2, 1, 3, dtype=torch.float64, generator=gen)
    logits = torch.randn(2, 3, dtype=torch.float64, generator=gen)
    f_other = torch.randn(2, 2, 1, 3, dtype=torch.float64, generator=gen) if mix else None
    inputs = tuple(t.requires_grad_(True) for t in (f, logits, f_other) if t is not None)

    def fn(*xs):
        return spatial_mask_mul(xs[0], xs[1], activation, max_logit, f_other=xs[2] if mix else None,
                                backend=backend)

    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", KERNELS)
def test_double_backward_of_a_module_matches_the_reference(backend):
    """A gradient penalty through FusedFeatureMask: d/dW of |d out / d f|^2."""
    mixer = FusedFeatureMask(5, (2, 3), backend=backend).double()
    with torch.no_grad():
        mixer.bias.normal_()
    f = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, dtype=torch.float64)

    def penalty(fn):
        (df,) = torch.autograd.grad(fn(f, g).square().sum(), f, create_graph=True)
        return torch.autograd.grad(df.square().sum(), mixer.weight)[0]

    want = penalty(lambda f, g: feature_mask(f, g, mixer.weight, mixer.bias, backend="torch"))
    torch.testing.assert_close(penalty(mixer), want, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not B.has_compiled_kernel("spatial_mask_mul", "cpu"), reason="needs the compiled CPU kernel")
def test_registered_before_the_first_call():
    """In a fresh process: torch.compile(fullgraph=True) of a model on the C++ op as its very first
    call (registering the fake kernel inside a trace failed), and the op called directly through
    torch.ops is differentiable."""
    code = """
import torch
import fmn_kernels._C  # the extension alone, as a user calling torch.ops.fmn does
f = torch.randn(2, 3, 2, 2, requires_grad=True)
u = torch.randn(2, 4, requires_grad=True)
(du,) = torch.autograd.grad(torch.ops.fmn.spatial_mask_mul(f, u, None, "exp_relu", None).sum(), u)
torch.testing.assert_close(du, (f.sum(1).reshape(2, 4) * torch.exp(u) * (u > 0)).detach())
mixer = fmn_kernels.FusedFeatureMask(4, (2, 2), backend="cpu")
g = torch.randn(2, 4)
out = torch.compile(mixer, fullgraph=True, backend="aot_eager")(f, g)
torch.testing.assert_close(out, fmn_kernels.feature_mask_ref(f, g, mixer.weight, mixer.bias))
print("ok")
"""
    env = {**os.environ, "FMN_BACKEND": "auto"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_give_one_clear_error(backend):
    f, u = torch.randn(2, 3, 2, 3), torch.randn(2, 6)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        spatial_mask_mul(f.to(torch.float8_e4m3fn), u, backend=backend)
    with pytest.raises(TypeError, match="dense"):
        spatial_mix(f, torch.randn(2, 3, 2, 3).to_sparse(), torch.rand(2, 2, 3), backend=backend)
    with pytest.raises(ValueError, match="max_logit must be a number"):
        spatial_mask_mul(f, u, max_logit="big", backend=backend)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        feature_mask(f, torch.randn(2, 4), torch.randn(4), backend=backend)
    with pytest.raises(ValueError, match=r"bias must have shape \(H\*W,\) = \(6,\)"):
        feature_mask(f, torch.randn(2, 4), torch.randn(4, 6), torch.randn(5), backend=backend)


def test_module_and_backend_arguments_are_checked_up_front():
    with pytest.raises(ValueError, match="backend must be a name"):
        spatial_mask_mul(torch.randn(1, 1, 1, 1), torch.randn(1, 1), backend=1)
    with pytest.raises(ValueError, match="backend must be a name"):
        FusedFeatureMask(4, (2, 2), backend=True)
    for max_logit in (NAN, "big"):
        with pytest.raises(ValueError, match="max_logit must be a number"):
            FusedFeatureMask(4, (2, 2), max_logit=max_logit)
    for global_dim, mask_hw in ((2.5, (2, 2)), (4, "ab"), (4, (2.0, 2)), (4, (2, 2, 2)), (True, 2)):
        with pytest.raises(ValueError, match="integer global_dim >= 1 and mask_hw"):
            FusedFeatureMask(global_dim, mask_hw)
    mixer = FusedFeatureMask(4, [2, 3], max_logit=3)
    assert mixer.mask_hw == (2, 3) and mixer.max_logit == 3.0 and isinstance(mixer.max_logit, float)
