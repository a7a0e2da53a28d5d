"""One optimizer step: loss over the micro-batches, backward, clip, optimizer, schedule. No I/O.

The loss is summed over target tokens and divided by the step's target tokens (all micro-batches together), so
gradient accumulation gives the gradient of the same per-token mean as one big batch. A NaN/inf loss changes
nothing: the gradients are dropped and the step reports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from loraforge.loss import causal_lm_loss
from loraforge.train.trainee import Trainee

# (model, batch) -> (summed loss over the batch's target tokens, their count); causal_lm_loss for SFT.
LossFunction = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean loss per target token
    grad_norm: float | None  # before clipping; None without clipping or for a skipped step
    tokens: int  # real tokens in the step (no padding)
    targets: int  # tokens that carried a label: loss × targets is the step's summed log-loss in nats
    applied: bool  # False: the loss was not finite and the step changed nothing


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def train_step(trainee: Trainee, micro_batches: Sequence[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
               scheduler, scaler: torch.amp.GradScaler, autocast: Callable[[], AbstractContextManager],
               step: int, max_grad_norm: float | None, loss_function: LossFunction | None = None) -> StepResult:
    """Step number `step` (1-based: the step being taken). `scaler` is a GradScaler, disabled unless fp16."""
    loss_function = loss_function or causal_lm_loss
    n_targets = max(sum(target_tokens(b) for b in micro_batches), 1)
    loss_sum = 0.0
    for batch in micro_batches:
        with autocast():
            micro_loss, _ = loss_function(trainee.model, batch)
            extra = trainee.extra_loss()  # AdaLoRA's orthogonality penalty, else None
        scaled = micro_loss / n_targets
        if extra is not None:
            scaled = scaled + extra / len(micro_batches)
        scaler.scale(scaled).backward()
        loss_sum += micro_loss.item()
    loss = loss_sum / n_targets
    tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, None, tokens, n_targets, applied=False)
    scaler.unscale_(optimizer)
    grad_norm = None
    if max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(trainee.trainable()), max_grad_norm))
    scaler.step(optimizer)
    scaler.update()
    trainee.after_optimizer_step(step)  # needs this step's gradients: before zero_grad
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, tokens, n_targets, applied=True)
