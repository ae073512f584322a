"""What each ``fmn`` command does, as functions of plain values: the command line parses its
arguments, calls one of these and prints what they log. Each takes ``log`` (a callable taking
one line) and returns what it produced."""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Sequence

import torch
from torch import nn

from fmn.atomic import atomic_write
from fmn.data import build_dataset
from fmn.data.base import DatasetError
from fmn.data.synthetic import generate, is_complete
from fmn.engine.api import evaluate_dataset, load_model
from fmn.engine.evaluation import (format_results, matches_per_query, rerank_note, retrieval_descriptor,
                                   retrieval_row, write_json)
from fmn.engine.lock import output_lock
from fmn.engine.runtime import resolve_device, show_progress
from fmn.engine.training import train

Log = Callable[[str], None]


class InputOverwriteError(ValueError):
    """An output path that names an input of the same command (the checkpoint being read, a
    feature file): refused, so that no input is ever written over."""


def refuse_overwrite(output: str, inputs: Sequence[str], what: str) -> None:
    """``InputOverwriteError`` when ``output`` (a file, or a folder whose files are written) is
    one of ``inputs`` or holds one of them."""
    out = os.path.realpath(output)
    for path in inputs:
        if path and (os.path.realpath(path) == out or os.path.dirname(os.path.realpath(path)) == out
                     and os.path.basename(path) in ("query.pt", "gallery.pt", "images.json")):
            raise InputOverwriteError(f"{what} {output} would write over the input {path}; give another path")


def synthesize(out_dir: str, synth: dict, progress: bool | str = "auto") -> str:
    """Write the synthetic dataset of config section ``synth`` to ``out_dir``."""
    sizes = {k: synth[k] for k in ("height", "width") if synth[k] is not None}
    return generate(out_dir, preset=synth["preset"], num_ids=synth["num_ids"], num_cams=synth["num_cams"],
                    seed=synth["seed"] or 0, images_per_id_per_cam=synth["images_per_id_per_cam"],
                    progress=show_progress(progress), **sizes)


def synthetic_mismatch(root: str, synth: dict) -> str | None:
    """How the synthetic dataset at ``root`` differs from config section ``synth`` (None: it does not)."""
    with open(os.path.join(root, "synthetic.json")) as fh:
        written = json.load(fh)
    have = dict(written.get("params", {}), preset=written.get("preset", "default"))
    diff = [f"{key}: {have.get(key)!r} there, {value!r} asked" for key, value in synth.items()
            if value is not None and key in have and _plain(have[key]) != _plain(value)]
    return "; ".join(diff) or None


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def prepare_dataset(cfg: dict, log: Log) -> bool:
    """Write the synthetic dataset at ``data.root`` when the config names it and it is not there
    (or was left half-written); True when it was written."""
    root = cfg["data"]["root"]
    if cfg["data"]["name"] != "synthetic":
        return False
    if is_complete(root):
        diff = synthetic_mismatch(root, cfg["synth"])
        if diff:
            raise DatasetError(f"data.root {root} holds a synthetic dataset of other settings ({diff}); give another "
                             "data.root, or remove that folder to write it again")
        return False
    log(f"writing the synthetic dataset to {root}")
    synthesize(root, cfg["synth"], cfg["train"]["progress"])
    return True


def run_train(cfg: dict, resume: bool, evaluate_after: bool, log: Log) -> dict:
    """``fmn train``: train (resuming), then optionally evaluate into ``<output.dir>/results.json``."""
    from fmn import distributed as fdist

    if fdist.current().is_main:
        prepare_dataset(cfg, log)
    summary = train(cfg, resume=resume, log=log)
    if fdist.current().is_main:
        log(f"final model: {summary['checkpoint']}  ({summary['seconds']:.1f}s)")
        if evaluate_after:
            model = summary["model"]
            model.fmn_config = cfg
            report(model, summary["dataset"], cfg, cfg["output"]["dir"], log,
                   json_path=os.path.join(cfg["output"]["dir"], "results.json"))
    fdist.cleanup()
    return summary


