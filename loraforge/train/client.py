"""Training as primitives, the shape Tinker made familiar: a client for one adapter on a base model, with

    result = client.forward_backward(batch, "cross_entropy")   # or an Objective: DPO, policy gradient, your own
    client.optim_step()
    samples = client.sample(prompts, n=8, params=SamplingParams(max_new_tokens=32, temperature=1.0, logprobs=True))
    client.save_state("state/"); client.load_state("state/")

`loraforge train` is a recipe on these calls (step.py: forward_backward over a step's micro-batches, then
optim_step); so are its DPO and GRPO stages. Several clients on one `SharedBase` train their own adapters, and
`forward_backward_together` runs them in the same forward pass: each row goes through its own client's adapter
(LoraModel.mixed_batch), so each adapter's gradient comes only from its own rows.

    base = SharedBase.load("default")
    a = base.training_client("a", LoraConfig(r=1), lr=1e-4)
    b = base.training_client("b", LoraConfig(r=8), lr=2e-4)
    forward_backward_together([(a, batch_a, "cross_entropy"), (b, batch_b, dpo(0.1))])
    a.optim_step(); b.optim_step()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import increment_version

from loraforge.config import LoraConfig, TrainConfig
from loraforge.data import IGNORE_INDEX, Messages, prompt_ids
from loraforge.distributed import DataParallel
from loraforge.errors import LoraforgeError, TrainingError
from loraforge.loss import target_tokens, token_logprobs
from loraforge.lora import LoraModel
from loraforge.objectives import Batch, Objective, named_objective
from loraforge.optim import build_optimizer, build_scheduler
from loraforge.serve.engine import Engine, Failed, Generation, SamplingParams
from loraforge.train.trainee import AdapterTrainee, Trainee


@dataclass(frozen=True)
class ForwardBackwardResult:
    loss: float  # the objective's summed loss over the batch (divide by `count` for the mean)
    count: float  # what the objective normalises by: target tokens, pairs, sequences
    stats: dict[str, float]  # the objective's own sums (DPO: accuracy, margins; GRPO: clip fraction)
    logprobs: torch.Tensor  # log p(label) at each target position, row by row (detached)


@dataclass(frozen=True)
class Sample:
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[float, ...] | None  # per token, at the sampling temperature (with SamplingParams.logprobs)
    finish_reason: str


@dataclass(frozen=True)
class Datum:
    """One row for forward_backward in token form: `input_ids`, `labels` (IGNORE_INDEX where no loss is taken),
    and the objective's inputs: per-token lists (as long as input_ids, e.g. old_logprobs, weights) or per-row
    numbers (advantages, reference_logprobs)."""

    input_ids: list[int]
    labels: list[int]
    inputs: dict[str, list[float] | float] | None = None


def batch_of(rows: Sequence[Datum], pad_token_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-padded tensors of Datums: [B, T] for per-token inputs, [B] for per-row ones."""
    width = max(len(r.input_ids) for r in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
             "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        if len(row.labels) != n:
            raise ValueError(f"row {i}: {len(row.labels)} labels for {n} input ids")
        batch["input_ids"][i, :n] = torch.tensor(row.input_ids)
        batch["labels"][i, :n] = torch.tensor(row.labels)
        batch["attention_mask"][i, :n] = 1
    for key in sorted({k for r in rows for k in (r.inputs or {})}):
        values = [(r.inputs or {}).get(key) for r in rows]
        if any(v is None for v in values):
            raise ValueError(f"input {key!r} is missing from some rows")
        if isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values, dtype=torch.float32)
        else:
            batch[key] = torch.zeros((len(rows), width))
            for i, value in enumerate(values):
                batch[key][i, : len(value)] = torch.tensor(value, dtype=torch.float32)
    return {k: v.to(device) for k, v in batch.items()}


