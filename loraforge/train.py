"""Supervised fine-tuning of a LoRA adapter, top to bottom:

config → base model + tokenizer → conversations → token examples (assistant-only labels) → adapter →
steps (micro-batches, masked cross-entropy, clip, AdamW, schedule) → validation / early stopping →
checkpoints → adapter folder, metrics, learning curve.
With finetune=full every weight trains instead (same data, loss, schedule and evaluation) and the run writes
whole models (model/, best/) and no checkpoints.

The run folder (`config.output`) ends up holding: config.yaml, data/ (the splits as used),
data_report.json, adapter/ (last), best/ (lowest validation loss), checkpoints/, metrics.jsonl,
tensorboard/, learning_curve.png and summary.json.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from loraforge.advise import adapter_layout, dataset_bits, print_advice, training_advice
from loraforge.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from loraforge.config import TrainConfig, config_to_yaml
from loraforge.console import make_console
from loraforge.data import PreparedData, collate, example_order, prepare_data, write_jsonl
from loraforge.demo import DEMO_DATA
from loraforge.errors import ConfigError, TrainingError
from loraforge.evaluate import causal_lm_loss, evaluate_loss
from loraforge.hardware import Precision, auto_precision
from loraforge.lora import LoraModel
from loraforge.models import DEFAULT_MODEL_HUB_ID, is_default_model, load_model, release_checkpoint_mapping
from loraforge.optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    output: Path
    steps: int
    stopped: str  # "max_steps", "early_stopping", "interrupted"
    adapter: Path  # the last adapter, or with finetune=full the last whole model
    best_adapter: Path | None
    final_val_loss: float | None
    best_val_loss: float | None
    skipped_steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


class FullFineTune(nn.Module):
    """finetune=full: every weight of the base trains. It offers what the loop calls on a LoraModel (the wrapped
    `model`, the two method hooks, `save`), so one loop serves both; `save` writes the whole model (safetensors)
    with its tokenizer, a folder AutoModelForCausalLM.from_pretrained loads."""

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model.requires_grad_(True)
        self.tokenizer = tokenizer

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def regularization_loss(self) -> None:
        return None

    def after_optimizer_step(self, step: int) -> None:
        pass

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)


# precision / base_dtype names → torch dtype; fp32 is None: no autocast, weights left as loaded
HALF_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(config: TrainConfig) -> tuple[torch.device, torch.dtype | None]:
    """The device and the autocast dtype (None: plain fp32)."""
    device, precision = resolve_precision(config)
    return device, HALF_DTYPES[precision.name]


def resolve_precision(config: TrainConfig) -> tuple[torch.device, Precision]:
    """The device and the precision to compute in, with the reason (auto: probed, see hardware.py)."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: CUDA was asked for but no GPU is visible")
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision: fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if config.precision == "auto":
        return device, auto_precision(device)
    return device, Precision(config.precision, "set in the config")