def run_demo(cfg: dict, fresh: bool, log: Log) -> dict:
    """``fmn demo``: the synthetic data (once), both FMN stages, the results table, results.json,
    ranked_list.png and heatmaps.png under ``output.dir``."""
    t0 = time.time()
    out = cfg["output"]["dir"]
    log(f"[1/4] {'writing the synthetic dataset to' if cfg['data']['name'] == 'synthetic' else 'using the dataset at'} "
        f"{cfg['data']['root']}")
    if not prepare_dataset(cfg, lambda msg: None) and cfg["data"]["name"] == "synthetic":
        log("      (already there)")
    t_data = time.time() - t0
    log("[2/4] training stage 1 (GRN) and stage 2 (MN + LAN)")
    with output_lock(out):
        summary = train(cfg, resume=not fresh, log=log, lock=False)
        t_train = time.time() - t0 - t_data
        model, dataset = summary["model"], summary["dataset"]
        model.fmn_config = cfg
        log("[3/4] evaluating GRN, LAN and FMN (with and without re-ranking)")
        log("[4/4] writing results.json, ranked_list.png and heatmaps.png")
        extra = {"timing_seconds": {"data": round(t_data, 1), "train": round(t_train, 1)}}
        results, outputs = report(model, dataset, cfg, out, log, json_path=os.path.join(out, "results.json"),
                                  extra=extra, pictures=True, started=t0)
    grn, fmn_row = results.get("GRN", {}), results.get("FMN", {})
    if grn and fmn_row:
        verdict = "above" if fmn_row["mAP"] > grn["mAP"] else "NOT above"
        log(f"FMN mAP {fmn_row['mAP']:.1f} is {verdict} GRN mAP {grn['mAP']:.1f}")
    total = time.time() - t0
    log(f"demo finished in {total / 60:.1f} min (data {t_data:.0f}s, training {t_train:.0f}s); outputs in {out}")
    return {"results": results, "outputs": outputs}


def run_eval(checkpoint: str, overrides: Sequence[str], config: str | None, json_path: str,
             features_dir: str | None, rerank: bool, log: Log) -> dict:
    """``fmn eval``: the results table of a checkpoint on its (or another) dataset."""
    inputs = [checkpoint] + ([config] if config and os.path.isfile(config) else [])
    refuse_overwrite(json_path, inputs, "--json")
    if features_dir:
        refuse_overwrite(features_dir, inputs, "--save-features")
    model = load_model(checkpoint, overrides=overrides, config=config)
    cfg = model.fmn_config
    cfg["eval"]["rerank"] = cfg["eval"]["rerank"] and rerank
    results, _ = report(model, dataset_of(cfg), cfg, os.path.dirname(json_path), log, json_path=json_path,
                        features_dir=features_dir)
    log(f"wrote {json_path}")
    return results


def run_visualize(checkpoint: str, overrides: Sequence[str], config: str | None, out: str, queries: int,
                  cases: int, log: Log) -> dict:
    """``fmn visualize``: ranked_list.png (and, for FMN, heatmaps.png) of a checkpoint."""
    model = load_model(checkpoint, overrides=overrides, config=config)
    cfg = model.fmn_config
    cfg["eval"]["rerank"] = False
    return report(model, dataset_of(cfg), cfg, out, log, pictures=True, queries=queries, cases=cases)[1]


def dataset_of(cfg: dict):
    d = cfg["data"]
    return build_dataset(d["name"], d["root"], **d["options"])


