"""Peak memory of forward+backward: the fused op holds no full-size temporary.

Eager autograd of ``f * exp(relu(g @ W + b)).view(B, 1, H, W)`` keeps the output, df and the
full-size product ``do * f`` (summed over channels into dm) alive at once: three feature-size
tensors. The fused backward reduces dm inside the kernel, so it holds the output and df only, plus
what every implementation must return (dW, dg, db) and (B, H*W)-sized logits. These tests count
tensor storage with fmn_kernels.profiling and pin that accounting down exactly: one more
full-size buffer anywhere in the fused path fails them.
"""
import pytest
import torch

from fmn_kernels import FusedFeatureMask, backend
from fmn_kernels.profiling import peak_allocated_bytes

HAS_CUDA = torch.cuda.is_available()


def test_cpu_peak_counts_live_storage():
    """Allocations of known sizes: the peak is the largest live sum, not the sum of all."""
    keep = torch.empty(1000)                           # live before: not counted

    def work():
        a = torch.empty(256, dtype=torch.float32)      # 1 KiB
        b = torch.empty(512, dtype=torch.float64)      # 4 KiB  -> 5 KiB live
        del a
        c = torch.empty(768, dtype=torch.float32)      # 3 KiB  -> 7 KiB live
        del b, c
        d = torch.empty(1024, dtype=torch.float32)     # 4 KiB  -> 4 KiB live
        return d.sum()

    assert peak_allocated_bytes(work, "cpu") == 7 * 1024
    assert peak_allocated_bytes(lambda: None, "cpu") == 0
    assert keep.numel() == 1000


def test_peak_rejects_other_devices():
    with pytest.raises(ValueError, match="cpu or cuda"):
        peak_allocated_bytes(lambda: None, "meta")


def _devices_and_backends():
    cases = []
    if backend.has_compiled_kernel("spatial_mask_mul", "cpu"):
        cases.append(("cpu", "cpu"))
    if HAS_CUDA:
        cases += [("cuda", b) for b in backend.available("spatial_mask_mul", torch.device("cuda")) if b != "torch"]
    return cases


@pytest.mark.parametrize("device,kernel", _devices_and_backends() or [pytest.param("cpu", "cpu", marks=pytest.mark.skip(
    reason="no compiled kernel backend here"))])
@pytest.mark.parametrize("f_grad", [True, False])
@pytest.mark.parametrize("shape", [(4, 64, 16, 8, 32), (3, 48, 9, 7, 20)])
def test_fused_backward_holds_no_full_size_temporary(device, kernel, f_grad, shape):
    B, C, H, W, M = shape
    torch.manual_seed(0)
    f = torch.randn(B, C, H, W, device=device, requires_grad=f_grad)
    g = torch.randn(B, M, device=device, requires_grad=True)
    grad = torch.randn(B, C, H, W, device=device)
    fused = FusedFeatureMask(M, (H, W), backend=kernel).to(device)
    weight = fused.weight.detach().clone().requires_grad_(True)
    bias = fused.bias.detach().clone().requires_grad_(True)
    inputs = [t for t in (f, g) if t.requires_grad]

    def eager_step():
        out = f * torch.exp(torch.relu(g @ weight + bias)).view(B, 1, H, W)
        torch.autograd.grad(out, inputs + [weight, bias], grad)

    def fused_step():
        torch.autograd.grad(fused(f, g), inputs + list(fused.parameters()), grad)

    for step in (eager_step, fused_step):
        step()                                         # lazy initialisation out of the count
    eager, peak = peak_allocated_bytes(eager_step, device), peak_allocated_bytes(fused_step, device)

    full = f.numel() * 4                               # one feature-size tensor
    row = B * H * W * 4                                # one (B, H*W) logits-sized tensor
    returned = weight.numel() * 4 + g.numel() * 4 + bias.numel() * 4
    # out (+ df) + dW, dg, db + at most four logits-sized buffers (u, du and the GEMM's own).
    limit = (2 if f_grad else 1) * full + returned + 4 * row
    assert peak <= limit, f"fused peak {peak} B > {limit} B (full tensor {full} B)"
    if f_grad:
        assert eager >= 3 * full, f"eager peak {eager} B: expected out, df and do*f alive together"
    assert eager - peak >= full - returned - 4 * row, (eager, peak, full)


def test_cpu_peak_writes_nothing_to_stderr(capfd):
    # Kineto prints profiler start/stop lines to file descriptor 2; a benchmark table stays clean.
    x = torch.randn(256, 256)
    nbytes = x.numel() * x.element_size()
    assert nbytes <= peak_allocated_bytes(lambda: x * 2, "cpu") < nbytes + 4096
    out, err = capfd.readouterr()
    assert out == "" and err == "", err
