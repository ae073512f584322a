"""The ranked-list pictures, the Fig. 4 heatmaps and the evaluator on their delicate cases: junk
gallery ids, train/eval flags, half-precision models, overflowed masks, image formats, atomic
JSON and bad input."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import fmn.engine.evaluation as evaluator
from fmn.data import ReIDDataset, make_test_loader
from fmn.engine.evaluation import evaluate_model, extract_features
from fmn.engine.heatmap import activation_panels, colormap, fig4, normalize_map, overlay, pick_fig4_cases
from fmn.engine.visualize import GREEN, QUERY, RED, ranked_list, save_image

TILE_H, TILE_W, BORDER = 32, 16, 4


def _images(folder, n, prefix, size=(20, 40), mode="RGB"):
    rng = np.random.default_rng(len(prefix) + n)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"{prefix}{i}.png")
        arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(p)
        paths.append(p)
    return paths


def _row_border_colors(png, topk):
    im = np.asarray(Image.open(png).convert("RGB"))
    cell_w = TILE_W + 2 * BORDER
    return [tuple(im[1, 1])] + [tuple(im[1, cell_w + 12 + k * (cell_w + 4) + 1]) for k in range(topk)]


class TwoBranchMaps(nn.Module):
    """A small FMN-shaped model: a GRN branch and a LAN branch with BatchNorm, the FMN eval output
    {"grn", "lan"} and activation_maps() (mask, grn, lan)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.grn = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.lan = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())

    def _maps(self, x):
        f = self.grn(x)
        return f, self.lan(f)

    def forward(self, x):
        f, l = self._maps(x)
        return {"grn": f.mean((2, 3)), "lan": l.mean((2, 3))}

    def activation_maps(self, x):
        f, l = self._maps(x)
        return {"mask": f.float().mean(1).exp(), "grn": f.float().mean(1), "lan": l.float().mean(1)}


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


@pytest.fixture()
def tiny_dataset(tmp_path):
    q = _images(tmp_path, 2, "q", size=(8, 16))
    g = _images(tmp_path, 3, "g", size=(8, 16))
    return ReIDDataset("tiny", str(tmp_path), [(q[0], 1, 0)], [(q[0], 1, 0), (q[1], 2, 0)],
                       [(g[0], 1, 1), (g[1], 2, 1), (g[2], 3, 1)])


# ---------------------------------------------------------------------------- ranked_list


def test_ranked_list_leaves_out_junk_gallery_items(tmp_path):
    # Gallery 0 has the junk identity -1 and is nearest: evaluation drops it from every ranking,
    # so the picture must too (it was drawn as a red rank-1).
    qp, gp = _images(tmp_path, 1, "q"), _images(tmp_path, 3, "g")
    dist = torch.tensor([[0.0, 1.0, 2.0]])
    out = tmp_path / "rl.png"
    ranked_list(dist, qp, gp, [1], [-1, 1, 2], [1], [2, 2, 2], str(out), topk=3,
                tile_hw=(TILE_H, TILE_W), border=BORDER)
    assert _row_border_colors(out, 3) == [QUERY, GREEN, RED, (255, 255, 255)]


def test_ranked_list_checks_id_lengths_topk_and_dist_shape(tmp_path):
    qp, gp = _images(tmp_path, 1, "q"), _images(tmp_path, 3, "g")
    dist, out = torch.zeros(1, 3), str(tmp_path / "rl.png")
    with pytest.raises(ValueError, match="g_pids has 2 entries"):
        ranked_list(dist, qp, gp, [1], [1, 2], [1], [2, 2, 2], out)
    with pytest.raises(ValueError, match="g_camids has 4 entries"):      # silently misaligned before
        ranked_list(dist, qp, gp, [1], [1, 2, 3], [1], [2, 2, 2, 2], out)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        ranked_list(dist, qp, gp, [1], [1, 2, 3], [1], [2, 2, 2], out, topk=0)
    with pytest.raises(ValueError, match="matrix"):
        ranked_list(torch.zeros(3), qp, gp, [1], [1, 2, 3], [1], [2, 2, 2], out)
    assert not os.path.exists(out)


