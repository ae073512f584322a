"""The trainer's health checks (fmn.engine.health): a forced collapse and a run that cannot learn
stop with one message and keep their last checkpoint (or warn, by configuration); a run that
learns is never stopped."""
import pytest
import torch

from fmn.checkpoint import load_checkpoint
from fmn.engine.health import HealthCheck, TrainingHealthError, relative_spread
from fmn.engine.trainer import Trainer
from fmn.models import build_model_from_config
from tests.test_trainer import C, TensorLoader, make_data, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def run(tmp_path, *extra, collapse=False, logs=None):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "fmn.mask_max_logit=10", *extra)
    imgs, pids = make_data(32)
    model = build_model_from_config(cfg, C)
    if collapse:   # every embedding the same: the GRN's last feature map times 0
        model.grn.layer4.register_forward_hook(lambda module, args, out: out * 0)
    trainer = Trainer(cfg, model, TensorLoader(imgs, pids, 8), torch.device("cpu"), str(tmp_path),
                      log=None if logs is None else logs.append)
    return trainer.fit(resume=False)


def test_relative_spread():
    e = torch.randn(16, 32)
    assert relative_spread(e.mean(0, keepdim=True).expand(16, 32)) < 1e-6 < 0.5 < relative_spread(e)
    torch.testing.assert_close(relative_spread(e * 1e3), relative_spread(e))


def test_a_forced_collapse_stops_with_advice_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(TrainingHealthError) as info:
        run(tmp_path, "train.stage1.epochs=4", "train.triplet_weight=1", "data.num_instances=2", collapse=True)
    msg = str(info.value)
    assert msg.startswith("stage 1 epoch 2: training collapsed: the embeddings of a batch are nearly identical")
    assert "the triplet loss sits at its margin (0.300)" in msg and "learning rate" in msg
    assert str(tmp_path / "last.pt") in msg
    state = load_checkpoint(tmp_path / "last.pt")
    assert (state["stage"], state["epoch"]) == (1, 2) and not (tmp_path / "model.pt").exists()


def test_warn_mode_logs_once_per_stage_and_finishes(tmp_path):
    logs = []
    summary = run(tmp_path, "train.health=warn", "train.stage1.epochs=4", "train.stage2.epochs=1",
                  collapse=True, logs=logs)
    warnings = [line for line in logs if line.startswith("warning: stage 1 epoch 2: training collapsed")]
    assert len(warnings) == 1 and summary["stage"] == 2 and (tmp_path / "model.pt").exists()


def test_a_run_at_chance_is_not_learning(tmp_path):
    # lr 1e-9: the weights do not move, cross-entropy stays at ln(C), accuracy at chance
    with pytest.raises(TrainingHealthError, match=r"stage 1 epoch 4: training is not learning: cross-entropy "
                                                  r"[0-9.]+ at ln\(4\) = 1\.386 .* for 3 epochs"):
        run(tmp_path, "train.stage1={epochs: 6, lr: 1.0e-9, milestones: [5], gamma: 0.1}",
            "train.health_patience=2", "train.weight_decay=0", "train.momentum=0")


def test_a_learning_run_is_never_stopped(tmp_path):
    logs = []
    summary = run(tmp_path, "train.stage1={epochs: 5, lr: 0.05, milestones: [4], gamma: 0.1}",
                  "train.stage2={epochs: 3, lr: 0.05, milestones: [2], gamma: 0.1}", "train.health_patience=1",
                  logs=logs)
    assert summary["stage"] == 2 and not [line for line in logs if line.startswith("warning")]
    assert all(h["spread"] > 1e-2 for h in summary["history"])


def test_verdicts_from_stats():
    t = {"health": "stop", "health_patience": 2, "warmup_epochs": 1, "triplet_margin": 0.3, "triplet_weight": 1.0}
    check = HealthCheck(t, num_classes=100)
    chance = {"ce": 4.61, "acc": 0.01, "spread": 0.5, "triplet": 0.1, "loss": 4.71}
    assert check.verdict(0, {"spread": 0.0}) is None and check.verdict(1, {"spread": 0.0}) is None   # warm-up
    assert "collapsed" in check.verdict(2, {"spread": 1e-4})
    assert "margin" in check.verdict(2, {"spread": 5e-3, "triplet": 0.301})
    check.start_stage()
    assert check.verdict(2, {"spread": 5e-3, "triplet": 0.2, "ce": 1.0, "acc": 0.5, "loss": 1.2}) is None
    assert check.verdict(3, chance) is None                               # one epoch at chance
    assert "not learning" in check.verdict(4, chance)                     # two, and the loss did not fall
    assert check.verdict(5, dict(chance, acc=0.5)) is None                # learning again resets the count
    check.start_stage()   # at chance, but the loss still falls (the triplet learns): given time
    for epoch, loss in enumerate((6.0, 5.5, 4.6, 4.3, 4.0, 3.8), start=2):
        assert check.verdict(epoch, dict(chance, loss=loss)) is None
    assert HealthCheck(dict(t, health="off"), 100).verdict(5, {"spread": 0.0}) is None


def test_matches_per_query_and_the_rerank_note():
    from fmn.engine.evaluation import matches_per_query, rerank_note

    q_pids, q_cams = torch.tensor([1, 2]), torch.tensor([0, 0])
    g_pids, g_cams = torch.tensor([1, 1, 1, 2, 3, -1]), torch.tensor([0, 1, 1, 1, 1, 1])
    assert matches_per_query(q_pids, g_pids, q_cams, g_cams) == 1.5      # (2 + 1) / 2: same camera excluded
    assert "may not help" in rerank_note(1.5) and rerank_note(6.0) is None


def test_a_resnet50_without_imagenet_weights_is_warned_about(tmp_path):
    from fmn.config import load_config
    from fmn.engine.training import from_scratch_warning

    assert "fine-tunes ImageNet weights" in from_scratch_warning(load_config("market1501"))
    assert from_scratch_warning(load_config("market1501", ["model.pretrained=/w.pth"])) is None
    assert from_scratch_warning(load_config("demo")) is None