def concatenate(batches: Sequence[Batch]) -> Batch:
    """Stack batches row-wise, right-padding [B, T] tensors to the widest (padding is masked: no attention,
    no label, so every row computes as it did alone)."""
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"labels": IGNORE_INDEX}
    keys = set(batches[0])
    if any(set(b) != keys for b in batches) or keys & {"position_ids", "prompt_ids"}:
        raise LoraforgeError("batches run together need the same keys, no packing (position_ids) and no shared "
                             "prompts (prompt_ids)")
    joined = {}
    for key in keys:
        parts = []
        for b in batches:
            t = b[key]
            if t.dim() >= 2 and t.shape[1] == b["input_ids"].shape[1] and t.shape[1] < width:
                t = F.pad(t, (0, width - t.shape[1]), value=fill.get(key, 0))
            parts.append(t)
        joined[key] = torch.cat(parts)
    return joined


class LogprobsModule(nn.Module):
    """token_logprobs as a module: what DDP and FSDP2 wrap (their hooks run around a module's forward)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> torch.Tensor:
        return token_logprobs(self.model, batch)


def _as_batch(batch: Batch | Sequence[Datum], pad_token_id: int, device: torch.device) -> Batch:
    return batch if isinstance(batch, dict) else batch_of(batch, pad_token_id, device)


def _as_objective(loss: str | Objective) -> Objective:
    return named_objective(loss) if isinstance(loss, str) else loss


class TrainingClient:
    """One trainee (an adapter on a shared base, or a whole model), its optimizer and schedule."""

    def __init__(self, trainee: Trainee, optimizer: torch.optim.Optimizer, scheduler, *,
                 scaler: torch.amp.GradScaler | None = None,
                 autocast: Callable[[], AbstractContextManager] = nullcontext, max_grad_norm: float | None = 1.0,
                 tokenizer=None, base: SharedBase | None = None, parallel: DataParallel | None = None) -> None:
        self.trainee, self.optimizer, self.scheduler = trainee, optimizer, scheduler
        # Several ranks (torchrun): the loss runs through DDP / FSDP2, which keep the ranks' adapters equal.
        self.parallel = parallel
        self.scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
        self.autocast, self.max_grad_norm = autocast, max_grad_norm
        self.tokenizer, self.base = tokenizer, base
        self.steps = 0  # optimizer steps taken

    @property
    def model(self) -> torch.nn.Module:
        return self.trainee.model

    @property
    def adapter(self) -> str | None:
        return self.trainee.name if isinstance(self.trainee, AdapterTrainee) else None

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer is not None else 0

    def logprobs(self, batch: Batch) -> torch.Tensor:
        """token_logprobs of this client's model (through DDP / FSDP2 when there are several ranks)."""
        if self.parallel is not None:
            return self.parallel.module(batch)
        return token_logprobs(self.model, batch)

    def accumulating(self) -> AbstractContextManager:
        """Around every forward_backward of a step but its last: several ranks then exchange gradients once."""
        return self.parallel.no_sync() if self.parallel is not None else nullcontext()

    def _only_mine(self) -> AbstractContextManager:
        """This adapter alone active (other clients' adapters on the same base stay out of the forward)."""
        return self.trainee.lora.using(self.adapter) if self.adapter is not None else nullcontext()

    def forward_backward(self, batch: Batch | Sequence[Datum], loss: str | Objective = "cross_entropy",
                         scale: float | None = None) -> ForwardBackwardResult:
        """Gradients of `loss` over the batch, divided by `scale` (default: the batch's own count), added to the
        ones already accumulated; the optimizer does not move until optim_step()."""
        objective = _as_objective(loss)
        batch = _as_batch(batch, self._pad_id(), self._device())
        with self._only_mine(), self.autocast():
            logprobs = self.logprobs(batch)
            value, stats = objective.loss(logprobs, batch)
        count = objective.count(batch)
        self.scaler.scale(value / (scale or max(count, 1))).backward()
        return ForwardBackwardResult(float(value.detach()), count, stats, logprobs.detach())

    @torch.no_grad()
    def forward(self, batch: Batch | Sequence[Datum], loss: str | Objective = "cross_entropy",
                adapter: bool = True) -> ForwardBackwardResult:
        """The same numbers without gradients, in eval mode (no dropout); adapter=False: the base model (the
        reference of DPO and of GRPO's KL term)."""
        objective = _as_objective(loss)
        batch = _as_batch(batch, self._pad_id(), self._device())
        switch = self._only_mine() if adapter else self.trainee.lora.disable_adapters()
        was_training = self.model.training
        self.model.eval()
        try:
            with switch, self.autocast():
                logprobs = self.logprobs(batch)
                value, stats = objective.loss(logprobs, batch)
        finally:
            self.model.train(was_training)
        return ForwardBackwardResult(float(value), objective.count(batch), stats, logprobs)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optim_step(self, lr: float | None = None) -> float | None:
        """Apply the accumulated gradients (clipped to max_grad_norm): returns the gradient norm before clipping,
        or None without clipping. `lr` overrides the schedule for this step (each group keeps its ratio)."""
        if self.parallel is not None:
            self.parallel.reduce_gradients()
        with self.autocast():
            extra = self.trainee.extra_loss()  # AdaLoRA's orthogonality penalty: once per step
        if extra is not None:  # the same on every rank: added after the ranks' gradients were summed
            self.scaler.scale(extra).backward()
        if lr is not None:
            first = self.optimizer.param_groups[0]["initial_lr"]
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["initial_lr"] / first
        self.scaler.unscale_(self.optimizer)
        grad_norm = None
        if self.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.trainee.trainable()), self.max_grad_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # The fused AdamW kernel writes the parameters without bumping their version counters, and the layers'
        # no-grad caches (the stacked factors that sampling reuses) are keyed on those counters.
        increment_version(list(self.trainee.trainable()))
        self.steps += 1
        self.trainee.after_optimizer_step(self.steps)  # needs this step's gradients: before zero_grad
        self.scheduler.step()
        self.zero_grad()
        return grad_norm

    def sample(self, prompts: Sequence[Messages | list[int]], n: int = 1,
               params: SamplingParams | None = None, adapter: bool = True) -> list[list[Sample]]:
        """`n` completions of each prompt (chat messages or token ids) from this client's adapter (adapter=False:
        the base), all rows in one continuous batch. Seeded with params.seed: completion k of prompt i uses
        seed + i·n + k."""
        if self.base is None:
            raise LoraforgeError("sample() needs a client made by SharedBase.training_client")
        params = params or SamplingParams(max_new_tokens=64)
        return self.base.sample(prompts, n, params, self.adapter if adapter else None)

    def save_state(self, path: str | Path) -> Path:
        """The adapter, optimizer, schedule and RNG as a checkpoint folder (safetensors + JSON, written aside and
        renamed into place when complete)."""
        from loraforge.train.checkpoint import write_checkpoint
        from loraforge.train.state import TrainingState

        return write_checkpoint(Path(path), self.trainee, self.optimizer, self.scheduler, TrainingState(step=self.steps))

    def load_state(self, path: str | Path) -> None:
        from loraforge.train.checkpoint import load_checkpoint, verify_checkpoint

        problem = verify_checkpoint(Path(path))
        if problem is not None:
            raise TrainingError(f"{path}: not a complete checkpoint ({problem})")
        self.steps = load_checkpoint(Path(path), self.trainee, self.optimizer, self.scheduler).step


