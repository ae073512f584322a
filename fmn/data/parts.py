"""Training batches with body-part masks and keypoint region masks (MMGA, MGRAN).

A parts-aware loader yields the batches of :mod:`fmn.data.loader` plus one tensor

    parts  float32 (B, 6, H, W) in [0, 1], channels in the order of ``PART_CHANNELS``:

    body      the pedestrian: every non-background label (1..5)
    upper     head + upper body (labels 1, 2)
    lower     lower body + shoes (labels 3, 4)
    kp_head   keypoint region of the head (nose, eyes, ears)
    kp_upper  keypoint region of the upper body (shoulders, elbows, wrists, hips)
    kp_lower  keypoint region of the lower body (hips, knees, ankles)

The label masks and keypoints are the files of :mod:`fmn.data.masks` (``<root>/parts/<split>/
<stem>.png`` and ``.json``). Label masks are resized to H x W with antialiased bilinear
interpolation of each 0/1 group map (so borders are soft). A keypoint region is rendered at
H x W as ``max_s exp(-d_s(p)^2 / (2 sigma^2))`` over the region's skeleton segments s between
visible keypoints (a visible keypoint with no visible neighbour is a point), where d_s(p) is the
distance from pixel p to the segment and ``sigma = kp_sigma * W``.

Augmentation: the masks go through the same horizontal flip and pad-and-crop as the image
(one draw per sample, ``fmn.data.transforms.augment_batch`` on the stacked image and mask
channels; the zero padding is background for the masks). Random erasing then fills a rectangle
of the image with noise and sets the masks to 0 there: an erased rectangle is an occluder, and
occluders are background in the mask files (``fmn.data.masks``). A batch's draws are seeded by
(seed, its sample indices) (``fmn.data.transforms.batch_generator``), as in
``fmn.data.loader``: the same in any worker, on any replica, after any resume. The region groups
are left/right symmetric, so a flip needs no channel swap.

Missing files or a mask whose size differs from its image raise ``DatasetError`` naming the
file and the expected layout before training starts (``check_parts``).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fmn.data.base import DatasetError, ReIDDataset, Sample
from fmn.data.masks import KEYPOINT_NAMES, load_keypoints, load_mask, parts_paths
from fmn.data.sampler import PKSampler
from fmn.data.transforms import augment_batch, batch_generator, load_resized, to_float_normalized

__all__ = ["PART_CHANNELS", "LABEL_GROUPS", "KEYPOINT_REGIONS", "LAYOUT_HELP", "PartsImageDataset",
           "check_parts", "has_parts", "keypoint_regions", "label_groups", "make_parts_test_loader",
           "make_parts_train_loader", "part_index",
           "render_parts"]

PART_CHANNELS = ("body", "upper", "lower", "kp_head", "kp_upper", "kp_lower")

LABEL_GROUPS = {"body": (1, 2, 3, 4, 5), "upper": (1, 2), "lower": (3, 4)}

_K = {n: i for i, n in enumerate(KEYPOINT_NAMES)}
KEYPOINT_REGIONS = {
    "kp_head": [("left_ear", "left_eye"), ("left_eye", "nose"), ("nose", "right_eye"), ("right_eye", "right_ear"),
                ("left_ear", "right_ear")],
    "kp_upper": [("left_shoulder", "right_shoulder"), ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
                 ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"), ("left_shoulder", "left_hip"),
                 ("right_shoulder", "right_hip"), ("left_hip", "right_hip")],
    "kp_lower": [("left_hip", "right_hip"), ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
                 ("right_hip", "right_knee"), ("right_knee", "right_ankle")],
}

LAYOUT_HELP = ("expected a body-part mask and a keypoints file beside every image <dir>/<folder>/<stem>.<ext>: "
               "<dir>/parts/<folder>/<stem>.png (8-bit labels 0..5, the image's size) and "
               "<dir>/parts/<folder>/<stem>.json (COCO-17 keypoints), or <parts_root>/<folder>/<stem>.png|.json "
               "with seed.parts_root; see fmn.data.masks")


def part_index(names: Sequence[str]) -> List[int]:
    """Channel indices of ``names`` in ``PART_CHANNELS``; a clear error for an unknown name."""
    out = []
    for n in names:
        if n not in PART_CHANNELS:
            raise ValueError(f"unknown part channel {n!r}; expected one of {', '.join(PART_CHANNELS)}")
        out.append(PART_CHANNELS.index(n))
    return out


def label_groups(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """float32 (3, height, width): the body / upper / lower group maps of a label mask, resized."""
    maps = np.stack([np.isin(mask, LABEL_GROUPS[g]) for g in ("body", "upper", "lower")]).astype(np.float32)
    if maps.shape[1:] == (height, width):
        return maps
    t = torch.from_numpy(maps)[None]
    t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return t[0].clamp_(0.0, 1.0).numpy()


def _segment_distance2(px: np.ndarray, py: np.ndarray, a: Tuple[float, float], b: Tuple[float, float]) -> np.ndarray:
    # squared distance from each pixel p to the segment [a, b]: t = clamp(<p - a, b - a> / |b - a|^2, 0, 1)
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    n2 = dx * dx + dy * dy
    if n2 <= 1e-12:
        return (px - ax) ** 2 + (py - ay) ** 2
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / n2, 0.0, 1.0)
    return (px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2


def keypoint_regions(keypoints: np.ndarray, src_hw: Tuple[int, int], height: int, width: int,
                     kp_sigma: float = 0.1) -> np.ndarray:
    """float32 (3, height, width): the kp_head / kp_upper / kp_lower region maps (module docstring)."""
    sy, sx = height / float(src_hw[0]), width / float(src_hw[1])
    px = (np.arange(width, dtype=np.float32) + 0.5)[None, :]
    py = (np.arange(height, dtype=np.float32) + 0.5)[:, None]
    sigma = max(1e-3, kp_sigma * width)
    out = np.zeros((3, height, width), np.float32)
    for r, name in enumerate(("kp_head", "kp_upper", "kp_lower")):
        d2 = np.full((height, width), np.inf, np.float32)
        linked = set()
        for ka, kb in KEYPOINT_REGIONS[name]:
            a, b = keypoints[_K[ka]], keypoints[_K[kb]]
            if a[2] > 0 and b[2] > 0:
                pa, pb = (a[0] * sx, a[1] * sy), (b[0] * sx, b[1] * sy)
                d2 = np.minimum(d2, _segment_distance2(px, py, pa, pb))
                linked.update((ka, kb))
        for ka, kb in KEYPOINT_REGIONS[name]:
            for k in (ka, kb):
                p = keypoints[_K[k]]
                if p[2] > 0 and k not in linked:
                    d2 = np.minimum(d2, _segment_distance2(px, py, (p[0] * sx, p[1] * sy), (p[0] * sx, p[1] * sy)))
        out[r] = np.exp(-d2 / (2.0 * sigma * sigma))
    return out


def render_parts(image_path: str, height: int, width: int, parts_root: Optional[str] = None,
                 kp_sigma: float = 0.1) -> np.ndarray:
    """float32 (6, height, width) in the order of ``PART_CHANNELS`` for one image.

    Raises ``DatasetError`` for a missing or unreadable file, or a mask / keypoints file whose
    size differs from the image's."""
    mask = load_mask(image_path, parts_root, check_size=True)
    kp = load_keypoints(image_path, parts_root, check_size=True)
    return np.concatenate([label_groups(mask, height, width),
                           keypoint_regions(kp, mask.shape, height, width, kp_sigma)])


