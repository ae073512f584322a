"""Input pipeline: transforms, PK sampler (incl. the distributed split), train / test loaders, cache."""

import numpy as np
import pytest
import torch
from PIL import Image

from fmn.data import PKSampler, ReIDDataset, augment_batch, make_test_loader, make_train_loader
from fmn.data.transforms import IMAGENET_MEAN, IMAGENET_STD, load_resized, to_float_normalized


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    train, query, gallery = [], [], []
    for pid in range(1, 9):
        for k in range(5 if pid % 2 else 3):
            p = str(root / f"t_{pid}_{k}.png")
            Image.fromarray(rng.integers(0, 255, (20, 10, 3), dtype=np.uint8)).save(p)
            train.append((p, pid * 10, k % 3))
    for pid in (100, 101):
        for k in range(3):
            p = str(root / f"e_{pid}_{k}.png")
            Image.fromarray(rng.integers(0, 255, (20, 10, 3), dtype=np.uint8)).save(p)
            (query if k == 0 else gallery).append((p, pid, k))
    return ReIDDataset("tiny", str(root), train, query, gallery)


def test_load_resized_and_normalise(tmp_path):
    p = str(tmp_path / "x.png")
    arr = np.zeros((30, 12, 3), np.uint8)
    arr[..., 0] = 255
    Image.fromarray(arr).save(p)
    t = load_resized(p, 16, 8)
    assert t.shape == (3, 16, 8) and t.dtype == torch.uint8 and int(t[0].min()) == 255 and int(t[1].max()) == 0
    x = to_float_normalized(t[None])
    assert torch.allclose(x[0, 0], torch.full((16, 8), (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]))


