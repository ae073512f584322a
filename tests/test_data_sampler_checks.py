"""PK sampler: the length a loader reports, the DDP split, identities with fewer than K images,
determinism under resume."""
from torch.utils.data import DataLoader

from fmn.data import PKSampler

# 12 identities with 2..10 images: the number of batches changes from epoch to epoch.
PIDS = [i for i in range(12) for _ in range(2 + (i * 7) % 9)]


def test_len_counts_the_epoch_the_next_iteration_draws():
    """Without ``set_epoch`` the sampler advances its epoch by itself; ``len(loader)``, asked
    before each epoch (progress bars, schedules), must count that epoch's batches."""
    counts = []
    for e in range(4):
        s = PKSampler(PIDS, batch_size=12, num_instances=3, seed=0)
        s.set_epoch(e)
        counts.append(len(s) // 12)
    assert len(set(counts)) > 1
    loader = DataLoader(list(range(len(PIDS))), batch_size=12, drop_last=True,
                        sampler=PKSampler(PIDS, batch_size=12, num_instances=3, seed=0))
    for e in range(4):
        n = len(loader)
        assert n == sum(1 for _ in loader) == counts[e]


def test_abandoned_iteration_still_advances_the_epoch():
    s = PKSampler(PIDS, batch_size=12, num_instances=3, seed=0)
    it = iter(s)
    next(it)
    it.close()
    ref = PKSampler(PIDS, batch_size=12, num_instances=3, seed=0)
    ref.set_epoch(1)
    assert list(s) == list(ref)


def test_ddp_split_same_count_disjoint_and_resumable():
    for replicas in (2, 3):
        for epoch in range(3):
            full = PKSampler(PIDS, batch_size=6, num_instances=3, seed=5)
            full.set_epoch(epoch)
            batches = [list(full)[i:i + 6] for i in range(0, len(full), 6)]
            got = []
            for r in range(replicas):
                s = PKSampler(PIDS, batch_size=6, num_instances=3, num_replicas=replicas, rank=r, seed=5)
                s.set_epoch(epoch)
                idx = list(s)
                assert len(idx) == len(s) == (len(batches) // replicas) * 6
                got.append([idx[i:i + 6] for i in range(0, len(idx), 6)])
            assert got[0] == batches[0:len(got[0]) * replicas:replicas]
            flat = [i for g in got for b in g for i in b]
            # identities with fewer than K images repeat inside their own chunk only
            singles = {p for p in set(PIDS) if PIDS.count(p) < 3}
            repeated = {i for i in flat if flat.count(i) > 1}
            assert all(PIDS[i] in singles for i in repeated)
            for g in got:
                for b in g:
                    assert all(b.count(i) == flat.count(i) for i in b)


def test_identity_with_fewer_than_k_images_fills_its_chunk():
    pids = [0] * 2 + [1] * 5 + [2] * 4 + [3] * 1
    s = PKSampler(pids, batch_size=8, num_instances=4, seed=0)
    idx = list(s)
    for b in range(0, len(idx), 8):
        batch = [pids[i] for i in idx[b:b + 8]]
        assert sorted(set(batch.count(p) for p in set(batch))) == [4]
    assert len(idx) > 0 and max(idx) < len(pids)
