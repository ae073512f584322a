"""Checkpoint files: written atomically (temp file in the same folder, fsync, os.replace, folder
fsync) with ordinary file permissions, loaded with weights_only=True; a truncated or corrupt file
and a checkpoint of another model configuration each give one clear error naming the file."""
import os

import pytest
import torch

import fmn.checkpoint as ckpt
from fmn.checkpoint import CheckpointError, load_checkpoint, model_state, save_checkpoint
from fmn.engine.trainer import Trainer
from fmn.models import build_model_from_config
from test_trainer import C, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def _fd_path(fd):
    return os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name file descriptors")
def test_save_is_temp_file_fsync_replace_in_the_same_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (events.append(("replace", a, b)), real_replace(a, b))[1])
    target = tmp_path / "last.pt"
    save_checkpoint({"w": torch.randn(3)}, target)
    replaces = [e for e in events if e[0] == "replace"]
    assert len(replaces) == 1
    _, src, dst = replaces[0]
    assert os.path.dirname(os.path.abspath(src)) == str(tmp_path) and dst == str(target) and src != dst
    i = events.index(replaces[0])
    assert ("fsync", os.path.realpath(src)) in events[:i], "the temp file is not fsynced before the rename"
    assert ("fsync", os.path.realpath(tmp_path)) in events[i + 1:], "the folder is not fsynced after the rename"
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_save_interrupted_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(4)}, target)
    real_save = torch.save

    def dying_save(obj, fh):
        fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2, "w": torch.zeros(4)}, target)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    state = load_checkpoint(target)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(4))
    assert os.listdir(tmp_path) == ["last.pt"], "the temp file was left behind"


def test_saved_checkpoint_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint({"w": torch.ones(1)}, tmp_path / "model.pt")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644  # as torch.save(path) would give, not mkstemp's 0o600


class NotATensor:
    pass


def damage_tensor_bytes(path, tensor):
    """Overwrite 8 bytes inside ``tensor``'s stored data: torch.load alone returns other values."""
    data = bytearray(path.read_bytes())
    at = bytes(data).index(tensor.numpy().tobytes()) + 4 * (tensor.numel() // 2)
    data[at:at + 8] = b"\x7f" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "pickled_object", "damaged_tensor_bytes"])
def test_unreadable_checkpoint_gives_one_error_naming_the_file(tmp_path, kind):
    path = tmp_path / "last.pt"
    w = torch.randn(256)
    if kind == "pickled_object":  # loads only with weights_only=False
        torch.save({"model": {}, "obj": NotATensor()}, path)
    elif kind == "damaged_tensor_bytes":
        save_checkpoint({"model": {"w": w}, "epoch": 3}, path)
        damage_tensor_bytes(path, w)
        assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], w)
    else:
        save_checkpoint({"model": {"w": w}, "epoch": 3}, path)
        data = path.read_bytes()
        path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(200)}[kind])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: cannot load this checkpoint (") and "truncated, corrupt" in msg
    assert "\n" not in msg
    with pytest.raises(CheckpointError, match="cannot load"):
        model_state(path)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="last.pt"):
        load_checkpoint(tmp_path / "last.pt")


def test_checkpoint_holds_only_weights_only_types(tmp_path):
    cfg = tiny_cfg(tmp_path)
    model = build_model_from_config(cfg, C)
    trainer = Trainer(cfg, model, [], torch.device("cpu"), str(tmp_path), log=None)
    trainer._start_stage(1, fresh=True)
    trainer.save(1, 1)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (state["stage"], state["epoch"], state["num_classes"]) == (1, 1, C)
    assert state["config"]["model"]["base_width"] == 8


@pytest.mark.parametrize("change", [("model.base_width=16", None), ("fmn.local_layer=res3", None),
                                    (None, C + 1), ("model.bnneck=true", None)])
def test_resume_from_another_model_config_names_file_and_settings(tmp_path, change):
    setting, num_classes = change
    cfg = tiny_cfg(tmp_path)
    trainer = Trainer(cfg, build_model_from_config(cfg, C), [], torch.device("cpu"), str(tmp_path), log=None)
    trainer._start_stage(1, fresh=True)
    trainer.save(1, 1)

    other = tiny_cfg(tmp_path, *([setting] if setting else []))
    model = build_model_from_config(other, num_classes or C)
    resumed = Trainer(other, model, [], torch.device("cpu"), str(tmp_path), log=None)
    with pytest.raises(CheckpointError) as info:
        resumed.fit(resume=True)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'last.pt'} was written for a different model: ")
    if setting:
        key, value = setting.split("=")
        assert f"{key.split('.')[1]}: " in msg and value.lower() in msg.lower()
    else:
        assert f"num_classes: {C} -> {C + 1}" in msg and f"({C}, " in msg and f"({C + 1}, " in msg


@pytest.mark.parametrize("setting, shown", [("model.last_stride=1", "last_stride: 2 -> 1"),
                                             ("model.dropout=0.5", "dropout: 0.0 -> 0.5"),
                                             ("fmn.mask_max_logit=10.0", "mask_max_logit: None -> 10.0"),
                                             ("data.height=63", "input_size: (64, 32) -> (63, 32)")])
def test_resume_refuses_another_architecture_whose_weights_fit(tmp_path, setting, shown):
    # these settings change the network but no tensor shape: load_state_dict alone accepts the weights
    cfg = tiny_cfg(tmp_path)
    trainer = Trainer(cfg, build_model_from_config(cfg, C), [], torch.device("cpu"), str(tmp_path), log=None)
    trainer._start_stage(1, fresh=True)
    trainer.save(1, 1)
    other = tiny_cfg(tmp_path, setting)
    model = build_model_from_config(other, C)
    model.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["model"])
    resumed = Trainer(other, model, [], torch.device("cpu"), str(tmp_path), log=None)
    with pytest.raises(CheckpointError) as info:
        resumed.fit(resume=True)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'last.pt'} was written for a different model: ") and shown in msg


@pytest.mark.parametrize("setting", ["model.backend=torch", "fmn.lan_init=grn", "model.pretrained=/elsewhere.pth"])
def test_resume_accepts_settings_that_leave_the_network_as_it_is(tmp_path, setting):
    cfg = tiny_cfg(tmp_path, "train.stage1={epochs: 1, lr: 0.05, milestones: [1], gamma: 0.1}",
                   "train.stage2={epochs: 0, lr: 0.05, milestones: [1], gamma: 0.1}")
    trainer = Trainer(cfg, build_model_from_config(cfg, C), [], torch.device("cpu"), str(tmp_path), log=None)
    trainer._start_stage(1, fresh=True)
    trainer.save(1, 1)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    section, key = setting.split("=")[0].split(".")
    other = dict(cfg, **{section: dict(cfg[section], **{key: setting.split("=")[1]})})
    torch.manual_seed(5)
    model = build_model_from_config(dict(other, model=dict(other["model"], pretrained=None)), C)
    Trainer(other, model, [], torch.device("cpu"), str(tmp_path), log=None).fit(resume=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_model_state_strips_ddp_prefix(tmp_path):
    save_checkpoint({"model": {"module.w": torch.ones(2), "b": torch.zeros(1)}}, tmp_path / "m.pt")
    assert sorted(model_state(tmp_path / "m.pt")) == ["b", "w"]
