"""The training losses at their edges: the batch-hard triplet under autocast, and every loss on an
empty batch."""
import pytest
import torch

from fmn.losses import batch_hard_triplet, cross_entropy, ranking_loss
from fmn.models.seed_losses import attention_loss, identity_losses

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset", [0.0, 4.0])
def test_batch_hard_triplet_under_autocast_is_computed_in_float32(dtype, offset):
    """Unnormalised features (a common offset, as after a ReLU) under mixed precision: the loss and
    its gradient are those of float32, not of a low-precision |a|^2 + |b|^2 - 2 a.b."""
    pids = torch.arange(4).repeat_interleave(4)
    feats = torch.randn(16, 64) * 0.5 + offset
    a = feats.clone().requires_grad_()
    b = feats.clone().requires_grad_()
    expected = batch_hard_triplet(a, pids, 0.3)
    with torch.autocast("cpu", dtype=dtype):
        got = batch_hard_triplet(b, pids, 0.3)
    assert got.dtype == torch.float32 and expected.item() > 0
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    expected.backward()
    got.backward()
    torch.testing.assert_close(b.grad, a.grad)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_of_an_empty_batch_is_zero_with_a_gradient(eps):
    logits = torch.randn(0, 7, requires_grad=True)
    loss = cross_entropy(logits, torch.zeros(0, dtype=torch.long), eps)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 7)


def test_ranking_loss_of_an_empty_batch_is_zero():
    grn = torch.randn(0, 5, requires_grad=True)
    lan = torch.randn(0, 5, requires_grad=True)
    loss = ranking_loss(grn, lan, torch.zeros(0, dtype=torch.long), 0.05)
    assert loss.item() == 0.0
    loss.backward()
    assert lan.grad.shape == (0, 5) and grn.grad is None


def test_seed_losses_of_an_empty_batch_are_zero():
    logits = torch.randn(0, 3, 8, 4, requires_grad=True)
    loss = attention_loss(logits, torch.rand(0, 3, 32, 16))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == logits.shape
    total, stats = identity_losses({"a": torch.randn(0, 4), "b": torch.randn(0, 4)}, torch.zeros(0, dtype=torch.long))
    assert total.item() == 0.0 and set(stats) == {"ce_a", "ce_b"}
