"""Dataset loaders on bad input: files in a split or identity folder that are not images must be
an error naming the file (an image in a format the loaders do not read would otherwise vanish
from the dataset), while the system files real archives carry are ignored."""
import os

import numpy as np
import pytest
from PIL import Image

from fmn.data import DatasetError, build_dataset


def _img(path, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((16, 8, 3), 70, np.uint8)).save(path, format=fmt)


def _write(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _market(top):
    for rel in ["bounding_box_train/0002_c1s1_000451_03.jpg", "bounding_box_train/0002_c2s1_000551_01.jpg",
                "query/0003_c1s1_000301_00.jpg", "bounding_box_test/0003_c2s1_000302_01.jpg",
                "bounding_box_test/0000_c3s1_000000_01.jpg"]:
        _img(os.path.join(top, rel))
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        _write(os.path.join(top, folder, "Thumbs.db"), b"\xd0\xcf\x11\xe0")
        _write(os.path.join(top, folder, "desktop.ini"), b"[.ShellClassInfo]")
        _write(os.path.join(top, folder, ".DS_Store"), b"\x00\x00\x00\x01Bud1")
    return top


@pytest.mark.parametrize("name,fmt", [("0003_c3s1_000304_01.webp", "WEBP"), ("0003_c3s1_000304_01.gif", "GIF"),
                                      ("notes.txt", None)])
def test_market_file_that_is_not_an_image_is_named(tmp_path, name, fmt):
    top = _market(str(tmp_path / "m"))
    assert len(build_dataset("market1501", top).gallery) == 2          # system files alone: fine
    path = os.path.join(top, "bounding_box_test", name)
    if fmt:
        _img(path, fmt=fmt)
    else:
        _write(path, b"camera 3 was recalibrated")
    with pytest.raises(DatasetError, match=rf"bounding_box_test/{name}: not an image file; expected only "
                                           r"images named like 0002_c1s1_000451_03\.jpg.*\.jpg, \.jpeg, \.png, \.bmp"):
        build_dataset("market1501", top)


def test_duke_and_cuhk03np_split_folders_get_the_same_check(tmp_path):
    duke = str(tmp_path / "duke")
    for rel in ["bounding_box_train/0005_c2_f0046985.jpg", "query/0010_c1_f0000001.jpg",
                "bounding_box_test/0010_c5_f0000002.jpg"]:
        _img(os.path.join(duke, rel))
    _write(os.path.join(duke, "query", "0010_c1_f0000003.jpg.part"))       # an interrupted copy
    with pytest.raises(DatasetError, match=r"query/0010_c1_f0000003\.jpg\.part: not an image file"):
        build_dataset("dukemtmc", duke)
    np_root = str(tmp_path / "cuhk03-np" / "labeled")
    for rel in ["bounding_box_train/0001_c1_1.png", "query/0100_c1_1.png", "bounding_box_test/0100_c2_3.png"]:
        _img(os.path.join(np_root, rel))
    _write(os.path.join(np_root, "bounding_box_train", "0001_c2_2.tif"))
    with pytest.raises(DatasetError, match=r"0001_c2_2\.tif: not an image file"):
        build_dataset("cuhk03", str(tmp_path), labeled=True)


def _tree(root):
    for rel in ["train/0001/0001_c1_a.jpg", "train/0001/0001_c2_b.jpg", "train/0002/0002_c1_a.jpg",
                "query/0010/0010_c1_a.jpg", "gallery/0010/0010_c2_a.jpg"]:
        _img(os.path.join(root, rel))
    _write(os.path.join(root, "train", "0001", "Thumbs.db"))
    _write(os.path.join(root, "train", "Thumbs.db"))
    _write(os.path.join(root, "gallery", ".DS_Store"))
    return root


def test_custom_tree_non_image_file_in_identity_folder_is_named(tmp_path):
    root = _tree(str(tmp_path / "tree"))
    assert len(build_dataset("custom", root).train) == 3
    _img(os.path.join(root, "gallery", "0010", "0010_c3_b.webp"), fmt="WEBP")
    with pytest.raises(DatasetError, match=r"gallery/0010/0010_c3_b\.webp: not an image file; expected only "
                                           r"images in the identity folder .*gallery/0010"):
        build_dataset("custom", root)


def test_custom_tree_stray_file_in_split_folder_is_named(tmp_path):
    root = _tree(str(tmp_path / "tree"))
    _write(os.path.join(root, "train", "labels.csv"), b"path,pid\n")
    with pytest.raises(DatasetError, match=r"train/labels\.csv: file directly under .*train; expected only "
                                           r"identity folders"):
        build_dataset("custom", root)


def test_custom_tree_nested_folder_in_identity_folder_is_named(tmp_path):
    # e.g. images sorted by camera inside each identity: they must not silently disappear.
    root = _tree(str(tmp_path / "tree"))
    _img(os.path.join(root, "train", "0002", "cam2", "0002_c2_b.jpg"))
    with pytest.raises(DatasetError, match=r"train/0002/cam2: folder inside the identity folder"):
        build_dataset("custom", root)
    os.rename(os.path.join(root, "train", "0002", "cam2"), os.path.join(root, "train", "0002", ".ipynb_checkpoints"))
    assert [pid for _, pid, _ in build_dataset("custom", root).train] == [0, 0, 1]     # hidden: ignored
