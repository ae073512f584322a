"""PMM as its authors' code does it (fmn/models/pmm.py): the heads on a stride-1 layer4 and the
descriptor; A-Hard-Mix only inside heads 2 and 3, on the top-k patches of the previous
classifier's Grad-CAM for the true class (against the authors' procedure: a backward to the map,
the spatial mean of its gradient); partners of another identity for every PK batch; the losses
against the authors' formulas; the shipped configs; a short training run through fmn.engine."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fmn.models.pmm as pmm_module
from fmn.config import ConfigError, load_config
from fmn.data.sampler import PKSampler
from fmn.losses import cross_entropy, soft_margin_triplet
from fmn.models import build_model
from fmn.models.pmm import draw_partners, top_patch_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _pmm(num_classes=6, **kw):
    torch.manual_seed(0)
    opts = dict(backbone="resnet18", base_width=8, input_size=(64, 32), last_stride=1)
    opts.update(kw)
    return build_model("pmm", num_classes, **opts)


def _batch(n_ids=3, k=2, hw=(64, 32), seed=1):
    g = torch.Generator().manual_seed(seed)
    pid = torch.arange(n_ids).repeat_interleave(k)
    return torch.randn(n_ids * k, 3, *hw, generator=g), pid


class _MixSpy:
    """Records every ``spatial_mix(f, f_other, mask)`` call of fmn.models.pmm and its output."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = pmm_module.spatial_mix

        def spy(f, other, mask, *a, **kw):
            out = real(f, other, mask, *a, **kw)
            self.calls.append({k: v.detach().clone() for k, v in (("f", f), ("other", other), ("mask", mask),
                                                                    ("out", out))})
            return out

        monkeypatch.setattr(pmm_module, "spatial_mix", spy)


# ------------------------------------------------------------------------------ structure
def test_heads_and_descriptor_at_the_standard_width():
    model = build_model("pmm", 10, backbone="resnet50", base_width=64, input_size=(64, 32), last_stride=1)
    sd = model.state_dict()
    assert model.backbone.layer4[0].conv2.stride == (1, 1)                       # stride-1 layer4
    assert sd["heads.stage1.reduction.0.weight"].shape == (512, 2048, 1, 1)      # 1x1 conv to 512
    assert sd["heads.stage1.reduction.0.bias"].shape == (512,)
    assert sd["heads.stage1.reduction.1.running_mean"].shape == (512,)           # BatchNorm2d
    for k in ("stage2", "stage3"):
        assert sd[f"heads.{k}.reduction.0.weight"].shape == (512, 2048)           # linear to 512
        assert isinstance(model.heads[k].reduction[1], torch.nn.BatchNorm1d)
        assert sd[f"heads.{k}.classifier.weight"].shape == (10, 512)
    assert isinstance(model.heads["stage1"].reduction[1], torch.nn.BatchNorm2d)
    # one extra Bottleneck(2048, 512), shared by stages 2 and 3
    assert sd["part_block.conv1.weight"].shape == (512, 2048, 1, 1)
    assert sd["part_block.conv3.weight"].shape == (2048, 512, 1, 1)
    assert model.part_block.downsample is None
    assert sorted(model.heads) == ["stage1", "stage2", "stage3"]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 32))
    assert [k for k in out] == ["stage1", "stage2", "stage3", "descriptor"]
    assert out["descriptor"].shape == (2, 1536)


@pytest.mark.parametrize("width, batch_drop", [(8, False), (16, False), (8, True)])
def test_narrow_backbones_scale_the_heads(width, batch_drop):
    model = _pmm(base_width=width, batch_drop=batch_drop).eval()
    dim = 512 * width // 64
    x, _ = _batch()
    with torch.no_grad():
        out = model(x)
        pooled = model.backbone.layer4(model.backbone.layer3(model.backbone.layer2(model.backbone.layer1(
            model.backbone.stem(x)))))
    assert pooled.shape[-2:] == (4, 2)                                 # stride 16 at 64 x 32
    names = ["stage1", "stage2", "stage3"] + (["bdb"] if batch_drop else [])
    assert [k for k in out if k != "descriptor"] == names
    assert all(out[k].shape == (6, dim) for k in names)
    # the authors' descriptor: the features concatenated, no normalisation
    assert torch.equal(out["descriptor"], torch.cat([out[k] for k in names], 1))
    assert not torch.allclose(out["descriptor"].norm(dim=1), torch.ones(6))


