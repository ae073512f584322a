"""Run every kernel of the mask op and of the GPU re-ranking once, and check each result.

The driver that .ci/gpu runs under compute-sanitizer (memcheck, racecheck, synccheck, initcheck)
and ncu. It is small on purpose (sanitizers slow kernels 10-100x): tiny odd and aligned shapes,
each kernel variant launched once or twice. Every result is compared with the pure-PyTorch
reference evaluated in float64 on the same inputs, so a wrong answer fails the run as well as a
bad memory access. A backend that silently falls back to "torch" is a failure too.

Mask op: fmn.spatial_mask_mul (exp_relu, sigmoid with max_logit, identity) / fmn.spatial_mix /
fmn.FusedFeatureMask, forward and backward, fp32/fp16/bf16, NCHW / channels_last / strided views,
f with and without requires_grad, odd shapes (element-wise paths) and aligned ones (16-byte
packets), on the kernel backends of the device (cuda: "cuda" and "triton"; cpu: "cpu" and
"triton" under TRITON_INTERPRET=1); and two launch-geometry shapes (GRID_SHAPES) in NCHW and
channels_last, fp32 and bf16: C=256 on one 8x8 plane (the CUDA plane backward's 16- and 32-row
blocks) and B=64 C=32 64x80 (several channels per block in the plane forward, a grid-stride loop
in the channel kernels), sized for an H200's 132 multiprocessors. Re-ranking: fmn.rerank (dense
and topk) and fmn.rerank_from_distances, q=7 g=23 d=16, also with k1 larger than N; q=5 g=150
k1=100 (index columns longer than the Jaccard kernel's 64-wide slices, so its barrier between
slices matters); and q=7 g=23 cut into chunks of 2 query rows (a non-zero first row r0 in the
Jaccard kernel, several pair_sqdist launches); each against fmn_kernels.rerank.rerank_ref.
References are evaluated on the CPU in float64, so that under a sanitizer the device runs little
besides the kernels under test.

    python .ci/gpu_sanitize.py                                    # CUDA
    TRITON_INTERPRET=1 python .ci/gpu_sanitize.py --device cpu    # CPU (C++ kernels, Triton interpreted)
    python .ci/gpu_sanitize.py --only mask                        # or --only rerank
    python .ci/gpu_sanitize.py --profile --labels L.txt           # B=64 C=256 64x32 fp32/bf16, one launch
                                                                  # per kernel and pass, for ncu
    python .ci/gpu_sanitize.py --kernel-regex                     # regex of the mask kernels' names (ncu -k)
    python .ci/gpu_sanitize.py --ncu-table R.csv --labels L.txt   # table of an ncu CSV (--page raw --csv)

Exit status 0 when every check passed, 1 otherwise (each failure is printed).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# ||out - ref|| / ||ref|| against the float64 reference: fp32 arithmetic lands far below 1e-5;
# a half-precision output is rounded once (fp16 ~5e-4, bf16 ~4e-3), the GEMM of the module
# rounds its logits too. A wrong index or an unwritten element gives errors of order 1.
TOL = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 3e-2}
RERANK_TOL, RANK_TOL = 1e-5, 2e-6  # as tests/test_rerank.py (DESIGN.md section 3)
LAYOUTS = ("contiguous", "channels_last", "channel_slice", "batch_slice_cl")
SHAPES = ((3, 5, 7, 9), (2, 16, 8, 8))  # odd (element-wise paths); aligned (16-byte packets)
# Launch geometry of the CUDA kernels (csrc/cuda/feature_mask.cu, 132 SMs): (1, 256, 8, 8) gives the
# plane backward 32-row blocks; (64, 32, 64, 80) gives the plane forward 3-5 channels per block and
# the channel kernels fewer blocks than rows (grid-stride).
GRID_SHAPES = ((1, 256, 8, 8), (64, 32, 64, 80))
# spatial_mask_mul cases: (f requires grad, activation, max_logit)
MUL_CASES = ((True, "exp_relu", None), (False, "exp_relu", None), (True, "sigmoid", 0.5), (False, "identity", None))


class Checker:
    def __init__(self):
        self.n, self.failed = 0, []

    def close(self, name: str, got, ref, tol: float) -> float:
        """Relative error ||got - ref|| / ||ref||, returned. Fails on it exceeding ``tol``, and on
        any element off by more than tol * (|ref| + rms(ref)) (one wrong element among thousands
        barely moves the norm), on NaN or inf, and on a wrong shape."""
        self.n += 1
        if got is None or tuple(got.shape) != tuple(ref.shape):
            self.fail(name, f"shape {None if got is None else tuple(got.shape)} != {tuple(ref.shape)}")
            return float("nan")
        got64, ref64 = got.detach().double().to(ref.device), ref.detach().double()  # on the reference's device
        diff = (got64 - ref64).abs()
        rms = ref64.pow(2).mean().sqrt().item() if ref64.numel() else 0.0
        err = (diff.norm() / ref64.norm().clamp_min(1e-30)).item()
        ratio = (diff / (ref64.abs() + max(rms, 1e-30))).flatten()
        worst = int(ratio.nan_to_num(float("inf")).argmax()) if ratio.numel() else 0
        if not err <= tol:  # also catches NaN
            self.fail(name, f"relative error {err:.3g} > {tol:g}")
        elif ratio.numel() and not ratio[worst].item() <= tol:
            where = tuple(int(i) for i in divmod_index(worst, got.shape))
            self.fail(name, f"element {where}: got {got64.flatten()[worst].item():.6g}, "
                            f"reference {ref64.flatten()[worst].item():.6g} (rms {rms:.3g}, tol {tol:g})")
        return err

    def true(self, name: str, ok: bool, why: str) -> None:
        self.n += 1
        if not ok:
            self.fail(name, why)

    def fail(self, name: str, why: str) -> None:
        self.failed.append(f"{name}: {why}")
        print(f"FAIL {name}: {why}", flush=True)


def divmod_index(flat: int, shape) -> list[int]:
    """The multi-index of a flat (row-major) index."""
    out = []
    for n in reversed(tuple(shape)):
        flat, i = divmod(flat, n)
        out.append(i)
    return out[::-1]


def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def poison_cache(device) -> None:
    """Best effort: leave NaN in the CUDA caching allocator's free blocks, so an output element
    a kernel forgets to write is NaN rather than a stale plausible value."""
    if device.type == "cuda":
        import torch

        junk = [torch.full((1 << 17,), float("nan"), device=device) for _ in range(8)]  # 8 x 512 KiB
        junk.clear()


def layout(x, name: str):
    """The same values in another memory layout (a view where the name says so)."""
    import torch

    if name == "contiguous":
        return x.contiguous()
    if name == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if name == "channel_slice":  # every other channel of a larger tensor: channel stride 2*H*W
        big = torch.empty(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype, device=x.device)
        big[:, ::2] = x
        return big[:, ::2]
    if name == "batch_slice_cl":  # every other batch item of a channels_last tensor
        big = torch.empty(2 * x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
        big = big.contiguous(memory_format=torch.channels_last)
        big[::2] = x
        return big[::2]
    raise ValueError(name)


def guarded(chk: Checker, name: str, fn, *args) -> float:
    """fn(*args), an exception counted as a failure so that the remaining cases still run."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - report and go on
        chk.fail(name, f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        return float("nan")


def check_backend(chk: Checker, op: str, backend: str, device, triton_ok: bool = True) -> bool:
    """The backend must run here, not fall back to the torch reference."""
    from fmn_kernels import resolve

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = resolve(op, backend, device, triton_ok=triton_ok)
    chk.true(f"{op} backend {backend}", got == backend,
             f"resolves to '{got}' on {device.type} (extension not built, or Triton missing?)")
    return got == backend


# ----------------------------------------------------------------------------------------------
# mask op
# ----------------------------------------------------------------------------------------------
def grads(out, inputs, grad):
    import torch

    return torch.autograd.grad(out, inputs, grad)


def cpu64(t, requires_grad: bool = False, device="cpu"):
    """A float64 copy of ``t`` (a leaf, with ``requires_grad``) for the reference: on the CPU,
    except for shapes too large to evaluate there quickly."""
    return t.detach().double().to(device).requires_grad_(requires_grad)


def mask_case(chk: Checker, backend: str, dname: str, lay: str, shape, device, mul_cases=MUL_CASES,
              mix_cases=((True, True), (False, False)), ref_device="cpu") -> float:
    """spatial_mask_mul (``mul_cases``: f with / without grad, exp_relu, sigmoid+max_logit,
    identity) and spatial_mix (``mix_cases``: (f requires grad, f_other requires grad); the mask
    always does), forward and backward, one layout and dtype. Returns the worst relative error."""
    import torch

    import fmn
    from fmn_kernels import spatial_mask_mul_ref, spatial_mix_ref

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dname]
    tol, tag = TOL[dname], f"mask {backend} {dname} {lay} {'x'.join(map(str, shape))}"
    B, C, H, W = shape
    worst = 0.0
    poison_cache(device)

    def fresh(*size, lay_=None):
        x = torch.randn(*size, device=device).to(dtype)
        return layout(x, lay_) if lay_ else x

    # spatial_mask_mul: f requires grad (df written) and not (df skipped)
    for f_grad, act, max_logit in mul_cases:
        f, u = fresh(B, C, H, W, lay_=lay), fresh(B, H * W)
        f.requires_grad_(f_grad)
        u.requires_grad_(True)
        out = fmn.spatial_mask_mul(f, u, act, max_logit, backend=backend)
        grad = fresh(*out.shape, lay_=lay)
        got = grads(out, (f, u) if f_grad else (u,), grad)
        f64, u64 = cpu64(f, f_grad, ref_device), cpu64(u, True, ref_device)
        ref = spatial_mask_mul_ref(f64, u64, act, max_logit)
        want = grads(ref, (f64, u64) if f_grad else (u64,), cpu64(grad, False, ref_device))
        name = f"{tag} mul {act}{'' if max_logit is None else f' max_logit={max_logit}'} f.grad={f_grad}"
        same_format = lay not in ("contiguous", "channels_last") or out.stride() == f.stride()
        chk.true(f"{name} dtype/format", out.dtype == dtype and same_format,
                 f"output {out.dtype} strides {out.stride()}, f {dtype} strides {f.stride()}")
        worst = max(worst, chk.close(f"{name} out", out, ref, tol))
        for gname, g, w in zip(("df", "du") if f_grad else ("du",), got, want):
            worst = max(worst, chk.close(f"{name} {gname}", g, w, tol))

    # spatial_mix: o = f*(1-m) + f_other*m, mask (B, H, W); grads for f, f_other (when they
    # require grad: df / df_other written or skipped) and the mask
    for f_grad, fo_grad in mix_cases:
        f, fo, m = fresh(B, C, H, W, lay_=lay), fresh(B, C, H, W, lay_=lay), torch.rand(B, H, W, device=device).to(dtype)
        for t, rg in ((f, f_grad), (fo, fo_grad), (m, True)):
            t.requires_grad_(rg)
        out = fmn.spatial_mix(f, fo, m, backend=backend)
        grad = fresh(*out.shape, lay_=lay)
        names, inputs = zip(*[(n, t) for n, t in (("df", f), ("df_other", fo), ("dmask", m)) if t.requires_grad])
        got = grads(out, inputs, grad)
        f64, fo64, m64 = cpu64(f, f_grad, ref_device), cpu64(fo, fo_grad, ref_device), cpu64(m, True, ref_device)
        ref = spatial_mix_ref(f64, fo64, m64)
        want = grads(ref, [t for t in (f64, fo64, m64) if t.requires_grad], cpu64(grad, False, ref_device))
        name = f"{tag} mix f.grad={f_grad} f_other.grad={fo_grad}"
        worst = max(worst, chk.close(f"{name} out", out, ref, tol))
        for gname, g, w in zip(names, got, want):
            worst = max(worst, chk.close(f"{name} {gname}", g, w, tol))
    sync(device)
    return worst


