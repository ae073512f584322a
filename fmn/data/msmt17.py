"""MSMT17 from its list files.

Layout (V1; V2 uses ``mask_train_v2/`` and ``mask_test_v2/`` for the image folders)::

    root/[MSMT17_V1/ or msmt17/MSMT17_V1/]train/0000/0000_000_01_0303morning_0015_0.jpg ...
    root/[MSMT17_V1/]test/...
    root/[MSMT17_V1/]list_train.txt  list_val.txt  list_query.txt  list_gallery.txt

Each list line is ``<relative path> <identity>``; train and val paths are under the train
folder, query and gallery under the test folder. The camera is the third ``_`` field of the
file name (1-based, 1..15). By default the validation list is added to training, which is the
usual 32,621-image MSMT17 training set (``use_val=False`` keeps train only).
"""
from __future__ import annotations

import os
import re

from fmn.data.base import DatasetError, ReIDDataset

__all__ = ["build_msmt17"]

_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_.*\.(jpe?g|png)$", re.IGNORECASE)
_VERSIONS = (("MSMT17_V1", "train", "test"), ("MSMT17_V2", "mask_train_v2", "mask_test_v2"),
             ("MSMT17", "train", "test"))


def _find_base(root: str):
    tried = []
    subs = tuple(v[0] for v in _VERSIONS)
    for sub in ("",) + subs + tuple(f"msmt17/{v}" for v in subs[:2]):      # + the torchreid layout
        base = os.path.join(root, sub) if sub else root
        if not os.path.isfile(os.path.join(base, "list_train.txt")):
            tried.append(base)
            continue
        for _, tr, te in _VERSIONS:
            if os.path.isdir(os.path.join(base, tr)) and os.path.isdir(os.path.join(base, te)):
                return base, os.path.join(base, tr), os.path.join(base, te)
        raise DatasetError(f"{base}: list files found but no image folders (expected train/ and test/, "
                           "or mask_train_v2/ and mask_test_v2/)")
    raise DatasetError(f"{root}: MSMT17 list_train.txt not found (looked in {', '.join(tried)})")


def _read_list(list_path: str, image_dir: str):
    if not os.path.isfile(list_path):
        raise DatasetError(f"{list_path}: list file not found")
    out = []
    with open(list_path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DatasetError(f"{list_path}:{lineno}: expected '<relative image path> <identity>', got {line!r}")
            rel, pid = parts[0], int(parts[1])
            m = _NAME.match(os.path.basename(rel))
            if m is None:
                raise DatasetError(f"{list_path}:{lineno}: cannot parse the camera from {rel!r}; "
                                   "expected a name like 0000_000_01_0303morning_0015_0.jpg")
            cam = int(m.group(3))
            if cam < 1:
                raise DatasetError(f"{list_path}:{lineno}: camera must be >= 1 in {rel!r}")
            path = os.path.join(image_dir, rel)
            if not os.path.isfile(path):
                raise DatasetError(f"{path}: image listed in {os.path.basename(list_path)} (line {lineno}) not found")
            if pid == -1:
                continue
            out.append((path, pid, cam - 1))
    if not out:
        raise DatasetError(f"{list_path}: no images listed")
    return out


def build_msmt17(root: str, use_val: bool = True, **options) -> ReIDDataset:
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: dataset folder not found")
    base, train_dir, test_dir = _find_base(root)
    train = _read_list(os.path.join(base, "list_train.txt"), train_dir)
    if use_val:
        train += _read_list(os.path.join(base, "list_val.txt"), train_dir)
    query = _read_list(os.path.join(base, "list_query.txt"), test_dir)
    gallery = _read_list(os.path.join(base, "list_gallery.txt"), test_dir)
    return ReIDDataset("msmt17", base, train, query, gallery, **options)
