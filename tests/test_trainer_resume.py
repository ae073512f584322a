"""Interrupted training, in process: a run interrupted mid-stage-1, mid-stage-2 or while writing a
checkpoint and then resumed ends with the same weights, optimizer state, history and
train_log.jsonl as an uninterrupted run; non-finite weights or loss never replace the last good
checkpoint; stage 2 keeps GRN frozen through ``fit``."""
import dataclasses
import json

import pytest
import torch

import fmn.engine.trainer as trainer_mod
from fmn.checkpoint import load_checkpoint
from fmn.engine.runtime import NonFiniteLossError
from fmn.engine.trainer import Trainer
from fmn.models import build_model_from_config
from test_trainer import C, TensorLoader, make_data, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

TIMING = ("seconds", "images_per_s")
# 16 images, batch 8: 2 steps per epoch; 2 epochs per stage -> train_step calls 1-4 stage 1, 5-8 stage 2
EXTRA = ("fmn.lan_init=grn", "train.label_smoothing=0.1", "train.triplet_weight=0.5")


class Interrupt(BaseException):
    """Stands for Ctrl-C / a preemption: not an Exception, so nothing may swallow it."""


def make_trainer(out, model_seed, *extra):
    cfg = tiny_cfg(out, *EXTRA, *extra)
    torch.manual_seed(model_seed)  # a resumed run must take every weight from the checkpoint
    model = build_model_from_config(cfg, C)
    imgs, pids = make_data(16)
    return Trainer(cfg, model, TensorLoader(imgs, pids, 8), torch.device("cpu"), str(out), log=None)


def interrupt_step(trainer, at_call):
    calls = {"n": 0}
    step = trainer.train_step

    def wrapped(stage, batch):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise Interrupt
        return step(stage, batch)

    trainer.train_step = wrapped


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def log_records(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def assert_same_run(a_dir, b_dir):
    a, b = load_checkpoint(a_dir / "model.pt"), load_checkpoint(b_dir / "model.pt")
    assert (a["stage"], a["epoch"]) == (b["stage"], b["epoch"]) == (2, 2)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]), f"momentum of param {i}"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert len(a["history"]) == 4
    assert without_timing(a["history"]) == without_timing(b["history"])
    assert without_timing(log_records(a_dir)) == without_timing(log_records(b_dir)) == without_timing(a["history"])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    make_trainer(out, 0).fit(resume=True)
    return out


def test_interrupted_mid_stage1_and_mid_stage2_resumes_exactly(full_run, tmp_path):
    out = tmp_path / "run"
    first = make_trainer(out, 0)
    interrupt_step(first, 3)               # stage 1, epoch 2, first step
    with pytest.raises(Interrupt):
        first.fit(resume=True)
    ck = load_checkpoint(out / "last.pt")
    assert (ck["stage"], ck["epoch"]) == (1, 1)

    second = make_trainer(out, 1)
    interrupt_step(second, 5)              # resumed at stage 1 epoch 2: call 5 is stage 2, epoch 2, first step
    with pytest.raises(Interrupt):
        second.fit(resume=True)
    ck = load_checkpoint(out / "last.pt")
    assert (ck["stage"], ck["epoch"]) == (2, 1)
    assert ck["optimizer"]["state"], "the stage-2 checkpoint must carry the momentum buffers"

    make_trainer(out, 2).fit(resume=True)
    assert_same_run(full_run, out)


