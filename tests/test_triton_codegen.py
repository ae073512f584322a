"""The Triton kernels through Triton's real compiler for Hopper (sm_90) and Ampere (sm_80), no GPU
needed: the interpreter that runs them on CPU elsewhere in the suite accepts code that the
compiler rejects, and shows nothing of registers or spills.

Each kernel is compiled with the specialisation its launcher gets for the layouts that matter
(NCHW: unit spatial stride; channels_last: unit channel stride; 16-byte aligned pointers and
strides divisible by 16), and its resource usage is read back from the cubin: the specialised
mask kernels must not spill to local memory. The generic strided case (no unit stride) must
compile too. The compiles run in a subprocess without TRITON_INTERPRET (which the suite sets
on machines without CUDA, and which turns every @triton.jit function into an interpreted one).
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

C, P = 256, 64 * 32        # FMN's pool1 map at 256x128 input, the benchmark's channel count
MASK_OPERANDS = {"fwd": ("f", "g", "o"), "bwd": ("do", "f", "g", "df", "dg")}
SPILL_CASES = [(dt, layout, direction, mix, need_df)
               for dt in ("fp32", "bf16", "fp16") for layout in ("nchw", "channels_last")
               for direction, mix, need_df in (("fwd", False, False), ("fwd", True, False), ("bwd", False, True),
                                               ("bwd", False, False), ("bwd", True, True))]
OTHER_CASES = ["sm80_fwd", "sm80_bwd", "strided_fwd", "strided_bwd", "pair_sqdist", "jaccard_overlap"]
# Every tile of the tuning sweep (SWEEP_TILES), fp32 and bf16, forward and backward with df.
try:
    from fmn_kernels.triton.feature_mask import SWEEP_TILES
except ImportError:                                   # no triton: the fixture skips every case
    SWEEP_TILES = {"plane": [], "channel": []}
TILE_CASES = [(dt, layout, direction, bc, bp, nw)
              for dt in ("fp32", "bf16") for layout, key in (("nchw", "plane"), ("channels_last", "channel"))
              for direction in ("fwd", "bwd") for bc, bp, nw in SWEEP_TILES[key]]


def _name(case) -> str:
    return "-".join(str(x) for x in case)


# ---------------------------------------------------------------------------------------------
# The compiling side (run in a subprocess: `python tests/test_triton_codegen.py`)
def _compile(fn, types: dict, consts: dict, div16: list, arch: int, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16 if n not in consts}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _mask_kernel(direction, dtype, layout, mix, need_df, arch, tiles=None):
    """Compile the mask kernel as fmn_kernels/triton/feature_mask.py launches it (with its default
    tiles, or ``tiles`` = (BLOCK_C, BLOCK_P, num_warps))."""
    import triton.language as tl
    from fmn_kernels.triton import feature_mask as tfm

    fn = tfm._spatial_mask_mul_fwd if direction == "fwd" else tfm._spatial_mask_mul_bwd
    operands = MASK_OPERANDS[direction]
    types = {n: "i32" for n in fn.arg_names}
    for name in operands:
        types[f"{name}_ptr"] = f"*{dtype}"
    types["u_ptr"] = f"*{dtype}"                      # logits in the input's dtype (autocast)
    if direction == "bwd":
        types["du_ptr"] = f"*{dtype}"
    types["max_logit"] = "fp32"
    block_c, block_p, num_warps = tiles or (*tfm._blocks(C, P, layout == "channels_last"), 4)
    consts = dict(ACT=0, HAS_MAX=False, MIX=mix, ACC=tl.float32, BLOCK_C=block_c, BLOCK_P=block_p)
    if direction == "bwd":
        consts.update(NEED_DF=need_df, NEED_DG=mix)
    unit = {"nchw": "sp", "channels_last": "sc", "strided": None}[layout]
    if unit is not None:
        for name in operands:
            consts[f"{name}_{unit}"] = 1             # Triton specialises a stride equal to 1
    div16 = [n for n in fn.arg_names if n.endswith("_ptr")] + ["C", "P"]
    div16 += [f"{name}_s{x}" for name in operands for x in "bcp"] if unit is not None else []
    return _compile(fn, types, consts, div16, arch, num_warps=num_warps)


def _rerank_kernel(name):
    from fmn_kernels.triton import rerank as trr

    if name == "pair_sqdist":
        return _compile(trr._pair_sqdist_kernel,
                        dict(x_ptr="*fp32", rows_ptr="*i64", cols_ptr="*i64", out_ptr="*fp32",
                             n_pairs="i32", d="i32", stride_x="i32"),
                        dict(BLOCK_P=32, BLOCK_D=128), ["x_ptr", "rows_ptr", "cols_ptr", "out_ptr"], 90, 4)
    return _compile(trr._jaccard_overlap_kernel,
                    dict(s_ptr="*fp32", qcols_ptr="*i64", qvals_ptr="*fp32", ptr_ptr="*i64", item_ptr="*i64",
                         ival_ptr="*fp32", r0="i32", width="i32", g="i32", n="i32"),
                    dict(BLOCK=64), ["s_ptr", "qcols_ptr", "qvals_ptr", "ptr_ptr", "item_ptr", "ival_ptr"], 90, 2)


def _usage(kernel, cuobjdump, tmp) -> dict:
    """{'REG': n, 'STACK': bytes, 'SHARED': bytes, 'LOCAL': bytes} from cuobjdump -res-usage."""
    path = os.path.join(tmp, "k.cubin")
    with open(path, "wb") as fh:
        fh.write(kernel.asm["cubin"])
    out = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot read the resource usage from: {out[:300]}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))


def _emit(tmp: str) -> dict:
    """{case name: usage dict or {'error': text}} for every case."""
    import triton.backends.nvidia as nv

    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    cuobjdump = cuobjdump if os.path.exists(cuobjdump) else shutil.which("cuobjdump")
    jobs = {_name(c): (lambda c=c: _mask_kernel(c[2], c[0], c[1], c[3], c[4], 90)) for c in SPILL_CASES}
    jobs.update({_name(c): (lambda c=c: _mask_kernel(c[2], c[0], c[1], False, True, 90, c[3:]))
                 for c in TILE_CASES})
    jobs.update({
        "sm80_fwd": lambda: _mask_kernel("fwd", "bf16", "nchw", False, False, 80),
        "sm80_bwd": lambda: _mask_kernel("bwd", "bf16", "nchw", False, True, 80),
        "strided_fwd": lambda: _mask_kernel("fwd", "fp32", "strided", True, False, 90),
        "strided_bwd": lambda: _mask_kernel("bwd", "fp32", "strided", True, True, 90),
        "pair_sqdist": lambda: _rerank_kernel("pair_sqdist"),
        "jaccard_overlap": lambda: _rerank_kernel("jaccard_overlap"),
    })
    results = {}
    for name, job in jobs.items():
        try:
            kernel = job()
            results[name] = _usage(kernel, cuobjdump, tmp) if cuobjdump else {"cubin": len(kernel.asm["cubin"])}
        except Exception as exc:  # reported per case by the tests
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    return results


# ---------------------------------------------------------------------------------------------
# The tests
@pytest.fixture(scope="module")
def codegen(tmp_path_factory):
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    tmp = str(tmp_path_factory.mktemp("cubin"))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), tmp], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_compiled_without_spills(usage: dict) -> None:
    assert "error" not in usage, usage.get("error")
    if "STACK" not in usage:
        pytest.skip("no cuobjdump: compiled, resource usage not read")
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"spills: {usage}"
    assert usage["REG"] <= 255


@pytest.mark.parametrize("case", SPILL_CASES, ids=_name)
def test_mask_kernels_compile_for_sm90_without_spills(codegen, case):
    _assert_compiled_without_spills(codegen[_name(case)])


@pytest.mark.parametrize("case", TILE_CASES, ids=_name)
def test_sweep_tiles_compile_for_sm90_without_spills(codegen, case):
    """The tiles bench/mixer.py --triton-tiles sweep launches on the GPU."""
    _assert_compiled_without_spills(codegen[_name(case)])


def test_sweep_starts_with_the_default_tiles():
    pytest.importorskip("triton")
    from fmn_kernels.triton.feature_mask import _blocks

    assert SWEEP_TILES["plane"][0] == (*_blocks(C, P, False), 4)
    assert SWEEP_TILES["channel"][0] == (*_blocks(C, P, True), 4)


@pytest.mark.parametrize("case", OTHER_CASES)
def test_other_kernels_compile(codegen, case):
    """sm_80, the generic strided case (spills allowed there) and the re-ranking kernels."""
    assert "error" not in codegen[case], codegen[case].get("error")


if __name__ == "__main__":
    print(json.dumps(_emit(sys.argv[1])))
