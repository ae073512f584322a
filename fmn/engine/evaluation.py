"""Feature extraction and the re-ID results table (DESIGN §4, the rows of the paper's Table 1).

Rows of :func:`evaluate_features`, from the model's dict of branch features:

* one row per branch key, upper-cased ("GRN", "LAN", ...): Euclidean distance on the
  L2-normalised branch feature;
* "FMN" when both "grn" and "lan" are present: the descriptor of eq. (6),
  ``D = [alpha g/|g|, (1 - alpha) l/|l|]``;
* "fused" when the dict has a "descriptor" key (used as given, not normalised);
* each of them again as "<row>+RR" with k-reciprocal re-ranking (``fmn_kernels.rerank``,
  k1=20, k2=6, lambda=0.3) applied to the same vectors.

An FMN model trained in stage 1 only gives "grn" alone, so its table has the GRN rows only.

Each row holds rank1, rank5, rank10, rank20 and mAP in percent, and valid_queries.
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from fmn.atomic import atomic_write
from fmn.metrics import euclidean_distance, evaluate
from fmn_kernels.rerank import rerank as fmn_rerank

__all__ = ["extract_features", "fuse", "evaluate_features", "evaluate_model", "format_results", "retrieval_descriptor",
           "retrieval_row", "eval_mode", "input_dtype", "write_json"]


def _as_feature_dict(out) -> Dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {"descriptor": out}
    if isinstance(out, dict):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return {"descriptor": out[0]}
    raise TypeError(f"model output must be a tensor or a dict of tensors, got {type(out).__name__}")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model.eval()`` inside the block; on exit every submodule gets back its own train/eval flag
    (a submodule kept in eval mode inside a training model, e.g. a frozen branch, stays in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def input_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter or buffer (float32 if none): the
    dtype its input images are cast to."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, device, flip: bool = True, progress: bool = True,
                     ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor, List[str]]:
    """Run ``model.eval()`` over ``loader``; with ``flip`` the feature is the mean of the image's
    and its mirror's. Batches with ``parts`` (a parts-aware test loader) pass them to the model as
    ``model(img, batch={"parts": ...})``, mirrored with the mirrored image. Returns (features: name -> float32 CPU (N, d), pids, camids, paths) in
    loader order. A model returning a tensor gives ``{"descriptor": tensor}``. Images are cast to
    the model's dtype; the flip mean is taken in float32. Every submodule's train/eval flag is
    restored afterwards."""
    from tqdm.auto import tqdm

    device = torch.device(device)
    dtype = input_dtype(model)
    feats: Dict[str, List[torch.Tensor]] = {}
    pids, camids, paths = [], [], []
    with eval_mode(model):
        for batch in tqdm(loader, desc="extract", disable=not progress, unit="batch"):
            x = batch["img"].to(device=device, dtype=dtype, non_blocking=True)
            parts = batch.get("parts")
            if parts is None:
                run = model
            else:   # part masks of these very images (MGRAN's test-time masks), flipped with them
                run = lambda img, p=parts.to(device): model(img, batch={"parts": p if img is x else p.flip(3)})
            out = {k: v.float() for k, v in _as_feature_dict(run(x)).items()}
            if flip:
                out_f = _as_feature_dict(run(x.flip(3)))
                out = {k: (v + out_f[k].float()) * 0.5 for k, v in out.items()}
            for k, v in out.items():
                feats.setdefault(k, []).append(v.detach().reshape(v.shape[0], -1).cpu())
            pids.append(batch["pid"].cpu())
            camids.append(batch["camid"].cpu())
            paths.extend(batch["path"])
    if not pids:
        raise ValueError("extract_features: the loader yielded no batches")
    return ({k: torch.cat(v) for k, v in feats.items()}, torch.cat(pids), torch.cat(camids), paths)


def fuse(g: torch.Tensor, l: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """FMN descriptor, eq. (6): ``[alpha g/|g|, (1 - alpha) l/|l|]`` along dim 1."""
    return torch.cat([alpha * F.normalize(g.float(), dim=1), (1 - alpha) * F.normalize(l.float(), dim=1)], dim=1)


def retrieval_descriptor(feats: Dict[str, torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """The vectors that rank, (n, D) float32: FMN's descriptor of eq. (6) when the model gives
    "grn" and "lan", else a related method's fused "descriptor", else the only branch,
    L2-normalised (a GRN-only model)."""
    if "grn" in feats and "lan" in feats:
        return fuse(feats["grn"], feats["lan"], alpha)
    if "descriptor" in feats:
        return feats["descriptor"].float()
    if len(feats) == 1:
        return F.normalize(next(iter(feats.values())).float(), dim=1)
    raise ValueError(f"the model gives neither FMN's grn/lan features nor a fused descriptor "
                     f"(features: {', '.join(sorted(feats))}); no retrieval descriptor")


def retrieval_row(feats: Dict[str, torch.Tensor]) -> str:
    """The name of the results row that ranks by ``retrieval_descriptor``."""
    if "grn" in feats and "lan" in feats:
        return "FMN"
    if "descriptor" in feats:
        return "fused"
    return next(iter(feats)).upper()


def _metrics_row(dist, q_pids, g_pids, q_camids, g_camids) -> Dict[str, float]:
    cmc, mAP, n = evaluate(dist, q_pids, g_pids, q_camids, g_camids, max_rank=20)
    return {"rank1": 100 * float(cmc[0]), "rank5": 100 * float(cmc[4]), "rank10": 100 * float(cmc[9]),
            "rank20": 100 * float(cmc[19]), "mAP": 100 * mAP, "valid_queries": int(n)}


def _descriptors(q_feats: Dict[str, torch.Tensor], g_feats: Dict[str, torch.Tensor], alpha: float):
    if set(q_feats) != set(g_feats):
        raise ValueError(f"query and gallery feature keys differ: {sorted(q_feats)} vs {sorted(g_feats)}")
    rows: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    order = [k for k in ("grn", "lan") if k in q_feats] + [k for k in q_feats if k not in ("grn", "lan", "descriptor")]
    for k in order:
        rows[k.upper()] = (F.normalize(q_feats[k].float(), dim=1), F.normalize(g_feats[k].float(), dim=1))
    if "grn" in q_feats and "lan" in q_feats:
        rows["FMN"] = (fuse(q_feats["grn"], q_feats["lan"], alpha), fuse(g_feats["grn"], g_feats["lan"], alpha))
    if "descriptor" in q_feats:
        rows["fused"] = (q_feats["descriptor"].float(), g_feats["descriptor"].float())
    return rows


def evaluate_features(q_feats: Dict[str, torch.Tensor], g_feats: Dict[str, torch.Tensor], q_pids, g_pids,
                      q_camids, g_camids, rerank: bool = True, alpha: float = 0.5,
                      k1: int = 20, k2: int = 6, lambda_value: float = 0.3, device=None,
                      keep_distances: Tuple[str, ...] = ()) -> Dict[str, Dict[str, float]]:
    """Results per row (see the module docstring): row name -> {"rank1", "rank5", "rank10",
    "rank20", "mAP", "valid_queries"} (ranks and mAP in percent). Plain rows first, then the
    re-ranked ones. ``device``: where the distances, the metrics and the re-ranking run (a GPU
    when the features were extracted there); default: where the features are. With
    ``keep_distances`` (row names) the result also holds ``"distances": {row: (q, g) tensor}``
    of those plain rows, computed once for the table and reused by the pictures."""
    rows = _descriptors(q_feats, g_feats, alpha)
    if not rows:
        raise ValueError("evaluate_features: no features to evaluate")
    if device is not None:
        device = torch.device(device)
        rows = {name: (qf.to(device), gf.to(device)) for name, (qf, gf) in rows.items()}
    results: Dict[str, Dict[str, float]] = {}
    kept: Dict[str, torch.Tensor] = {}
    for name, (qf, gf) in rows.items():
        dist = euclidean_distance(qf, gf)
        results[name] = _metrics_row(dist, q_pids, g_pids, q_camids, g_camids)
        if name in keep_distances:
            kept[name] = dist
    if rerank:
        for name, (qf, gf) in rows.items():
            dist = fmn_rerank(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value)
            results[name + "+RR"] = _metrics_row(dist, q_pids, g_pids, q_camids, g_camids)
    if keep_distances:
        results["distances"] = kept
    return results


def matches_per_query(q_pids, g_pids, q_camids, g_camids) -> float:
    """The mean number of gallery images each query can match under the protocol (same identity,
    another camera; junk excluded): k-reciprocal re-ranking relies on several of them among a
    query's k1 neighbours."""
    q_pids, g_pids = torch.as_tensor(q_pids).view(-1, 1), torch.as_tensor(g_pids).view(1, -1)
    q_camids, g_camids = torch.as_tensor(q_camids).view(-1, 1), torch.as_tensor(g_camids).view(1, -1)
    valid = (q_pids == g_pids) & (q_camids != g_camids)
    return float(valid.sum(1).float().mean()) if valid.shape[0] else 0.0


