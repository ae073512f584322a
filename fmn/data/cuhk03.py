"""CUHK03 under the new protocol of Zhong et al. (767 training / 700 test identities).

Two layouts are read, labeled or detected boxes (``labeled=True/False``):

``layout="np"`` (CUHK03-NP)::

    root/[cuhk03-np/]labeled/{bounding_box_train,query,bounding_box_test}/PPPP_cC_N.png
    root/[cuhk03-np/]detected/...

``layout="mat"`` (original release + new-protocol split files)::

    root/cuhk03_new_protocol_config_labeled.mat     (also ..._detected.mat)
    root/images_labeled/1_001_1_01.png ...           (or labeled/, images_detected/, detected/)

The split file (MATLAB v5, read with scipy.io) holds ``filelist`` (image names), ``labels``
(identity), ``camId`` (1 or 2, camera within the pair), and 1-based ``train_idx``,
``query_idx``, ``gallery_idx``. The images are the per-box PNGs extracted from
``cuhk-03.mat`` (an HDF5 file, whose extraction needs h5py and is not done here).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from fmn.data.base import DatasetError, ReIDDataset
from fmn.data.market import CUHK03NP_PATTERN, SPLIT_FOLDERS, read_market_layout

__all__ = ["build_cuhk03"]

_MAT_IMAGE_DIRS = {
    "labeled": ("images_labeled", "labeled", "cuhk03_release/images_labeled"),
    "detected": ("images_detected", "detected", "cuhk03_release/images_detected"),
}


def _np_base(root: str, kind: str) -> Optional[str]:
    for d in (os.path.join(root, kind), os.path.join(root, "cuhk03-np", kind)):
        if os.path.isdir(os.path.join(d, SPLIT_FOLDERS["train"])) or os.path.isdir(os.path.join(d, "query")):
            return d
    return None


def _mat_file(root: str, kind: str) -> Optional[str]:
    for d in (root, os.path.join(root, "cuhk03_release"), os.path.join(root, "cuhk03")):
        f = os.path.join(d, f"cuhk03_new_protocol_config_{kind}.mat")
        if os.path.isfile(f):
            return f
    return None


def build_cuhk03(root: str, labeled: bool = True, layout: Optional[str] = None,
                 images_dir: Optional[str] = None, **options) -> ReIDDataset:
    """CUHK03 new protocol; ``layout`` is ``"np"``, ``"mat"`` or None (detected from the files)."""
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: dataset folder not found")
    kind = "labeled" if labeled else "detected"
    if layout is None:
        if _np_base(root, kind) is not None:
            layout = "np"
        elif _mat_file(root, kind) is not None:
            layout = "mat"
        else:
            raise DatasetError(
                f"{root}: no CUHK03 {kind} data found; expected either the CUHK03-NP layout "
                f"({kind}/bounding_box_train, {kind}/query, {kind}/bounding_box_test) or "
                f"cuhk03_new_protocol_config_{kind}.mat with extracted images")
    name = f"cuhk03_{kind}"
    if layout == "np":
        base = _np_base(root, kind) or os.path.join(root, kind)
        return read_market_layout(name, base, CUHK03NP_PATTERN, "0001_c1_1.png (PPPP_cC_N.png)", **options)
    if layout != "mat":
        raise ValueError(f"cuhk03: layout must be 'np', 'mat' or None, got {layout!r}")
    return _read_mat_layout(name, root, kind, images_dir, **options)


def _read_mat_layout(name: str, root: str, kind: str, images_dir: Optional[str], **options) -> ReIDDataset:
    from scipy.io import loadmat

    mat_path = _mat_file(root, kind)
    if mat_path is None:
        raise DatasetError(f"{os.path.join(root, f'cuhk03_new_protocol_config_{kind}.mat')}: split file not found")
    try:
        mat = loadmat(mat_path)
    except Exception as e:
        raise DatasetError(f"{mat_path}: cannot read the split file ({type(e).__name__}: {e}); "
                           "expected a MATLAB v5 .mat file") from None
    fields = ("filelist", "labels", "camId", "train_idx", "query_idx", "gallery_idx")
    missing = [f for f in fields if f not in mat]
    if missing:
        raise DatasetError(f"{mat_path}: missing field(s) {', '.join(missing)}; expected {', '.join(fields)}")
    filelist = [_mat_str(x) for x in np.asarray(mat["filelist"], dtype=object).reshape(-1)]
    labels = np.asarray(mat["labels"]).astype(np.int64).reshape(-1)
    cams = np.asarray(mat["camId"]).astype(np.int64).reshape(-1)
    n = len(filelist)
    if len(labels) != n or len(cams) != n:
        raise DatasetError(f"{mat_path}: filelist ({n}), labels ({len(labels)}) and camId ({len(cams)}) "
                           "must have the same length")

    if images_dir is None:
        cands = [os.path.join(os.path.dirname(mat_path), d) for d in _MAT_IMAGE_DIRS[kind]]
        cands += [os.path.join(root, d) for d in _MAT_IMAGE_DIRS[kind]]
        images_dir = next((d for d in cands if os.path.isdir(d)), None)
        if images_dir is None:
            raise DatasetError(
                f"{root}: folder of CUHK03 {kind} images not found (looked for {', '.join(sorted(set(cands)))}); "
                "extract the boxes of cuhk-03.mat there as PNG files named as in the split file's filelist")

    def split(field):
        idx = np.asarray(mat[field]).astype(np.int64).reshape(-1) - 1
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise DatasetError(f"{mat_path}: {field} has index {int(bad[0]) + 1} outside 1..{n}")
        out = []
        for i in idx:
            path = os.path.join(images_dir, filelist[i])
            if not os.path.isfile(path):
                raise DatasetError(f"{path}: image listed in {os.path.basename(mat_path)} ({field}) not found")
            if cams[i] < 1:
                raise DatasetError(f"{mat_path}: camId of {filelist[i]} is {cams[i]}; expected 1-based camera ids")
            out.append((path, int(labels[i]), int(cams[i]) - 1))
        if not out:
            raise DatasetError(f"{mat_path}: {field} is empty")
        return out

    return ReIDDataset(name, root, split("train_idx"), split("query_idx"), split("gallery_idx"),
                       **options)


def _mat_str(x) -> str:
    while isinstance(x, np.ndarray):
        if x.size == 0:
            return ""
        x = x.reshape(-1)[0]
    return str(x)
