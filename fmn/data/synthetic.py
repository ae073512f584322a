"""A synthetic pedestrian dataset written to disk in Market-1501 layout.

``generate(out_dir, ...)`` draws stylised pedestrians and writes::

    out_dir/bounding_box_train/0001_c1s1_000001_01.jpg ...
    out_dir/query/...              one image per (test identity, camera)
    out_dir/bounding_box_test/...  the other test images, distractors (0000) and junk (-1)
    out_dir/parts/<split>/<stem>.png / .json    body-part mask and keypoints (fmn.data.masks)
    out_dir/synthetic.json         the parameters and every identity's attributes, written last:
                                   the mark of a complete dataset (``is_complete``)

What makes it a re-ID problem where local detail matters:

* Identities come in groups (``group_size``, default 4) that share the global appearance:
  upper and lower clothing colours, sleeve and leg-wear type, body build, skin tone.
* Inside a group, identities differ only in small local details, every pair in at least two
  of four: hair (style and colour, or a hat), shoes colour, bag (none, backpack, handbag,
  shoulder bag, and its colour), and a logo on the chest (shape and colour; visible from the
  front only). A descriptor of global colour and shape cannot tell group mates apart.
* Whole groups go to training or to test, alternately, so the test gallery holds each query's
  look-alikes.
* Cameras differ: light level and colour cast, person scale, crop offset (imperfect
  detections, heads or feet cut), occluders (poles, railings, parked objects) and background
  clutter in each camera's palette, blur and noise. Per image: view (front or back), bag side,
  arm swing and stride, position jitter.

``generate(out_dir, preset="hard", ...)`` writes the ``hard`` preset instead
(:mod:`fmn.data.synthetic_hard`): the shape of a small real two-camera dataset (700 identities,
2-4 images per identity and camera, 2-6 cameras), low native resolution, blur, noise and JPEG
artefacts, front / back / side views, cluttered scenes and passers-by, and clothing colours
shared by many identities. Its ``synthetic.json`` says ``"preset": "hard"``; the default
preset's has no ``preset`` key (its files are unchanged from before the presets).

Everything is drawn from ``numpy.random.default_rng`` streams keyed by (seed, purpose, ids),
so the output is byte-for-byte identical for the same arguments and library versions.
Images are rendered at twice the size and reduced (box filter); masks are reduced with the
nearest label, so masks and images align.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fmn.atomic import atomic_write
from fmn.data.masks import KEYPOINT_NAMES, PART_LABELS, save_parts

__all__ = ["generate", "is_complete", "DEFAULTS", "PRESETS", "render_person"]

DEFAULTS = dict(num_ids=96, num_cams=4, images_per_id_per_cam=4, height=128, width=64, group_size=4,
                num_distractors=32, num_junk=16)
PRESETS = ("default", "hard")             # "hard": fmn.data.synthetic_hard

# Palettes (RGB). Clothing colours are spread out so groups differ globally.
_CLOTHES = [(200, 30, 30), (30, 60, 170), (40, 140, 60), (230, 200, 40), (240, 240, 235), (35, 35, 40),
            (130, 130, 135), (120, 70, 30), (150, 40, 150), (240, 130, 30), (40, 160, 170), (190, 160, 120),
            (90, 30, 40), (70, 90, 40), (160, 200, 230), (230, 150, 170)]
_SKIN = [(236, 200, 170), (210, 160, 120), (160, 110, 75), (110, 75, 50)]
_HAIR = [(25, 20, 15), (90, 55, 25), (210, 170, 90), (160, 160, 160), (150, 60, 20)]
_ACCENT = [(220, 20, 20), (20, 20, 220), (250, 250, 250), (15, 15, 15), (250, 220, 0), (0, 170, 80),
           (250, 100, 180), (120, 60, 20)]
HAIR_STYLES = ("short", "long", "hat", "bald")
BAGS = ("none", "backpack", "handbag", "shoulder")
LOGOS = ("none", "square", "circle", "stripe")


@dataclass
class Identity:
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
    cams: List[int] = field(default_factory=list)


@dataclass
class Camera:
    gain: Tuple[float, float, float]
    scale: float
    x_bias: float
    y_bias: float
    occluder_p: float
    blur: float
    noise: float
    bg: Tuple[int, int, int]
    bg2: Tuple[int, int, int]
    clutter: List[Tuple[int, int, int]]


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) & 0xFFFFFFFF for k in key]])


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _details(rng) -> Tuple:
    hair = _pick(rng, HAIR_STYLES)
    hair_color = _pick(rng, _ACCENT) if hair == "hat" else _pick(rng, _HAIR)
    bag = _pick(rng, BAGS)
    logo = _pick(rng, LOGOS)
    return (hair, hair_color, _pick(rng, _ACCENT), bag, _pick(rng, _ACCENT), logo, _pick(rng, _ACCENT))


def _detail_distance(a: Tuple, b: Tuple) -> int:
    """Number of detail families (hair, shoes, bag, logo) in which two identities differ."""
    hair = a[0] != b[0] or (a[0] != "bald" and a[1] != b[1])
    shoes = a[2] != b[2]
    bag = a[3] != b[3] or (a[3] != "none" and a[4] != b[4])
    logo = a[5] != b[5] or (a[5] != "none" and a[6] != b[6])
    return int(hair) + int(shoes) + int(bag) + int(logo)


def _make_identities(seed: int, num_ids: int, group_size: int, num_cams: int) -> List[Identity]:
    ids: List[Identity] = []
    num_groups = (num_ids + group_size - 1) // group_size
    for g in range(num_groups):
        rg = _rng(seed, 1, g)
        upper = _pick(rg, _CLOTHES)
        lower = _pick(rg, [c for c in _CLOTHES if c != upper])
        glob = dict(upper=upper, lower=lower, sleeves=_pick(rg, ("long", "short")),
                    legwear=_pick(rg, ("trousers", "trousers", "shorts", "skirt")),
                    build_w=float(rg.uniform(0.85, 1.2)), build_h=float(rg.uniform(0.9, 1.05)),
                    skin=_pick(rg, _SKIN))
        members: List[Tuple] = []
        for m in range(group_size):
            pid = g * group_size + m + 1
            if pid > num_ids:
                break
            ri = _rng(seed, 2, pid)
            for _ in range(1000):
                d = _details(ri)
                if all(_detail_distance(d, o) >= 2 for o in members):
                    break
            members.append(d)
            n_cams = num_cams if num_cams <= 2 else int(ri.integers(2, num_cams + 1))
            cams = sorted(ri.choice(num_cams, size=n_cams, replace=False).tolist())
            ids.append(Identity(pid=pid, group=g, hair=d[0], hair_color=d[1], shoes=d[2], bag=d[3],
                                bag_color=d[4], logo=d[5], logo_color=d[6], cams=cams, **glob))
    return ids


def _make_cameras(seed: int, num_cams: int) -> List[Camera]:
    cams = []
    for c in range(num_cams):
        r = _rng(seed, 3, c)
        level = r.uniform(0.75, 1.2)
        cast = r.uniform(-0.08, 0.08, size=3)
        bg = tuple(int(v) for v in r.integers(40, 200, size=3))
        bg2 = tuple(int(np.clip(v + r.integers(-60, 60), 0, 255)) for v in bg)
        clutter = [tuple(int(v) for v in r.integers(0, 256, size=3)) for _ in range(5)]
        cams.append(Camera(gain=tuple(float(level * (1 + x)) for x in cast), scale=float(r.uniform(0.8, 0.95)),
                           x_bias=float(r.uniform(-0.06, 0.06)), y_bias=float(r.uniform(-0.04, 0.04)),
                           occluder_p=float(r.choice([0.0, 0.1, 0.2, 0.3])), blur=float(r.uniform(0.0, 0.6)),
                           noise=float(r.uniform(1.5, 4.0)), bg=bg, bg2=bg2, clutter=clutter))
    return cams


def _vary(rng, color, amount: float = 12.0):
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in color)


def render_person(ident: Identity, cam: Camera, rng: np.random.Generator, height: int, width: int,
                  ) -> Tuple[Image.Image, np.ndarray, np.ndarray]:
    """Draw one image of ``ident`` seen by ``cam``; returns (RGB image, mask HxW uint8, keypoints (17, 3))."""
    S = 2                                        # supersampling factor
    H, W = height * S, width * S
    img = Image.new("RGB", (W, H))
    msk = Image.new("L", (W, H), 0)
    di, dm = ImageDraw.Draw(img), ImageDraw.Draw(msk)

    # Background: a vertical gradient between the camera's two colours, a floor band, clutter.
    top, bot = np.array(_vary(rng, cam.bg, 10)), np.array(_vary(rng, cam.bg2, 10))
    t = np.linspace(0, 1, H)[:, None]
    grad = (top[None, :] * (1 - t) + bot[None, :] * t).astype(np.uint8)
    img.paste(Image.fromarray(np.repeat(grad[:, None, :], W, axis=1)))
    floor_y = int(H * rng.uniform(0.75, 0.92))
    di.rectangle([0, floor_y, W, H], fill=_vary(rng, tuple(int(v * 0.7) for v in cam.bg2), 8))
    for _ in range(int(rng.integers(1, 5))):
        col = tuple(int(0.5 * a + 0.5 * b) for a, b in zip(_vary(rng, _pick(rng, cam.clutter), 20), cam.bg))
        x0, y0 = rng.uniform(-0.2, 1.0) * W, rng.uniform(-0.1, 0.9) * H
        w, h = rng.uniform(0.08, 0.35) * W, rng.uniform(0.05, 0.25) * H
        if rng.random() < 0.5:
            di.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            di.ellipse([x0, y0, x0 + w, y0 + h], fill=col)

    def draw(kind, xy, color, label, **kw):
        getattr(di, kind)(xy, fill=color, **kw)
        getattr(dm, kind)(xy, fill=label, **kw)

    # Geometry in supersampled pixels; P is the person's height.
    P = H * cam.scale * ident.build_h * rng.uniform(0.95, 1.03)
    cx = W * (0.5 + cam.x_bias + rng.uniform(-0.06, 0.06))
    y0 = (H - P) * 0.5 + H * (cam.y_bias + rng.uniform(-0.04, 0.04))
    bw = ident.build_w
    front = rng.random() < 0.5
    swing = rng.uniform(-0.06, 0.06) * P
    stride = rng.uniform(0.0, 0.07) * P
    Y = lambda f: y0 + f * P
    head_r = 0.062 * P
    head_c = (cx, Y(0.075))
    sh_w, hip_w = 0.15 * P * bw, 0.115 * P * bw
    sh_y, hip_y, knee_y, ankle_y = Y(0.17), Y(0.5), Y(0.72), Y(0.93)
    L, R = (1, -1) if front else (-1, 1)        # image-x sign of the person's left / right side
    kp = np.zeros((len(KEYPOINT_NAMES), 3), np.float64)

    def set_kp(name, x, y, v=1.0):
        kp[KEYPOINT_NAMES.index(name)] = (x, y, v)

    shoulders = {s: (cx + sgn * sh_w, sh_y) for s, sgn in (("left", L), ("right", R))}
    hips = {s: (cx + sgn * hip_w * 0.55, hip_y) for s, sgn in (("left", L), ("right", R))}
    elbows = {s: (shoulders[s][0] + sgn * 0.03 * P, Y(0.34) + (swing if s == "left" else -swing) * 0.3)
              for s, sgn in (("left", L), ("right", R))}
    wrists = {s: (elbows[s][0] + (swing if s == "left" else -swing) * 0.6 + sgn * 0.01 * P, Y(0.5))
              for s, sgn in (("left", L), ("right", R))}
    knees = {s: (hips[s][0] + (stride if s == "left" else -stride) * 0.5, knee_y) for s in ("left", "right")}
    ankles = {s: (hips[s][0] + (stride if s == "left" else -stride), ankle_y) for s in ("left", "right")}

    upper = _vary(rng, ident.upper, 6)
    lower = _vary(rng, ident.lower, 6)
    skin = _vary(rng, ident.skin, 6)
    limb = max(2, int(0.075 * P * bw))
    leg = max(2, int(0.095 * P * bw))

    # Long hair behind the head and shoulders.
    if ident.hair == "long":
        draw("rectangle", [cx - head_r * 1.05, head_c[1], cx + head_r * 1.05, Y(0.24)], ident.hair_color, 1)
    # Legs (with shorts / skirt the shins show skin), then shoes.
    for s in ("left", "right"):
        thigh_col = lower
        shin_col = lower if ident.legwear == "trousers" else skin
        draw("line", [hips[s], knees[s]], thigh_col, 3, width=leg)
        draw("line", [knees[s], ankles[s]], shin_col, 3, width=leg)
    if ident.legwear == "skirt":
        draw("polygon", [(cx - hip_w, hip_y - 0.02 * P), (cx + hip_w, hip_y - 0.02 * P),
                         (cx + hip_w * 1.5, Y(0.68)), (cx - hip_w * 1.5, Y(0.68))], lower, 3)
    shoes = _vary(rng, ident.shoes, 8)
    for s in ("left", "right"):
        ax, ay = ankles[s]
        draw("ellipse", [ax - 0.075 * P, ay - 0.03 * P, ax + 0.075 * P, ay + 0.065 * P], shoes, 4)
    # Torso.
    draw("polygon", [(cx - sh_w, sh_y - 0.02 * P), (cx + sh_w, sh_y - 0.02 * P), (cx + hip_w, hip_y + 0.02 * P),
                     (cx - hip_w, hip_y + 0.02 * P)], upper, 2)
    # Backpack seen from behind covers the back.
    bag_col = _vary(rng, ident.bag_color, 8)
    if ident.bag == "backpack" and not front:
        draw("rounded_rectangle", [cx - sh_w * 0.75, Y(0.2), cx + sh_w * 0.75, Y(0.44)], bag_col, 5, radius=int(0.02 * P))
    # Arms: upper arm in sleeve colour, forearm in sleeve colour or skin.
    fore = upper if ident.sleeves == "long" else skin
    for s in ("left", "right"):
        draw("line", [shoulders[s], elbows[s]], upper, 2, width=limb)
        draw("line", [elbows[s], wrists[s]], fore, 2, width=limb)
        wx, wy = wrists[s]
        draw("ellipse", [wx - limb * 0.6, wy - limb * 0.6, wx + limb * 0.6, wy + limb * 0.6], skin, 2)
    # Head and hair / hat.
    hx, hy = head_c
    draw("ellipse", [hx - head_r * 0.9, hy - head_r, hx + head_r * 0.9, hy + head_r], skin, 1)
    hc = _vary(rng, ident.hair_color, 6)
    if ident.hair in ("short", "long"):
        cover = 0.15 if front else 1.0          # from behind the hair covers the head
        draw("chord", [hx - head_r * 0.95, hy - head_r * 1.08, hx + head_r * 0.95, hy + head_r * (0.2 + 0.9 * cover)],
             hc, 1, start=180 if front else 150, end=360 if front else 390)
    elif ident.hair == "hat":
        draw("chord", [hx - head_r, hy - head_r * 1.25, hx + head_r, hy + head_r * 0.5], hc, 1, start=180, end=360)
        draw("rectangle", [hx - head_r * 1.25, hy - head_r * 0.2, hx + head_r * 1.25, hy - head_r * 0.02], hc, 1)
    # Logo on the chest, visible from the front only.
    if front and ident.logo != "none":
        lc = _vary(rng, ident.logo_color, 6)
        lx, ly, ls = cx, Y(0.28), 0.06 * P
        if ident.logo == "square":
            draw("rectangle", [lx - ls, ly - ls, lx + ls, ly + ls], lc, 2)
        elif ident.logo == "circle":
            draw("ellipse", [lx - ls, ly - ls, lx + ls, ly + ls], lc, 2)
        else:
            draw("rectangle", [cx - sh_w * 0.9, ly - ls * 0.5, cx + sh_w * 0.9, ly + ls * 0.5], lc, 2)
    # Bags seen from the front or hanging at the side.
    if ident.bag == "backpack" and front:
        strap = max(1, int(0.03 * P))
        for sgn in (-1, 1):
            draw("line", [(cx + sgn * sh_w * 0.6, sh_y - 0.02 * P), (cx + sgn * sh_w * 0.55, Y(0.42))], bag_col, 5,
                 width=strap)
    elif ident.bag == "handbag":
        side = "left" if rng.random() < 0.5 else "right"
        wx, wy = wrists[side]
        draw("rectangle", [wx - 0.07 * P, wy, wx + 0.07 * P, wy + 0.12 * P], bag_col, 5)
    elif ident.bag == "shoulder":
        sgn = 1 if rng.random() < 0.5 else -1
        strap = max(1, int(0.028 * P))
        draw("line", [(cx - sgn * sh_w * 0.7, sh_y - 0.01 * P), (cx + sgn * sh_w * 1.05, Y(0.47))], bag_col, 5,
             width=strap)
        bx, by = cx + sgn * sh_w * 1.1, Y(0.47)
        draw("rectangle", [bx - 0.07 * P, by - 0.04 * P, bx + 0.07 * P, by + 0.07 * P], bag_col, 5)

    # Keypoints (COCO-17); face points only from the front.
    fv = 1.0 if front else 0.0
    set_kp("nose", hx, hy + head_r * 0.15, fv)
    set_kp("left_eye", hx + L * head_r * 0.35, hy - head_r * 0.1, fv)
    set_kp("right_eye", hx + R * head_r * 0.35, hy - head_r * 0.1, fv)
    set_kp("left_ear", hx + L * head_r * 0.85, hy, 1.0)
    set_kp("right_ear", hx + R * head_r * 0.85, hy, 1.0)
    for s in ("left", "right"):
        set_kp(f"{s}_shoulder", *shoulders[s])
        set_kp(f"{s}_elbow", *elbows[s])
        set_kp(f"{s}_wrist", *wrists[s])
        set_kp(f"{s}_hip", *hips[s])
        set_kp(f"{s}_knee", *knees[s])
        set_kp(f"{s}_ankle", *ankles[s])

    # Occluder in front of the person: a pole, a railing / parked object, or a passer-by blob.
    if rng.random() < cam.occluder_p:
        col = _vary(rng, _pick(rng, cam.clutter), 15)
        kind = int(rng.integers(3))
        if kind == 0:
            x = cx + rng.uniform(-0.2, 0.2) * W
            box = [x - rng.uniform(0.04, 0.1) * W, 0, x + rng.uniform(0.04, 0.1) * W, H]
        elif kind == 1:
            yt = Y(rng.uniform(0.55, 0.8))
            box = [0, yt, W, H]
        else:
            x = rng.choice([-1, 1]) * rng.uniform(0.25, 0.45) * W + cx
            yt = Y(rng.uniform(0.2, 0.5))
            box = [x - 0.2 * W, yt, x + 0.2 * W, yt + 0.45 * P]
        di.rectangle(box, fill=col)
        dm.rectangle(box, fill=0)

    # Reduce: box filter for the picture, nearest label for the mask.
    small = img.resize((width, height), Image.BOX)
    mask = np.asarray(msk.resize((width, height), Image.NEAREST), dtype=np.uint8)
    kp[:, :2] /= S
    for i in range(len(kp)):
        x, y = kp[i, 0], kp[i, 1]
        inside = 0 <= x < width and 0 <= y < height
        if not inside:
            kp[i, 2] = 0.0
        elif kp[i, 2] > 0 and mask[int(y), int(x)] == 0 and \
                mask[max(0, int(y) - 2):int(y) + 3, max(0, int(x) - 2):int(x) + 3].max() == 0:
            kp[i, 2] = 0.0                      # hidden by an occluder
    # Camera: light level and colour cast, blur, sensor noise.
    arr = np.asarray(small, dtype=np.float32)
    gain = np.array(cam.gain, np.float32) * np.float32(rng.uniform(0.95, 1.05))
    arr = arr * gain[None, None, :]
    if cam.blur > 0.05:
        arr = np.asarray(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(cam.blur)), dtype=np.float32)
    arr = arr + rng.normal(0, cam.noise, size=arr.shape).astype(np.float32)
    out = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    return out, mask, kp.astype(np.float32)


def _distractor(seed: int, k: int, num_cams: int) -> Identity:
    r = _rng(seed, 4, k)
    d = _details(r)
    upper = _pick(r, _CLOTHES)
    return Identity(pid=0, group=-1, upper=upper, lower=_pick(r, _CLOTHES), sleeves=_pick(r, ("long", "short")),
                    legwear=_pick(r, ("trousers", "shorts", "skirt")), build_w=float(r.uniform(0.85, 1.2)),
                    build_h=float(r.uniform(0.9, 1.05)), skin=_pick(r, _SKIN), hair=d[0], hair_color=d[1],
                    shoes=d[2], bag=d[3], bag_color=d[4], logo=d[5], logo_color=d[6],
                    cams=[int(r.integers(num_cams))])


# What generate writes under out_dir: the split folders with their images, parts/<split>/ with a
# mask and a keypoints file per image, and synthetic.json (each file possibly still as
# fmn.atomic's temporary, or cut short by a kill).
MARKER = "synthetic.json"
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
_STEM = r"(?:-1|\d{4})_c\d+s1_\d{6}_\d{2}"
_OWN_FILES = {
    "split": re.compile(_STEM + r"\.jpg"),
    "parts": re.compile(_STEM + r"\.(?:png|json)"),
    "top": re.compile(r"(?:\.tmp-\d+-[0-9a-f]{8}-)?" + re.escape(MARKER)),
}


def is_complete(out_dir: str) -> bool:
    """True when ``out_dir`` holds a dataset that :func:`generate` finished: its ``synthetic.json``,
    written last, is there and reads as generate's. A run killed part-way leaves no such file."""
    try:
        with open(os.path.join(os.path.expanduser(str(out_dir)), MARKER)) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == "fmn.data.synthetic" and "counts" in meta