def forward_backward_together(items: Sequence[tuple[TrainingClient, Batch | Sequence[Datum], str | Objective]]
                              ) -> list[ForwardBackwardResult]:
    """One forward and one backward for several clients of the same base: row i runs its own client's adapter,
    and each client's loss is computed on its own rows, so each adapter receives exactly the gradient its own
    forward_backward would give (to fp32 summation order)."""
    clients = [client for client, _, _ in items]
    lora = clients[0].trainee.lora
    if any(c.adapter is None or c.trainee.lora is not lora for c in clients):
        raise LoraforgeError("forward_backward_together needs adapter clients of one SharedBase")
    if len({c.adapter for c in clients}) != len(clients):
        raise LoraforgeError("each client may appear once in forward_backward_together")
    for client in clients:
        refusal = lora.mixed_batch_refusal(client.adapter)
        if refusal:
            raise LoraforgeError(f"adapter {client.adapter!r} cannot share a forward with others: {refusal}")
    device = clients[0]._device()
    batches = [_as_batch(batch, client._pad_id(), device) for client, batch, _ in items]
    objectives = [_as_objective(loss) for _, _, loss in items]
    joined = concatenate(batches)
    per_row = [client.adapter for client, b in zip(clients, batches) for _ in range(b["input_ids"].shape[0])]
    with lora.mixed_batch(per_row), clients[0].autocast():
        logprobs = token_logprobs(lora.model, joined)
        results, total, start = [], 0.0, 0
        for client, batch, objective in zip(clients, batches, objectives):
            n = target_tokens(batch)
            own = logprobs[start : start + n]
            start += n
            value, stats = objective.loss(own, batch)
            count = objective.count(batch)
            total = total + client.scaler.scale(value / max(count, 1))
            results.append(ForwardBackwardResult(float(value.detach()), count, stats, own.detach()))
    total.backward()
    return results


