"""Llama-style MLPs, down(silu(gate(x)) · up(x)) without biases, run as one fused node (fused.swiglu_with_lora)
when gate, up and down carry the same single adapter: two fewer intermediate-width tensors kept for backward.

Matched by class, from a table of the transformers classes whose forward is exactly that; the MLP instance gets a
forward of its own (removed again by remove_fused_mlps), which falls back to the class's when not fusable.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.activations import SiLUActivation

from loraforge.lora.fused import swiglu_with_lora
from loraforge.lora.layers import LoraLinear
from loraforge.lora.targeting import transformers_classes

# model_type → the transformers module and MLP class (the estimator reads the model types).
SWIGLU_MLPS = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaMLP"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralMLP"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2MLP"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3MLP"),
}


def is_swiglu_mlp(module: nn.Module) -> bool:
    return (type(module) in transformers_classes(*SWIGLU_MLPS.values())
            and isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation)))


def fused_mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layers = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if all(isinstance(layer, LoraLinear) and layer.base_layer.bias is None for layer in layers):
        name = layers[0]._fused_adapter()
        if name is not None and all(layer._fused_adapter() == name for layer in layers[1:]):
            return swiglu_with_lora(x, [(layer.base_weight, layer.lora_A[name].weight, layer.lora_B[name].weight,
                                         layer.scaling[name]) for layer in layers])
    return type(mlp).forward(mlp, x)


def install_fused_mlps(model: nn.Module) -> None:
    for module in model.modules():
        if is_swiglu_mlp(module) and "forward" not in module.__dict__:
            module.forward = functools.partial(fused_mlp_forward, module)


def remove_fused_mlps(model: nn.Module) -> None:
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "func", None) is fused_mlp_forward:
            del module.forward
