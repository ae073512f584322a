"""Ranked-list pictures and heatmap overlays on inputs whose answer is known: which tiles are
green/red, which gallery items are left out (same identity and camera, as in evaluation), the
orientation of an overlaid map, and files that are never half-written."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fmn.engine.heatmap import colormap, overlay, pick_fig4_cases
from fmn.engine.visualize import GREEN, QUERY, RED, ranked_list

TILE_H, TILE_W, BORDER = 32, 16, 4


def _images(folder, n, prefix):
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"{prefix}{i}.png")
        Image.new("RGB", (20, 40), (10 * i, 100, 200 - 10 * i)).save(p)
        paths.append(p)
    return paths


def _row_border_colors(png, n_rows, topk):
    """Border colour of the query tile and of each ranked tile, row by row (layout of ranked_list)."""
    im = np.asarray(Image.open(png).convert("RGB"))
    cell_w, cell_h = TILE_W + 2 * BORDER, TILE_H + 2 * BORDER
    rows = []
    for r in range(n_rows):
        y = r * (cell_h + 14 + 6) + 1
        colors = [tuple(im[y, 1])]
        for k in range(topk):
            x = cell_w + 12 + k * (cell_w + 4) + 1
            colors.append(tuple(im[y, x]))
        rows.append(colors)
    return rows


def test_ranked_list_marks_matches_and_leaves_out_same_camera(tmp_path):
    g_pids = [1, 1, 2, 3, 1, 2]
    g_cams = [1, 2, 1, 2, 1, 2]
    q_pids, q_cams = [1, 2], [1, 2]
    qp, gp = _images(tmp_path, 2, "q"), _images(tmp_path, 6, "g")
    # query 0 (id 1, cam 1): gallery order by distance 0, 1, 2, 3, 4, 5; items 0 and 4 are id 1 in
    # cam 1 -> left out; shown: 1 (id 1, green), 2 (red), 3 (red), 5 (red)
    # query 1 (id 2, cam 2): order 5, 4, 3, 2, 1, 0; item 5 is id 2 in cam 2 -> left out;
    # shown: 4 (red), 3 (red), 2 (id 2 cam 1, green), 1 (red)
    dist = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]])
    out = tmp_path / "sub" / "rl.png"
    ranked_list(dist, qp, gp, q_pids, g_pids, q_cams, g_cams, str(out), topk=4,
                tile_hw=(TILE_H, TILE_W), border=BORDER)
    rows = _row_border_colors(out, 2, 4)
    assert rows[0] == [QUERY, GREEN, RED, RED, RED]
    assert rows[1] == [QUERY, RED, RED, GREEN, RED]
    assert Image.open(out).size[1] == 2 * (TILE_H + 2 * BORDER + 20)


def test_ranked_list_ties_by_index_and_fewer_items_than_topk(tmp_path):
    qp, gp = _images(tmp_path, 3, "q"), _images(tmp_path, 3, "g")
    dist = torch.zeros(3, 3)   # all tied: gallery index order
    out = tmp_path / "rl.png"
    ranked_list(dist, qp, gp, [1, 2, 3], [2, 1, 1], [1, 1, 1], [2, 1, 2], str(out), queries=[0], topk=5,
                tile_hw=(TILE_H, TILE_W), border=BORDER)
    row = _row_border_colors(out, 1, 3)[0]
    # query 0 is id 1 cam 1: gallery 1 (id 1, cam 1) is left out -> 0 (red), 2 (green)
    assert row[:3] == [QUERY, RED, GREEN]
    assert row[3] == (255, 255, 255)   # no third tile
    with pytest.raises(ValueError, match="outside"):
        ranked_list(dist, qp, gp, [1, 2, 3], [2, 1, 1], [1, 1, 1], [2, 1, 2], str(out), queries=[3])


def test_pick_fig4_cases_leaves_out_same_camera_and_prefers_grn_wrong_fmn_right():
    q_pids, q_cams = torch.tensor([1, 2]), torch.tensor([1, 1])
    g_pids, g_cams = torch.tensor([1, 1, 2, 3]), torch.tensor([1, 2, 2, 2])
    # query 0: gallery 0 is the same id in the same camera -> never rank-1 although nearest
    d_grn = torch.tensor([[0.0, 3, 2, 1], [0.0, 1, 2, 3]])
    d_fmn = torch.tensor([[0.0, 1, 2, 3], [0.0, 1, 2, 3]])
    cases = pick_fig4_cases(d_grn, d_fmn, q_pids, g_pids, q_cams, g_cams, count=5)
    assert cases[0] == (0, 3, 1)   # GRN wrong (id 3), FMN right (id 1 from camera 2)
    assert cases[1] == (1, 0, 0)
    assert len(cases) == 2         # fewer queries than asked


def test_overlay_keeps_the_map_orientation_and_image_size():
    img = Image.new("RGB", (32, 64), (128, 128, 128))   # W x H = 32 x 64
    heat = torch.zeros(8, 4)                            # (h, w) map of a tall input, 8 x 8 pixels a cell
    heat[1, 3] = 1.0                                    # hot cell: second row, right column
    out = np.asarray(overlay(img, heat, alpha=1.0)).astype(int)
    assert out.shape == (64, 32, 3)
    cold = colormap(np.array(0.0)).astype(int)
    warm = np.abs(out - cold).sum(-1) > 0
    ys, xs = np.nonzero(warm)
    # bilinear upsampling spreads the cell over its neighbours' halves, nowhere else
    assert 4 <= ys.min() and ys.max() < 20 and xs.min() >= 20
    assert warm[12, 28] and warm[8:16, 24:32].all()      # the whole 8 x 8 cell
    centre = out[10:14, 26:30]
    assert centre[..., 2].max() == 0 and centre[..., 0].min() > 150   # the red end of the palette there


def test_pictures_are_written_atomically(tmp_path, monkeypatch):
    qp, gp = _images(tmp_path, 1, "q"), _images(tmp_path, 2, "g")
    out = tmp_path / "rl.png"
    ranked_list(torch.zeros(1, 2), qp, gp, [1], [1, 2], [1], [2, 1], str(out), topk=2)
    before = out.read_bytes()

    def broken_save(self, fp, *args, **kwargs):   # dies half-way through writing
        with open(fp, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ranked_list(torch.zeros(1, 2), qp, gp, [1], [1, 2], [1], [2, 1], str(out), topk=2)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["g0.png", "g1.png", "q0.png", "rl.png"]
