"""bench/evaluate.py: small sizes end to end, how the baseline is timed, the agreement check, flags."""
from __future__ import annotations

import csv

import pytest

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
