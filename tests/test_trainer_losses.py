"""The training losses against straightforward per-sample implementations written here (values and
gradients, label smoothing, batch-hard mining with singleton identities and one-identity batches),
and the DDP helpers on a single process."""
import math

import pytest
import torch
import torch.distributed as dist

from fmn import distributed as fdist
from fmn.losses import accuracy, batch_hard_triplet, cross_entropy, ranking_loss

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ references, one sample at a time
def ref_cross_entropy(logits, targets, eps):
    n, k = logits.shape
    total = 0.0
    for i in range(n):
        row = logits[i].double()
        log_z = math.log(sum(math.exp(float(v - row.max())) for v in row)) + float(row.max())
        logp = [float(v) - log_z for v in row]
        target = [(1 - eps) * (c == int(targets[i])) + eps / k for c in range(k)]
        total += -sum(t * lp for t, lp in zip(target, logp))
    return total / n


def ref_ranking(grn_logits, lan_logits, targets, margin):
    total = 0.0
    for i in range(len(targets)):
        t = int(targets[i])
        pg = math.exp(float(grn_logits[i, t])) / sum(math.exp(float(v)) for v in grn_logits[i])
        pl = math.exp(float(lan_logits[i, t])) / sum(math.exp(float(v)) for v in lan_logits[i])
        total += max(0.0, pg - pl + margin)
    return total / len(targets)


def ref_batch_hard(feats, pids, margin):
    """Per anchor: farthest other sample of its identity, nearest sample of another identity;
    anchors lacking either are skipped; the mean of relu(d_ap - d_an + margin) (0 if none)."""
    terms = []
    n = len(pids)
    for a in range(n):
        pos = [(feats[a] - feats[j]).pow(2).sum().sqrt() for j in range(n) if j != a and pids[j] == pids[a]]
        neg = [(feats[a] - feats[j]).pow(2).sum().sqrt() for j in range(n) if pids[j] != pids[a]]
        if pos and neg:
            terms.append(torch.relu(max(pos) - min(neg) + margin))
    return torch.stack(terms).mean() if terms else feats.sum() * 0.0


# ----------------------------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("n,k", [(1, 2), (7, 5), (16, 751)])
def test_cross_entropy_matches_reference(n, k, eps):
    logits = torch.randn(n, k) * 4
    targets = torch.randint(0, k, (n,))
    got = cross_entropy(logits, targets, eps)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(ref_cross_entropy(logits, targets, eps), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy_gradient_and_low_precision_logits(eps):
    logits = (torch.randn(6, 9) * 3).requires_grad_()
    targets = torch.randint(0, 9, (6,))
    cross_entropy(logits, targets, eps).backward()
    onehot = torch.nn.functional.one_hot(targets, 9).float()
    expected = (torch.softmax(logits.detach(), 1) - ((1 - eps) * onehot + eps / 9)) / 6
    torch.testing.assert_close(logits.grad, expected)
    half = logits.detach().bfloat16()
    got = cross_entropy(half, targets, eps)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(ref_cross_entropy(half.float(), targets, eps), rel=1e-5)


# --------------------------------------------------------------------------------------- ranking
@pytest.mark.parametrize("margin", [0.0, 0.05, 0.5])
def test_ranking_loss_matches_reference_and_leaves_grn_without_gradient(margin):
    g = (torch.randn(9, 6) * 2).requires_grad_()
    l = (torch.randn(9, 6) * 2).requires_grad_()
    t = torch.randint(0, 6, (9,))
    loss = ranking_loss(g, l, t, margin)
    assert loss.item() == pytest.approx(ref_ranking(g.detach(), l.detach(), t, margin), rel=1e-5, abs=1e-7)
    loss.backward()
    assert g.grad is None, "the ranking loss must not train GRN"
    if loss.item() > 0:
        assert l.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- triplet
TRIPLET_BATCHES = {
    "pk": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "one_singleton": [0, 0, 1, 1, 2, 3, 3],          # identity 2 has one sample
    "unsorted_with_singletons": [5, 1, 5, 9, 1, 7],  # 9 and 7 appear once
    "two_identities": [1, 0, 1, 0],
}


@pytest.mark.parametrize("name", sorted(TRIPLET_BATCHES))
@pytest.mark.parametrize("margin", [0.3, 3.0])
def test_batch_hard_triplet_matches_reference(name, margin):
    pids = torch.tensor(TRIPLET_BATCHES[name])
    feats = torch.randn(len(pids), 5, dtype=torch.float64)
    a = feats.float().clone().requires_grad_()
    b = feats.clone().requires_grad_()
    got, expected = batch_hard_triplet(a, pids, margin), ref_batch_hard(b, pids, margin)
    assert expected.item() > 0, "pick inputs where the loss is active"
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    got.backward()
    expected.backward()
    torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pids", [[3, 3, 3, 3], [0, 1, 2, 3], [4]], ids=["one_identity", "all_singletons", "one_sample"])
def test_batch_hard_triplet_without_any_valid_anchor_is_zero_with_zero_gradient(pids):
    feats = torch.randn(len(pids), 4, requires_grad=True)
    loss = batch_hard_triplet(feats, torch.tensor(pids), 0.3)
    assert loss.item() == 0.0 and ref_batch_hard(feats.detach(), pids, 0.3).item() == 0.0
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_batch_hard_triplet_is_finite_for_duplicate_features():
    feats = torch.randn(2, 4).repeat(2, 1).requires_grad_()   # each anchor has a positive at distance 0
    pids = torch.tensor([0, 1, 0, 1])
    loss = batch_hard_triplet(feats, pids, 0.3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(feats.grad).all()
    assert loss.item() == pytest.approx(ref_batch_hard(feats.detach(), pids, 0.3).item(), abs=1e-5)


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [1.0, 2.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 0])) == pytest.approx(0.5)


# ------------------------------------------------------------------------ DDP helpers, one process
@pytest.mark.parametrize("env", [{}, {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}])
def test_distributed_helpers_degrade_to_one_process(monkeypatch, env):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    info = fdist.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.enabled, info.is_main) == (0, 1, 0, False, True)
    assert not dist.is_initialized(), "one process must not start a process group"
    assert fdist.current() == fdist.DistInfo()
    fdist.barrier()
    t = torch.tensor([1.5, -2.0])
    assert fdist.all_reduce_sum(t) is t and torch.equal(t, torch.tensor([1.5, -2.0]))
    assert fdist.any_true(True, torch.device("cpu")) is True
    assert fdist.any_true(False, torch.device("cpu")) is False
    fdist.cleanup()


def test_distributed_helpers_on_a_one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert fdist.current() == fdist.DistInfo(0, 1, 0)
        fdist.barrier()
        assert torch.equal(fdist.all_reduce_sum(torch.tensor([2.0])), torch.tensor([2.0]))
        assert fdist.any_true(True, torch.device("cpu")) and not fdist.any_true(False, torch.device("cpu"))
        fdist.cleanup()
        assert dist.is_initialized()                              # a caller's group is left to the caller
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK must be an integer"),
])
def test_distributed_env_errors_are_clear(monkeypatch, env, message):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match=message):
        fdist.init_distributed("cpu")
    assert not dist.is_initialized()
