"""MMGA, MGRAN, PMM and the seed trainer on bad or unusual input: part masks that are missing, misshapen or at
another resolution; option validation; the training log, mismatched checkpoints and non-finite
weights in the seed trainer."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fmn.checkpoint import CheckpointError, load_checkpoint
from fmn.data import build_dataset
from fmn.data.parts import PART_CHANNELS, part_index
from fmn.data.synthetic import generate
from fmn.models import build_model

H, W = 64, 32
TINY = dict(backbone="resnet18", base_width=8, input_size=(H, W), bnneck=True)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name, **kw):
    torch.manual_seed(0)
    return build_model(name, 4, **dict(TINY, **kw))


def _batch(parts_hw=(H, W), channels=len(PART_CHANNELS), n=4):
    torch.manual_seed(1)
    return {"img": torch.randn(4, 3, H, W), "pid": torch.tensor([0, 0, 1, 1]),
            "parts": torch.rand(n, channels, *parts_hw)}


# ------------------------------------------------------------------------------ part masks
@pytest.mark.parametrize("name", ["mmga", "mgran"])
def test_missing_part_masks_are_one_clear_error(name):
    model = _model(name).train()
    batch = _batch()
    del batch["parts"]
    with pytest.raises(ValueError, match=rf"{name}: training needs the loader's part masks \(batch\['parts'\]\)"):
        model.loss(model(batch["img"], batch=batch), batch)


@pytest.mark.parametrize("name", ["mmga", "mgran"])
@pytest.mark.parametrize("bad", ["channels", "batch", "3d"])
def test_misshapen_part_masks_are_one_clear_error(name, bad):
    model = _model(name).train()
    batch = _batch(channels=3) if bad == "channels" else _batch(n=2) if bad == "batch" else _batch()
    if bad == "3d":
        batch["parts"] = batch["parts"][:, 0]
    with pytest.raises(ValueError, match=rf"{name}: batch\['parts'\] must be \(B=4, 6, H, W\) with channels body"):
        model.loss(model(batch["img"], batch=batch), batch)


def test_mgran_resizes_masks_of_another_resolution_before_binarising():
    model = _model("mgran").train()
    batch = _batch(parts_hw=(H // 2, W // 2))
    masks = model.region_masks(batch["img"], batch, None)
    chans = part_index(model.regions)
    expect = (F.interpolate(batch["parts"][:, chans], size=(H, W), mode="bilinear", align_corners=False)
              >= 0.5).float()
    assert masks.shape == (4, len(chans), H, W) and torch.equal(masks, expect)
    loss, stats = model.loss(model(batch["img"], batch=batch), batch)
    assert torch.isfinite(loss) and "mask" in stats
    # the predictor's target is the same resized, binarised mask
    out = model(batch["img"], batch=batch)
    ref = F.binary_cross_entropy_with_logits(out["mask_logits"], expect)
    torch.testing.assert_close(model.loss(out, batch)[1]["mask"], ref.detach())


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("name, options, message", [
    ("pmm", dict(batch_drop="maybe"), "batch_drop must be true or false"),
    ("pmm", dict(mix_block=0.5), "mix_block must be two fractions"),
    ("pmm", dict(mix_prob="high"), "mix_prob must be a number"),
    ("pmm", dict(attention="gradcam"), "attention must be one of cam, energy"),
    ("pmm", dict(mix_grid=[0, 4]), r"mix_grid must be two integers >= 1 \(patch rows, patch columns\)"),
    ("pmm", dict(mix_top_k=0), "mix_top_k must be an integer >= 1"),
    ("pmm", dict(soft_margin="yes"), "soft_margin must be true or false"),
    ("mmga", dict(attention_weight=-1.0), "attention_weight must be a number >= 0"),
    ("mmga", dict(part_dim=1.5), "part_dim must be an integer >= 1"),
    ("mgran", dict(mask_weight=-1.0), "mask_weight must be a number >= 0"),
    ("mgran", dict(mask_weight=0.0), "mask_weight=0 leaves the mask predictor untrained"),
    ("mgran", dict(mask_width=0), "mask_width must be an integer >= 1"),
    ("mgran", dict(threshold="half"), "threshold must be a number"),
])
def test_bad_options_are_one_clear_error(name, options, message):
    with pytest.raises(ValueError, match=f"{name}: {message}"):
        _model(name, **options)


def test_a_single_stage_or_region_name_is_one_name():
    assert _model("mmga", scales="layer4").scales == ("layer4",)
    assert _model("mgran", regions="body").regions == ("body",)
    # mask_weight=0 is fine where no mask predictor is used
    assert _model("mgran", alignment="part", mask_weight=0.0).mask_predictor is None


# ------------------------------------------------------------------------------ seed trainer
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("seed_checks") / "synth")
    generate(root, num_ids=8, num_cams=2, images_per_id_per_cam=2, height=H, width=W, progress=False)
    return build_dataset("synthetic", root)


def _cfg(synth, out, *extra):
    from fmn.config import load_config

    over = [f"data.root={synth.root}", f"output.dir={out}", f"data.height={H}", f"data.width={W}",
            "data.batch_size=8", "data.num_instances=2", "data.cache=false", "data.workers=0",
            "train.progress=false", "train.stage1.epochs=1", "train.max_steps_per_epoch=1", "train.device=cpu",
            "model.backbone=resnet18", "model.base_width=8", *extra]
    return load_config(None, over, model="pmm")


def _log_lines(out):
    with open(os.path.join(out, "train_log.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_train_log_is_rewritten_from_the_checkpoint_history(synth, tmp_path):
    from fmn.engine import train as train_seed_model

    train_seed_model(_cfg(synth, tmp_path), resume=False, log=None)
    train_seed_model(_cfg(synth, tmp_path), resume=False, log=None)
    assert [r["epoch"] for r in _log_lines(tmp_path)] == [1]          # a fresh run does not append
    # an epoch logged but killed before its checkpoint was written is not logged twice on resume
    with open(tmp_path / "train_log.jsonl", "a") as fh:
        fh.write(json.dumps({"stage": 1, "epoch": 2, "lr": 0.1}) + "\n")
    summary = train_seed_model(_cfg(synth, tmp_path, "train.stage1.epochs=2"), log=None)
    assert _log_lines(tmp_path) == summary["history"] and [r["epoch"] for r in summary["history"]] == [1, 2]


def test_checkpoint_of_another_configuration_is_a_checkpoint_error(synth, tmp_path):
    from fmn.engine import load_model, train as train_seed_model

    train_seed_model(_cfg(synth, tmp_path), log=None)
    with pytest.raises(CheckpointError, match=r"last\.pt was written for a different model.*pmm\.batch_drop: "
                                              r"False -> True"):
        train_seed_model(_cfg(synth, tmp_path, "train.stage1.epochs=2", "pmm.batch_drop=true"), log=None)
    with pytest.raises(CheckpointError, match=r"model\.pt was written for a different model.*heads\.bdb"):
        load_model(str(tmp_path / "model.pt"), overrides=["pmm.batch_drop=true"])


def test_non_finite_weights_are_never_checkpointed(synth, tmp_path, monkeypatch):
    from fmn.engine import train as train_seed_model
    from fmn.engine.runtime import NonFiniteLossError

    step = torch.optim.SGD.step
    calls = []

    def poisoned(self, *a, **kw):
        result = step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 2:                         # the one step of epoch 2 overflows a weight
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.SGD, "step", poisoned)
    with pytest.raises(NonFiniteLossError, match="epoch 2: weights are not finite"):
        train_seed_model(_cfg(synth, tmp_path, "train.stage1.epochs=2"), log=None)
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model.pt").exists()
    assert [r["epoch"] for r in _log_lines(tmp_path)] == [1]


def test_pmm_backbone_stage_options_are_one_clear_error():
    """PMM's stages are heads on layer4 mixed inside the heads: the options that placed classifiers
    and mixes on backbone stages are refused by name, not ignored."""
    for options in (dict(stages=["layer2", "layer3"]), dict(mix_stages=["layer2", "layer3"]),
                    dict(stage_start_epochs=[0, 0, 0])):
        with pytest.raises(ValueError, match=rf"pmm: option\(s\) {next(iter(options))} no longer exist"):
            _model("pmm", **options)
    # the mixes are those of heads 2 and 3, also with the batch-drop head
    model = _model("pmm", batch_drop=True).train()
    batch = _batch()
    out = model(batch["img"], batch=batch)
    assert sorted(out["mix"]) == ["stage2", "stage3"]
    assert sorted(out["logits"]) == ["bdb", "stage1", "stage2", "stage3"]
