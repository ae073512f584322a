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

from fmn.visualize import save_image

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
    """Min-max scale a 2-D map to [0, 1] (a constant map becomes 0.5)."""
    a = m.detach().float().cpu().numpy() if torch.is_tensor(m) else np.asarray(m, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1e-12:
        return np.full(a.shape, 0.5)
    return (a - lo) / (hi - lo)


def overlay(image: np.ndarray | Image.Image, heat: np.ndarray | torch.Tensor, alpha: float = 0.5) -> Image.Image:
    """Blend a heatmap (h, w), upsampled bilinearly to the image size, over an RGB image."""
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
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
    each upscaled by ``scale``."""
    was_training = model.training
    model.eval()
    try:
        x = load_batch(paths, height, width).to(device)
        maps = model.activation_maps(x)
    finally:
        model.train(was_training)
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
    wrong and FMN's is right (as in Fig. 4); same-identity same-camera items are excluded."""
    q_pids, g_pids = torch.as_tensor(q_pids), torch.as_tensor(g_pids)
    q_camids, g_camids = torch.as_tensor(q_camids), torch.as_tensor(g_camids)
    junk = (q_pids[:, None] == g_pids[None, :]) & (q_camids[:, None] == g_camids[None, :])
    dg = dist_grn.float().masked_fill(junk, float("inf"))
    df = dist_fmn.float().masked_fill(junk, float("inf"))
    top_g, top_f = dg.argmin(1), df.argmin(1)
    ok_g = g_pids[top_g] == q_pids
    ok_f = g_pids[top_f] == q_pids
    order = [int(i) for i in torch.nonzero(~ok_g & ok_f).flatten()]
    order += [int(i) for i in torch.nonzero(ok_f & ok_g).flatten()]
    order += [i for i in range(len(q_pids)) if i not in set(order)]
    return [(q, int(top_g[q]), int(top_f[q])) for q in order[:count]]


def fig4(model: torch.nn.Module, q_paths, g_paths, cases: list[tuple[int, int, int]], q_pids, g_pids,
         out_png: str, height: int, width: int, device: torch.device | str = "cpu") -> str:
    """The Fig. 4 layout: for each case, columns query | GRN rank-1 | FMN rank-1; the rank-1 frames
    are green for a true match and red otherwise."""
    paths, titles, colors = [], [], []
    for q, g_grn, g_fmn in cases:
        paths += [q_paths[q], g_paths[g_grn], g_paths[g_fmn]]
        titles += ["query", "GRN r1", "FMN r1"]
        colors += [None,
                   (0, 170, 0) if int(g_pids[g_grn]) == int(q_pids[q]) else (220, 0, 0),
                   (0, 170, 0) if int(g_pids[g_fmn]) == int(q_pids[q]) else (220, 0, 0)]
    return attention_figure(model, paths, out_png, height, width, device, titles, colors, group=3)
