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


# --------------------------------------------------------------------------------------------
# the scale case
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--scale", "--scale-size", "100x200"], "--scale-size must be QxGxD"),
    (["--scale", "--scale-size", "0x200x8"], "--scale-size must be QxGxD"),
    (["--scale", "--scale-procs", "1"], "--scale-procs must be >= 2"),
])
def test_bad_scale_flags_are_one_clear_error(monkeypatch, capsys, argv, message):
    mod = load_bench("rerank")
    monkeypatch.setattr(mod, "run_scale", lambda args: pytest.fail("ran"))
    monkeypatch.setattr(sys, "argv", ["rerank.py", *argv])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_stage_times_read_both_profiles():
    mod = load_bench("rerank")
    err = ("fmn::rerank knn             1.250 s\n"
           "fmn::rerank exact lists     0.100 s\n"
           "fmn.rerank[rank 1] V and QE        2.500 s  (resident 500 MB, peak 600 MB)\n"
           "unrelated 3.0 s\n")
    assert mod.stage_times(err) == {"knn": 1.25, "exact lists": 0.1, "V and QE": 2.5}


def _save_topk(folder, world, values, indices):
    import numpy as np

    for r, (v, i) in enumerate(zip(np.array_split(values, world), np.array_split(indices, world))):
        np.save(os.path.join(folder, f"values_{world}_{r}.npy"), v)
        np.save(os.path.join(folder, f"indices_{world}_{r}.npy"), i)


def test_scale_comparison_accepts_near_ties_only(tmp_path):
    import numpy as np

    mod = load_bench("rerank")
    values = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]], dtype=np.float32)
    indices = np.array([[4, 5, 6], [7, 8, 9]])
    _save_topk(tmp_path, 1, values, indices)
    tie = values.copy()
    tie[1, 2] = 0.3 + 1e-6
    _save_topk(tmp_path, 2, tie, np.array([[4, 5, 6], [7, 8, 3]]))      # item 3 ties with the 3rd value
    res = mod.compare_topk(str(tmp_path), 2)
    assert res["rank_ok"] and res["same_rows"] == 0.5 and res["max_abs_diff"] == pytest.approx(1e-6, abs=2e-7)
    _save_topk(tmp_path, 2, values, np.array([[4, 5, 6], [8, 7, 9]]))    # 0.1 and 0.2 swapped: no tie
    assert not mod.compare_topk(str(tmp_path), 2)["rank_ok"]
    worse = values.copy()
    worse[0, 2] = 0.29
    _save_topk(tmp_path, 2, worse, np.array([[4, 5, 1], [7, 8, 9]]))     # item 1 is not the single process's
    assert not mod.compare_topk(str(tmp_path), 2)["rank_ok"]


def test_scale_run_times_one_and_two_processes_and_cleans_up(tmp_path, monkeypatch, capsys):
    # A tiny scale case for real: one process (GEMM timed), two gloo processes reading their
    # slices of the same memory-mapped files, the rows compared, the feature folder removed.
    import tempfile

    mod = load_bench("rerank")
    folder = tmp_path / "scale"
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix="": (folder.mkdir(), str(folder))[1])
    monkeypatch.setattr(sys, "argv", ["rerank.py", "--scale", "--scale-size", "40x300x8", "--timeout", "200"])
    mod.main()
    out = capsys.readouterr().out
    assert "N x N x d GEMM (340 x 340 x 8" in out
    assert "near-tie rule holds" in out
    assert not folder.exists()
    rows = [line.split() for line in out.splitlines() if line.startswith(("single ", "sharded rank "))]
    assert [r[0] for r in rows] == ["single", "sharded", "sharded"]
    assert all("knn=" in " ".join(r) for r in rows)