def report(model: nn.Module, dataset, cfg: dict, out_dir: str, log: Log, json_path: str | None = None,
           extra: dict | None = None, pictures: bool = False, queries: int = 6, cases: int = 3,
           features_dir: str | None = None, started: float | None = None):
    """Features and distances once -> the results table (logged, and written to ``json_path``),
    the retrieval descriptors (``features_dir``), and with ``pictures`` the ranked list and, for
    an FMN model, the Fig. 4 heatmaps. Returns (results, {output name: path})."""
    t0 = time.time()
    device = next(model.parameters()).device
    keep = (lambda feats: (retrieval_row(feats), "GRN")) if pictures else None
    ev = evaluate_dataset(model, dataset, cfg, device, progress=show_progress(cfg["train"]["progress"]),
                          keep_distances=keep)
    results, probe = ev["results"], ev["query"][0]
    matches = matches_per_query(ev["query"][1], ev["gallery"][1], ev["query"][2], ev["gallery"][2])
    log(format_results(results, title=f"{dataset.name}: {len(dataset.query)} queries, "
                                       f"{len(dataset.gallery)} gallery images, {matches:.1f} true matches per query"))
    if ev["test_masks"]:
        log(f"test-time region masks: {ev['test_masks']} ("
            + ("the query and gallery images' own mask files)" if ev["test_masks"] == "given"
               else "the mask predictor: not every query and gallery image has mask files)"))
    note = rerank_note(matches) if cfg["eval"]["rerank"] else None
    if note:
        log(f"note: {note}")
    if "grn" in probe and "lan" not in probe and "descriptor" not in probe:
        log("GRN only: this model was trained in stage 1 only (its MN and LAN are untrained)")
    outputs = {}
    if features_dir:
        outputs["features"] = save_features(features_dir, ev, cfg["eval"]["alpha"])
        log("wrote " + ", ".join(outputs["features"]))
    if json_path:
        facts = {"matches_per_query": round(matches, 2), **({"test_masks": ev["test_masks"]} if ev["test_masks"] else {})}
        payload = _payload(dataset, cfg, results, time.time() - t0, {**facts, **(extra or {})})
        if started is not None:
            payload.setdefault("timing_seconds", {})["total"] = round(time.time() - started, 1)
        outputs["results"] = write_json(json_path, payload, strict=False)
    if pictures:
        outputs.update(draw(model, ev, probe, cfg, out_dir, queries, cases, device, log))
    return results, outputs


def _payload(dataset, cfg: dict, results: dict, seconds: float, extra: dict | None) -> dict:
    payload = {"dataset": dataset.name, "root": dataset.root, "num_query": len(dataset.query),
               "num_gallery": len(dataset.gallery), "height": cfg["data"]["height"], "width": cfg["data"]["width"],
               "flip": cfg["eval"]["flip"], "alpha": cfg["eval"]["alpha"], "rerank": cfg["eval"]["rerank"],
               "seconds": round(seconds, 3), "results": results}
    payload.update(extra or {})
    return payload


def save_features(folder: str, ev: dict, alpha: float) -> list[str]:
    """folder/query.pt, folder/gallery.pt ((n, d) float32 retrieval descriptors on the CPU) and
    folder/images.json ({"query": [[path, pid, camid], ...], "gallery": [...]}), each written
    atomically."""
    os.makedirs(folder, exist_ok=True)
    listing = {}
    for name in ("query", "gallery"):
        feats, pids, camids, paths = ev[name]
        desc = retrieval_descriptor(feats, alpha).detach().float().cpu().contiguous()
        atomic_write(os.path.join(folder, f"{name}.pt"), lambda tmp, d=desc: torch.save(d, tmp))
        listing[name] = [[str(p), int(i), int(c)] for p, i, c in zip(paths, pids.tolist(), camids.tolist())]
    write_json(os.path.join(folder, "images.json"), listing)
    return [os.path.join(folder, n) for n in ("query.pt", "gallery.pt", "images.json")]


def draw(model: nn.Module, ev: dict, probe: dict, cfg: dict, out_dir: str, queries: int, cases: int, device,
         log: Log) -> dict:
    """ranked_list.png by the retrieval descriptor; heatmaps.png (Fig. 4) for an FMN model."""
    from fmn.engine.heatmap import fig4, pick_fig4_cases
    from fmn.engine.visualize import ranked_list

    (_, qp, qc, qpaths), (_, gp, gc, gpaths) = ev["query"], ev["gallery"]
    dist = ev["distances"][retrieval_row(probe)]
    fmn_model = "grn" in probe and "lan" in probe
    d_grn = ev["distances"]["GRN"] if fmn_model else dist
    picked = pick_fig4_cases(d_grn, dist, qp, gp, qc, gc, count=max(cases, queries) if fmn_model else queries)
    outputs = {"ranked_list": os.path.join(out_dir, "ranked_list.png")}
    ranked_list(dist, qpaths, gpaths, qp, gp, qc, gc, outputs["ranked_list"],
                queries=[c[0] for c in picked[:queries]], topk=10)
    log(f"wrote {outputs['ranked_list']}")
    if fmn_model:
        outputs["heatmaps"] = os.path.join(out_dir, "heatmaps.png")
        fig4(model, qpaths, gpaths, picked[:cases], qp, gp, outputs["heatmaps"], cfg["data"]["height"],
             cfg["data"]["width"], device)
        log(f"wrote {outputs['heatmaps']}")
    else:
        log(f"no heatmaps.png: the Fig. 4 heatmaps (mask, GRN, LAN) need an FMN model trained in both stages, "
            f"this is {cfg['model']['name']}" + (" (stage 1 only)" if "grn" in probe else ""))
    return outputs


