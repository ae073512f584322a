"""Run configuration: one schema and one loader for every model and file.

    cfg = load_config("market1501", overrides=["train.stage1.lr=0.05", "data.root=/data/market"])

The sections ``model`` (the settings every model shares), ``data``, ``train``, ``eval``, ``output``
and ``synth`` are defined here (``DEFAULTS``, the paper's settings). Each model adds its own
section, named after it (``fmn``, ``mmga``, ``mgran``, ``pmm``), registered next to the model with
:func:`register_section`; a config holds the section of the model it names and no other. Dataset
names are registered by ``fmn.data`` (:func:`register_datasets`). This module imports nothing
else of fmn: the layers above it (data, models, engine, cli) register what it checks.

A config file is a path or the name of a config shipped with fmn (``fmn/configs/<name>.yaml``:
:func:`bundled_configs`). A YAML file may hold any subset of the keys in ``DEFAULTS``; unknown keys, a key given twice in
one mapping and bad values raise ``ConfigError`` naming the key, the value and what was expected.
An override ``a.b.c=value`` parses ``value`` as YAML (``0.05`` -> float, ``[20, 40]`` -> list,
``null`` -> None), except for the paths in ``PATH_KEYS``, which are taken as written (``null`` or
``~`` still mean None, a quoted value is unquoted). Files and overrides read numbers as YAML 1.2
does: ``1e-3`` is a float, not the string PyYAML's YAML 1.1 rules make of it.
"""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "model": {
        "name": "fmn",                   # fmn | mmga | mgran | pmm: its own section holds its options
        "backbone": "resnet50",          # resnet18 | resnet34 | resnet50 | resnet101
        "pretrained": None,              # path to a local torchvision ImageNet state dict
        "base_width": 64,                # 64 = the standard ResNet; smaller is faster
        "last_stride": 2,
        "bnneck": False,
        "dropout": 0.0,
        "backend": None,                 # fmn_kernels backend; None = FMN_BACKEND or auto
    },
    "data": {
        "name": "market1501",            # market1501 | dukemtmc | cuhk03 | msmt17 | custom | synthetic
        "root": "data/market1501",
        "options": {},                   # extra keyword arguments of fmn.data.build_dataset
        "height": 256,
        "width": 128,
        "batch_size": 64,
        "num_instances": 4,              # images per identity in a batch (PK sampling)
        "workers": 4,
        "cache": False,
        "augment": True,                 # horizontal flip + random crop (paper Sec. 4.2)
        "flip_p": 0.5,                   # probability of a horizontal flip
        "pad": 10,                       # random crop: pad by this many pixels, crop back to H x W
        "erase_p": 0.0,                  # random erasing probability (not in the paper: 0)
        "parts_root": None,              # part masks of models that train on them (default <root>/parts)
        "kp_sigma": 0.1,                 # keypoint region width, as a fraction of the input width
    },
    "train": {
        "seed": 0,
        "device": "auto",                # auto | cpu | cuda | cuda:N
        "num_threads": None,             # CPU threads of torch (None: torch's default)
        "amp": "auto",                   # auto (bf16 on a GPU that has it, else none) | none | bf16 | fp16
        "channels_last": "auto",         # auto (on GPU) | true | false
        "optimizer": "sgd",              # sgd (the paper's, with momentum / nesterov) | adam
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "nesterov": False,
        "label_smoothing": 0.0,
        "rank_margin": 0.05,             # m in eq. (5)
        "rank_weight": 1.0,
        "triplet_weight": 0.0,           # 0 = off (the paper uses none)
        "triplet_margin": 0.3,
        "grad_clip": None,
        "health": "stop",                # stop | warn | off: a collapsed or non-learning run (fmn.engine.health)
        "health_patience": 3,            # epochs at chance before a run counts as not learning
        "val_ids": 0,                    # training identities held out for validation (0: none)
        "val_every": 5,                  # validate every K epochs (and at each stage's last epoch)
        "select_best": False,            # model.pt: the final stage's epoch with the best validation mAP
        "stage1": {"epochs": 30, "lr": 0.1, "milestones": [20], "gamma": 0.1},
        "stage2": {"epochs": 45, "lr": 0.1, "milestones": [35], "gamma": 0.1},
        "warmup_epochs": 0,
        "max_steps_per_epoch": None,     # cap on iterations per epoch (quick runs)
        "log_every": 10,
        "tensorboard": True,             # scalars under <output.dir>/tb when tensorboard is installed
        "progress": "auto",              # auto: progress bars on a terminal only; in a log, a line per epoch
    },
    "eval": {
        "alpha": 0.5,                    # D = [a g/|g|, (1-a) l/|l|], eq. (6)
        "flip": True,
        "rerank": True,
        "batch_size": 128,
    },
    "output": {
        "dir": "runs/market1501",
    },
    "synth": {                           # the synthetic dataset written by `fmn synth` / `fmn demo`;
                                         # a value set here must match a dataset already at data.root
        "preset": "default",             # default | hard (fmn.data.synthetic_hard: a small real two-camera set)
        "num_ids": None,                 # null: the preset's (default 96, hard 700)
        "num_cams": None,                # null: the preset's (default 4, hard 2)
        "images_per_id_per_cam": None,   # null: the preset's (default 4, hard 2-4 drawn per identity and camera)
        "height": None,                  # null: 128
        "width": None,                   # null: 64
        "seed": None,                    # null: 0
    },
}

