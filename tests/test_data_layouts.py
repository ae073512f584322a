"""Real-world layout details: archive top folders, macOS/Windows side files, upper-case and BMP
extensions, the torchreid folder layout, spreadsheet CSVs, and the protocol's junk/distractor
handling seen through fmn.metrics."""
import os

import numpy as np
import pytest
from PIL import Image

from fmn.data import DatasetError, build_dataset
from fmn.metrics import evaluate

# What a Mac writes beside every file it archives ("._<name>", an AppleDouble resource fork).
APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64


def _img(path, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((16, 8, 3), 80, np.uint8)).save(path, format=fmt)


def _junk_file(path, data=APPLEDOUBLE):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _market(top, side_files=True):
    files = {
        "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.JPG", "0007_c3s3_076471_02.jpg"],
        "query": ["0003_c1s1_000301_00.jpg"],
        "bounding_box_test": ["0000_c3s1_000000_01.jpg", "0003_c1s1_000302_01.jpg", "0003_c2s1_000303_01.jpg",
                              "-1_c2s1_000005_01.jpg"],
    }
    for folder, names in files.items():
        for n in names:
            _img(os.path.join(top, folder, n), fmt="JPEG")
            if side_files:
                _junk_file(os.path.join(top, folder, "._" + n))
        _junk_file(os.path.join(top, folder, "Thumbs.db"), b"\xd0\xcf\x11\xe0 not an image")
        if side_files:
            _junk_file(os.path.join(top, folder, ".DS_Store"), b"\x00\x00\x00\x01Bud1")
    _junk_file(os.path.join(top, "readme.txt"), b"Market-1501")
    _img(os.path.join(top, "gt_bbox", "0001_c1s1_001051_00.jpg"))          # not a split folder: ignored
    return top


def test_market_archive_with_side_files(tmp_path):
    top = _market(str(tmp_path / "Market-1501-v15.09.15"))
    _img(os.path.join(top, "bounding_box_train", "0007_c6s1_000001_01.bmp"), fmt="BMP")
    ds = build_dataset("market1501", str(tmp_path))
    assert ds.root == top
    # Side files (._*, Thumbs.db, .DS_Store) skipped; .JPG and .bmp are images; pids 2, 7 -> 0, 1.
    assert [(os.path.basename(p), pid, c) for p, pid, c in ds.train] == [
        ("0002_c1s1_000451_03.jpg", 0, 0), ("0002_c2s1_000551_01.JPG", 0, 1),
        ("0007_c3s3_076471_02.jpg", 1, 2), ("0007_c6s1_000001_01.bmp", 1, 5)]
    assert ds.train_pid_map == {2: 0, 7: 1}
    assert [(pid, c) for _, pid, c in ds.query] == [(3, 0)]
    assert [(pid, c) for _, pid, c in ds.gallery] == [(0, 2), (3, 0), (3, 1)]     # junk -1 dropped
    assert ds.num_cams == 6
    rows = {l.split("|")[0].strip(): [int(v) for v in l.split("|")[1:]] for l in ds.summary().splitlines()[3:]}
    assert rows == {"train": [2, 4, 4], "query": [1, 1, 1], "gallery": [2, 3, 3]}


def test_market_protocol_through_metrics(tmp_path):
    """The loaded ids drive fmn.metrics as the standard protocol says: the same-camera image of
    the query's identity is ignored, the distractor (0000) is a wrong match, junk never appears."""
    ds = build_dataset("market1501", _market(str(tmp_path / "m"), side_files=False))
    dist_by_name = {"0000_c3s1_000000_01.jpg": 0.1, "0003_c1s1_000302_01.jpg": 0.0, "0003_c2s1_000303_01.jpg": 0.5}
    dist = np.array([[dist_by_name[os.path.basename(p)] for p, _, _ in ds.gallery]])
    cmc, mAP, valid = evaluate(dist, [p for _, p, _ in ds.query], [p for _, p, _ in ds.gallery],
                               [c for _, _, c in ds.query], [c for _, _, c in ds.gallery], max_rank=3)
    # Filtered ranking: distractor (wrong), then the cross-camera match at rank 2.
    assert valid == 1 and cmc.tolist() == [0.0, 1.0, 1.0] and mAP == pytest.approx(0.5)


def test_market_torchreid_layout(tmp_path):
    top = _market(str(tmp_path / "market1501" / "Market-1501-v15.09.15"))
    assert build_dataset("market1501", str(tmp_path)).root == top


def test_split_folder_entry_named_like_an_image_is_not_an_image(tmp_path):
    top = _market(str(tmp_path / "m"), side_files=False)
    os.makedirs(os.path.join(top, "query", "0003_c2s1_000009_00.jpg"))    # a folder, not a file
    assert [os.path.basename(p) for p, _, _ in build_dataset("market1501", top).query] == ["0003_c1s1_000301_00.jpg"]


def test_msmt17_v2_torchreid_layout_and_real_identity_zero(tmp_path):
    base = tmp_path / "msmt17" / "MSMT17_V2"
    lists = {
        "list_train.txt": ("mask_train_v2", [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                             ("0000/0000_001_12_0303morning_0016_0.jpg", 0)]),
        "list_val.txt": ("mask_train_v2", [("0004/0004_000_02_0303noon_0001_0.jpg", 4)]),
        "list_query.txt": ("mask_test_v2", [("0000/0000_000_03_0113morning_0010_0.jpg", 0)]),
        "list_gallery.txt": ("mask_test_v2", [("0000/0000_005_15_0113morning_0011_0.jpg", 0),
                                              ("0001/0001_000_04_0113noon_0001_0.JPG", 1)]),
    }
    for name, (sub, rows) in lists.items():
        for rel, _ in rows:
            _img(str(base / sub / rel), fmt="JPEG")
        (base / name).write_bytes("".join(f"{rel} {pid}\r\n" for rel, pid in rows).encode())   # CRLF lines
    ds = build_dataset("msmt17", str(tmp_path))
    assert ds.root == str(base)
    assert [(pid, c) for _, pid, c in ds.train] == [(0, 0), (0, 11), (1, 1)]
    # In MSMT17 the test identities start at 0: identity 0 is a real person, not a distractor.
    assert [(pid, c) for _, pid, c in ds.query] == [(0, 2)]
    assert [(pid, c) for _, pid, c in ds.gallery] == [(0, 14), (1, 3)]
    assert ds.query[0][0] == str(base / "mask_test_v2" / "0000" / "0000_000_03_0113morning_0010_0.jpg")


