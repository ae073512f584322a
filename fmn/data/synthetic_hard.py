"""The ``hard`` synthetic preset: a small real re-ID dataset's shape and difficulty.

``generate_hard(out_dir, ...)`` (or ``fmn.data.synthetic.generate(out_dir, preset="hard", ...)``)
writes the same layout as the default preset (Market-1501 folders, ``parts/`` with a body-part
mask and keypoints per image, ``synthetic.json`` written last with ``"preset": "hard"``, the
parameters and every identity's attributes), so ``build_dataset("synthetic", out_dir)`` reads it.

Shape (defaults): 700 identities in groups of 4, whole groups alternating between train and test
(350 / 350), 2 cameras (``num_cams`` 2-6; with more than 2 each identity is seen by 2 to all of
them), 2-4 images per identity per camera (drawn per identity and camera), 128x64 images, a
quarter as many distractors (identity 0) and an eighth as many junk detections (identity -1)
as identities. For seed 0: about 2,100 training images, 700 queries (one per test identity and
camera) and about 1,600 gallery images.

What makes it hard, as in real surveillance data:

* Clothing colours come from a skewed palette (black, grey, white, navy and denim most often),
  so many identities share their clothing colours by chance, across groups; inside a group of
  ``group_size`` they share the whole global look (colours, sleeves, leg wear, build, skin) and
  differ only in details, every pair in at least two of five: hair (style and colour, or a
  hat), shoes, bag (type and colour), a chest logo (visible from the front only) and a small
  pattern on the upper body (stripes, checks, a chest band). Bags, shoes and hair are mostly
  dark, so a detail is often hard to see.
* Viewpoint and pose: front, back or side views (each camera sees mostly one of them), arm
  swing, stride, lean, scale and crop offsets of imperfect detections.
* Cameras: a cluttered scene per camera (walls, windows, posters, plants, floor tiles, other
  pedestrians), light level, colour cast, gamma and saturation, occluders in front of the
  person (poles, railings, parked objects, passers-by).
* Image quality: each person is captured at a low native resolution (35-80% of the output
  size), blurred (focus and sometimes motion), given sensor noise, JPEG-compressed at a low
  quality (the video stream), then upsampled to the output size and saved as JPEG.

Determinism: every image comes from ``numpy.random.default_rng`` streams keyed by (seed,
purpose, ids), so the output is byte-for-byte identical for the same arguments and library
versions. Masks label what is the identity (0 background, occluders and other people; 1 head,
2 upper body, 3 lower body, 4 shoes, 5 bag); keypoints (COCO-17) are hidden (v=0) outside the
image, under an occluder, on the far side of a side view and for the face seen from behind.

``python -m fmn.data.synthetic_hard`` writes a default-preset and a hard-preset dataset of the
same shape to a temporary folder and prints the generation time and the re-ID scores of trivial
descriptors (:func:`trivial_baselines`) on each.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fmn.atomic import atomic_write
from fmn.data.masks import KEYPOINT_NAMES, PART_LABELS, save_parts
from fmn.data.synthetic import MARKER, SPLIT_FOLDERS, _pick, _prepare_out_dir, _rng

__all__ = ["generate_hard", "HARD_DEFAULTS", "DETAIL_FAMILIES", "TRIVIAL_DESCRIPTORS", "detail_distance",
           "identity_details", "render_hard", "trivial_baselines"]

HARD_DEFAULTS = dict(num_ids=700, num_cams=2, images_per_id_per_cam=(2, 4), height=128, width=64, group_size=4)
MAX_CAMS = 6

# Skewed palettes: (RGB, weight). Real pedestrians mostly wear dark and neutral colours.
_UPPER = [((28, 28, 30), 22), ((70, 70, 74), 9), ((128, 128, 132), 7), ((222, 222, 216), 11), ((32, 40, 78), 10),
          ((70, 92, 130), 4), ((188, 170, 140), 5), ((98, 68, 44), 4), ((170, 35, 40), 5), ((80, 90, 50), 3),
          ((150, 185, 215), 4), ((50, 120, 70), 3), ((215, 190, 60), 2), ((215, 140, 160), 2), ((110, 60, 120), 2),
          ((220, 120, 40), 2), ((60, 130, 140), 2)]
_LOWER = [((30, 30, 32), 30), ((58, 78, 118), 24), ((34, 40, 70), 10), ((110, 110, 114), 9), ((180, 162, 130), 9),
          ((88, 62, 42), 5), ((215, 212, 205), 4), ((80, 86, 50), 4), ((140, 40, 45), 2), ((200, 160, 170), 2)]
_SKIN = [((236, 200, 170), 3), ((212, 165, 125), 3), ((165, 115, 80), 2), ((112, 78, 52), 2)]
_HAIR_COL = [((22, 18, 14), 12), ((60, 40, 25), 6), ((110, 75, 40), 3), ((190, 160, 100), 2), ((150, 150, 150), 2),
             ((140, 60, 25), 1)]
_DARKISH = [((25, 25, 28), 12), ((235, 235, 230), 5), ((95, 65, 40), 4), ((120, 120, 124), 4), ((32, 40, 78), 3),
            ((175, 40, 40), 2), ((40, 100, 170), 2), ((200, 180, 60), 1), ((60, 120, 60), 1), ((200, 110, 160), 1)]
_ACCENT = [((230, 30, 30), 1), ((30, 60, 210), 1), ((245, 245, 245), 1), ((20, 20, 20), 1), ((245, 215, 20), 1),
           ((20, 160, 80), 1), ((240, 110, 180), 1), ((240, 140, 30), 1)]
HAIR_STYLES = (("short", 5), ("long", 3), ("hat", 2), ("bald", 1))
BAGS = (("none", 5), ("backpack", 3), ("handbag", 2), ("shoulder", 3))
LOGOS = (("none", 5), ("square", 1), ("circle", 1), ("stripe", 1))
PATTERNS = (("plain", 6), ("stripes", 2), ("checks", 1), ("band", 2))
VIEWS = ("front", "back", "side")
DETAIL_FAMILIES = ("hair", "shoes", "bag", "logo", "pattern")


@dataclass
class HardIdentity:
    pid: int
    group: int
    upper: Tuple[int, int, int]
    lower: Tuple[int, int, int]
    sleeves: str                   # "long" | "short"
    legwear: str                   # "trousers" | "shorts" | "skirt"
    build_w: float
    build_h: float
    skin: Tuple[int, int, int]
    hair: str
    hair_color: Tuple[int, int, int]
    shoes: Tuple[int, int, int]
    bag: str
    bag_color: Tuple[int, int, int]
    logo: str
    logo_color: Tuple[int, int, int]
    pattern: str                   # "plain" | "stripes" | "checks" | "band"
    pattern_color: Tuple[int, int, int]
    cams: List[int] = field(default_factory=list)
    images: List[int] = field(default_factory=list)    # images per camera, in the order of cams


@dataclass
class HardCamera:
    gain: Tuple[float, float, float]
    mix: List[List[float]]         # 3x3 colour response (rows: output R, G, B)
    gamma: float
    saturation: float
    resolution: float              # native capture size as a fraction of the output size
    blur: float
    motion_p: float
    noise: float
    jpeg_quality: int
    occluder_p: float
    people: float                  # mean number of other pedestrians in the background
    views: Tuple[float, float, float]   # probabilities of front / back / side
    scale: float
    x_bias: float
    y_bias: float
    palette: List[Tuple[int, int, int]]


def _wpick(rng, table):
    """A value from [(value, weight), ...]."""
    w = np.array([t[1] for t in table], np.float64)
    return table[int(rng.choice(len(table), p=w / w.sum()))][0]


def _details(rng) -> Tuple:
    hair = _wpick(rng, HAIR_STYLES)
    hair_color = _wpick(rng, _DARKISH) if hair == "hat" else _wpick(rng, _HAIR_COL)
    shoes = _wpick(rng, _DARKISH)
    bag = _wpick(rng, BAGS)
    bag_color = _wpick(rng, _DARKISH)
    logo = _wpick(rng, LOGOS)
    logo_color = _wpick(rng, _ACCENT)
    pattern = _wpick(rng, PATTERNS)
    pattern_color = _wpick(rng, _DARKISH)
    return (hair, hair_color, shoes, bag, bag_color, logo, logo_color, pattern, pattern_color)


def detail_distance(a: Sequence, b: Sequence) -> int:
    """Number of detail families (hair, shoes, bag, logo, pattern) in which two identities differ;
    ``a`` and ``b`` are (hair, hair_color, shoes, bag, bag_color, logo, logo_color, pattern,
    pattern_color) tuples (colours as tuples or lists)."""
    a = [tuple(v) if isinstance(v, list) else v for v in a]
    b = [tuple(v) if isinstance(v, list) else v for v in b]
    hair = a[0] != b[0] or (a[0] != "bald" and a[1] != b[1])
    shoes = a[2] != b[2]
    bag = a[3] != b[3] or (a[3] != "none" and a[4] != b[4])
    logo = a[5] != b[5] or (a[5] != "none" and a[6] != b[6])
    pattern = a[7] != b[7] or (a[7] != "plain" and a[8] != b[8])
    return int(hair) + int(shoes) + int(bag) + int(logo) + int(pattern)


def identity_details(ident: Union[HardIdentity, dict]) -> Tuple:
    """The detail tuple of an identity (a HardIdentity or its dict in synthetic.json)."""
    d = asdict(ident) if isinstance(ident, HardIdentity) else ident
    return tuple(d[k] for k in ("hair", "hair_color", "shoes", "bag", "bag_color", "logo", "logo_color",
                                "pattern", "pattern_color"))


def _global_look(rng) -> dict:
    upper = _wpick(rng, _UPPER)
    lower = _wpick(rng, _LOWER)
    return dict(upper=upper, lower=lower, sleeves=_pick(rng, ("long", "long", "short")),
                legwear=_pick(rng, ("trousers",) * 5 + ("shorts", "skirt")),
                build_w=round(float(rng.uniform(0.88, 1.15)), 3), build_h=round(float(rng.uniform(0.92, 1.04)), 3),
                skin=_wpick(rng, _SKIN))


def _make_identities(seed: int, num_ids: int, group_size: int, num_cams: int,
                     per_cam: Tuple[int, int]) -> List[HardIdentity]:
    ids: List[HardIdentity] = []
    num_groups = (num_ids + group_size - 1) // group_size
    for g in range(num_groups):
        look = _global_look(_rng(seed, 101, g))
        members: List[Tuple] = []
        for m in range(group_size):
            pid = g * group_size + m + 1
            if pid > num_ids:
                break
            ri = _rng(seed, 102, pid)
            for _ in range(1000):
                d = _details(ri)
                if all(detail_distance(d, o) >= 2 for o in members):
                    break
            members.append(d)
            n_cams = num_cams if num_cams <= 2 else int(ri.integers(2, num_cams + 1))
            cams = sorted(int(c) for c in ri.choice(num_cams, size=n_cams, replace=False))
            images = [int(ri.integers(per_cam[0], per_cam[1] + 1)) for _ in cams]
            ids.append(HardIdentity(pid=pid, group=g, hair=d[0], hair_color=d[1], shoes=d[2], bag=d[3],
                                    bag_color=d[4], logo=d[5], logo_color=d[6], pattern=d[7], pattern_color=d[8],
                                    cams=cams, images=images, **look))
    return ids


def _random_identity(seed: int, k: int, num_cams: int) -> HardIdentity:
    r = _rng(seed, 104, k)
    d = _details(r)
    return HardIdentity(pid=0, group=-1, hair=d[0], hair_color=d[1], shoes=d[2], bag=d[3], bag_color=d[4],
                        logo=d[5], logo_color=d[6], pattern=d[7], pattern_color=d[8],
                        cams=[int(r.integers(num_cams))], images=[1], **_global_look(r))


def _make_cameras(seed: int, num_cams: int) -> List[HardCamera]:
    first_view = int(_rng(seed, 103).integers(3))
    cams = []
    for c in range(num_cams):
        r = _rng(seed, 103, c)
        level = r.uniform(0.6, 1.2)
        cast = r.uniform(-0.12, 0.12, size=3)
        mix = np.eye(3) + r.uniform(-0.12, 0.12, size=(3, 3)) * (1 - np.eye(3))
        mix /= mix.sum(axis=1, keepdims=True)
        views = np.full(3, 0.2)
        views[(first_view + c) % 3] = 0.6
        palette = [tuple(int(v) for v in r.integers(30, 230, size=3)) for _ in range(6)]
        cams.append(HardCamera(
            gain=tuple(round(float(level * (1 + x)), 4) for x in cast),
            mix=[[round(float(v), 4) for v in row] for row in mix], gamma=round(float(r.uniform(0.8, 1.25)), 3),
            saturation=round(float(r.uniform(0.6, 1.05)), 3), resolution=round(float(r.uniform(0.35, 0.8)), 3),
            blur=round(float(r.uniform(0.3, 0.9)), 3), motion_p=round(float(r.uniform(0.0, 0.3)), 3),
            noise=round(float(r.uniform(3.0, 7.0)), 3), jpeg_quality=int(r.integers(25, 61)),
            occluder_p=float(r.choice([0.15, 0.25, 0.35])), people=round(float(r.uniform(0.3, 1.5)), 3),
            views=tuple(float(v) for v in views), scale=round(float(r.uniform(0.78, 0.92)), 3),
            x_bias=round(float(r.uniform(-0.06, 0.06)), 3), y_bias=round(float(r.uniform(-0.04, 0.04)), 3),
            palette=palette))
    return cams


def _vary(rng, color, amount: float = 8.0):
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in color)


def _scene(seed: int, c: int, cam: HardCamera, H: int, W: int) -> Image.Image:
    """Camera ``c``'s background: a 2H x 3W picture of a wall or street front, a floor, and things."""
    r = _rng(seed, 105, c)
    SH, SW = 2 * H, 3 * W
    pal = cam.palette
    wall = np.array(pal[0], np.float32)
    wall2 = np.array(pal[1], np.float32)
    t = np.linspace(0, 1, SH)[:, None, None]
    arr = wall[None, None, :] * (1 - t) + wall2[None, None, :] * t
    arr = np.repeat(arr, SW, axis=1)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    floor_y = int(SH * r.uniform(0.55, 0.7))
    floor = tuple(int(v * 0.6) for v in pal[2])
    d.rectangle([0, floor_y, SW, SH], fill=floor)
    for k in range(int(r.integers(4, 9))):                       # floor tiles / kerb lines
        y = floor_y + (SH - floor_y) * (k + 1) / 9
        d.line([(0, y), (SW, y)], fill=tuple(int(v * 0.8) for v in floor), width=2)
    for _ in range(int(r.integers(6, 14))):                      # windows, doors, posters, signs
        x0, y0 = r.uniform(0, SW), r.uniform(0, floor_y * 0.9)
        w, h = r.uniform(0.08, 0.35) * W * 2, r.uniform(0.06, 0.3) * H * 2
        col = tuple(int(v) for v in (r.integers(0, 256, size=3) if r.random() < 0.3 else _pick(r, pal)))
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        if r.random() < 0.4:
            d.rectangle([x0 + 3, y0 + 3, x0 + w - 3, y0 + h - 3], outline=tuple(255 - v for v in col), width=2)
    for _ in range(int(r.integers(2, 6))):                       # plants, bins, lamp posts, benches
        x0, y0 = r.uniform(0, SW), r.uniform(floor_y * 0.5, floor_y * 1.05)
        col = (int(r.integers(20, 90)), int(r.integers(80, 160)), int(r.integers(20, 90))) if r.random() < 0.5 \
            else _pick(r, pal)
        if r.random() < 0.5:
            d.ellipse([x0, y0, x0 + r.uniform(20, 60), y0 + r.uniform(20, 70)], fill=col)
        else:
            d.rectangle([x0, y0 - r.uniform(40, 200), x0 + r.uniform(4, 14), y0], fill=col)
    noise = r.normal(0, 10, size=(SH // 8 + 1, SW // 8 + 1, 3)).astype(np.float32)
    noise = np.asarray(Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8)).resize((SW, SH), Image.BILINEAR),
                       np.float32) - 128
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


