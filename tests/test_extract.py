"""fmn extract: the rows of fmn.extract_features for a folder, a text list or a CSV, in the order
of <out>.images.json, as .pt or .npy, read by fmn rerank; unreadable images listed in one error or
skipped and reported; outputs never replace an input, nor an existing file without --force."""
import json
import os

import numpy as np
import pytest
import torch

import fmn
from fmn.cli import main
from tests.test_cli_errors import one_error

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture
def images(data, tmp_path):
    """A folder of 7 query images of the synthetic set, copied under new names."""
    folder = tmp_path / "images"
    folder.mkdir()
    src = sorted(os.listdir(os.path.join(data, "query")))[:7]
    for i, name in enumerate(src):
        with open(os.path.join(data, "query", name), "rb") as f:
            (folder / f"{6 - i:02d}_{name}").write_bytes(f.read())
    return folder


def rows(path):
    return torch.load(path, weights_only=True) if str(path).endswith(".pt") else torch.from_numpy(np.load(path))


def listed(out):
    return json.loads((out.parent / (out.stem + ".images.json")).read_text())


def test_a_folder_gives_the_rows_of_extract_features_in_the_order_of_images_json(trained, images, tmp_path, capsys):
    out = tmp_path / "feats" / "g.pt"
    assert main(["extract", "--checkpoint", trained[2], "--images", str(images), "--out", str(out),
                 "--batch-size", "3", "--device", "cpu"]) == 0
    assert capsys.readouterr().err == ""   # no progress bar when stderr is not a terminal
    paths = listed(out)["images"]
    assert paths == sorted(str(p) for p in images.iterdir())
    feats = rows(out)
    model = fmn.load_model(trained[2], device="cpu")
    want = fmn.extract_features(model, paths, batch_size=3)
    assert feats.dtype == torch.float32 and feats.shape == (7, want.shape[1]) and torch.equal(feats, want)
    # FMN's eq. (6) descriptor of 2 x 256 channels (resnet18 at base width 8): each half has norm 1/2
    torch.testing.assert_close(feats[:, :feats.shape[1] // 2].norm(dim=1), torch.full((7,), 0.5))


def test_a_list_file_and_a_csv_give_their_order_as_npy(trained, images, tmp_path):
    names = sorted(p.name for p in images.iterdir())
    order = [names[i] for i in (4, 0, 6, 2)]
    text = tmp_path / "list.txt"
    text.write_text("# four images\n" + "\n".join(f"images/{n}" for n in order[:2]) + "\n\n"
                    + "\n".join(str(images / n) for n in order[2:]) + "\n")
    table = tmp_path / "list.csv"
    table.write_text("pid,path\n" + "".join(f"{i},images/{n}\n" for i, n in enumerate(order)))
    model = fmn.load_model(trained[2], device="cpu")
    want = fmn.extract_features(model, [str(images / n) for n in order])
    for spec, out in ((text, tmp_path / "a.npy"), (table, tmp_path / "b.npy")):
        assert main(["extract", "--checkpoint", trained[2], "--images", str(spec), "--out", str(out)]) == 0
        assert [os.path.basename(p) for p in listed(out)["images"]] == order
        got = rows(out)
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_the_output_feeds_rerank(trained, images, tmp_path):
    q, g, d = tmp_path / "q.pt", tmp_path / "g.npy", tmp_path / "d.pt"
    names = sorted(images.iterdir())
    (tmp_path / "q.txt").write_text("\n".join(str(p) for p in names[:3]))
    assert main(["extract", "--checkpoint", trained[2], "--images", str(tmp_path / "q.txt"), "--out", str(q)]) == 0
    assert main(["extract", "--checkpoint", trained[2], "--images", str(images), "--out", str(g)]) == 0
    assert main(["rerank", "--query", str(q), "--gallery", str(g), "--out", str(d), "--k1", "3", "--k2", "2"]) == 0
    assert torch.load(d, weights_only=True).shape == (3, 7)
    assert listed(q)["images"] != listed(g)["images"]   # two lists side by side in one folder


def test_a_stage1_checkpoint_gives_the_grn_descriptor_and_says_so(trained, images, tmp_path, capsys):
    out = tmp_path / "g.pt"
    assert main(["extract", "--checkpoint", trained[1], "--images", str(images), "--out", str(out)]) == 0
    assert "GRN descriptor" in capsys.readouterr().out
    model = fmn.load_model(trained[1], device="cpu")
    feats = rows(out)
    assert torch.equal(feats, fmn.extract_features(model, str(images)))
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(7))
    assert feats.shape[1] == model.feature_dim


def test_unreadable_images_are_one_error_or_skipped_and_reported(trained, images, tmp_path, capsys):
    good = sorted(str(p) for p in images.iterdir())
    (images / "03_cut.jpg").write_bytes(open(good[0], "rb").read()[:200])
    (images / "05_text.png").write_text("not an image")
    out = tmp_path / "g.pt"
    assert main(["extract", "--checkpoint", trained[2], "--images", str(images), "--out", str(out)]) == 2
    err = one_error(capsys, "extract")
    assert "2 image(s) cannot be read" in err and "03_cut.jpg" in err and "05_text.png" in err and "--skip-bad" in err
    assert not out.exists()
    assert main(["extract", "--checkpoint", trained[2], "--images", str(images), "--out", str(out), "--skip-bad"]) == 0
    log = capsys.readouterr().out
    assert "03_cut.jpg" in log and "05_text.png" in log and "2 unreadable skipped" in log
    content = listed(out)
    assert content["images"] == good and [os.path.basename(s["path"]) for s in content["skipped"]] == [
        "03_cut.jpg", "05_text.png"]
    assert torch.equal(rows(out), fmn.extract_features(fmn.load_model(trained[2], device="cpu"), good))


def test_no_images_is_one_error(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    for spec, says in ((tmp_path / "empty", "no image files"), (tmp_path / "empty.txt", "lists no image paths"),
                       (tmp_path / "absent", "no such folder or file")):
        assert main(["extract", "--checkpoint", trained[2], "--images", str(spec),
                     "--out", str(tmp_path / "g.pt")]) == 2
        assert says in one_error(capsys, "extract")
    assert not (tmp_path / "g.pt").exists()


def test_an_existing_output_is_refused_unless_force(trained, images, tmp_path, capsys):
    out = tmp_path / "g.pt"
    out.write_bytes(b"keep")
    args = ["extract", "--checkpoint", trained[2], "--images", str(images), "--out", str(out)]
    assert main(args) == 2
    assert "exists; --force replaces it" in one_error(capsys, "extract") and out.read_bytes() == b"keep"
    out.unlink()
    (tmp_path / "g.images.json").write_text("{}")
    assert main(args) == 2
    assert "g.images.json exists" in one_error(capsys, "extract") and not out.exists()
    assert main(args + ["--force"]) == 0
    assert rows(out).shape[0] == 7 and len(listed(out)["images"]) == 7


def test_inputs_are_never_written_over(trained, images, tmp_path, capsys):
    ck = tmp_path / "model.pt"
    ck.write_bytes(open(trained[2], "rb").read())
    text = "\n".join(str(p) for p in sorted(images.iterdir()))
    named_pt, named_json = tmp_path / "list.pt", tmp_path / "g.images.json"   # text lists, whatever their names
    named_pt.write_text(text)
    named_json.write_text(text)
    before = [p.read_bytes() for p in (ck, named_pt, named_json)]
    for images_arg, out in ((images, ck), (named_pt, named_pt), (named_json, tmp_path / "g.npy")):
        assert main(["extract", "--checkpoint", str(ck), "--images", str(images_arg), "--out", str(out),
                     "--force"]) == 2
        assert "would write over the input" in one_error(capsys, "extract")
    assert [p.read_bytes() for p in (ck, named_pt, named_json)] == before
    assert not (tmp_path / "g.npy").exists()


def test_bad_arguments_are_one_error(trained, images, tmp_path, capsys):
    base = ["extract", "--checkpoint", trained[2], "--images", str(images)]
    assert main(base + ["--out", str(tmp_path / "g.csv")]) == 2
    assert ".pt or .npy" in one_error(capsys, "extract")
    if not torch.cuda.is_available():
        assert main(base + ["--out", str(tmp_path / "g.pt"), "--device", "cuda"]) == 2
        assert "CUDA is not available" in one_error(capsys, "extract")
    with pytest.raises(SystemExit):
        main(base + ["--out", str(tmp_path / "g.pt"), "--batch-size", "0"])
    assert "positive integer" in capsys.readouterr().err
