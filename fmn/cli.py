"""The ``fmn`` command line.

    fmn demo                                   synthetic data -> train both stages -> results, PNGs
    fmn synth --out data/synthetic             write the synthetic dataset
    fmn train --config configs/market1501.yaml --set data.root=/data/market1501
    fmn eval --checkpoint runs/market1501/model.pt
    fmn rerank --query q.pt --gallery g.pt --out dist.pt
    fmn visualize --checkpoint runs/market1501/model.pt --out runs/market1501/vis

Settings come from the defaults (the paper's), then ``--config FILE``, then each
``--set key=value`` (dotted keys, YAML values). ``fmn <command> --help`` lists the options.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

EPILOG = """\
configuration:
  Defaults follow the paper (ResNet-50, pool1 mask, SGD momentum 0.9, stage 1: lr 0.1 -> 0.01
  after 20 of 30 epochs, stage 2: lr 0.1 -> 0.01 after 35 of 45 epochs, 256x128 inputs).
  --config FILE   a YAML file with any of the sections model, data, train, eval, output, synth
  --set KEY=VAL   override one value, e.g. --set train.stage1.lr=0.05 --set data.root=/data/m
  Example configs: configs/market1501.yaml, dukemtmc.yaml, cuhk03.yaml, demo.yaml

multi-GPU / multi-process:
  torchrun --nproc_per_node=8 -m fmn.cli train --config configs/market1501.yaml
  (data.batch_size is per process; gloo on CPU, nccl on GPU)
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.stage1.epochs=10")


def _add_shortcuts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="same as --set data.root=PATH")
    p.add_argument("--output", "-o", help="same as --set output.dir=PATH")
    p.add_argument("--device", help="same as --set train.device=DEV (auto, cpu, cuda, cuda:N)")


def _overrides(args) -> list[str]:
    extra = []
    if getattr(args, "data_root", None):
        extra.append(f"data.root={args.data_root}")
    if getattr(args, "output", None):
        extra.append(f"output.dir={args.output}")
    if getattr(args, "device", None):
        extra.append(f"train.device={args.device}")
    if getattr(args, "pretrained", None):
        extra.append(f"model.pretrained={args.pretrained}")
    return list(args.overrides) + extra


