"""Market-1501, DukeMTMC-reID and CUHK03-NP loaders on small trees in the real naming schemes."""
import os

import numpy as np
import pytest
from PIL import Image

from fmn.data import DatasetError, ImageReadError, build_dataset, make_test_loader


def _img(path, color=(120, 60, 30), size=(8, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = np.full((size[1], size[0], 3), color, np.uint8)
    Image.fromarray(arr).save(path)


def _market_tree(root, extra=()):
    names = {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c3s3_076471_02.jpg",
                               "0007_c12s2_009071_01.jpg", "0011_c1s1_000001_01.jpg"],
        "query": ["0003_c1s1_000301_00.jpg", "0004_c2s1_000401_00.jpg"],
        "bounding_box_test": ["0003_c2s1_000302_01.jpg", "0003_c10s1_000303_01.jpg", "0004_c1s1_000402_01.jpg",
                              "0000_c1s1_000000_01.jpg", "0000_c3s2_000010_02.jpg", "-1_c1s1_000005_01.jpg",
                              "-1_c2s1_000006_01.jpg"],
    }
    for folder, files in names.items():
        for n in files:
            _img(os.path.join(root, folder, n))
    for rel in extra:
        _img(os.path.join(root, rel))
    with open(os.path.join(root, "bounding_box_test", "Thumbs.db"), "w") as f:
        f.write("not an image")
    return root


def test_market1501_parsing(tmp_path):
    root = _market_tree(str(tmp_path / "Market-1501-v15.09.15"))
    ds = build_dataset("market1501", str(tmp_path))            # finds the versioned sub-folder
    assert ds.root == root
    # Train pids 2, 7, 11 relabelled to 0, 1, 2 in ascending order; cameras 0-based.
    assert sorted({p for _, p, _ in ds.train}) == [0, 1, 2]
    assert ds.train_pid_map == {2: 0, 7: 1, 11: 2}
    assert {(os.path.basename(p), c) for p, _, c in ds.train} >= {("0007_c12s2_009071_01.jpg", 11)}
    assert ds.num_train_pids == 3
    # Junk (-1) dropped, distractors (0000) kept, multi-digit camera parsed.
    gal = {os.path.basename(p): (pid, c) for p, pid, c in ds.gallery}
    assert "-1_c1s1_000005_01.jpg" not in gal and len(gal) == 5
    assert gal["0000_c1s1_000000_01.jpg"] == (0, 0)
    assert gal["0003_c10s1_000303_01.jpg"] == (3, 9)
    assert [(pid, c) for _, pid, c in ds.query] == [(3, 0), (4, 1)]
    assert ds.num_cams == 12
    s = ds.summary()
    assert "train" in s and "query" in s and "gallery" in s and "ids" in s and "cameras" in s
    lines = s.splitlines()
    assert any(l.split("|")[0].strip() == "gallery" and l.split("|")[2].strip() == "5" for l in lines)


def test_dukemtmc_and_cuhk03np(tmp_path):
    duke = tmp_path / "duke"
    for folder, n in [("bounding_box_train", "0005_c2_f0046985.jpg"), ("bounding_box_train", "0005_c8_f0046999.jpg"),
                      ("query", "0010_c1_f0000001.jpg"), ("bounding_box_test", "0010_c5_f0000002.jpg"),
                      ("bounding_box_test", "0000_c3_f0000003.jpg")]:
        _img(str(duke / folder / n))
    ds = build_dataset("dukemtmc", str(duke))
    assert [(pid, c) for _, pid, c in ds.train] == [(0, 1), (0, 7)]
    assert sorted((pid, c) for _, pid, c in ds.gallery) == [(0, 2), (10, 4)]

    np_root = tmp_path / "cuhk03-np"
    for kind in ("labeled", "detected"):
        for folder, n in [("bounding_box_train", "0001_c1_1.png"), ("bounding_box_train", "0001_c2_2.png"),
                          ("query", "0100_c1_1.png"), ("bounding_box_test", "0100_c2_3.png")]:
            _img(str(np_root / kind / folder / n))
    lab = build_dataset("cuhk03", str(tmp_path), labeled=True)
    det = build_dataset("cuhk03", str(np_root), labeled=False, layout="np")
    assert lab.name == "cuhk03_labeled" and det.name == "cuhk03_detected"
    assert "labeled" in lab.train[0][0] and "detected" in det.train[0][0]
    assert [(pid, c) for _, pid, c in lab.query] == [(100, 0)]


def test_missing_folder_names_it(tmp_path):
    root = _market_tree(str(tmp_path / "m"))
    os.rename(os.path.join(root, "query"), os.path.join(root, "query_old"))
    with pytest.raises(DatasetError, match=r"query: folder not found"):
        build_dataset("market1501", root)
    with pytest.raises(DatasetError, match="dataset folder not found"):
        build_dataset("market1501", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="no Market-style layout"):
        build_dataset("market1501", str(tmp_path))


def test_unparsable_name_names_the_file(tmp_path):
    root = _market_tree(str(tmp_path / "m"), extra=["bounding_box_train/person_12.jpg"])
    with pytest.raises(DatasetError, match=r"person_12\.jpg: cannot parse"):
        build_dataset("market1501", root)
    # A Duke name is not a Market name.
    root2 = _market_tree(str(tmp_path / "m2"), extra=["query/0003_c1_f0000001.jpg"])
    with pytest.raises(DatasetError, match=r"0003_c1_f0000001\.jpg"):
        build_dataset("market1501", root2)


def test_empty_query_set(tmp_path):
    root = _market_tree(str(tmp_path / "m"))
    for n in os.listdir(os.path.join(root, "query")):
        os.remove(os.path.join(root, "query", n))
    with pytest.raises(DatasetError, match=r"query: no images found"):
        build_dataset("market1501", root)


def test_query_identity_missing_from_gallery(tmp_path):
    root = _market_tree(str(tmp_path / "m"), extra=["query/0099_c1s1_000001_00.jpg"])
    with pytest.raises(DatasetError, match=r"0099_c1s1_000001_00\.jpg: query identity 99 has no image in the gallery"):
        build_dataset("market1501", root)
    ds = build_dataset("market1501", root, check_query_in_gallery=False)
    assert len(ds.query) == 3


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    root = _market_tree(str(tmp_path / "m"))
    bad = os.path.join(root, "bounding_box_test", "0003_c2s1_000302_01.jpg")
    with open(bad, "wb") as f:
        f.write(b"this is not a jpeg")
    with pytest.raises(ImageReadError, match=r"0003_c2s1_000302_01\.jpg: cannot decode image"):
        build_dataset("market1501", root, verify_images=True)
    ds = build_dataset("market1501", root)                 # names only: loads
    with pytest.raises(ImageReadError, match=r"0003_c2s1_000302_01\.jpg"):
        for _ in make_test_loader(ds.gallery, 16, 8, workers=0):
            pass
    # Truncated: a real JPEG cut in half.
    trunc = os.path.join(root, "query", "0004_c2s1_000401_00.jpg")
    big = np.random.default_rng(0).integers(0, 255, (64, 32, 3), dtype=np.uint8)
    Image.fromarray(big).save(trunc, quality=95)
    with open(trunc, "rb") as f:
        data = f.read()
    with open(trunc, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"0004_c2s1_000401_00\.jpg"):
        for _ in make_test_loader(ds.query, 16, 8, workers=0):
            pass


def test_unknown_dataset_name_lists_names(tmp_path):
    with pytest.raises(ValueError, match="market1501.*synthetic|choose one of"):
        build_dataset("viper", str(tmp_path))
