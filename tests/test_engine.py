"""The engine and its public API: layers import downward only, one run per output folder, no input
written over, a stage-1 model evaluated as GRN only, datasets without a train split evaluated,
fmn.extract_features equal to `fmn eval --save-features`, fmn.evaluate equal to results.json."""
import ast
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import fmn
from fmn.cli import main
from tests.test_cli_errors import one_error

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--set", "model.base_width=8", "--set", "data.height=64", "--set", "data.width=32",
        "--set", "data.batch_size=8", "--set", "data.workers=0", "--set", "train.progress=false",
        "--set", "train.max_steps_per_epoch=2", "--set", "train.stage1.epochs=1", "--set", "eval.batch_size=16",
        "--set", "model.backbone=resnet18", "--set", "train.device=cpu", "--set", "data.name=synthetic"]


# ------------------------------------------------------------------------------------- layers
LAYERS = {"config": 0, "data": 1, "models": 2, "engine": 3, "cli": 4}
LEAVES = {"atomic", "checkpoint", "distributed", "losses", "metrics", "metrics_sharded", "rerank"}


def _layer(module: str):
    parts = module.split(".")
    if parts[0] == "fmn_kernels":
        return "leaf"
    if parts[0] != "fmn" or len(parts) == 1:
        return None
    return "leaf" if parts[1] in LEAVES else LAYERS[parts[1]]


def _fmn_imports():
    for folder, _, files in os.walk(os.path.join(ROOT, "fmn")):
        for name in files:
            if not name.endswith(".py") or (name == "__init__.py" and folder.endswith(os.sep + "fmn")):
                continue
            path = os.path.join(folder, name)
            module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    yield module, node.module, [a.name for a in node.names]
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        yield module, a.name, []


def test_layers_import_downward_only_and_no_private_names_across_layers():
    bad = []
    for module, target, names in _fmn_imports():
        here, there = _layer(module), _layer(target)
        if there is None or here is None:
            continue
        if here == "leaf":
            ok = there == "leaf" or there == LAYERS["config"]
        else:
            ok = there == "leaf" or there <= here
        private = [n for n in names if n.startswith("_")] if there != here else []
        if not ok or private:
            bad.append(f"{module} imports {target} {private or ''}")
    assert not bad, bad
    # the checks can fail: an upward import is seen
    assert _layer("fmn.engine.api") > _layer("fmn.models.pmm") > _layer("fmn.data.parts") > _layer("fmn.config")


def test_configs_are_package_data_and_load_from_any_folder(tmp_path):
    script = "import fmn.config as c; print(sorted(c.bundled_configs())); print(c.load_config('pmm')['model']['name'])"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "'demo'" in out.stdout and out.stdout.strip().endswith("pmm")


# ------------------------------------------------------------------------ nothing lost
def test_a_second_run_into_a_locked_output_folder_is_one_error(data, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from fmn.engine.lock import output_lock
        with output_lock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["train", *TINY, "--data-root", data, "--output", str(out)]) == 2
        err = one_error(capsys, "train")
        assert str(out) in err and f"process {holder.pid}" in err and "another fmn run" in err
        tiny_synth = [a for k, v in (("num_ids", 8), ("num_cams", 2), ("images_per_id_per_cam", 2), ("height", 64),
                                     ("width", 32)) for a in ("--set", f"synth.{k}={v}")]
        assert main(["demo", *TINY, *tiny_synth, "--data-root", data, "--output", str(out)]) == 2
        assert f"process {holder.pid}" in one_error(capsys, "demo")
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "model.pt").exists()


