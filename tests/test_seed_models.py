"""MMGA, MGRAN, PMM: the parts-aware loader, shapes, training signal, kernel backends against the
reference, A-Hard-Mix, the mask-file errors, configs and the seed trainer."""
import copy
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fmn.config import ConfigError
from fmn.data import build_dataset
from fmn.data.base import DatasetError
from fmn.data.masks import parts_paths
from fmn.data.parts import (PART_CHANNELS, _PartsCollate, check_parts, make_parts_train_loader, part_index,
                            render_parts)
from fmn.data.synthetic import generate
from fmn.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fmn.models import build_model
from fmn.models.mgran import stripe_masks
from fmn.models.pmm import attentive_hard_mix, negative_partners, salient_block_mask
from fmn_kernels import backend as kbackend

H, W = 64, 32
TINY = dict(backbone="resnet18", base_width=8, input_size=(H, W), bnneck=True)
MODELS = ("mmga", "mgran", "pmm")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("seed") / "synth")
    generate(root, num_ids=8, num_cams=2, images_per_id_per_cam=2, height=H, width=W, progress=False)
    return build_dataset("synthetic", root)


@pytest.fixture(scope="module")
def batch(synth):
    loader = make_parts_train_loader(synth, H, W, batch_size=8, num_instances=2, workers=0, augment=False)
    return next(iter(loader))


def _model(name, num_classes=4, **kw):
    torch.manual_seed(0)
    opts = dict(TINY)
    if name == "pmm":
        opts.update(batch_drop=True)
    opts.update(kw)
    return build_model(name, num_classes, **opts)


# ------------------------------------------------------------------------------ loader
def test_parts_batch_layout(batch):
    assert batch["img"].shape == (8, 3, H, W)
    assert batch["parts"].shape == (8, len(PART_CHANNELS), H, W)
    p = batch["parts"]
    assert p.min() >= 0 and p.max() <= 1
    body, upper, lower = (p[:, i] for i in part_index(("body", "upper", "lower")))
    # upper and lower are inside the body; every image shows some of each region
    assert torch.all(upper <= body + 1e-6) and torch.all(lower <= body + 1e-6)
    assert torch.all(p.flatten(2).amax(2) > 0.5)


def test_render_parts_matches_label_mask(synth):
    path = synth.train[0][0]
    mask = np.asarray(Image.open(parts_paths(path)[0]))
    parts = render_parts(path, mask.shape[0], mask.shape[1])
    np.testing.assert_array_equal(parts[0] > 0.5, mask > 0)
    np.testing.assert_array_equal(parts[2] > 0.5, np.isin(mask, (3, 4)))


def test_masks_follow_the_image_flip_and_crop():
    # image = body mask in every colour channel: after augmentation both must still agree
    torch.manual_seed(1)
    body = (torch.rand(6, 1, H, W) > 0.5).to(torch.uint8) * 255
    items = [(body[i].expand(3, H, W).clone(), torch.cat([body[i]] * len(PART_CHANNELS)), 0, 0, "x", i)
             for i in range(6)]
    plain = _PartsCollate(False, 0, 0.5, 4, 0.0)(items)
    aug = _PartsCollate(True, 0, 1.0, 4, 0.0)(items)
    assert not torch.equal(aug["parts"], plain["parts"])
    mean, std = IMAGENET_MEAN[0], IMAGENET_STD[0]
    img = aug["img"][:, 0] * std + mean
    inside = aug["img"][:, 0] != 0            # zero padding of the normalised image
    for c in range(len(PART_CHANNELS)):
        torch.testing.assert_close(img[inside], aug["parts"][:, c][inside], atol=1e-5, rtol=0)
        assert torch.all(aug["parts"][:, c][~inside] == 0)


def _copy_one(synth, tmp_path):
    src = synth.train[0][0]
    split = os.path.basename(os.path.dirname(src))
    dst = tmp_path / split / os.path.basename(src)
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    m, k = parts_paths(src)
    dm, dk = parts_paths(str(dst))
    os.makedirs(os.path.dirname(dm))
    shutil.copy(m, dm)
    shutil.copy(k, dk)
    return [(str(dst), 0, 0)], dm, dk


def test_missing_mask_is_a_clear_error(synth, tmp_path):
    samples, mask_path, _ = _copy_one(synth, tmp_path)
    check_parts(samples)
    os.remove(mask_path)
    with pytest.raises(DatasetError, match="missing") as err:
        check_parts(samples)
    assert mask_path in str(err.value) and "<dir>/parts/<folder>/<stem>.png" in str(err.value)
    with pytest.raises(DatasetError, match="missing"):
        make_parts_train_loader(samples * 2, H, W, batch_size=2, num_instances=1, workers=0)


