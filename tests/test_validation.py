"""Validation on held-out training identities (fmn.engine.validation): the split, the log, the
choice of the reported checkpoint, and a training run unchanged by validating."""
import json
import os

import pytest
import torch

from fmn.checkpoint import load_checkpoint
from fmn.cli import main
from fmn.data import build_dataset
from fmn.data.base import DatasetError
from fmn.engine.validation import Validator, split_validation
from tests.test_engine import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_split_holds_out_whole_identities_with_cross_camera_matches(data):
    ds = build_dataset("synthetic", data)
    rest, val = split_validation(ds, 2, seed=3)
    held = {p for _, p, _ in val.query}
    assert len(held) == 2 and len(val.query) == 2 and {p for _, p, _ in val.gallery} == held
    train_paths = {s[0] for s in rest.train}
    assert not train_paths & {s[0] for s in val.query + val.gallery}
    assert len(rest.train) + len(val.query) + len(val.gallery) == len(ds.train)
    assert rest.num_train_pids == ds.num_train_pids - 2 and sorted({p for _, p, _ in rest.train}) == [0, 1]
    for path, pid, cam in val.query:
        assert any(p == pid and c != cam for _, p, c in val.gallery)
    assert split_validation(ds, 2, seed=3)[1].query == val.query                 # the seed decides
    with pytest.raises(DatasetError, match="hold out at most 2"):
        split_validation(ds, 3, seed=3)


def train_with(data, out, *extra):
    assert main(["train", *TINY, "--data-root", data, "--output", str(out), "--set", "train.val_ids=2",
                 "--set", "train.stage1.epochs=3", "--set", "train.stage2.epochs=2", *extra]) == 0
    with open(out / "train_log.jsonl") as fh:
        return [json.loads(line) for line in fh]


def test_validation_is_logged_and_selects_the_reported_checkpoint(data, tmp_path, capsys):
    log = train_with(data, tmp_path / "a", "--set", "train.val_every=2", "--set", "train.select_best=true")
    validated = [(h["stage"], h["epoch"]) for h in log if "val_mAP" in h]
    assert validated == [(1, 2), (1, 3), (2, 2)]        # every 2 epochs and each stage's last
    assert all(0 <= h["val_mAP"] <= 100 and 0 <= h["val_rank1"] <= 100 for h in log if "val_mAP" in h)
    out = capsys.readouterr().out
    assert "validation: 2 training identities held out" in out and "validation rank-1" in out
    best = load_checkpoint(tmp_path / "a" / "best.pt")["model"]
    final = load_checkpoint(tmp_path / "a" / "model.pt")["model"]
    assert all(torch.equal(best[k], final[k]) for k in final)


def test_validating_leaves_training_as_it_was(data, tmp_path, monkeypatch):
    train_with(data, tmp_path / "real", "--set", "train.val_every=1")
    monkeypatch.setattr(Validator, "__call__", lambda self, model: {"val_rank1": 0.0, "val_mAP": 0.0})
    train_with(data, tmp_path / "stub", "--set", "train.val_every=1")
    a = load_checkpoint(tmp_path / "real" / "model.pt")["model"]
    b = load_checkpoint(tmp_path / "stub" / "model.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_select_best_needs_a_validation_split(data, tmp_path, capsys):
    assert main(["train", *TINY, "--data-root", data, "--output", str(tmp_path / "r"),
                 "--set", "train.select_best=true"]) == 2
    assert "train.val_ids is 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")