def _foreign_entries(out_dir: str) -> List[str]:
    """The paths under ``out_dir`` that generate does not write (empty: the folder holds only
    what an interrupted generate left)."""
    foreign = []

    def files_of(folder: str, pattern: re.Pattern) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if not (entry.is_file(follow_symlinks=False) and pattern.fullmatch(entry.name)):
                foreign.append(entry.path)

    for entry in sorted(os.scandir(out_dir), key=lambda e: e.name):
        is_dir = entry.is_dir(follow_symlinks=False)
        if is_dir and entry.name in SPLIT_FOLDERS.values():
            files_of(entry.path, _OWN_FILES["split"])
        elif is_dir and entry.name == "parts":
            for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
                if sub.is_dir(follow_symlinks=False) and sub.name in SPLIT_FOLDERS.values():
                    files_of(sub.path, _OWN_FILES["parts"])
                else:
                    foreign.append(sub.path)
        elif not (entry.is_file(follow_symlinks=False) and _OWN_FILES["top"].fullmatch(entry.name)):
            foreign.append(entry.path)
    return foreign


def _clear_partial(out_dir: str) -> None:
    """Delete what an interrupted generate wrote in ``out_dir`` (checked by _foreign_entries):
    its files, then its emptied folders; ``out_dir`` itself stays."""
    for dirpath, _, files in os.walk(out_dir, topdown=False):
        for name in files:
            os.unlink(os.path.join(dirpath, name))
        if dirpath != out_dir:
            os.rmdir(dirpath)


