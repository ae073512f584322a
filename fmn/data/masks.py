"""Body-part masks and keypoints stored beside a dataset's images.

Files. For an image ``<dir>/<folder>/<stem>.<ext>`` the annotations live in a ``parts`` folder
beside the image's folder (so the image folders keep only images)::

    <dir>/parts/<folder>/<stem>.png     body-part mask
    <dir>/parts/<folder>/<stem>.json    keypoints

For Market-style layouts ``<dir>`` is the dataset root and ``<folder>`` the split folder
(``<root>/parts/bounding_box_train/...``); for a folder-per-identity tree ``<dir>`` is the split
folder and ``<folder>`` the identity (``<root>/train/parts/<identity>/...``, a folder the tree
reader leaves alone). ``parts_root`` replaces ``<dir>/parts`` when the annotations are elsewhere.

Mask: a single-channel 8-bit PNG of the image's size with integer labels

    0 background (also anything hiding the person: occluders)
    1 head (face and hair/hat)
    2 upper body (torso and arms)
    3 lower body (legs)
    4 shoes / feet
    5 bag / carried accessory

Keypoints: JSON ``{"format": "coco17", "names": [...17 names...], "height": H, "width": W,
"keypoints": [[x, y, v], ...]}`` in pixel coordinates of the image, COCO order (nose, eyes,
ears, shoulders, elbows, wrists, hips, knees, ankles); ``v`` is 1 for visible, 0 for hidden
by an occluder or outside the image.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from fmn.data.base import DatasetError

__all__ = ["PART_LABELS", "KEYPOINT_NAMES", "parts_paths", "load_parts", "load_mask", "load_keypoints",
           "save_parts"]

PART_LABELS = {0: "background", 1: "head", 2: "upper_body", 3: "lower_body", 4: "shoes", 5: "bag"}
KEYPOINT_NAMES = [
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
]


def parts_paths(image_path: str, parts_root: Optional[str] = None) -> Tuple[str, str]:
    """(mask path, keypoints path) of ``image_path``."""
    image_path = os.path.abspath(image_path)
    split_dir = os.path.dirname(image_path)
    split = os.path.basename(split_dir)
    if parts_root is None:
        parts_root = os.path.join(os.path.dirname(split_dir), "parts")
    stem = os.path.splitext(os.path.basename(image_path))[0]
    base = os.path.join(parts_root, split, stem)
    return base + ".png", base + ".json"


def _image_size(image_path: str) -> Tuple[int, int]:
    try:
        with Image.open(image_path) as im:
            w, h = im.size
    except Exception as e:
        raise DatasetError(f"{image_path}: cannot open image to check its size ({e})") from None
    return h, w


def load_mask(image_path: str, parts_root: Optional[str] = None, check_size: bool = True) -> np.ndarray:
    mask_path, _ = parts_paths(image_path, parts_root)
    if not os.path.isfile(mask_path):
        raise DatasetError(f"{mask_path}: body-part mask not found (expected for image {image_path})")
    try:
        with Image.open(mask_path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(f"{mask_path}: expected a single-channel label PNG, got mode {im.mode}")
            mask = np.asarray(im, dtype=np.int64)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{mask_path}: cannot decode mask ({type(e).__name__}: {e})") from None
    if mask.min() < 0 or mask.max() > max(PART_LABELS):
        raise DatasetError(f"{mask_path}: labels must be in 0..{max(PART_LABELS)}, found {mask.min()}..{mask.max()}")
    if check_size:
        h, w = _image_size(image_path)
        if mask.shape != (h, w):
            raise DatasetError(f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but the image "
                               f"{image_path} is {h}x{w}")
    return mask.astype(np.uint8)


def load_keypoints(image_path: str, parts_root: Optional[str] = None, check_size: bool = True) -> np.ndarray:
    _, kp_path = parts_paths(image_path, parts_root)
    if not os.path.isfile(kp_path):
        raise DatasetError(f"{kp_path}: keypoints file not found (expected for image {image_path})")
    try:
        with open(kp_path) as f:
            data = json.load(f)
        kp = np.asarray(data["keypoints"], dtype=np.float32)
    except Exception as e:
        raise DatasetError(f"{kp_path}: cannot read keypoints ({type(e).__name__}: {e}); expected JSON with "
                           "a 'keypoints' list of [x, y, v]") from None
    if kp.ndim != 2 or kp.shape != (len(KEYPOINT_NAMES), 3):
        raise DatasetError(f"{kp_path}: keypoints must have shape ({len(KEYPOINT_NAMES)}, 3), got {kp.shape}")
    if check_size and ("height" in data and "width" in data):
        h, w = _image_size(image_path)
        if (int(data["height"]), int(data["width"])) != (h, w):
            raise DatasetError(f"{kp_path}: keypoints are for a {data['height']}x{data['width']} image but "
                               f"{image_path} is {h}x{w}")
    return kp


def load_parts(image_path: str, parts_root: Optional[str] = None, check_size: bool = True,
               ) -> Tuple[np.ndarray, np.ndarray]:
    """(mask uint8 (H, W) with labels 0..5, keypoints float32 (17, 3) as x, y, visible)."""
    return (load_mask(image_path, parts_root, check_size),
            load_keypoints(image_path, parts_root, check_size))


def save_parts(image_path: str, mask: np.ndarray, keypoints: np.ndarray,
               parts_root: Optional[str] = None) -> Tuple[str, str]:
    """Write the mask PNG and keypoints JSON of ``image_path``; returns their paths."""
    mask_path, kp_path = parts_paths(image_path, parts_root)
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    mask = np.asarray(mask)
    Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8)).save(mask_path)
    kp = np.asarray(keypoints, dtype=np.float32)
    data = {"format": "coco17", "names": KEYPOINT_NAMES, "height": int(mask.shape[0]),
            "width": int(mask.shape[1]),
            "keypoints": [[round(float(x), 2), round(float(y), 2), float(v)] for x, y, v in kp]}
    with open(kp_path, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    return mask_path, kp_path
