"""One training epoch (LR set per step from the schedule) and evaluation: shared by dense training and fine-tuning."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from wf_pipeline.data import DataBundle
from wf_pipeline.recipe.schema import TrainingConfig
from wf_pipeline.training.lr_schedule import lr_at, weight_decay_at
from wf_pipeline.training.optimizer import set_lr, set_weight_decay

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, running_loss)


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    steps: int


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: TrainingConfig,
    *,
    epoch: int,
    steps_per_epoch: int,
    device: torch.device,
    start_step: int = 0,
    progress: ProgressFn | None = None,
    after_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over `batches`, setting the LR per step from the recipe's schedule."""
    model.train()
    total_loss, correct, seen, step = 0.0, 0, 0, start_step
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        at_epoch = epoch + step / steps_per_epoch
        set_lr(optimizer, lr_at(cfg, at_epoch))
        weight_decay = weight_decay_at(cfg, at_epoch)
        if weight_decay is not None:
            set_weight_decay(optimizer, weight_decay)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if progress:
            progress(step, steps_per_epoch, total_loss / seen)
        if after_step:
            after_step(step)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), step - start_step)


def test_images(data: DataBundle, limit: int | None = None) -> str:
    """Which test images an accuracy is measured on ('the first 2,000 of 10,000 test images'), so that every
    printed accuracy says it: a monitored subset and the whole set differ by a point or more."""
    total = len(data.test_split) if data.test_split is not None else len(data.folder_sets[1])  # type: ignore[index,arg-type]
    if limit is None or limit >= total:
        return f"all {total:,} test images"
    return f"the first {limit:,} of {total:,} test images"


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> tuple[float, float]:
    """(accuracy, mean loss) in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    correct, seen, total_loss = 0, 0, 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    model.train(was_training)
    return correct / max(seen, 1), total_loss / max(seen, 1)