def module_case(chk: Checker, backend: str, dname: str, lay: str, device, autocast: bool = False) -> float:
    """FusedFeatureMask (mask GEMM + fused op) forward and backward; grads of every input."""
    import torch

    import fmn
    from fmn_kernels import spatial_mask_mul_ref

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dname]
    B, C, H, W, M = 3, 5, 7, 9, 16
    poison_cache(device)
    pdtype = torch.float32 if autocast else dtype
    mixer = fmn.FusedFeatureMask(M, (H, W), backend=backend, device=device, dtype=pdtype)
    with torch.no_grad():
        mixer.bias.normal_()  # a non-zero bias, so db and the bias path are checked
    local = layout(torch.randn(B, C, H, W, device=device).to(pdtype if autocast else dtype), lay).requires_grad_(True)
    glob = torch.randn(B, M, device=device).to(pdtype if autocast else dtype).requires_grad_(True)
    if autocast:
        with torch.autocast(device.type, dtype=dtype):
            out = mixer(local, glob)
    else:
        out = mixer(local, glob)
    grad = torch.randn(out.shape, device=device).to(out.dtype)
    params = (local, glob, mixer.weight, mixer.bias)
    got = grads(out, params, grad)
    p64 = [cpu64(t, True) for t in params]
    if autocast:  # the GEMM runs on operands rounded to the autocast dtype
        p64 = [t.detach().to(dtype).double().requires_grad_(True) if i else t for i, t in enumerate(p64)]
    # The module's logits come out of the GEMM in the compute dtype: round the reference's logits
    # the same way (straight through for the gradient), so that a logit that rounding moves across
    # the ReLU gate at 0 flips the gate in both, not in the kernel alone.
    u64 = torch.addmm(p64[3], p64[1], p64[2])
    u64 = u64 + (u64.to(dtype).double() - u64).detach()
    ref = spatial_mask_mul_ref(p64[0], u64, "exp_relu")
    want = grads(ref, p64, cpu64(grad))
    tag = f"module {backend} {'autocast ' if autocast else ''}{dname} {lay}"
    tol = TOL[dname]
    worst = chk.close(f"{tag} out", out, ref, tol)
    for gname, g, w in zip(("dlocal", "dglobal", "dweight", "dbias"), got, want):
        worst = max(worst, chk.close(f"{tag} {gname}", g, w, tol))
    sync(device)
    return worst