def test_eval_refuses_to_write_over_its_inputs(trained, tmp_path, capsys):
    ck = trained[2]
    before = open(ck, "rb").read()
    assert main(["eval", "--checkpoint", ck, "--json", ck, "--no-rerank"]) == 2
    assert "would write over the input" in one_error(capsys, "eval")
    assert open(ck, "rb").read() == before
    config = tmp_path / "mine.yaml"
    config.write_text("eval: {flip: false}\n")
    assert main(["eval", "--checkpoint", ck, "--config", str(config), "--json", str(config)]) == 2
    assert "would write over the input" in one_error(capsys, "eval") and config.read_text() == "eval: {flip: false}\n"


def test_rerank_refuses_to_write_over_its_features(tmp_path, capsys):
    q, g = tmp_path / "q.pt", tmp_path / "g.pt"
    torch.save(torch.randn(4, 8), q)
    torch.save(torch.randn(9, 8), g)
    before = q.read_bytes()
    assert main(["rerank", "--query", str(q), "--gallery", str(g), "--out", str(q)]) == 2
    assert "would write over the input" in one_error(capsys, "rerank") and q.read_bytes() == before


def test_a_non_finite_loss_is_one_line_and_exit_2(data, tmp_path, capsys, monkeypatch):
    import fmn.models.fmn_net as fmn_net

    real = fmn_net.cross_entropy
    monkeypatch.setattr(fmn_net, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    assert main(["train", *TINY, "--data-root", data, "--output", str(tmp_path / "r")]) == 2
    assert "the loss is nan (not finite)" in one_error(capsys, "train")


def test_stale_temporary_checkpoints_are_removed_on_resume(data, tmp_path):
    from fmn.atomic import temporary_name

    out = tmp_path / "run"
    out.mkdir()
    stale = out / temporary_name("last.pt")
    stale.write_bytes(b"half a checkpoint")
    os.rename(stale, out / str(stale.name).replace(str(os.getpid()), "999999999"))
    assert main(["train", *TINY, "--data-root", data, "--output", str(out), "--set", "train.stage2.epochs=0"]) == 0
    assert sorted(os.listdir(out)) == [".fmn.lock", "last.pt", "model.pt", "train_log.jsonl"]


# --------------------------------------------------------------------- stages in evaluation
def test_a_stage1_checkpoint_is_evaluated_as_grn_only(trained, tmp_path, capsys):
    json_path = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", trained[1], "--json", str(json_path)]) == 0
    rows = json.loads(json_path.read_text())["results"]
    assert sorted(rows) == ["GRN", "GRN+RR"]
    assert "stage 1 only" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", trained[2], "--json", str(json_path), "--no-rerank"]) == 0
    assert sorted(json.loads(json_path.read_text())["results"]) == ["FMN", "GRN", "LAN"]
    model = fmn.load_model(trained[1])
    assert model.fmn_stage == 1 and set(model(torch.randn(2, 3, 64, 32))) == {"grn"}


def test_a_dataset_without_train_split_is_evaluated(trained, data, tmp_path):
    for split in ("query", "gallery"):
        os.makedirs(tmp_path / "tree" / split)
    for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        for name in sorted(os.listdir(os.path.join(data, folder)))[:40]:
            pid = name.split("_")[0]
            if pid.startswith("-"):
                continue
            os.makedirs(tmp_path / "tree" / split / pid, exist_ok=True)
            Image.open(os.path.join(data, folder, name)).save(tmp_path / "tree" / split / pid / name)
    json_path = tmp_path / "cross.json"
    assert main(["eval", "--checkpoint", trained[2], "--json", str(json_path), "--no-rerank",
                 "--set", "data.name=custom", "--set", f"data.root={tmp_path / 'tree'}"]) == 0
    assert json.loads(json_path.read_text())["results"]["FMN"]["valid_queries"] > 0


# ---------------------------------------------------------------------------- the public API
def test_extract_features_equals_save_features(trained, data, tmp_path):
    ck = trained[2]
    feats = tmp_path / "feats"
    assert main(["eval", "--checkpoint", ck, "--no-rerank", "--save-features", str(feats),
                 "--json", str(tmp_path / "r.json")]) == 0
    saved = torch.load(feats / "query.pt", weights_only=True)
    paths = [row[0] for row in json.loads((feats / "images.json").read_text())["query"]]
    model = fmn.load_model(ck, device="cpu")
    assert not model.training and model.fmn_config["model"]["name"] == "fmn"
    out = fmn.extract_features(model, paths, batch_size=16)
    assert out.dtype == torch.float32 and out.shape == saved.shape and torch.equal(out, saved)
    # PIL images, uint8 arrays and preprocessed tensors give the same rows (another batch size: close)
    images = [Image.open(p) for p in paths[:5]]
    arrays = [np.asarray(im.convert("RGB")) for im in images]
    torch.testing.assert_close(fmn.extract_features(model, images, batch_size=2), saved[:5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fmn.extract_features(model, arrays, batch_size=5), saved[:5], atol=1e-5, rtol=1e-5)
    from fmn.data.transforms import load_resized, to_float_normalized

    x = to_float_normalized(torch.stack([load_resized(p, 64, 32) for p in paths[:5]]))
    torch.testing.assert_close(fmn.extract_features(model, x), saved[:5], atol=1e-5, rtol=1e-5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(images):
        im.save(folder / f"{i:02d}.png")
    torch.testing.assert_close(fmn.extract_features(model, str(folder)), saved[:5], atol=1e-5, rtol=1e-5)


def test_extract_features_bad_input(trained, tmp_path):
    model = fmn.load_model(trained[2])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        fmn.extract_features(model, str(tmp_path / "empty"))
    with pytest.raises(TypeError, match="uint8"):
        fmn.extract_features(model, [np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="fmn_config"):
        fmn.extract_features(torch.nn.Linear(2, 2), torch.zeros(1, 3, 64, 32))


def test_evaluate_returns_the_rows_of_results_json(trained, data, tmp_path):
    json_path = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", trained[2], "--json", str(json_path)]) == 0
    rows = fmn.evaluate(fmn.load_model(trained[2]), progress=False)
    assert rows == json.loads(json_path.read_text())["results"]
    assert set(rows) == {"GRN", "LAN", "FMN", "GRN+RR", "LAN+RR", "FMN+RR"}


def test_checkpoints_of_earlier_versions_load(trained, tmp_path):
    """A config stored before the model sections (FMN's options in model, no health / optimizer /
    validation keys) is upgraded on load, and the weights are the same."""
    from fmn.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(trained[2])
    old = json.loads(json.dumps(state["config"]))
    old["model"].update(old.pop("fmn"))
    for key in ("optimizer", "health", "health_patience", "val_ids", "val_every", "select_best"):
        del old["train"][key]
    for key in ("parts_root", "kp_sigma"):
        del old["data"][key]
    path = tmp_path / "old.pt"
    save_checkpoint(dict(state, config=old), path)
    model = fmn.load_model(path)
    assert model.fmn_config["fmn"]["lan_init"] == old["model"]["lan_init"]
    assert model.fmn_config["train"]["optimizer"] == "sgd"
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())


def test_synth_hard_preset_from_the_command_line(tmp_path):
    out = tmp_path / "hard"
    assert main(["synth", "--preset", "hard", "--ids", "8", "--cams", "2", "--out", str(out)]) == 0
    written = json.loads((out / "synthetic.json").read_text())
    assert written["preset"] == "hard" and written["params"]["num_ids"] == 8


def test_a_synthetic_dataset_of_other_settings_is_not_reused(data, tmp_path, capsys):
    assert main(["train", *TINY, "--data-root", data, "--output", str(tmp_path / "r"),
                 "--set", "synth.num_ids=96", "--set", "synth.preset=hard"]) == 2
    err = capsys.readouterr().err
    assert "holds a synthetic dataset of other settings" in err and "num_ids: 8 there, 96 asked" in err
    assert "preset: 'default' there, 'hard' asked" in err
