"""Bad command-line input gives one clear line on stderr and exit status 2, never a traceback;
outputs land where documented, whole. On a tiny synthetic dataset and tiny trained models."""
import json
import os

import numpy as np
import pytest
import torch

from fmn import cli
from fmn.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--set", "model.base_width=8", "--set", "data.height=64", "--set", "data.width=32",
        "--set", "data.batch_size=8", "--set", "data.workers=0", "--set", "train.progress=false",
        "--set", "train.max_steps_per_epoch=2", "--set", "train.stage1.epochs=1",
        "--set", "eval.flip=false", "--set", "model.backbone=resnet18"]


def one_error(capsys, command):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fmn {command}: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    assert main(["synth", "--out", str(data), "--ids", "8", "--cams", "2", "--images-per-cam", "2"]) == 0
    fmn_run, seed_run = root / "fmn", root / "mmga"
    assert main(["train", *TINY, "--set", "train.stage2.epochs=1", "--data-root", str(data),
                 "--output", str(fmn_run)]) == 0
    assert main(["train", "--model", "mmga", *TINY, "--data-root", str(data), "--output", str(seed_run)]) == 0
    return {"root": root, "data": data, "fmn": fmn_run / "model.pt", "mmga": seed_run / "model.pt"}


def test_synth_bad_arguments(runs, tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "a"), "--ids", "1"]) == 2
    assert "synth.num_ids=1" in one_error(capsys, "synth")
    assert main(["synth", "--out", str(tmp_path / "a"), "--seed", "-1"]) == 2
    assert "synth.seed=-1" in one_error(capsys, "synth")
    assert main(["synth", "--out", str(runs["data"]), "--ids", "2"]) == 2
    assert "output folder exists" in one_error(capsys, "synth")
    (tmp_path / "file").write_text("x")
    assert main(["synth", "--out", str(tmp_path / "file"), "--ids", "2"]) == 2
    assert "is a file" in one_error(capsys, "synth")


def test_fmn_debug_shows_the_traceback(runs, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    argv = ["synth", "--out", str(tmp_path / "file"), "--ids", "2"]
    assert main(argv) == 2
    capsys.readouterr()
    monkeypatch.setenv("FMN_DEBUG", "1")
    with pytest.raises(cli.UsageError, match="is a file"):
        main(argv)


def test_train_bad_inputs(runs, tmp_path, capsys):
    data = str(runs["data"])
    # 4 training identities cannot fill a PK batch of 16 / 2 = 8 identities
    assert main(["train", *TINY, "--set", "data.batch_size=16", "--set", "data.num_instances=2",
                 "--data-root", data, "--output", str(tmp_path / "r")]) == 2
    assert "identities" in one_error(capsys, "train")
    assert main(["train", *TINY, "--set", "data.name=bogus", "--data-root", data,
                 "--output", str(tmp_path / "r")]) == 2
    assert "unknown dataset 'bogus'" in one_error(capsys, "train")
    (tmp_path / "file").write_text("x")
    assert main(["train", *TINY, "--data-root", data, "--output", str(tmp_path / "file" / "run")]) == 2
    assert "is a file" in one_error(capsys, "train")
    # an FMN output folder holds an FMN last.pt: another model kind says so
    assert main(["train", "--model", "pmm", *TINY, "--data-root", data,
                 "--output", str(runs["fmn"].parent)]) == 2
    assert "last.pt was written for a different model" in (err := one_error(capsys, "train")) \
        and "model.name: 'fmn' -> 'pmm'" in err
    # conflicting flags: --model against --set model.name or another method's config file
    assert main(["train", "--model", "mmga", "--set", "model.name=pmm", *TINY, "--data-root", data]) == 2
    assert "--model mmga conflicts with --set model.name=pmm" in one_error(capsys, "train")
    assert main(["train", "--model", "fmn", "--config", "mmga", *TINY]) == 2
    assert "conflicts with --config" in one_error(capsys, "train")
    if not torch.cuda.is_available():
        for model in ([], ["--model", "mmga"]):
            assert main(["train", *model, *TINY, "--data-root", data, "--device", "cuda",
                         "--output", str(tmp_path / "r")]) == 2
            assert "CUDA is not available" in one_error(capsys, "train")
    assert not (tmp_path / "r").exists()


def test_eval_checkpoint_problems(runs, tmp_path, capsys):
    ck = str(runs["fmn"])
    # architecture-defining overrides: one error naming what differs
    assert main(["eval", "--checkpoint", ck, "--set", "data.height=128", "--no-rerank"]) == 2
    assert "different model" in one_error(capsys, "eval")
    # a setting that changes no tensor shape is refused as well
    assert main(["eval", "--checkpoint", ck, "--set", "model.last_stride=1", "--no-rerank"]) == 2
    assert "model settings that differ (checkpoint -> now): model.last_stride: 2 -> 1" in one_error(capsys, "eval")
    assert main(["eval", "--checkpoint", str(runs["mmga"]), "--set", "model.base_width=16", "--no-rerank"]) == 2
    assert "different model" in one_error(capsys, "eval")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "dict.pt")]) == 2
    assert "not a checkpoint written by `fmn train`" in one_error(capsys, "eval")
    # --json that cannot be a file: refused before the features are computed
    assert main(["eval", "--checkpoint", ck, "--json", str(tmp_path)]) == 2
    assert "is a folder" in one_error(capsys, "eval")
    assert main(["eval", "--checkpoint", ck, "--json", os.path.join(ck, "r.json")]) == 2
    assert "is a file, not a folder" in one_error(capsys, "eval")
    if not torch.cuda.is_available():
        assert main(["eval", "--checkpoint", ck, "--device", "cuda"]) == 2
        assert "CUDA is not available" in one_error(capsys, "eval")


