"""fmn.config at its edges: numbers as YAML 1.2 reads them, keys given twice, empty sections,
paths taken as written, choices that are not the same type, non-finite numbers, settings that
contradict each other, unknown dataset and model names, and configs that lack a key."""
import copy
import os

import pytest

from fmn.cli import main
from fmn.config import ConfigError, load_config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_error(overrides):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    return str(exc.value)


# ------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,key,value", [
    ("train.stage1.lr=1e-3", ("train", "stage1", "lr"), 1e-3),
    ("train.weight_decay=5e-4", ("train", "weight_decay"), 5e-4),
    ("train.stage2.lr=2E-2", ("train", "stage2", "lr"), 2e-2),
    ("train.triplet_margin=1.0e0", ("train", "triplet_margin"), 1.0),
    ("fmn.mask_max_logit=+1e1", ("fmn", "mask_max_logit"), 10.0),
])
def test_overrides_read_exponent_numbers_as_numbers(text, key, value):
    node = load_config(None, [text])
    for part in key:
        node = node[part]
    assert isinstance(node, float) and node == pytest.approx(value)


def test_files_read_exponent_numbers_as_numbers(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  weight_decay: 5e-4\n  stage1: {epochs: 3, lr: 1e-2, milestones: [2], gamma: 1e-1}\n")
    t = load_config(path)["train"]
    assert (t["weight_decay"], t["stage1"]["lr"], t["stage1"]["gamma"]) == (5e-4, 1e-2, 1e-1)
    seed = tmp_path / "seed.yaml"
    seed.write_text("model: {name: mmga}\ndata:\n  kp_sigma: 5e-2\nmmga:\n  attention_weight: 1e-1\n")
    cfg = load_config(seed)
    assert (cfg["data"]["kp_sigma"], cfg["mmga"]["attention_weight"]) == (5e-2, 1e-1)


def test_a_key_given_twice_in_a_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  stage1: {epochs: 3, lr: 0.05, milestones: [2], gamma: 0.1}\n"
                    "eval:\n  alpha: 0.5\n"
                    "train:\n  momentum: 0.8\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: line 5, column 1: found the key 'train' twice"):
        load_config(path)
    inner = tmp_path / "inner.yaml"
    inner.write_text("data:\n  batch_size: 32\n  batch_size: 64\n")
    with pytest.raises(ConfigError, match="found the key 'batch_size' twice"):
        load_config(inner)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "found the key 'train' twice" in err and "Traceback" not in err


@pytest.mark.parametrize("text,message", [
    ("model: [unclosed\n", "line 2, column 1: expected ',' or ']', but got '<stream end>' "
                           "(while parsing a flow sequence at line 1, column 8)"),
    ("model:\n\tbackbone: resnet18\n", "line 2, column 1: found character '\\t' that cannot start any token "
                                       "(while scanning for the next token)"),
])
def test_yaml_syntax_errors_are_one_line_naming_the_place(tmp_path, capsys, text, message):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == f"{path}: not valid YAML: {message}"
    assert main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err == f"fmn train: configuration error: {path}: not valid YAML: {message}\n"
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["train.stage1.milestones=[1,"])
    assert "\n" not in str(exc.value) and "line 1, column 4: expected the node content" in str(exc.value)


def test_a_section_with_every_key_commented_out_keeps_the_defaults(tmp_path):
    path = tmp_path / "empty_section.yaml"
    path.write_text("eval:\n#  alpha: 0.7\ndata:\n  options:\n  batch_size: 32\n")
    cfg = load_config(path)
    assert cfg["eval"] == load_config(None)["eval"]
    assert cfg["data"]["options"] == {} and cfg["data"]["batch_size"] == 32


@pytest.mark.parametrize("text,expected", [
    ("output.dir=runs/exp #3", "runs/exp #3"),    # YAML reads ' #3' as a comment
    ("output.dir=2024", "2024"),                  # YAML reads an int
    ("data.root=off", "off"),                     # YAML 1.1 reads a bool
    ("data.root=/data/market: v2", "/data/market: v2"),   # YAML reads a mapping
    ("output.dir='runs/a b'", "runs/a b"),
    ("model.pretrained=null", None),
    ("model.pretrained=~", None),
    ("model.pretrained=", None),
])
def test_path_overrides_are_taken_as_written(text, expected):
    key, _ = text.split("=", 1)
    section, name = key.split(".")
    assert load_config(None, [text])[section][name] == expected


