"""Benchmark of the fused feature-mask op (FMN's mixing network).

    python bench/mixer.py                      # the default shapes for this device
    python bench/mixer.py --B 64 --C 64 256 --HW 64x32 56x56 --M 2048 --dtype fp32 bf16
    python bench/mixer.py --csv results.csv    # also append the rows to a CSV
    python bench/mixer.py --gemm-forms         # also each fused backend with the plain addmm GEMM

Compares FusedFeatureMask (every kernel backend available here) with eager PyTorch
(``f * exp(relu(g @ W + b)).view(B, 1, H, W)`` with autograd) and with ``torch.compile`` of that
reference, for forward, backward and forward+backward, each including the mask GEMM. bf16 runs
under torch.autocast, as a model would. Reports median times, the ratio to eager and to
torch.compile, the bytes the fused op must move (forward: read f, write o, read W; backward: read
do and f, write df when f needs grad, read W, write dW) as GB/s and as a percentage of the
measured device-to-device copy bandwidth, and the peak memory of forward+backward beyond the
inputs (tensor storage: the CUDA allocator's counters, or on CPU the allocator's events under the
profiler; see fmn_kernels/profiling.py), with the output alive through the backward as in a model.
On CPU the fused module also takes the transposed GEMM forms of fmn_kernels/mask_linear.py;
``--gemm-forms`` adds each fused backend with the plain addmm, to show the two gains apart.

CPU times include first-touch page faults of freshly allocated outputs whenever glibc has handed
heap memory back to the system; they make CPU runs spread widely. To time the kernels alone, keep
the heap:

    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184:glibc.malloc.top_pad=268435456 python bench/mixer.py
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fmn_kernels import FusedFeatureMask, backend as fmn_backend  # noqa: E402
from fmn_kernels.feature_mask import spatial_mask_mul  # noqa: E402
from fmn_kernels.mask_linear import mask_linear_ref  # noqa: E402
from fmn_kernels.profiling import peak_allocated_bytes  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def eager_mixer(f, g, weight, bias):
    B, _, H, W = f.shape
    return f * torch.exp(torch.relu(g @ weight + bias)).view(B, 1, H, W)


class Timer:
    """Median wall time of callables: CUDA events on a GPU, perf_counter on CPU. ``interleaved``
    times several callables round-robin, in an order that rotates each round, so that a drift in
    machine load hits them alike. A callable may be a pair (setup, run): setup runs untimed before
    each run."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps

    def _once(self, fn) -> float:
        if isinstance(fn, tuple):
            setup, fn = fn
            setup()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def interleaved(self, fns: dict) -> dict:
        for fn in fns.values():
            for _ in range(self.warmup):
                self._once(fn)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        times = {name: [] for name in fns}
        names = list(fns)
        for rep in range(self.reps):
            for k in range(len(names)):  # a rotating order: no callable always follows the same one
                name = names[(rep + k) % len(names)]
                times[name].append(self._once(fns[name]))
        return {name: statistics.median(t) for name, t in times.items()}

    def __call__(self, fn) -> float:
        return self.interleaved({"fn": fn})["fn"]


def copy_bandwidth(numel: int, dtype: torch.dtype, device: torch.device, timer: Timer) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    src = torch.randn(numel, device=device).to(dtype)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * numel * src.element_size() / t


def make_steps(fn_module, f, g, amp_dtype, device, scope=contextlib.nullcontext):
    """Closures (forward, backward, forward+backward, peak bytes of forward+backward) of one
    implementation; each runs inside ``scope()`` (the Triton tile override of --triton-tiles)."""
    ctx = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else None

    def forward():
        if ctx is None:
            return fn_module(f, g)
        with ctx():
            return fn_module(f, g)

    params = [p for p in (g, f) if p.requires_grad] + list(fn_module.parameters())

    def forward_only():
        with torch.no_grad():
            forward()

    grad = torch.randn_like(forward())
    graph = {}

    # The backward runs on a fresh graph each time (its forward untimed): torch.compile's backward
    # may donate saved buffers, which rules out retain_graph.
    def new_graph():
        graph["out"] = forward()

    def backward_only():
        torch.autograd.grad(graph.pop("out"), params, grad)

    def fwd_bwd():
        torch.autograd.grad(forward(), params, grad)

    def peak():
        fwd_bwd()
        return peak_allocated_bytes(fwd_bwd, device)

    def scoped(fn):
        def run():
            with scope():
                return fn()
        return run

    return (scoped(forward_only), (scoped(new_graph), scoped(backward_only)), scoped(fwd_bwd), scoped(peak))


