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
``query_idx``, ``gallery_idx``. The images are the boxes of the original release's
``cuhk-03.mat`` saved as PNG files named ``<pair>_<person:03d>_<view>_<image:02d>.png``
(view 1 for the first five images of a person, 2 for the last five). When the image folder is
missing and ``cuhk-03.mat`` is found (in ``root`` or ``root/cuhk03_release``), the boxes are
extracted once into ``root/images_labeled`` / ``root/images_detected``; that file is MATLAB
v7.3 (HDF5), so this step needs the ``h5py`` package.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from fmn.data.base import DatasetError, ReIDDataset
from fmn.data.market import CUHK03NP_PATTERN, SPLIT_FOLDERS, read_market_layout

__all__ = ["build_cuhk03", "extract_cuhk03_release"]

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
        release = _release_file(root)
        if images_dir is None and release is not None:
            images_dir = os.path.join(root, f"images_{kind}")
            extract_cuhk03_release(release, root, kinds=(kind,))
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


def _release_file(root: str) -> Optional[str]:
    for d in (root, os.path.join(root, "cuhk03_release")):
        f = os.path.join(d, "cuhk-03.mat")
        if os.path.isfile(f):
            return f
    return None


def extract_cuhk03_release(mat_path: str, out_root: str, kinds=("labeled", "detected"),
                           progress: bool = True) -> None:
    """Save the boxes of the original ``cuhk-03.mat`` as PNG files under
    ``out_root/images_<kind>/`` with the names used by the new-protocol split files.

    The file (MATLAB v7.3 / HDF5) holds, for ``labeled`` and ``detected``, one cell per camera
    pair of shape (persons, 10): ten image slots per person, empty where there is no image.
    Each image is stored transposed (3, W, H). The folder is written to a temporary name and
    renamed when complete, so an interrupted extraction is redone next time.
    """
    try:
        import h5py
    except ImportError:
        raise DatasetError(f"{mat_path}: extracting the CUHK03 images needs h5py (pip install h5py), or "
                           "extract them yourself into images_labeled/ and images_detected/") from None
    from PIL import Image
    from tqdm.auto import tqdm

    try:
        f = h5py.File(mat_path, "r")
    except Exception as e:
        raise DatasetError(f"{mat_path}: cannot open as MATLAB v7.3 / HDF5 ({type(e).__name__}: {e})") from None
    with f:
        for kind in kinds:
            if kind not in f:
                raise DatasetError(f"{mat_path}: no '{kind}' entry; expected 'labeled' and 'detected'")
            final = os.path.join(out_root, f"images_{kind}")
            if os.path.isdir(final):
                continue
            tmp = final + ".partial"
            os.makedirs(tmp, exist_ok=True)
            pairs = f[kind][()].reshape(-1)
            for pair_id, pair_ref in enumerate(pairs):
                cells = f[pair_ref][()].T                # (persons, 10) references
                for person in tqdm(range(cells.shape[0]), desc=f"extract {kind} pair {pair_id + 1}",
                                   disable=not progress, unit="id"):
                    for slot in range(cells.shape[1]):
                        img = f[cells[person, slot]][()]
                        if img.ndim != 3 or img.size == 0:
                            continue
                        view = 1 if slot < 5 else 2
                        name = f"{pair_id + 1}_{person + 1:03d}_{view}_{slot + 1:02d}.png"
                        Image.fromarray(np.ascontiguousarray(img.T, dtype=np.uint8)).save(os.path.join(tmp, name))
            os.replace(tmp, final)


def _mat_str(x) -> str:
    while isinstance(x, np.ndarray):
        if x.size == 0:
            return ""
        x = x.reshape(-1)[0]
    return str(x)