def test_removed_options_are_named():
    with pytest.raises(ValueError, match="stage_start_epochs no longer exist.*all trained from the start"):
        _pmm(stage_start_epochs=[0, 1, 2])
    with pytest.raises(ConfigError, match="unknown config key 'pmm.mix_stages'"):
        load_config(None, ["pmm.mix_stages=[layer2]"], model="pmm")


# ------------------------------------------------------------------------------ where the mix happens
def test_mix_touches_only_the_chosen_patches_of_heads_2_and_3(monkeypatch):
    spy = _MixSpy(monkeypatch)
    model = _pmm()
    plain = copy.deepcopy(model)
    plain.mix_prob = 0.0
    x, pid = _batch(n_ids=3, k=2)
    seen = {}

    def hooks(m, tag):
        m.backbone.layer4.register_forward_hook(lambda mod, i, o: seen.__setitem__((tag, "layer4"), o.detach()))
        m.part_block.register_forward_hook(lambda mod, i, o: seen.__setitem__((tag, "z"), o.detach()))
        for k in ("stage1", "stage2", "stage3"):
            m.heads[k].register_forward_pre_hook(
                lambda mod, i, k=k: seen.__setitem__((tag, k), i[0].detach()))

    hooks(model, "mix")
    hooks(plain, "plain")
    out = model.train()(x, batch={"pid": pid})
    ref = plain.train()(x, batch={"pid": pid})
    assert len(spy.calls) == 2                                         # stage 2 and stage 3, nothing else
    # the backbone and the stage-1 head see clean features, bit for bit
    assert torch.equal(seen["mix", "layer4"], seen["plain", "layer4"])
    assert torch.equal(seen["mix", "stage1"], seen["plain", "stage1"])
    assert torch.equal(out["logits"]["stage1"], ref["logits"]["stage1"])
    z = seen["mix", "z"]
    assert torch.equal(z, seen["plain", "z"])
    for call, stage in zip(spy.calls, ("stage2", "stage3")):
        assert torch.equal(call["f"], z)                               # both mix the clean shared block
        mask = out["mix"][stage]
        assert torch.equal(call["mask"], mask)
        partner = out["partner"][stage]
        assert bool((pid[partner] != pid).all())
        for b in range(len(pid)):
            inside = mask[b].bool()
            assert int(inside.sum()) == model.mix_top_k                # 3 of the 8 one-cell patches
            assert torch.equal(call["out"][b][:, ~inside], z[b][:, ~inside])
            assert torch.equal(call["out"][b][:, inside], z[partner[b]][:, inside])
        # the head sees the max-pooled mixed map; without mixing it would see the clean one
        assert torch.equal(seen["mix", stage], call["out"].amax((2, 3)))
        assert torch.equal(seen["plain", stage], z.amax((2, 3)))
    assert not torch.equal(spy.calls[0]["mask"], spy.calls[1]["mask"])


def _authors_grad_cam(head, fmap, pool, pid):
    """pn.py:176-208: backward of sum_b logits[b, y_b] to the map, spatial mean of the gradient as
    channel weights, relu of the weighted sum."""
    fmap = fmap.detach().clone().requires_grad_(True)
    pooled = fmap.mean((2, 3)) if pool == "avg" else F.adaptive_max_pool2d(fmap, 1).flatten(1)
    _, logits = copy.deepcopy(head)(pooled)
    score = sum(logits[b, pid[b]] for b in range(len(pid)))
    (grad,) = torch.autograd.grad(score, fmap)
    weight = grad.mean(2).mean(2)
    return torch.stack([F.relu((weight[b].view(1, -1) @ fmap[b].detach().flatten(1)).view(fmap.shape[-2:]))
                        for b in range(len(pid))])


def _authors_top_k(cam, step, k):
    """pn.py:127-144 for any map divisible by the patch (step rows x step cols): sum per patch,
    the k largest."""
    B, H, W = cam.shape
    mask = torch.zeros(B, H, W)
    for b in range(B):
        sums = [(float(cam[b, r:r + step[0], c:c + step[1]].sum()), r, c)
                for r in range(0, H, step[0]) for c in range(0, W, step[1])]
        for _, r, c in sorted(sums, key=lambda t: -t[0])[:k]:
            mask[b, r:r + step[0], c:c + step[1]] = 1
    return mask