BACKBONE_CHOICES = ("resnet18", "resnet34", "resnet50", "resnet101")
AMP_CHOICES = ("auto", "none", "bf16", "fp16")
BACKEND_CHOICES = (None, "auto", "torch", "cpu", "cuda", "triton")


PATH_KEYS = ("model.pretrained", "data.root", "output.dir", "data.parts_root")
COMMON_SECTIONS = tuple(DEFAULTS)


class Section:
    """A model's own config section: its defaults, a check of its values (raises ConfigError or
    ValueError naming the key), and the keys that shape no weight (a checkpoint evaluated with
    another value of these is the same network)."""

    def __init__(self, defaults: dict, check=None, training_only: tuple = (), schedules: tuple = ("stage1", "stage2")):
        self.defaults, self.check, self.training_only = defaults, check, tuple(training_only)
        self.schedules = tuple(schedules)


SECTIONS: dict[str, Section] = {}
DATASET_NAMES: dict[str, str] = {}      # name or alias -> dataset name, registered by fmn.data


def register_section(model: str, defaults: dict, check=None, training_only: tuple = (),
                     schedules: tuple = ("stage1", "stage2")) -> None:
    """Declare model ``model``'s section (called next to the model, by ``fmn.models.register_model``);
    ``schedules``: the ``train.stageN`` sections its stages follow (the others default to 0 epochs)."""
    if model in COMMON_SECTIONS:
        raise ValueError(f"a model cannot be named after the config section {model!r}")
    SECTIONS[model] = Section(copy.deepcopy(defaults), check, training_only, schedules)


def register_datasets(names: dict[str, str]) -> None:
    """Declare dataset names (and aliases) for ``data.name`` (called by ``fmn.data``)."""
    DATASET_NAMES.update(names)


