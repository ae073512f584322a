"""fmn.evaluator (extraction, eq. 6 descriptor, rows, table, JSON) and fmn.visualize.ranked_list."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fmn.data import ReIDDataset, make_test_loader
from fmn.engine.evaluation import evaluate_features, evaluate_model, extract_features, format_results, fuse
from fmn.metrics import euclidean_distance, evaluate
from fmn.engine.visualize import ranked_list


class TwoBranch(torch.nn.Module):
    """GRN-like: mean colour; LAN-like: a coarse spatial layout. Not symmetric under flips."""

    def forward(self, x):
        g = x.mean((2, 3)) + 1.0
        l = F.adaptive_avg_pool2d(x, (2, 2)).flatten(1) + torch.arange(12.0)
        return {"grn": g, "lan": l}


@pytest.fixture(scope="module")
def colour_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    base = {pid: rng.integers(0, 255, 3) for pid in range(1, 7)}

    def write(name, pid, cam):
        arr = np.clip(base[pid][None, None, :] + rng.normal(0, 25, (16, 8, 3)), 0, 255).astype(np.uint8)
        p = str(root / name)
        Image.fromarray(arr).save(p)
        return (p, pid, cam)

    train = [write(f"t{pid}_{k}.png", pid, k) for pid in (1, 2) for k in range(2)]
    query = [write(f"q{pid}.png", pid, 0) for pid in range(3, 7)]
    gallery = [write(f"g{pid}_{k}.png", pid, 1 + k % 2) for pid in range(3, 7) for k in range(3)]
    return ReIDDataset("colours", str(root), train, query, gallery)


def test_fuse_is_equation_6():
    g, l = torch.randn(5, 4), torch.randn(5, 3)
    d = fuse(g, l, alpha=0.3)
    assert d.shape == (5, 7)
    assert torch.allclose(d[:, :4].norm(dim=1), torch.full((5,), 0.3))
    assert torch.allclose(d[:, 4:].norm(dim=1), torch.full((5,), 0.7))
    assert torch.allclose(d[:, :4], 0.3 * g / g.norm(dim=1, keepdim=True))


def test_extract_features_flip_average(colour_dataset):
    loader = make_test_loader(colour_dataset.query, 16, 8, batch_size=3, workers=0)
    model = TwoBranch()
    feats, pids, camids, paths = extract_features(model, loader, "cpu", flip=True, progress=False)
    assert set(feats) == {"grn", "lan"} and feats["lan"].shape == (4, 12)
    assert pids.tolist() == [3, 4, 5, 6] and camids.tolist() == [0, 0, 0, 0] and len(paths) == 4
    x = torch.cat([b["img"] for b in loader])
    expect = (model(x)["lan"] + model(x.flip(3))["lan"]) / 2
    assert torch.allclose(feats["lan"], expect, atol=1e-6)
    no_flip, *_ = extract_features(model, loader, "cpu", flip=False, progress=False)
    assert torch.allclose(no_flip["lan"], model(x)["lan"], atol=1e-6)
    assert not torch.allclose(no_flip["lan"], expect)


def test_evaluate_features_rows_match_direct_computation():
    g = torch.Generator().manual_seed(0)
    qf = {"grn": torch.randn(12, 8, generator=g), "lan": torch.randn(12, 6, generator=g)}
    gf = {"grn": torch.randn(40, 8, generator=g), "lan": torch.randn(40, 6, generator=g)}
    qp, gp = torch.arange(12) % 5, torch.arange(40) % 5
    qc, gc = torch.zeros(12, dtype=torch.long), torch.arange(40) % 3
    res = evaluate_features(qf, gf, qp, gp, qc, gc, rerank=False, alpha=0.5)
    assert list(res) == ["GRN", "LAN", "FMN"]
    d = euclidean_distance(fuse(qf["grn"], qf["lan"]), fuse(gf["grn"], gf["lan"]))
    cmc, mAP, n = evaluate(d, qp, gp, qc, gc)
    assert res["FMN"]["mAP"] == pytest.approx(100 * mAP) and res["FMN"]["rank1"] == pytest.approx(100 * float(cmc[0]))
    assert res["FMN"]["valid_queries"] == n
    assert set(res["GRN"]) == {"rank1", "rank5", "rank10", "rank20", "mAP", "valid_queries"}
    res2 = evaluate_features({"descriptor": qf["grn"]}, {"descriptor": gf["grn"]}, qp, gp, qc, gc, rerank=False)
    assert list(res2) == ["fused"]


def test_rerank_rows():
    pytest.importorskip("fmn_kernels.rerank")
    g = torch.Generator().manual_seed(1)
    qf = {"grn": torch.randn(10, 8, generator=g), "lan": torch.randn(10, 6, generator=g)}
    gf = {"grn": torch.randn(30, 8, generator=g), "lan": torch.randn(30, 6, generator=g)}
    qp, gp = torch.arange(10) % 5, torch.arange(30) % 5
    res = evaluate_features(qf, gf, qp, gp, torch.zeros(10, dtype=torch.long), torch.ones(30, dtype=torch.long))
    assert list(res) == ["GRN", "LAN", "FMN", "GRN+RR", "LAN+RR", "FMN+RR"]


def test_evaluate_model_table_and_json(colour_dataset, tmp_path):
    out = str(tmp_path / "res" / "results.json")
    res = evaluate_model(TwoBranch(), colour_dataset, 16, 8, "cpu", batch_size=4, rerank=False, json_path=out,
                         workers=0, progress=False, verbose=False)
    with open(out) as fh:
        data = json.load(fh)
    assert data["results"] == res and data["num_query"] == 4 and data["alpha"] == 0.5
    assert res["GRN"]["rank1"] == pytest.approx(100.0)     # colour identifies the person here
    table = format_results(res)
    assert table.splitlines()[0].split("|")[0].strip() == "method" and "FMN" in table and "mAP" in table


def test_ranked_list_png(colour_dataset, tmp_path):
    loader_q = make_test_loader(colour_dataset.query, 16, 8, workers=0)
    loader_g = make_test_loader(colour_dataset.gallery, 16, 8, workers=0)
    qf, qp, qc, qpath = extract_features(TwoBranch(), loader_q, "cpu", progress=False)
    gf, gp, gc, gpath = extract_features(TwoBranch(), loader_g, "cpu", progress=False)
    d = euclidean_distance(qf["grn"], gf["grn"])
    out = ranked_list(d, qpath, gpath, qp, gp, qc, gc, str(tmp_path / "r.png"), queries=[0, 2], topk=5,
                      tile_hw=(32, 16), border=2)
    im = np.asarray(Image.open(out).convert("RGB"))
    assert im.shape[1] == (16 + 4) * 6 + 12 + 4 * 6 and im.shape[0] > 2 * 36
    # The first gallery tile of query 0 is its own identity (colour feature): green border.
    x0 = (16 + 4) + 12
    assert tuple(im[0, x0 + 1]) == (20, 170, 40)
    with pytest.raises(ValueError, match="query index 9"):
        ranked_list(d, qpath, gpath, qp, gp, qc, gc, str(tmp_path / "r2.png"), queries=[9])


def _feature_problem(seed, nq=14, ng=45):
    g = torch.Generator().manual_seed(seed)
    qf = {"grn": torch.randn(nq, 8, generator=g) * 3, "lan": torch.randn(nq, 6, generator=g) + 0.5}
    gf = {"grn": torch.randn(ng, 8, generator=g) * 3, "lan": torch.randn(ng, 6, generator=g) + 0.5}
    qp, gp = torch.arange(nq) % 6, torch.arange(ng) % 7        # ids 0 (distractor) .. 6
    qc, gc = torch.arange(nq) % 2, torch.arange(ng) % 3
    return qf, gf, qp, gp, qc, gc


def _hand_descriptors(qf, gf, alpha):
    """Eq. (6) and the per-branch rows, written out in float64 without fmn.evaluator."""
    unit = lambda x: x.double() / x.double().norm(dim=1, keepdim=True)
    return {"GRN": (unit(qf["grn"]), unit(gf["grn"])), "LAN": (unit(qf["lan"]), unit(gf["lan"])),
            "FMN": (torch.cat([alpha * unit(qf["grn"]), (1 - alpha) * unit(qf["lan"])], 1),
                    torch.cat([alpha * unit(gf["grn"]), (1 - alpha) * unit(gf["lan"])], 1))}


def _row(dist, qp, gp, qc, gc):
    cmc, mAP, n = evaluate(dist, qp, gp, qc, gc, max_rank=20)
    return {"rank1": 100 * float(cmc[0]), "rank5": 100 * float(cmc[4]), "rank10": 100 * float(cmc[9]),
            "rank20": 100 * float(cmc[19]), "mAP": 100 * mAP, "valid_queries": n}


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_every_row_matches_direct_computation(alpha):
    qf, gf, qp, gp, qc, gc = _feature_problem(2)
    res = evaluate_features(qf, gf, qp, gp, qc, gc, rerank=False, alpha=alpha)
    hand = _hand_descriptors(qf, gf, alpha)
    assert list(res) == list(hand)
    # The FMN distance is the quadrature sum of the weighted branch distances.
    d = {k: torch.cdist(*v) for k, v in hand.items()}
    assert torch.allclose(d["FMN"] ** 2, alpha ** 2 * d["GRN"] ** 2 + (1 - alpha) ** 2 * d["LAN"] ** 2)
    for name, dist in d.items():
        expect = _row(dist, qp, gp, qc, gc)
        assert res[name] == pytest.approx(expect, abs=1e-9), name
    assert res["FMN"] != res["GRN"] and res["FMN"] != res["LAN"]         # the rows do differ here


def test_rerank_rows_match_direct_computation():
    rr = pytest.importorskip("fmn_kernels.rerank").rerank
    qf, gf, qp, gp, qc, gc = _feature_problem(3)
    res = evaluate_features(qf, gf, qp, gp, qc, gc, rerank=True)
    assert list(res) == ["GRN", "LAN", "FMN", "GRN+RR", "LAN+RR", "FMN+RR"]
    for name, (q, g) in _hand_descriptors(qf, gf, 0.5).items():
        expect = _row(rr(q.float(), g.float(), k1=20, k2=6, lambda_value=0.3), qp, gp, qc, gc)
        assert res[name + "+RR"] == pytest.approx(expect, abs=1e-9), name
    assert res["FMN+RR"] != res["FMN"]


def test_evaluate_features_bad_inputs():
    qf, gf, qp, gp, qc, gc = _feature_problem(4)
    with pytest.raises(ValueError, match="q_pids"):
        evaluate_features(qf, gf, qp[:-1], gp, qc[:-1], gc, rerank=False)
    with pytest.raises(ValueError, match="keys differ"):
        evaluate_features({"grn": qf["grn"]}, gf, qp, gp, qc, gc, rerank=False)
    bad = {k: v.clone() for k, v in qf.items()}
    bad["grn"][3, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_features(bad, gf, qp, gp, qc, gc, rerank=False)
    empty = {k: v[:0] for k, v in qf.items()}
    with pytest.raises(ValueError, match="query set is empty"):
        evaluate_features(empty, gf, qp[:0], gp, qc[:0], gc, rerank=False)


def test_evaluate_model_json_is_strict_and_complete(colour_dataset, tmp_path, capsys):
    out = tmp_path / "results.json"
    res = evaluate_model(TwoBranch(), colour_dataset, 16, 8, "cpu", batch_size=3, rerank=False,
                         json_path=str(out), workers=0, progress=True, verbose=True)
    printed = capsys.readouterr()
    assert "colours: 4 queries, 12 gallery images" in printed.out and "extract" in printed.err

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(out.read_text(), parse_constant=no_constants)
    assert {"dataset", "root", "num_query", "num_gallery", "height", "width", "flip", "alpha", "rerank",
            "seconds", "results"} <= set(data)
    assert data["num_gallery"] == 12 and data["flip"] is True and data["rerank"] is False
    assert list(data["results"]) == ["GRN", "LAN", "FMN"] and data["results"] == res
    for row in data["results"].values():
        assert row["valid_queries"] == 4 and all(0 <= row[k] <= 100 for k in ("rank1", "rank5", "mAP"))


def _random_rows(seed):
    g = torch.Generator().manual_seed(seed)
    qf = {"grn": torch.randn(12, 8, generator=g), "lan": torch.randn(12, 6, generator=g)}
    gf = {"grn": torch.randn(40, 8, generator=g), "lan": torch.randn(40, 6, generator=g)}
    qp, gp = torch.arange(12) % 5, torch.arange(40) % 5
    qc, gc = torch.zeros(12, dtype=torch.long), torch.arange(40) % 3
    return qf, gf, qp, gp, qc, gc


def test_evaluate_features_device_argument_on_cpu():
    args = _random_rows(2)
    assert evaluate_features(*args, rerank=False, device="cpu") == evaluate_features(*args, rerank=False)


@pytest.mark.cuda
def test_evaluate_features_runs_on_the_gpu(monkeypatch):
    """DESIGN §4: distances, metrics and re-ranking on the GPU when the features go there."""
    import fmn.engine.evaluation as ev

    seen = []
    real = ev.euclidean_distance
    monkeypatch.setattr(ev, "euclidean_distance", lambda a, b: seen.append(a.device.type) or real(a, b))
    args = _random_rows(3)
    on_gpu = evaluate_features(*args, rerank=True, device="cuda")
    on_cpu = evaluate_features(*args, rerank=True)
    assert seen[:3] == ["cuda"] * 3 and seen[3:] == ["cpu"] * 3
    for row in on_cpu:
        for key in ("rank1", "rank5", "mAP"):
            assert on_gpu[row][key] == pytest.approx(on_cpu[row][key], abs=1e-6), (row, key)


def test_write_json_strict_and_lenient(tmp_path):
    from fmn.engine.evaluation import write_json

    path = str(tmp_path / "r.json")
    with pytest.raises(ValueError):
        write_json(path, {"mAP": float("nan")})
    assert not list(tmp_path.iterdir())                  # no file, no temporary left behind
    write_json(path, {"mAP": float("nan"), "rank1": 1.0}, strict=False)
    with open(path) as fh:
        back = json.load(fh)
    assert back["rank1"] == 1.0 and back["mAP"] != back["mAP"]