def test_patches_are_the_top_k_of_the_previous_classifiers_grad_cam(monkeypatch):
    # 384 x 128 -> the authors' 24 x 8 map; the default 8 x 4 grid = their 3 x 2-cell patches
    spy = _MixSpy(monkeypatch)
    model = _pmm(input_size=(384, 128), base_width=4).train()
    x, pid = _batch(n_ids=3, k=2, hw=(384, 128))
    seen = {}
    model.backbone.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach()))
    out = model(x, batch={"pid": pid})
    assert seen["x"].shape[-2:] == (24, 8)
    # in training mode the heads use the batch's statistics: copies of them give the same logits
    cam1 = _authors_grad_cam(model.heads["stage1"], seen["x"], "avg", pid)
    cam2 = _authors_grad_cam(model.heads["stage2"], spy.calls[0]["out"], "max", pid)
    torch.testing.assert_close(out["attention"]["stage2"], cam1, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out["attention"]["stage3"], cam2, rtol=1e-4, atol=1e-7)
    assert torch.equal(out["mix"]["stage2"], _authors_top_k(cam1, (3, 2), 3))
    assert torch.equal(out["mix"]["stage3"], _authors_top_k(cam2, (3, 2), 3))
    # the patches need not touch one another, and each is a whole 3 x 2 patch
    assert all(int(out["mix"][s][b].sum()) == 18 for s in ("stage2", "stage3") for b in range(6))


def test_grad_cam_moves_no_parameter_and_running_statistics_once():
    model = _pmm().train()
    x, pid = _batch()
    out = model(x, batch={"pid": pid})
    assert all(p.grad is None for p in model.parameters())
    for k in ("stage1", "stage2", "stage3"):
        assert int(model.heads[k].reduction[1].num_batches_tracked) == 1
    assert out["attention"]["stage2"].requires_grad is False


def test_top_patch_mask_grid_rules():
    att = torch.zeros(1, 5, 3)
    att[0, 4, 2] = 3.0                                  # bottom-right cell
    att[0, 0, 0] = 2.0
    mask, top = top_patch_mask(att, (2, 2), 1)          # 5 x 3 in 2 x 2 patches: rows 0-2 / 3-4, cols 0-1 / 2
    assert top.tolist() == [[3]] and mask[0, 3:, 2:].sum() == 2 and mask.sum() == 2
    mask, top = top_patch_mask(torch.ones(2, 4, 2), (8, 4), 3)     # grid capped at the map: 8 one-cell patches
    assert top.tolist() == [[0, 1, 2]] * 2                           # ties: lower row-major index first
    assert mask.sum() == 6
    mask, _ = top_patch_mask(torch.rand(1, 2, 1), (8, 4), 3)       # at most every patch
    assert mask.sum() == 2


def test_energy_attention_option_uses_the_salient_block(monkeypatch):
    spy = _MixSpy(monkeypatch)
    model = _pmm(attention="energy", mix_block=(0.5, 0.5)).train()
    x, pid = _batch()
    seen = {}
    model.backbone.layer4.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.detach()))
    out = model(x, batch={"pid": pid})
    for stage, source in (("stage2", seen["x"]), ("stage3", spy.calls[0]["out"])):
        expect, _ = pmm_module.salient_block_mask(source, (2, 1))
        assert torch.equal(out["mix"][stage], expect)


def test_eval_and_mix_prob_zero_do_not_mix(monkeypatch):
    spy = _MixSpy(monkeypatch)
    model = _pmm()
    x, pid = _batch()
    with torch.no_grad():
        model.eval()(x)
    assert spy.calls == []
    model.mix_prob = 0.0
    out = model.train()(x, batch={"pid": pid})
    assert spy.calls == [] and out["mix"] == {}
    model.mix_prob = 1.0
    with pytest.raises(ValueError, match=r"pmm: training needs the identities of the batch \(batch\['pid'\]\)"):
        model(x)


def test_batch_dropblock_head_drops_one_block_of_the_shared_map_for_the_batch(monkeypatch):
    model = _pmm(batch_drop=True, drop_block=(0.5, 1.0)).train()
    x, pid = _batch()
    calls, seen = [], {}
    real = pmm_module.spatial_mask_mul

    def spy(f, logits, activation="exp_relu", *a, **kw):
        calls.append((activation, logits.detach().clone()))
        return real(f, logits, activation, *a, **kw)

    monkeypatch.setattr(pmm_module, "spatial_mask_mul", spy)
    model.part_block.register_forward_hook(lambda m, i, o: seen.__setitem__("z", o.detach()))
    model.heads["bdb"].register_forward_pre_hook(lambda m, i: seen.__setitem__("bdb", i[0].detach()))
    corners = set()
    for _ in range(8):
        calls.clear()
        model(x, batch={"pid": pid})
        assert len(calls) == 1 and calls[0][0] == "identity"
        keep = calls[0][1]
        assert keep.shape == (6, 4, 2) and all(torch.equal(keep[b], keep[0]) for b in range(6))
        dropped = (keep[0] == 0).nonzero()
        assert len(dropped) == 2 * 2 and dropped[:, 0].max() - dropped[:, 0].min() == 1   # 2 rows x full width
        corners.add(int(dropped[0, 0]))
        assert torch.equal(seen["bdb"], (seen["z"] * keep[:, None]).amax((2, 3)))
    assert len(corners) > 1
    calls.clear()
    with torch.no_grad():
        model.eval()(x)
    assert calls == [] and torch.equal(seen["bdb"], seen["z"].amax((2, 3)))


