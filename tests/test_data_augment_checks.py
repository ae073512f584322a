"""Batch augmentation with the part masks that travel with the images: seeding per batch,
random erasing of the masks, normalisation input, keypoint regions under a flip."""
import numpy as np
import pytest
import torch

from fmn.data.masks import KEYPOINT_NAMES
from fmn.data.parts import PART_CHANNELS, _PartsCollate, keypoint_regions, make_parts_train_loader
from fmn.data.synthetic import generate
from fmn.data.transforms import augment_batch, to_float_normalized

H, W = 16, 8


def _items(indices, seed=0):
    """(image, parts, pid, camid, path, index) items with random content, one per index."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8),
             torch.randint(0, 256, (len(PART_CHANNELS), H, W), generator=g, dtype=torch.uint8), 0, 0, f"{i}.jpg", i)
            for i in indices]


def test_parts_augmentation_is_a_function_of_the_batch():
    """A batch's draws depend on (seed, its sample indices) only: the same batch gets the same
    augmentation whatever ran before it (resume, worker), and two replicas' batches at the same
    step get independent draws, not the same flips, crops and erasings position by position."""
    collate = _PartsCollate(True, 7, 0.5, 2, 0.5)
    items = _items(range(8))
    first = collate(items)
    collate(_items(range(8, 16)))
    again = collate(items)
    fresh = _PartsCollate(True, 7, 0.5, 2, 0.5)(items)
    for k in ("img", "parts"):
        assert torch.equal(first[k], again[k]) and torch.equal(first[k], fresh[k])
    assert not torch.equal(first["img"], _PartsCollate(True, 8, 0.5, 2, 0.5)(items)["img"])
    # Two replicas: identical content at each position, different sample indices.
    rank0 = _PartsCollate(True, 7, 0.5, 2, 0.5)(_items(range(0, 8), seed=1))
    rank1 = _PartsCollate(True, 7, 0.5, 2, 0.5)(_items(range(8, 16), seed=1))
    assert not torch.equal(rank0["parts"], rank1["parts"])


def test_parts_loader_with_workers_is_reproducible(tmp_path):
    root = generate(str(tmp_path / "s"), num_ids=8, num_cams=2, images_per_id_per_cam=2, height=H, width=W,
                    progress=False, num_distractors=1, num_junk=0, seed=0)
    from fmn.data import build_dataset

    ds = build_dataset("synthetic", root)

    def epoch(global_seed, workers):
        torch.manual_seed(global_seed)
        loader = make_parts_train_loader(ds, H, W, batch_size=4, num_instances=2, workers=workers, seed=3,
                                         erase_p=0.5, progress=False)
        loader.sampler.set_epoch(1)
        return [(b["img"], b["parts"]) for b in loader]

    a, b, c = epoch(1, 2), epoch(2, 2), epoch(3, 0)
    assert len(a) == len(b) == len(c) > 0
    for (xa, pa), (xb, pb), (xc, pc) in zip(a, b, c):
        assert torch.equal(xa, xb) and torch.equal(pa, pb)
        assert torch.equal(xa, xc) and torch.equal(pa, pc)


def test_erasing_is_background_in_the_masks():
    """An erased rectangle is an occluder: the masks are 0 there (occluders are background in
    the mask files) and untouched elsewhere; the image holds noise there."""
    items = [(img, torch.full_like(parts, 255), *rest) for img, parts, *rest in _items(range(16))]
    plain = _PartsCollate(False, 0, 0.0, 0, 0.0)(items)
    out = _PartsCollate(True, 0, 0.0, 0, 1.0)(items)
    erased = (out["img"] != plain["img"]).any(1)
    assert erased.flatten(1).any(1).float().mean() > 0.5
    for c in range(len(PART_CHANNELS)):
        assert torch.all(out["parts"][:, c][erased] == 0)
        assert torch.all(out["parts"][:, c][~erased] == 1)


def test_return_erased_is_the_erased_rectangle():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, H, W, generator=g)
    out, erased = augment_batch(x, flip_p=0.0, pad=0, erase_p=1.0, generator=torch.Generator().manual_seed(1),
                                return_erased=True)
    same = augment_batch(x, flip_p=0.0, pad=0, erase_p=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, same) and erased.shape == (12, 1, H, W) and erased.dtype == torch.bool
    assert torch.equal(erased[:, 0], (out != x).any(1)) and erased.any()
    for b in range(12):
        ys, xs = torch.nonzero(erased[b, 0], as_tuple=True)
        if len(ys):
            assert erased[b, 0, ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
    _, none = augment_batch(x, flip_p=1.0, pad=2, erase_p=0.0, return_erased=True)
    assert not none.any()


def test_normalisation_is_applied_to_uint8_only():
    x = torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8)
    y = to_float_normalized(x)
    assert y.dtype == torch.float32
    with pytest.raises(TypeError, match="uint8"):
        to_float_normalized(y)
    with pytest.raises(TypeError, match="uint8"):
        to_float_normalized(x.float())


def _mirror(kp, width):
    """COCO-17 keypoints of the horizontally flipped image: x -> width - x, left <-> right."""
    out = kp.copy()
    out[:, 0] = width - kp[:, 0]
    swap = [KEYPOINT_NAMES.index(n.replace("left", "#").replace("right", "left").replace("#", "right"))
            for n in KEYPOINT_NAMES]
    return out[swap]


def test_keypoint_regions_follow_a_flip():
    """Flipping the rendered keypoint regions (what the loader does) equals rendering the
    flipped image's keypoints, whose left and right labels swap."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        kp = np.stack([rng.uniform(0, 2 * W, 17), rng.uniform(0, 2 * H, 17), rng.random(17) < 0.7], 1)
        kp = kp.astype(np.float32)
        regions = keypoint_regions(kp, (2 * H, 2 * W), H, W)
        flipped = keypoint_regions(_mirror(kp, 2 * W), (2 * H, 2 * W), H, W)
        np.testing.assert_allclose(regions[:, :, ::-1], flipped, atol=1e-5, rtol=0)
        assert regions.max() > 0.5
