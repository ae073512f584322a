"""bench/evaluate.py: small sizes end to end, how the baseline is timed, the agreement check, flags."""
from __future__ import annotations

import csv

import pytest
import torch

from conftest import load_bench


@pytest.fixture
def bench():
    return load_bench("evaluate")


def test_a_gallery_smaller_than_markets_distractors_runs_and_appends_one_header(bench, tmp_path, capsys):
    # The fixed 2,798 distractors made any --gallery below that a crash in the data generator.
    out = tmp_path / "eval.csv"
    argv = ["--queries", "60", "--gallery", "400", "--repeats", "1", "--ref-queries", "20", "--csv", str(out)]
    bench.main(argv)
    bench.main(argv)
    assert "60x400" in capsys.readouterr().out
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:3] == ["device", "dtype", "shape"] and len(rows) == 3
    assert rows[1][2] == rows[2][2] == "60x400" and int(rows[1][-1]) > 0


def test_market_like_keeps_market_proportions(bench):
    dist, q_pids, g_pids, q_cams, g_cams = bench.market_like(50, 1591)
    assert dist.shape == (50, 1591)
    assert int((g_pids == 0).sum()) == round(2798 * 1591 / 15913)
    assert 0 < int(g_pids.max()) <= 75


def test_the_baseline_is_timed_after_a_warm_up_as_a_median(bench, monkeypatch):
    # The speed-up divides the baseline's time by evaluate's median after warm-up; one cold run of
    # the baseline flattered evaluate.
    calls = []
    reference = bench.evaluate_reference

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return reference(*args, **kwargs)

    monkeypatch.setattr(bench, "evaluate_reference", counted)
    bench.main(["--queries", "40", "--gallery", "3000", "--repeats", "4", "--ref-queries", "10"])
    assert len(calls) >= 5 and all(tuple(s) == (10, 3000) for s in calls)


def test_disagreement_with_the_reference_is_an_error_even_under_python_O(bench, monkeypatch):
    evaluate = bench.evaluate

    def off_by_a_little(*args, **kwargs):
        cmc, mAP, valid = evaluate(*args, **kwargs)
        return cmc, mAP + 1e-3, valid

    monkeypatch.setattr(bench, "evaluate", off_by_a_little)
    with pytest.raises(SystemExit, match="evaluate and evaluate_reference disagree"):
        bench.main(["--queries", "40", "--gallery", "3000", "--repeats", "1", "--ref-queries", "10"])


@pytest.mark.parametrize("flag", ["--ref-queries", "--repeats", "--queries"])
def test_non_positive_sizes_are_one_clear_error(bench, capsys, flag):
    argv = {"--queries": "40", "--gallery": "3000", "--repeats": "1", "--ref-queries": "10"}
    argv[flag] = "0"
    with pytest.raises(SystemExit) as exc:
        bench.main([x for kv in argv.items() for x in kv])
    assert exc.value.code == 2
    assert f"{flag} must be >= 1" in capsys.readouterr().err


def test_features_mode_times_both_paths_checks_them_and_reports_peak_memory(bench, tmp_path, capsys, monkeypatch):
    import fmn.metrics as M

    # Distance blocks of 4 rows: the chunked path holds 4 x 900 distances, the dense one 120 x 900.
    monkeypatch.setitem(M._DIST_BLOCK_ELEMS, "cpu", 4 * 900)
    out = tmp_path / "features.csv"
    argv = ["--features", "8", "--queries", "120", "--gallery", "900", "--repeats", "1", "--chunk-size", "2",
            "--csv", str(out)]
    bench.main(argv)
    printed = capsys.readouterr().out
    assert "120x900x8" in printed and "dense" in printed and "chunked" in printed
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == ["dense", "chunked"] and rows[1]["chunk"] == "2"
    assert rows[0]["mAP"] == rows[1]["mAP"] and rows[0]["valid"] == rows[1]["valid"]
    dense_mb, chunked_mb = float(rows[0]["peak_MB"]), float(rows[1]["peak_MB"])
    assert dense_mb >= 120 * 900 * 4 / 2 ** 20 > 2 * chunked_mb > 0
    # The distance-matrix mode's rows do not go into this file (other columns).
    with pytest.raises(SystemExit, match="holds columns"):
        bench.main(["--queries", "40", "--gallery", "400", "--repeats", "1", "--ref-queries", "10", "--csv", str(out)])


def test_features_mode_disagreement_is_an_error(bench, monkeypatch):
    chunked = bench.evaluate_from_features

    def off_by_a_little(*args, **kwargs):
        cmc, mAP, valid = chunked(*args, **kwargs)
        return cmc, mAP + 1e-15, valid

    monkeypatch.setattr(bench, "evaluate_from_features", off_by_a_little)
    with pytest.raises(SystemExit, match="evaluate_from_features and the dense path disagree"):
        bench.main(["--features", "8", "--queries", "40", "--gallery", "300", "--repeats", "1"])


def test_market_like_features_are_unit_vectors_with_market_ids(bench):
    qf, gf, q_pids, g_pids, q_cams, g_cams = bench.market_like_features(30, 1591, 16)
    assert qf.shape == (30, 16) and gf.shape == (1591, 16) and qf.dtype == torch.float32
    assert torch.allclose(gf.norm(dim=1), torch.ones(1591))
    assert torch.equal(g_pids, bench.market_ids(30, 1591, g=torch.Generator().manual_seed(0))[1])
    # Same-identity pairs are nearer than others on average.
    d = torch.cdist(qf, gf)
    same = q_pids[:, None] == g_pids[None, :]
    assert d[same].mean() < d[~same].mean() - 0.1


@pytest.mark.parametrize("argv, msg", [(["--features", "0"], "--features must be >= 1"),
                                       (["--features", "8", "--chunk-size", "0"], "--chunk-size must be >= 1"),
                                       (["--chunk-size", "4"], "--chunk-size goes with --features")])
def test_features_flags(bench, capsys, argv, msg):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv + ["--queries", "40", "--gallery", "300"])
    assert exc.value.code == 2 and msg in capsys.readouterr().err