def test_path_options_are_taken_as_written(tmp_path):
    name = f"{tmp_path}/parts #1"
    assert load_config(None, [f"data.parts_root={name}"], model="mmga")["data"]["parts_root"] == name


# ------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("text,message", [
    ("model.last_stride=true", "model.last_stride=True is invalid: expected one of 1, 2"),
    ("model.last_stride=1.0", "model.last_stride=1.0 is invalid: expected one of 1, 2"),
    ("train.channels_last=1", "train.channels_last=1 is invalid: expected one of auto, true, false"),
    ("train.channels_last=0", "train.channels_last=0 is invalid"),
])
def test_a_choice_must_have_the_choices_type(text, message):
    assert message in config_error([text])


@pytest.mark.parametrize("device", ["cuda:x", "cuda:-1", "cuda:1:2", "cudax", "CPU"])
def test_device_must_be_auto_cpu_cuda_or_cuda_n(device):
    assert f"train.device='{device}' is invalid: expected auto, cpu, cuda or cuda:N" in config_error(
        [f"train.device={device}"])
    assert load_config(None, ["train.device=cuda:1"])["train"]["device"] == "cuda:1"


@pytest.mark.parametrize("text", ["train.stage1.lr=.inf", "train.stage2.lr=.inf", "train.weight_decay=.inf",
                                  "train.triplet_margin=.inf", "train.rank_weight=.inf", "train.grad_clip=.inf",
                                  "fmn.mask_max_logit=.inf"])
def test_numbers_must_be_finite(text):
    key = text.split("=")[0]
    assert f"{key}=inf is invalid: expected a number" in config_error([text])


def test_nesterov_needs_momentum():
    message = config_error(["train.nesterov=true", "train.momentum=0"])
    assert "train.nesterov=True is invalid: expected false when train.momentum is 0" in message
    assert load_config(None, ["train.nesterov=true"])["train"]["nesterov"] is True


def test_the_triplet_loss_needs_positives_and_negatives_in_a_batch():
    assert "data.num_instances=1 is invalid: expected at least 2 when train.triplet_weight > 0" in config_error(
        ["train.triplet_weight=1", "data.num_instances=1", "data.batch_size=16"])
    assert "data.batch_size=4 is invalid: expected at least 2 identities" in config_error(
        ["train.triplet_weight=1", "data.num_instances=4", "data.batch_size=4"])
    # without the triplet term one identity per batch or one image per identity is a legal PK batch
    load_config(None, ["data.num_instances=1", "data.batch_size=16"])
    load_config(None, ["data.num_instances=4", "data.batch_size=4"])
    load_config(None, ["train.triplet_weight=1", "data.num_instances=2", "data.batch_size=4"])


def test_the_triplet_check_applies_to_the_related_methods():
    with pytest.raises(ConfigError, match="data.num_instances=1 is invalid"):
        load_config("mgran", ["data.num_instances=1", "train.triplet_weight=1"])


def test_unknown_dataset_and_model_names_fail_at_load_time(capsys):
    assert "data.name='market1502' is invalid: expected one of cuhk03, custom, dukemtmc, market1501, msmt17, " \
           "synthetic (unknown dataset 'market1502')" in config_error(["data.name=market1502"])
    assert "model.name='fnm' is invalid: expected one of fmn, mgran, mmga, pmm (unknown model 'fnm')" in config_error(
        ["model.name=fnm"])
    assert load_config(None, ["data.name=Market"])["data"]["name"] == "Market"   # an alias of build_dataset
    assert main(["train", "--set", "data.name=market1502", "--data-root", "/nonexistent"]) == 2
    assert "unknown dataset 'market1502'" in capsys.readouterr().err


@pytest.mark.parametrize("path", [("data", "erase_p"), ("train", "stage1", "gamma"), ("eval",)])
def test_a_config_without_a_key_is_one_config_error(path):
    cfg = copy.deepcopy(load_config(None))
    node = cfg
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    with pytest.raises(ConfigError, match="is missing"):
        validate(cfg)


def test_an_unknown_model_section_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  name: mmga\nmmga:\n  part_dimm: 128\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and "mmga.part_dimm" in str(err.value)


@pytest.mark.parametrize("text,message", [
    ("model:\n  name: mmga\nseed:\n  part_dim: 128\n", "the options of mmga are now the section 'mmga'"),
    ("model:\n  name: fmn\npmm:\n  mix_prob: 0.5\n", "section 'pmm' holds the options of model pmm"),
])
def test_a_section_of_another_model_or_the_old_seed_section_is_one_error(tmp_path, text, message):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