def rerank_note(matches: float, k1: int = 20) -> str | None:
    """A note for the table when queries have too few true matches for k-reciprocal re-ranking: fewer
    than k1 / 5 (4 for k1 = 20; two-camera datasets have one or two)."""
    if matches >= k1 / 5:
        return None
    return (f"about {matches:.1f} gallery images per query identity (k1 = {k1}): with so few true matches "
            "among a query's neighbours k-reciprocal re-ranking may not help (on a held-out real two-camera set "
            "it lowered mAP); compare the +RR rows with the plain ones")


def format_results(results: Dict[str, Dict[str, float]], title: Optional[str] = None) -> str:
    """The results as a text table (percentages with one decimal)."""
    head = ("method", "rank-1", "rank-5", "rank-10", "rank-20", "mAP", "queries")
    keys = ("rank1", "rank5", "rank10", "rank20", "mAP")
    body = [(name, *[f"{r[k]:.1f}" for k in keys], str(r["valid_queries"])) for name, r in results.items()]
    widths = [max(len(row[i]) for row in body + [head]) for i in range(len(head))]
    fmt = lambda row: " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    lines = ([title] if title else []) + [fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in body]
    return "\n".join(lines)


def evaluate_model(model: torch.nn.Module, dataset, height: int, width: int, device, batch_size: int = 128,
                   flip: bool = True, rerank: bool = True, alpha: float = 0.5, json_path: Optional[str] = None,
                   workers: int = 2, progress: bool = True, verbose: bool = True) -> Dict[str, Dict[str, float]]:
    """Extract query and gallery features of ``dataset``, print the results table, save JSON.

    The JSON file holds ``{"dataset", "root", "num_query", "num_gallery", "height", "width", "flip",
    "alpha", "rerank", "seconds", "results": {row: {...}}}``. Returns the results dict.
    """
    from fmn.data.loader import make_test_loader

    t0 = time.time()
    ql = make_test_loader(dataset.query, height, width, batch_size=batch_size, workers=workers)
    gl = make_test_loader(dataset.gallery, height, width, batch_size=batch_size, workers=workers)
    qf, qp, qc, _ = extract_features(model, ql, device, flip=flip, progress=progress)
    gf, gp, gc, _ = extract_features(model, gl, device, flip=flip, progress=progress)
    results = evaluate_features(qf, gf, qp, gp, qc, gc, rerank=rerank, alpha=alpha, device=device)
    seconds = time.time() - t0
    if verbose:
        print(format_results(results, title=f"{dataset.name}: {len(dataset.query)} queries, "
                                            f"{len(dataset.gallery)} gallery images"))
    if json_path:
        write_json(json_path, {"dataset": dataset.name, "root": dataset.root, "num_query": len(dataset.query),
                               "num_gallery": len(dataset.gallery), "height": height, "width": width,
                               "flip": flip, "alpha": alpha, "rerank": rerank, "seconds": round(seconds, 3),
                               "results": results})
    return results


def write_json(path: str, payload: dict, strict: bool = True) -> str:
    """Write ``payload`` as JSON atomically (fmn.atomic). ``strict``: NaN / inf are an error (else
    written as Python's json module does, NaN / Infinity)."""
    text = json.dumps(payload, indent=2, allow_nan=not strict)

    def write(tmp):
        with open(tmp, "w") as fh:
            fh.write(text)

    return atomic_write(path, write)