# ------------------------------------------------------------------------------ partners
def test_partners_are_another_identity_for_every_pk_batch():
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n_ids = int(rng.integers(2, 12))
        counts = rng.integers(1, 9, size=n_ids)               # some identities below K: drawn with replacement
        pids = np.repeat(np.arange(n_ids) * 7 + 3, counts)
        k = int(rng.integers(1, 5))
        p = int(rng.integers(2, n_ids + 1))
        sampler = PKSampler(pids.tolist(), batch_size=p * k, num_instances=k, seed=trial)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            order = list(sampler)
            assert len(order) % (p * k) == 0
            for start in range(0, len(order), p * k):
                pid = torch.as_tensor(pids[order[start:start + p * k]])
                assert len(set(pid.tolist())) == p
                for _ in range(3):
                    partner, mixed = draw_partners(pid, 1.0, gen)
                    assert bool(mixed.all()) and bool((pid[partner] != pid).all())


def test_partners_reach_every_other_identity_about_uniformly():
    pid = torch.tensor([4, 4, 4, 4, 9, 9, 9, 9, 2, 2, 2, 2])
    gen = torch.Generator().manual_seed(1)
    hits = torch.zeros(12, 12)
    for _ in range(800):
        partner, _ = draw_partners(pid, 1.0, gen)
        hits[torch.arange(12), partner] += 1
    same = pid[:, None] == pid[None, :]
    assert hits[same].sum() == 0
    assert bool((hits[~same] > 0.6 * 100).all()) and bool((hits[~same] < 1.4 * 100).all())


def test_a_batch_of_one_identity_is_one_clear_error():
    pid = torch.full((4,), 7)
    with pytest.raises(ValueError, match=r"batch holds one identity only \(7, 4 images\).*data.batch_size >= 2 "
                                         r"\* data.num_instances"):
        draw_partners(pid)
    model = _pmm().train()
    with pytest.raises(ValueError, match="one identity only"):
        model(torch.randn(4, 3, 64, 32), batch={"pid": pid})
    partner, mixed = draw_partners(pid, 0.0)                            # nothing to mix: no partner needed
    assert not bool(mixed.any())
    one_id = ["data.batch_size=4", "data.num_instances=4", "train.triplet_weight=0"]
    with pytest.raises(ConfigError, match="pmm mixes each sample with one of another identity, so a batch needs at "
                                          r"least 2 identities of data.num_instances \(4\) images"):
        load_config("pmm", one_id)
    assert load_config("pmm", one_id + ["pmm.mix_prob=0"])["pmm"]["mix_prob"] == 0


@pytest.mark.parametrize("p, k", [(2, 1), (2, 4), (5, 2)])
def test_forward_on_pk_batches(p, k):
    model = _pmm(num_classes=16).train()
    pid = torch.arange(p).repeat_interleave(k) * 3
    out = model(torch.randn(p * k, 3, 64, 32), batch={"pid": pid})
    for stage in ("stage2", "stage3"):
        assert bool((pid[out["partner"][stage]] != pid).all())


# ------------------------------------------------------------------------------ losses
def _authors_soft_triplet(feat, pid):
    """loss.py:29-43, 46-98, 101-123 with margin=None: Euclidean distances, hardest positive and
    negative per anchor, SoftMarginLoss(d_an - d_ap, 1)."""
    n = len(pid)
    xx = feat.pow(2).sum(1, keepdim=True).expand(n, n)
    dist = (xx + xx.t() - 2 * feat @ feat.t()).clamp(min=1e-12).sqrt()
    is_pos = pid.expand(n, n).eq(pid.expand(n, n).t())
    d_ap = dist[is_pos].view(n, -1).max(1).values
    d_an = dist[~is_pos].view(n, -1).min(1).values
    return torch.nn.SoftMarginLoss()(d_an - d_ap, torch.ones(n))