def run_mask(chk: Checker, backends, device) -> None:
    for backend in backends:
        if not check_backend(chk, "spatial_mask_mul", backend, device):
            continue
        for dname in ("fp32", "fp16", "bf16"):
            for shape in SHAPES:
                line = []
                for lay in LAYOUTS:
                    err = guarded(chk, f"mask {backend} {dname} {lay} {shape}", mask_case,
                                  chk, backend, dname, lay, shape, device)
                    line.append(f"{lay} {err:.1e}")
                print(f"  mask   {backend:<6} {dname} {'x'.join(map(str, shape)):<9} " + "  ".join(line), flush=True)
            # launch geometry of the CUDA kernels (on CPU no new path, and slow when interpreted):
            # one mul and one mix case per shape and layout
            if device.type == "cuda" and dname != "fp16":
                for shape in GRID_SHAPES:
                    line = []
                    for lay in ("contiguous", "channels_last"):
                        err = guarded(chk, f"mask {backend} {dname} {lay} {shape}", mask_case, chk, backend, dname,
                                      lay, shape, device, MUL_CASES[:1], ((True, True),), device)
                        line.append(f"{lay} {err:.1e}")
                    print(f"  grid   {backend:<6} {dname} {'x'.join(map(str, shape)):<9} " + "  ".join(line),
                          flush=True)
            cases = [(lay, False) for lay in ("contiguous", "channels_last")]
            if dname != "fp32":
                cases.append(("contiguous", True))
            errs = []
            for lay, ac in cases:
                err = guarded(chk, f"module {backend} {dname} {lay}", module_case, chk, backend, dname, lay, device, ac)
                errs.append(f"{lay}{' autocast' if ac else ''} {err:.1e}")
            print(f"  module {backend:<6} {dname} 3x5x7x9 M=16 " + "  ".join(errs), flush=True)