def test_save_image_unknown_extension_names_the_file(tmp_path):
    path = tmp_path / "ranked"
    with pytest.raises(ValueError, match=r"ranked: unknown image file extension"):
        save_image(Image.new("RGB", (4, 4)), str(path))
    assert os.listdir(tmp_path) == []
    assert save_image(Image.new("RGB", (4, 4)), str(tmp_path / "a.JPG")) == str(tmp_path / "a.JPG")
    with Image.open(tmp_path / "a.JPG") as im:
        assert im.format == "JPEG"


# ---------------------------------------------------------------------------- heatmaps


def test_normalize_map_overflowed_mask_is_hottest_not_nan():
    # FMN's mask is exp(relu(u)), unbounded: a large logit overflows to +inf in float32. The inf
    # cell is the hottest; it used to become NaN (drawn as the coldest colour after uint8 casting).
    mask = torch.tensor([[1.0, 2.0], [3.0, float("inf")]])
    np.testing.assert_allclose(normalize_map(mask), [[0.0, 0.5], [1.0, 1.0]])
    out = np.asarray(overlay(Image.new("RGB", (2, 2)), mask, alpha=1.0))
    assert tuple(out[1, 1]) == tuple(colormap(np.array(1.0)))
    with pytest.raises(ValueError, match="NaN"):
        normalize_map(torch.tensor([[0.0, float("nan")]]))


def test_overlay_takes_float_and_channel_first_images():
    # A float image in [0, 1] was cast straight to uint8 (all black); a (3, h, w) tensor was read
    # as 3 rows of h pixels with w channels.
    rgb = np.zeros((6, 4, 3))
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0.5, 0.25, 1.0
    heat = torch.rand(3, 2) + 0.1
    expect = (128, 64, 255)
    for image in (rgb, torch.from_numpy(rgb).permute(2, 0, 1).float()):
        out = np.asarray(overlay(image, heat, alpha=0.0))
        assert out.shape == (6, 4, 3) and {tuple(p) for p in out.reshape(-1, 3)} == {expect}
    with pytest.raises(ValueError, match="de-normalise"):
        overlay(torch.randn(3, 6, 4), heat)                  # an ImageNet-normalised tensor
    with pytest.raises(ValueError, match=r"2-D \(h, w\) heatmap"):
        overlay(rgb, torch.rand(1, 3, 2))


def test_activation_panels_restore_every_submodule_mode_and_keep_bn_stats(tmp_path):
    # Training with a frozen branch: the model is in train mode, its GRN in eval mode. After the
    # heatmaps the GRN was put back in train mode (model.train(True) recurses), so the next
    # training step moved the frozen branch's BatchNorm statistics.
    paths = (_images(tmp_path, 1, "rgb", size=(12, 20)) + _images(tmp_path, 1, "gray", size=(12, 20), mode="L")
             + _images(tmp_path, 1, "rgba", size=(12, 20), mode="RGBA"))
    model = TwoBranchMaps().train()
    model.grn.eval()
    before = _bn_state(model)
    panels = activation_panels(model, paths, 16, 8, scale=2)
    assert len(panels) == 3 and all(len(row) == 4 and row[0].size == (16, 32) for row in panels)
    assert model.training and model.lan.training and model.lan[1].training
    assert not model.grn.training and not model.grn[1].training
    after = _bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_activation_panels_run_a_bfloat16_model(tmp_path):
    paths = _images(tmp_path, 2, "x", size=(8, 16))
    model = TwoBranchMaps().to(torch.bfloat16)
    panels = activation_panels(model, paths, 16, 8, scale=1)
    assert [row[1].size for row in panels] == [(8, 16), (8, 16)]


def test_heatmaps_of_a_model_without_maps_or_without_cases_are_clear_errors(tmp_path):
    paths = _images(tmp_path, 1, "x", size=(8, 16))
    with pytest.raises(TypeError, match="activation_maps"):
        activation_panels(nn.Conv2d(3, 4, 1), paths, 16, 8)
    with pytest.raises(ValueError, match="no cases to draw"):
        fig4(TwoBranchMaps(), paths, paths, [], [1], [1], str(tmp_path / "h.png"), 16, 8)
    assert not os.path.exists(tmp_path / "h.png")