class _Figure:
    """The state one pedestrian drawing shares: identity, pose, geometry, colours and the draw call."""

    def __init__(self, draw, ident: HardIdentity, view: str, facing: int, P: float, cx: float, y0: float,
                 rng: np.random.Generator, label: Optional[Dict[str, int]]):
        self.draw, self.ident, self.view, self.facing = draw, ident, view, facing
        self.P, self.cx, self.y0, self.label = P, cx, y0, label
        self.bw = bw = ident.build_w
        self.swing = rng.uniform(-0.07, 0.07) * P
        self.stride = rng.uniform(0.0, 0.08) * P
        self.lean = rng.uniform(-0.025, 0.025) * P
        self.head_r = 0.062 * P
        self.hx, self.hy = cx + self.lean, self.Y(0.075)
        self.side = side = view == "side"
        self.sh_w = (0.085 if side else 0.15) * P * bw
        self.hip_w = (0.075 if side else 0.115) * P * bw
        self.sh_y, self.hip_y, self.knee_y, self.ankle_y = self.Y(0.17), self.Y(0.5), self.Y(0.72), self.Y(0.93)
        self.upper = _vary(rng, ident.upper, 10)
        self.lower = _vary(rng, ident.lower, 10)
        self.skin = _vary(rng, ident.skin, 5)
        self.limb = max(2, int(0.07 * P * bw))
        self.leg = max(2, int(0.09 * P * bw))
        self.bag_col = _vary(rng, ident.bag_color, 6)
        self.near = None

    def Y(self, f):
        """The canvas y of a fraction ``f`` of the body height."""
        return self.y0 + f * self.P

    def lab(self, part):
        """The mask label of ``part`` (None: the picture only)."""
        return None if self.label is None else self.label[part]

    @staticmethod
    def shade(col):
        """A colour in shade (the far limbs of a side view)."""
        return tuple(int(v * 0.75) for v in col)

    def fore_col(self, col):
        """The forearm colour: the sleeve's for long sleeves, else skin."""
        return col if self.ident.sleeves == "long" else self.skin

    def shin_col(self):
        """The lower-leg colour: the leg wear's for trousers, else skin."""
        return self.lower if self.ident.legwear == "trousers" else self.skin

    def torso(self):
        """The torso polygon (shoulders to hips)."""
        sx, P = self.sx, self.P
        return [(sx - self.sh_w, self.sh_y - 0.02 * P), (sx + self.sh_w, self.sh_y - 0.02 * P),
                (self.cx + self.hip_w, self.hip_y + 0.02 * P), (self.cx - self.hip_w, self.hip_y + 0.02 * P)]