# ----------------------------------------------------------------------------------------------
# re-ranking
# ----------------------------------------------------------------------------------------------
def rerank_matches(chk: Checker, name: str, out, ref) -> float:
    import torch

    chk.true(f"{name} dtype", out.dtype == torch.float32, f"got {out.dtype}")
    if tuple(out.shape) != tuple(ref.shape):
        chk.fail(name, f"shape {tuple(out.shape)} != {tuple(ref.shape)}")
        return float("nan")
    diff = (out.detach().double().cpu() - ref).abs().max().item()
    chk.true(f"{name} max|delta|", diff <= RERANK_TOL, f"max |backend - reference| = {diff:.3g} > {RERANK_TOL:g}")
    order = torch.sort(out.detach().cpu(), dim=1, stable=True).indices
    walked = ref.gather(1, order)
    worst = (walked[:, 1:] - walked[:, :-1]).min().item()
    chk.true(f"{name} ranking", worst >= -RANK_TOL,
             f"the reference steps down by {-worst:.3g} along the backend's order")
    return diff


def rerank_features(q: int, g: int, d: int, clusters: int, seed: int):
    """Identity-like clusters of unit-variance noise around spread centres (CPU float32)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(clusters, d, generator=gen)
    x = centres[torch.randint(0, clusters, (q + g,), generator=gen)] + 0.7 * torch.randn(q + g, d, generator=gen)
    return x[:q].contiguous(), x[q:].contiguous()


class small_chunks:
    """fmn_kernels.rerank_sparse with at most ``rows`` rows per chunk while active: the chunked
    paths (a Jaccard kernel launch per chunk, from a non-zero first row) at a sanitizer's size."""

    def __init__(self, rows: int):
        self.rows = rows

    def __enter__(self):
        from fmn_kernels import rerank_sparse as sp

        self.sp, self.saved = sp, sp._rows_per_chunk
        sp._rows_per_chunk = lambda n_cols, device, cap=None: min(self.saved(n_cols, device, cap), self.rows)
        return self

    def __exit__(self, *exc):
        self.sp._rows_per_chunk = self.saved
        return False


