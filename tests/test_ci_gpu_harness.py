"""The GPU verification harness (.ci/gpu and its driver .ci/gpu_sanitize.py), checked where no GPU
is: what a lease on a GPU machine would otherwise find out one 600 s call at a time.

- the stage list, the argument parsing and `--dry-run` (every step's command line, nothing run);
- every bench/*.py command of the bench stage parses with that script's own argparse;
- the time plan: no stage of `all` is starved by the promises to the later ones;
- $OUT fits what the device tool brings back (8 files of 16 MiB, plain names, 2 folders deep);
- the test stage fails on any skip for want of CUDA: its pattern matches every such reason in tests/;
- the sanitize driver: its checker catches a wrong element, and its mask and re-ranking cases pass
  on CPU and reach the paths they are there for (long index columns, chunks).
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = os.path.join(ROOT, ".ci", "gpu")
STAGES = ["build", "test", "sanitize", "profile", "bench"]
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")


def harness(*args, out, env=None, timeout=120):
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", GPU, *args], capture_output=True, text=True, env=full, timeout=timeout, cwd=ROOT)


def dry_steps(stdout: str) -> list[tuple[str, int, list[str]]]:
    """(step name, timeout s, argv) of each 'DRY' line of a --dry-run."""
    steps = []
    for line in stdout.splitlines():
        m = re.match(r"^\[[^]]*\] DRY  (.*?) \(timeout (\d+)s\): (.*)$", line)
        if m:
            steps.append((m.group(1), int(m.group(2)), shlex.split(m.group(3))))
    return steps


def test_bash_syntax():
    assert subprocess.run(["bash", "-n", GPU], capture_output=True).returncode == 0


def test_usage_and_unknown_stage(tmp_path):
    ok = harness("--help", out=tmp_path)
    assert ok.returncode == 0
    for stage in STAGES + ["all", "--dry-run"]:
        assert stage in ok.stdout
    assert harness("nope", out=tmp_path).returncode == 2
    assert harness(out=tmp_path).returncode == 2


@pytest.fixture(scope="module")
def dry_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry_all")
    res = harness("--dry-run", "all", out=out)
    return res, out


def test_dry_run_all_runs_every_stage_in_order_and_starves_none(dry_all):
    res, _ = dry_all
    assert res.returncode == 0, res.stdout + res.stderr
    order = re.findall(r"== stage (\w+)", res.stdout)
    assert order == STAGES
    assert "SKIP" not in res.stdout and "skipped for time" not in res.stdout, res.stdout
    steps = dry_steps(res.stdout)
    names = [s[0] for s in steps]
    assert "pip install -e ." in names and "pytest" in names and "ncu" in names
    assert {"compute-sanitizer memcheck", "compute-sanitizer racecheck"} <= set(names)
    # CUDA work runs on the GPU: nothing is interpreted, the build asks for no index
    for _, _, argv in steps:
        assert "TRITON_INTERPRET=1" not in argv
    pip = next(argv for name, _, argv in steps if name.startswith("pip"))
    assert "--no-index" in pip and "FMN_REQUIRE_EXT=1" in pip
    # the repo is first on PYTHONPATH (bench/evaluate.py imports fmn with no path of its own)
    assert re.search(r"PYTHONPATH=" + re.escape(ROOT) + r"(:|,)", res.stdout)


def test_time_plan_keeps_the_later_stages(tmp_path):
    res = harness("--dry-run", "sanitize", "profile", out=tmp_path)
    steps = dict((name, t) for name, t, _ in dry_steps(res.stdout))
    assert steps["ncu"] >= 60
    # the first sanitizer step leaves the profile stage its share of the 570 s
    assert steps["gpu_sanitize.py (plain)"] <= 570 - 150
    res = harness("--dry-run", "build", "test", out=tmp_path, env={"FMN_GPU_DEADLINE": "200"})
    steps = dry_steps(res.stdout)
    assert all(t + 10 <= 200 for _, t, _ in steps), steps


BENCH_PARSE = r"""
import argparse, json, runpy, sys
class Parsed(Exception):
    pass
orig = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    ns = orig(self, args, namespace)
    raise Parsed(ns)
argparse.ArgumentParser.parse_args = parse_only
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        results.append("no parse")
    except Parsed:
        results.append("ok")
    except SystemExit as exc:
        results.append(f"exit {exc.code}")