class SharedBase:
    """One base model in memory with any number of adapters on it: training clients, sampling, and the serving
    engine's continuous batches (every row with its own adapter or none)."""

    def __init__(self, lora: LoraModel, tokenizer, autocast: Callable[[], AbstractContextManager] = nullcontext):
        self.lora, self.tokenizer, self.autocast = lora, tokenizer, autocast
        self._engine: Engine | None = None

    @classmethod
    def load(cls, model: str = "default", device: str = "auto", quant: str = "none") -> SharedBase:
        from loraforge.hardware import resolve_device
        from loraforge.models import load_model

        base, tokenizer = load_model(model, device=resolve_device(device), quant=quant)
        return cls(LoraModel(base), tokenizer)

    def training_client(self, name: str, lora: LoraConfig | None = None, lr: float = 1e-4, *,
                        weight_decay: float = 0.0, max_grad_norm: float | None = 1.0) -> TrainingClient:
        """A new adapter `name` (a no-op until trained) with its own AdamW at a constant `lr`."""
        config = TrainConfig(lr=lr, weight_decay=weight_decay, schedule="constant", max_grad_norm=max_grad_norm,
                             lora=lora or LoraConfig())
        self.lora.add_adapter(name, config.lora)
        self.lora.train()
        trainee = AdapterTrainee(self.lora, name)
        optimizer = build_optimizer(trainee.parameter_groups(config), config)
        return TrainingClient(trainee, optimizer, build_scheduler(optimizer, config, 1), autocast=self.autocast,
                              max_grad_norm=max_grad_norm, tokenizer=self.tokenizer, base=self)

    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.lora, self.tokenizer, max_batch=64)
        return self._engine

    def prompt_ids(self, prompt: Messages | list[int]) -> list[int]:
        if prompt and isinstance(prompt[0], int):
            return list(prompt)
        return prompt_ids(self.tokenizer, prompt)

    @torch.no_grad()
    def sample(self, prompts: Sequence[Messages | list[int]], n: int, params: SamplingParams,
               adapter: str | None | Sequence[str | None]) -> list[list[Sample]]:
        """`n` completions per prompt; `adapter` one name for all prompts (None: the base) or one per prompt."""
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        generations = [Generation(self.prompt_ids(prompt), adapters[i], params, index=i * n + k)
                       for i, prompt in enumerate(prompts) for k in range(n)]
        with self.autocast():
            events = self.engine().run(generations)
        samples = []
        for event in events:
            if isinstance(event, Failed):
                raise LoraforgeError(f"sampling failed: {event.message}")
            samples.append(Sample(event.token_ids, event.text, event.logprobs, event.reason))
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

