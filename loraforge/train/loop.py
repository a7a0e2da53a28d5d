"""Supervised fine-tuning, top to bottom: the run folder → base model and data → what trains → the steps →
validation and the best adapter → checkpoints → the last adapter, metrics and learning curve.

    result = train(load_train_config("job.yaml", ["lr=1e-3"]))

The parts live next to this file: run_folder.py (layout, refusing to mix runs, the resume fingerprint),
trainee.py (an adapter or the whole model behind one protocol), step.py (one optimizer step, no I/O),
checkpoint.py (crash-safe checkpoints), state.py (the typed training state), log.py (metrics, TensorBoard).
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loraforge.advise import adapter_layout, dataset_bits, print_advice, training_advice
from loraforge.atomic import write_folder, write_text
from loraforge.config import TrainConfig
from loraforge.console import make_console
from loraforge.data import PreparedData, collate, example_order, prepare_data, write_jsonl
from loraforge.demo import DEMO_DATA
from loraforge.errors import ConfigError, TrainingError
from loraforge.evaluate import evaluate_loss
from loraforge.hardware import (autocast_dtype, autocast_for, compact_cpu_allocator, frozen_storage_dtype,
                                grad_scaler_for, resolve_precision)
from loraforge.lora import DEFAULT_ADAPTER, LoraModel
from loraforge.memory import release_checkpoint_mapping
from loraforge.models import DEFAULT_MODEL_HUB_ID, enable_gradient_checkpointing, is_default_model, load_model
from loraforge.optim import build_optimizer, build_scheduler
from loraforge.train.checkpoint import load_checkpoint, save_checkpoint
from loraforge.train.log import MetricsLog, plot_learning_curve
from loraforge.train.run_folder import RunFolder
from loraforge.train.state import TrainingState
from loraforge.train.step import train_step
from loraforge.train.trainee import AdapterTrainee, FullModelTrainee, Trainee


@dataclass
class TrainResult:
    output: Path
    steps: int
    stopped: str  # "max_steps", "early_stopping", "interrupted"
    adapter: Path  # the last adapter, or with finetune=full the last whole model
    best_adapter: Path | None
    final_val_loss: float | None  # of the last adapter (None when the run was interrupted before evaluating it)
    best_val_loss: float | None
    skipped_steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)  # this process's steps


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its step, checkpoint and exit; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def total_steps(config: TrainConfig, n_train: int) -> int:
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(config.epochs * n_train / (config.batch_size * config.grad_accum)))


def save_run_inputs(root: Path, data: PreparedData) -> None:
    for name in ("train", "validation", "test"):
        write_jsonl(getattr(data, name).conversations, root / "data" / f"{name}.jsonl")
    write_text(root / "data_report.json", json.dumps(data.report.to_dict(), indent=1))


def build_trainee(config: TrainConfig, model: torch.nn.Module, tokenizer, steps: int,
                  amp_dtype: torch.dtype | None, say: Callable[[str], None]) -> Trainee:
    if config.finetune == "full":
        trainee = FullModelTrainee(model, tokenizer)
    else:
        base_name = DEFAULT_MODEL_HUB_ID if is_default_model(config.model) else config.model
        lora_config = config.lora.model_copy(update={"base_model_name_or_path": base_name})
        if lora_config.method == "adalora" and lora_config.adalora.total_step is None:
            lora_config.adalora = lora_config.adalora.model_copy(update={"total_step": steps})
        lora = LoraModel(model, lora_config)
        lora.train()
        trainee = AdapterTrainee(lora, DEFAULT_ADAPTER)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    storage = frozen_storage_dtype(config, amp_dtype)
    if storage is not None and isinstance(trainee, AdapterTrainee):
        saved = trainee.lora.store_frozen_weights(storage)
        release_checkpoint_mapping(model)  # else the fp32 file stays resident behind the embedding's view
        if saved:
            say(f"frozen weights of adapted layers kept in {str(storage).removeprefix('torch.')}: "
                f"{saved / 2**20:,.0f} MB saved")
    return trainee


def next_micro_batches(data: PreparedData, config: TrainConfig, state: TrainingState, pad_id: int,
                       device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The next step's micro-batches from the seeded data order; advances state.consumed."""
    per_step = config.batch_size * config.grad_accum
    indices = example_order(len(data.train.examples), config.seed, state.consumed, per_step)
    state.consumed += per_step
    examples = data.train.examples
    return [{k: v.to(device) for k, v in collate([examples[i] for i in indices[k0 : k0 + config.batch_size]],
                                                 pad_id, config.packing).items()}
            for k0 in range(0, per_step, config.batch_size)]


