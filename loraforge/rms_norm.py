"""RMSNorm in training under bf16 autocast that keeps its bf16 output for backward instead of its fp32 input.

    y = bf16(w · x / rms(x)),  rms(x) = sqrt(mean(x²) + eps)

Under bf16 autocast the residual stream stays fp32 (the embedding's rows are widened as they are looked up), so each
of transformers' RMSNorms keeps its fp32 input for backward: 2 × hidden × 4 bytes a token a layer, a quarter of
what a SmolLM2 layer keeps under LoRA (~62 MB of the demo step's saved activations). The output's readers are linear
layers (q, k and v; the MLP's gate and up or an MoE router; the head), whose input autocast casts to bf16 anyway,
and the fused LoRA nodes keep that bf16 copy for backward (lora/fused.py); a 4-bit layer (QLoRA), which autocast
leaves alone, now reads those bf16 values too, as a float layer does. Here the norm returns the bf16 copy
itself — the same values, bit for bit — and keeps only it and the per-token 1/rms, so the copy the LoRA nodes keep
is the one tensor kept: backward recovers the normalised input as y / w, as accurate as y (bf16), which is as
accurate as the gradients arriving from the bf16 matmuls. The idea is apex's memory-efficient layer norm.

Only for a frozen weight without zeros (a zero would lose its channel's input), an fp32 input and bf16 autocast
with gradients on; everything else — full fine-tuning, fp32 or fp16 training, scoring, generation, Qwen3's q/k
norms (their input is bf16 already) — is the class's own forward, unchanged. Matched by class, from a table of the
transformers classes whose forward is exactly Llama's (Gemma's scales by 1 + w, so it is not one of them).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from loraforge.lora.targeting import transformers_classes

# model_type → the transformers module and the RMSNorm class whose forward is LlamaRMSNorm's.
RMS_NORMS = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaRMSNorm"),
    "mistral": ("transformers.models.mistral.modeling_mistral", "MistralRMSNorm"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralRMSNorm"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3RMSNorm"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeRMSNorm"),
}


class _RmsNormKeepingOutput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # transformers' ops in transformers' order (then autocast's cast), so the output is the same bits.
        inverse_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        out = (weight * (x * inverse_rms)).to(torch.bfloat16)
        ctx.save_for_backward(out, inverse_rms, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        out, inverse_rms, weight = ctx.saved_tensors
        normed = out.float().div_(weight)  # x / rms(x)
        grad_normed = grad_out.float().mul_(weight)
        # d/dx of x·r(x): r·(g − x̂·mean(g·x̂)), with x̂ = x·r.
        projection = (grad_normed * normed).mean(-1, keepdim=True)
        return grad_normed.sub_(normed.mul_(projection)).mul_(inverse_rms), None, None


def _keeps_output(norm: nn.Module, x: torch.Tensor) -> bool:
    device = x.device.type
    return (x.dtype == torch.float32 and x.requires_grad and torch.is_grad_enabled()
            and not norm.weight.requires_grad and torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == torch.bfloat16)


def rms_norm_forward(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if _keeps_output(norm, x):
        return _RmsNormKeepingOutput.apply(x, norm.weight, norm.variance_epsilon)
    return type(norm).forward(norm, x)


def keep_rms_norm_outputs(model: nn.Module) -> int:
    """Give the model's frozen, zero-free RMSNorms of the table the forward above (it falls back to the class's own
    wherever it does not apply). Returns how many norms got it. Call after the weights are loaded and frozen."""
    installed = 0
    for module in model.modules():
        if (type(module) in transformers_classes(*RMS_NORMS.values()) and "forward" not in module.__dict__
                and not module.weight.requires_grad and bool(module.weight.ne(0).all())):
            module.forward = functools.partial(rms_norm_forward, module)
            installed += 1
    return installed
