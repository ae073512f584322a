"""The fmn CLI: help, config validation errors, and a tiny synth -> train -> eval -> visualize ->
rerank run on the synthetic dataset."""
import json
import os

import pytest
import torch
import yaml

from fmn.cli import main
from fmn.config import DEFAULTS, ConfigError, load_config
from fmn.metrics import euclidean_distance, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("demo", "synth", "train", "eval", "rerank", "visualize", "--set", "torchrun"):
        assert cmd in text
    for cmd in ("demo", "synth", "train", "eval", "rerank", "visualize"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, "--help"])
        assert exc.value.code == 0


@pytest.mark.parametrize("name", ["market1501", "dukemtmc", "cuhk03", "demo", "scratch"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(name)
    assert cfg["model"]["name"] == "fmn"


def test_paper_settings_are_the_defaults():
    cfg = load_config(None)
    t = cfg["train"]
    assert cfg["model"]["backbone"] == "resnet50" and cfg["fmn"]["local_layer"] == "pool1"
    assert t["momentum"] == 0.9 and t["stage1"]["lr"] == 0.1 and t["stage1"]["milestones"] == [20]
    assert t["stage2"]["lr"] == 0.1 and t["stage2"]["milestones"] == [35]
    assert cfg["eval"]["alpha"] == 0.5 and (cfg["data"]["height"], cfg["data"]["width"]) == (256, 128)


@pytest.mark.parametrize("name", ["market1501", "dukemtmc", "cuhk03"])
def test_paper_configs_hold_the_paper_settings(name):
    """DESIGN §6: ResNet-50, mask on pool1, SGD momentum 0.9, stage 1 lr 0.1 -> 0.01 after 20 epochs,
    stage 2 (cross-entropy + ranking loss) lr 0.1 -> 0.01 after 35, flip + random crop; eq. (6) alpha
    0.5; nothing that is not in the paper (no triplet, no mask clamp, LAN from the backbone)."""
    cfg = load_config(name)
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    assert cfg["data"]["name"] == name and cfg["output"]["dir"] == f"runs/{name}"
    f = cfg["fmn"]
    assert (m["backbone"], f["local_layer"], f["mask_max_logit"], f["lan_init"]) == ("resnet50", "pool1", None, "backbone")
    assert (d["height"], d["width"], d["augment"], d["erase_p"]) == (256, 128, True, 0.0)
    assert t["momentum"] == 0.9 and t["triplet_weight"] == 0.0 and t["rank_weight"] > 0
    for stage, step in (("stage1", 20), ("stage2", 35)):
        sc = t[stage]
        assert sc["lr"] == 0.1 and sc["milestones"] == [step] and sc["gamma"] == 0.1 and sc["epochs"] > step
    assert cfg["eval"]["alpha"] == 0.5
    if name == "cuhk03":   # the comment says detected boxes by default
        assert d["options"] == {"labeled": False}


@pytest.mark.parametrize("override,message", [
    ("train.stage1.lr=-0.1", "train.stage1.lr=-0.1 is invalid: expected a number > 0"),
    ("fmn.local_layer=res5", "expected one of pool1, res2, res3, res4"),
    ("model.backbone=vgg16", "expected one of resnet18, resnet34, resnet50, resnet101"),
    ("data.batch_size=30", "a multiple of data.num_instances"),
    ("train.stage2.milestones=[40, 10]", "increasing list"),
    ("train.amp=fp8", "train.amp='fp8' is invalid"),
    ("train.lr=0.1", "unknown config key 'train.lr'"),
    ("eval.alpha=1.5", "eval.alpha=1.5 is invalid"),
    ("data.height=abc", "expected an integer >= 32"),
    ("nonsense", "must look like key.sub=value"),
])
def test_bad_overrides_give_clear_errors(override, message, capsys):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert message in str(exc.value)
    assert main(["train", "--set", override]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and message in err


def test_bad_config_files(tmp_path, capsys):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("model:\n  backbone: resnet50\n  maskk: 3\n")
    with pytest.raises(ConfigError, match="bad_key.yaml: unknown config key 'model.maskk'"):
        load_config(bad_key)
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(not_yaml)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


TINY = [
    "model.backbone=resnet18", "model.base_width=8", "fmn.lan_init=grn",
    "data.name=synthetic", "data.height=64", "data.width=32", "data.batch_size=8", "data.num_instances=2",
    "data.workers=0", "data.cache=true",
    "train.stage1={epochs: 1, lr: 0.05, milestones: [1], gamma: 0.1}",
    "train.stage2={epochs: 1, lr: 0.05, milestones: [1], gamma: 0.1}",
    "train.max_steps_per_epoch=3", "train.progress=false", "eval.batch_size=64", "eval.flip=false",
    "synth.num_ids=12", "synth.num_cams=2", "synth.images_per_id_per_cam=2",
]


def test_synth_train_eval_visualize_rerank(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    sets = [a for s in TINY for a in ("--set", s)]
    assert main(["synth", "--out", str(data), *sets]) == 0
    assert os.path.isfile(data / "synthetic.json")

    assert main(["train", *sets, "--data-root", str(data), "--output", str(run)]) == 0
    ck = run / "model.pt"
    state = torch.load(ck, weights_only=True)
    assert state["stage"] == 2 and state["config"]["model"]["base_width"] == 8
    assert (run / "train_log.jsonl").read_text().count("\n") == 2

    assert main(["eval", "--checkpoint", str(ck), "--json", str(run / "res.json")]) == 0
    res = json.loads((run / "res.json").read_text())["results"]
    assert {"GRN", "LAN", "FMN"} <= set(res)
    assert all(0.0 <= res[k]["mAP"] <= 100.0 for k in res)
    out = capsys.readouterr().out
    assert "FMN" in out and "mAP" in out

    # --save-features: the descriptors fmn rerank reads, which give the FMN rows again
    feats = run / "feats"
    assert main(["eval", "--checkpoint", str(ck), "--json", str(run / "res_f.json"),
                 "--save-features", str(feats)]) == 0
    assert json.loads((run / "res_f.json").read_text())["results"] == res
    images = json.loads((feats / "images.json").read_text())
    q, g = (torch.load(feats / f"{n}.pt", weights_only=True) for n in ("query", "gallery"))
    assert q.dtype == torch.float32 and q.shape[0] == len(images["query"]) and g.shape[0] == len(images["gallery"])
    (qp, qc), (gp, gc) = ((torch.tensor([r[1] for r in images[n]]), torch.tensor([r[2] for r in images[n]]))
                          for n in ("query", "gallery"))
    assert all(os.path.isfile(r[0]) for n in ("query", "gallery") for r in images[n])
    _, m_ap, _ = evaluate(euclidean_distance(q, g), qp, gp, qc, gc)
    assert 100 * m_ap == pytest.approx(res["FMN"]["mAP"], abs=1e-4)
    assert main(["rerank", "--query", str(feats / "query.pt"), "--gallery", str(feats / "gallery.pt"),
                 "--out", str(run / "rr.pt")]) == 0
    _, m_ap, _ = evaluate(torch.load(run / "rr.pt", weights_only=True), qp, gp, qc, gc)
    assert 100 * m_ap == pytest.approx(res["FMN+RR"]["mAP"], abs=1e-4)
    (run / "afile").write_text("x")
    assert main(["eval", "--checkpoint", str(ck), "--save-features", str(run / "afile")]) == 2
    assert "--save-features" in capsys.readouterr().err

    # --config takes every section but the model from another file, a related method's file too
    assert main(["eval", "--checkpoint", str(ck), "--config", "mmga",
                 "--set", f"data.root={data}", "--set", "eval.rerank=false", "--set", "eval.flip=false",
                 "--set", "train.progress=false",
                 "--json", str(run / "res_mmga.json")]) == 0
    res2 = json.loads((run / "res_mmga.json").read_text())["results"]
    assert set(res2) == {"GRN", "LAN", "FMN"}   # no re-ranked rows: eval.rerank came from the file
    assert res2["FMN"] == res["FMN"]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ck), "--config", "mmga",
                 "--set", f"data.root={tmp_path / 'nowhere'}", "--json", str(run / "res_bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmn eval: ") and "nowhere" in err and "Traceback" not in err

    (run / "broken.pt").write_bytes(ck.read_bytes()[:1000])
    assert main(["eval", "--checkpoint", str(run / "broken.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmn eval: ") and "broken.pt" in err and "Traceback" not in err

    assert main(["visualize", "--checkpoint", str(ck), "--out", str(run / "vis"), "--queries", "2",
                 "--cases", "2"]) == 0
    for png in ("ranked_list.png", "heatmaps.png"):
        assert os.path.getsize(run / "vis" / png) > 1000

    q, g = torch.randn(5, 16), torch.randn(30, 16)
    torch.save(q, tmp_path / "q.pt")
    torch.save(g, tmp_path / "g.pt")
    assert main(["rerank", "--query", str(tmp_path / "q.pt"), "--gallery", str(tmp_path / "g.pt"),
                 "--out", str(tmp_path / "d.pt"), "--k1", "6", "--k2", "3"]) == 0
    dist = torch.load(tmp_path / "d.pt", weights_only=True)
    assert dist.shape == (5, 30) and torch.isfinite(dist).all()


@pytest.mark.parametrize("name", ["mmga", "mgran", "pmm", "market1501"])
def test_synth_reads_every_shipped_config(name, tmp_path):
    out = tmp_path / "data"
    assert main(["synth", "--config", name, "--out", str(out),
                 "--ids", "3", "--cams", "2", "--images-per-cam", "1"]) == 0
    assert json.loads((out / "synthetic.json").read_text())


def test_defaults_round_trip_through_yaml(tmp_path):
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(DEFAULTS))
    assert load_config(path) == load_config(None)