def compact_cpu_allocator() -> bool:
    """Fix glibc's mmap threshold at 128 KiB (True if it took). By default the threshold grows with every freed
    large block up to 32 MB, so activation-sized tensors come from the heap, which fragments and keeps freed
    memory: on the demo job the peak RSS fell from 2,686 to 1,857 MB with the fixed threshold. The price is a
    fresh, zeroed page for every new tensor: steps measured 1.3–1.8× slower on this project's VM, hence opt-in.
    Neither same-shape batches nor preallocated gradients and optimizer state reduce the heap's slack (measured
    with mallinfo2: ~500 MB free but unusable at each step's peak), so this is the lever there is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to do
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 128 * 1024))


def frozen_storage_dtype(config: TrainConfig, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype to keep adapted layers' frozen weights in, None to leave them as loaded (fp32)."""
    if config.base_dtype == "auto":
        return amp_dtype  # autocast casts them to this in every matmul anyway: storing it loses nothing
    return HALF_DTYPES[config.base_dtype]


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its step, checkpoint and exit; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsLog:
    """metrics.jsonl (+ TensorBoard). On resume, rows past the checkpoint's step are dropped first."""

    def __init__(self, output: Path, tensorboard: bool, resume_step: int | None) -> None:
        self.path = output / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step)

    def log(self, step: int, **values: float) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_learning_curve(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    from loraforge.report import learning_curve_figure

    fig = learning_curve_figure(rows)
    if fig is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def total_steps(config: TrainConfig, n_train: int) -> int:
    if config.max_steps:
        return config.max_steps
    return max(1, math.ceil(config.epochs * n_train / (config.batch_size * config.grad_accum)))


def save_run_inputs(config: TrainConfig, data: PreparedData) -> None:
    output = config.output
    (output / "config.yaml").write_text(config_to_yaml(config))
    for name in ("train", "validation", "test"):
        write_jsonl(getattr(data, name).conversations, output / "data" / f"{name}.jsonl")
    (output / "data_report.json").write_text(json.dumps(data.report.to_dict(), indent=1))


def train(config: TrainConfig, console: Console | None = None) -> TrainResult:
    console = console or make_console()
    started = time.perf_counter()
    full = config.finetune == "full"
    if full and (config.resume or config.quant != "none"):
        raise ConfigError("finetune=full writes no checkpoints and trains float weights: it cannot resume=true or "
                          f"use quant={config.quant}")
    config.output.mkdir(parents=True, exist_ok=True)
    checkpoints = config.output / "checkpoints"
    existing = complete_checkpoints(checkpoints) if config.resume else []
    resume_from = existing[-1] if existing else None
    if config.resume and resume_from is None:
        console.print(f"[yellow]no complete checkpoint in {checkpoints}; starting from scratch[/]")
    device, precision = resolve_precision(config)
    amp_dtype = HALF_DTYPES[precision.name]
    console.print(f"precision: {precision.name} on {device.type} ({precision.why}); adapters and optimizer state fp32")
    if device.type == "cpu" and config.compact_cpu_memory:
        compact_cpu_allocator()
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # Model and data.
    model, tokenizer = load_model(config.model, device=device, quant=config.quant)
    data = prepare_data(config.data, tokenizer, config.max_seq_len, config.seed, default_path=DEMO_DATA)
    save_run_inputs(config, data)
    report = data.report
    console.print(f"data: {report.rows_read} rows read, {report.kept} kept ({report.rows_invalid} invalid, "
                  f"{report.duplicates_dropped} duplicates, {report.empty_turns_dropped} empty turns, "
                  f"{report.truncated} truncated) → train/validation/test {report.split_sizes}")

    # Adapter, optimizer, schedule.
    steps = total_steps(config, len(data.train.examples))
    base_name = DEFAULT_MODEL_HUB_ID if is_default_model(config.model) else config.model
    lora_config = config.lora.model_copy(update={"base_model_name_or_path": base_name})
    if lora_config.method == "adalora" and lora_config.adalora.total_step is None:
        lora_config.adalora = lora_config.adalora.model_copy(update={"total_step": steps})
    # `lora` is what trains: the adapter, or with finetune=full the whole model behind the same calls.
    lora = FullFineTune(model, tokenizer) if full else LoraModel(model, lora_config)
    lora.train()
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, which a frozen embedding never gives.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.20 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    storage = frozen_storage_dtype(config, amp_dtype)
    if storage is not None and not full:
        saved = lora.store_frozen_weights(storage)
        release_checkpoint_mapping(model)  # else the fp32 file stays resident behind the embedding's view
        if saved:
            console.print(f"frozen weights of adapted layers kept in {str(storage).removeprefix('torch.')}: "
                          f"{saved / 2**20:,.0f} MB saved")
    if full:
        console.print(f"full fine-tuning: {sum(p.numel() for p in lora.parameters()):,} trainable parameters")
    else:
        trainable, total = lora.trainable_parameters()
        console.print(f"adapter: r={lora_config.r} on {sum(1 for _ in lora.lora_layers())} layers, {trainable:,} "
                      f"trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    optimizer = build_optimizer(lora, config)
    scheduler = build_scheduler(optimizer, config, steps)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    layout = None if full else adapter_layout(lora)
    # The dataset's information (for the capacity advisor) is the base model's log-loss: a fresh adapter is the base.
    bits = None if full else dataset_bits(lora, data.train.examples, tokenizer.pad_token_id, config.batch_size, device,
                                          autocast)
    print_advice(training_advice(config, model.config, layout, steps, bits), console)

    state = {"consumed": 0, "best_val_loss": None, "evals_without_improvement": 0, "bad_in_row": 0,
             "skipped_steps": 0}
    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, lora, optimizer, scheduler)
        step = state.pop("step")
        console.print(f"resumed from {resume_from} (step {step})")
    metrics = MetricsLog(config.output, config.tensorboard, step if resume_from else None)
    eval_every = config.eval_every or max(1, steps // 10)
    pad_id = tokenizer.pad_token_id
    per_step = config.batch_size * config.grad_accum
    stopped, losses = "max_steps", []
    val = None

    def validate() -> float | None:
        if not data.validation.examples:
            return None
        result = evaluate_loss(lora, data.validation.examples, pad_id, config.batch_size, device, autocast)
        metrics.log(step, val_loss=result["loss"], val_perplexity=result["perplexity"])
        return result["loss"]

    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(),
               TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with StopRequest() as stop, Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("train", total=steps, completed=step, loss="-", lr="-", speed="-")
        while step < steps:
            tick = time.perf_counter()
            indices = example_order(len(data.train.examples), config.seed, state["consumed"], per_step)
            state["consumed"] += per_step
            micro_batches = [
                collate([data.train.examples[i] for i in indices[k : k + config.batch_size]], pad_id, config.packing)
                for k in range(0, per_step, config.batch_size)
            ]
            n_targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
            loss_sum = 0.0
            for batch in micro_batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast():
                    micro_loss, _ = causal_lm_loss(lora.model, batch)
                    regularization = lora.regularization_loss()  # AdaLoRA's orthogonality, else None
                scaled = micro_loss / max(n_targets, 1)
                if regularization is not None:
                    scaled = scaled + regularization / len(micro_batches)
                (scaler.scale(scaled) if scaler else scaled).backward()
                loss_sum += micro_loss.item()
            loss = loss_sum / max(n_targets, 1)

            if not math.isfinite(loss):
                # A NaN/inf step changes nothing; a run of them means the run is broken.
                optimizer.zero_grad(set_to_none=True)
                state["skipped_steps"] += 1
                state["bad_in_row"] += 1
                console.print(f"[yellow]step {step + 1}: loss is {loss}; step skipped[/]")
                if state["bad_in_row"] >= config.max_bad_steps:
                    raise TrainingError(
                        f"loss was NaN/inf for {state['bad_in_row']} steps in a row (at step {step + 1}); "
                        "lower lr, check the data, or use precision=fp32. The last complete checkpoint in "
                        f"{checkpoints} is intact.")
                continue
            state["bad_in_row"] = 0
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = (torch.nn.utils.clip_grad_norm_(lora.parameters(), config.max_grad_norm).item()
                         if config.max_grad_norm else float("nan"))
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lora.after_optimizer_step(step + 1)  # needs this step's gradients: before zero_grad
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)

            tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)  # real tokens, no padding
            seconds = time.perf_counter() - tick
            speed = tokens / seconds
            lr = optimizer.param_groups[0]["lr"]
            metrics.log(step, train_loss=loss, lr=lr, tokens_per_s=speed, grad_norm=grad_norm, step_s=seconds)
            progress.update(bar, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}", speed=f"{speed:.0f}")

            if step % eval_every == 0 or step == steps:
                val = validate()
                if val is not None:
                    progress.console.print(f"step {step}: validation loss {val:.4f}")
                    best = state["best_val_loss"]
                    if best is None or val < best:
                        state["best_val_loss"], state["evals_without_improvement"] = val, 0
                        lora.save(config.output / "best")
                    else:
                        state["evals_without_improvement"] += 1
                        if config.patience and state["evals_without_improvement"] >= config.patience:
                            stopped = "early_stopping"
            if not full and ((config.save_every and step % config.save_every == 0) or step == steps
                             or stop.requested or stopped != "max_steps"):
                save_checkpoint(checkpoints, step, lora, optimizer, scheduler, state, config.keep_checkpoints)
            if stop.requested:
                stopped = "interrupted"
            if stopped != "max_steps":
                break

    last_dir = config.output / ("model" if full else "adapter")
    for controller in getattr(lora, "controllers", {}).values():
        console.print(controller.finish())  # AdaLoRA: prune to the final allocation, report per-layer ranks
    lora.save(last_dir)
    best_dir = config.output / "best"
    rows = metrics.rows()
    metrics.close()
    plot_learning_curve(rows, config.output / "learning_curve.png")
    result = TrainResult(
        output=config.output, steps=step, stopped=stopped, adapter=last_dir,
        best_adapter=best_dir if best_dir.exists() else None, final_val_loss=val,
        best_val_loss=state["best_val_loss"], skipped_steps=state["skipped_steps"],
        seconds=time.perf_counter() - started, losses=losses)
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items() if k != "losses"}
    (config.output / "summary.json").write_text(json.dumps(summary, indent=1))
    console.print(f"done: {step} steps ({stopped}) in {result.seconds:.0f}s; {last_dir.name} in {result.adapter}"
                  + (f"; best validation loss {result.best_val_loss:.4f} in {best_dir}" if result.best_val_loss
                     is not None else ""))
    return result