def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    console = console or make_console()
    started = time.perf_counter()
    full = config.finetune == "full"
    if full and config.quant != "none":
        raise ConfigError(f"finetune=full trains float weights: it cannot use quant={config.quant}")
    run, resume_from = RunFolder.open(config, console.print)
    device, precision = resolve_precision(config)
    amp_dtype = autocast_dtype(precision)
    console.print(f"precision: {precision.name} on {device.type} ({precision.why}); adapters and optimizer state fp32")
    if device.type == "cpu" and config.compact_cpu_memory:
        compact_cpu_allocator()
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # Base model, data, what trains.
    model, tokenizer = load_model(config.model, device=device, quant=config.quant)
    data = prepare_data(config.data, tokenizer, config.max_seq_len, config.seed, default_path=DEMO_DATA)
    save_run_inputs(run.root, data)
    report = data.report
    console.print(f"data: {report.rows_read} rows read, {report.kept} kept ({report.rows_invalid} invalid, "
                  f"{report.duplicates_dropped} duplicates, {report.empty_turns_dropped} empty turns, "
                  f"{report.truncated} truncated) → train/validation/test {report.split_sizes}")
    steps = total_steps(config, len(data.train.examples))
    trainee = build_trainee(config, model, tokenizer, steps, amp_dtype, console.print)
    console.print(trainee.describe())
    optimizer = build_optimizer(trainee.parameter_groups(config), config)
    scheduler = build_scheduler(optimizer, config, steps)
    scaler = grad_scaler_for(device, amp_dtype)
    autocast = autocast_for(device, amp_dtype)

    if isinstance(trainee, AdapterTrainee):
        # The dataset's information (for the capacity advisor) is the base's log-loss: a fresh adapter is the base.
        bits = dataset_bits(trainee.lora, data.train.examples, tokenizer.pad_token_id, config.batch_size, device, autocast)
        print_advice(training_advice(config, model.config, adapter_layout(trainee.lora), steps, bits), console)
    else:
        print_advice(training_advice(config, model.config, None, steps, None), console)

    state = TrainingState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, trainee, optimizer, scheduler)
        console.print(f"resumed from {resume_from} (step {state.step})")
    metrics = MetricsLog(run.metrics, run.tensorboard if config.tensorboard else None,
                         state.step if resume_from is not None else None)
    eval_every = config.eval_every or max(1, steps // 10)

    def validate() -> float | None:
        if not data.validation.examples:
            return None
        result = evaluate_loss(trainee.model, data.validation.examples, tokenizer.pad_token_id, config.batch_size, device,
                               autocast)
        metrics.log(state.step, val_loss=result["loss"], val_perplexity=result["perplexity"])
        state.last_val_loss, state.last_val_step = result["loss"], state.step
        return result["loss"]

    def keep_if_best(val: float) -> bool:
        """Save the adapter to best/ when it improves; True when patience has run out."""
        if state.best_val_loss is None or val < state.best_val_loss:
            state.best_val_loss, state.evals_without_improvement = val, 0
            write_folder(run.best, trainee.save)  # weights and config appear together
            return False
        state.evals_without_improvement += 1
        return bool(config.patience and state.evals_without_improvement >= config.patience)

    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(),
               TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    stopped, losses = "max_steps", []
    with StopRequest() as stop, Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("train", total=steps, completed=state.step, loss="-", lr="-", speed="-")
        while state.step < steps:
            tick = time.perf_counter()
            result = train_step(trainee, next_micro_batches(data, config, state, tokenizer.pad_token_id, device), optimizer, scheduler,
                                scaler, autocast, state.step + 1, config.max_grad_norm)
            if result.applied:
                state.step, state.bad_in_row = state.step + 1, 0
                losses.append(result.loss)
                seconds = time.perf_counter() - tick
                lr = optimizer.param_groups[0]["lr"]
                metrics.log(state.step, train_loss=result.loss, lr=lr, tokens_per_s=result.tokens / seconds,
                            grad_norm=result.grad_norm, step_s=seconds)
                progress.update(bar, completed=state.step, loss=f"{result.loss:.4f}", lr=f"{lr:.2e}",
                                speed=f"{result.tokens / seconds:.0f}")
                if state.step % eval_every == 0 or state.step == steps:
                    val = validate()
                    if val is not None:
                        progress.console.print(f"step {state.step}: validation loss {val:.4f}")
                        if keep_if_best(val):
                            stopped = "early_stopping"
            else:  # a NaN/inf step changed nothing; a run of them means the run is broken
                state.skipped_steps, state.bad_in_row = state.skipped_steps + 1, state.bad_in_row + 1
                console.print(f"[yellow]step {state.step + 1}: loss is {result.loss}; step skipped[/]")
                if state.bad_in_row >= config.max_bad_steps:
                    raise TrainingError(
                        f"loss was NaN/inf for {state.bad_in_row} steps in a row (at step {state.step + 1}); lower "
                        f"lr, check the data, or use precision=fp32. The last complete checkpoint in "
                        f"{run.checkpoints} is intact.")
            if stop.requested:
                stopped = "interrupted"
            if (config.save_every and result.applied and state.step % config.save_every == 0) \
                    or state.step == steps or stopped != "max_steps":
                try:
                    save_checkpoint(run.checkpoints, trainee, optimizer, scheduler, state, config.keep_checkpoints)
                except OSError as error:  # a full disk, a lost mount: nothing earlier is touched
                    raise TrainingError(f"could not write the checkpoint of step {state.step} in {run.checkpoints}: "
                                        f"{error}. The checkpoints before it are intact; free space and resume=true"
                                        ) from error
            if stopped != "max_steps":
                break

    for line in trainee.finish():
        console.print(line)  # AdaLoRA: pruned to its final allocation, per-layer ranks
    if stopped != "interrupted" and state.last_val_step != state.step:
        validate()  # the final adapter's own validation loss (early stopping and resumes end between evaluations)
    write_folder(run.last(full), trainee.save)
    rows = metrics.rows()
    metrics.close()
    plot_learning_curve(rows, run.learning_curve)
    final_val = state.last_val_loss if state.last_val_step == state.step else None
    result = TrainResult(
        output=run.root, steps=state.step, stopped=stopped, adapter=run.last(full),
        best_adapter=run.best if state.best_val_loss is not None else None, final_val_loss=final_val,
        best_val_loss=state.best_val_loss, skipped_steps=state.skipped_steps,
        seconds=time.perf_counter() - started, losses=losses)
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items() if k != "losses"}
    write_text(run.summary, json.dumps(summary, indent=1))
    console.print(f"done: {state.step} steps ({stopped}) in {result.seconds:.0f}s; {run.last(full).name} in "
                  f"{result.adapter}" + (f"; best validation loss {result.best_val_loss:.4f} in {run.best}"
                                         if result.best_val_loss is not None else ""))
    return result