class overlap_probe:
    """Records, while active, each S chunk of the sparse pipeline (Triton's jaccard_overlap or the
    torch _overlap_chunk): its first query row r0 and the longest column list of the index. Lets the
    driver check that a case reaches the path it is meant for."""

    def __enter__(self):
        from fmn_kernels import rerank_sparse as sp

        self.r0s, self.longest, self.patched = [], 0, []

        def wrap(fn):
            def probe(qcols, qvals, r0, r1, index, g, n):
                ptr = index[0]
                if ptr.numel() > 1:
                    self.longest = max(self.longest, int((ptr[1:] - ptr[:-1]).max().item()))
                self.r0s.append(int(r0))
                return fn(qcols, qvals, r0, r1, index, g, n)
            return probe

        targets = [(sp, "_overlap_chunk")]
        try:
            from fmn_kernels.triton import rerank as tr

            targets.append((tr, "jaccard_overlap"))
        except Exception:  # noqa: BLE001 - no Triton: the torch path only
            pass
        for mod, name in targets:
            self.patched.append((mod, name, getattr(mod, name)))
            setattr(mod, name, wrap(getattr(mod, name)))
        return self

    def __exit__(self, *exc):
        for mod, name, fn in self.patched:
            setattr(mod, name, fn)
        return False


