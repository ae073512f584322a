"""Generalisation, not memorisation, in the training log: a slice of the training identities held
out as a validation query / gallery split, evaluated every ``train.val_every`` epochs.

``train.val_ids = N`` holds out N training identities (chosen with ``train.seed``; only identities
seen by two or more cameras, so each has a cross-camera match). Of each held-out identity, the
first image is the query and the other images form the gallery; the model never trains on them. Rank-1 and mAP of the retrieval descriptor (FMN's eq. 6 descriptor once stage 2
runs, GRN's in stage 1) go to the log and ``train_log.jsonl`` (``val_rank1``, ``val_mAP``).
``train.select_best: true`` makes ``model.pt`` the final stage's epoch with the best validation
mAP (``best.pt`` keeps it as the run goes).
"""
from __future__ import annotations

import random
from collections import defaultdict

import torch
from torch import nn

from fmn.data.base import DatasetError, ReIDDataset
from fmn.engine.evaluation import evaluate_features, extract_features, retrieval_row

__all__ = ["split_validation", "Validator"]


def split_validation(dataset: ReIDDataset, num_ids: int, seed: int) -> tuple[ReIDDataset, ReIDDataset]:
    """(training set without the held-out identities, their validation query/gallery set)."""
    by_id: dict[int, list] = defaultdict(list)
    for sample in dataset.train:
        by_id[sample[1]].append(sample)
    eligible = sorted(p for p, samples in by_id.items() if len({c for _, _, c in samples}) >= 2)
    if num_ids > len(eligible) - 2:
        raise DatasetError(f"train.val_ids={num_ids}: {dataset.name} has {len(eligible)} training identities seen "
                           f"by two or more cameras; hold out at most {max(0, len(eligible) - 2)} (two must train)")
    held = set(random.Random(seed).sample(eligible, num_ids))
    query, gallery = [], []
    for pid in sorted(held):
        query.append(by_id[pid][0])
        gallery.extend(by_id[pid][1:])
    train = [s for s in dataset.train if s[1] not in held]
    rest = ReIDDataset(dataset.name, dataset.root, train, dataset.query, dataset.gallery,
                       parts_root=dataset.parts_root, check_query_in_gallery=False)
    val = ReIDDataset(f"{dataset.name} (validation: {num_ids} held-out training identities)", dataset.root, [],
                      query, gallery, relabel_train=False, parts_root=dataset.parts_root)
    return rest, val


class Validator:
    """Rank-1 / mAP of the retrieval descriptor on the validation split (no re-ranking). It runs at
    the end of an epoch, and every epoch reseeds the random streams, so training is the same with
    and without it."""

    def __init__(self, dataset: ReIDDataset, cfg: dict, device: torch.device):
        from fmn.data.loader import make_test_loader

        d, e = cfg["data"], cfg["eval"]
        self.dataset, self.flip, self.alpha, self.device = dataset, e["flip"], e["alpha"], device
        self.loaders = [make_test_loader(samples, d["height"], d["width"], batch_size=e["batch_size"], workers=0,
                                         progress=False) for samples in (dataset.query, dataset.gallery)]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        (qf, qp, qc, _), (gf, gp, gc, _) = (extract_features(model, loader, self.device, flip=self.flip,
                                                             progress=False) for loader in self.loaders)
        rows = evaluate_features(qf, gf, qp, gp, qc, gc, rerank=False, alpha=self.alpha, device=self.device)
        row = rows[retrieval_row(qf)]
        return {"val_rank1": round(row["rank1"], 3), "val_mAP": round(row["mAP"], 3)}