def available_models() -> list[str]:
    return sorted(SECTIONS)


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def bundled_configs() -> list[str]:
    """Names of the configs shipped inside the package (``fmn/configs/<name>.yaml``)."""
    return sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def config_file(name_or_path: str | os.PathLike) -> str:
    """The file of a config given as a path or as the name of a shipped config ("demo", "pmm")."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path) or os.sep in path or path.endswith((".yaml", ".yml")):
        return path
    shipped = os.path.join(CONFIG_DIR, f"{path}.yaml")
    if os.path.isfile(shipped):
        return shipped
    raise ConfigError(f"config {path!r}: no such file, and not a config shipped with fmn "
                      f"({', '.join(bundled_configs())})")


class ConfigError(ValueError):
    """A bad configuration file, key or value."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float and refuses a key given twice in one
    mapping (PyYAML keeps the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found the key {key!r} twice",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _load_yaml(stream) -> Any:
    return yaml.load(stream, Loader=_Loader)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's four-line message in one line: 'line L, column C: problem (while ... at line L, column C)'."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem or mark is None:
        return " ".join(str(exc).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        text += f" ({context}" + (f" at line {context_mark.line + 1}, column {context_mark.column + 1})"
                                  if context_mark is not None else ")")
    return text


def _merge(base: dict, update: dict, path: str, strict: bool = True) -> dict:
    for key, value in update.items():
        where = f"{path}.{key}" if path else str(key)
        if strict and key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{where}'; known keys here: {known}")
        if isinstance(base.get(key), dict) and value is None:
            continue    # a section with every key commented out
        if isinstance(base.get(key), dict) and key != "options":
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
            _merge(base[key], value, where, strict)
        else:
            base[key] = copy.deepcopy(value)
    return base


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.stage1.lr=0.05' -> (['train', 'stage1', 'lr'], 0.05)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value (e.g. train.stage1.lr=0.05)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    written = raw.strip()
    if key in PATH_KEYS and written and written[0] not in "'\"" and written not in ("null", "Null", "NULL", "~"):
        return key.split("."), written
    try:
        value = _load_yaml(raw) if written else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': cannot parse value '{raw}': {_yaml_problem(exc)}") from None
    return key.split("."), value


def apply_override(cfg: dict, text: str) -> dict:
    parts, value = parse_override(text)
    node = cfg
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if part not in node:
            raise ConfigError(f"unknown config key '{where}' in override '{text}'; known keys: {', '.join(sorted(node))}")
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{where}' is not a section; cannot set '{text}'")
    last = parts[-1]
    if last not in node and not (len(parts) >= 2 and parts[-2] == "options"):
        raise ConfigError(
            f"unknown config key '{'.'.join(parts)}' in override '{text}'; known keys: {', '.join(sorted(node))}"
        )
    if isinstance(node.get(last), dict) and parts[-1] != "options":
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{'.'.join(parts)}' is a section; give a sub-key (e.g. {'.'.join(parts)}.x=...)")
        _merge(node[last], value, ".".join(parts))
    else:
        node[last] = value
    return cfg


def read_yaml_sections(path: str) -> dict:
    """The top-level mapping of the YAML file at ``path`` ({} for an empty file), or ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        try:
            data = _load_yaml(fh)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                model: str | None = None) -> dict:
    """DEFAULTS <- the file ``path`` (a path or a shipped config's name) <- each ``key=value``
    override, with the section of the model named by ``model`` (else the last ``model.name``
    override, else the file's, else ``fmn``); then ``validate``."""
    cfg = copy.deepcopy(DEFAULTS)
    data: dict = {}
    if path is not None:
        path = config_file(path)
        data = read_yaml_sections(path)
    name = model or _override_model(overrides) or (data.get("model") or {}).get("name") or cfg["model"]["name"]
    if not isinstance(name, str) or name not in SECTIONS:
        raise ConfigError(f"config value model.name={name!r} is invalid: expected one of "
                          f"{', '.join(available_models())} (unknown model {name!r})")
    cfg[name] = copy.deepcopy(SECTIONS[name].defaults)
    for schedule in ("stage1", "stage2"):
        if schedule not in SECTIONS[name].schedules:
            cfg["train"][schedule]["epochs"] = 0
    try:
        _check_sections(data, name)
        _merge(cfg, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for text in overrides or []:
        apply_override(cfg, text)
    cfg["model"]["name"] = name
    return validate(cfg)


def _override_model(overrides: list[str] | None) -> str | None:
    names = [parse_override(t)[1] for t in overrides or [] if t.split("=", 1)[0].strip() == "model.name"]
    return names[-1] if names else None


def _check_sections(data: dict, name: str) -> None:
    if "seed" in data:
        raise ConfigError(f"section 'seed': the options of {name} are now the section '{name}' "
                          "(and seed.parts_root / seed.kp_sigma are data.parts_root / data.kp_sigma)")
    for section in data:
        if section in SECTIONS and section != name:
            raise ConfigError(f"section '{section}' holds the options of model {section}, but model.name is "
                              f"{name}; a config holds the section of its own model only")


def upgrade_config(cfg: dict) -> dict:
    """A config stored in a checkpoint by an earlier fmn, in today's schema: the FMN options of the
    model section move to the ``fmn`` section, a related method's ``seed`` section to the section
    named after the model (its mask-file options to ``data``), and settings added since take their
    defaults."""
    cfg = copy.deepcopy(cfg)
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    name = model.get("name")
    moved = {k: model.pop(k) for k in ("local_layer", "mask_max_logit", "lan_init") if k in model}
    if name == "fmn" and moved and "fmn" not in cfg:
        cfg["fmn"] = moved
    seed = cfg.pop("seed", None)
    if isinstance(seed, dict) and name:
        data = cfg.setdefault("data", {})
        for key in ("parts_root", "kp_sigma"):
            if key in seed:
                data[key] = seed.pop(key)
        cfg.setdefault(name, seed)
    _fill(cfg, DEFAULTS)
    if name in SECTIONS and isinstance(cfg.get(name), dict):
        _fill(cfg[name], SECTIONS[name].defaults)
    return cfg


def _fill(cfg: dict, defaults: dict) -> None:
    """Add the keys of ``defaults`` that ``cfg`` lacks (settings newer than the config), recursively."""
    for key, value in defaults.items():
        if key not in cfg:
            cfg[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(cfg[key], dict) and key != "options":
            _fill(cfg[key], value)


def with_sections_of(trained: dict, other: dict) -> dict:
    """A trained model's config with every section of ``other`` except the model's (``model`` and
    the model's own section), keeping the input size the model was trained at: evaluate or
    visualise a checkpoint on another dataset or device."""
    cfg = copy.deepcopy(trained)
    for section, values in other.items():
        if section != "model" and section not in SECTIONS:
            cfg[section] = copy.deepcopy(values)
    cfg["data"]["height"], cfg["data"]["width"] = trained["data"]["height"], trained["data"]["width"]
    for schedule in ("stage1", "stage2"):     # the schedules the model was trained on
        cfg["train"][schedule] = copy.deepcopy(trained["train"][schedule])
    return cfg


# ------------------------------------------------------------------------------ validation
def _get(cfg: dict, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config key '{key}' is missing (a config written by another version of fmn?)")
        node = node[part]
    return node


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(cond: bool, key: str, value: Any, expected: str) -> None:
    if not cond:
        raise ConfigError(f"config value {key}={value!r} is invalid: expected {expected}")


def _int(cfg, key, lo=None, hi=None, allow_none=False):
    v = _get(cfg, key)
    if allow_none and v is None:
        return
    desc = "an integer" + (f" >= {lo}" if lo is not None else "") + (f" <= {hi}" if hi is not None else "")
    if allow_none:
        desc += " or null"
    _check(_is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi), key, v, desc)


def _num(cfg, key, lo=None, hi=None, lo_open=False, hi_open=False, allow_none=False):
    v = _get(cfg, key)
    if allow_none and v is None:
        return
    ok = _is_num(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    rng = ""
    if lo is not None:
        rng += f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        rng += f"{' and' if rng else ''} {'<' if hi_open else '<='} {hi}"
    _check(ok, key, v, "a number" + rng + (" or null" if allow_none else ""))


def _bool(cfg, key):
    v = _get(cfg, key)
    _check(isinstance(v, bool), key, v, "true or false")


def _choice(cfg, key, choices):
    v = _get(cfg, key)
    ok = any(type(v) is type(c) and v == c for c in choices)   # True is not the choice 1, nor 1.0
    _check(ok, key, v, "one of " + ", ".join("null" if c is None else str(c).lower() if isinstance(c, bool) else str(c)
                                             for c in choices))


def _str(cfg, key, allow_none=False):
    v = _get(cfg, key)
    if allow_none and v is None:
        return
    _check(isinstance(v, str) and v != "", key, v, "a non-empty string" + (" or null" if allow_none else ""))


def validate(cfg: dict) -> dict:
    """Check every value; raise ``ConfigError`` on the first bad one. Returns ``cfg``."""
    _check_model(cfg)
    _check_data(cfg)
    _check_train(cfg)
    _num(cfg, "eval.alpha", lo=0.0, hi=1.0)
    _bool(cfg, "eval.flip")
    _bool(cfg, "eval.rerank")
    _int(cfg, "eval.batch_size", lo=1)
    _str(cfg, "output.dir")
    _choice(cfg, "synth.preset", ("default", "hard"))
    hard = cfg["synth"]["preset"] == "hard"
    _int(cfg, "synth.num_ids", lo=2, hi=9999, allow_none=True)
    _int(cfg, "synth.num_cams", lo=2, hi=6 if hard else None, allow_none=True)
    _int(cfg, "synth.images_per_id_per_cam", lo=2 if hard else 1, allow_none=True)
    _int(cfg, "synth.height", lo=32 if hard else 16, allow_none=True)
    _int(cfg, "synth.width", lo=16 if hard else 8, allow_none=True)
    _int(cfg, "synth.seed", lo=0, allow_none=True)
    return cfg


def _check_model(cfg: dict) -> None:
    _str(cfg, "model.name")
    name = cfg["model"]["name"]
    _check(name in SECTIONS, "model.name", name, f"one of {', '.join(available_models())} (unknown model {name!r})")
    _choice(cfg, "model.backbone", BACKBONE_CHOICES)
    _str(cfg, "model.pretrained", allow_none=True)
    _int(cfg, "model.base_width", lo=1)
    _choice(cfg, "model.last_stride", (1, 2))
    _bool(cfg, "model.bnneck")
    _num(cfg, "model.dropout", lo=0.0, hi=1.0, hi_open=True)
    _choice(cfg, "model.backend", BACKEND_CHOICES)
    others = sorted(k for k in cfg if k in SECTIONS and k != name)
    if others:
        raise ConfigError(f"section '{others[0]}' holds the options of model {others[0]}, but model.name is {name}")
    section = cfg.get(name)
    if not isinstance(section, dict):
        raise ConfigError(f"config section '{name}' (the options of model {name}) is missing")
    unknown = sorted(set(section) - set(SECTIONS[name].defaults))
    if unknown:
        raise ConfigError(f"unknown config key '{name}.{unknown[0]}'; known keys: "
                          f"{', '.join(sorted(SECTIONS[name].defaults))}")
    if SECTIONS[name].check is not None:
        try:
            SECTIONS[name].check(cfg)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from None


def _check_data(cfg: dict) -> None:
    _str(cfg, "data.name")
    name = cfg["data"]["name"].lower()
    if DATASET_NAMES:
        choices = sorted(set(DATASET_NAMES.values()))
        _check(name in DATASET_NAMES, "data.name", cfg["data"]["name"],
               f"one of {', '.join(choices)} (unknown dataset {cfg['data']['name']!r})")
    _str(cfg, "data.root")
    _check(isinstance(cfg["data"]["options"], dict), "data.options", cfg["data"]["options"], "a mapping")
    _int(cfg, "data.height", lo=32)
    _int(cfg, "data.width", lo=32)
    _int(cfg, "data.batch_size", lo=2)
    _int(cfg, "data.num_instances", lo=1)
    bs, k = cfg["data"]["batch_size"], cfg["data"]["num_instances"]
    _check(bs % k == 0, "data.batch_size", bs, f"a multiple of data.num_instances ({k})")
    if _is_num(_get(cfg, "train.triplet_weight")) and cfg["train"]["triplet_weight"] > 0:
        # batch-hard triplet: every anchor needs a positive (K >= 2) and a negative (P >= 2)
        _check(k >= 2, "data.num_instances", k, "at least 2 when train.triplet_weight > 0 (no positive pairs)")
        _check(bs >= 2 * k, "data.batch_size", bs,
               f"at least 2 identities of data.num_instances ({k}) when train.triplet_weight > 0 (no negative pairs)")
    _int(cfg, "data.workers", lo=0)
    _bool(cfg, "data.cache")
    _bool(cfg, "data.augment")
    _num(cfg, "data.flip_p", lo=0.0, hi=1.0)
    _int(cfg, "data.pad", lo=0)
    _num(cfg, "data.erase_p", lo=0.0, hi=1.0)
    _str(cfg, "data.parts_root", allow_none=True)
    _num(cfg, "data.kp_sigma", lo=0.0, lo_open=True)


def _check_train(cfg: dict) -> None:
    _int(cfg, "train.seed", lo=0)
    dev = cfg["train"]["device"]
    _check(isinstance(dev, str) and re.fullmatch(r"auto|cpu|cuda(?::[0-9]+)?", dev) is not None,
           "train.device", dev, "auto, cpu, cuda or cuda:N")
    _int(cfg, "train.num_threads", lo=1, allow_none=True)
    _choice(cfg, "train.amp", AMP_CHOICES)
    _choice(cfg, "train.channels_last", ("auto", True, False))
    _choice(cfg, "train.optimizer", ("sgd", "adam"))
    _num(cfg, "train.momentum", lo=0.0, hi=1.0, hi_open=True)
    _num(cfg, "train.weight_decay", lo=0.0)
    _bool(cfg, "train.nesterov")
    _check(not cfg["train"]["nesterov"] or cfg["train"]["momentum"] > 0, "train.nesterov", True,
           "false when train.momentum is 0 (Nesterov needs momentum)")
    _num(cfg, "train.label_smoothing", lo=0.0, hi=1.0, hi_open=True)
    _num(cfg, "train.rank_margin", lo=0.0, hi=1.0)
    _num(cfg, "train.rank_weight", lo=0.0)
    _num(cfg, "train.triplet_weight", lo=0.0)
    _num(cfg, "train.triplet_margin", lo=0.0)
    _num(cfg, "train.grad_clip", lo=0.0, lo_open=True, allow_none=True)
    _choice(cfg, "train.health", ("stop", "warn", "off"))
    _int(cfg, "train.health_patience", lo=1)
    _int(cfg, "train.val_ids", lo=0)
    _int(cfg, "train.val_every", lo=1)
    _bool(cfg, "train.select_best")
    _check(not cfg["train"]["select_best"] or cfg["train"]["val_ids"] > 0, "train.select_best", True,
           "false when train.val_ids is 0 (there is no validation split to select by)")
    for stage in ("stage1", "stage2"):
        _check_schedule(cfg, stage)
    _check(cfg["train"]["stage1"]["epochs"] + cfg["train"]["stage2"]["epochs"] > 0,
           "train.stage1.epochs", cfg["train"]["stage1"]["epochs"], "at least one epoch in stage 1 or stage 2")
    _int(cfg, "train.warmup_epochs", lo=0)
    _int(cfg, "train.max_steps_per_epoch", lo=1, allow_none=True)
    _int(cfg, "train.log_every", lo=1)
    _bool(cfg, "train.tensorboard")
    _choice(cfg, "train.progress", ("auto", True, False))


def _check_schedule(cfg: dict, stage: str) -> None:
    sc = cfg["train"][stage]
    unknown = set(sc) - {"epochs", "lr", "milestones", "gamma"}
    if unknown:
        raise ConfigError(f"unknown config key 'train.{stage}.{sorted(unknown)[0]}'; known keys: epochs, gamma, lr, milestones")
    _int(cfg, f"train.{stage}.epochs", lo=0)
    _num(cfg, f"train.{stage}.lr", lo=0.0, lo_open=True)
    _num(cfg, f"train.{stage}.gamma", lo=0.0, lo_open=True, hi=1.0)
    ms = sc["milestones"]
    _check(isinstance(ms, list) and all(_is_int(m) and m >= 1 for m in ms) and ms == sorted(set(ms)),
           f"train.{stage}.milestones", ms, "an increasing list of positive epoch numbers, e.g. [20]")


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def model_kwargs(cfg: dict) -> dict:
    """The keyword arguments every model builder takes from a config: the shared model settings
    and the input size (a model's own section is added by its registered builder)."""
    m = cfg["model"]
    return {
        "backbone": m["backbone"],
        "input_size": (cfg["data"]["height"], cfg["data"]["width"]),
        "pretrained": m["pretrained"],
        "base_width": m["base_width"],
        "last_stride": m["last_stride"],
        "bnneck": m["bnneck"],
        "dropout": m["dropout"],
        "backend": m["backend"],
    }


# model settings that do not change the network a checkpoint's weights belong to
NOT_ARCHITECTURE = ("pretrained", "backend")


def architecture(cfg: dict, num_classes: int | None) -> dict[str, Any]:
    """The settings of ``cfg`` that define the network its weights belong to: model.* (less the
    path of the ImageNet weights and the kernel backend), the model's own section less its
    training-only keys, the input size and num_classes."""
    model = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
    out = {f"model.{k}": v for k, v in model.items() if k not in NOT_ARCHITECTURE}
    name = model.get("name")
    section = cfg.get(name) if isinstance(cfg.get(name), dict) else {}
    skip = SECTIONS[name].training_only if name in SECTIONS else ()
    out.update({f"{name}.{k}": v for k, v in section.items() if k not in skip})
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    if "height" in data and "width" in data:
        out["input_size"] = (data["height"], data["width"])
    out["num_classes"] = num_classes
    return out