def check_parts(samples: Sequence[Sample], parts_root: Optional[str] = None, check_size: bool = True,
                show: int = 5) -> None:
    """Raise one ``DatasetError`` listing the images whose mask / keypoints file is missing, or
    whose mask size differs from the image (PNG headers only; no decoding)."""
    missing, missized = [], []
    for path, _, _ in samples:
        mask_path, kp_path = parts_paths(path, parts_root)
        for p in (mask_path, kp_path):
            if not os.path.isfile(p):
                missing.append(p)
        if check_size and os.path.isfile(mask_path):
            try:
                with Image.open(mask_path) as m, Image.open(path) as im:
                    if m.size != im.size:
                        missized.append(f"{mask_path} is {m.size[1]}x{m.size[0]} but {path} is "
                                        f"{im.size[1]}x{im.size[0]} (HxW)")
            except Exception as e:
                missized.append(f"{mask_path}: cannot read ({type(e).__name__}: {e})")
    if missing:
        first = "\n  ".join(missing[:show])
        raise DatasetError(f"{len(missing)} body-part file(s) missing for {len(samples)} images; {LAYOUT_HELP}. "
                           f"First missing:\n  {first}")
    if missized:
        first = "\n  ".join(missized[:show])
        raise DatasetError(f"{len(missized)} body-part mask(s) do not match their image's size; {LAYOUT_HELP}. "
                           f"First:\n  {first}")