def _load_cfg(args):
    from fmn.config import load_config

    return load_config(args.config, _overrides(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmn",
        description="Feature Mask Network for person re-identification: train, evaluate, re-rank, visualise.\n"
        "Start with `fmn demo` (about 3 minutes on a 2-core CPU): it writes a synthetic dataset, trains\n"
        "both FMN stages and reports GRN / LAN / FMN rank-1 and mAP with and without re-ranking.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="synthetic data -> two-stage training -> evaluation, ranked list, heatmaps",
                       description="Run the whole pipeline on the synthetic dataset: generate it (once), train GRN "
                       "(stage 1) and MN + LAN (stage 2), evaluate GRN, LAN and FMN with and without re-ranking, "
                       "write results.json, ranked_list.png and heatmaps.png under the output folder.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _add_config_args(p)
    _add_shortcuts(p)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the output folder")

    p = sub.add_parser("synth", help="write the synthetic re-ID dataset (Market-1501 layout + part masks)",
                       description="Write the synthetic dataset: pedestrian-like identities that share global "
                       "appearance within groups and differ in local details, seen by several cameras.")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    _add_config_args(p)
    p.add_argument("--ids", type=int, help="number of identities (synth.num_ids)")
    p.add_argument("--cams", type=int, help="number of cameras (synth.num_cams)")
    p.add_argument("--images-per-cam", type=int, help="images per identity per camera")
    p.add_argument("--seed", type=int, help="random seed (synth.seed)")

    p = sub.add_parser("train", help="train both FMN stages (Algorithm 1), resuming from the output folder",
                       description="Train GRN (stage 1), then MN + LAN with GRN frozen (stage 2). A checkpoint "
                       "<output>/last.pt is written every epoch; rerunning the same command resumes from it. "
                       "The final model is <output>/model.pt.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _add_config_args(p)
    _add_shortcuts(p)
    p.add_argument("--pretrained", metavar="PATH", help="local torchvision ImageNet checkpoint for the backbone")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if last.pt exists")
    p.add_argument("--eval", action="store_true", help="evaluate on query/gallery after training")
    p.add_argument("--model", choices=("fmn", "mmga", "mgran", "pmm"),
                   help="model to train (default: the config's model.name); mmga, mgran and pmm read "
                   "configs/<model>.yaml unless --config is given")

    p = sub.add_parser("eval", help="evaluate a trained model: GRN, LAN, FMN rank-k and mAP (+ re-ranking)",
                       description="Evaluate a checkpoint on its dataset's query/gallery split. The config stored "
                       "in the checkpoint is used; --config FILE replaces its sections other than the model (the "
                       "input size stays as trained) and --set overrides values (e.g. --set data.root=...).")
    p.add_argument("--checkpoint", help="model.pt or last.pt written by fmn train "
                   "(default: <output.dir>/model.pt of the config)")
    _add_config_args(p)
    _add_shortcuts(p)
    p.add_argument("--no-rerank", action="store_true", help="skip k-reciprocal re-ranking rows")
    p.add_argument("--json", help="write the results here (default: next to the checkpoint)")
    p.add_argument("--save-features", metavar="DIR",
                   help="also write DIR/query.pt and DIR/gallery.pt (one float32 row per image: the descriptor "
                   "the FMN row evaluates, or a related method's fused descriptor; the input of fmn rerank) and "
                   "DIR/images.json (the image path, identity and camera of each row)")

    p = sub.add_parser("rerank", help="k-reciprocal re-ranking of saved query/gallery features",
                       description="Re-rank query x gallery distances from feature files (.pt tensor or .npy "
                       "array, one row per image) with k-reciprocal encoding (Zhong et al. 2017).")
    p.add_argument("--query", required=True, help="query features (q, d): .pt or .npy")
    p.add_argument("--gallery", required=True, help="gallery features (g, d): .pt or .npy")
    p.add_argument("--out", required=True, help="output .pt, .npy or .npz (written atomically; missing folders "
                   "are created): the (q, g) distance, or with --topk a dict/npz of values and indices")
    p.add_argument("--k1", type=int, default=20, help="k-reciprocal neighbours (default 20)")
    p.add_argument("--k2", type=int, default=6, help="query expansion neighbours (default 6)")
    p.add_argument("--lambda-value", type=float, default=0.3,
                   help="weight of the original distance in the final one, in [0, 1] (default 0.3)")
    p.add_argument("--topk", type=int, help="keep only the k smallest distances per query (a .npy --out "
                   "becomes .npz)")

    p = sub.add_parser("visualize", help="ranked-list PNG and attention heatmaps (mask, GRN, LAN) of a model",
                       description="Write ranked_list.png (top-10 gallery images per query, green = same "
                       "identity) and heatmaps.png (paper Fig. 4: query, GRN rank-1, FMN rank-1 with the "
                       "predicted mask and the GRN and LAN activation maps). For MMGA, MGRAN and PMM "
                       "checkpoints: the ranked list of the fused descriptor only.")
    p.add_argument("--checkpoint", help="model.pt or last.pt written by fmn train "
                   "(default: <output.dir>/model.pt of the config)")
    _add_config_args(p)
    _add_shortcuts(p)
    p.add_argument("--out", help="output folder (default: <checkpoint folder>/vis)")
    p.add_argument("--queries", type=_positive_int, default=6, help="number of queries in the ranked list")
    p.add_argument("--cases", type=_positive_int, default=3, help="number of query cases in the heatmap figure")
    return parser


# ----------------------------------------------------------------------------- helpers
class UsageError(Exception):
    """A bad command-line input: printed as one line on stderr, exit status 2."""


def _log(msg: str) -> None:
    print(msg, flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_output_file(path: str, what: str) -> None:
    """Fail before any work when ``path`` cannot become a file: it is a folder, or a parent is a file."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a folder; give a file name")
    _check_output_dir(os.path.dirname(os.path.abspath(path)), what)


def _check_output_dir(folder: str, what: str) -> None:
    """Fail before any work when ``folder`` cannot be created or written to."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"{what}: cannot create {folder}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{what}: cannot write to {probe} (permission denied)")


def _check_pretrained(cfg: dict) -> None:
    """Fail before the dataset is read when model.pretrained names no file."""
    path = cfg["model"].get("pretrained")
    if path and not os.path.isfile(path):
        what = "a folder; expected a checkpoint file" if os.path.isdir(path) else "checkpoint not found"
        raise UsageError(f"model.pretrained: {path}: {what}")


def _atomic_write(path: str, write) -> str:
    """``write(tmp_path)``, then the file moved over ``path`` (fmn.atomic.atomic_write)."""
    from fmn.atomic import atomic_write

    return atomic_write(path, write)


def _write_json(path: str, payload: dict) -> str:
    """Atomic JSON (fmn.evaluator.write_json); a NaN in a long run's summary is written, not fatal."""
    from fmn.evaluator import write_json

    return write_json(path, payload, strict=False)


def _resolve_device(cfg):
    """The config's torch device, or one clear error (e.g. cuda asked for on a machine without it)."""
    from fmn.trainer import resolve_device

    try:
        return resolve_device(cfg["train"]["device"])
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None




def load_trained(checkpoint: str, overrides: list[str] | None = None, config: str | None = None):
    """(model in eval mode, config) from a checkpoint written by the trainer."""
    from fmn.checkpoint import CheckpointError, load_checkpoint, load_model_weights
    from fmn.config import apply_override, validate, with_sections_of
    from fmn.seed_trainer import SEED_MODELS, load_any_config, load_seed_model
    from fmn.trainer import architecture, build_model_from_config

    state = load_checkpoint(checkpoint)
    saved = state.get("config")
    if isinstance(saved, dict) and isinstance(saved.get("model"), dict) and saved["model"].get("name") in SEED_MODELS:
        try:
            return load_seed_model(checkpoint, overrides, config)
        except RuntimeError as exc:   # load_state_dict: the overrides changed the architecture
            reason = str(exc).strip().splitlines()
            raise CheckpointError(f"{checkpoint} was written for a different model than this config builds "
                                  f"(model.* and data.height/width must stay as trained): "
                                  f"{reason[1].strip() if len(reason) > 1 else reason[0]}") from None
    if not isinstance(saved, dict) or "model" not in state or "num_classes" not in state:
        raise CheckpointError(f"{checkpoint} is not a checkpoint written by `fmn train`")
    cfg = copy.deepcopy(saved) if config is None else with_sections_of(saved, load_any_config(config))
    cfg["model"]["pretrained"] = None
    for o in overrides or []:
        apply_override(cfg, o)
    validate(cfg)
    model = build_model_from_config(cfg, int(state["num_classes"]))
    # A mismatch (--set model.backbone=..., data.height=..., or model.last_stride=..., which
    # changes no tensor) is one error naming what differs.
    num_classes = int(state["num_classes"])
    load_model_weights(model, state["model"], checkpoint, saved_config=architecture(saved, num_classes),
                       config=architecture(cfg, num_classes), settings_must_match=True)
    if hasattr(model, "set_stage"):
        model.set_stage(int(state.get("stage", 2)))
    model.eval()
    return model, cfg


def _device(cfg):
    return _resolve_device(cfg)


def _dataset(cfg):
    from fmn.data import build_dataset

    d = cfg["data"]
    return build_dataset(d["name"], d["root"], **d["options"])


def _features(model, dataset, cfg, device):
    from fmn.data import make_test_loader
    from fmn.evaluator import extract_features

    d, e = cfg["data"], cfg["eval"]
    show = cfg["train"]["progress"]
    out = []
    for samples in (dataset.query, dataset.gallery):
        loader = make_test_loader(samples, d["height"], d["width"], batch_size=e["batch_size"], workers=d["workers"])
        out.append(extract_features(model, loader, device, flip=e["flip"], progress=show))
    return out


def _write_results(path, dataset, cfg, results, seconds, extra=None):
    payload = {
        "dataset": dataset.name, "root": dataset.root, "num_query": len(dataset.query),
        "num_gallery": len(dataset.gallery), "height": cfg["data"]["height"], "width": cfg["data"]["width"],
        "flip": cfg["eval"]["flip"], "alpha": cfg["eval"]["alpha"], "rerank": cfg["eval"]["rerank"],
        "seconds": round(seconds, 3), "results": results,
    }
    payload.update(extra or {})
    _write_json(path, payload)


def _retrieval_descriptor(feats, alpha):
    """The vectors that rank: FMN's descriptor of eq. (6), else a related method's fused
    descriptor, else the only branch, L2-normalised."""
    import torch.nn.functional as F

    from fmn.evaluator import fuse

    if "grn" in feats and "lan" in feats:
        return fuse(feats["grn"], feats["lan"], alpha)
    if "descriptor" in feats:
        return feats["descriptor"].float()
    if len(feats) == 1:
        return F.normalize(next(iter(feats.values())).float(), dim=1)
    raise UsageError(f"the model gives neither FMN's grn/lan features nor a fused descriptor "
                     f"(features: {', '.join(sorted(feats))}); nothing to save")


def save_features(folder, query, gallery):
    """folder/query.pt, folder/gallery.pt ((n, d) float32 on the CPU) and folder/images.json
    ({"query": [[path, pid, camid], ...], "gallery": [...]}), each written atomically; ``query``
    and ``gallery`` are (descriptors, pids, camids, paths)."""
    import torch

    os.makedirs(folder, exist_ok=True)
    listing = {}
    for name, (desc, pids, camids, paths) in (("query", query), ("gallery", gallery)):
        desc = desc.detach().float().cpu().contiguous()
        _atomic_write(os.path.join(folder, f"{name}.pt"), lambda tmp, d=desc: torch.save(d, tmp))
        listing[name] = [[str(p), int(i), int(c)] for p, i, c in zip(paths, pids.tolist(), camids.tolist())]
    _write_json(os.path.join(folder, "images.json"), listing)
    return [os.path.join(folder, n) for n in ("query.pt", "gallery.pt", "images.json")]


def evaluate_and_visualize(model, dataset, cfg, device, out_dir, json_path=None, visualize=True,
                           queries=6, cases=3, extra=None, features_dir=None):
    """Features once -> results table (+ JSON), ranked-list PNG and Fig. 4 heatmaps; with
    ``features_dir`` the retrieval descriptors as well (``save_features``)."""
    from fmn.evaluator import evaluate_features, format_results
    from fmn.metrics import euclidean_distance

    t0 = time.time()
    (qf, qp, qc, qpaths), (gf, gp, gc, gpaths) = _features(model, dataset, cfg, device)
    e = cfg["eval"]
    ranks = "grn" in qf and "lan" in qf or "descriptor" in qf   # a ranked list can be drawn
    if features_dir or (visualize and ranks):
        q_desc, g_desc = _retrieval_descriptor(qf, e["alpha"]), _retrieval_descriptor(gf, e["alpha"])
    if features_dir:
        written = save_features(features_dir, (q_desc, qp, qc, qpaths), (g_desc, gp, gc, gpaths))
        _log("wrote " + ", ".join(written))
    results = evaluate_features(qf, gf, qp, gp, qc, gc, rerank=e["rerank"], alpha=e["alpha"], device=device)
    seconds = time.time() - t0
    _log(format_results(results, title=f"{dataset.name}: {len(dataset.query)} queries, "
                                        f"{len(dataset.gallery)} gallery images"))
    outputs = {}
    if json_path:
        _write_results(json_path, dataset, cfg, results, seconds, extra)
        outputs["results"] = json_path
    if visualize and "grn" in qf and "lan" in qf:
        import torch.nn.functional as F

        from fmn.heatmap import fig4, pick_fig4_cases
        from fmn.visualize import ranked_list

        d_fmn = euclidean_distance(q_desc, g_desc)
        d_grn = euclidean_distance(F.normalize(qf["grn"], dim=1), F.normalize(gf["grn"], dim=1))
        picked = pick_fig4_cases(d_grn, d_fmn, qp, gp, qc, gc, count=max(cases, queries))
        rl = os.path.join(out_dir, "ranked_list.png")
        ranked_list(d_fmn, qpaths, gpaths, qp, gp, qc, gc, rl, queries=[c[0] for c in picked[:queries]], topk=10)
        hm = os.path.join(out_dir, "heatmaps.png")
        fig4(model, qpaths, gpaths, picked[:cases], qp, gp, hm, cfg["data"]["height"], cfg["data"]["width"], device)
        outputs.update(ranked_list=rl, heatmaps=hm)
        _log(f"wrote {rl}\nwrote {hm}")
    elif visualize and "descriptor" in qf:
        # a related method (MMGA, MGRAN, PMM): the ranked list of its fused descriptor, as evaluated;
        # the Fig. 4 heatmaps show FMN's mask and its GRN / LAN branches, which these models lack
        from fmn.heatmap import pick_fig4_cases
        from fmn.visualize import ranked_list

        dist = euclidean_distance(q_desc, g_desc)
        picked = pick_fig4_cases(dist, dist, qp, gp, qc, gc, count=queries)
        rl = os.path.join(out_dir, "ranked_list.png")
        ranked_list(dist, qpaths, gpaths, qp, gp, qc, gc, rl, queries=[c[0] for c in picked], topk=10)
        outputs.update(ranked_list=rl)
        _log(f"wrote {rl}\nno heatmaps.png: the Fig. 4 heatmaps (mask, GRN, LAN) need an FMN model, "
             f"this is {cfg['model']['name']}")
    elif visualize:
        raise UsageError(f"the model gives neither FMN's grn/lan features nor a fused descriptor "
                         f"(features: {', '.join(sorted(qf))}); nothing to draw")
    return results, outputs


# ---------------------------------------------------------------------------- commands
def cmd_synth(args) -> int:
    from fmn.data.synthetic import generate
    from fmn.seed_trainer import load_any_config

    overrides = list(args.overrides)
    for key, val in (("num_ids", args.ids), ("num_cams", args.cams),
                     ("images_per_id_per_cam", args.images_per_cam), ("seed", args.seed)):
        if val is not None:   # validated with the config: one clear error for --ids 1 or --seed -1
            overrides.append(f"synth.{key}={val}")
    s = load_any_config(args.config, overrides)["synth"]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; give a folder that is empty or absent")
    _check_output_dir(args.out, "--out")
    generate(args.out, num_ids=s["num_ids"], num_cams=s["num_cams"], seed=s["seed"],
             images_per_id_per_cam=s["images_per_id_per_cam"], height=s["height"], width=s["width"])
    _log(f"wrote the synthetic dataset to {args.out}")
    return 0


def cmd_train(args) -> int:
    from fmn.trainer import run_training
    from fmn.seed_trainer import cli_train, is_seed_run

    if args.model:   # --model against another model named by --set or by a related method's config file
        from fmn.seed_trainer import SEED_MODELS, config_model_name

        for text in args.overrides:
            key, _, value = text.partition("=")
            if key.strip() == "model.name" and value.strip() != args.model:
                raise UsageError(f"--model {args.model} conflicts with --set {text.strip()}; give one of them")
        named = config_model_name(args.config)
        if named in SEED_MODELS and named != args.model:
            raise UsageError(f"--model {args.model} conflicts with --config {args.config} (a config of {named}); "
                             f"drop one of them")
    if is_seed_run(args):
        from fmn.seed_trainer import default_config, load_seed_config

        config = args.config or (default_config(args.model) if args.model else None)
        cfg = load_seed_config(config, _overrides(args), model=args.model)
        _resolve_device(cfg)
        _check_pretrained(cfg)
        _check_output_dir(cfg["output"]["dir"], "output.dir")
        return cli_train(args)
    if args.model:
        args.overrides.append(f"model.name={args.model}")

    cfg = _load_cfg(args)
    _resolve_device(cfg)
    _check_pretrained(cfg)
    _check_output_dir(cfg["output"]["dir"], "output.dir")
    summary = run_training(cfg, resume=not args.no_resume, log=_log)
    from fmn import distributed as fdist

    info = fdist.current()
    if info.is_main:
        _log(f"final model: {summary['checkpoint']}  ({summary['seconds']:.1f}s)")
    if args.eval and info.is_main:
        model = summary["model"]
        device = next(model.parameters()).device
        evaluate_and_visualize(model, summary["dataset"], cfg, device, cfg["output"]["dir"],
                               json_path=os.path.join(cfg["output"]["dir"], "results.json"), visualize=False)
    fdist.cleanup()
    return 0


def _checkpoint_arg(args) -> str:
    """--checkpoint, or <output.dir>/model.pt of the config (``fmn eval --config FILE`` after
    ``fmn train --config FILE``)."""
    if args.checkpoint:
        return args.checkpoint
    from fmn.seed_trainer import load_any_config

    return os.path.join(load_any_config(args.config, _overrides(args))["output"]["dir"], "model.pt")


def cmd_eval(args) -> int:
    checkpoint = _checkpoint_arg(args)
    json_path = args.json or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "results.json")
    _check_output_file(json_path, "--json")
    if args.save_features:
        if os.path.exists(args.save_features) and not os.path.isdir(args.save_features):
            raise UsageError(f"--save-features {args.save_features} is a file; give a folder")
        _check_output_dir(args.save_features, "--save-features")
    model, cfg = load_trained(checkpoint, _overrides(args), args.config)
    if args.no_rerank:
        cfg["eval"]["rerank"] = False
    device = _device(cfg)
    model.to(device)
    evaluate_and_visualize(model, _dataset(cfg), cfg, device, os.path.dirname(json_path), json_path=json_path,
                           visualize=False, features_dir=args.save_features)
    _log(f"wrote {json_path}")
    return 0


def _read_feats(path):
    import numpy as np
    import torch

    if not os.path.isfile(path):
        raise UsageError(f"feature file not found: {path}")
    try:
        if path.endswith(".npy"):
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # not a .npy array / a torch file of tensors: say so in one line
        if path.endswith(".npy"):
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        else:
            from fmn.checkpoint import load_failure
            reason = load_failure(path, exc)
        raise UsageError(f"cannot read features from {path} (expected a .pt tensor or a .npy array; "
                         f"{reason})") from None
    if not torch.is_tensor(obj):
        raise UsageError(f"{path} must hold one tensor (n, d), got {type(obj).__name__}")
    if not (obj.dtype.is_floating_point or obj.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32,
                                                          torch.int64)):
        raise UsageError(f"{path}: expected real-valued features, got dtype {obj.dtype}")
    return obj


def cmd_rerank(args) -> int:
    import numpy as np
    import torch

    from fmn_kernels.rerank import rerank

    for flag in ("k1", "k2"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0.0 <= args.lambda_value <= 1.0:
        raise UsageError(f"--lambda-value must lie in [0, 1], got {args.lambda_value}")
    out = args.out
    if args.topk and out.endswith(".npy"):
        out = out[:-4] + ".npz"   # values and indices: two arrays
    _check_output_file(out, "--out")
    q, g = _read_feats(args.query), _read_feats(args.gallery)
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise UsageError(f"expected (q, d) and (g, d) features, got {tuple(q.shape)} and {tuple(g.shape)}")
    for path, feats in ((args.query, q), (args.gallery, g)):
        if feats.shape[0] == 0 or feats.shape[1] == 0:
            raise UsageError(f"{path} holds no features (shape {tuple(feats.shape)})")
    if args.topk is not None and not 1 <= args.topk <= g.shape[0]:
        raise UsageError(f"--topk must lie in 1..{g.shape[0]} (the gallery size), got {args.topk}")
    t0 = time.time()
    res = rerank(q.float(), g.float(), k1=args.k1, k2=args.k2, lambda_value=args.lambda_value, topk=args.topk)
    if args.topk:
        values, indices = res
        if out.endswith(".npz"):
            _atomic_write(out, lambda tmp: np.savez(tmp, values=values.cpu().numpy(), indices=indices.cpu().numpy()))
        else:
            _atomic_write(out, lambda tmp: torch.save({"values": values.cpu(), "indices": indices.cpu()}, tmp))
    else:
        if out.endswith(".npy"):
            _atomic_write(out, lambda tmp: np.save(tmp, res.cpu().numpy()))
        elif out.endswith(".npz"):
            _atomic_write(out, lambda tmp: np.savez(tmp, dist=res.cpu().numpy()))
        else:
            _atomic_write(out, lambda tmp: torch.save(res.cpu(), tmp))
    _log(f"re-ranked {q.shape[0]} x {g.shape[0]} in {time.time() - t0:.2f}s -> {out}")
    return 0


def cmd_visualize(args) -> int:
    checkpoint = _checkpoint_arg(args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "vis")
    _check_output_dir(out, "--out")
    model, cfg = load_trained(checkpoint, _overrides(args), args.config)
    device = _device(cfg)
    model.to(device)
    cfg["eval"]["rerank"] = False
    evaluate_and_visualize(model, _dataset(cfg), cfg, device, out, queries=args.queries, cases=args.cases)
    return 0


DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


def cmd_demo(args) -> int:
    from fmn.config import load_config
    from fmn.data.synthetic import generate
    from fmn.trainer import run_training

    t0 = time.time()
    config = args.config or (DEMO_CONFIG if os.path.isfile(DEMO_CONFIG) else None)
    cfg = load_config(config, _overrides(args))
    out = cfg["output"]["dir"]
    root = cfg["data"]["root"]
    _resolve_device(cfg)
    _check_output_dir(out, "output.dir")
    if cfg["data"]["name"] == "synthetic" and not os.path.isfile(os.path.join(root, "synthetic.json")):
        s = cfg["synth"]
        _log(f"[1/4] writing the synthetic dataset to {root}")
        generate(root, num_ids=s["num_ids"], num_cams=s["num_cams"], seed=s["seed"],
                 images_per_id_per_cam=s["images_per_id_per_cam"], height=s["height"], width=s["width"],
                 progress=cfg["train"]["progress"])
    else:
        _log(f"[1/4] using the dataset at {root}")
    t_data = time.time() - t0
    _log("[2/4] training stage 1 (GRN) and stage 2 (MN + LAN)")
    summary = run_training(cfg, resume=not args.fresh, log=_log)
    t_train = time.time() - t0 - t_data
    model, dataset = summary["model"], summary["dataset"]
    device = next(model.parameters()).device
    _log("[3/4] evaluating GRN, LAN and FMN (with and without re-ranking)")
    _log("[4/4] writing results.json, ranked_list.png and heatmaps.png")
    extra = {"timing_seconds": {"data": round(t_data, 1), "train": round(t_train, 1)}}
    results, outputs = evaluate_and_visualize(model, dataset, cfg, device, out,
                                              json_path=os.path.join(out, "results.json"), extra=extra)
    total = time.time() - t0
    with open(outputs["results"]) as fh:
        payload = json.load(fh)
    payload["timing_seconds"]["total"] = round(total, 1)
    _write_json(outputs["results"], payload)
    grn, fmn_row = results.get("GRN", {}), results.get("FMN", {})
    if grn and fmn_row:
        verdict = "above" if fmn_row["mAP"] > grn["mAP"] else "NOT above"
        _log(f"FMN mAP {fmn_row['mAP']:.1f} is {verdict} GRN mAP {grn['mAP']:.1f}")
    _log(f"demo finished in {total / 60:.1f} min (data {t_data:.0f}s, training {t_train:.0f}s); outputs in {out}")
    return 0


COMMANDS = {"demo": cmd_demo, "synth": cmd_synth, "train": cmd_train, "eval": cmd_eval,
            "rerank": cmd_rerank, "visualize": cmd_visualize}


def main(argv: list[str] | None = None) -> int:
    from fmn.checkpoint import CheckpointError
    from fmn.config import ConfigError
    from fmn.data.base import DatasetError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    debug = os.environ.get("FMN_DEBUG", "0").lower() not in ("", "0", "false", "no")
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError, DatasetError, CheckpointError, ValueError, OSError) as exc:
        # bad input named by the library (ValueError), a file or folder problem (OSError): one line
        if debug:
            raise
        if isinstance(exc, ConfigError):
            message = f"configuration error: {exc}"
        else:
            message = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, (UsageError, DatasetError, CheckpointError, FileNotFoundError)):
                message += " (FMN_DEBUG=1 shows the traceback)"
        print(f"fmn {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
