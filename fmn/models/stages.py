"""Training stages as data: what a model declares and the one trainer (``fmn.engine``) runs.

A model's ``training_stages(cfg)`` returns its stages in order. Each names the schedule it
follows (``train.<schedule>``: epochs, lr, milestones, gamma), the modules whose parameters it
trains, the modules it holds frozen (eval mode, no gradients), how a batch runs through the
model and the loss. FMN's Algorithm 1 is two stages (GRN; then MN + LAN with GRN frozen); MMGA,
MGRAN and PMM are one stage each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
from torch import nn

Outputs = Dict[str, torch.Tensor]
LossFn = Callable[[Outputs, dict], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


def forward_images(model: nn.Module, img: torch.Tensor, batch: dict) -> Outputs:
    """The model sees the images only."""
    return model(img)


def forward_with_batch(model: nn.Module, img: torch.Tensor, batch: dict) -> Outputs:
    """The model sees the images and the whole batch (identities, part masks)."""
    return model(img, batch=batch)


@dataclass(frozen=True)
class Stage:
    """One training stage.

    ``index``: the number a checkpoint records (1, 2, ...); ``schedule``: the ``train`` section
    key of its epochs and learning rates; ``title``: how logs name it; ``trainable``: modules
    whose parameters the optimizer updates; ``frozen``: modules in eval mode without gradients
    for the whole stage; ``loss(outputs, batch) -> (loss, stats)`` (stats: detached scalars,
    ``loss`` and ``acc`` among them); ``forward(model, img, batch)``; ``start(fresh)``: called when
    the stage begins (``fresh``: at its first epoch, not on resume); ``find_unused_parameters``:
    for DDP, when some trainable parameters get no gradient in a step; ``embedding(outputs)``: the
    (B, d) feature the stage learns, watched by the trainer's health checks."""

    index: int
    schedule: str
    title: str
    trainable: Tuple[nn.Module, ...]
    loss: LossFn
    frozen: Tuple[nn.Module, ...] = ()
    forward: Callable[[nn.Module, torch.Tensor, dict], Outputs] = forward_images
    start: Callable[[bool], None] | None = None
    find_unused_parameters: bool = False
    embedding: Callable[[Outputs], torch.Tensor] | None = None

    def parameters(self) -> list[nn.Parameter]:
        """The trainable modules' parameters, each once, in module order."""
        seen, out = set(), []
        for module in self.trainable:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def begin(self, fresh: bool) -> None:
        """Set gradients and call ``start``: frozen modules get none, trainable ones do."""
        if self.start is not None:
            self.start(fresh)
        for module in self.frozen:
            module.requires_grad_(False)
        for module in self.trainable:
            module.requires_grad_(True)

    def train_mode(self, model: nn.Module) -> None:
        """``model.train()`` with the frozen modules in eval mode."""
        model.train()
        for module in self.frozen:
            module.eval()
