"""Fine-tuning, top to bottom: the run folder → base model and the stage's data → what trains → the steps →
validation and the best adapter → checkpoints → the last adapter, metrics and learning curve.

    result = train(load_train_config("job.yaml", ["lr=1e-3"]))

The parts live next to this file: run_folder.py (layout, refusing to mix runs, the resume fingerprint),
stage.py (what SFT, DPO and GRPO each bring: data, objective, micro-batches, validation), trainee.py (an adapter
or the whole model behind one protocol), client.py (forward_backward / optim_step / sample), step.py (one
optimizer step, no I/O), checkpoint.py (crash-safe checkpoints), state.py (the typed training state), log.py
(metrics, TensorBoard).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from loraforge.advise import (adapter_layout, capacity_advice, nats_to_bits, print_advice, target_tokens_of,
                              training_advice)
from loraforge.atomic import write_folder, write_text
from loraforge.config import TrainConfig
from loraforge.console import make_console
from loraforge.distributed import (active, any_rank, is_main, join, leave, lost_peer, main_first, on_main, rank,
                                   step_seed, world_size, wrap)
from loraforge.errors import ConfigError, TrainingError
from loraforge.estimate import checkpointing_needed, free_memory
from loraforge.hardware import (COMPACT_THRESHOLD, LARGE_BLOCK_THRESHOLD, autocast_dtype, autocast_for,
                                compact_cpu_allocator, grad_scaler_for, resolve_precision)
from loraforge.lora import LoraModel
from loraforge.models import load_model
from loraforge.optim import build_optimizer, build_scheduler
from loraforge.train.checkpoint import load_checkpoint, save_checkpoint, stage_tensors
from loraforge.train.client import LogprobsModule, TrainingClient
from loraforge.train.log import MetricsLog, plot_learning_curve
from loraforge.train.run_folder import RunFolder
from loraforge.train.stage import Stage, examples_per_step, total_steps, validate_on_all_ranks
from loraforge.train.stages import stage_for
from loraforge.train.state import TrainingState
from loraforge.train.step import train_step
from loraforge.train.trainee import AdapterTrainee, build_trainee


@dataclass
class TrainResult:
    output: Path
    steps: int
    stopped: str  # "max_steps", "early_stopping", "interrupted"
    adapter: Path  # the last adapter, or with finetune=full the last whole model
    best_adapter: Path | None
    final_val_loss: float | None  # of the last adapter (None when the run was interrupted before evaluating it)
    best_val_loss: float | None  # stage=grpo: these two are the mean validation reward (see val_metric)
    skipped_steps: int
    seconds: float
    dataset_bits: float | None = None  # the capacity advisor's information, measured over the first epoch
    losses: list[float] = field(default_factory=list)  # this process's steps
    lora: LoraModel | None = field(default=None, repr=False)  # with keep_model: the trained model, live
    tokenizer: object = field(default=None, repr=False)
    stage: str = "sft"
    val_metric: str = "loss"  # what final_val_loss / best_val_loss hold: the loss, or for grpo the reward
    world_size: int = 1  # processes that trained together (torchrun)
    rank: int = 0  # this process's rank among them: only rank 0 compares and reports after training


@contextmanager
def peers_answering(config: TrainConfig, run: RunFolder, state: TrainingState) -> Iterator[None]:
    """A collective that failed because another rank died or hung past distributed.timeout_s — in a step, the
    stop poll after it, validation or a checkpoint's gathering — ends the job with what happened and what to do."""
    try:
        yield
    except RuntimeError as error:
        if not lost_peer(error):
            raise
        raise TrainingError(
            f"rank {rank()}: the other ranks stopped answering after step {state.step} (a rank died, or hung longer "
            f"than distributed.timeout_s={config.distributed.timeout_s:g}): {str(error).strip().splitlines()[0]}. "
            f"The last complete checkpoint in {run.checkpoints} is intact; continue with resume=true") from error


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


# Validation at each interval costs at most this share of the interval's training compute (a row's forward is
# ~1/3 of its forward + backward); the sample is never smaller than MIN_VALIDATION_ROWS rows.
VALIDATION_SHARE = 0.10
MIN_VALIDATION_ROWS = 16


