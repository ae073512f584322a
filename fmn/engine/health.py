"""Health checks of a training run: cheap signals each epoch that tell a collapsed or
non-learning run from one that learns, and a message that says what was seen and what to change.

Signals (epoch means of the trainer's per-step stats):
  spread    the relative spread of a batch's embeddings, mean_i |e_i - mean(e)| / mean_i |e_i|:
            0 when every embedding is the same (collapse); a learning run stays well above 1e-2
  triplet   a batch-hard triplet loss pinned at its margin (within 1 %): every distance equal
  ce        the cross-entropy at ln(C) (within 2 %): the classifier says nothing
  acc       the training accuracy at chance, below 2 / C
Verdicts, after the stage's first ``train.warmup_epochs + 1`` epochs:
  collapsed     spread < 1e-3 (or the triplet pinned while spread < 1e-2), in any one epoch
  not learning  ce at ln(C) and acc at chance for ``train.health_patience`` epochs in a row, while
                the stage's loss fell by less than 1 % over those epochs (a run whose other
                terms still learn, e.g. its triplet loss in the first epochs of a from-scratch
                run, is given time)
``train.health``: ``stop`` (default: the run ends with one message, its last checkpoint kept),
``warn`` (the message is logged once per stage) or ``off``.
"""
from __future__ import annotations

import math

import torch

ADVICE = ("a lower learning rate or a longer train.warmup_epochs, model.bnneck=true with "
          "train.label_smoothing=0.1, a smaller train.triplet_weight, or the from-scratch recipe for "
          "training without ImageNet weights")


class TrainingHealthError(RuntimeError):
    """Training collapsed or is not learning (``fmn.engine.health``)."""


def relative_spread(embeddings: torch.Tensor) -> torch.Tensor:
    """mean_i |e_i - mean(e)| / mean_i |e_i| of a (B, d) batch (0 for identical rows)."""
    e = embeddings.detach().float().reshape(embeddings.shape[0], -1)
    return (e - e.mean(0)).norm(dim=1).mean() / e.norm(dim=1).mean().clamp_min(1e-12)


class HealthCheck:
    def __init__(self, train_cfg: dict, num_classes: int):
        self.mode = train_cfg["health"]
        self.patience = train_cfg["health_patience"]
        self.warmup = train_cfg["warmup_epochs"]
        self.margin = train_cfg["triplet_margin"] if train_cfg["triplet_weight"] > 0 else None
        self.num_classes = max(2, int(num_classes))
        self.streak = 0
        self.losses: list[float] = []
        self.warned: set[int] = set()

    def start_stage(self) -> None:
        self.streak, self.losses = 0, []

    def verdict(self, epoch: int, stats: dict[str, float]) -> str | None:
        """What is wrong after epoch ``epoch`` (0-based within the stage), or None."""
        if self.mode == "off" or epoch < self.warmup + 1:
            return None
        seen = []
        spread = stats.get("spread")
        pinned = self.margin is not None and "triplet" in stats and abs(stats["triplet"] - self.margin) <= 0.01 * self.margin
        if spread is not None and (spread < 1e-3 or (pinned and spread < 1e-2)):
            seen.append(f"the embeddings of a batch are nearly identical (relative spread {spread:.1e})")
            if pinned:
                seen.append(f"the triplet loss sits at its margin ({stats['triplet']:.3f})")
            return "training collapsed: " + "; ".join(seen)
        self.losses.append(stats.get("loss", float("nan")))
        ces = [v for k, v in stats.items() if k == "ce" or k.startswith("ce_")]
        chance_ce = math.log(self.num_classes)
        at_chance = bool(ces) and min(ces) >= 0.98 * chance_ce and stats.get("acc", 0.0) <= 2.0 / self.num_classes
        self.streak = self.streak + 1 if at_chance else 0
        stalled = len(self.losses) > self.patience and self.losses[-1] >= 0.99 * self.losses[-1 - self.patience]
        if self.streak >= self.patience and stalled:
            return (f"training is not learning: cross-entropy {min(ces):.3f} at ln({self.num_classes}) = "
                    f"{chance_ce:.3f} and training accuracy {stats.get('acc', 0.0):.3f} at chance for "
                    f"{self.streak} epochs")
        return None

    def message(self, title: str, epoch: int, problem: str, checkpoint: str) -> str:
        return (f"{title} epoch {epoch + 1}: {problem}. Try {ADVICE}. The last checkpoint is {checkpoint} "
                f"(train.health=warn lets such a run go on)")
