"""The ``fmn`` command line.

    fmn demo                                   synthetic data -> train both stages -> results, PNGs
    fmn synth --out data/synthetic             write the synthetic dataset
    fmn train --config market1501 --set data.root=/data/market1501
    fmn eval --checkpoint runs/market1501/model.pt
    fmn rerank --query q.pt --gallery g.pt --out dist.pt
    fmn visualize --checkpoint runs/market1501/model.pt --out runs/market1501/vis
    fmn extract --checkpoint model.pt --images photos/ --out feats.pt
    fmn export --checkpoint model.pt --onnx model.onnx --pt2 model.pt2

Settings come from the defaults (the paper's), then ``--config FILE``, then each
``--set key=value`` (dotted keys, YAML values). ``fmn <command> --help`` lists the options.
This module parses arguments and prints; the work is done by ``fmn.engine``.
"""
from __future__ import annotations

import argparse
import os
import sys

EPILOG = """\
configuration:
  Defaults follow the paper (ResNet-50, pool1 mask, SGD momentum 0.9, stage 1: lr 0.1 -> 0.01
  after 20 of 30 epochs, stage 2: lr 0.1 -> 0.01 after 35 of 45 epochs, 256x128 inputs).
  --config FILE   a YAML file with any of the sections model, data, train, eval, output, synth
  --set KEY=VAL   override one value, e.g. --set train.stage1.lr=0.05 --set data.root=/data/m
  Configs shipped with fmn (give the name or a file): market1501, dukemtmc, cuhk03, demo, mmga,
  mgran, pmm (in fmn/configs/). A model's own options are the section named after it, e.g.
  --set fmn.local_layer=res3 or --set pmm.mix_prob=0.5

multi-GPU / multi-process:
  torchrun --nproc_per_node=8 -m fmn.cli train --config market1501
  (data.batch_size is per process; gloo on CPU, nccl on GPU)
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", help="YAML config: a file, or a config shipped with fmn (demo, market1501, ...)")
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


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="synthetic data -> two-stage training -> evaluation, ranked list, heatmaps",
                       description="Run the whole pipeline on the synthetic dataset: generate it (once), train GRN "
                       "(stage 1) and MN + LAN (stage 2), evaluate GRN, LAN and FMN with and without re-ranking, "
                       "write results.json, ranked_list.png and heatmaps.png under the output folder.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _add_config_args(p)
    _add_shortcuts(p)
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in the output folder")


def _add_synth(sub) -> None:
    p = sub.add_parser("synth", help="write the synthetic re-ID dataset (Market-1501 layout + part masks)",
                       description="Write the synthetic dataset: pedestrian-like identities that share global "
                       "appearance within groups and differ in local details, seen by several cameras.")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    _add_config_args(p)
    p.add_argument("--ids", type=int, help="number of identities (synth.num_ids)")
    p.add_argument("--cams", type=int, help="number of cameras (synth.num_cams)")
    p.add_argument("--images-per-cam", type=int, help="images per identity per camera")
    p.add_argument("--seed", type=int, help="random seed (synth.seed)")
    p.add_argument("--preset", choices=("default", "hard"),
                   help="default: the demo's dataset; hard: the shape and difficulty of a small real two-camera "
                        "set (700 identities, 2-4 images per identity and camera, low resolution, blur, noise, "
                        "JPEG, viewpoints, clutter, occluders, shared clothing colours) (synth.preset)")


def _add_train(sub) -> None:
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
                   "its shipped config unless --config is given")


def _add_eval(sub) -> None:
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


def _add_rerank(sub) -> None:
    p = sub.add_parser("rerank", help="k-reciprocal re-ranking of saved query/gallery features",
                       description="Re-rank query x gallery distances from feature files (.pt tensor or .npy "
                       "array, one row per image) with k-reciprocal encoding (Zhong et al. 2017). The files are "
                       "memory-mapped. Under torchrun --nproc_per_node=P (gloo) each process reads only its "
                       "contiguous slice of the query and gallery rows and the processes re-rank together, "
                       "exchanging feature chunks and neighbour lists, never a q x g or N x N matrix; rank 0 "
                       "writes the result, the same as one process gives, a chunk of rows at a time. With "
                       "--query-ids and --gallery-ids it also prints CMC rank-1/5/10 and mAP of the features and "
                       "of the re-ranked rows (sharded the same way under torchrun).")
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
    p.add_argument("--query-ids", help="identity and camera of each query row: an (q, 2) integer array "
                   "(pid, camid) per row, .npy or .pt; with --gallery-ids, evaluate CMC and mAP")
    p.add_argument("--gallery-ids", help="the gallery's (g, 2) integer (pid, camid) rows, .npy or .pt "
                   "(pid -1: junk, left out of every ranking)")


def _add_visualize(sub) -> None:
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


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="retrieval descriptors of images, for fmn rerank",
                       description="Write the retrieval descriptor of every image (FMN's eq. 6 descriptor, a related "
                       "method's fused descriptor, or the GRN feature of a stage-1-only FMN) as one (n, D) float32 "
                       "tensor, and <out>.images.json with the image of each row. The features are the --query or "
                       "--gallery input of fmn rerank.")
    p.add_argument("--checkpoint", required=True, help="model.pt written by fmn train / fmn demo")
    p.add_argument("--images", required=True, metavar="DIR|LIST|CSV",
                   help="a folder (its image files, sorted), a text file with one image path per line, or a CSV "
                   "(its 'path' column, else the first); relative paths are relative to the list's folder")
    p.add_argument("--out", required=True, help="features file: .pt (a tensor) or .npy")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu, cuda or cuda:N")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out images that cannot be read (listed in the log and in images.json) instead of "
                   "stopping with an error that names them")
    p.add_argument("--force", action="store_true", help="replace existing output files")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="ONNX and torch.export (.pt2) files of a model's retrieval descriptor",
                       description="Export the retrieval descriptor of a checkpoint: input a float32 batch "
                       "(batch, 3, H, W) of RGB images at the trained size, normalised with the ImageNet mean "
                       "(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); output (batch, D) float32, the rows "
                       "fmn.extract_features gives (flip-averaged when the config's eval.flip is true). ONNX uses "
                       "standard operators only (onnxruntime runs it); loading the .pt2 needs torch and "
                       "`import fmn_kernels`. Each file is checked against PyTorch before it is written.")
    p.add_argument("--checkpoint", required=True, help="model.pt written by fmn train / fmn demo")
    p.add_argument("--onnx", metavar="FILE", help="write the ONNX model here (needs pip install 'fmn[export]')")
    p.add_argument("--pt2", metavar="FILE", help="write the torch.export archive here")
    p.add_argument("--force", action="store_true", help="replace existing output files")


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
    for add in (_add_demo, _add_synth, _add_train, _add_eval, _add_rerank, _add_visualize, _add_extract, _add_export):
        add(sub)
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


def _check_features_dir(folder: str | None) -> None:
    if folder:
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UsageError(f"--save-features {folder} is a file; give a folder")
        _check_output_dir(folder, "--save-features")


def _checkpoint_arg(args) -> str:
    """--checkpoint, or <output.dir>/model.pt of the config (``fmn eval --config FILE`` after
    ``fmn train --config FILE``)."""
    if args.checkpoint:
        return args.checkpoint
    from fmn.config import load_config

    return os.path.join(load_config(args.config, _overrides(args))["output"]["dir"], "model.pt")


def _device_ok(cfg) -> None:
    from fmn.engine.commands import check_device

    try:
        check_device(cfg)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_synth(args) -> int:
    from fmn.config import load_config
    from fmn.engine.commands import synthesize

    overrides = list(args.overrides)
    for key, val in (("num_ids", args.ids), ("num_cams", args.cams),
                     ("images_per_id_per_cam", args.images_per_cam), ("seed", args.seed),
                     ("preset", args.preset)):
        if val is not None:   # validated with the config: one clear error for --ids 1 or --seed -1
            overrides.append(f"synth.{key}={val}")
    cfg = load_config(args.config, overrides)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; give a folder that is empty or absent")
    _check_output_dir(args.out, "--out")
    synthesize(args.out, cfg["synth"], cfg["train"]["progress"])
    _log(f"wrote the synthetic dataset to {args.out}")
    return 0


def cmd_train(args) -> int:
    from fmn.config import bundled_configs, config_file, load_config, read_yaml_sections
    from fmn.engine.commands import run_train

    for text in args.overrides:   # --model against a model named by --set
        key, _, value = text.partition("=")
        if args.model and key.strip() == "model.name" and value.strip() != args.model:
            raise UsageError(f"--model {args.model} conflicts with --set {text.strip()}; give one of them")
    if args.model and args.config:
        named = (read_yaml_sections(config_file(args.config)).get("model") or {}).get("name")
        if named and named != args.model:
            raise UsageError(f"--model {args.model} conflicts with --config {args.config} (a config of {named}); "
                             "drop one of them")
    config = args.config or (args.model if args.model in bundled_configs() else None)
    cfg = load_config(config, _overrides(args), model=args.model)
    _device_ok(cfg)
    _check_pretrained(cfg)
    _check_output_dir(cfg["output"]["dir"], "output.dir")
    run_train(cfg, resume=not args.no_resume, evaluate_after=args.eval, log=_log)
    return 0


def cmd_eval(args) -> int:
    from fmn.engine.commands import run_eval

    checkpoint = _checkpoint_arg(args)
    json_path = args.json or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "results.json")
    _check_output_file(json_path, "--json")
    _check_features_dir(args.save_features)
    run_eval(checkpoint, _overrides(args), args.config, json_path, args.save_features, not args.no_rerank, _log)
    return 0


def cmd_rerank(args) -> int:
    from fmn.engine.commands import run_rerank

    for flag in ("k1", "k2"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0.0 <= args.lambda_value <= 1.0:
        raise UsageError(f"--lambda-value must lie in [0, 1], got {args.lambda_value}")
    out = args.out
    if args.topk and out.endswith(".npy"):
        out = out[:-4] + ".npz"   # values and indices: two arrays
    if (args.query_ids is None) != (args.gallery_ids is None):
        raise UsageError("--query-ids and --gallery-ids go together: give both to evaluate, or neither")
    _check_output_file(out, "--out")
    run_rerank(args.query, args.gallery, out, args.k1, args.k2, args.lambda_value, args.topk, _log,
               query_ids=args.query_ids, gallery_ids=args.gallery_ids)
    return 0


def cmd_visualize(args) -> int:
    from fmn.engine.commands import run_visualize

    checkpoint = _checkpoint_arg(args)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "vis")
    _check_output_dir(out, "--out")
    run_visualize(checkpoint, _overrides(args), args.config, out, args.queries, args.cases, _log)
    return 0


def cmd_demo(args) -> int:
    from fmn.config import load_config
    from fmn.engine.commands import run_demo

    cfg = load_config(args.config or "demo", _overrides(args))
    _device_ok(cfg)
    _check_output_dir(cfg["output"]["dir"], "output.dir")
    run_demo(cfg, fresh=args.fresh, log=_log)
    return 0


def cmd_extract(args) -> int:
    from fmn.engine.extract import run_extract

    run_extract(args.checkpoint, args.images, args.out, batch_size=args.batch_size, device=args.device,
                skip_bad=args.skip_bad, force=args.force, log=_log)
    return 0


def cmd_export(args) -> int:
    from fmn.engine.export import run_export

    if not (args.onnx or args.pt2):
        raise UsageError("give --onnx FILE and/or --pt2 FILE")
    run_export(args.checkpoint, onnx=args.onnx, pt2=args.pt2, force=args.force, log=_log)
    return 0


COMMANDS = {"demo": cmd_demo, "synth": cmd_synth, "train": cmd_train, "eval": cmd_eval,
            "rerank": cmd_rerank, "visualize": cmd_visualize, "extract": cmd_extract, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    from fmn.checkpoint import CheckpointError
    from fmn.config import ConfigError
    from fmn.data.base import DatasetError
    from fmn.engine.health import TrainingHealthError
    from fmn.engine.runtime import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 0
    debug = os.environ.get("FMN_DEBUG", "0").lower() not in ("", "0", "false", "no")
    try:
        return COMMANDS[args.command](args)
    except (UsageError, ConfigError, DatasetError, CheckpointError, NonFiniteLossError, TrainingHealthError, ValueError,
            OSError) as exc:
        # bad input named by the library (ValueError), a file or folder problem (OSError): one line
        if debug:
            raise
        if isinstance(exc, ConfigError):
            message = f"configuration error: {exc}"
        else:
            message = " ".join(str(exc).split()) or type(exc).__name__
            if not isinstance(exc, (UsageError, DatasetError, CheckpointError, NonFiniteLossError, TrainingHealthError,
                                    FileNotFoundError)):
                message += " (FMN_DEBUG=1 shows the traceback)"
        print(f"fmn {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