def _csv_rows(tmp_path):
    rows = [("img/a1.jpg", 5, 0, "train"), ("img/a2.jpg", 5, 1, "train"), ("img/b1.jpg", 9, 0, "train"),
            ("img/q.jpg", 20, 0, "query"), ("img/g.jpg", 20, 1, "gallery")]
    for rel, *_ in rows:
        _img(str(tmp_path / rel), fmt="JPEG")
    return "path,pid,camid,split\r\n" + "".join(",".join(map(str, r)) + "\r\n" for r in rows)


def test_custom_csv_saved_by_a_spreadsheet(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; the header must still be recognised."""
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _csv_rows(tmp_path).encode())
    ds = build_dataset("custom", str(path))
    assert [(os.path.basename(p), pid, c) for p, pid, c in ds.train] == [("a1.jpg", 0, 0), ("a2.jpg", 0, 1),
                                                                        ("b1.jpg", 1, 0)]
    assert ds.train_pid_map == {5: 0, 9: 1}
    assert [(pid, c) for _, pid, c in ds.query + ds.gallery] == [(20, 0), (20, 1)]


def test_custom_csv_not_text_names_the_file(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(_csv_rows(tmp_path).replace("img/q.jpg", "img/q\xe9.jpg").encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.csv: not a UTF-8 text file"):
        build_dataset("custom", str(latin1))
    image = tmp_path / "img" / "q.jpg"                     # an image given where the CSV was expected
    with pytest.raises(DatasetError, match=r"q\.jpg: not a UTF-8 text file.*path,pid,camid,split"):
        build_dataset("custom", str(image))


def test_custom_tree_skips_hidden_entries_and_reads_both_camera_styles(tmp_path):
    root = tmp_path / "tree"
    for rel in ["train/0001/0001_c1s1_000001_01.jpg", "train/0001/0001_c2s1_000002_01.JPG",
                "train/0007/0007_c3_f0000001.png", "query/0010/0010_c2s1_000001_01.jpg",
                "gallery/0010/0010_c3_f0000002.jpg", "gallery/0010/noc.jpg"]:
        _img(str(root / rel))
    _junk_file(str(root / "train" / "0001" / "._0001_c1s1_000001_01.jpg"))
    _junk_file(str(root / "train" / "0001" / "Thumbs.db"))
    _img(str(root / "train" / ".ipynb_checkpoints" / "0001_c1s1_000001_01-checkpoint.jpg"))
    os.makedirs(str(root / "gallery" / ".hidden"))
    ds = build_dataset("custom", str(root))
    # Numeric identity folders keep their numbers (hidden folders are not identities).
    assert ds.train_pid_map == {1: 0, 7: 1}
    assert [(os.path.basename(p), pid, c) for p, pid, c in ds.train] == [
        ("0001_c1s1_000001_01.jpg", 0, 0), ("0001_c2s1_000002_01.JPG", 0, 1), ("0007_c3_f0000001.png", 1, 2)]
    # Market-style c2s1 and Duke-style _c3_ tokens; no token: gallery camera 1.
    assert [(pid, c) for _, pid, c in ds.query] == [(10, 1)]
    assert [(os.path.basename(p), pid, c) for p, pid, c in ds.gallery] == [("0010_c3_f0000002.jpg", 10, 2),
                                                                          ("noc.jpg", 10, 1)]



@pytest.mark.parametrize("names", [("0001", "0007"), ("alice", "bob")])
def test_custom_tree_with_parts_files_in_their_default_place(tmp_path, names):
    # save_parts puts a tree's masks in <root>/<split>/parts/<identity>/: the reader must neither
    # refuse that folder nor count it as an identity (which renumbers every pid of a named tree).
    from fmn.data.masks import load_parts, parts_paths, save_parts
    from fmn.data.parts import check_parts

    root = tmp_path / "tree"
    a, b = names
    for rel in [f"train/{a}/x_c1_0.png", f"train/{b}/y_c2_0.png", f"query/{a}/q_c1_0.png",
                f"gallery/{a}/g_c2_0.png", f"gallery/{b}/h_c1_0.png"]:
        _img(str(root / rel))
    before = build_dataset("custom", str(root))
    kp = np.zeros((17, 3), np.float32)
    for path, _, _ in before.train:
        mask_path, _ = save_parts(path, np.ones((16, 8), np.uint8), kp)
        assert mask_path.startswith(str(root / "train" / "parts") + os.sep)
    ds = build_dataset("custom", str(root))
    assert ds.train == before.train and ds.query == before.query and ds.gallery == before.gallery
    assert ds.train_pid_map == before.train_pid_map
    check_parts(ds.train)
    mask, _ = load_parts(ds.train[0][0])
    assert mask.shape == (16, 8) and int(mask.max()) == 1
    # The missing-files message describes where the reader looked.
    with pytest.raises(DatasetError, match=r"<dir>/parts/<folder>/<stem>\.png") as err:
        check_parts(ds.query)
    assert parts_paths(ds.query[0][0])[0] in str(err.value)
