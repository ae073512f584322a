"""The dataset record shared by every loader, its checks, and image decoding."""
from __future__ import annotations

import os
from typing import Iterable, List, Sequence, Tuple

import numpy as np
from PIL import Image

__all__ = [
    "DatasetError",
    "ImageReadError",
    "IMAGE_EXTENSIONS",
    "ReIDDataset",
    "Sample",
    "read_image",
    "relabel",
]

Sample = Tuple[str, int, int]          # (path, pid, camid), camid 0-based
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


class DatasetError(ValueError):
    """A dataset on disk does not have the expected layout, names or content."""


class ImageReadError(DatasetError):
    """An image file cannot be decoded."""


def read_image(path: str) -> Image.Image:
    """Decode ``path`` fully to an RGB PIL image; any failure names the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(f"{path}: image file not found") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ImageReadError(
            f"{path}: cannot decode image ({type(e).__name__}: {e}); expected a complete JPEG/PNG/BMP file"
        ) from None


def relabel(samples: Sequence[Sample]) -> Tuple[List[Sample], dict]:
    """Map the identities of ``samples`` to 0..n-1 in ascending order of the original id."""
    pids = sorted({p for _, p, _ in samples})
    mapping = {p: i for i, p in enumerate(pids)}
    return [(path, mapping[p], c) for path, p, c in samples], mapping


class ReIDDataset:
    """Train / query / gallery lists of ``(path, pid, camid)``.

    ``query`` and ``gallery`` must hold images; ``train`` may be empty (a dataset for evaluation
    only, e.g. of a model trained on another dataset): code that trains calls
    :meth:`require_train` first. ``train`` identities are relabelled to ``0..num_train_pids-1`` (``train_pid_map`` maps the
    original identity to the label); ``query`` and ``gallery`` keep the dataset's own identity
    numbers (0 = distractor in Market-style datasets). ``camid`` is 0-based everywhere and
    ``num_cams`` is one more than the largest camera id in any split.
    """

    def __init__(self, name: str, root: str, train: Sequence[Sample], query: Sequence[Sample],
                 gallery: Sequence[Sample], relabel_train: bool = True, parts_root: str | None = None,
                 check_query_in_gallery: bool = True):
        self.name = name
        self.root = str(root)
        if relabel_train:
            train, self.train_pid_map = relabel(train)
        else:
            self.train_pid_map = {p: p for p in sorted({p for _, p, _ in train})}
        self.train: List[Sample] = list(train)
        self.query: List[Sample] = list(query)
        self.gallery: List[Sample] = list(gallery)
        self.parts_root = parts_root
        for split in ("query", "gallery"):
            if not getattr(self, split):
                raise DatasetError(f"{name} at {self.root}: the {split} split has no images")
        for split in ("train", "query", "gallery"):
            for path, pid, camid in getattr(self, split):
                if camid < 0:
                    raise DatasetError(f"{path}: camera id must be >= 0 after conversion, got {camid}")
        if check_query_in_gallery:
            gallery_pids = {p for _, p, _ in self.gallery}
            missing = [(path, p) for path, p, _ in self.query if p not in gallery_pids]
            if missing:
                path, p = missing[0]
                raise DatasetError(
                    f"{path}: query identity {p} has no image in the gallery "
                    f"({len(missing)} query image(s) affected); every query identity must appear in the gallery")

    def require_train(self) -> None:
        """Raise :class:`DatasetError` when the dataset has no training images (training on it
        is asked for; evaluating its query and gallery needs none)."""
        if not self.train:
            raise DatasetError(
                f"{self.name} at {self.root} has no training images; training needs a train split (a "
                "dataset of query and gallery only serves to evaluate a model trained elsewhere, fmn eval)")

    @property
    def num_train_pids(self) -> int:
        return len({p for _, p, _ in self.train})

    @property
    def num_train_imgs(self) -> int:
        return len(self.train)

    @property
    def num_cams(self) -> int:
        return 1 + max(c for split in (self.train, self.query, self.gallery) for _, _, c in split)

    @property
    def masks_dir(self) -> str:
        """Folder of the body-part masks and keypoints (``parts_root`` or ``<root>/parts``)."""
        return self.parts_root or os.path.join(self.root, "parts")

    def parts_path(self, image_path: str) -> Tuple[str, str]:
        """(mask PNG path, keypoints JSON path) for an image; see :mod:`fmn.data.masks`."""
        from fmn.data.masks import parts_paths
        return parts_paths(image_path, parts_root=self.parts_root)

    def load_parts(self, image_path: str):
        """(mask uint8 HxW, keypoints float32 (K, 3)) for an image; see :mod:`fmn.data.masks`."""
        from fmn.data.masks import load_parts
        return load_parts(image_path, parts_root=self.parts_root)

    def verify_images(self, progress: bool = True) -> None:
        """Decode every image once; raise :class:`ImageReadError` naming the first bad file."""
        from tqdm.auto import tqdm
        paths = [p for split in (self.train, self.query, self.gallery) for p, _, _ in split]
        for p in tqdm(paths, desc=f"verify {self.name}", disable=not progress, unit="img"):
            read_image(p)

    @staticmethod
    def _stats(samples: Iterable[Sample]) -> Tuple[int, int, int]:
        samples = list(samples)
        return (len({p for _, p, _ in samples}), len(samples), len({c for _, _, c in samples}))

    def summary(self) -> str:
        rows = [("train", *self._stats(self.train)), ("query", *self._stats(self.query)),
                ("gallery", *self._stats(self.gallery))]
        head = ("split", "ids", "images", "cameras")
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(4)]
        line = "  " + "-+-".join("-" * w for w in widths)
        fmt = lambda r: "  " + " | ".join(str(v).rjust(w) if i else str(v).ljust(w)
                                          for i, (v, w) in enumerate(zip(r, widths)))
        out = [f"=> {self.name} ({self.root})", fmt(head), line] + [fmt(r) for r in rows]
        return "\n".join(out)

    def __repr__(self) -> str:
        q, g = len(self.query), len(self.gallery)
        return (f"ReIDDataset(name={self.name!r}, train={len(self.train)} imgs/{self.num_train_pids} ids, "
                f"query={q}, gallery={g}, cams={self.num_cams})")


# Files that Windows writes into every folder it shows as thumbnails (the Market-1501 archive
# itself carries a Thumbs.db in bounding_box_test/); not part of any dataset.
SYSTEM_FILES = ("thumbs.db", "ehthumbs.db", "desktop.ini")


def is_system_file(name: str) -> bool:
    """A file the operating system or an archiver writes beside the data: hidden names
    (``.DS_Store``, the macOS ``._*`` resource forks an archive made on a Mac carries beside
    every image) and Windows' ``Thumbs.db`` / ``desktop.ini``."""
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def is_image_name(name: str) -> bool:
    """An image file name by its extension (system files such as ``._0001.jpg`` are not images)."""
    return not is_system_file(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def not_an_image_error(path: str, expected: str) -> DatasetError:
    return DatasetError(f"{path}: not an image file; expected {expected} "
                        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")


def list_images(folder: str, expected: str = "image files") -> List[str]:
    """Sorted image files directly inside ``folder``; a clear error if it is missing or holds
    a file that is neither an image nor a system file (sub-folders are not looked at)."""
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: folder not found")
    out = []
    for n in sorted(os.listdir(folder)):
        path = os.path.join(folder, n)
        if is_system_file(n) or not os.path.isfile(path):
            continue
        if not is_image_name(n):
            raise not_an_image_error(path, expected)
        out.append(path)
    return out


def as_int_array(x) -> np.ndarray:
    return np.asarray(x).astype(np.int64).reshape(-1)
