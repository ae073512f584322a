"""Market-1501-style folder layouts: Market-1501, DukeMTMC-reID, CUHK03-NP, synthetic.

All share ``bounding_box_train/``, ``bounding_box_test/`` (gallery) and ``query/`` and encode
identity and camera in the file name; they differ only in the name pattern:

    Market-1501     PPPP_cCsS_FFFFFF_BB.jpg     e.g. 0002_c1s1_000451_03.jpg, -1_c3s2_012345_01.jpg
    DukeMTMC-reID   PPPP_cC_fFFFFFFF.jpg        e.g. 0005_c2_f0046985.jpg
    CUHK03-NP       PPPP_cC_N.png               e.g. 0003_c1_2.png

``bounding_box_train/`` may be absent or empty: such a dataset serves evaluation only (a model
trained on another dataset; ``ReIDDataset.require_train`` refuses it for training).

Identity -1 (Market "junk") is dropped; identity 0000 (distractors) is kept. Cameras are
written 1-based in the names (any number of digits) and stored 0-based. A split folder holds
images (.jpg, .jpeg, .png, .bmp) only: any other file is an error naming it, except system files
(hidden names such as ``.DS_Store`` and ``._*``, ``Thumbs.db``, ``desktop.ini``).
"""
from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

from fmn.data.base import DatasetError, ReIDDataset, Sample, list_images

__all__ = [
    "MARKET_PATTERN",
    "DUKE_PATTERN",
    "CUHK03NP_PATTERN",
    "find_layout_root",
    "read_market_layout",
    "read_split_folder",
    "build_market1501",
    "build_dukemtmc",
]

# The extension group accepts every name in base.IMAGE_EXTENSIONS (the files list_images returns).
MARKET_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)s(\d+)_(\d+)_(\d+)\.(jpe?g|png|bmp)$", re.IGNORECASE)
DUKE_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)_f(\d+)\.(jpe?g|png|bmp)$", re.IGNORECASE)
CUHK03NP_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)_(\d+)\.(jpe?g|png|bmp)$", re.IGNORECASE)

SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def read_split_folder(folder: str, pattern: re.Pattern, expected: str, keep_junk: bool = False,
                      allow_empty: bool = False) -> List[Sample]:
    """``(path, pid, camid)`` of every image in ``folder``; names must match ``pattern``
    (group 1 = identity, group 2 = 1-based camera). Identity -1 is dropped unless ``keep_junk``.
    A folder without usable images is an error unless ``allow_empty``."""
    out: List[Sample] = []
    paths = list_images(folder, f"only images named like {expected}")
    if not paths and not allow_empty:
        raise DatasetError(f"{folder}: no images found; expected files named like {expected}")
    for path in paths:
        name = os.path.basename(path)
        m = pattern.match(name)
        if m is None:
            raise DatasetError(f"{path}: cannot parse identity and camera from the file name; "
                               f"expected a name like {expected}")
        pid, cam = int(m.group(1)), int(m.group(2))
        if cam < 1:
            raise DatasetError(f"{path}: camera number must be >= 1 (cameras are 1-based in file names)")
        if pid == -1 and not keep_junk:
            continue
        out.append((path, pid, cam - 1))
    if not out and not allow_empty:
        raise DatasetError(f"{folder}: every image has identity -1 (junk); no usable images")
    return out


def find_layout_root(root: str, candidates: Sequence[str] = ()) -> str:
    """The folder holding ``query/ bounding_box_test/`` (and ``bounding_box_train/``, optional):
    ``root`` itself or one of ``root/<candidate>``; an error lists what was looked for."""
    root = os.path.expanduser(str(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: dataset folder not found")
    tried = [root] + [os.path.join(root, c) for c in candidates]
    for d in tried:
        if any(os.path.isdir(os.path.join(d, f)) for f in SPLIT_FOLDERS.values()):
            for s, f in SPLIT_FOLDERS.items():
                if s != "train" and not os.path.isdir(os.path.join(d, f)):
                    raise DatasetError(f"{os.path.join(d, f)}: folder not found; expected "
                                       f"{', '.join(SPLIT_FOLDERS.values())} under {d} "
                                       f"({SPLIT_FOLDERS['train']} only to train on it)")
            return d
    raise DatasetError(f"{root}: no Market-style layout found (looked for "
                       f"{'/, '.join(SPLIT_FOLDERS.values())}/ in {', '.join(tried)})")


def read_market_layout(name: str, root: str, pattern: re.Pattern, expected: str,
                       candidates: Sequence[str] = (), parts_root: Optional[str] = None,
                       check_query_in_gallery: bool = True) -> ReIDDataset:
    base = find_layout_root(root, candidates)
    train_dir = os.path.join(base, SPLIT_FOLDERS["train"])
    splits = {s: read_split_folder(os.path.join(base, f), pattern, expected)
              for s, f in SPLIT_FOLDERS.items() if s != "train"}
    splits["train"] = (read_split_folder(train_dir, pattern, expected, allow_empty=True)
                       if os.path.isdir(train_dir) else [])
    return ReIDDataset(name, base, splits["train"], splits["query"], splits["gallery"],
                       parts_root=parts_root, check_query_in_gallery=check_query_in_gallery)


def build_market1501(root: str, **options) -> ReIDDataset:
    """Market-1501 (``root`` or ``root/Market-1501-v15.09.15`` / ``root/market1501`` /
    ``root/market1501/Market-1501-v15.09.15``, the torchreid layout)."""
    return read_market_layout(
        "market1501", root, MARKET_PATTERN, "0002_c1s1_000451_03.jpg (PPPP_cCsS_FFFFFF_BB.jpg)",
        candidates=("Market-1501-v15.09.15", "Market-1501", "market1501", "market1501/Market-1501-v15.09.15"),
        **options)


def build_dukemtmc(root: str, **options) -> ReIDDataset:
    """DukeMTMC-reID (``root`` or ``root/DukeMTMC-reID`` / ``root/dukemtmc-reid/DukeMTMC-reID``)."""
    return read_market_layout(
        "dukemtmc", root, DUKE_PATTERN, "0005_c2_f0046985.jpg (PPPP_cC_fFFFFFFF.jpg)",
        candidates=("DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID", "dukemtmc-reid"), **options)
