"""Datasets of query and gallery only (evaluating a model trained on another dataset): a CSV
without train rows, a folder tree without train/, a Market layout without bounding_box_train/
load with an empty train split; training on them is refused by ReIDDataset.require_train."""
import os

import numpy as np
import pytest
from PIL import Image

from fmn.data import DatasetError, build_dataset, make_test_loader


def _img(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((16, 8, 3), 90, np.uint8)).save(path)


def _check_eval_only(ds, n_query, n_gallery):
    assert ds.train == [] and ds.num_train_pids == 0 and ds.num_train_imgs == 0 and ds.train_pid_map == {}
    assert len(ds.query) == n_query and len(ds.gallery) == n_gallery
    assert ds.num_cams >= 2
    assert [line.split("|")[2].strip() for line in ds.summary().splitlines()[3:]] == ["0", str(n_query),
                                                                                     str(n_gallery)]
    with pytest.raises(DatasetError, match=r"has no training images; training needs a train split"):
        ds.require_train()
    loader = make_test_loader(ds.query + ds.gallery, 16, 8, batch_size=4, workers=0, progress=False)
    assert sum(len(batch["img"]) for batch in loader) == n_query + n_gallery


def test_csv_without_train_rows(tmp_path):
    rows = [("q1.jpg", 3, 0, "query"), ("g1.jpg", 3, 1, "gallery"), ("g2.jpg", 0, 1, "gallery")]
    for rel, *_ in rows:
        _img(str(tmp_path / rel))
    csv_path = tmp_path / "target.csv"
    csv_path.write_text("path,pid,camid,split\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    _check_eval_only(build_dataset("custom", str(csv_path)), 1, 2)
    csv_path.write_text("q1.jpg,3,0,query\n")
    with pytest.raises(DatasetError, match=r"target\.csv: no rows for the gallery split"):
        build_dataset("custom", str(csv_path))
    csv_path.write_text("g1.jpg,3,1,gallery\n")
    with pytest.raises(DatasetError, match=r"target\.csv: no rows for the query split"):
        build_dataset("custom", str(csv_path))


@pytest.mark.parametrize("train", ["absent", "empty"])
def test_folder_tree_without_train(tmp_path, train):
    root = tmp_path / "tree"
    for rel in ["query/carol/q_c1_1.jpg", "gallery/carol/g_c2_1.jpg", "gallery/dave/d_c2_2.jpg"]:
        _img(str(root / rel))
    if train == "empty":
        (root / "train").mkdir()
    _check_eval_only(build_dataset("custom", str(root)), 1, 2)
    os.rename(root / "gallery", root / "elsewhere")
    with pytest.raises(DatasetError, match=r"gallery: folder not found"):
        build_dataset("custom", str(root))


@pytest.mark.parametrize("train", ["absent", "empty", "junk only"])
def test_market_layout_without_bounding_box_train(tmp_path, train):
    root = tmp_path / "Market-1501-v15.09.15"
    for rel in ["query/0003_c1s1_000301_00.jpg", "bounding_box_test/0003_c2s1_000302_01.jpg",
                "bounding_box_test/0000_c1s1_000000_01.jpg"]:
        _img(str(root / rel))
    if train == "empty":
        (root / "bounding_box_train").mkdir()
    elif train == "junk only":
        _img(str(root / "bounding_box_train" / "-1_c1s1_000005_01.jpg"))
    _check_eval_only(build_dataset("market1501", str(tmp_path)), 1, 2)
    for name in os.listdir(root / "query"):
        os.remove(root / "query" / name)
    with pytest.raises(DatasetError, match=r"query: no images found"):
        build_dataset("market1501", str(tmp_path))
    os.rmdir(root / "query")
    with pytest.raises(DatasetError, match=r"query: folder not found"):
        build_dataset("market1501", str(tmp_path))


def test_require_train_passes_with_training_images(tmp_path):
    for rel in ["train/a/1.jpg", "query/b/q_c1_1.jpg", "gallery/b/g_c2_1.jpg"]:
        _img(str(tmp_path / rel))
    build_dataset("custom", str(tmp_path)).require_train()
