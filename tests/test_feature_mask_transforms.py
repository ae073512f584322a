"""The feature-mask op under torch.func transforms (vmap, grad, jacrev: the reference runs there),
torch.compile(fullgraph=True) of a backend that falls back, a bool mask for spatial_mix, and the
dtype check of the global features."""
import subprocess
import sys
import warnings

import pytest
import torch

from fmn_kernels import backend as B
from fmn_kernels.feature_mask import FusedFeatureMask, spatial_mask_mul, spatial_mask_mul_ref, spatial_mix

BACKENDS = ["torch"] + B.available("spatial_mask_mul", "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_the_module_matches_a_loop(backend):
    torch.manual_seed(0)
    m = FusedFeatureMask(6, (3, 2), backend=backend).double()
    with torch.no_grad():
        m.weight.normal_(0, 0.5)
    f, g = torch.randn(4, 3, 3, 2, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    got = torch.func.vmap(lambda fi, gi: m(fi[None], gi[None])[0])(f, g)
    want = torch.stack([m(f[i:i + 1], g[i:i + 1])[0] for i in range(4)])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", [False, True])
def test_func_grad_and_jacrev_match_autograd(backend, mix):
    torch.manual_seed(1)
    f = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    fo = torch.randn(2, 3, 2, 2, dtype=torch.float64) if mix else None
    act = "sigmoid" if mix else "exp_relu"
    u = torch.randn(2, 4, dtype=torch.float64)

    def loss(u):
        return (spatial_mask_mul(f, u, act, f_other=fo, backend=backend) ** 2).sum()

    u_leaf = u.clone().requires_grad_(True)
    want = torch.autograd.grad((spatial_mask_mul_ref(f, u_leaf, act, None, fo) ** 2).sum(), u_leaf)[0]
    torch.testing.assert_close(torch.func.grad(loss)(u), want)
    jac = torch.func.jacrev(lambda u: spatial_mask_mul(f, u, act, f_other=fo, backend=backend))(u)
    jac_ref = torch.autograd.functional.jacobian(lambda u: spatial_mask_mul_ref(f, u, act, None, fo), u)
    torch.testing.assert_close(jac, jac_ref)


def test_per_sample_gradients_of_the_module():
    torch.manual_seed(2)
    m = FusedFeatureMask(5, (2, 2)).double()
    params = {k: v.detach() for k, v in m.named_parameters()}
    f, g = torch.randn(3, 2, 2, 2, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)

    def loss(p, fi, gi):
        return torch.func.functional_call(m, p, (fi[None], gi[None])).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, f, g)
    for i in range(3):
        m.zero_grad()
        m(f[i:i + 1], g[i:i + 1]).sum().backward()
        for k, p in m.named_parameters():
            torch.testing.assert_close(per_sample[k][i], p.grad)


def test_compile_fullgraph_of_a_backend_that_falls_back(monkeypatch):
    # The fallback warning cannot be traced; the compiled call runs the reference and the first
    # eager call warns.
    monkeypatch.setitem(B._state, "ext", False)
    monkeypatch.setattr(B, "_warned", set())
    torch.manual_seed(3)
    m = FusedFeatureMask(6, (3, 2), backend="cpu")
    f, g = torch.randn(2, 4, 3, 2), torch.randn(2, 6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(f, g)
        torch.testing.assert_close(got, m(f, g))
    assert [str(w.message) for w in seen if "falling back" in str(w.message)] != []


def test_spatial_mix_takes_a_bool_mask():
    torch.manual_seed(4)
    f, fo = torch.randn(2, 3, 2, 3), torch.randn(2, 3, 2, 3)
    mask = torch.rand(2, 2, 3) > 0.5
    for backend in BACKENDS:
        got = spatial_mix(f, fo, mask, backend=backend)
        assert torch.equal(got, torch.where(mask[:, None], fo, f))


def test_global_features_of_another_dtype_are_one_clear_error():
    m = FusedFeatureMask(6, (3, 2))
    f = torch.randn(2, 4, 3, 2)
    with pytest.raises(TypeError, match="global features are torch.float64 but the weight is torch.float32"):
        m(f, torch.randn(2, 6, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(f, torch.randn(2, 6, dtype=torch.bfloat16)).dtype == f.dtype
        with pytest.raises(TypeError, match="global features are torch.float64"):
            m(f, torch.randn(2, 6, dtype=torch.float64))


def test_constant_marker_is_torchs_and_import_leaves_dynamo_out():
    # backend marks has_compiled_kernel as torch.compiler.assume_constant_result does, without
    # importing torch._dynamo (about 150 MB per process); the marker must stay torch's.
    def probe():
        return True

    marked = torch.compiler.assume_constant_result(probe)
    assert vars(marked) and set(vars(marked).items()) <= set(vars(B.has_compiled_kernel).items())
    code = "import sys, fmn_kernels, fmn; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
