"""bench/train.py: small sizes end to end, the mask backend it reports, and CUDA-only flags on CPU."""
from __future__ import annotations

import csv

import pytest
import torch

from conftest import load_bench
from fmn_kernels import backend as fb

TINY = ["--backbone", "resnet18", "--base-width", "4", "--height", "64", "--width", "32", "--batch", "4",
        "--classes", "4", "--warmup", "0", "--iters", "1", "--amp", "none", "--device", "cpu"]


@pytest.fixture
def bench():
    return load_bench("train")


def test_tiny_run_reports_the_backend_that_runs_and_appends_one_header(bench, tmp_path, capsys):
    out = tmp_path / "train.csv"
    res = bench.main(TINY + ["--backend", "torch", "--csv", str(out)])
    bench.main(TINY + ["--csv", str(out)])
    text = capsys.readouterr().out
    assert "mask backend: torch (requested torch)" in text
    assert f"mask backend: {fb.resolve('spatial_mask_mul', 'auto', torch.device('cpu'))} (requested auto)" in text
    assert res["stage1_s"] > 0 and res["stage2_s"] > 0
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][0] == "device" and len(rows) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], "--device cuda but CUDA is not available"),
    (["--backend", "cuda"], "--backend: fmn: backend 'cuda' runs on cuda tensors"),
])
def test_cuda_only_options_on_cpu_are_one_clear_error(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.main(TINY + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:fmn. backend 'triton':RuntimeWarning")
def test_a_mask_backend_that_would_fall_back_is_refused(bench, monkeypatch, capsys):
    # Timing torch's kernel under the name triton would make the row lie.
    monkeypatch.setattr(fb, "triton_runs_on", lambda device_type: False)
    with pytest.raises(SystemExit) as exc:
        bench.main(TINY + ["--backend", "triton"])
    assert exc.value.code == 2
    assert "--backend triton is not available on cpu here (it would run as torch)" in capsys.readouterr().err


def test_zero_iterations_is_one_clear_error(bench, capsys):
    argv = list(TINY)
    argv[argv.index("--iters") + 1] = "0"
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert "--iters must be >= 1" in capsys.readouterr().err