def _side_skeleton(f: _Figure) -> None:
    """Joint positions of a side view, facing ``f.facing``."""
    facing, P, cx, swing, stride = f.facing, f.P, f.cx, f.swing, f.stride
    f.near = near = "right" if facing > 0 else "left"
    f.far = far = "left" if near == "right" else "right"
    f.sx = sx = cx + f.lean * 0.5
    f.sh = sh = {near: (sx + facing * 0.01 * P, f.sh_y), far: (sx - facing * 0.01 * P, f.sh_y)}
    f.hips = hips = {near: (cx + facing * 0.005 * P, f.hip_y), far: (cx - facing * 0.005 * P, f.hip_y)}
    sw = {near: swing, far: -swing}
    st = {near: stride, far: -stride}
    f.elbows = elbows = {s: (sh[s][0] + sw[s] * 0.5, f.Y(0.33)) for s in sh}
    f.wrists = {s: (elbows[s][0] + sw[s] * 0.8 + facing * 0.02 * P, f.Y(0.48)) for s in sh}
    f.knees = {s: (hips[s][0] + st[s] * 0.5 + facing * 0.01 * P, f.knee_y) for s in hips}
    f.ankles = {s: (hips[s][0] + st[s], f.ankle_y) for s in hips}


def _draw_side_body(f: _Figure, rng: np.random.Generator) -> None:
    """A side view's long hair, legs (the far ones in shade), shoes, skirt and backpack."""
    draw, lab, ident, facing, P, cx, hx, hy, head_r = f.draw, f.lab, f.ident, f.facing, f.P, f.cx, f.hx, f.hy, \
        f.head_r
    near, far, hips, knees, ankles, lower, leg, hip_w = f.near, f.far, f.hips, f.knees, f.ankles, f.lower, f.leg, \
        f.hip_w
    if ident.hair == "long":
        draw("rectangle", _sorted_box(hx - facing * head_r * 1.0, hy, hx - facing * head_r * 0.1, f.Y(0.22)),
             ident.hair_color, lab("head"))
    # the far limbs first, in shade
    draw("line", [hips[far], knees[far]], f.shade(lower), lab("lower"), width=leg)
    draw("line", [knees[far], ankles[far]], f.shade(f.shin_col()), lab("lower"), width=leg)
    draw("line", [f.sh[far], f.elbows[far]], f.shade(f.upper), lab("upper"), width=f.limb)
    draw("line", [f.elbows[far], f.wrists[far]], f.shade(f.fore_col(f.upper)), lab("upper"), width=f.limb)
    for s, col in ((far, f.shade(ident.shoes)), (near, _vary(rng, ident.shoes, 5))):
        if s == near:
            draw("line", [hips[near], knees[near]], lower, lab("lower"), width=leg)
            draw("line", [knees[near], ankles[near]], f.shin_col(), lab("lower"), width=leg)
        ax, ay = ankles[s]
        draw("ellipse", [ax - 0.05 * P + facing * 0.02 * P, ay - 0.025 * P, ax + 0.05 * P + facing * 0.03 * P,
                         ay + 0.05 * P], col, lab("shoes"))
    if ident.legwear == "skirt":
        draw("polygon", [(cx - hip_w, f.hip_y - 0.02 * P), (cx + hip_w, f.hip_y - 0.02 * P),
                         (cx + hip_w * 1.6, f.Y(0.68)), (cx - hip_w * 1.6, f.Y(0.68))], lower, lab("lower"))
    if ident.bag == "backpack":
        bx = f.sx - facing * f.sh_w
        draw("rounded_rectangle", _sorted_box(bx, f.Y(0.19), bx - facing * 0.09 * P, f.Y(0.43)), f.bag_col,
             lab("bag"), radius=int(0.02 * P))


