"""Ranked-list pictures: a query and its top-k gallery images, green = same identity, red = not.

Gallery items of the query's identity seen by the query's camera, and junk items (identity -1),
are left out, as in the evaluation protocol (DESIGN §4, ``fmn.metrics``). Ties in distance are
broken by gallery index.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fmn.atomic import atomic_write
from fmn.data.base import read_image
from fmn.metrics import JUNK_PID

__all__ = ["ranked_list", "save_image"]

GREEN = (20, 170, 40)
RED = (210, 30, 30)
QUERY = (40, 90, 220)


def _tile(path: str, h: int, w: int, border: int, color) -> Image.Image:
    im = read_image(path).resize((w, h), Image.BILINEAR)
    tile = Image.new("RGB", (w + 2 * border, h + 2 * border), color)
    tile.paste(im, (border, border))
    return tile


def ranked_list(dist, q_paths: Sequence[str], g_paths: Sequence[str], q_pids, g_pids, q_camids, g_camids,
                out_png: str, queries: Optional[Sequence[int]] = None, topk: int = 10,
                tile_hw=(128, 64), border: int = 4) -> str:
    """Draw one row per query: the query (blue border), a gap, then its ``topk`` nearest gallery
    images with green (same identity) or red (other identity) borders and rank / distance labels.

    ``queries``: query indices to draw (default: the first 8). Returns ``out_png``.
    """
    dist = torch.as_tensor(dist).detach().float().cpu()
    if dist.dim() != 2:
        raise ValueError(f"ranked_list: dist must be a (num_query, num_gallery) matrix, got shape {tuple(dist.shape)}")
    nq, ng = dist.shape
    ids = {}
    for name, v, n in (("q_pids", q_pids, nq), ("g_pids", g_pids, ng), ("q_camids", q_camids, nq),
                       ("g_camids", g_camids, ng)):
        ids[name] = np.asarray(torch.as_tensor(v).cpu()).reshape(-1)
        if ids[name].size != n:
            raise ValueError(f"ranked_list: {name} has {ids[name].size} entries but dist has shape {nq}x{ng}")
    q_pids, g_pids, q_camids, g_camids = ids["q_pids"], ids["g_pids"], ids["q_camids"], ids["g_camids"]
    if len(q_paths) != nq or len(g_paths) != ng:
        raise ValueError(f"ranked_list: dist is {nq}x{ng} but got {len(q_paths)} query and {len(g_paths)} gallery paths")
    if int(topk) < 1:
        raise ValueError(f"ranked_list: topk must be >= 1, got {topk}")
    topk = int(topk)
    if queries is None:
        queries = list(range(min(8, nq)))
    queries = [int(q) for q in queries]
    for q in queries:
        if not 0 <= q < nq:
            raise ValueError(f"ranked_list: query index {q} outside 0..{nq - 1}")
    if not queries:
        raise ValueError("ranked_list: no queries to draw")
    th, tw = tile_hw
    cell_w, cell_h = tw + 2 * border, th + 2 * border
    label_h, gap = 14, 12
    width = cell_w * (topk + 1) + gap + 4 * (topk + 1)
    height = (cell_h + label_h + 6) * len(queries)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, q in enumerate(queries):
        y = row * (cell_h + label_h + 6)
        d = dist[q].numpy()
        order = np.argsort(d, kind="stable")
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q])) & (g_pids[order] != JUNK_PID)
        order = order[keep][:topk]
        canvas.paste(_tile(q_paths[q], th, tw, border, QUERY), (0, y))
        draw.text((2, y + cell_h + 1), f"q{q} id {q_pids[q]}", fill=(0, 0, 0), font=font)
        for r, j in enumerate(order):
            x = cell_w + gap + r * (cell_w + 4)
            color = GREEN if g_pids[j] == q_pids[q] else RED
            canvas.paste(_tile(g_paths[j], th, tw, border, color), (x, y))
            draw.text((x + 2, y + cell_h + 1), f"{r + 1}: {d[j]:.2f}", fill=color, font=font)
    return save_image(canvas, out_png)


def save_image(img: Image.Image, path: str) -> str:
    """Save ``img`` (format from the extension) atomically (fmn.atomic): a reader never sees half a
    picture."""
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"{path}: unknown image file extension {ext or '(none)'!r}; expected an image "
                         f"extension such as .png or .jpg")
    return atomic_write(path, lambda tmp: img.save(tmp, format=fmt))