def test_eval_without_checkpoint_reads_the_config_output_dir(runs, capsys):
    # README: `fmn eval --config FILE --set data.root=...` after `fmn train --config FILE`
    run = runs["fmn"].parent
    assert main(["eval", "--output", str(run), "--no-rerank"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert set(json.loads((run / "results.json").read_text())["results"]) == {"GRN", "LAN", "FMN"}
    assert not [f for f in os.listdir(run) if f.startswith(".tmp")]


def test_visualize_other_model_kind_and_bad_counts(runs, tmp_path, capsys):
    out = tmp_path / "vis"
    assert main(["visualize", "--checkpoint", str(runs["mmga"]), "--out", str(out), "--queries", "50"]) == 0
    assert "need an FMN model" in capsys.readouterr().out
    from PIL import Image

    with Image.open(out / "ranked_list.png") as im:   # 8 queries although 50 were asked for
        assert im.size[1] == 8 * (128 + 8 + 20)
    assert not (out / "heatmaps.png").exists()
    for flag in ("--queries", "--cases"):
        with pytest.raises(SystemExit) as exc:
            main(["visualize", "--checkpoint", str(runs["fmn"]), flag, "0"])
        assert exc.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["visualize", "--checkpoint", str(runs["fmn"]), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in one_error(capsys, "visualize")


def test_rerank_bad_files_and_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    q, g = torch.randn(4, 8), torch.randn(12, 8)
    torch.save(q, tmp_path / "q.pt")
    np.save(tmp_path / "g.npy", g.numpy())
    args = ["rerank", "--query", str(tmp_path / "q.pt"), "--gallery", str(tmp_path / "g.npy")]

    (tmp_path / "text.pt").write_text("not a tensor file")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    torch.save({"q": q}, tmp_path / "dict.pt")
    torch.save(torch.randn(4, 5), tmp_path / "d5.pt")
    torch.save(torch.empty(0, 8), tmp_path / "empty.pt")
    cases = [
        (["--query", str(tmp_path / "missing.pt")], "feature file not found"),
        (["--query", str(tmp_path / "text.pt")], "cannot read features from"),
        (["--query", str(tmp_path / "obj.npy")], "cannot read features from"),
        (["--query", str(tmp_path / "dict.pt")], "must hold one tensor"),
        (["--query", str(tmp_path / "d5.pt")], "expected (q, d) and (g, d)"),
        (["--query", str(tmp_path / "empty.pt")], "holds no features"),
        (["--k1", "0"], "--k1 must be >= 1"),
        (["--lambda-value", "1.5"], "--lambda-value must lie in [0, 1]"),
        (["--topk", "13"], "--topk must lie in 1..12"),
        (["--out", str(tmp_path)], "is a folder"),
        (["--out", str(tmp_path / "q.pt" / "d.pt")], "is a file, not a folder"),
    ]
    for extra, message in cases:
        argv = args + ["--out", str(tmp_path / "d.pt")] + extra
        if "--query" in extra:   # the later --query wins in argparse
            argv = ["rerank", "--gallery", str(tmp_path / "g.npy"), "--out", str(tmp_path / "d.pt")] + extra
        assert main(argv) == 2, extra
        assert message in one_error(capsys, "rerank"), extra
    assert not (tmp_path / "d.pt").exists()

    # outputs: missing folders created; .npy, .npz and .pt as documented; no temporary files left
    assert main(args + ["--out", str(tmp_path / "new" / "d.npy"), "--k1", "4", "--k2", "2"]) == 0
    assert np.load(tmp_path / "new" / "d.npy").shape == (4, 12)
    assert main(args + ["--out", str(tmp_path / "d.npz"), "--k1", "4", "--k2", "2"]) == 0
    assert np.load(tmp_path / "d.npz")["dist"].shape == (4, 12)
    assert main(args + ["--out", str(tmp_path / "t.npy"), "--k1", "4", "--k2", "2", "--topk", "3"]) == 0
    with np.load(tmp_path / "t.npz") as z:
        assert z["values"].shape == (4, 3) and z["indices"].shape == (4, 3)
    assert main(args + ["--out", str(tmp_path / "t.pt"), "--k1", "4", "--k2", "2", "--topk", "3"]) == 0
    assert torch.load(tmp_path / "t.pt", weights_only=True)["indices"].shape == (4, 3)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_results_json_is_written_atomically(tmp_path, monkeypatch):
    from fmn.engine import commands
    from fmn.engine.evaluation import write_json

    class DS:
        name, root, query, gallery = "synthetic", "x", [1], [1]

    cfg = {"data": {"height": 64, "width": 32}, "eval": {"flip": False, "alpha": 0.5, "rerank": False}}
    path = tmp_path / "results.json"
    write = lambda results: write_json(str(path), commands._payload(DS, cfg, results, 1.0, None))
    write({"FMN": {"mAP": 1.0}})
    before = path.read_text()

    import fmn.atomic

    def broken_fsync(fd):             # the text is in the temporary file, the disk fails
        raise OSError("disk full")

    monkeypatch.setattr(fmn.atomic.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write({"FMN": {"mAP": 2.0}})
    assert path.read_text() == before and json.loads(before)["results"]["FMN"]["mAP"] == 1.0
    assert os.listdir(tmp_path) == ["results.json"]


def test_files_that_torch_cannot_load_are_named_without_torchs_advice(runs, tmp_path, capsys):
    # torch's weights-only message advises weights_only=False; fmn never loads that way.
    (tmp_path / "data.csv").write_text("path,pid,camid,split\na.jpg,1,0,train\n")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    q = tmp_path / "q.pt"
    torch.save(torch.randn(3, 4), q)
    expected = {"data.csv": "not a file written by torch.save", "module.pt": "save a state_dict instead",
                "empty.pt": "the file is empty"}
    for name, words in expected.items():
        path = str(tmp_path / name)
        for command, args in (("rerank", ["--query", str(q), "--gallery", path, "--out", str(tmp_path / "o.pt")]),
                              ("eval", ["--checkpoint", path, "--no-rerank"])):
            assert main([command, *args]) == 2
            err = one_error(capsys, command)
            assert path in err and words in err and "weights_only=False" not in err, err


def test_a_folder_given_as_a_checkpoint_says_so(runs, tmp_path, capsys):
    folder = str(runs["fmn"].parent)
    assert main(["eval", "--checkpoint", folder, "--no-rerank"]) == 2
    err = one_error(capsys, "eval")
    assert "a folder; expected a checkpoint file" in err and str(runs["fmn"]) in err


def test_a_missing_pretrained_file_fails_before_the_data_is_read(tmp_path, capsys):
    missing = str(tmp_path / "resnet50.pth")
    for model in ([], ["--model", "mmga"]):
        # the data root does not exist either: the pretrained path is checked first
        assert main(["train", *model, *TINY, "--data-root", str(tmp_path / "nodata"), "--set", "data.name=market1501",
                     "--pretrained", missing, "--output", str(tmp_path / "r")]) == 2
        err = one_error(capsys, "train")
        assert f"model.pretrained: {missing}: checkpoint not found" in err, err
    assert not (tmp_path / "r").exists()
