"""What a training stage brings to the one training loop: its data, its objective, each step's micro-batches,
its validation and its comparison after training. The loop (loop.py) owns everything else: the run folder,
checkpoints and resume, early stopping, metrics, TensorBoard and the report.

    sft   supervised answers (data.py, cross-entropy)                 sft.py
    dpo   preference pairs, the base with the adapter off as reference dpo.py
    grpo  prompts + a Python reward, group-relative policy gradient    grpo.py

stages.py picks one by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from loraforge.config import TrainConfig
from loraforge.distributed import all_sum, rank, world_size
from loraforge.objectives import Objective
from loraforge.train.client import TrainingClient
from loraforge.train.state import TrainingState


@dataclass
class Validation:
    """A stage's numbers on some validation rows: `metrics` (the stage's `metric` among them) and the weight
    (target tokens, pairs, prompts) that combines two parts into the figure of both."""

    metrics: dict[str, float]
    weight: float

    def combined(self, other: Validation) -> Validation:
        total = max(self.weight + other.weight, 1e-12)
        return Validation({k: (v * self.weight + other.metrics[k] * other.weight) / total
                           for k, v in self.metrics.items()}, self.weight + other.weight)


@dataclass
class StageData:
    """The splits a stage trains, validates and compares on (rows of the stage's own kind), and what to say."""

    train: list
    validation: list
    test: list
    summary: str  # one line: rows read, kept, split sizes
    train_bits: float | None = None  # the information the run trains on, when known before it starts
    bits_source: str | None = None  # how train_bits was counted


class Stage(Protocol):
    name: str
    objective: Objective
    metric: str  # the validation figure best/ and patience go by: "loss" (lower is better) or "reward"
    higher_is_better: bool

    def prepare(self, config: TrainConfig, tokenizer, run_root: Path, say: Callable[[str], None]) -> StageData: ...
    def micro_batches(self, client: TrainingClient, state: TrainingState) -> list[dict[str, torch.Tensor]]: ...
    def step_stats(self) -> dict[str, float]: ...
    def validate(self, client: TrainingClient, rows: Sequence) -> Validation: ...
    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]: ...
    def state_tensors(self) -> dict[str, torch.Tensor]: ...
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...
    def describe(self) -> str | None: ...


def validate_on_all_ranks(stage: Stage, client: TrainingClient, rows: Sequence) -> Validation:
    """The stage's validation of `rows`, each rank taking every world_size-th row, combined over the ranks (one
    process, or fewer rows than ranks: all rows here)."""
    n = world_size()
    if n == 1 or len(rows) < n:
        return stage.validate(client, rows)
    part = stage.validate(client, rows[rank()::n])
    keys = sorted(part.metrics)
    weight, *sums = all_sum([part.weight, *(part.metrics[k] * part.weight for k in keys)])
    return Validation({k: s / max(weight, 1e-12) for k, s in zip(keys, sums)}, weight)


def examples_per_step(config: TrainConfig) -> int:
    """What one optimizer step trains on, over all ranks (conversations, pairs, GRPO prompts)."""
    return config.batch_size * config.grad_accum * world_size()


def total_steps(config: TrainConfig, n_train: int) -> int:
    """max_steps, else the optimizer steps of `epochs` passes over the training rows (GRPO: each rollout of
    examples_per_step prompts trains grpo.iterations steps)."""
    if config.max_steps:
        return config.max_steps
    passes = max(1, math.ceil(config.epochs * n_train / examples_per_step(config)))
    return passes * (config.grpo.iterations if config.stage == "grpo" else 1)


def base_side_cache(config: TrainConfig):
    """Where the comparison keeps the base model's side between runs (compare_cache), with what that side depends
    on: the base's files (names, sizes, modification times), how it is stored and computed, and the versions."""
    import transformers

    from loraforge import __version__
    from loraforge.evaluate import BaseSideCache
    from loraforge.hardware import resolve_precision
    from loraforge.models import cache_dir, resolve_model_path

    if not config.compare_cache:
        return None
    folder = resolve_model_path(config.model)
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()}
    device, precision = resolve_precision(config)
    identity = {"model": str(folder.resolve()), "files": files, "quant": config.quant, "base_dtype": config.base_dtype,
                "precision": precision.name, "device": device.type,
                "versions": {"loraforge": __version__, "torch": torch.__version__,
                             "transformers": transformers.__version__}}
    return BaseSideCache(cache_dir() / "comparisons", identity)
