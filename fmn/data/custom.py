"""A user's own dataset: a CSV file or a folder-per-identity tree.

CSV (``root`` is the .csv file): one row per image, ``path,pid,camid,split`` with an optional
header row. ``path`` is absolute or relative to the CSV's folder; ``pid`` an integer (-1 rows
are dropped as junk); ``camid`` a non-negative integer used as is; ``split`` one of ``train``,
``query``, ``gallery`` (``test`` is accepted for ``gallery``). Train rows may be absent: such a
dataset serves evaluation only (``ReIDDataset.require_train`` refuses it for training).

Folder tree (``root`` a folder)::

    root/train/<identity>/<image>
    root/query/<identity>/<image>
    root/gallery/<identity>/<image>     (``bounding_box_test``/``test`` also accepted)

``train/`` may be absent or empty (a dataset for evaluation only).

``<identity>`` is a folder name: an integer is used as the identity number; otherwise the names
found under all three splits are numbered 1..n in sorted order (so query and gallery agree).
The camera comes from a ``c<digits>`` token in the image name (``_c3_``, ``c3s1``: 1-based,
stored 0-based); images without one get camera 0 in train and query and camera 1 in the
gallery, so every gallery image of the query's identity counts as a cross-camera match.
A split folder holds only identity folders and an identity folder only images (.jpg, .jpeg,
.png, .bmp); any other file or folder is an error naming it. System files (hidden names such
as ``.DS_Store`` and ``._*``, ``Thumbs.db``, ``desktop.ini``) are ignored, and so is a ``parts``
folder directly under a split folder: the default place of the body-part masks and keypoints of
that split's images (``root/<split>/parts/<identity>/<stem>.png|.json``, see
:mod:`fmn.data.masks`), so ``parts`` cannot name an identity.
"""
from __future__ import annotations

import csv
import os
import re
from typing import Dict, List

from fmn.data.base import DatasetError, ReIDDataset, Sample, is_image_name, is_system_file, not_an_image_error

__all__ = ["build_custom", "read_csv", "read_folder_tree"]

_CAM = re.compile(r"(?:^|[_\-.])c(\d+)(?=s\d|[_\-.]|$)", re.IGNORECASE)
_SPLIT_ALIASES = {"train": "train", "query": "query", "gallery": "gallery", "test": "gallery",
                  "bounding_box_train": "train", "bounding_box_test": "gallery"}
_DEFAULT_CAM = {"train": 0, "query": 0, "gallery": 1}


def build_custom(root: str, **options) -> ReIDDataset:
    root = os.path.expanduser(str(root))
    if os.path.isfile(root):
        return read_csv(root, **options)
    if os.path.isdir(root):
        return read_folder_tree(root, **options)
    raise DatasetError(f"{root}: not found; expected a CSV file (path,pid,camid,split) or a folder "
                       "with train/, query/, gallery/ sub-folders of identity folders")