def _prepare_out_dir(out_dir: str) -> None:
    """``out_dir`` absent or empty; or holding an unfinished generate's files only, which are
    cleared. A complete dataset, or anything generate does not write, is an error (nothing is
    deleted then)."""
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if is_complete(out_dir):
        raise FileExistsError(f"{out_dir}: output folder exists and holds a complete synthetic dataset "
                              f"({MARKER}); give an empty or absent folder")
    foreign = _foreign_entries(out_dir)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise FileExistsError(
            f"{out_dir}: output folder exists and is not empty: it holds {foreign[0]}{more}, which "
            "fmn.data.synthetic.generate does not write; give an empty or absent folder")
    _clear_partial(out_dir)


def generate(out_dir: str, num_ids: Optional[int] = None, num_cams: Optional[int] = None,
             seed: int = 0, images_per_id_per_cam=None,
             height: Optional[int] = None, width: Optional[int] = None,
             progress: bool = True, group_size: Optional[int] = None,
             num_distractors: Optional[int] = None, num_junk: Optional[int] = None,
             with_parts: bool = True, preset: str = "default") -> str:
    """Write the synthetic dataset to ``out_dir`` (created; must be empty or absent, or hold what
    an interrupted ``generate`` left there, which is cleared and written again).

    ``preset``: ``"default"`` (this module) or ``"hard"`` (:mod:`fmn.data.synthetic_hard`: the
    shape and difficulty of a small real two-camera dataset). An argument left at None takes the
    preset's default.

    Default preset: 96 identities in groups of 4 (48 train / 48 test), 4 cameras, each identity
    in 2-4 of them with 4 images per camera, 128x64 images: for seed 0, 576 training images, 148
    queries and 492 gallery images (including 32 distractors and 16 junk); about 8 s of CPU.
    ``num_distractors`` / ``num_junk`` default to a third / a sixth of ``num_ids``.
    Returns ``out_dir``.
    """
    from tqdm.auto import tqdm

    if preset == "hard":
        from fmn.data.synthetic_hard import generate_hard

        given = dict(num_ids=num_ids, num_cams=num_cams, images_per_id_per_cam=images_per_id_per_cam,
                     height=height, width=width, group_size=group_size)
        return generate_hard(out_dir, seed=seed, progress=progress, num_distractors=num_distractors,
                             num_junk=num_junk, with_parts=with_parts,
                             **{k: v for k, v in given.items() if v is not None})
    if preset != "default":
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    num_ids = DEFAULTS["num_ids"] if num_ids is None else num_ids
    num_cams = DEFAULTS["num_cams"] if num_cams is None else num_cams
    if images_per_id_per_cam is None:
        images_per_id_per_cam = DEFAULTS["images_per_id_per_cam"]
    if isinstance(images_per_id_per_cam, (tuple, list)):
        raise ValueError("images_per_id_per_cam: the default preset takes one number of images per identity and "
                         f"camera, got {images_per_id_per_cam!r} (a (min, max) range is for preset='hard')")
    height = DEFAULTS["height"] if height is None else height
    width = DEFAULTS["width"] if width is None else width
    group_size = DEFAULTS["group_size"] if group_size is None else group_size
    if num_ids < 2:
        raise ValueError(f"num_ids must be >= 2, got {num_ids}")
    if num_cams < 2:
        raise ValueError(f"num_cams must be >= 2 (matches are across cameras), got {num_cams}")
    if images_per_id_per_cam < 1 or height < 16 or width < 8:
        raise ValueError("images_per_id_per_cam must be >= 1 and images at least 16x8")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if num_distractors is None:
        num_distractors = num_ids // 3
    if num_junk is None:
        num_junk = num_ids // 6
    out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
    _prepare_out_dir(out_dir)
    folders = SPLIT_FOLDERS
    for f in folders.values():
        os.makedirs(os.path.join(out_dir, f), exist_ok=True)

    ids = _make_identities(seed, num_ids, group_size, num_cams)
    cams = _make_cameras(seed, num_cams)
    num_groups = max(i.group for i in ids) + 1
    # Whole groups alternate between train and test; with one group, split its members.
    if num_groups >= 2:
        train_pids = {i.pid for i in ids if i.group % 2 == 0}
    else:
        train_pids = {i.pid for i in ids[: len(ids) // 2]}

    jobs = []                                   # (split, identity, cam, k, pid written)
    for ident in ids:
        for c in ident.cams:
            for k in range(images_per_id_per_cam):
                if ident.pid in train_pids:
                    split = "train"
                elif images_per_id_per_cam >= 2:
                    split = "query" if k == 0 else "gallery"
                else:
                    split = "query" if c == ident.cams[0] else "gallery"
                jobs.append((split, ident, c, k, ident.pid))
    for j in range(num_distractors):
        d = _distractor(seed, j, num_cams)
        jobs.append(("gallery", d, d.cams[0], j, 0))
    for j in range(num_junk):
        d = _distractor(seed, 100000 + j, num_cams)
        jobs.append(("gallery", d, d.cams[0], j, -1))

    counts = {"train": 0, "query": 0, "gallery": 0}
    for frame, (split, ident, c, k, pid) in enumerate(tqdm(jobs, desc="synthesise", disable=not progress,
                                                            unit="img"), 1):
        rng = _rng(seed, 5, pid + 1, ident.pid if pid > 0 else (10**6 + k), c, k)
        img, mask, kp = render_person(ident, cams[c], rng, height, width)
        pid_str = "-1" if pid == -1 else f"{pid:04d}"
        name = f"{pid_str}_c{c + 1}s1_{frame:06d}_{k + 1:02d}.jpg"
        path = os.path.join(out_dir, folders[split], name)
        img.save(path, quality=92)
        if with_parts:
            save_parts(path, mask, kp)
        counts[split] += 1

    meta = {
        "generator": "fmn.data.synthetic",
        "version": 1,
        "params": dict(num_ids=num_ids, num_cams=num_cams, seed=seed, images_per_id_per_cam=images_per_id_per_cam,
                       height=height, width=width, group_size=group_size, num_distractors=num_distractors,
                       num_junk=num_junk),
        "counts": counts,
        "part_labels": PART_LABELS,
        "keypoint_names": KEYPOINT_NAMES,
        "train_pids": sorted(train_pids),
        "identities": [asdict(i) for i in ids],
        "cameras": [asdict(c) for c in cams],
    }
    def write_marker(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)

    atomic_write(os.path.join(out_dir, MARKER), write_marker)   # last: the dataset is complete
    return out_dir