def run_rerank(chk: Checker, backends, device) -> None:
    import torch

    import fmn
    from fmn_kernels.rerank import rerank_from_distances_ref, rerank_ref

    # (label, q, g, d, clusters, params, rows per chunk or None)
    cases = [
        ("", 7, 23, 16, 4, dict(k1=20, k2=6, lambda_value=0.3), None),
        ("", 7, 23, 16, 4, dict(k1=40, k2=3, lambda_value=0.5), None),   # k1+1 = 41 > N = 30
        ("long columns ", 5, 150, 8, 1, dict(k1=100, k2=6, lambda_value=0.3), None),
        ("chunks of 2 rows ", 7, 23, 16, 4, dict(k1=20, k2=6, lambda_value=0.3), 2),
    ]
    data = []
    for _, q, g, d, k, p, _ in cases:
        qf, gf = rerank_features(q, g, d, k, seed=7)
        data.append((rerank_ref(qf, gf, **p), qf.to(device), gf.to(device)))

    def one(backend, i, tag):
        label, q, g, d, k, p, chunk = cases[i]
        ref, qd, gd = data[i]
        with small_chunks(chunk) if chunk else contextlib.nullcontext(), overlap_probe() as probe:
            out = fmn.rerank(qd, gd, backend=backend, **p)
            sync(device)
            chk.true(f"{tag} device", out.device.type == device.type, f"result on {out.device}")
            err = rerank_matches(chk, tag, out, ref)
            values, indices = fmn.rerank(qd, gd, backend=backend, topk=5, **p)
            sync(device)
        if backend != "cpu":  # the C++ backend has its own S; the sparse pipeline's paths:
            if label.startswith("long"):
                chk.true(f"{tag} reaches long columns", probe.longest > 64,
                         f"longest index column {probe.longest} <= 64: one slice, the barrier is not exercised")
            if chunk:
                chk.true(f"{tag} reaches chunks", len(set(probe.r0s)) > 2,
                         f"S chunks from rows {sorted(set(probe.r0s))}: not chunked")
        sv, si = torch.sort(out, dim=1, stable=True)
        chk.true(f"{tag} topk=5", torch.equal(values, sv[:, :5]) and torch.equal(indices, si[:, :5]),
                 "topk differs from the first 5 of the sorted dense result")
        return err

    for backend in backends:
        if not check_backend(chk, "rerank", backend, device):
            continue
        errs = []
        for i, (label, q, g, d, _, p, _) in enumerate(cases):
            tag = f"rerank {backend} {label}q={q} g={g} d={d} k1={p['k1']}"
            errs.append(f"{label}q={q} g={g} k1={p['k1']} {guarded(chk, tag, one, backend, i, tag):.1e}")
        print(f"  rerank {backend:<6} max|delta| " + "  ".join(errs), flush=True)

    _, qd, gd = data[0]
    q, g = cases[0][1:3]

    def from_blocks(tag):  # the distance-block entry (the sparse torch pipeline on the device)
        blocks = [torch.cdist(a, b) for a, b in ((qd, gd), (qd, qd), (gd, gd))]
        ref = rerank_from_distances_ref(*(b.cpu() for b in blocks))
        out = fmn.rerank_from_distances(*blocks)
        sync(device)
        return rerank_matches(chk, tag, out, ref)

    tag = f"rerank_from_distances {device.type} q={q} g={g}"
    print(f"  {tag}  max|delta| {guarded(chk, tag, from_blocks, tag):.1e}", flush=True)


# ----------------------------------------------------------------------------------------------
# profiling (ncu) and its table
# ----------------------------------------------------------------------------------------------
def run_profile(chk: Checker, backends, device, shape, labels_path: str | None) -> None:
    """One launch per (backend, dtype, layout, pass) at the benchmark shape, in a fixed order;
    the labels file names each launch of a mask kernel in that order (ncu numbers them alike)."""
    import torch

    import fmn
    from fmn_kernels import spatial_mask_mul_ref

    B, C, H, W = shape
    labels = []
    for backend in backends:
        if not check_backend(chk, "spatial_mask_mul", backend, device):
            continue
        for dname in ("fp32", "bf16"):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
            for lay in ("contiguous", "channels_last"):
                tag = f"{backend} {dname} {lay}"
                f = layout(torch.randn(B, C, H, W, device=device).to(dtype), lay)
                u = torch.randn(B, H * W, device=device).to(dtype)
                grad = layout(torch.randn(B, C, H, W, device=device).to(dtype), lay)
                ref = spatial_mask_mul_ref(f.double(), u.double())
                for f_grad in (True, False):
                    fi, ui = f.detach().requires_grad_(f_grad), u.detach().requires_grad_(True)
                    sync(device)
                    out = fmn.spatial_mask_mul(fi, ui, backend=backend)
                    labels.append(f"{tag} fwd")
                    got = grads(out, (fi, ui) if f_grad else (ui,), grad)
                    labels.append(f"{tag} bwd {'df+du' if f_grad else 'du only'}")
                    sync(device)
                    chk.close(f"profile {tag} out", out, ref, TOL[dname])
                    chk.true(f"profile {tag} grads finite", all(bool(torch.isfinite(g).all()) for g in got), "NaN/inf")
                print(f"  profile {tag} {B}x{C}x{H}x{W}: done", flush=True)
    if labels_path:
        with open(labels_path, "w") as fh:
            fh.write("\n".join(labels) + "\n")


