"""A frozen linear layer plus one LoRA adapter as a single autograd node: y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ.

Autograd over the separate ops computes the input gradient in two pieces (through W0 and through A) and
adds them in another pass over a (tokens × fan_in) tensor; here it is one addmm, dx = g·W0 + (s·g·B)·A.
The node keeps only x and the rank-r product h = x·Aᵀ (reused for dB), never builds a gradient for W0,
and lets W0 be stored narrower than the compute dtype (a bf16 base under fp32 compute): it is widened per
use, so the model holds half the bytes without keeping widened copies alive until backward.

It covers the training hot path: one active adapter, no dropout, a float frozen weight. Everything else
(dropout, DoRA, several adapters, 4-bit bases, mixed batches) takes the generic path in layers.py.
"""

from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What the layer computes in: the autocast dtype under autocast, else the input's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _FrozenLinearLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float, fan_in_fan_out: bool):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            w = weight.to(dtype)
            w = w.T if fan_in_fan_out else w  # (out, in)
            a_c, b_c = a.to(dtype), b.to(dtype)
            hidden = flat @ a_c.T  # (tokens, r)
            out = flat @ w.T if bias is None else torch.addmm(bias.to(dtype), flat, w.T)
            out = torch.addmm(out, hidden, b_c.T, alpha=scale)
        ctx.save_for_backward(flat, hidden, weight, a, b)
        ctx.scale, ctx.fan_in_fan_out, ctx.x_shape, ctx.x_dtype = scale, fan_in_fan_out, x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, hidden, weight, a, b = ctx.saved_tensors
        dtype, scale = flat.dtype, ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
        b_c = b.to(dtype)
        grad_hidden = (g @ b_c) * scale  # (tokens, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = ((g.T @ hidden) * scale).to(b.dtype)
        if ctx.needs_input_grad[3]:
            grad_a = (grad_hidden.T @ flat).to(a.dtype)
        if ctx.needs_input_grad[0]:
            w = weight.to(dtype)
            w = w.T if ctx.fan_in_fan_out else w  # (out, in)
            grad_x = torch.addmm(g @ w, grad_hidden, a.to(dtype)).view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


def frozen_linear_with_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                            b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """x·W0ᵀ + bias + scale·(x·Aᵀ)·Bᵀ; W0 (and bias) frozen, W0 as (out, in), or (in, out) for GPT-2 Conv1D."""
    return _FrozenLinearLora.apply(x, weight, bias, a, b, scale, fan_in_fan_out)