def run_rerank(query: str, gallery: str, out: str, k1: int, k2: int, lambda_value: float, topk: int | None,
               log: Log, query_ids: str | None = None, gallery_ids: str | None = None) -> str:
    """``fmn rerank``: k-reciprocal re-ranking of two feature files into ``out``.

    Under torchrun (WORLD_SIZE > 1) every process joins a gloo group, reads only its contiguous
    slice of each file (memory-mapped) and re-ranks it with ``process_group``; rank 0 writes the
    rows of every rank into ``out``, a chunk at a time (fmn.rerank.write_result). With
    ``query_ids`` and ``gallery_ids`` ((n, 2) integer (pid, camid) files, see read_ids) it then
    logs CMC and mAP of the features and of the re-ranked rows (evaluate_rerank)."""
    import torch.distributed as dist

    from fmn import distributed
    from fmn.rerank import shard_bounds, write_result
    from fmn_kernels.rerank import rerank

    refuse_overwrite(out, [query, gallery], "--out")
    q, g = read_features(query, mmap=True), read_features(gallery, mmap=True)
    if q.dim() != 2 or g.dim() != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"expected (q, d) and (g, d) features, got {tuple(q.shape)} and {tuple(g.shape)}")
    for path, feats in ((query, q), (gallery, g)):
        if feats.shape[0] == 0 or feats.shape[1] == 0:
            raise ValueError(f"{path} holds no features (shape {tuple(feats.shape)})")
    if topk is not None and not 1 <= topk <= g.shape[0]:
        raise ValueError(f"--topk must lie in 1..{g.shape[0]} (the gallery size), got {topk}")
    ids = None
    if query_ids is not None and gallery_ids is not None:
        ids = (read_ids(query_ids, q.shape[0], "--query-ids", "--query", mmap=True),
               read_ids(gallery_ids, g.shape[0], "--gallery-ids", "--gallery", mmap=True))
    info = distributed.init_distributed("cpu")
    try:
        group = dist.group.WORLD if info.enabled else None
        qa, qb = shard_bounds(q.shape[0], info.rank, info.world_size)
        ga, gb = shard_bounds(g.shape[0], info.rank, info.world_size)
        t0 = time.time()
        res = rerank(q[qa:qb].float(), g[ga:gb].float(), k1=k1, k2=k2, lambda_value=lambda_value, topk=topk,
                     process_group=group)
        seconds = time.time() - t0
        counts = [shard_bounds(q.shape[0], r, info.world_size) for r in range(info.world_size)]
        write_result(out, res, [b - a for a, b in counts], g.shape[0], topk, group)
        lines = []
        if ids is not None:
            lines = evaluate_rerank(q[qa:qb], g[ga:gb], res, ids[0][qa:qb], ids[1][ga:gb], g.shape[0], group)
    finally:
        distributed.cleanup()
    if info.is_main:
        procs = f" on {info.world_size} processes" if info.enabled else ""
        log(f"re-ranked {q.shape[0]} x {g.shape[0]} in {seconds:.2f}s{procs} -> {out}")
        for line in lines:
            log(line)
    return out


