"""The two-stage trainer: loss goes down in each stage, stage 2 leaves GRN untouched, DDP keeps
ranks equal, kill-and-resume reproduces an uninterrupted run, NaN stops with the last good
checkpoint kept."""
import dataclasses
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp

from fmn.checkpoint import load_checkpoint
from fmn.config import load_config
from fmn.engine.runtime import NonFiniteLossError, lr_at
from fmn.engine.trainer import Trainer
from fmn.models import build_model_from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W, C = 64, 32, 4


pytestmark = pytest.mark.usefixtures("one_thread")


class TensorLoader:
    """An in-memory identity-balanced loader: shuffles with the epoch seed, flips with the global RNG."""

    def __init__(self, imgs, pids, batch_size, num_replicas=1, rank=0):
        self.imgs, self.pids, self.batch_size = imgs, pids, batch_size
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.imgs) // (self.batch_size * self.num_replicas)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.epoch)
        order = torch.randperm(len(self.imgs), generator=g)[self.rank :: self.num_replicas]
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            img = self.imgs[idx].clone()
            flip = torch.rand(len(idx)) < 0.5
            img[flip] = img[flip].flip(-1)
            yield {"img": img, "pid": self.pids[idx]}


def make_data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pids = torch.arange(n) % C
    imgs = torch.randn(n, 3, H, W, generator=g) * 0.5 + pids.view(-1, 1, 1, 1) * 0.3
    return imgs, pids


def tiny_cfg(out_dir, *extra):
    return load_config(None, [
        "model.backbone=resnet18", "model.base_width=8", f"data.height={H}", f"data.width={W}",
        "train.stage1={epochs: 2, lr: 0.05, milestones: [1], gamma: 0.1}",
        "train.stage2={epochs: 2, lr: 0.05, milestones: [1], gamma: 0.1}",
        "train.progress=false", "train.tensorboard=false", f"output.dir={out_dir}", *extra,
    ])