class Eager(torch.nn.Module):
    def __init__(self, mixer):
        super().__init__()
        self.weight, self.bias = mixer.weight, mixer.bias

    def forward(self, f, g):
        return eager_mixer(f, g, self.weight, self.bias)


class FusedPlainGemm(torch.nn.Module):
    """The fused mask kernel after the plain ``addmm`` (no transposed GEMM forms): separates the
    gain of the kernel from the gain of fmn_kernels/mask_linear.py."""

    def __init__(self, mixer, backend):
        super().__init__()
        self.weight, self.bias, self.backend = mixer.weight, mixer.bias, backend

    def forward(self, f, g):
        u = mask_linear_ref(g, self.weight, self.bias)
        return spatial_mask_mul(f, u, "exp_relu", backend=self.backend)


def parse_tiles(text: str, parser: argparse.ArgumentParser):
    """'32x128x4' -> (32, 128, 4): channels, positions, warps of the Triton tiles."""
    try:
        bc, bp, nw = (int(v) for v in text.lower().split("x"))
    except ValueError:
        parser.error(f"--triton-tiles: expected CxPxW such as 32x128x4; got {text!r}")
    return bc, bp, nw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--B", type=int, nargs="+", default=None, help="batch sizes (GPU 64, CPU 32)")
    p.add_argument("--C", type=int, nargs="+", default=None, help="channels (GPU 64 256, CPU 64)")
    p.add_argument("--HW", nargs="+", default=None, help="HxW list (GPU 64x32 56x56, CPU 64x32)")
    p.add_argument("--M", type=int, default=2048, help="global feature size")
    p.add_argument("--dtype", nargs="+", default=None, choices=sorted(DTYPES), help="GPU fp32 bf16, CPU fp32")
    p.add_argument("--no-f-grad", action="store_true", help="f does not require grad (FMN stage 2)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--gemm-forms", action="store_true",
                   help="also time each fused backend with the plain addmm mask GEMM")
    p.add_argument("--backends", nargs="+", default=None, help="fused backends (default: all available)")
    p.add_argument("--channels-last", action="store_true", help="local features in channels_last (as AMP training)")
    p.add_argument("--triton-tiles", nargs="+", default=None, metavar="CxPxW",
                   help="also time the Triton kernels with tiles of C channels x P positions and W warps "
                        "each, e.g. 32x128x4 16x256x8, or 'sweep' for the candidates of the layout "
                        "(a tuning sweep; GPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--csv", default=None, help="append the rows to this CSV file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    Bs = args.B or ([64] if gpu else [32])
    Cs = args.C or ([64, 256] if gpu else [64])
    HWs = [tuple(int(v) for v in s.lower().split("x")) for s in (args.HW or (["64x32", "56x56"] if gpu else ["64x32"]))]
    dtypes = args.dtype or (["fp32", "bf16"] if gpu else ["fp32"])
    timer = Timer(device, args.warmup or (10 if gpu else 3), args.reps or (100 if gpu else 15))
    if args.backends:
        backends = args.backends
    else:
        backends = [b for b in fmn_backend.available("spatial_mask_mul", device)
                    if device.type == "cuda" or b != "triton"]  # Triton's CPU interpreter is no fast path
    if not backends:
        print("fmn: no kernel backend is available on this device; comparing the torch reference only")
        backends = ["torch"]
    tile_specs = []
    if args.triton_tiles:
        if not fmn_backend.triton_runs_on(device.type):
            p.error(f"--triton-tiles: the Triton kernels do not run on {device.type} here "
                    "(a CUDA device, or TRITON_INTERPRET=1 on CPU)")
        from fmn_kernels.triton.feature_mask import SWEEP_TILES, tiles as triton_tiles
        for text in args.triton_tiles:
            if text == "sweep":
                tile_specs += SWEEP_TILES["channel" if args.channels_last else "plane"]
            else:
                tile_specs.append(parse_tiles(text, p))
        for spec in tile_specs:
            try:
                triton_tiles(*spec)
            except ValueError as exc:
                p.error(f"--triton-tiles: {exc}")

    dev_name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# bench/mixer.py  {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  device: {dev_name}  "
          f"torch {torch.__version__}  f requires grad: {not args.no_f_grad}  "
          f"layout: {'channels_last' if args.channels_last else 'contiguous'}")
    header = ("impl", "dtype", "B", "C", "HxW", "fwd ms", "bwd ms", "f+b ms", "f+b vs eager", "f+b vs compile",
              "fwd GB/s", "fwd %copy", "bwd GB/s", "bwd %copy", "peak MB")
    rows = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        amp = None if dtype == torch.float32 else dtype
        for B in Bs:
            for C in Cs:
                for H, W in HWs:
                    torch.manual_seed(0)
                    f = torch.randn(B, C, H, W, device=device, dtype=dtype)
                    if args.channels_last:
                        f = f.contiguous(memory_format=torch.channels_last)
                    f.requires_grad_(not args.no_f_grad)
                    g = torch.randn(B, args.M, device=device, dtype=dtype, requires_grad=True)
                    mixer = FusedFeatureMask(args.M, (H, W)).to(device)

                    def copy_of(b=None):
                        m = FusedFeatureMask(args.M, (H, W), backend=b).to(device)
                        m.load_state_dict(mixer.state_dict())
                        return m

                    # Every implementation gets its own weights and inputs, so that none runs on
                    # data its predecessor in the round-robin left in the cache.
                    none = contextlib.nullcontext
                    impls = [("eager", Eager(copy_of()), none)]
                    if not args.no_compile:
                        impls.append(("compile", torch.compile(Eager(copy_of())), none))
                    for b in backends:
                        impls.append((f"fused[{b}]", copy_of(b), none))
                        if args.gemm_forms:
                            impls.append((f"fused[{b}]+addmm", FusedPlainGemm(copy_of(b), b), none))
                    for bc, bp, nw in tile_specs:
                        impls.append((f"fused[triton {bc}x{bp} w{nw}]", copy_of("triton"),
                                      lambda t=(bc, bp, nw): triton_tiles(*t)))
                    bw = copy_bandwidth(f.numel(), dtype, device, timer)
                    # Bytes the fused op must move: the feature passes plus the GEMM's weight traffic
                    # (forward reads W; backward reads W for dg and writes dW).
                    n_bytes = f.numel() * f.element_size()
                    w_bytes = mixer.weight.numel() * mixer.weight.element_size()
                    fwd_bytes = 2 * n_bytes + w_bytes
                    bwd_bytes = (3 if not args.no_f_grad else 2) * n_bytes + 2 * w_bytes
                    steps = {name: make_steps(mod, f.detach().clone().requires_grad_(f.requires_grad),
                                              g.detach().clone().requires_grad_(True), amp, device, scope)
                             for name, mod, scope in impls}
                    t_fwd = timer.interleaved({n: s[0] for n, s in steps.items()})
                    t_bwd = timer.interleaved({n: s[1] for n, s in steps.items()})
                    t_both = timer.interleaved({n: s[2] for n, s in steps.items()})
                    peaks = {n: s[3]() for n, s in steps.items()}
                    results = {n: (t_fwd[n], t_bwd[n], t_both[n], peaks[n]) for n in steps}
                    del steps
                    for name, (tf, tb, tfb, peak) in results.items():
                        vs_eager = results["eager"][2] / tfb
                        vs_comp = results["compile"][2] / tfb if "compile" in results else float("nan")
                        rows.append((name, dname, B, C, f"{H}x{W}", tf * 1e3, tb * 1e3, tfb * 1e3, vs_eager, vs_comp,
                                     fwd_bytes / tf / 1e9, 100 * fwd_bytes / tf / bw,
                                     bwd_bytes / tb / 1e9, 100 * bwd_bytes / tb / bw,
                                     peak / 2**20 if peak is not None else float("nan")))
                    print(f"  {dname} B={B} C={C} {H}x{W}: copy bandwidth {bw / 1e9:.1f} GB/s, "
                          f"one feature tensor {n_bytes / 2**20:.1f} MB, W {w_bytes / 2**20:.1f} MB", flush=True)

    widths = [max(len(h), 9) for h in header]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        cells = [c if isinstance(c, str) else (str(c) if isinstance(c, int) else f"{c:.3f}") for c in r]
        print("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    if args.csv:
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as fh:
            w = csv.writer(fh)
            if new:
                w.writerow(("date", "device", "f_requires_grad") + header)
            for r in rows:
                w.writerow((datetime.now(timezone.utc).isoformat(timespec="seconds"), dev_name, not args.no_f_grad) + r)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
