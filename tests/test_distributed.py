"""fmn.distributed: rank / world-size checks and a process group started by the caller."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fmn import distributed as fdist


def _set_env(monkeypatch, env):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 is outside \[0, WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK=-1 is outside"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1"}, "LOCAL_RANK must be >= 0"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
])
def test_out_of_range_ranks_are_refused_before_the_rendezvous(monkeypatch, env, message):
    # Without the check a rank outside the group waits in the rendezvous for peers that never come.
    _set_env(monkeypatch, dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT="1"))

    def rendezvous(*args, **kwargs):
        raise AssertionError("reached the rendezvous")

    monkeypatch.setattr(dist, "init_process_group", rendezvous)
    with pytest.raises(RuntimeError, match=message):
        fdist.init_distributed("cpu")
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error(monkeypatch):
    _set_env(monkeypatch, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    with pytest.raises(RuntimeError, match="device cuda, but CUDA is not available"):
        fdist.init_distributed("cuda")
    assert not dist.is_initialized()


def test_torch_without_distributed_is_one_clear_error(monkeypatch):
    _set_env(monkeypatch, {"WORLD_SIZE": "2", "RANK": "0"})
    monkeypatch.setattr(dist, "is_available", lambda: False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="no torch.distributed"):
        fdist.init_distributed("cpu")


def test_bad_local_rank_in_current_is_the_module_error(monkeypatch, tmp_path):
    _set_env(monkeypatch, {"LOCAL_RANK": "zero"})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="LOCAL_RANK must be an integer"):
            fdist.current()
    finally:
        dist.destroy_process_group()


def _caller_group_worker(rank, world, store, out):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(key, None)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        info = fdist.init_distributed("cpu")
        torch.save((info.rank, info.world_size, info.enabled, info.is_main), os.path.join(out, f"rank{rank}.pt"))
        fdist.cleanup()
        assert dist.is_initialized(), "fdist.cleanup() destroyed the caller's process group"
        dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_group_started_by_the_caller_gives_its_rank_and_size(tmp_path):
    # A launcher such as mp.spawn starts the group without setting WORLD_SIZE / RANK; training must
    # still see two processes (sampler split, DDP), not fall back to one.
    mp.spawn(_caller_group_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert got == [(0, 2, True, True), (1, 2, True, False)]


def test_cleanup_leaves_a_group_started_by_the_caller(monkeypatch, tmp_path):
    _set_env(monkeypatch, {})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        fdist.init_distributed("cpu")
        fdist.cleanup()
        assert dist.is_initialized()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_cleanup_destroys_the_group_it_started(monkeypatch, tmp_path):
    # The env path (as under torchrun) with the rendezvous swapped for a one-process file store.
    real = dist.init_process_group
    _set_env(monkeypatch, {"WORLD_SIZE": "2", "RANK": "0"})
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: real(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=kw["rank"], world_size=1))
    try:
        fdist.init_distributed("cpu")
        assert dist.is_initialized()
        fdist.cleanup()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