def split_state(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grn = {k: v for k, v in state.items() if k.startswith(("grn.", "grn_head."))}
    rest = {k: v for k, v in state.items() if k not in grn}
    return grn, rest


def batch_loss(trainer, stage, batch):
    with torch.no_grad():
        out = trainer.model(batch["img"])
        return float(trainer.stages[stage - 1].loss(out, batch)[0])


def test_lr_schedule_is_the_paper_step():
    assert lr_at(0, 0.1, [20], 0.1) == pytest.approx(0.1)
    assert lr_at(19, 0.1, [20], 0.1) == pytest.approx(0.1)
    assert lr_at(20, 0.1, [20], 0.1) == pytest.approx(0.01)
    assert lr_at(0, 0.1, [35], 0.1, warmup=1) == pytest.approx(0.05)


def test_stage_steps_lower_the_loss_and_stage2_leaves_grn_unchanged(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, "train.weight_decay=0.0")
    imgs, pids = make_data(16)
    batch = {"img": imgs, "pid": pids}
    model = build_model_from_config(cfg, C)
    trainer = Trainer(cfg, model, [batch], torch.device("cpu"), str(tmp_path), log=None)

    trainer._start_stage(1, fresh=True)
    model.train()
    before = batch_loss(trainer, 1, batch)
    for _ in range(3):
        trainer.train_step(1, batch)
    assert batch_loss(trainer, 1, batch) < before

    trainer._start_stage(2, fresh=True)
    model.train()
    grn_before, rest_before = split_state(model)
    before = batch_loss(trainer, 2, batch)
    for _ in range(3):
        stats = trainer.train_step(2, batch)
        assert "rank" in stats and stats["rank"] >= 0
    assert batch_loss(trainer, 2, batch) < before
    grn_after, rest_after = split_state(model)
    assert any(k.endswith("running_mean") for k in grn_after)
    for k, v in grn_before.items():
        assert torch.equal(v, grn_after[k]), f"stage 2 changed {k}"
    assert not torch.equal(rest_before["mn.weight"], rest_after["mn.weight"])
    changed_bn = [k for k in rest_after if k.startswith("lan.") and k.endswith("running_mean")
                  and not torch.equal(rest_before[k], rest_after[k])]
    assert changed_bn, "LAN batch-norm statistics should update in stage 2"


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path)
    imgs, pids = make_data(16)
    loader = TensorLoader(imgs, pids, 8)
    model = build_model_from_config(cfg, C)
    trainer = Trainer(cfg, model, loader, torch.device("cpu"), str(tmp_path), log=None)
    calls = {"n": 0}
    original = trainer.stages[0].loss

    def poisoned(out, batch):
        loss, stats = original(out, batch)
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2 of stage 1, first step
            loss = loss * float("nan")
        return loss, stats

    trainer.stages[0] = dataclasses.replace(trainer.stages[0], loss=poisoned)
    with pytest.raises(NonFiniteLossError, match="not finite.*last good checkpoint"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["stage"] == 1 and state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model.pt").exists()


WORKER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    torch.set_num_threads(1)
    from tests.test_trainer import TensorLoader, make_data, tiny_cfg, C
    from fmn.engine.trainer import Trainer
    from fmn.models import build_model_from_config
    out = sys.argv[1]
    cfg = tiny_cfg(out, "train.stage1.epochs=3", "train.stage1.milestones=[2]", "train.stage2.epochs=2")
    torch.manual_seed(0)
    imgs, pids = make_data(32)
    model = build_model_from_config(cfg, C)
    Trainer(cfg, model, TensorLoader(imgs, pids, 8), torch.device("cpu"), out, log=None).fit(resume=True)
    """
)


def _run_worker(script, out, kill_at=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("FMN_KILL_AT", None)
    if kill_at:
        env["FMN_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=ROOT))
    full = _run_worker(script, tmp_path / "full")
    assert full.returncode == 0, full.stderr

    run = tmp_path / "killed"
    first = _run_worker(script, run, kill_at="1:1:2")    # stage 1, second epoch, third step
    assert first.returncode == -9, first.stderr
    assert load_checkpoint(run / "last.pt")["epoch"] == 1
    second = _run_worker(script, run, kill_at="2:0:1")   # stage 2, first epoch, second step
    assert second.returncode == -9, second.stderr
    ck = load_checkpoint(run / "last.pt")
    assert (ck["stage"], ck["epoch"]) == (1, 3)
    third = _run_worker(script, run)
    assert third.returncode == 0, third.stderr

    a = load_checkpoint(tmp_path / "full" / "model.pt")["model"]
    b = load_checkpoint(run / "model.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fmn import distributed as fdist

    info = fdist.init_distributed("cpu")
    try:
        cfg = tiny_cfg(out, "train.stage1.epochs=1", "train.stage2.epochs=1")
        torch.manual_seed(0)
        imgs, pids = make_data(32)
        model = build_model_from_config(cfg, C)
        loader = TensorLoader(imgs, pids, 4, num_replicas=world, rank=rank)
        trainer = Trainer(cfg, model, loader, torch.device("cpu"), out, info, log=None)
        trainer.fit(resume=False)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        fdist.cleanup()


def test_ddp_two_gloo_processes_keep_parameters_equal(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    init = build_model_from_config(tiny_cfg(tmp_path), C).state_dict()
    moved = 0
    for k in a:
        if a[k].is_floating_point() and "running" not in k:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
            moved += int(not torch.equal(a[k], init[k]))
    assert moved > 0
    assert (tmp_path / "model.pt").exists()


class _RecordingWriter:
    def __init__(self):
        self.scalars, self.closed = 0, False

    def add_scalar(self, *args):
        self.scalars += 1

    def flush(self):
        pass

    def close(self):
        self.closed = True


@pytest.mark.parametrize("fails", [False, True])
def test_tensorboard_writer_is_closed_after_fit(tmp_path, monkeypatch, fails):
    imgs, pids = make_data()
    cfg = tiny_cfg(tmp_path, "train.tensorboard=true", "train.log_every=1")
    model = build_model_from_config(cfg, C)
    trainer = Trainer(cfg, model, TensorLoader(imgs, pids, 8), torch.device("cpu"), str(tmp_path), log=None)
    writer = _RecordingWriter()

    def open_writer():
        trainer.tb = writer

    monkeypatch.setattr(trainer, "_open_tensorboard", open_writer)
    if fails:
        def broken(*args, **kwargs):
            raise RuntimeError("disk full")
        monkeypatch.setattr(trainer, "save", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            trainer.fit(resume=False)
    else:
        trainer.fit(resume=False)
    assert writer.scalars > 0 and writer.closed and trainer.tb is None


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
def test_the_optimizer_is_the_configured_one(tmp_path, name, cls):
    cfg = tiny_cfg(tmp_path, f"train.optimizer={name}", "train.weight_decay=1.0e-3")
    trainer = Trainer(cfg, build_model_from_config(cfg, C), [], torch.device("cpu"), str(tmp_path), log=None)
    trainer._start_stage(1, fresh=True)
    group = trainer.optimizer.param_groups[0]
    assert type(trainer.optimizer) is cls and group["weight_decay"] == 1.0e-3 and group["lr"] == 0.05
    assert {id(p) for p in group["params"]} == {id(p) for m in trainer.model.grn_modules() for p in m.parameters()}
