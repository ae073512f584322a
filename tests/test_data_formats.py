"""CUHK03 (original release + new-protocol .mat), MSMT17 list files, custom CSV and folder tree."""
import os

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from fmn.data import DatasetError, build_dataset


def _img(path, size=(8, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)


def _cuhk03_mat_tree(root, kind="labeled"):
    # 3 identities: 1 (train), 2 and 3 (test). Names as in the new-protocol filelist.
    files = ["1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "1_002_2_07.png", "1_003_1_02.png",
             "1_003_2_06.png", "1_003_2_07.png"]
    labels = [1, 1, 2, 2, 3, 3, 3]
    cams = [1, 2, 1, 2, 1, 2, 2]
    for f in files:
        _img(os.path.join(root, f"images_{kind}", f))
    filelist = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        filelist[i, 0] = np.array([f])
    savemat(os.path.join(root, f"cuhk03_new_protocol_config_{kind}.mat"), {
        "filelist": filelist, "labels": np.array(labels)[:, None], "camId": np.array(cams)[:, None],
        "train_idx": np.array([1, 2])[:, None], "query_idx": np.array([3, 5])[:, None],
        "gallery_idx": np.array([4, 6, 7])[:, None]})
    return root


def test_cuhk03_mat_layout(tmp_path):
    root = _cuhk03_mat_tree(str(tmp_path))
    ds = build_dataset("cuhk03", root, labeled=True)               # layout detected: mat
    assert ds.name == "cuhk03_labeled"
    assert [(os.path.basename(p), pid, c) for p, pid, c in ds.train] == [("1_001_1_01.png", 0, 0),
                                                                        ("1_001_2_06.png", 0, 1)]
    assert [(pid, c) for _, pid, c in ds.query] == [(2, 0), (3, 0)]
    assert [(pid, c) for _, pid, c in ds.gallery] == [(2, 1), (3, 1), (3, 1)]
    with pytest.raises(DatasetError, match="no CUHK03 detected data"):
        build_dataset("cuhk03", root, labeled=False)


def test_cuhk03_mat_errors(tmp_path):
    root = _cuhk03_mat_tree(str(tmp_path))
    os.remove(os.path.join(root, "images_labeled", "1_003_2_07.png"))
    with pytest.raises(DatasetError, match=r"1_003_2_07\.png: image listed in cuhk03_new_protocol_config_labeled"):
        build_dataset("cuhk03", root, layout="mat")
    with open(os.path.join(root, "cuhk03_new_protocol_config_labeled.mat"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(DatasetError, match=r"cuhk03_new_protocol_config_labeled\.mat: cannot read"):
        build_dataset("cuhk03", root)


def _msmt_tree(root):
    base = os.path.join(root, "MSMT17_V1")
    lists = {
        "list_train.txt": ("train", [("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                                     ("0000/0000_001_12_0303morning_0016_0.jpg", 0),
                                     ("0003/0003_000_05_0303noon_0020_1.jpg", 3)]),
        "list_val.txt": ("train", [("0007/0007_000_02_0303noon_0001_0.jpg", 7)]),
        "list_query.txt": ("test", [("0001/0001_000_03_0113morning_0010_0.jpg", 1)]),
        "list_gallery.txt": ("test", [("0001/0001_005_15_0113morning_0011_0.jpg", 1),
                                      ("0002/0002_000_04_0113noon_0001_0.jpg", 2)]),
    }
    os.makedirs(base, exist_ok=True)
    for lst, (sub, rows) in lists.items():
        with open(os.path.join(base, lst), "w") as f:
            for rel, pid in rows:
                _img(os.path.join(base, sub, rel))
                f.write(f"{rel} {pid}\n")
    return root


def test_msmt17_lists(tmp_path):
    root = _msmt_tree(str(tmp_path))
    ds = build_dataset("msmt17", root)
    assert len(ds.train) == 4 and ds.num_train_pids == 3          # val merged into train
    assert sorted(c for _, _, c in ds.train) == [0, 1, 4, 11]      # camera 12 -> 11
    assert [(pid, c) for _, pid, c in ds.gallery] == [(1, 14), (2, 3)]
    assert len(build_dataset("msmt17", root, use_val=False).train) == 3
    with open(os.path.join(root, "MSMT17_V1", "list_query.txt"), "a") as f:
        f.write("0001/badname.jpg 1\n")
    with pytest.raises(DatasetError, match=r"list_query\.txt:2: cannot parse the camera"):
        build_dataset("msmt17", root)


def test_custom_csv(tmp_path):
    rows = [("img/a1.jpg", 5, 0, "train"), ("img/a2.jpg", 5, 1, "train"), ("img/b1.jpg", 9, 0, "train"),
            ("img/q.jpg", 20, 0, "query"), ("img/g.jpg", 20, 1, "gallery"), ("img/j.jpg", -1, 1, "gallery")]
    for rel, *_ in rows:
        _img(str(tmp_path / rel))
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("path,pid,camid,split\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    ds = build_dataset("custom", str(csv_path))
    assert [(pid, c) for _, pid, c in ds.train] == [(0, 0), (0, 1), (1, 0)]
    assert [(pid, c) for _, pid, c in ds.gallery] == [(20, 1)]      # -1 dropped
    assert ds.query[0][0] == str(tmp_path / "img" / "q.jpg")
    csv_path.write_text(csv_path.read_text() + "img/x.jpg,3,0,validation\n")
    with pytest.raises(DatasetError, match=r"data\.csv:8: split must be"):
        build_dataset("custom", str(csv_path))
    csv_path.write_text("img/missing.jpg,1,0,train\n")
    with pytest.raises(DatasetError, match=r"missing\.jpg: image listed in"):
        build_dataset("custom", str(csv_path))


def test_custom_folder_tree(tmp_path):
    for rel in ["train/alice/1.jpg", "train/alice/2.jpg", "train/bob/1.jpg", "query/carol/q_c2_1.jpg",
                "gallery/carol/g_c1_1.jpg", "gallery/carol/g2.jpg", "gallery/dave/d.jpg"]:
        _img(str(tmp_path / "tree" / rel))
    ds = build_dataset("custom", str(tmp_path / "tree"))
    assert ds.num_train_pids == 2
    # Names sorted: alice=1, bob=2, carol=3, dave=4. Camera from c<digits>, else query 0 / gallery 1.
    assert [(pid, c) for _, pid, c in ds.query] == [(3, 1)]
    assert sorted((pid, c) for _, pid, c in ds.gallery) == [(3, 0), (3, 1), (4, 1)]
    os.remove(str(tmp_path / "tree" / "query" / "carol" / "q_c2_1.jpg"))
    with pytest.raises(DatasetError, match=r"query: no images found"):
        build_dataset("custom", str(tmp_path / "tree"))
    with pytest.raises(DatasetError, match="not found"):
        build_dataset("custom", str(tmp_path / "nothing"))


def test_cuhk03_original_release_extraction(tmp_path):
    h5py = pytest.importorskip("h5py")
    root = str(tmp_path)
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "cuhk03_release"))
    written = {}
    with h5py.File(os.path.join(root, "cuhk03_release", "cuhk-03.mat"), "w") as f:
        g = f.create_group("#refs#")
        for kind in ("labeled", "detected"):
            pair_refs = []
            for pair in range(2):
                cells = np.empty((10, 2), dtype=h5py.ref_dtype)          # stored (slots, persons)
                for person in range(2):
                    for slot in range(10):
                        name = f"{kind}_{pair}_{person}_{slot}"
                        if slot in (3, 9):                             # empty slots
                            ds = g.create_dataset(name, data=np.zeros(2, np.uint64))
                        else:
                            img = rng.integers(0, 255, (12, 6, 3), dtype=np.uint8)
                            ds = g.create_dataset(name, data=img.T)
                            written[(kind, f"{pair + 1}_{person + 1:03d}_{1 if slot < 5 else 2}_{slot + 1:02d}.png")] = img
                        cells[slot, person] = ds.ref
                pair_refs.append(g.create_dataset(f"{kind}_pair{pair}", data=cells).ref)
            f.create_dataset(kind, data=np.array([pair_refs], dtype=h5py.ref_dtype))
    files = ["1_001_1_01.png", "1_001_2_06.png", "1_002_1_01.png", "1_002_2_07.png", "2_001_1_02.png", "2_001_2_08.png"]
    filelist = np.empty((len(files), 1), dtype=object)
    for i, n in enumerate(files):
        filelist[i, 0] = np.array([n])
    savemat(os.path.join(root, "cuhk03_new_protocol_config_detected.mat"), {
        "filelist": filelist, "labels": np.array([1, 1, 2, 2, 3, 3])[:, None], "camId": np.array([1, 2] * 3)[:, None],
        "train_idx": np.array([1, 2])[:, None], "query_idx": np.array([3, 5])[:, None],
        "gallery_idx": np.array([4, 6])[:, None]})
    ds = build_dataset("cuhk03", root, labeled=False)
    assert os.path.isdir(os.path.join(root, "images_detected")) and not os.path.isdir(os.path.join(root, "images_labeled"))
    assert len(os.listdir(os.path.join(root, "images_detected"))) == 2 * 2 * 8
    for path, _, _ in ds.train + ds.query + ds.gallery:
        ref = written[("detected", os.path.basename(path))]
        assert np.array_equal(np.asarray(Image.open(path)), ref)


def test_cuhk03_mat_without_the_split_fields_names_them(tmp_path):
    root = _cuhk03_mat_tree(str(tmp_path))
    mat_path = os.path.join(root, "cuhk03_new_protocol_config_labeled.mat")
    # e.g. the original cuhk-03.mat's fields saved under the split file's name
    savemat(mat_path, {"labels": np.array([[1]]), "train_idx": np.array([[1]]), "testsets": np.zeros((1, 2))})
    with pytest.raises(DatasetError, match=r"cuhk03_new_protocol_config_labeled\.mat: missing field\(s\) "
                                           r"filelist, camId, query_idx, gallery_idx; expected filelist, labels"):
        build_dataset("cuhk03", root)


def test_unknown_dataset_option_is_a_clear_error(tmp_path):
    from fmn.data import DatasetError, build_dataset

    with pytest.raises(DatasetError, match=r"market1501: unknown dataset option 'foo' \(data.options\)"):
        build_dataset("market1501", str(tmp_path), foo=1)
