"""MGRAN at test time uses the query's and gallery's own mask files where they exist (as its
published pipeline gives every image its masks), and its mask predictor only where they do not."""
import json

import pytest
import torch

from fmn.cli import main
from fmn.engine.evaluation import extract_features
from fmn.models import build_model
from tests.test_engine import TINY

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 64, 32


def tiny_mgran():
    torch.manual_seed(0)
    return build_model("mgran", 5, backbone="resnet18", base_width=8, input_size=(H, W)).eval()


def test_given_masks_replace_the_predictor_at_test_time(monkeypatch):
    model = tiny_mgran()
    img = torch.randn(3, 3, H, W)
    parts = (torch.rand(3, 6, H, W) > 0.5).float()
    calls = []
    predict = model.mask_predictor.forward
    monkeypatch.setattr(model.mask_predictor, "forward", lambda x: calls.append(1) or predict(x))
    with torch.no_grad():
        given = model(img, batch={"parts": parts})
        assert not calls, "the predictor ran although the batch gave the masks"
        predicted = model(img)
        assert calls
        # the predictor made to output exactly the given region masks gives the same features
        region = parts[:, list(model._region_channels)]
        monkeypatch.setattr(model.mask_predictor, "forward", lambda x: (region * 2 - 1) * 10)
        same = model(img)
    torch.testing.assert_close(given["descriptor"], same["descriptor"], rtol=0, atol=0)
    assert not torch.allclose(given["descriptor"], predicted["descriptor"])


def test_flip_averaging_mirrors_the_masks_with_the_image():
    model = tiny_mgran()
    img = torch.randn(2, 3, H, W)
    parts = (torch.rand(2, 6, H, W) > 0.5).float()
    batch = {"img": img, "parts": parts, "pid": torch.zeros(2), "camid": torch.zeros(2), "path": ["a", "b"]}
    feats, *_ = extract_features(model, [batch], "cpu", flip=True, progress=False)
    with torch.no_grad():
        a = model(img, batch={"parts": parts})["descriptor"]
        b = model(img.flip(3), batch={"parts": parts.flip(3)})["descriptor"]
    torch.testing.assert_close(feats["descriptor"], (a + b) * 0.5)


def test_evaluation_reports_which_masks_it_used(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mgran", *TINY, "--data-root", data, "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--no-rerank"]) == 0
    assert "test-time region masks: given" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["test_masks"] == "given"
    empty = tmp_path / "no_parts"
    empty.mkdir()
    assert main(["eval", "--checkpoint", str(out / "model.pt"), "--no-rerank", "--set",
                 f"data.parts_root={empty}"]) == 0
    assert "test-time region masks: predicted" in capsys.readouterr().out