def test_augment_batch_components():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 12, 6, generator=g)
    # Flip only, probability 1: exact mirror.
    assert torch.equal(augment_batch(x, flip_p=1.0, pad=0, erase_p=0.0), x.flip(3))
    assert torch.equal(augment_batch(x, flip_p=0.0, pad=0, erase_p=0.0), x)
    # Pad-crop: every output is a shifted window of the zero-padded input.
    out = augment_batch(x, flip_p=0.0, pad=2, erase_p=0.0, generator=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(16):
        assert any(torch.equal(out[b], padded[b, :, dy:dy + 12, dx:dx + 6]) for dy in range(5) for dx in range(5))
    # Erasing: changes one axis-aligned rectangle per erased sample.
    out = augment_batch(x, flip_p=0.0, pad=0, erase_p=1.0, generator=g)
    changed = (out != x).any(1)
    assert changed.any(-1).any(-1).float().mean() > 0.5
    for b in range(16):
        ys, xs = torch.nonzero(changed[b], as_tuple=True)
        if len(ys):
            box = changed[b, ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            assert box.float().mean() > 0.9          # a filled rectangle (noise may equal input rarely)
    # Same generator seed, same result.
    a = augment_batch(x, generator=torch.Generator().manual_seed(3))
    b = augment_batch(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_pk_sampler_structure_and_determinism():
    pids = [i // 5 for i in range(50)] + [100, 100]          # 10 ids with 5 images, one id with 2
    s = PKSampler(pids, batch_size=8, num_instances=4, seed=1)
    idx = list(s)
    assert len(idx) == len(s) and len(idx) % 8 == 0 and len(idx) > 0
    for b in range(0, len(idx), 8):
        batch = [pids[i] for i in idx[b:b + 8]]
        assert len(set(batch)) == 2 and all(batch.count(p) == 4 for p in set(batch))
    s2 = PKSampler(pids, batch_size=8, num_instances=4, seed=1)
    s2.set_epoch(0)
    assert list(s2) == idx
    s2.set_epoch(1)
    assert list(s2) != idx
    with pytest.raises(ValueError, match="multiple of num_instances"):
        PKSampler(pids, batch_size=6, num_instances=4)
    with pytest.raises(ValueError, match="at least P"):
        PKSampler([0, 0, 1, 1], batch_size=12, num_instances=2)


def test_pk_sampler_distributed_split():
    pids = [i // 4 for i in range(96)]
    full = PKSampler(pids, batch_size=8, num_instances=4, seed=3)
    parts = [PKSampler(pids, batch_size=8, num_instances=4, num_replicas=3, rank=r, seed=3) for r in range(3)]
    for p in parts:
        p.set_epoch(2)
    full.set_epoch(2)
    lens = {len(p) for p in parts}
    assert len(lens) == 1
    got = [list(p) for p in parts]
    flat = set(i for g in got for i in g)
    assert sum(len(g) for g in got) == len(flat)            # disjoint across ranks
    batches = [list(full)[i:i + 8] for i in range(0, len(full), 8)]
    assert got[1][:8] == batches[1] and got[0][:8] == batches[0]


def test_train_loader_batches(small_dataset):
    loader = make_train_loader(small_dataset, 16, 8, batch_size=8, num_instances=2, workers=0, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"img", "pid", "camid", "path", "index"}
    assert batch["img"].shape == (8, 3, 16, 8) and batch["img"].dtype == torch.float32
    assert batch["pid"].dtype == torch.int64 and batch["pid"].max() < small_dataset.num_train_pids
    assert len(batch["path"]) == 8
    for i, p, path in zip(batch["index"].tolist(), batch["pid"].tolist(), batch["path"]):
        assert small_dataset.train[i][0] == path and small_dataset.train[i][1] == p
    # Deterministic for a seed (augmentation included), with and without worker processes.
    a = [b["img"] for b in make_train_loader(small_dataset, 16, 8, batch_size=8, num_instances=2, workers=0, seed=5)]
    b = [b["img"] for b in make_train_loader(small_dataset, 16, 8, batch_size=8, num_instances=2, workers=0, seed=5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    c = [b["img"] for b in make_train_loader(small_dataset, 16, 8, batch_size=8, num_instances=2, workers=2, seed=5)]
    d = [b["img"] for b in make_train_loader(small_dataset, 16, 8, batch_size=8, num_instances=2, workers=2, seed=5)]
    assert len(c) == len(a) and all(torch.equal(x, y) for x, y in zip(c, d))


def test_cache_matches_disk_and_test_loader_order(small_dataset):
    plain = make_test_loader(small_dataset.gallery, 16, 8, batch_size=3, workers=0)
    cached = make_test_loader(small_dataset.gallery, 16, 8, batch_size=3, workers=0, cache=True, device="cpu",
                              progress=False)
    xs = list(plain)
    ys = list(cached)
    assert [p for b in xs for p in b["path"]] == [s[0] for s in small_dataset.gallery]
    assert all(torch.equal(x["img"], y["img"]) and torch.equal(x["pid"], y["pid"]) for x, y in zip(xs, ys))
    train = make_train_loader(small_dataset, 16, 8, batch_size=8, num_instances=2, workers=0, cache=True,
                              device="cpu", augment=False, progress=False)
    batch = next(iter(train))
    ref = torch.stack([load_resized(p, 16, 8) for p in batch["path"]])
    assert torch.allclose(batch["img"], to_float_normalized(ref))


@pytest.mark.cuda
def test_gpu_cache_and_augmentation(small_dataset):
    loader = make_train_loader(small_dataset, 16, 8, batch_size=8, num_instances=2, workers=0, cache=True,
                               progress=False)
    batch = next(iter(loader))
    assert batch["img"].is_cuda and batch["pid"].is_cuda


def test_pk_sampler_advances_epoch_without_set_epoch():
    pids = [i // 4 for i in range(64)]
    s = PKSampler(pids, batch_size=8, num_instances=4, seed=0)
    first, second = list(s), list(s)
    assert first != second and sorted(first) == sorted(second)
    ref = PKSampler(pids, batch_size=8, num_instances=4, seed=0)
    ref.set_epoch(1)
    assert list(ref) == second and len(s) == len(second)


def test_augmentation_is_a_function_of_the_batch(small_dataset):
    """A batch's augmentation depends on (seed, its sample indices) only: the same in a resumed
    run and in any worker, whatever batches came before; another batch or seed differs."""
    from fmn.data.loader import _Collate

    samples = small_dataset.train
    cache = torch.randint(0, 255, (len(samples), 3, 16, 8), dtype=torch.uint8)
    kwargs = dict(flip_p=0.5, pad=2, erase_p=0.5)
    first = _Collate(True, 7, kwargs, samples=samples, cache=cache)
    a = first([0, 3, 5, 6])["img"]
    first([1, 2, 4, 7])  # advance whatever state there is
    again = first([0, 3, 5, 6])["img"]
    fresh = _Collate(True, 7, kwargs, samples=samples, cache=cache)([0, 3, 5, 6])["img"]
    other_seed = _Collate(True, 8, kwargs, samples=samples, cache=cache)([0, 3, 5, 6])["img"]
    plain = _Collate(False, 7, kwargs, samples=samples, cache=cache)([0, 3, 5, 6])["img"]
    assert torch.equal(a, again) and torch.equal(a, fresh)
    assert not torch.equal(a, other_seed) and not torch.equal(a, plain)


def test_pk_sampler_fewer_batches_than_replicas_is_an_error():
    pids = [0, 0, 1, 1, 2, 2]                                  # P=2, K=2: one batch per epoch
    one = PKSampler(pids, batch_size=4, num_instances=2, num_replicas=1)
    assert len(one) == 4 and len(list(one)) == 4
    for rank in (0, 1):
        s = PKSampler(pids, batch_size=4, num_instances=2, num_replicas=2, rank=rank)
        with pytest.raises(ValueError, match=r"1 batch\(es\).*fewer than num_replicas=2"):
            list(s)
