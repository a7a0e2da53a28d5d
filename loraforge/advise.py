"""Advisors, printed by `loraforge estimate` and at the start of `loraforge train`: learning rate, adapter
capacity, where the adapters sit, batch size.

The numbers are the findings of Schulman et al., "LoRA Without Regret" (Thinking Machines, 2025):
- LoRA's optimal learning rate is ≈ 10× full fine-tuning's (≈ 15× for runs of ~100 steps, while B grows from
  zero), and nearly independent of the rank with α/r scaling. The full fine-tuning rate for a model size is the
  fit of Thinking Machines' tinker-cookbook (hyperparam_utils.get_lr): 5e-5 · (2000 / hidden_size)^p, p = 0.781
  for Llama and 0.0775 for Qwen, measured at α = 32.
- LoRA matches full fine-tuning while the dataset's information fits the adapter: capacity ≈ 2 bits per
  trainable parameter (Allen-Zhu & Li 2024, "Physics of Language Models 3.3"), information ≈ the total log-loss
  over the first epoch, in bits (before training: the base model's loss on a sample stands in for it).
- Attention-only LoRA underperforms even at matched parameter count: the MLP / expert layers matter most.
- LoRA pays a larger loss penalty than full fine-tuning for large batches, whatever the rank.
- Reinforcement learning carries ~1 bit per episode, so even rank 1 has capacity to spare there. Its learning
  rate we suggest at a quarter of SFT's: on the bundled RL demo SFT's suggestion (2e-3) made the policy collapse
  into rambling within ten steps, a quarter of it (5e-4) learned steadily. DPO moves the model faster per step
  than SFT: TRL's defaults differ 20× (DPOConfig 1e-6, SFTConfig 2e-5); we suggest a tenth of the SFT rate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

LORA_LR_MULTIPLIER = 10.0
SHORT_RUN_LR_MULTIPLIER = 15.0
SHORT_RUN_STEPS = 100
FULL_LR_BASE = 5e-5
FULL_LR_HIDDEN = 2000
LR_EXPONENTS = {"llama": 0.781, "qwen": 0.0775}  # tinker-cookbook's fits; other families use Llama's
REFERENCE_ALPHA = 32.0
LR_TOLERANCE = 3.0  # a learning rate this many times off the suggestion gets a warning
BITS_PER_PARAMETER = 2.0
LARGE_BATCH = 256  # sequences per optimizer step; the paper's LoRA penalty shows at a few hundred
CAPACITY_SAMPLE = 16  # training conversations whose base-model loss stands for the whole training set
STAGE_LR_FACTOR = {"sft": 1.0, "dpo": 0.1, "grpo": 0.25}
BITS_PER_EPISODE = 1.0  # a preference label, or one policy-gradient episode, carries about one bit


@dataclass(frozen=True)
class Advice:
    topic: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class AdapterLayout:
    """What an adapter covers, as the advisors and the estimator need it."""

    trainable: int
    adapted: tuple[str, ...]  # module names (adapted parameters as owner.parameter)
    per_rank: float  # trainable parameters per unit of rank (full copies of modules_to_save excluded)
    materialized: int  # elements of adapted parameter tensors (W0 + ΔW is built each forward)
    linear_weights: int = 0  # elements of adapted Linear/Conv1D weights (what base_dtype may store narrower)


def adapter_layout(lora) -> AdapterLayout:
    """Describe the trainable adapters of a LoraModel."""
    from loraforge.lora.layers import LoraLinear, LoraParameter

    adapted, materialized, linear, factors, ranks = [], 0, 0, 0, set()
    for name, layer in lora.lora_layers():
        if isinstance(layer, LoraParameter):
            adapted.append(f"{name}.{layer.parameter_name}")
            materialized += layer.base_weight.numel()
        else:
            adapted.append(name)
            linear += layer.base_weight.numel() if isinstance(layer, LoraLinear) else 0
        for adapter, rank in layer.ranks.items():
            factors += sum(t.numel() for t in layer.peft_tensors(adapter).values())
            ranks.add(rank)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    # modules_to_save copies are trainable too, but do not grow with the rank.
    return AdapterLayout(trainable, tuple(adapted), factors / max(ranks, default=1), materialized, linear)


# -- learning rate ----------------------------------------------------------------------------------------
def full_finetune_lr(model_type: str, hidden_size: int) -> float:
    exponent = next((p for family, p in LR_EXPONENTS.items() if family in model_type), LR_EXPONENTS["llama"])
    return FULL_LR_BASE * (FULL_LR_HIDDEN / hidden_size) ** exponent


def suggested_lr(model_type: str, hidden_size: int, finetune: str = "lora", steps: int | None = None,
                 r: int = 8, alpha: float = 16.0, use_rslora: bool = False, stage: str = "sft") -> float:
    """The learning rate to start from. LoRA: full fine-tuning's × 10 (× 15 for ≤ 100 steps), measured at
    α = 32 with α/r scaling; other scales move the optimum inversely (the update is scale × B·A). The stage
    scales it: DPO × 0.1, GRPO × 0.25 (STAGE_LR_FACTOR)."""
    full = full_finetune_lr(model_type, hidden_size) * STAGE_LR_FACTOR[stage]
    if finetune == "full":
        return full
    multiplier = SHORT_RUN_LR_MULTIPLIER if steps is not None and steps <= SHORT_RUN_STEPS else LORA_LR_MULTIPLIER
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r
    return full * multiplier * (REFERENCE_ALPHA / r) / scale


def lr_advice(lr: float, suggestion: float, finetune: str, stage: str = "sft") -> Advice:
    what = "full fine-tuning" if finetune == "full" else "LoRA (≈10× full fine-tuning's, nearly rank-independent)"
    if stage != "sft":
        what += f", stage {stage} (× {STAGE_LR_FACTOR[stage]:g} of SFT's)"
    message = f"lr={lr:.2g}; suggested for {what} at this model size: {suggestion:.2g}"
    off = max(lr / suggestion, suggestion / lr)
    if off > LR_TOLERANCE:
        return Advice("learning rate", f"{message} — {off:.0f}× {'higher' if lr > suggestion else 'lower'}; "
                                       "consider lr=" + f"{suggestion:.2g} or a sweep (`loraforge sweep`)", True)
    return Advice("learning rate", message)


# -- capacity ---------------------------------------------------------------------------------------------
def capacity_advice(dataset_bits: float, layout: AdapterLayout, r: int,
                    source: str = "base-model log-loss over the training set") -> Advice:
    """The dataset's information vs the adapter's capacity (≈ 2 bits per trainable parameter). `source` says how
    the information was obtained (a sample's estimate, or training's own first-epoch log-loss)."""
    capacity = BITS_PER_PARAMETER * layout.trainable
    message = (f"dataset ≈ {_bits(dataset_bits)} ({source}); adapter capacity ≈ "
               f"{_bits(capacity)} ({layout.trainable:,} parameters × {BITS_PER_PARAMETER:g} bits)")
    if dataset_bits <= capacity:
        return Advice("capacity", f"{message}: fits ({dataset_bits / capacity:.1%} of capacity)")
    fixed = layout.trainable - layout.per_rank * r
    needed = math.ceil((dataset_bits / BITS_PER_PARAMETER - fixed) / layout.per_rank) if layout.per_rank else None
    rank = 2 ** math.ceil(math.log2(needed)) if needed else None
    hint = f"raise lora.r to ≥ {rank}" if rank else "adapt more modules"
    return Advice("capacity", f"{message}: the adapter is likely too small — LoRA falls behind full fine-tuning "
                              f"once the data outgrows it; {hint}, or use finetune=full", True)


def _bits(bits: float) -> str:
    for unit, size in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if bits >= size:
            return f"{bits / size:.1f} {unit}"
    return f"{bits:.0f} bit"


def target_tokens_of(examples: Sequence) -> int:
    """Tokens that carry a label (what the loss, and so the information, is counted over)."""
    from loraforge.data import IGNORE_INDEX

    return sum(sum(label != IGNORE_INDEX for label in e.labels[1:]) for e in examples)


def nats_to_bits(nats_per_token: float, tokens: int) -> float:
    return nats_per_token * tokens / math.log(2)


def dataset_bits(model: nn.Module, examples: Sequence, pad_token_id: int, batch_size: int, device,
                 autocast=None, sample: int = CAPACITY_SAMPLE) -> float:
    """The base model's total log-loss over `examples`, in bits, from one forward pass over an evenly spaced
    sample of them (mean loss per target token × all target tokens)."""
    from contextlib import nullcontext

    from loraforge.evaluate import evaluate_loss

    if not examples:
        return 0.0
    step = max(1, len(examples) // sample)
    chosen = list(examples)[::step][:sample]
    loss = evaluate_loss(model, chosen, pad_token_id, batch_size, device, autocast or nullcontext)["loss"]
    return nats_to_bits(loss, target_tokens_of(examples))


# -- placement and batch size -------------------------------------------------------------------------
def targets_advice(adapted: Sequence[str], moe: bool) -> Advice | None:
    attention = [n for n in adapted if re.search(r"attn|attention", n)]
    if adapted and len(attention) == len(adapted):
        return Advice("targets", "attention-only LoRA underperforms even at matched parameter count; adapt the MLP "
                                 "layers too (lora.targets=all-linear)" + (_EXPERTS_HINT if moe else ""), True)
    if moe and not any("experts" in n for n in adapted):
        return Advice("targets", "the experts hold most of this model's parameters and are not adapted" + _EXPERTS_HINT,
                      True)
    return None


_EXPERTS_HINT = "; for the experts add lora.target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj]"


def batch_advice(sequences_per_step: int) -> Advice | None:
    if sequences_per_step > LARGE_BATCH:
        return Advice("batch size", f"{sequences_per_step} sequences per step: LoRA loses more than full fine-tuning "
                                    f"at large batch sizes, whatever the rank; ≤ {LARGE_BATCH} is safer", True)
    return None


# -- all of them ------------------------------------------------------------------------------------------
def training_advice(config, model_config, layout: AdapterLayout | None, steps: int | None,
                    bits: float | None = None, bits_source: str | None = None) -> list[Advice]:
    """Every advisor for one job. config: a TrainConfig; model_config: the transformers config of the base;
    layout: None for full fine-tuning; bits: the dataset's information (None: not measured), and how it was
    counted."""
    finetune = "full" if layout is None else "lora"
    lora = config.lora
    stage = getattr(config, "stage", "sft")
    suggestion = suggested_lr(model_config.model_type, model_config.hidden_size, finetune, steps, lora.r,
                              lora.alpha, lora.use_rslora, stage)
    advice = [lr_advice(config.lr, suggestion, finetune, stage)]
    if layout is None:
        return advice
    if bits is not None:
        advice.append(capacity_advice(bits, layout, lora.r, *([bits_source] if bits_source else [])))
    moe = bool(getattr(model_config, "num_local_experts", None) or getattr(model_config, "num_experts", None))
    advice.append(targets_advice(layout.adapted, moe))
    advice.append(batch_advice(config.batch_size * config.grad_accum))
    return [a for a in advice if a is not None]


def print_advice(advice: Sequence[Advice], console) -> None:
    from rich.markup import escape

    for item in advice:
        style = "yellow" if item.warning else "dim"
        label = "warning" if item.warning else "advice"
        console.print(f"[{style}]{label} ({item.topic}): {escape(item.message)}[/]", highlight=False)
