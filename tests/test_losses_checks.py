"""The training losses at their edges: every loss on an empty batch."""
import pytest
import torch

from fmn.losses import batch_hard_triplet, cross_entropy, ranking_loss
from fmn.models.seed_losses import attention_loss, identity_losses

pytestmark = pytest.mark.usefixtures("one_thread")


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