class PartsImageDataset(Dataset):
    """``(path, pid, camid)`` samples -> (uint8 image (3, H, W), uint8 parts (6, H, W), pid, camid,
    path, index); parts hold ``round(255 * value)``. ``cache()`` decodes everything once."""

    def __init__(self, samples: Sequence[Sample], height: int, width: int, parts_root: Optional[str] = None,
                 kp_sigma: float = 0.1):
        self.samples = list(samples)
        self.height, self.width = int(height), int(width)
        self.parts_root = parts_root
        self.kp_sigma = float(kp_sigma)
        self._imgs: Optional[torch.Tensor] = None
        self._parts: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        path = self.samples[i][0]
        img = load_resized(path, self.height, self.width)
        parts = render_parts(path, self.height, self.width, self.parts_root, self.kp_sigma)
        return img, torch.from_numpy(np.rint(parts * 255.0).astype(np.uint8))

    def cache(self, progress: bool = True) -> "PartsImageDataset":
        from tqdm.auto import tqdm

        n = len(self)
        imgs = torch.empty((n, 3, self.height, self.width), dtype=torch.uint8)
        parts = torch.empty((n, len(PART_CHANNELS), self.height, self.width), dtype=torch.uint8)
        for i in tqdm(range(n), desc="cache images + parts", disable=not progress, unit="img"):
            imgs[i], parts[i] = self._load(i)
        self._imgs, self._parts = imgs, parts
        return self

    def __getitem__(self, i: int):
        path, pid, camid = self.samples[i]
        if self._imgs is not None:
            img, parts = self._imgs[i], self._parts[i]
        else:
            img, parts = self._load(i)
        return img, parts, pid, camid, path, i


class _PartsCollate:
    """Stack, normalise, augment image and masks together; picklable for worker processes."""

    def __init__(self, augment: bool, seed: int, flip_p: float, pad: int, erase_p: float):
        self.augment = augment
        self.seed = seed
        self.flip_p, self.pad, self.erase_p = flip_p, pad, erase_p

    def __call__(self, items):
        x = to_float_normalized(torch.stack([it[0] for it in items]))
        parts = torch.stack([it[1] for it in items]).float().div_(255.0)
        if self.augment:
            gen = batch_generator(self.seed, torch.tensor([it[5] for it in items], dtype=torch.int64), x.device)
            both = augment_batch(torch.cat([x, parts], 1), flip_p=self.flip_p, pad=self.pad, erase_p=0.0,
                                 generator=gen)
            x, parts = both[:, :3].contiguous(), both[:, 3:].contiguous()
            if self.erase_p > 0:
                x, erased = augment_batch(x, flip_p=0.0, pad=0, erase_p=self.erase_p, generator=gen,
                                          return_erased=True)
                parts = parts.masked_fill_(erased, 0.0)
        return {"img": x, "parts": parts,
                "pid": torch.tensor([it[2] for it in items], dtype=torch.int64),
                "camid": torch.tensor([it[3] for it in items], dtype=torch.int64),
                "path": [it[4] for it in items],
                "index": torch.tensor([it[5] for it in items], dtype=torch.int64)}


def has_parts(samples: Sequence[Sample], parts_root: Optional[str] = None) -> bool:
    """Whether every sample has its mask and keypoints file."""
    return all(os.path.isfile(p) for path, _, _ in samples for p in parts_paths(path, parts_root))


def make_parts_test_loader(samples: Sequence[Sample], height: int, width: int, batch_size: int = 128,
                           workers: int = 2, parts_root: Optional[str] = None, kp_sigma: float = 0.1) -> DataLoader:
    """Loader over ``samples`` in their order with their part masks, no augmentation, last batch kept."""
    samples = list(samples)
    if not samples:
        raise ValueError("make_parts_test_loader: no samples")
    check_parts(samples, parts_root)
    return DataLoader(PartsImageDataset(samples, height, width, parts_root, kp_sigma), batch_size=batch_size,
                      shuffle=False, num_workers=workers, collate_fn=_PartsCollate(False, 0, 0.0, 0, 0.0))


def make_parts_train_loader(dataset: Union[ReIDDataset, Sequence[Sample]], height: int, width: int,
                            batch_size: int = 64, num_instances: int = 4, workers: int = 2, seed: int = 0,
                            cache: bool = False, augment: bool = True, num_replicas: int = 1, rank: int = 0,
                            parts_root: Optional[str] = None, kp_sigma: float = 0.1, flip_p: float = 0.5,
                            pad: int = 10, erase_p: float = 0.0, check: bool = True,
                            progress: bool = True) -> DataLoader:
    """PK-sampled training loader whose batches also hold ``parts`` (B, 6, H, W) (module docstring).

    ``parts_root`` defaults to the dataset's own (``<root>/parts``). ``check`` verifies every
    training image's mask and keypoints file up front (``check_parts``)."""
    if isinstance(dataset, ReIDDataset):
        samples = list(dataset.train)
        if parts_root is None:
            parts_root = dataset.parts_root
    else:
        samples = list(dataset)
    if not samples:
        raise ValueError("make_parts_train_loader: no training samples")
    if check:
        check_parts(samples, parts_root)
    ds = PartsImageDataset(samples, height, width, parts_root, kp_sigma)
    if cache:
        ds.cache(progress=progress)
        workers = 0
    sampler = PKSampler([p for _, p, _ in samples], batch_size=batch_size, num_instances=num_instances,
                        num_replicas=num_replicas, rank=rank, seed=seed)
    collate = _PartsCollate(augment, seed, flip_p, pad, erase_p)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                      collate_fn=collate, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())