print(json.dumps(results))
"""


def test_bench_commands_parse_with_the_scripts_argparse(dry_all):
    import json

    res, out = dry_all
    cmds = [argv[1:] for _, _, argv in dry_steps(res.stdout) if len(argv) > 1 and argv[1].startswith("bench/")]
    scripts = {c[0] for c in cmds}
    assert scripts == {"bench/mixer.py", "bench/rerank.py", "bench/train.py", "bench/evaluate.py"}
    assert any("--triton-tiles" in c and "--channels-last" in c for c in cmds)
    csvs = [c[c.index("--csv") + 1] for c in cmds if "--csv" in c]
    for path in csvs:  # straight under $OUT, plain names (the device tool's rules)
        assert os.path.dirname(path) == str(out) and NAME_OK.match(os.path.basename(path)), path
    tiles = [c[c.index("--csv") + 1] for c in cmds if "--triton-tiles" in c]
    assert len(set(tiles)) == len(tiles), "both layouts' sweeps in one CSV: its rows do not name the layout"
    proc = subprocess.run([sys.executable, "-c", BENCH_PARSE, json.dumps([[os.path.join(ROOT, c[0])] + c[1:]
                                                                          for c in cmds])],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == ["ok"] * len(cmds), list(zip(cmds, results))


def test_out_fits_the_device_tool(tmp_path):
    """More than 8 files: the logs go into one tar; a log over 15 MiB is cut; names stay plain."""
    for name in ("mixer.csv", "rerank.csv", "tiles.csv", "tiles_cl.csv", "_C.cpython-312-x86_64-linux-gnu.so"):
        (tmp_path / name).write_text("x\n")
    with open(tmp_path / "big.log", "wb") as fh:
        fh.write(b"y" * (17 * 1024 * 1024))
    res = harness("--dry-run", "all", out=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) <= 8, files
    for f in files:
        rel = os.path.relpath(f, tmp_path).split(os.sep)
        assert len(rel) <= 3 and all(NAME_OK.match(p) for p in rel), f
        assert os.path.getsize(f) < 16 * 1024 * 1024, f
    assert (tmp_path / "logs.tar").exists() and (tmp_path / "summary.txt").exists()
    assert (tmp_path / "_C.cpython-312-x86_64-linux-gnu.so").exists()


def _skip_reasons_in_tests() -> list[str]:
    reasons = []
    pattern = re.compile(r"""(?:reason=|pytest\.skip\()f?(["'])(.*?)\1""")
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "tests", name)) as fh:
                reasons += [m.group(2) for m in pattern.finditer(fh.read())]
    return reasons


def test_no_gpu_skip_pattern_matches_every_skip_for_want_of_cuda():
    text = open(GPU).read()
    pattern = re.search(r"^NO_GPU_SKIP='([^']*)'", text, re.M).group(1)
    rx = re.compile(pattern, re.I)
    legit_on_a_gpu = ("checks the message on a machine without CUDA", "needs two GPUs",
                      "needs 24 GiB of free GPU memory", "no cuobjdump: compiled, resource usage not read")
    for reason in _skip_reasons_in_tests() + ["got empty parameter set for (backend)", "needs /proc to name file"]:
        wants_gpu = re.search(r"cuda|gpu|triton|compiled|built|ext$|backend", reason, re.I)
        if not wants_gpu or reason in legit_on_a_gpu or reason.startswith("slow test"):
            assert not rx.search(reason), reason
        else:
            assert rx.search(reason), f"a skip for want of CUDA the test stage would let pass: {reason!r}"


# ---------------------------------------------------------------------------------------------
# the driver
@pytest.fixture(scope="module")
def san():
    sys.path.insert(0, os.path.join(ROOT, ".ci"))
    try:
        import gpu_sanitize
    finally:
        sys.path.pop(0)
    return gpu_sanitize


def test_checker_catches_one_wrong_element(san):
    chk = san.Checker()
    ref = torch.randn(40, 50, 60, dtype=torch.float64)
    got = ref.clone()
    got[1, 2, 3] += 0.05   # moves the norm by ~1e-4 only: the element check must catch it
    assert chk.close("planted", got, ref, 1e-3) < 1e-3
    assert len(chk.failed) == 1 and "(1, 2, 3)" in chk.failed[0], chk.failed
    chk.close("nan", torch.full_like(ref, float("nan")), ref, 1e-3)
    assert len(chk.failed) == 2


def test_driver_mask_cases_pass_on_cpu(san):
    from fmn_kernels import backend

    if not backend.has_compiled_kernel("spatial_mask_mul", "cpu"):
        pytest.skip("the C++ extension is not built")
    chk = san.Checker()
    dev = torch.device("cpu")
    for lay in ("contiguous", "channels_last", "channel_slice"):
        san.mask_case(chk, "cpu", "fp32", lay, (2, 16, 8, 8), dev)
    san.module_case(chk, "cpu", "bf16", "channels_last", dev, True)
    assert not chk.failed, chk.failed
    assert chk.n > 40


def test_driver_rerank_cases_reach_their_paths(san):
    """The long-column case walks index columns over 64 long (several Jaccard slices), and the
    chunked case starts S chunks at several rows."""
    import fmn

    qf, gf = san.rerank_features(5, 150, 8, 1, seed=7)
    with san.overlap_probe() as probe:
        fmn.rerank(qf, gf, backend="torch", k1=100, k2=6, lambda_value=0.3)
    assert probe.longest > 64
    qf, gf = san.rerank_features(7, 23, 16, 4, seed=7)
    with san.small_chunks(2), san.overlap_probe() as probe:
        fmn.rerank(qf, gf, backend="torch", k1=20, k2=6, lambda_value=0.3)
    assert len(set(probe.r0s)) > 2


def test_kernel_regex_names_the_cuda_and_triton_mask_kernels(san):
    pytest.importorskip("triton")
    kre = san.kernel_regex()
    assert "fmn::cuda::" in kre and "_spatial_mask_mul_fwd" in kre and "_spatial_mask_mul_bwd" in kre