def default_eval_every(config: TrainConfig, steps: int) -> int:
    """Ten validations a run, but intervals no shorter than one whose smallest sample (MIN_VALIDATION_ROWS) still
    costs at most VALIDATION_SHARE of its training (short runs and small batches validate less often)."""
    shortest = math.ceil(MIN_VALIDATION_ROWS / (3 * VALIDATION_SHARE * examples_per_step(config)))
    return max(1, steps // 10, shortest)


def validation_sample_size(config: TrainConfig, eval_every: int, n_validation: int) -> int:
    if config.val_samples:
        return min(config.val_samples, n_validation)
    trained = eval_every * examples_per_step(config)
    return min(n_validation, max(MIN_VALIDATION_ROWS, round(3 * VALIDATION_SHARE * trained)))


def evenly_spaced(items: list, k: int) -> tuple[list, list]:
    """(k items spread evenly over the list, the others), both in list order."""
    chosen = {round(i * len(items) / k) for i in range(k)} if k else set()
    return ([x for i, x in enumerate(items) if i in chosen], [x for i, x in enumerate(items) if i not in chosen])


def resolve_checkpointing(config: TrainConfig, model_config, device: torch.device, precision: str,
                          say: Callable[[str], None]) -> TrainConfig:
    """gradient_checkpointing=auto decided on this device, the base loaded: the config with true or false. Every
    rank takes the same decision (on where one rank needs it); the processes of one host share its RAM."""
    if config.gradient_checkpointing != "auto":
        return config
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if device.type == "cpu" else 1
    needed, why = checkpointing_needed(config, model_config, free_memory(device), precision, sharing,
                                       world_size())
    on = any_rank(needed)
    say(f"gradient checkpointing {'on' if on else 'off'} (auto: {why})")
    return config.model_copy(update={"gradient_checkpointing": on})


def _open_run(config: TrainConfig, console: Console) -> str | None:
    """Rank 0's part of opening the run folder: the checkpoint to resume from, as a path every rank can read."""
    _, checkpoint = RunFolder.open(config, console.print)
    return None if checkpoint is None else str(checkpoint)


def measured_information(state: TrainingState, train_targets: int) -> tuple[float, str] | None:
    """(bits, how) of the dataset's information from training's own log-loss over its first epoch: the
    prequential code length, scaled up when the run ended inside the epoch."""
    if not state.first_epoch_targets:
        return None
    seen = min(1.0, state.first_epoch_targets / max(train_targets, 1))
    bits = nats_to_bits(state.first_epoch_nats / state.first_epoch_targets, train_targets)
    how = ("measured: training log-loss over the first epoch" if seen >= 1.0 else
           f"measured: training log-loss over the {seen:.0%} of the first epoch trained, scaled to all of it")
    return bits, how


def train(config: TrainConfig, console: Console | None = None, keep_model: bool = False) -> TrainResult:
    """Run the job. With `keep_model`, the result holds the trained LoraModel and tokenizer (the comparison
    after training reuses them instead of loading a second copy). Under torchrun every rank calls this; rank 0
    alone writes the run folder and talks (distributed.py)."""
    started = time.perf_counter()
    full = config.finetune == "full"
    if full and config.quant != "none":
        raise ConfigError(f"finetune=full trains float weights: it cannot use quant={config.quant}")
    device, precision = resolve_precision(config)
    device = join(device, config.distributed.timeout_s)
    console = (console or make_console()) if is_main() else Console(quiet=True)
    resume = on_main(lambda: _open_run(config, console))
    run, resume_from = RunFolder(Path(config.output)), Path(resume) if resume else None
    if world_size() > 1:
        console.print(f"{world_size()} processes ({config.distributed.strategy}): {examples_per_step(config)} examples "
                      f"per step ({config.batch_size} × {config.grad_accum} on each)")
    amp_dtype = autocast_dtype(precision)
    console.print(f"precision: {precision.name} on {device.type} ({precision.why}); adapters and optimizer state fp32")
    if device.type == "cpu":
        compact_cpu_allocator(COMPACT_THRESHOLD if config.compact_cpu_memory else LARGE_BLOCK_THRESHOLD)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # Base model, the stage's data, what trains.
    stage: Stage = stage_for(config, device)  # first: a reward that does not load fails before the model does
    with main_first():  # a first-use conversion of the default model runs once
        model, tokenizer = load_model(config.model, device=device, quant=config.quant)
    data = stage.prepare(config, tokenizer, run.root, console.print)
    console.print(data.summary)
    steps = total_steps(config, len(data.train))
    config = resolve_checkpointing(config, model.config, device, precision.name, console.print)
    trainee = build_trainee(config, model, tokenizer, steps, amp_dtype, console.print)
    console.print(trainee.describe())
    optimizer = build_optimizer(trainee.parameter_groups(config), config)
    scheduler = build_scheduler(optimizer, config, steps)
    parallel = None
    if active():  # torchrun, even with one process (a single-GPU run of the same path)
        parallel = wrap(LogprobsModule(model), config.distributed.strategy, trainee.trainable(), device, amp_dtype)
        console.print(parallel.describe())
    client = TrainingClient(trainee, optimizer, scheduler, scaler=grad_scaler_for(device, amp_dtype),
                            autocast=autocast_for(device, amp_dtype), max_grad_norm=config.max_grad_norm,
                            tokenizer=tokenizer, parallel=parallel)
    if (line := stage.describe()) is not None:
        console.print(line)

    layout = adapter_layout(trainee.lora) if isinstance(trainee, AdapterTrainee) else None
    print_advice(training_advice(config, model.config, layout, steps, data.train_bits, data.bits_source), console)
    sft = stage.name == "sft"
    train_targets = target_tokens_of(data.train) if sft else 0

    state = TrainingState()
    if resume_from is not None:
        state = load_checkpoint(resume_from, trainee, optimizer, scheduler)
        stage.load_state_tensors(stage_tensors(resume_from))
        console.print(f"resumed from {resume_from} (step {state.step})")
    client.steps = state.step
    metrics = MetricsLog(run.metrics if is_main() else None, run.tensorboard if config.tensorboard else None,
                         state.step if resume_from is not None else None)
    eval_every = config.eval_every or default_eval_every(config, steps)
    # The same rows at every interval (comparable: best/ and patience go by them), the whole split at the end.
    n_validation = len(data.validation)
    sample, rest = evenly_spaced(data.validation, validation_sample_size(config, eval_every, n_validation))
    if n_validation:
        console.print(f"validation: {len(sample)} of {n_validation} rows every {eval_every} steps"
                      + (f", all {n_validation} at the end" if rest else ""))
    better = (lambda a, b: a > b) if stage.higher_is_better else (lambda a, b: a < b)

    def validate(full: bool) -> float | None:
        """The validation sample's figure (what best/ and patience compare); with `full`, also the whole split's,
        which becomes the adapter's validation figure."""
        if not sample:
            return None
        part = validate_on_all_ranks(stage, client, sample)
        whole = part.combined(validate_on_all_ranks(stage, client, rest)) if full and rest else part
        figures = stage.finish_metrics(whole.metrics)
        rows = n_validation if full else len(sample)
        metrics.log(state.step, **{f"val_{k}": v for k, v in figures.items()}, val_rows=rows,
                    **{f"val_sample_{stage.metric}": part.metrics[stage.metric]})
        value = figures[stage.metric]
        if full or not rest:
            state.last_val_loss, state.last_val_step = value, state.step
        extra = "".join(f", {k} {v:.4f}" for k, v in figures.items() if k not in (stage.metric, "perplexity"))
        console.print(f"step {state.step}: validation {stage.metric} {value:.4f}{extra} "
                      f"({'all' if rows == n_validation else f'{rows} of'} {n_validation} rows)", highlight=False)
        return part.metrics[stage.metric]

    def keep_if_best(val: float) -> bool:
        """Save the adapter to best/ when it improves; True when patience has run out."""
        if state.best_val_loss is None or better(val, state.best_val_loss):
            state.best_val_loss, state.evals_without_improvement = val, 0
            if is_main():
                write_folder(run.best, trainee.save)  # weights and config appear together
            return False
        state.evals_without_improvement += 1
        return bool(config.patience and state.evals_without_improvement >= config.patience)

    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(),
               TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    stopped, losses = "max_steps", []
    per_step, n_train = examples_per_step(config), len(data.train)
    with StopRequest() as stop, Progress(*columns, console=console, transient=False) as progress, \
            peers_answering(config, run, state):
        bar = progress.add_task("train", total=steps, completed=state.step, loss="-", lr="-", speed="-")
        while state.step < steps:
            tick = time.perf_counter()
            step_seed(config.seed, state.step)
            result = train_step(client, stage.micro_batches(client, state), stage.objective)
            if result.applied:
                if sft and state.consumed - per_step < n_train:  # this step started inside the first epoch
                    state.first_epoch_nats += result.loss * result.targets
                    state.first_epoch_targets += result.targets
                state.step, state.bad_in_row = state.step + 1, 0
                losses.append(result.loss)
                if sft and state.step == 1 and layout is not None:
                    # The adapter starts as a no-op, so step 1's loss is the base's on its rows: an estimate of
                    # the dataset's information before anything is learned, at no extra cost.
                    print_advice([capacity_advice(nats_to_bits(result.loss, train_targets), layout, config.lora.r,
                                                  f"estimated from the base model's loss on step 1's "
                                                  f"{per_step} rows")], progress.console)
                seconds = time.perf_counter() - tick
                lr = optimizer.param_groups[0]["lr"]
                metrics.log(state.step, train_loss=result.loss, lr=lr, tokens_per_s=result.tokens / seconds,
                            grad_norm=result.grad_norm, step_s=seconds,
                            **{f"train_{k}": v for k, v in {**result.stats, **stage.step_stats()}.items()})
                progress.update(bar, completed=state.step, loss=f"{result.loss:.4f}", lr=f"{lr:.2e}",
                                speed=f"{result.tokens / seconds:.0f}")
                if state.step % eval_every == 0 or state.step == steps:
                    val = validate(full=state.step == steps)
                    if val is not None and keep_if_best(val):
                        stopped = "early_stopping"
            else:  # a NaN/inf step changed nothing; a run of them means the run is broken
                state.skipped_steps, state.bad_in_row = state.skipped_steps + 1, state.bad_in_row + 1
                console.print(f"[yellow]step {state.step + 1}: loss is {result.loss}; step skipped[/]")
                if state.bad_in_row >= config.max_bad_steps:
                    raise TrainingError(
                        f"loss was NaN/inf for {state.bad_in_row} steps in a row (at step {state.step + 1}); lower "
                        f"lr, check the data, or use precision=fp32. The last complete checkpoint in "
                        f"{run.checkpoints} is intact.")
            if any_rank(stop.requested):  # all ranks stop after the same step
                stopped = "interrupted"
            if (config.save_every and result.applied and state.step % config.save_every == 0) \
                    or state.step == steps or stopped != "max_steps":
                extra = stage.state_tensors()  # (gathered from every rank)
                try:
                    if is_main():
                        save_checkpoint(run.checkpoints, trainee, optimizer, scheduler, state, config.keep_checkpoints,
                                        extra)
                except OSError as error:  # a full disk, a lost mount: nothing earlier is touched
                    raise TrainingError(f"could not write the checkpoint of step {state.step} in {run.checkpoints}: "
                                        f"{error}. The checkpoints before it are intact; free space and resume=true"
                                        ) from error
            if stopped != "max_steps":
                break

    for line in trainee.finish():
        console.print(line)  # AdaLoRA: pruned to its final allocation, per-layer ranks
    if stopped != "interrupted" and state.last_val_step != state.step:
        validate(full=True)  # the final adapter's own validation figure (early stopping ends between full ones)
    information = measured_information(state, train_targets) if sft else None
    if information is not None and layout is not None:
        bits, source = information
        print_advice([capacity_advice(bits, layout, config.lora.r, source)], console)
    if is_main():
        write_folder(run.last(full), trainee.save)
    rows = metrics.rows()
    metrics.close()
    if is_main():
        plot_learning_curve(rows, run.learning_curve)
    # FSDP's sharded base cannot run alone: the comparison after training loads the model afresh on rank 0.
    live = keep_model and isinstance(trainee, AdapterTrainee) and (parallel is None or parallel.strategy == "ddp")
    final_val = state.last_val_loss if state.last_val_step == state.step else None
    result = TrainResult(
        output=run.root, steps=state.step, stopped=stopped, adapter=run.last(full),
        best_adapter=run.best if state.best_val_loss is not None else None, final_val_loss=final_val,
        best_val_loss=state.best_val_loss, skipped_steps=state.skipped_steps,
        seconds=time.perf_counter() - started, dataset_bits=information[0] if information else data.train_bits,
        losses=losses, lora=trainee.lora if live else None, tokenizer=tokenizer if keep_model else None,
        stage=stage.name, val_metric=stage.metric, world_size=world_size(), rank=rank())
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items()
               if k not in ("losses", "lora", "tokenizer")}
    if is_main():
        write_text(run.summary, json.dumps(summary, indent=1))
    console.print(f"done: {state.step} steps ({stopped}) in {result.seconds:.0f}s; {run.last(full).name} in "
                  f"{result.adapter}" + (f"; best on the validation sample: {stage.metric} {result.best_val_loss:.4f} "
                                         f"in {run.best}" if result.best_val_loss is not None else ""))
    # DDP's reducer goes while the process group lives (freed after it, it destroyed the group while holding the
    # GIL that gloo's threads needed to finish: a rank that never exited); rank 0 then compares alone.
    client = parallel = None
    leave()
    return result