def _front_skeleton(f: _Figure) -> None:
    """Joint positions of a front or back view (left / right mirrored for the back)."""
    P, cx, swing, stride = f.P, f.cx, f.swing, f.stride
    L, R = (1, -1) if f.view == "front" else (-1, 1)
    f.sx = sx = cx + f.lean * 0.5
    f.sh = sh = {s: (sx + sgn * f.sh_w, f.sh_y) for s, sgn in (("left", L), ("right", R))}
    f.hips = hips = {s: (cx + sgn * f.hip_w * 0.55, f.hip_y) for s, sgn in (("left", L), ("right", R))}
    sw = {"left": swing, "right": -swing}
    f.elbows = elbows = {s: (sh[s][0] + sgn * 0.03 * P, f.Y(0.34) + sw[s] * 0.3)
                         for s, sgn in (("left", L), ("right", R))}
    f.wrists = {s: (elbows[s][0] + sw[s] * 0.5 + sgn * 0.01 * P, f.Y(0.5)) for s, sgn in (("left", L), ("right", R))}
    st = {"left": stride * 0.4, "right": -stride * 0.4}
    f.knees = {s: (hips[s][0] + st[s] * 0.5, f.knee_y) for s in hips}
    f.ankles = {s: (hips[s][0] + st[s], f.ankle_y - abs(st[s]) * 0.3) for s in hips}


def _draw_front_body(f: _Figure, rng: np.random.Generator) -> None:
    """A front or back view's long hair, legs, skirt and shoes."""
    draw, lab, ident, P, cx, hx, hy, head_r = f.draw, f.lab, f.ident, f.P, f.cx, f.hx, f.hy, f.head_r
    hip_w, hip_y, lower = f.hip_w, f.hip_y, f.lower
    if ident.hair == "long":
        draw("rectangle", [hx - head_r * 1.05, hy, hx + head_r * 1.05, f.Y(0.24)], ident.hair_color, lab("head"))
    for s in ("left", "right"):
        draw("line", [f.hips[s], f.knees[s]], lower, lab("lower"), width=f.leg)
        draw("line", [f.knees[s], f.ankles[s]], f.shin_col(), lab("lower"), width=f.leg)
    if ident.legwear == "skirt":
        draw("polygon", [(cx - hip_w, hip_y - 0.02 * P), (cx + hip_w, hip_y - 0.02 * P),
                         (cx + hip_w * 1.5, f.Y(0.68)), (cx - hip_w * 1.5, f.Y(0.68))], lower, lab("lower"))
    shoes = _vary(rng, ident.shoes, 5)
    for s in ("left", "right"):
        ax, ay = f.ankles[s]
        draw("ellipse", [ax - 0.065 * P, ay - 0.025 * P, ax + 0.065 * P, ay + 0.055 * P], shoes, lab("shoes"))


def _half_width(torso, y):
    """Half the torso's width and its middle x at height ``y``."""
    top_y, bot_y = torso[0][1], torso[2][1]
    f = (y - top_y) / max(bot_y - top_y, 1e-6)
    return (1 - f) * (torso[1][0] - torso[0][0]) / 2 + f * (torso[2][0] - torso[3][0]) / 2, \
        (1 - f) * (torso[0][0] + torso[1][0]) / 2 + f * (torso[2][0] + torso[3][0]) / 2


def _draw_torso(f: _Figure, rng: np.random.Generator) -> None:
    """The torso and its pattern (stripes, checks or a chest band)."""
    draw, lab, ident, P = f.draw, f.lab, f.ident, f.P
    torso = f.torso()
    draw("polygon", torso, f.upper, lab("upper"))
    top_y, bot_y = torso[0][1], torso[2][1]
    pc = _vary(rng, ident.pattern_color, 6)
    if ident.pattern == "stripes":
        n = 5
        for k in range(n):
            y = top_y + (k + 0.5) * (bot_y - top_y) / n
            hw, mx = _half_width(torso, y)
            draw("line", [(mx - hw, y), (mx + hw, y)], pc, lab("upper"), width=max(1, int(0.025 * P)))
    elif ident.pattern == "checks":
        for k in range(4):
            y = top_y + (k + 0.5) * (bot_y - top_y) / 4
            hw, mx = _half_width(torso, y)
            draw("line", [(mx - hw, y), (mx + hw, y)], pc, lab("upper"), width=max(1, int(0.012 * P)))
        hw, mx = _half_width(torso, (top_y + bot_y) / 2)
        for k in (-1, 0, 1):
            x = mx + k * hw * 0.55
            draw("line", [(x, top_y), (x, bot_y)], pc, lab("upper"), width=max(1, int(0.012 * P)))
    elif ident.pattern == "band":
        y = f.Y(0.36)
        hw, mx = _half_width(torso, y)
        draw("rectangle", [mx - hw, y - 0.025 * P, mx + hw, y + 0.025 * P], pc, lab("upper"))


def _draw_arms(f: _Figure) -> None:
    """A back view's backpack, then the arms (the near arm only for side views)."""
    draw, lab, limb = f.draw, f.lab, f.limb
    if not f.side and f.view == "back" and f.ident.bag == "backpack":
        draw("rounded_rectangle", [f.sx - f.sh_w * 0.75, f.Y(0.2), f.sx + f.sh_w * 0.75, f.Y(0.44)], f.bag_col,
             lab("bag"), radius=int(0.02 * f.P))
    arm_sides = (f.near,) if f.side else ("left", "right")
    for s in arm_sides:
        draw("line", [f.sh[s], f.elbows[s]], f.upper, lab("upper"), width=limb)
        draw("line", [f.elbows[s], f.wrists[s]], f.fore_col(f.upper), lab("upper"), width=limb)
        wx, wy = f.wrists[s]
        draw("ellipse", [wx - limb * 0.6, wy - limb * 0.6, wx + limb * 0.6, wy + limb * 0.6], f.skin, lab("upper"))


