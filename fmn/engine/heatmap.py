"""Attention heatmaps as in the paper's Fig. 4: for a query, GRN's wrong rank-1 match and FMN's
rank-1 match, each shown as the image, the predicted feature mask over the image, and the GRN
and LAN activation maps (channel mean of each branch's last feature map, min-max scaled).
PNG via PIL; no plotting library needed.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from fmn.engine.evaluation import eval_mode, input_dtype
from fmn.metrics import JUNK_PID
from fmn.engine.visualize import save_image

# (position, r, g, b) stops of a jet-like colour map
_STOPS = np.array([
    [0.00, 0.0, 0.0, 0.5],
    [0.15, 0.0, 0.0, 1.0],
    [0.40, 0.0, 1.0, 1.0],
    [0.60, 1.0, 1.0, 0.0],
    [0.85, 1.0, 0.0, 0.0],
    [1.00, 0.5, 0.0, 0.0],
])


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (any shape) to uint8 RGB (..., 3) with a jet-like palette."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], axis=-1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def normalize_map(m: np.ndarray | torch.Tensor) -> np.ndarray:
    """Min-max scale a map to [0, 1] over its finite values (a constant map becomes 0.5); +inf
    (an overflowed ``exp`` mask) maps to 1 and -inf to 0. NaN is an error."""
    a = m.detach().double().cpu().numpy() if torch.is_tensor(m) else np.asarray(m, dtype=np.float64)
    if np.isnan(a).any():
        raise ValueError(f"heatmap: the map of shape {a.shape} contains NaN (non-finite model activations)")
    out = np.where(a > 0, 1.0, 0.0)
    finite = np.isfinite(a)
    if finite.any():
        v = a[finite]
        lo, hi = float(v.min()), float(v.max())
        out[finite] = 0.5 if hi - lo < 1e-12 else (v - lo) / (hi - lo)
    return out


def _as_rgb(image) -> Image.Image:
    """A PIL image, an (h, w) or (h, w, 1|3|4) array, or an (h, w) or (1|3|4, h, w) tensor (torch's
    channel-first layout) as an RGB PIL image. Integer values are 0..255, floating ones 0..1."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if torch.is_tensor(image):
        t = image.detach().cpu()
        a = (t.float() if t.is_floating_point() else t).numpy()
        if a.ndim == 3 and a.shape[0] in (1, 3, 4):
            a = a.transpose(1, 2, 0)
    else:
        a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or a.size == 0:
        raise ValueError(f"overlay: expected an image (h, w), an array (h, w, 1|3|4) or a tensor (1|3|4, h, w), "
                         f"got shape {tuple(np.shape(image))}")
    if a.dtype.kind == "f":
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (0.0 <= lo and hi <= 1.0):
            raise ValueError(f"overlay: a floating-point image must hold values in [0, 1], got {lo:.4g}..{hi:.4g} "
                             f"(de-normalise an ImageNet-normalised tensor first: fmn.data.transforms.denormalize)")
        a = np.round(a * 255.0)
    elif a.dtype.kind in "iu":
        if a.min() < 0 or a.max() > 255:
            raise ValueError(f"overlay: an integer image must hold values in 0..255, got {a.min()}..{a.max()}")
    else:
        raise ValueError(f"overlay: expected a numeric image, got dtype {a.dtype}")
    return Image.fromarray(a.astype(np.uint8)).convert("RGB")


def overlay(image: np.ndarray | Image.Image, heat: np.ndarray | torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """Blend a heatmap (h, w), upsampled bilinearly to the image size, over an RGB image."""
    img = _as_rgb(image)
    shape = tuple(heat.shape) if torch.is_tensor(heat) else np.shape(heat)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"overlay: expected a 2-D (h, w) heatmap, got shape {shape}")
    h = normalize_map(heat)
    heat_img = Image.fromarray((h * 255).astype(np.uint8), mode="L").resize(img.size, Image.BILINEAR)
    colored = Image.fromarray(colormap(np.asarray(heat_img, dtype=np.float64) / 255.0))
    return Image.blend(img, colored, alpha)


def load_image(path: str, height: int, width: int) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB").resize((width, height), Image.BILINEAR)


def load_batch(paths: Sequence[str], height: int, width: int) -> torch.Tensor:
    """Images at ``paths`` as a normalised (B, 3, height, width) batch (ImageNet mean/std)."""
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    arr = np.stack([np.asarray(load_image(p, height, width)) for p in paths])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(255.0)
    return (x - mean) / std


@torch.no_grad()
def activation_panels(model: torch.nn.Module, paths: Sequence[str], height: int, width: int,
                      device: torch.device | str = "cpu", scale: int = 2) -> list[list[Image.Image]]:
    """For each image: [image, mask overlay, GRN activation overlay, LAN activation overlay],
    each upscaled by ``scale``. The model runs in eval mode (BatchNorm statistics do not move);
    every submodule's train/eval flag is restored afterwards."""
    if not callable(getattr(model, "activation_maps", None)):
        raise TypeError(f"heatmaps need a model with activation_maps() (FMN: mask, GRN and LAN maps); "
                        f"{type(model).__name__} has none")
    if not paths:
        raise ValueError("activation_panels: no images to draw")
    with eval_mode(model):
        x = load_batch(paths, height, width).to(device=device, dtype=input_dtype(model))
        maps = model.activation_maps(x)
    panels = []
    for i, p in enumerate(paths):
        img = load_image(p, height, width)
        row = [img, overlay(img, maps["mask"][i]), overlay(img, maps["grn"][i]), overlay(img, maps["lan"][i])]
        panels.append([im.resize((width * scale, height * scale), Image.NEAREST) for im in row])
    return panels