def _read_rows(csv_path: str) -> List[List[str]]:
    """The CSV's rows; UTF-8 with or without the byte-order mark spreadsheet programs write."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{csv_path}: not a UTF-8 text file ({e.reason} at byte {e.start}); expected a CSV "
                           "with rows path,pid,camid,split") from None


def read_csv(csv_path: str, name: str = "custom", **options) -> ReIDDataset:
    base = os.path.dirname(os.path.abspath(csv_path))
    splits: Dict[str, List[Sample]] = {"train": [], "query": [], "gallery": []}
    rows = _read_rows(csv_path)
    start = 0
    if rows and [c.strip().lower() for c in rows[0]][:4] == ["path", "pid", "camid", "split"]:
        start = 1
    for lineno, row in enumerate(rows[start:], start + 1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 4:
            raise DatasetError(f"{csv_path}:{lineno}: expected 4 columns path,pid,camid,split; got {row!r}")
        rel, pid_s, cam_s, split_s = (c.strip() for c in row)
        try:
            pid, cam = int(pid_s), int(cam_s)
        except ValueError:
            raise DatasetError(f"{csv_path}:{lineno}: pid and camid must be integers; got {pid_s!r}, {cam_s!r}") from None
        split = _SPLIT_ALIASES.get(split_s.lower())
        if split is None:
            raise DatasetError(f"{csv_path}:{lineno}: split must be train, query or gallery; got {split_s!r}")
        if cam < 0:
            raise DatasetError(f"{csv_path}:{lineno}: camid must be >= 0; got {cam}")
        path = rel if os.path.isabs(rel) else os.path.join(base, rel)
        if not os.path.isfile(path):
            raise DatasetError(f"{path}: image listed in {csv_path} (line {lineno}) not found")
        if pid == -1:
            continue
        splits[split].append((path, pid, cam))
    for s in ("query", "gallery"):
        if not splits[s]:
            raise DatasetError(f"{csv_path}: no rows for the {s} split")
    return ReIDDataset(name, csv_path, splits["train"], splits["query"], splits["gallery"], **options)


def _split_dirs(root: str) -> Dict[str, str]:
    found: Dict[str, str] = {}
    for entry in sorted(os.listdir(root)):
        split = _SPLIT_ALIASES.get(entry.lower())
        if split and os.path.isdir(os.path.join(root, entry)) and split not in found:
            found[split] = os.path.join(root, entry)
    for s in ("query", "gallery"):
        if s not in found:
            raise DatasetError(f"{os.path.join(root, s)}: folder not found; expected query/ and gallery/ "
                               "(and train/ to train on it) each holding one folder per identity")
    return found


# The annotations folder that fmn.data.masks puts beside a tree's identity folders.
_PARTS_DIR = "parts"


def _identity_dirs(split_dir: str) -> List[str]:
    """The identity folders of a split: sub-folders, except hidden ones (``.ipynb_checkpoints``)
    and the ``parts`` annotations folder."""
    return [d for d in os.listdir(split_dir)
            if not d.startswith(".") and d != _PARTS_DIR and os.path.isdir(os.path.join(split_dir, d))]


def read_folder_tree(root: str, name: str = "custom", **options) -> ReIDDataset:
    dirs = _split_dirs(root)
    ids = sorted({d for s in dirs.values() for d in _identity_dirs(s)})
    numeric = all(d.lstrip("-").isdigit() for d in ids)
    id_map = {d: (int(d) if numeric else i + 1) for i, d in enumerate(ids)}
    splits: Dict[str, List[Sample]] = {"train": []}
    for split, folder in dirs.items():
        out: List[Sample] = []
        for ident in sorted(os.listdir(folder)):
            idir = os.path.join(folder, ident)
            if is_system_file(ident) or (ident == _PARTS_DIR and os.path.isdir(idir)):
                continue
            if not os.path.isdir(idir):
                what = "image" if is_image_name(ident) else "file"
                raise DatasetError(f"{idir}: {what} directly under {folder}; expected only identity "
                                   f"folders, {folder}/<identity>/<image>")
            pid = id_map[ident]
            if pid == -1:
                continue
            for fname in sorted(os.listdir(idir)):
                fpath = os.path.join(idir, fname)
                if is_system_file(fname):
                    continue
                if os.path.isdir(fpath):
                    raise DatasetError(f"{fpath}: folder inside the identity folder {idir}; expected "
                                       f"the images directly in it, {folder}/<identity>/<image>")
                if not is_image_name(fname):
                    raise not_an_image_error(fpath, f"only images in the identity folder {idir}")
                stem = os.path.splitext(fname)[0]
                m = _CAM.search(stem)
                cam = int(m.group(1)) - 1 if m else _DEFAULT_CAM[split]
                if cam < 0:
                    raise DatasetError(f"{fpath}: camera c0 in the name; cameras are 1-based")
                out.append((fpath, pid, cam))
        if not out and split != "train":
            raise DatasetError(f"{folder}: no images found; expected {folder}/<identity>/<image>")
        splits[split] = out
    return ReIDDataset(name, root, splits["train"], splits["query"], splits["gallery"], **options)