def _draw_head(f: _Figure, rng: np.random.Generator) -> None:
    """The head, then its hair or hat."""
    draw, lab, ident, facing, hx, hy, head_r = f.draw, f.lab, f.ident, f.facing, f.hx, f.hy, f.head_r
    draw("ellipse", [hx - head_r * 0.9, hy - head_r, hx + head_r * 0.9, hy + head_r], f.skin, lab("head"))
    hc = _vary(rng, ident.hair_color, 5)
    box = [hx - head_r * 0.95, hy - head_r * 1.08, hx + head_r * 0.95, hy + head_r * 1.1]
    if ident.hair in ("short", "long"):
        if f.side:
            draw("chord", box, hc, lab("head"), start=110 if facing > 0 else 240, end=300 if facing > 0 else 430)
        elif f.view == "front":
            draw("chord", [box[0], box[1], box[2], hy + head_r * 0.35], hc, lab("head"), start=180, end=360)
        else:
            draw("ellipse", box, hc, lab("head"))
    elif ident.hair == "hat":
        draw("chord", [hx - head_r, hy - head_r * 1.25, hx + head_r, hy + head_r * 0.5], hc, lab("head"),
             start=180, end=360)
        if f.side:
            draw("rectangle", _sorted_box(hx, hy - head_r * 0.2, hx + facing * head_r * 1.6, hy - head_r * 0.02), hc,
                 lab("head"))
        else:
            draw("rectangle", [hx - head_r * 1.25, hy - head_r * 0.2, hx + head_r * 1.25, hy - head_r * 0.02], hc,
                 lab("head"))


def _draw_logo(f: _Figure, rng: np.random.Generator) -> None:
    """The chest logo, seen from the front only."""
    if f.view == "front" and f.ident.logo != "none":
        lc = _vary(rng, f.ident.logo_color, 5)
        lx, ly, ls = f.sx, f.Y(0.27), 0.045 * f.P
        if f.ident.logo == "square":
            f.draw("rectangle", [lx - ls, ly - ls, lx + ls, ly + ls], lc, f.lab("upper"))
        elif f.ident.logo == "circle":
            f.draw("ellipse", [lx - ls, ly - ls, lx + ls, ly + ls], lc, f.lab("upper"))
        else:
            f.draw("rectangle", [lx - f.sh_w * 0.8, ly - ls * 0.4, lx + f.sh_w * 0.8, ly + ls * 0.4], lc,
                   f.lab("upper"))


def _draw_bag(f: _Figure, rng: np.random.Generator) -> None:
    """The bag parts in front of the body: backpack straps, a handbag, a shoulder bag and its strap."""
    draw, lab, ident, facing, P, sx, sh_w, sh_y, bag_col = f.draw, f.lab, f.ident, f.facing, f.P, f.sx, f.sh_w, \
        f.sh_y, f.bag_col
    side = f.side
    if ident.bag == "backpack" and not side and f.view == "front":
        strap = max(1, int(0.025 * P))
        for sgn in (-1, 1):
            draw("line", [(sx + sgn * sh_w * 0.6, sh_y - 0.02 * P), (sx + sgn * sh_w * 0.55, f.Y(0.42))], bag_col,
                 lab("bag"), width=strap)
    elif ident.bag == "backpack" and side:
        draw("line", [(sx + facing * sh_w * 0.3, sh_y - 0.02 * P), (sx + facing * sh_w * 0.2, f.Y(0.36))], bag_col,
             lab("bag"), width=max(1, int(0.02 * P)))
    elif ident.bag == "handbag":
        s = f.near if side else _pick(rng, ("left", "right"))
        wx, wy = f.wrists[s]
        draw("rectangle", [wx - 0.06 * P, wy, wx + 0.06 * P, wy + 0.1 * P], bag_col, lab("bag"))
    elif ident.bag == "shoulder":
        sgn = -facing if side else _pick(rng, (-1, 1))
        strap = max(1, int(0.022 * P))
        draw("line", [(sx - sgn * sh_w * 0.7, sh_y - 0.01 * P), (sx + sgn * sh_w * 1.05, f.Y(0.46))], bag_col,
             lab("bag"), width=strap)
        bx, by = sx + sgn * sh_w * 1.1, f.Y(0.46)
        draw("rectangle", [bx - 0.06 * P, by - 0.035 * P, bx + 0.06 * P, by + 0.06 * P], bag_col, lab("bag"))


def _keypoints(f: _Figure, kp: np.ndarray) -> None:
    """Fill ``kp`` with the figure's COCO-17 keypoints and their visibility."""
    # The face from the front (the near half from the side), ears unless the face is turned away,
    # the far arm and hip of a side view are behind the body.
    side, near, facing, view, hx, hy, head_r = f.side, f.near, f.facing, f.view, f.hx, f.hy, f.head_r
    pts: Dict[str, Tuple[float, float, float]] = {}
    near_x = facing if side else 0
    pts["nose"] = (hx + near_x * head_r * 0.9, hy + head_r * 0.15, 0.0 if view == "back" else 1.0)
    if side:
        eye = (hx + facing * head_r * 0.6, hy - head_r * 0.1)
        ear = (hx - facing * head_r * 0.1, hy)
        for s in ("left", "right"):
            pts[f"{s}_eye"] = (*eye, 1.0 if s == near else 0.0)
            pts[f"{s}_ear"] = (*ear, 1.0 if s == near else 0.0)
    else:
        L = 1 if view == "front" else -1
        fv = 1.0 if view == "front" else 0.0
        for s, sgn in (("left", L), ("right", -L)):
            pts[f"{s}_eye"] = (hx + sgn * head_r * 0.35, hy - head_r * 0.1, fv)
            pts[f"{s}_ear"] = (hx + sgn * head_r * 0.85, hy, 1.0)
    for s in ("left", "right"):
        hidden = side and s != near
        pts[f"{s}_shoulder"] = (*f.sh[s], 0.0 if hidden else 1.0)
        pts[f"{s}_elbow"] = (*f.elbows[s], 0.0 if hidden else 1.0)
        pts[f"{s}_wrist"] = (*f.wrists[s], 0.0 if hidden else 1.0)
        pts[f"{s}_hip"] = (*f.hips[s], 0.0 if hidden else 1.0)
        pts[f"{s}_knee"] = (*f.knees[s], 1.0)
        pts[f"{s}_ankle"] = (*f.ankles[s], 1.0)
    for i, name in enumerate(KEYPOINT_NAMES):
        kp[i] = pts[name]


def _draw_person(draw, ident: HardIdentity, view: str, facing: int, P: float, cx: float, y0: float,
                 rng: np.random.Generator, label: Optional[Dict[str, int]] = None,
                 kp: Optional[np.ndarray] = None) -> None:
    """Draw a pedestrian of height ``P`` (canvas pixels) with the top of the head at ``y0``.

    ``draw(kind, xy, color, label, **kw)`` draws on the picture and, when ``label`` is not None,
    on the mask. ``label`` maps part names to mask labels (None: the picture only). ``facing``
    (+1 / -1) is the image direction a side view looks at. ``kp`` receives the keypoints."""
    f = _Figure(draw, ident, view, facing, P, cx, y0, rng, label)
    if f.side:
        _side_skeleton(f)
        _draw_side_body(f, rng)
    else:
        _front_skeleton(f)
        _draw_front_body(f, rng)
    _draw_torso(f, rng)
    _draw_arms(f)
    _draw_head(f, rng)
    _draw_logo(f, rng)
    _draw_bag(f, rng)
    if kp is not None:
        _keypoints(f, kp)