def kernel_regex() -> str:
    """ncu -k regex (with --kernel-name-base demangled) for the mask op's CUDA and Triton kernels."""
    from triton.runtime.jit import KernelInterface  # JITFunction, or InterpretedFunction under TRITON_INTERPRET

    from fmn_kernels.triton import feature_mask as tfm

    names = sorted(n for n, obj in vars(tfm).items() if isinstance(obj, KernelInterface))
    return ".*fmn::cuda::.*|^(" + "|".join(names) + ")$"


def _number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return float("nan")


# ncu's unit names (full and short) -> factor to seconds / bytes / 1
_SCALE = {"nsecond": 1e-9, "ns": 1e-9, "usecond": 1e-6, "us": 1e-6, "msecond": 1e-3, "ms": 1e-3,
          "second": 1.0, "s": 1.0, "byte": 1.0, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9,
          "kb": 1e3, "mb": 1e6, "gb": 1e9, "kibyte": 2**10, "mibyte": 2**20, "gibyte": 2**30}
# quantity -> metric names (raw name as asked with --metrics, then the section's display name)
_METRICS = {
    "time": ("gpu__time_duration.sum", "Duration"),
    "read": ("dram__bytes_read.sum",),
    "write": ("dram__bytes_write.sum",),
    "dram_pct": ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "DRAM Throughput"),
    "occ": ("sm__warps_active.avg.pct_of_peak_sustained_active", "Achieved Occupancy"),
    "th_occ": ("sm__maximum_warps_per_active_cycle_pct", "Theoretical Occupancy"),
    "regs": ("launch__registers_per_thread", "Registers Per Thread"),
}


def read_ncu_csv(path: str) -> list[dict]:
    """Kernels of an ncu CSV, in profiling order: {"name", "grid", "block", "m": {metric: value}},
    values scaled to seconds and bytes. Reads the wide form (``--page raw --csv``: one row per
    kernel, a units row under the header) and the long form (``--page details --csv``: one row per
    metric with "Metric Name", "Metric Unit", "Metric Value"); lines before the header are skipped."""
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r]
    start = next((i for i, r in enumerate(rows) if r[0] == "ID"), None)
    if start is None:
        return []
    col = {name: i for i, name in enumerate(rows[start])}
    cell = lambda r, name: r[col[name]] if name in col and col[name] < len(r) else ""  # noqa: E731
    kernels: dict[str, dict] = {}
    long_form = "Metric Name" in col and "Metric Value" in col
    units: dict[str, str] = {}
    for r in rows[start + 1:]:
        if not r[0].strip().isdigit():
            if not kernels and not long_form:
                units = {name: r[i] for name, i in col.items() if i < len(r)}
            continue
        k = kernels.setdefault(r[0], {"name": cell(r, "Kernel Name"), "grid": cell(r, "Grid Size"),
                                      "block": cell(r, "Block Size"), "m": {}})
        pairs = ([(cell(r, "Metric Name"), cell(r, "Metric Unit"), cell(r, "Metric Value"))] if long_form
                 else [(name, units.get(name, ""), r[i]) for name, i in col.items() if i < len(r)])
        for name, unit, value in pairs:
            if name and name not in k["m"]:
                k["m"][name] = _number(value) * _SCALE.get(unit.strip().lower(), 1.0)
    return [kernels[i] for i in sorted(kernels, key=int)]