def test_missized_mask_is_a_clear_error(synth, tmp_path):
    samples, mask_path, _ = _copy_one(synth, tmp_path)
    Image.fromarray(np.zeros((H // 2, W), np.uint8)).save(mask_path)
    with pytest.raises(DatasetError, match=f"{H // 2}x{W}.*{H}x{W}"):
        check_parts(samples)
    with pytest.raises(DatasetError, match="image"):
        render_parts(samples[0][0], H, W)


# ------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name", MODELS)
def test_shapes(name, batch):
    model = _model(name)
    model.train()
    out = model(batch["img"], batch=batch)
    assert all(v.shape == (8, 4) for v in out["logits"].values())
    model.eval()
    with torch.no_grad():
        ev = model(batch["img"])
    assert ev["descriptor"].shape[0] == 8
    branches = [k for k in ev if k != "descriptor"]
    assert ev["descriptor"].shape[1] == sum(ev[k].shape[1] for k in branches)
    if name == "pmm":       # the authors' descriptor: the head features concatenated, not normalised
        assert torch.equal(ev["descriptor"], torch.cat([ev[k] for k in branches], 1))
    else:
        torch.testing.assert_close(ev["descriptor"].norm(dim=1), torch.ones(8))
    expected = {"mmga": ["global", "upper", "lower"], "mgran": ["global", "body", "kp_upper", "kp_lower"],
                "pmm": ["stage1", "stage2", "stage3", "bdb"]}[name]
    assert branches == expected


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls(name, batch):
    model = _model(name, triplet_weight=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    model.train()
    losses = []
    for _ in range(8):
        torch.manual_seed(0)
        loss, stats = model.loss(model(batch["img"], batch=batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        assert np.isfinite(losses[-1])
    assert losses[-1] < 0.85 * losses[0], losses


def _backends():
    out = []
    if kbackend.has_compiled_kernel("spatial_mask_mul", "cpu"):
        out.append("cpu")
    if kbackend.triton_runs_on("cpu"):
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", MODELS)
def test_backend_matches_reference(name, backend, batch):
    if backend not in _backends():
        pytest.skip(f"backend {backend} is not available here")
    # 4 images at 32x16: the Triton interpreter runs every program in Python
    small = {"img": F.interpolate(batch["img"][:4], size=(32, 16), mode="bilinear", align_corners=False),
             "parts": F.interpolate(batch["parts"][:4], size=(32, 16), mode="bilinear", align_corners=False),
             "pid": torch.tensor([0, 0, 1, 2])}
    ref = _model(name, backend="torch", input_size=(32, 16))
    model = copy.deepcopy(ref).set_backend(backend)
    results = []
    for m in (ref, model):
        m.train()
        torch.manual_seed(3)
        out = m(small["img"], batch=small)
        loss, _ = m.loss(out, small)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
        m.eval()
        with torch.no_grad():
            ev = m(small["img"])
        results.append((loss.detach(), grads, ev))
    (l0, g0, e0), (l1, g1, e1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-5, msg=f"grad of {k}")
    for k in e0:
        torch.testing.assert_close(e1[k], e0[k], rtol=1e-4, atol=1e-5, msg=f"eval feature {k}")


# ------------------------------------------------------------------------------ A-Hard-Mix
def _brute_force_block(f, bh, bw):
    energy = f.pow(2).sum(0)
    best, where = None, None
    for y in range(f.shape[-2] - bh + 1):
        for x in range(f.shape[-1] - bw + 1):
            e = float(energy[y:y + bh, x:x + bw].sum())
            if best is None or e > best:
                best, where = e, (y, x)
    return where


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_hard_mix_replaces_the_most_salient_block(backend):
    if backend != "torch" and backend not in _backends():
        pytest.skip(f"backend {backend} is not available here")
    torch.manual_seed(0)
    B, C, h, w, bh, bw = 6, 5, 8, 6, 3, 2
    f = torch.randn(B, C, h, w)
    for b in range(B):                       # a planted salient block at a different place per sample
        y, x = b % (h - bh + 1), (2 * b) % (w - bw + 1)
        f[b, :, y:y + bh, x:x + bw] += 4.0
    pid = torch.tensor([0, 0, 1, 1, 2, 3])
    out, mask, partner = attentive_hard_mix(f, pid, (bh, bw), backend=backend)
    for b in range(B):
        y, x = _brute_force_block(f[b], bh, bw)
        assert (y, x) == (b % (h - bh + 1), (2 * b) % (w - bw + 1))
        expect = torch.zeros(h, w)
        expect[y:y + bh, x:x + bw] = 1
        assert torch.equal(mask[b], expect)
        p = int(partner[b])
        assert pid[p] != pid[b]
        inside = expect.bool()
        torch.testing.assert_close(out[b][:, inside], f[p][:, inside])
        torch.testing.assert_close(out[b][:, ~inside], f[b][:, ~inside])


def test_hard_mix_needs_another_identity():
    f = torch.randn(4, 3, 6, 4)
    with pytest.raises(ValueError, match="one identity only"):
        attentive_hard_mix(f, torch.zeros(4, dtype=torch.long), (2, 2))
    out, mask, _ = attentive_hard_mix(f, torch.zeros(4, dtype=torch.long), (2, 2), mix_prob=0.0)
    assert mask.sum() == 0 and torch.equal(out, f)
    _, valid = negative_partners(torch.tensor([1, 1, 2]))
    assert valid.tolist() == [True, True, True]


def test_salient_block_ties_take_the_first_window():
    f = torch.ones(1, 2, 4, 4)
    mask, corner = salient_block_mask(f, (2, 2))
    assert corner.tolist() == [[0, 0]] and mask[0, :2, :2].sum() == 4 and mask.sum() == 4


# ------------------------------------------------------------------------------ MGRAN, PMM specifics
def test_mgran_masks_are_binarised_at_half(batch):
    model = _model("mgran")
    model.train()
    masks = model.region_masks(batch["img"], batch, None)
    expect = (batch["parts"][:, part_index(("body", "kp_upper", "kp_lower"))] >= 0.5).float()
    assert torch.equal(masks, expect)
    model.eval()
    logits = torch.tensor([-1.0, -1e-4, 0.0, 2.0]).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    pred = model.region_masks(torch.zeros(2, 3, 1, 4), None, logits)
    assert pred[0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_mgran_part_level_alignment(batch):
    model = _model("mgran", alignment="part")
    assert model.mask_predictor is None
    stripes = stripe_masks(2, 3, H, W)
    assert torch.equal(stripes.sum(1), torch.ones(2, H, W))
    model.eval()
    with torch.no_grad():
        ev = model(batch["img"])
    assert [k for k in ev if k != "descriptor"] == ["global", "part1", "part2", "part3"]


def test_pmm_every_head_trains_from_the_start(batch):
    model = _model("pmm", batch_drop=False)
    model.train()
    assert not hasattr(model, "set_epoch")
    _, stats = model.loss(model(batch["img"], batch=batch), batch)
    assert sorted(k for k in stats if k.startswith("ce_")) == ["ce_stage1", "ce_stage2", "ce_stage3"]
    with pytest.raises(ValueError, match="stage_start_epochs no longer exist"):
        _model("pmm", stage_start_epochs=[0, 2, 4])


# ------------------------------------------------------------------------------ configs and trainer
@pytest.mark.parametrize("name", MODELS)
def test_configs_load(name):
    from fmn.config import load_config
    from fmn.models.seed_base import kwargs_from_config

    cfg = load_config(name, ["data.kp_sigma=0.2"])
    assert cfg["model"]["name"] == name and cfg["data"]["kp_sigma"] == 0.2 and name in cfg
    assert "kp_sigma" not in kwargs_from_config(name)(cfg)
    with pytest.raises(ConfigError, match=f"{name}.nope"):
        load_config(name, [f"{name}.nope=1"])
    with pytest.raises(ConfigError, match="stage2"):
        load_config(name, ["train.stage2.epochs=3"])


def test_train_resume_and_reload(synth, tmp_path):
    # PMM trains without mask files (parts_root points nowhere)
    from fmn.config import load_config
    from fmn.engine import load_model, train

    over = [f"data.root={synth.root}", f"output.dir={tmp_path}", f"data.height={H}", f"data.width={W}",
            "data.batch_size=8", "data.num_instances=2", "data.cache=false", "data.workers=0", "train.progress=false",
            "train.stage1.epochs=1", "train.max_steps_per_epoch=1", "train.device=cpu", "model.base_width=8",
            f"data.parts_root={tmp_path / 'no_masks_here'}"]
    cfg = load_config(None, over, model="pmm")
    summary = train(cfg, log=None)
    assert os.path.isfile(summary["checkpoint"]) and len(summary["history"]) == 1
    cfg2 = load_config(None, over + ["train.stage1.epochs=2"], model="pmm")
    summary2 = train(cfg2, log=None)
    assert [h["epoch"] for h in summary2["history"]] == [1, 2]
    assert all(f"ce_stage{k}" in summary2["history"][1] for k in (1, 2, 3))
    model = load_model(summary2["checkpoint"])
    x = torch.randn(2, 3, H, W)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["descriptor"], summary2["model"].eval()(x)["descriptor"])


def test_fmn_cli_dispatches_seed_models(synth, tmp_path, capsys):
    from fmn import cli

    if "--model" not in cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help():
        pytest.skip("fmn.cli train has no --model option")
    out = tmp_path / "run"
    common = ["--set", f"data.root={synth.root}", "--set", f"data.height={H}", "--set", f"data.width={W}",
              "--set", "data.batch_size=8", "--set", "data.num_instances=2", "--set", "data.workers=0",
              "--set", "data.cache=false", "--set", "train.progress=false", "--set", "model.base_width=8"]
    argv = ["train", "--model", "mgran", "--output", str(out), "--no-resume", "--set", "train.stage1.epochs=1",
            "--set", "train.max_steps_per_epoch=1"] + common
    assert cli.main(argv) == 0
    assert cli.main(["eval", "--checkpoint", str(out / "model.pt"), "--no-rerank",
                     "--set", "train.progress=false"]) == 0
    assert (out / "results.json").is_file()
    # --config: the data section of another file (here one whose root does not exist) is used
    other = tmp_path / "other.yaml"
    other.write_text(f"model: {{name: mgran}}\ndata: {{name: synthetic, root: {tmp_path / 'nowhere'}}}\n")
    assert cli.main(["eval", "--checkpoint", str(out / "model.pt"), "--config", str(other), "--no-rerank"]) == 2
    assert "nowhere" in capsys.readouterr().err