def _sorted_box(x0, y0, x1, y1):
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


_LABELS = {"head": 1, "upper": 2, "lower": 3, "shoes": 4, "bag": 5}


def _pick_view(rng, cam: HardCamera) -> str:
    return VIEWS[int(rng.choice(3, p=np.array(cam.views) / sum(cam.views)))]


def _background(scene: Image.Image, rng: np.random.Generator, W: int, H: int) -> Image.Image:
    """A random window of the camera's scene, resized to the W x H canvas."""
    zoom = rng.uniform(0.55, 1.0)
    wh, ww = scene.height * zoom * 0.5, scene.width * zoom / 3
    x0, y0 = rng.uniform(0, scene.width - ww), rng.uniform(0, scene.height - wh)
    return scene.resize((W, H), Image.BILINEAR, box=(x0, y0, x0 + ww, y0 + wh))


def _other_person(draw, rng: np.random.Generator, seed: int, W: int, H: int, front_of: bool = False) -> None:
    """Another pedestrian: behind the person, or in front of it (``front_of``, masked out as 0)."""
    o = _random_identity(seed, 10**7 + int(rng.integers(1 << 30)), 1)
    P2 = H * rng.uniform(0.5, 0.95) * (1.15 if front_of else 1.0)
    cx2 = W * (0.5 + rng.choice([-1, 1]) * rng.uniform(0.35, 0.7))
    y2 = H * rng.uniform(-0.1, 0.15) + (0 if front_of else (H - P2) * 0.3)
    draw_other = (lambda kind, xy, color, label, **kw: draw(kind, xy, color, 0, **kw)) if front_of else draw
    _draw_person(draw_other, o, _pick(rng, VIEWS), int(rng.choice([-1, 1])), P2, cx2, y2, rng)


def _placement(ident: HardIdentity, cam: HardCamera, rng: np.random.Generator, W: int, H: int,
               junk: bool) -> Tuple[float, float, float]:
    """The person's height, centre x and top y on the canvas (a bad detection's for ``junk``)."""
    P = H * cam.scale * ident.build_h * rng.uniform(0.93, 1.05)
    cx = W * (0.5 + cam.x_bias + rng.uniform(-0.08, 0.08))
    ytop = (H - P) * 0.5 + H * (cam.y_bias + rng.uniform(-0.05, 0.05))
    if junk:
        P *= rng.uniform(1.4, 2.2)
        cx += rng.choice([-1, 1]) * rng.uniform(0.3, 0.6) * W
        ytop -= rng.uniform(0.0, 0.5) * P
    return P, cx, ytop


def _draw_occluder(di, dm, other_person, cam: HardCamera, rng: np.random.Generator, P: float, cx: float,
                   ytop: float, W: int, H: int) -> None:
    """Maybe an occluder in front: a pole, a railing or low wall, a parked object, a passer-by."""
    if rng.random() < cam.occluder_p:
        kind = int(rng.integers(4))
        col = _vary(rng, _pick(rng, cam.palette), 15)
        if kind == 0:
            x = cx + rng.uniform(-0.25, 0.25) * W
            box = [x - rng.uniform(0.03, 0.09) * W, 0, x + rng.uniform(0.03, 0.09) * W, H]
        elif kind == 1:
            box = [0, ytop + rng.uniform(0.6, 0.85) * P, W, H]
        elif kind == 2:
            x = cx + rng.choice([-1, 1]) * rng.uniform(0.2, 0.45) * W
            yt = ytop + rng.uniform(0.35, 0.7) * P
            box = [x - rng.uniform(0.15, 0.3) * W, yt, x + rng.uniform(0.15, 0.3) * W, H]
        else:
            box = None
            other_person(front_of=True)
        if box is not None:
            box = _sorted_box(*box)
            di.rectangle(box, fill=col)
            dm.rectangle(box, fill=0)
            if kind == 1 and rng.random() < 0.5:              # railing: bars
                for xb in np.arange(box[0], box[2], W * rng.uniform(0.08, 0.15)):
                    di.line([(xb, box[1]), (xb, H)], fill=_vary(rng, col, 25), width=2)


def _output_mask_and_keypoints(msk: Image.Image, kp: np.ndarray, S: int, height: int,
                               width: int) -> Tuple[np.ndarray, np.ndarray]:
    """The mask at the output size, and the keypoints scaled to it, hidden outside it or under occluders."""
    mask = np.asarray(msk.resize((width, height), Image.NEAREST), dtype=np.uint8)
    kp[:, :2] = np.round(kp[:, :2] / S, 2)                       # as save_parts writes them
    for i in range(len(kp)):
        x, y = kp[i, 0], kp[i, 1]
        if not (0 <= x < width and 0 <= y < height):
            kp[i, 2] = 0.0
        elif kp[i, 2] > 0 and mask[max(0, int(y) - 1):int(y) + 2, max(0, int(x) - 1):int(x) + 2].max() == 0:
            kp[i, 2] = 0.0                                       # under an occluder
    return mask, kp


def _camera_light(img: Image.Image, cam: HardCamera, rng: np.random.Generator, nh: int, nw: int) -> Image.Image:
    """The canvas at the native nw x nh size, through the camera's light, colour, gamma and saturation."""
    arr = np.asarray(img.resize((nw, nh), Image.BOX), np.float32) / 255.0
    gain = np.array(cam.gain, np.float32) * np.float32(rng.uniform(0.8, 1.2)) * \
        (1 + rng.uniform(-0.06, 0.06, size=3)).astype(np.float32)
    arr = arr @ np.array(cam.mix, np.float32).T
    if rng.random() < 0.3:                                       # a shadow or a light gradient across the crop
        ramp = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0), nw if rng.random() < 0.5 else nh,
                           dtype=np.float32)
        arr = arr * (ramp[None, :, None] if len(ramp) == nw else ramp[:, None, None])
    arr = np.clip(arr * gain[None, None, :], 0, 1) ** np.float32(cam.gamma)
    grey = arr.mean(axis=2, keepdims=True)
    arr = grey + (arr - grey) * np.float32(cam.saturation)
    return Image.fromarray(np.clip(arr * 255 + 0.5, 0, 255).astype(np.uint8))


def _camera_degrade(pic: Image.Image, cam: HardCamera, rng: np.random.Generator, nh: int, height: int,
                    width: int) -> Image.Image:
    """Focus and motion blur, sensor noise and the stream's JPEG, then upsampling to the output size."""
    radius = cam.blur * rng.uniform(0.7, 1.3) * nh / height
    if radius > 0.1:
        pic = pic.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(pic, np.float32)
    if rng.random() < cam.motion_p:                              # horizontal motion blur
        n = int(rng.integers(2, 4))
        arr = np.mean([np.roll(arr, s, axis=1) for s in range(n)], axis=0)
    arr = arr + rng.normal(0, cam.noise, size=arr.shape[:2] + (1,)).astype(np.float32) \
        + rng.normal(0, cam.noise * 0.5, size=arr.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=int(np.clip(cam.jpeg_quality + rng.integers(-5, 6), 10, 95)))
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB").resize((width, height), Image.BILINEAR)


