"""bench/rerank.py: what each worker measures, which runs are timed, and its flags."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import load_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "rerank.py")


@pytest.fixture
def bench(monkeypatch):
    """The script as a module, with its workers replaced by a recorder of their configurations."""
    mod = load_bench("rerank")
    mod.configs = []

    def fake_worker(cfg, timeout):
        mod.configs.append(cfg)
        return dict(time_s=1.0, cpu_s=1.0, host_peak_mb=1.0, host_rise_mb=0.0,
                    dev_peak_mb=1.0 if cfg["device"] == "cuda" else None), None

    monkeypatch.setattr(mod, "run_worker", fake_worker)
    return mod


def run_main(mod, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["rerank.py", *argv])
    mod.main()
    return {c["method"]: c for c in mod.configs}


def run_worker(cfg):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, SCRIPT, "--worker", json.dumps(cfg)], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return (json.loads(lines[0][7:]) if lines else None), proc


def test_dense_baselines_are_timed_like_the_backends_where_the_case_is_small(bench, monkeypatch):
    # The ratios x numpy / x ref divide a baseline time by a backend's median after warm-up; the
    # baseline must be measured the same way, not once and cold.
    cfgs = run_main(bench, monkeypatch, "--cases", "200x1000", "--methods", "torch,numpy,reference", "--repeat", "4")
    assert set(cfgs) == {"torch", "numpy", "reference"}
    for method, cfg in cfgs.items():
        assert (cfg["warmup"], cfg["repeat"]) == (True, 4), method


def test_gpu_backends_take_the_median_of_repeats_at_every_size(bench, monkeypatch):
    # The GPU target at Market size is 10 ms: one run of it is not a measurement.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test device")
    cfgs = run_main(bench, monkeypatch, "--device", "cuda", "--cases", "market,10kx100k", "--methods", "torch",
                    "--repeat", "7")
    assert [c["repeat"] for c in bench.configs] == [7, 7]
    assert all(c["warmup"] and c["device"] == "cuda" for c in bench.configs)
    assert cfgs["torch"]["topk"] == 100


@pytest.mark.parametrize("argv, message", [
    (["--cases", "10kx100k"], "case 10kx100k is GPU only"),
    (["--cases", "200x1000,5kx5k"], "unknown case '5kx5k'"),
    (["--cases", "200x1000", "--methods", "cuda"], "unknown method 'cuda'"),
    (["--cases", "200x1000", "--repeat", "0"], "--repeat must be >= 1"),
])
def test_bad_flags_are_one_clear_error(bench, monkeypatch, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        run_main(bench, monkeypatch, *argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert bench.configs == []


def test_a_backend_that_would_fall_back_is_not_timed_under_its_name():
    # Without TRITON_INTERPRET the triton backend runs as torch on CPU tensors; its row must fail,
    # not report torch's time as triton's.
    cfg = dict(q=20, g=80, d=16, topk=None, method="triton", device="cpu", repeat=1, warmup=False, save=None)
    res, proc = run_worker(cfg)
    assert res is None
    assert "backend triton is not available on cpu here (it would run as torch)" in proc.stderr


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux clear_refs")
def test_host_rise_counts_the_run_not_the_import_peak():
    # The dense NumPy baseline at 1200 items holds N x N float32 matrices (dist, V, V_qe: 5.8 MB
    # each) and int64 ranks (11.5 MB); the import of torch peaks higher, which once hid all of it.
    cfg = dict(q=200, g=1000, d=32, topk=None, method="numpy", device="cpu", repeat=1, warmup=False, save=None)
    res, proc = run_worker(cfg)
    assert res is not None, proc.stderr
    assert res["host_rise_mb"] > 15.0
    assert res["host_peak_mb"] >= res["host_rise_mb"]