def test_interrupted_while_writing_a_checkpoint_resumes_with_the_same_log(full_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    save = trainer_mod.save_checkpoint
    calls = {"n": 0}

    def dying_save(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:                # the checkpoint of stage 1 epoch 2: its log line is written
            raise Interrupt
        return save(obj, path)

    monkeypatch.setattr(trainer_mod, "save_checkpoint", dying_save)
    with pytest.raises(Interrupt):
        make_trainer(out, 0).fit(resume=True)
    monkeypatch.setattr(trainer_mod, "save_checkpoint", save)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    assert len(log_records(out)) == 2
    make_trainer(out, 1).fit(resume=True)
    assert_same_run(full_run, out)


def test_fresh_run_starts_a_new_log(full_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_log.jsonl").write_text((full_run / "train_log.jsonl").read_text())
    trainer = make_trainer(out, 0, "train.stage2.epochs=0")
    trainer.fit(resume=False)
    assert [(r["stage"], r["epoch"]) for r in log_records(out)] == [(1, 1), (1, 2)]


def test_non_finite_weights_after_a_finite_loss_are_not_checkpointed(tmp_path):
    trainer = make_trainer(tmp_path, 0)
    calls = {"n": 0}
    step = trainer.train_step

    def overflowing(stage, batch):
        stats = step(stage, batch)
        calls["n"] += 1
        if calls["n"] == 4:                # last step of stage 1 epoch 2: the update overflowed
            with torch.no_grad():
                trainer.model.grn.conv1.weight.view(-1)[0] = float("inf")
        return stats

    trainer.train_step = overflowing
    with pytest.raises(NonFiniteLossError, match=r"stage 1 epoch 2: weights are not finite.*grn\.conv1\.weight"
                                                 r".*last good checkpoint is .*last\.pt"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "last.pt")
    assert (state["stage"], state["epoch"]) == (1, 1)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model.pt").exists()


def test_inf_loss_in_stage2_leaves_the_last_checkpoint_byte_for_byte(tmp_path):
    trainer = make_trainer(tmp_path, 0)
    original = trainer.stages[1].loss
    seen = {}

    def poisoned(out, batch):
        loss, stats = original(out, batch)
        if len(trainer.history) == 3:   # stage 2, epoch 2: last.pt is (2, 1)
            seen["bytes"] = (tmp_path / "last.pt").read_bytes()
            loss = loss + float("inf")
        return loss, stats

    trainer.stages[1] = dataclasses.replace(trainer.stages[1], loss=poisoned)
    with pytest.raises(NonFiniteLossError, match=r"stage 2: the loss is inf .*last good checkpoint is .*last\.pt"):
        trainer.fit()
    assert (tmp_path / "last.pt").read_bytes() == seen["bytes"]
    state = load_checkpoint(tmp_path / "last.pt")
    assert (state["stage"], state["epoch"]) == (2, 1)
    assert not (tmp_path / "model.pt").exists()


def test_stage2_freezes_grn_through_fit(tmp_path):
    # default weight decay and momentum: a GRN parameter in the optimizer would move
    trainer = make_trainer(tmp_path, 0, "train.stage1.epochs=1", "train.stage2.epochs=1")
    model = trainer.model
    grn_params = {id(p) for m in model.grn_modules() for p in m.parameters()}
    grn_bn = [m for m in model.grn_modules() for m in m.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert grn_bn
    snapshot, modes = {}, []
    for bn in grn_bn:
        bn.register_forward_pre_hook(lambda m, args: modes.append((model.stage, m.training)))
    start = trainer._start_stage

    def start_stage(stage, fresh):
        start(stage, fresh)
        if stage == 2:
            snapshot.update({k: v.clone() for k, v in model.state_dict().items() if k.startswith(("grn.", "grn_head."))})
            in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
            assert not in_optimizer & grn_params, "the stage-2 optimizer holds GRN parameters"
            assert in_optimizer, "the stage-2 optimizer is empty"
            assert not any(p.requires_grad for m in model.grn_modules() for p in m.parameters())

    trainer._start_stage = start_stage
    trainer.fit(resume=False)
    assert snapshot and any(k.endswith("running_var") for k in snapshot)
    assert (1, True) in modes, "GRN batch norm should train in stage 1"
    stage2 = [training for stage, training in modes if stage == 2]
    assert stage2 and not any(stage2), "GRN batch norm ran in training mode in stage 2"
    assert all(p.grad is None for m in model.grn_modules() for p in m.parameters())
    final = load_checkpoint(tmp_path / "model.pt")["model"]
    for k, v in snapshot.items():
        assert torch.equal(final[k], v), f"stage 2 changed {k}"