def _authors_label_smooth(logits, pid, eps=0.1):
    """loss.py:126-154: targets (1 - eps) one-hot + eps / K, mean over the batch."""
    logp = torch.log_softmax(logits, 1)
    t = torch.zeros_like(logp).scatter_(1, pid.view(-1, 1), 1.0) * (1 - eps) + eps / logits.shape[1]
    return (-t * logp).mean(0).sum()


def test_losses_equal_the_authors_formulas():
    torch.manual_seed(3)
    feat = torch.randn(12, 16, dtype=torch.float64).float().requires_grad_(True)
    pid = torch.arange(3).repeat_interleave(4)
    ours, theirs = soft_margin_triplet(feat, pid), _authors_soft_triplet(feat, pid)
    torch.testing.assert_close(ours, theirs)
    g1, = torch.autograd.grad(ours, feat)
    g2, = torch.autograd.grad(theirs, feat)
    torch.testing.assert_close(g1, g2)
    logits = torch.randn(12, 5)
    torch.testing.assert_close(cross_entropy(logits, pid, 0.1), _authors_label_smooth(logits, pid))


def test_model_loss_is_the_sum_over_heads():
    model = _pmm(label_smoothing=0.1, triplet_weight=1.0).train()
    x, pid = _batch(n_ids=3, k=2)
    torch.manual_seed(5)
    out = model(x, batch={"pid": pid})
    loss, stats = model.loss(out, {"pid": pid})
    expect = sum(_authors_label_smooth(out["logits"][k], pid) + _authors_soft_triplet(out["feats"][k], pid)
                 for k in ("stage1", "stage2", "stage3"))
    torch.testing.assert_close(loss, expect)
    assert {"ce_stage1", "ce_stage2", "ce_stage3", "triplet_stage1", "triplet_stage2", "triplet_stage3",
            "acc"} <= set(stats)
    hinge = _pmm(triplet_weight=1.0, soft_margin=False).train()
    _, hs = hinge.loss(hinge(x, batch={"pid": pid}), {"pid": pid})
    assert {"triplet_stage1", "triplet_stage2", "triplet_stage3"} <= set(hs)


# ------------------------------------------------------------------------------ configs and training
def test_shipped_configs():
    cpu = load_config("pmm")
    assert cpu["model"]["last_stride"] == 1 and cpu["train"]["label_smoothing"] == 0.1
    assert cpu["train"]["triplet_weight"] == 1.0 and cpu["eval"]["flip"] is False
    assert cpu["pmm"]["attention"] == "cam" and cpu["pmm"]["batch_drop"] is False
    paper = load_config("pmm_market1501")
    assert (paper["model"]["backbone"], paper["model"]["last_stride"]) == ("resnet50", 1)
    assert (paper["data"]["height"], paper["data"]["width"]) == (384, 128)
    assert (paper["data"]["batch_size"], paper["data"]["num_instances"]) == (128, 4)
    assert paper["train"]["stage1"]["epochs"] == 400 and paper["train"]["stage1"]["milestones"] == [199, 299]
    assert paper["train"]["optimizer"] == "adam" and paper["train"]["stage1"]["lr"] == 1e-3
    assert paper["eval"]["flip"] is False and paper["eval"]["rerank"] is False
    for name in ("mmga_market1501", "mgran_market1501"):
        cfg = load_config(name)
        assert cfg["model"]["backbone"] == "resnet50" and cfg["model"]["base_width"] == 64
    for name in ("market1501", "dukemtmc", "cuhk03"):
        cfg = load_config(name)
        assert cfg["eval"]["flip"] is False
        with open(os.path.join(os.path.dirname(pmm_module.__file__), "..", "configs", f"{name}.yaml")) as fh:
            text = fh.read()
        assert "224" in text and "256x128" in text


def test_training_through_the_engine_lowers_the_loss(tmp_path):
    from fmn.data.synthetic import generate
    from fmn.engine import train

    root = str(tmp_path / "synth")
    generate(root, num_ids=8, num_cams=2, images_per_id_per_cam=4, height=64, width=32, progress=False)
    over = [f"data.root={root}", f"output.dir={tmp_path / 'run'}", "data.height=64", "data.width=32",
            "data.batch_size=8", "data.num_instances=2", "data.cache=false", "data.workers=0",
            "train.progress=false", "train.device=cpu", "model.base_width=8", "train.stage1.epochs=6",
            "train.stage1.lr=0.02", "train.stage1.milestones=[]", "train.warmup_epochs=0", "data.augment=false"]
    summary = train(load_config("pmm", over), log=None)
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(k in summary["history"][0] for k in ("ce_stage1", "ce_stage2", "ce_stage3", "triplet_stage3"))
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        assert summary["model"](x)["descriptor"].shape == (2, 3 * 64)