def evaluate_rerank(q, g, res, q_ids, g_ids, num_gallery: int, group=None) -> list[str]:
    """CMC rank-1/5/10 and mAP (percent) of the features ``q``, ``g`` and of the re-ranked rows
    ``res`` (dense (q, g) distances, or (values, indices) of the top-m lists) under DESIGN section
    4, as lines to print. With ``group`` the arguments are this rank's slices (rows of its queries,
    its gallery slice) and the evaluation is sharded (fmn.metrics, process_group). Top-m lists give
    mAP over the lists (exact for the queries whose true matches all lie inside them)."""
    from fmn.metrics import evaluate, evaluate_from_features, evaluate_topk

    qp, qc, gp, gc = q_ids[:, 0], q_ids[:, 1], g_ids[:, 0], g_ids[:, 1]
    cmc, mAP, valid = evaluate_from_features(q, g, qp, gp, qc, gc, max_rank=10, process_group=group)
    lines = [f"evaluation: {valid} queries with a true match", _cmc_line("features", cmc, mAP)]
    if isinstance(res, tuple):
        cmc, mAP, valid, complete = evaluate_topk(res[0], res[1], qp, gp, qc, gc, max_rank=10, process_group=group)
        note = f"  (top-{res[0].shape[1]} lists; all true matches inside for {complete} of {valid} queries)"
    elif group is None:
        (cmc, mAP, valid), note = evaluate(res, qp, gp, qc, gc, max_rank=10), ""
    else:   # dense rows: the lists of the whole gallery, which evaluate_topk ranks as evaluate does
        every = torch.arange(num_gallery).expand(res.shape[0], num_gallery)
        cmc, mAP, valid, _ = evaluate_topk(res, every, qp, gp, qc, gc, max_rank=10, process_group=group)
        note = ""
    lines.append(_cmc_line("re-ranked", cmc, mAP) + note)
    return lines


def _cmc_line(name: str, cmc, mAP: float) -> str:
    ranks = "  ".join(f"rank-{k} {100 * float(cmc[k - 1]):6.2f}" if k <= len(cmc) else f"rank-{k}      -"
                      for k in (1, 5, 10))
    return f"  {name:<10} {ranks}  mAP {100 * mAP:6.2f}"


def read_features(path: str, mmap: bool = False) -> torch.Tensor:
    """One (n, d) real-valued tensor from a .pt or .npy file; one clear error otherwise. With
    ``mmap`` the file is memory-mapped (numpy.load(mmap_mode="c"), torch.load(mmap=True); a .pt
    file in torch's old non-zip format is read whole): rows are read when they are used."""
    obj = _read_tensor(path, mmap, "feature file", "features", "(n, d)")
    if not (obj.dtype.is_floating_point or obj.dtype in _INT_DTYPES):
        raise ValueError(f"{path}: expected real-valued features, got dtype {obj.dtype}")
    return obj


def read_ids(path: str, rows: int, flag: str, of: str, mmap: bool = False) -> torch.Tensor:
    """The (rows, 2) integer (pid, camid) array of ``path`` (.npy or .pt), one row per feature row
    of ``of``; one clear error otherwise (read as read_features reads)."""
    obj = _read_tensor(path, mmap, "id file", "ids", "(n, 2) of (pid, camid)")
    if obj.dim() != 2 or obj.shape[1] != 2 or obj.dtype not in _INT_DTYPES:
        raise ValueError(f"{flag} {path}: expected an (n, 2) integer array of (pid, camid) rows, "
                         f"got shape {tuple(obj.shape)} and dtype {obj.dtype}")
    if obj.shape[0] != rows:
        raise ValueError(f"{flag} {path} has {obj.shape[0]} rows but {of} has {rows}: one (pid, camid) row per "
                         "feature row")
    return obj


_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _read_tensor(path: str, mmap: bool, file_kind: str, content: str, shape: str) -> torch.Tensor:
    import zipfile

    import numpy as np

    from fmn.checkpoint import load_failure

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{file_kind} not found: {path}")
    try:
        if path.endswith(".npy"):
            obj = torch.from_numpy(np.load(path, allow_pickle=False, mmap_mode="c" if mmap else None))
        elif mmap and zipfile.is_zipfile(path):   # torch's old non-zip format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # not a .npy array / a torch file of tensors: say so in one line
        reason = (f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
                  if path.endswith(".npy") else load_failure(path, exc))
        raise ValueError(f"cannot read {content} from {path} (expected a .pt tensor or a .npy array; "
                         f"{reason})") from None
    if not torch.is_tensor(obj):
        raise ValueError(f"{path} must hold one tensor {shape}, got {type(obj).__name__}")
    return obj


def check_device(cfg: dict) -> None:
    """One clear error now when the config's device does not exist here."""
    resolve_device(cfg["train"]["device"])