def _capture(img: Image.Image, cam: HardCamera, rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Capture at a low native resolution: light, colour, blur, noise, the stream's JPEG."""
    nh = int(round(height * float(np.clip(cam.resolution * rng.uniform(0.85, 1.15), 0.25, 1.0))))
    nw = max(4, int(round(nh * width / height)))
    pic = _camera_light(img, cam, rng, nh, nw)
    return _camera_degrade(pic, cam, rng, nh, height, width)


def render_hard(ident: HardIdentity, cam: HardCamera, scene: Image.Image, rng: np.random.Generator, height: int,
                width: int, seed: int = 0, junk: bool = False) -> Tuple[Image.Image, np.ndarray, np.ndarray]:
    """One image of ``ident`` seen by ``cam`` in ``scene``: (RGB image, mask HxW uint8, keypoints
    (17, 3) float32). ``junk``: a bad detection (mostly background, a piece of the person)."""
    S = 2
    H, W = height * S, width * S
    # Background: a window of the camera's scene, with other pedestrians behind the person.
    img = _background(scene, rng, W, H)
    msk = Image.new("L", (W, H), 0)
    di, dm = ImageDraw.Draw(img), ImageDraw.Draw(msk)

    def draw(kind, xy, color, label, **kw):
        getattr(di, kind)(xy, fill=color, **kw)
        if label is not None:
            getattr(dm, kind)(xy, fill=label, **kw)

    def other_person(front_of=False):
        _other_person(draw, rng, seed, W, H, front_of=front_of)

    for _ in range(int(rng.poisson(cam.people))):
        other_person()

    P, cx, ytop = _placement(ident, cam, rng, W, H, junk)
    view = _pick_view(rng, cam)
    facing = int(rng.choice([-1, 1]))
    kp = np.zeros((len(KEYPOINT_NAMES), 3), np.float64)
    _draw_person(draw, ident, view, facing, P, cx, ytop, rng, label=_LABELS, kp=kp)
    _draw_occluder(di, dm, other_person, cam, rng, P, cx, ytop, W, H)
    mask, kp = _output_mask_and_keypoints(msk, kp, S, height, width)
    out = _capture(img, cam, rng, height, width)
    return out, mask, kp.astype(np.float32)


def _per_cam_range(value) -> Tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        lo = hi = int(value)
    else:
        try:
            lo, hi = (int(v) for v in value)
        except (TypeError, ValueError):
            raise ValueError(f"images_per_id_per_cam must be an integer or a (min, max) pair, got {value!r}") from None
    if lo < 2 or hi < lo:
        raise ValueError(f"images_per_id_per_cam must be >= 2 (a query and a gallery image per camera), with "
                         f"min <= max, got {value!r}")
    return lo, hi


def _check_hard_args(num_ids: int, num_cams: int, height: int, width: int, group_size: int,
                     num_distractors: Optional[int], num_junk: Optional[int]) -> Tuple[int, int]:
    """Validate generate_hard's sizes; returns (num_distractors, num_junk) with their defaults filled in."""
    if not 2 <= num_ids <= 9999:
        raise ValueError(f"num_ids must be in 2..9999 (four-digit Market-1501 identities), got {num_ids}")
    if not 2 <= num_cams <= MAX_CAMS:
        raise ValueError(f"num_cams must be in 2..{MAX_CAMS} for the hard preset (matches are across cameras), "
                         f"got {num_cams}")
    if height < 32 or width < 16:
        raise ValueError(f"images must be at least 32x16 for the hard preset, got {height}x{width}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if num_distractors is None:
        num_distractors = num_ids // 4
    if num_junk is None:
        num_junk = num_ids // 8
    if num_distractors < 0 or num_junk < 0:
        raise ValueError("num_distractors and num_junk must be >= 0")
    return num_distractors, num_junk


def _train_pids(ids: List[HardIdentity]) -> set:
    """The training identities: whole groups, alternating (half the identities if there is one group)."""
    num_groups = max(i.group for i in ids) + 1
    if num_groups >= 2:
        return {i.pid for i in ids if i.group % 2 == 0}
    return {i.pid for i in ids[: len(ids) // 2]}


def _make_jobs(seed: int, ids: List[HardIdentity], train_pids: set, num_cams: int, num_distractors: int,
               num_junk: int) -> List[Tuple]:
    """Every image to write, in frame order: (split, identity, cam, k, pid written)."""
    jobs = []
    for ident in ids:
        for c, n in zip(ident.cams, ident.images):
            for k in range(n):
                split = "train" if ident.pid in train_pids else ("query" if k == 0 else "gallery")
                jobs.append((split, ident, c, k, ident.pid))
    for j in range(num_distractors):
        d = _random_identity(seed, j, num_cams)
        jobs.append(("gallery", d, d.cams[0], j % 100, 0))
    for j in range(num_junk):
        d = _random_identity(seed, 10**6 + j, num_cams)
        jobs.append(("gallery", d, d.cams[0], j % 100, -1))
    if len(jobs) > 999999:
        raise ValueError(f"{len(jobs)} images: more than the 999,999 frame numbers of Market-1501 names")
    return jobs


def _write_images(out_dir: str, jobs: List[Tuple], cams: List[HardCamera], scenes: List[Image.Image], seed: int,
                  height: int, width: int, progress: bool, with_parts: bool) -> Dict[str, int]:
    """Render and save every job (and its parts file); returns the image count per split."""
    from tqdm.auto import tqdm

    counts = {"train": 0, "query": 0, "gallery": 0}
    for frame, (split, ident, c, k, pid) in enumerate(tqdm(jobs, desc="synthesise (hard)", disable=not progress,
                                                            unit="img"), 1):
        rng = _rng(seed, 106, pid + 1, ident.pid if pid > 0 else frame, c, k)
        img, mask, kp = render_hard(ident, cams[c], scenes[c], rng, height, width, seed=seed, junk=pid == -1)
        pid_str = "-1" if pid == -1 else f"{pid:04d}"
        path = os.path.join(out_dir, SPLIT_FOLDERS[split], f"{pid_str}_c{c + 1}s1_{frame:06d}_{k + 1:02d}.jpg")
        img.save(path, quality=90)
        if with_parts:
            save_parts(path, mask, kp)
        counts[split] += 1
    return counts


def _write_hard_marker(out_dir: str, meta: dict) -> None:
    """Write synthetic.json atomically: last, it marks the dataset complete."""
    def write_marker(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)

    atomic_write(os.path.join(out_dir, MARKER), write_marker)


def generate_hard(out_dir: str, num_ids: int = HARD_DEFAULTS["num_ids"], num_cams: int = HARD_DEFAULTS["num_cams"],
                  seed: int = 0, images_per_id_per_cam: Union[int, Tuple[int, int]] = HARD_DEFAULTS[
                      "images_per_id_per_cam"], height: int = HARD_DEFAULTS["height"],
                  width: int = HARD_DEFAULTS["width"], progress: bool = True,
                  group_size: int = HARD_DEFAULTS["group_size"], num_distractors: Optional[int] = None,
                  num_junk: Optional[int] = None, with_parts: bool = True) -> str:
    """Write the hard preset to ``out_dir`` (created; must be empty or absent, or hold what an
    interrupted generate left there, which is cleared and written again). Returns ``out_dir``.

    ``images_per_id_per_cam``: an integer, or a (min, max) range drawn per identity and camera
    (both >= 2). ``num_cams``: 2-6. ``num_distractors`` / ``num_junk`` default to a quarter /
    an eighth of ``num_ids``. Defaults: see the module docstring; 4,465 images for seed 0, about
    15 s on one core (13 s measured; the default preset's 1,216 images: 3.3 s).
    """
    per_cam = _per_cam_range(images_per_id_per_cam)
    num_distractors, num_junk = _check_hard_args(num_ids, num_cams, height, width, group_size, num_distractors,
                                                 num_junk)
    out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
    _prepare_out_dir(out_dir)
    for f in SPLIT_FOLDERS.values():
        os.makedirs(os.path.join(out_dir, f), exist_ok=True)

    ids = _make_identities(seed, num_ids, group_size, num_cams, per_cam)
    cams = _make_cameras(seed, num_cams)
    scenes = [_scene(seed, c, cams[c], height, width) for c in range(num_cams)]
    train_pids = _train_pids(ids)
    jobs = _make_jobs(seed, ids, train_pids, num_cams, num_distractors, num_junk)
    counts = _write_images(out_dir, jobs, cams, scenes, seed, height, width, progress, with_parts)

    meta = {
        "generator": "fmn.data.synthetic",
        "version": 1,
        "preset": "hard",
        "params": dict(num_ids=num_ids, num_cams=num_cams, seed=seed, images_per_id_per_cam=list(per_cam),
                       height=height, width=width, group_size=group_size, num_distractors=num_distractors,
                       num_junk=num_junk),
        "counts": counts,
        "part_labels": PART_LABELS,
        "keypoint_names": KEYPOINT_NAMES,
        "detail_families": list(DETAIL_FAMILIES),
        "train_pids": sorted(train_pids),
        "identities": [asdict(i) for i in ids],
        "cameras": [asdict(c) for c in cams],
    }
    _write_hard_marker(out_dir, meta)                          # last: the dataset is complete
    return out_dir


# --- trivial descriptors: how much of the task a descriptor with no learning solves ---------------

def _colour_hist(px: np.ndarray, bins: int) -> np.ndarray:
    q = np.clip(px // (256 / bins), 0, bins - 1).astype(np.int64).reshape(-1, 3)
    h = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins ** 3).astype(np.float32)
    return np.sqrt(h / max(h.sum(), 1.0))


def _descriptor(ds, path: str, kind: str) -> np.ndarray:
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"), np.float32)
    if kind == "histogram":
        return _colour_hist(a, 8)
    if kind == "pixels":
        small = Image.fromarray(a.astype(np.uint8)).resize((8, 16), Image.BOX)
        return np.asarray(small, np.float32).ravel() / 255.0
    if kind == "part_colours":
        a = np.clip(a / (a.reshape(-1, 3).mean(0) + 1e-3) * 110, 0, 255)   # grey-world light normalisation
        mask, _ = ds.load_parts(path)
        return np.concatenate([_colour_hist(a[mask == label], 4) for label in (1, 2, 3, 4, 5)])
    raise ValueError(f"unknown descriptor {kind!r}")


TRIVIAL_DESCRIPTORS = {
    "histogram": "8x8x8 RGB histogram of the whole image (square-rooted)",
    "pixels": "the image reduced to 16x8 RGB pixels",
    "part_colours": "4x4x4 RGB histograms of the five body parts of the true masks, after grey-world light "
                    "normalisation",
}


def trivial_baselines(root: str, kinds: Sequence[str] = tuple(TRIVIAL_DESCRIPTORS),
                      camera_centred: bool = True) -> Dict[str, Dict[str, float]]:
    """Rank-1 and mAP of trivial descriptors on a synthetic dataset's query / gallery, under the
    re-ID protocol (:func:`fmn.metrics.evaluate` on Euclidean distances). ``camera_centred``
    subtracts each camera's mean descriptor (over query and gallery), a cheap removal of camera
    bias (background, light) without which the whole-image descriptors rank same-camera images
    of other people first. Returns ``{kind: {"rank1": .., "mAP": ..}}``."""
    import torch

    from fmn.data import build_dataset
    from fmn.metrics import euclidean_distance, evaluate

    ds = build_dataset("synthetic", root)
    qp, gp = [p for _, p, _ in ds.query], [p for _, p, _ in ds.gallery]
    qc, gc = np.array([c for _, _, c in ds.query]), np.array([c for _, _, c in ds.gallery])
    out = {}
    for kind in kinds:
        fq = np.stack([_descriptor(ds, p, kind) for p, _, _ in ds.query])
        fg = np.stack([_descriptor(ds, p, kind) for p, _, _ in ds.gallery])
        if camera_centred:
            allf, allc = np.concatenate([fq, fg]), np.concatenate([qc, gc])
            for c in np.unique(allc):
                mu = allf[allc == c].mean(0)
                fq[qc == c] -= mu
                fg[gc == c] -= mu
        cmc, mAP, _ = evaluate(euclidean_distance(torch.from_numpy(fq), torch.from_numpy(fg)), qp, gp,
                               qc.tolist(), gc.tolist())
        out[kind] = {"rank1": float(cmc[0]), "mAP": float(mAP)}
    return out


def _main(argv=None) -> int:
    import argparse
    import tempfile
    import time

    from fmn.data.synthetic import generate

    p = argparse.ArgumentParser(prog="python -m fmn.data.synthetic_hard",
                                description="Generate the default and the hard preset and compare trivial "
                                            "descriptors on them.")
    p.add_argument("--ids", type=int, help="identities for both presets (default: each preset's own)")
    p.add_argument("--cams", type=int, help="cameras for both presets (default: each preset's own)")
    p.add_argument("--images-per-cam", type=int, help="images per identity per camera for both presets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for the two datasets (default: a temporary one, deleted)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        top = args.out or tmp
        for preset in ("default", "hard"):
            kw = {k: v for k, v in (("num_ids", args.ids), ("num_cams", args.cams),
                                    ("images_per_id_per_cam", args.images_per_cam)) if v is not None}
            t = time.perf_counter()
            root = generate(os.path.join(top, preset), seed=args.seed, progress=False, preset=preset, **kw)
            secs = time.perf_counter() - t
            with open(os.path.join(root, MARKER)) as fh:
                counts = json.load(fh)["counts"]
            n = sum(counts.values())
            print(f"{preset}: {counts['train']} train / {counts['query']} query / {counts['gallery']} gallery "
                  f"images in {secs:.1f} s ({n / secs:.0f} images/s)")
            for kind, s in trivial_baselines(root).items():
                print(f"  {kind:13s} rank-1 {100 * s['rank1']:5.1f}  mAP {100 * s['mAP']:5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