def _grid(columns: list[list[Image.Image]], col_titles: list[str], row_titles: list[str],
          col_colors: list[tuple[int, int, int]] | None = None, pad: int = 6, label_w: int = 44,
          title_h: int = 16, group: int = 0) -> Image.Image:
    tile_w, tile_h = columns[0][0].size
    n_cols, n_rows = len(columns), len(columns[0])
    gap = lambda c: (c // group) * pad * 2 if group else 0
    width = label_w + n_cols * (tile_w + pad) + pad + gap(n_cols - 1)
    height = title_h + n_rows * (tile_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, t in enumerate(row_titles):
        draw.text((4, title_h + pad + r * (tile_h + pad) + tile_h // 2 - 5), t, fill=(0, 0, 0))
    for c, col in enumerate(columns):
        x = label_w + pad + c * (tile_w + pad) + gap(c)
        draw.text((x, 2), col_titles[c][: max(4, tile_w // 6)], fill=(0, 0, 0))
        for r, tile in enumerate(col):
            y = title_h + pad + r * (tile_h + pad)
            canvas.paste(tile, (x, y))
            if col_colors is not None and col_colors[c] is not None and r == 0:
                draw.rectangle([x - 2, y - 2, x + tile_w + 1, y + tile_h + 1], outline=col_colors[c], width=2)
    return canvas


def attention_figure(model: torch.nn.Module, paths: Sequence[str], out_png: str, height: int, width: int,
                     device: torch.device | str = "cpu", titles: Sequence[str] | None = None,
                     colors: Sequence[tuple[int, int, int] | None] | None = None, group: int = 0) -> str:
    """One column per image, rows: image, MN mask, GRN map, LAN map. ``group`` > 0 leaves a wider
    gap after every ``group`` columns (query / GRN rank-1 / FMN rank-1 triplets)."""
    panels = activation_panels(model, paths, height, width, device)
    titles = list(titles) if titles is not None else [os.path.basename(p) for p in paths]
    img = _grid(panels, titles, ["image", "mask", "GRN", "LAN"], list(colors) if colors else None, group=group)
    return save_image(img, out_png)


def pick_fig4_cases(dist_grn: torch.Tensor, dist_fmn: torch.Tensor, q_pids, g_pids, q_camids, g_camids,
                    count: int = 3) -> list[tuple[int, int, int]]:
    """(query, GRN rank-1, FMN rank-1) gallery indices, preferring queries where GRN's rank-1 is
    wrong and FMN's is right (as in Fig. 4), then both right, then FMN wrong. Gallery items are
    left out as in evaluation (same identity and camera, junk identity -1); a query with no gallery
    item left has no rank-1 and is not picked."""
    dg, df = torch.as_tensor(dist_grn).detach(), torch.as_tensor(dist_fmn).detach()
    if dg.dim() != 2 or dg.shape != df.shape:
        raise ValueError(f"pick_fig4_cases: expected two (num_query, num_gallery) distance matrices of one shape, "
                         f"got {tuple(dg.shape)} and {tuple(df.shape)}")
    nq, ng = dg.shape
    dev = dg.device
    ids = []
    for name, v, n in (("q_pids", q_pids, nq), ("g_pids", g_pids, ng), ("q_camids", q_camids, nq),
                       ("g_camids", g_camids, ng)):
        t = torch.as_tensor(v).to(dev).reshape(-1)
        if t.numel() != n:
            raise ValueError(f"pick_fig4_cases: {name} has {t.numel()} entries but the distances are {nq}x{ng}")
        ids.append(t)
    q_pids, g_pids, q_camids, g_camids = ids
    if nq == 0 or ng == 0:
        return []
    left_out = ((q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] == g_camids[None, :])) \
        | (g_pids == JUNK_PID)[None, :]
    dg = dg.to(dev).float().masked_fill(left_out, float("inf"))
    df = df.to(dev).float().masked_fill(left_out, float("inf"))
    has_rank1 = ~left_out.all(1)
    top_g, top_f = dg.argmin(1), df.argmin(1)
    ok_g = (g_pids[top_g] == q_pids) & has_rank1
    ok_f = (g_pids[top_f] == q_pids) & has_rank1
    order = torch.cat([torch.nonzero(~ok_g & ok_f).flatten(), torch.nonzero(ok_f & ok_g).flatten(),
                       torch.nonzero(has_rank1 & ~ok_f).flatten()])
    return [(int(q), int(top_g[q]), int(top_f[q])) for q in order[:count].tolist()]


def fig4(model: torch.nn.Module, q_paths, g_paths, cases: list[tuple[int, int, int]], q_pids, g_pids,
         out_png: str, height: int, width: int, device: torch.device | str = "cpu") -> str:
    """The Fig. 4 layout: for each case, columns query | GRN rank-1 | FMN rank-1; the rank-1 frames
    are green for a true match and red otherwise."""
    if not cases:
        raise ValueError("fig4: no cases to draw (no query has a gallery item left after the protocol's exclusions)")
    paths, titles, colors = [], [], []
    for q, g_grn, g_fmn in cases:
        paths += [q_paths[q], g_paths[g_grn], g_paths[g_fmn]]
        titles += ["query", "GRN r1", "FMN r1"]
        colors += [None,
                   (0, 170, 0) if int(g_pids[g_grn]) == int(q_pids[q]) else (220, 0, 0),
                   (0, 170, 0) if int(g_pids[g_fmn]) == int(q_pids[q]) else (220, 0, 0)]
    return attention_figure(model, paths, out_png, height, width, device, titles, colors, group=3)
