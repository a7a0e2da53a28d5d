"""The quant-aware merge: adapters folded into a 4-bit / 8-bit (or float) base, optionally re-quantized, reported.

    plain, report = merge_quantized(lora, requantize="nf4", validation=examples, pad_token_id=pad)

A 4-bit weight cannot take an adapter in place, so merging dequantizes, adds ΔW in fp32 and returns a float model.
Re-quantizing that model is optional and reported on: when ΔW is small next to the quantization step,
Q(W + ΔW) rounds back to Q(W) and the adapter's effect is gone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from loraforge.errors import ConfigError
from loraforge.evaluate import evaluate_loss
from loraforge.loss import perplexity
from loraforge.lora.layers import LoraLayer
from loraforge.lora.targeting import unwrap
from loraforge.quant import (INT8_THRESHOLD, QUANT_TYPES, compute_dtype_for, dequantize_model, is_quantized_linear,
                             model_quant, output_head, quantizable, quantize_model, round_trip)

# Re-quantization has lost an adapter when more than this fraction of its effect is gone: the surviving weight
# change is off by more than this fraction of ‖ΔW‖, or less than 1 − this of its validation-loss gain remains.
LOST_FRACTION = 0.5


@dataclass
class LayerRequantization:
    """What re-quantizing one merged layer W' = W + ΔW does (W: the base as the adapter saw it)."""

    name: str
    weight_error: float  # ‖Q(W') − W'‖ / ‖W'‖
    update_norm: float  # ‖ΔW‖
    update_error: float | None  # ‖(Q(W') − Q(W)) − ΔW‖ / ‖ΔW‖: 0 keeps the adapter exactly, ~1 keeps nothing

    @property
    def adapter_lost(self) -> bool:
        return self.update_error is not None and self.update_error > LOST_FRACTION


@dataclass
class MergeReport:
    """A merge from a (possibly quantized) base: what was merged, and what optional re-quantization cost."""

    base_quant: str
    requantize: str | None
    adapters: list[str]
    layers: list[LayerRequantization] = field(default_factory=list)
    # Mean validation token loss: base (adapters off), unmerged, merged (float), requantized.
    loss: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def perplexity(self) -> dict[str, float]:
        return {key: perplexity(value) for key, value in self.loss.items()}

    @property
    def update_error(self) -> float | None:
        """The layers' update errors pooled, each weighted by its ‖ΔW‖²."""
        measured = [layer for layer in self.layers if layer.update_error is not None]
        total = sum(layer.update_norm**2 for layer in measured)
        if not total:
            return None
        return math.sqrt(sum((layer.update_error * layer.update_norm) ** 2 for layer in measured) / total)

    @property
    def loss_improvement_kept(self) -> float | None:
        """(base − requantized) / (base − merged) validation loss: 1 keeps all the adapter gained, 0 none."""
        if not {"base", "merged", "requantized"} <= self.loss.keys():
            return None
        gained = self.loss["base"] - self.loss["merged"]
        return (self.loss["base"] - self.loss["requantized"]) / gained if gained > 0 else None

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity": self.perplexity, "update_error": self.update_error,
                "loss_improvement_kept": self.loss_improvement_kept}

    def describe(self) -> list[str]:
        """A few lines for people: what was merged, the validation losses, re-quantization, warnings."""
        base = f"{self.base_quant} base, dequantized" if self.base_quant != "none" else "float base"
        lines = [f"merged {', '.join(self.adapters)} into the {base}"]
        if self.loss:
            losses = ", ".join(f"{key} {value:.4f} (ppl {self.perplexity[key]:.3f})" for key, value in self.loss.items())
            lines.append(f"validation loss over {self.tokens} tokens: {losses}")
        if self.update_error is not None:
            weight_error = sum(layer.weight_error for layer in self.layers) / len(self.layers)
            lines.append(f"re-quantized to {self.requantize}: {len(self.layers)} adapted layers, weight error "
                         f"{weight_error:.3f} of ‖W‖, adapter update error {self.update_error:.2f} of ‖ΔW‖")
        return lines + [f"warning: {w}" for w in self.warnings]