def test_pick_fig4_cases_follows_the_evaluation_exclusions():
    # Gallery 0 has the junk identity -1 and is nearest to every query under both distances;
    # evaluation drops it, so it can never be a rank-1 (it was picked as one).
    d_grn = torch.tensor([[0.0, 2.0, 1.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    d_fmn = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    # query 0 (id 1, cam 0): GRN's rank-1 is gallery 2 (id 2, wrong), FMN's gallery 1 (id 1, right);
    # query 1 (id 3, cam 0): gallery 3 (id 3, cam 0) is left out, both rank-1s are gallery 1 (wrong)
    cases = pick_fig4_cases(d_grn, d_fmn, [1, 3], [-1, 1, 2, 3], [0, 0], [1, 1, 1, 0], count=5)
    assert cases == [(0, 2, 1), (1, 1, 1)]
    # query 1 (id 3, cam 0): every gallery item is junk or its own identity in its own camera,
    # so it has no rank-1 at all and is not a case
    cases = pick_fig4_cases(d_grn, d_fmn, [1, 3], [-1, 3, 3, 3], [0, 0], [1, 0, 0, 0], count=5)
    assert cases == [(0, 2, 1)]


# ---------------------------------------------------------------------------- evaluator


def test_extract_features_restores_every_submodule_mode(tiny_dataset):
    loader = make_test_loader(tiny_dataset.gallery, 16, 8, batch_size=2, workers=0)
    model = TwoBranchMaps().train()
    model.grn.eval()
    before = _bn_state(model)
    feats, *_ = extract_features(model, loader, "cpu", progress=False)
    assert feats["grn"].shape == (3, 4)
    assert model.training and model.lan.training and not model.grn.training and not model.grn[1].training
    after = _bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_extract_features_of_a_bfloat16_model_is_float32(tiny_dataset):
    loader = make_test_loader(tiny_dataset.gallery, 16, 8, batch_size=2, workers=0)
    model = TwoBranchMaps()
    ref, *_ = extract_features(model, loader, "cpu", progress=False)
    feats, *_ = extract_features(model.to(torch.bfloat16), loader, "cpu", progress=False)
    assert feats["lan"].dtype == torch.float32
    torch.testing.assert_close(feats["lan"], ref["lan"], atol=0.05, rtol=0.05)


class HalfOutput(nn.Module):
    """Returns float16 features of about 4e4: the sum of the image's and its mirror's overflows
    float16 (max 65504), their mean does not."""

    def forward(self, x):
        return (x.mean((2, 3)) * 0 + 40000.0 + x[:, :, 0, 0]).half()


def test_extract_features_flip_mean_does_not_overflow_in_half(tiny_dataset):
    loader = make_test_loader(tiny_dataset.gallery, 16, 8, batch_size=3, workers=0)
    feats, *_ = extract_features(HalfOutput(), loader, "cpu", progress=False)
    d = feats["descriptor"]
    assert torch.isfinite(d).all() and (d - 40000).abs().max() < 64


def test_evaluate_model_json_is_written_atomically(tiny_dataset, tmp_path, monkeypatch):
    out = tmp_path / "results.json"
    res = evaluate_model(TwoBranchMaps(), tiny_dataset, 16, 8, "cpu", batch_size=2, rerank=False,
                         json_path=str(out), workers=0, progress=False, verbose=False)
    before = out.read_text()
    assert json.loads(before)["results"] == res

    class DiesHalfway:
        def __init__(self, fh):
            self.fh = fh

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            raise OSError("disk full")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    real_open = open
    monkeypatch.setattr(evaluator, "open", lambda *a, **k: DiesHalfway(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="disk full"):
        evaluate_model(TwoBranchMaps(), tiny_dataset, 16, 8, "cpu", batch_size=2, rerank=False,
                       json_path=str(out), workers=0, progress=False, verbose=False)
    assert out.read_text() == before
    assert sorted(p for p in os.listdir(tmp_path) if p.endswith(".json")) == ["results.json"]