def short_kernel_name(name: str) -> str:
    """'void fmn::cuda::(anonymous namespace)::fwd<float, (int)4>(Args, long)' -> 'fwd<float,4>'."""
    for junk in ("void ", "(anonymous namespace)::", "fmn::cuda::", "(int)", "(bool)", " "):
        name = name.replace(junk, "")
    depth = 0
    for i, ch in enumerate(name):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def ncu_table(csv_path: str, labels_path: str | None) -> int:
    """Print one row per profiled kernel: launch label, kernel, grid, block, time, DRAM bytes,
    GB/s, DRAM throughput (% of peak), achieved and theoretical occupancy (%), registers."""
    kernels = read_ncu_csv(csv_path)
    labels = []
    if labels_path and os.path.exists(labels_path):
        labels = [line.strip() for line in open(labels_path) if line.strip()]

    def get(k, what):
        for name in _METRICS[what]:
            if name in k["m"]:
                return k["m"][name]
        return float("nan")

    print(f"{'#':>3}  {'launch':<34} {'kernel':<36} {'grid':>14} {'block':>12} {'time us':>9} "
          f"{'DRAM MB':>8} {'GB/s':>7} {'DRAM %':>7} {'occ %':>6} {'th.occ %':>8} {'regs':>5}")
    for i, k in enumerate(kernels):
        short = short_kernel_name(k["name"])
        t, nbytes = get(k, "time"), get(k, "read") + get(k, "write")
        print(f"{i:>3}  {labels[i] if i < len(labels) else '?':<34} {short[:36]:<36} {k['grid']:>14} {k['block']:>12} "
              f"{t * 1e6:>9.1f} {nbytes / 1e6:>8.1f} {nbytes / t / 1e9:>7.0f} {get(k, 'dram_pct'):>7.1f} "
              f"{get(k, 'occ'):>6.1f} {get(k, 'th_occ'):>8.1f} {get(k, 'regs'):>5.0f}")
    if labels and len(labels) != len(kernels):
        print(f"note: {len(kernels)} profiled kernels but {len(labels)} labelled launches, so the labels may be "
              "off (a kernel launched more or fewer times than expected, or --launch-count too small)")
    if not kernels:
        print(f"ncu-table: no profiled kernel in {csv_path}")
    return 0 if kernels else 1


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--only", choices=["mask", "rerank"], default=None, help="run one of the two parts")
    p.add_argument("--profile", action="store_true", help="one launch per kernel at the benchmark shape (for ncu)")
    p.add_argument("--profile-shape", default="64,256,64,32", help="B,C,H,W of --profile")
    p.add_argument("--labels", default=None, help="--profile: write the launch labels here; --ncu-table: read them")
    p.add_argument("--kernel-regex", action="store_true", help="print the ncu -k regex of the mask kernels and exit")
    p.add_argument("--ncu-table", metavar="CSV", default=None,
                   help="summarise an ncu CSV (raw or details page) and exit")
    a = p.parse_args(argv)
    if a.ncu_table:
        return ncu_table(a.ncu_table, a.labels)

    import torch

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    if a.kernel_regex:
        print(kernel_regex())
        return 0
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: --device cuda but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, torch.version.cuda={torch.version.cuda})")
        return 1
    torch.manual_seed(0)
    chk = Checker()
    t0 = time.perf_counter()
    kernel_backends = [device.type, "triton"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_sanitize: device {device} ({name}), torch {torch.__version__}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}", flush=True)
    if a.profile:
        shape = tuple(int(v) for v in a.profile_shape.split(","))
        run_profile(chk, kernel_backends, device, shape, a.labels)
    else:
        if a.only in (None, "mask"):
            run_mask(chk, kernel_backends, device)
        if a.only in (None, "rerank"):
            # CUDA: the Triton pipeline and the torch one on the GPU; CPU: the C++ and the Triton one
            run_rerank(chk, ["triton", "torch"] if device.type == "cuda" else ["cpu", "triton"], device)
    sync(device)
    status = "FAILED" if chk.failed else "ok"
    print(f"gpu_sanitize: {status}: {chk.n} checks, {len(chk.failed)} failed, "
          f"{time.perf_counter() - t0:.1f} s on {device.type}", flush=True)
    for line in chk.failed[:20]:
        print(f"  {line}")
    return 1 if chk.failed else 0


if __name__ == "__main__":
    sys.exit(main())
