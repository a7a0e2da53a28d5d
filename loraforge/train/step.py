"""One optimizer step: the objective over the micro-batches, backward, clip, optimizer, schedule. No I/O.

The loss is summed over the step (target tokens for SFT, pairs for DPO, completion tokens for GRPO) and divided by
the step's count over all micro-batches together, so gradient accumulation gives the gradient of the same mean
as one big batch. With several ranks (distributed.py) each runs its own micro-batches and the counts, sums and
the finite check are over all ranks together, so every rank takes the same decision. A NaN/inf loss changes
nothing: the gradients are dropped and the step reports it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from loraforge.distributed import all_sum
from loraforge.loss import target_tokens
from loraforge.objectives import CROSS_ENTROPY, Objective
from loraforge.train.client import TrainingClient


@dataclass(frozen=True)
class StepResult:
    loss: float  # the objective's mean over the step (SFT: per target token)
    grad_norm: float | None  # before clipping; None without clipping or for a skipped step
    tokens: int  # real tokens in the step (no padding)
    targets: int  # tokens that carried a label: for SFT, loss × targets is the step's summed log-loss in nats
    applied: bool  # False: the loss was not finite and the step changed nothing
    stats: dict[str, float] = field(default_factory=dict)  # the objective's own means (DPO accuracy, …)


def train_step(client: TrainingClient, micro_batches: Sequence[dict[str, torch.Tensor]],
               objective: Objective = CROSS_ENTROPY) -> StepResult:
    count = max(all_sum([sum(objective.count(b) for b in micro_batches)])[0], 1)
    loss_sum, stats = 0.0, Counter()
    for i, batch in enumerate(micro_batches):
        with client.accumulating() if i < len(micro_batches) - 1 else nullcontext():
            result = client.forward_backward(batch, objective, scale=count)
        loss_sum += result.loss
        stats.update(result.stats)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    targets = sum(target_tokens(b) for b in micro_batches)
    keys = sorted(stats)
    loss_sum, tokens, targets, *values = all_sum([loss_sum, tokens, targets, *(stats[k] for k in keys)])
    stats, tokens, targets = dict(zip(keys, values)), int(tokens), int(targets)
    loss = loss_sum / count
    if not math.isfinite(loss):
        client.zero_grad()
        return StepResult(loss, None, tokens, targets, applied=False)
    grad_norm = client.optim_step()
    return StepResult(loss, grad_norm, tokens, targets, applied=True,
                      stats={key: value / count for key, value in stats.items()})