def _warnings(report: MergeReport) -> list[str]:
    """The ways re-quantization lost the adapter's effect."""
    warnings = []
    error = report.update_error
    if error is not None and error > LOST_FRACTION:
        lost = sum(layer.adapter_lost for layer in report.layers)
        warnings.append(
            f"re-quantizing to {report.requantize} loses most of the adapter: the weight change that survives "
            f"differs from the adapter's ΔW by {error:.0%} of ‖ΔW‖ ({lost} of {len(report.layers)} layers over "
            f"{LOST_FRACTION:.0%}). Keep the merged model in float, or serve the adapter unmerged.")
    kept = report.loss_improvement_kept
    if kept is not None and kept < 1 - LOST_FRACTION:
        warnings.append(
            f"on validation data the re-quantized model keeps {kept:.0%} of the adapter's loss improvement "
            f"(loss: base {report.loss['base']:.4f}, merged {report.loss['merged']:.4f}, re-quantized "
            f"{report.loss['requantized']:.4f}).")
    return warnings


@torch.no_grad()
def merge_quantized(lora, names: Sequence[str] | None = None, requantize: str | None = None,
                    validation: Sequence = (), pad_token_id: int = 0, dtype: torch.dtype | None = None,
                    batch_size: int = 8) -> tuple[nn.Module, MergeReport]:
    """Merge adapters (default: the active ones) into a 4-bit / 8-bit (or float) base: dequantize every
    quantized layer to fp32, add ΔW, unload. Returns the plain model (in `dtype`, default the dtype the rest of
    the model was loaded in) and a report. With `requantize`, the merged model is quantized again (ready for
    save_pretrained in bitsandbytes format) and each adapted layer's error is reported. With `validation`
    examples (data.Example), the mean token loss of the base, the unmerged adapter, the merged and the
    re-quantized model is measured. The LoraModel is consumed, like merge_and_unload."""
    if requantize is not None and requantize not in QUANT_TYPES:
        raise ConfigError(f"requantize: {requantize!r} is not one of {', '.join(QUANT_TYPES)}")
    names = list(lora.active_adapters if names is None else names)
    model = lora.model
    device = next(model.parameters()).device
    dtype = dtype or next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad),
                          torch.float32)
    report = MergeReport(model_quant(model), requantize, names)

    def loss(module: nn.Module) -> float:
        result = evaluate_loss(module, validation, pad_token_id, batch_size, device)
        report.tokens = result["tokens"]
        return result["loss"]

    if validation:
        with lora.disable_adapters():
            report.loss["base"] = loss(lora.model)
        with lora.using(names):
            report.loss["unmerged"] = loss(lora.model)
    if requantize:
        head = output_head(model)
        report.layers = [_requantization(name, layer, names, requantize) for name, layer in lora.lora_layers()
                         if any(n in layer.ranks for n in names)
                         and (quantizable(unwrap(layer), head) or is_quantized_linear(unwrap(layer)))]
    dequantize_model(model)
    plain = lora.merge_and_unload(names).to(dtype)
    if validation:
        report.loss["merged"] = loss(plain)
    if requantize:
        quantize_model(plain, requantize, device=device)
        plain.config.quantization_config = _transformers_config(plain, requantize, compute_dtype_for(device))
        if validation:
            report.loss["requantized"] = loss(plain)
    report.warnings = _warnings(report)
    return plain, report



def _requantization(name: str, layer: LoraLayer, names: Sequence[str], quant: str) -> LayerRequantization:
    base = layer.dense_base_weight().float()
    merged = layer.merged_weight(names).float()
    delta = merged - base
    requantized = round_trip(merged, quant)
    survived = requantized - round_trip(base, quant)
    update_norm = float(delta.norm())
    return LayerRequantization(
        name=name,
        weight_error=float((requantized - merged).norm() / merged.norm().clamp_min(1e-30)),
        update_norm=update_norm,
        update_error=float((survived - delta).norm()) / update_norm if update_norm > 0 else None,
    )


def _transformers_config(model: nn.Module, quant: str, compute_dtype: torch.dtype):
    """The quantization_config with which from_pretrained rebuilds the layers quantize_model made."""
    from transformers import BitsAndBytesConfig

    head = output_head(model)
    skipped = [name for name, module in model.named_modules() if module is head]
    if quant == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skipped)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD, llm_int8_skip_modules=skipped)
