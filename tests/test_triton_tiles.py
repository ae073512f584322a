"""The Triton tile override (fmn_kernels.triton.feature_mask.tiles, bench/mixer.py --triton-tiles):
every tile shape gives the reference's values and gradients, in both layouts, with tiles smaller
and larger than the tensor (masked edges), and bad tiles are one clear error. Runs in Triton's
interpreter on CPU (small shapes) and on the GPU where there is one."""
import pytest
import torch

from fmn_kernels import backend, spatial_mask_mul, spatial_mask_mul_ref

pytestmark = pytest.mark.skipif(
    not (backend.triton_runs_on("cuda") or backend.triton_runs_on("cpu")),
    reason="the Triton kernels run neither on a GPU nor in the interpreter here")

DEVICE = "cuda" if backend.triton_runs_on("cuda") else "cpu"


def tfm():
    from fmn_kernels.triton import feature_mask

    return feature_mask


@pytest.mark.parametrize("tile", [(1, 16, 1), (2, 8, 2), (8, 4, 4), (4, 64, 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mix", [False, True])
def test_tiles_match_the_reference(tile, layout, mix):
    B, C, H, W = 2, 5, 3, 7                                 # odd sizes: every tile has masked edges
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    f = torch.randn(B, C, H, W, device=DEVICE, dtype=torch.float64).contiguous(memory_format=fmt)
    other = torch.randn_like(f) if mix else None
    u = torch.randn(B, H * W, device=DEVICE, dtype=torch.float64)
    act = "identity" if mix else "exp_relu"
    leaves = [t.requires_grad_() for t in (f, u, other) if t is not None]
    with tfm().tiles(*tile):
        out = spatial_mask_mul(f, u, act, f_other=other, backend="triton")
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, leaves, grad)
    ref = spatial_mask_mul_ref(f, u, act, None, other)
    want = torch.autograd.grad(ref, leaves, grad)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_tiles_apply_inside_and_restore_after(monkeypatch):
    mod = tfm()
    seen = []
    real = mod._launch_tiles
    monkeypatch.setattr(mod, "_launch_tiles", lambda *a: seen.append(real(*a)) or seen[-1])
    f = torch.randn(1, 4, 2, 8, device=DEVICE)
    u = torch.randn(1, 16, device=DEVICE)
    with mod.tiles(2, 8, 1):
        with mod.tiles(4, 4, 2):
            spatial_mask_mul(f, u, backend="triton")
        spatial_mask_mul(f, u, backend="triton")
    spatial_mask_mul(f, u, backend="triton")
    assert seen == [(4, 4, 2), (2, 8, 1), (*mod._blocks(4, 16, False), 4)]


@pytest.mark.parametrize("args,match", [
    ((3, 8, 4), "block_c must be a power of two"),
    ((8, 0, 4), "block_p must be a power of two"),
    ((8, 8, 6), "num_warps must be a power of two"),
    ((256, 128, 4), "block_c \\* block_p <= 16384"),
    ((8, 8, 32), "num_warps <= 16"),
])
def test_bad_tiles(args, match):
    with pytest.raises(ValueError, match=match):
        tfm().tiles(*args)
