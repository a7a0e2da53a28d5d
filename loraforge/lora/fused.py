"""A frozen linear layer plus one LoRA adapter as a single autograd node: y = x·W0ᵀ + b + s·(x·Aᵀ)·Bᵀ.

Autograd over the separate ops computes the input gradient in two pieces (through W0 and through A) and
adds them in another pass over a (tokens × fan_in) tensor; here it is one addmm, dx = g·W0 + (s·g·B)·A.
The node keeps only x and the rank-r product h = x·Aᵀ (reused for dB), never builds a gradient for W0,
and lets W0 be stored narrower than the compute dtype (a bf16 base under fp32 compute): it is widened per
use, so the model holds half the bytes without keeping widened copies alive until backward.

A Llama-style MLP whose three projections carry the adapter runs as one such node too (`swiglu_with_lora`):
it keeps the gate and up outputs and recomputes silu(gate) and their product in backward.

Both cover the training hot path: one active adapter, no dropout, a float frozen weight. Everything else
(dropout, DoRA, several adapters, 4-bit bases, mixed batches) takes the generic path in layers.py.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

_scratch = threading.local()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """What the layer computes in: the autocast dtype under autocast, else the input's dtype."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _widened(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W0 in the compute dtype. A narrower-stored W0 is copied into one scratch buffer per shape and thread,
    not a fresh tensor per use: a fresh one per layer and pass is the frozen model's whole size allocated and
    freed twice a step, which fragments the heap and, with the allocator returning memory, faults every page.
    Safe because the nodes use the widened weight at once and never save it."""
    if weight.dtype == dtype:
        return weight
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (weight.shape, dtype, weight.device)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    return buffer.copy_(weight)


def _flat_in(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as (tokens, features) in the compute dtype. Sibling projections read one input (q, k and v read the same
    normed hidden states, fp32 under bf16 autocast): its cast is made once, by the first of them, and that one
    copy is what each node keeps for backward — two casts and two saved copies fewer per attention block (SmolLM2,
    batch 8 of the demo: ~33 MB of the step's saved activations). The cache holds weak references only: the
    copy lives as long as a node keeps it, and an input that died or was changed in place is cast afresh."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.dtype == dtype or x.is_inference():  # inference tensors have no version counter to check
        return flat.to(dtype)
    last = getattr(_scratch, "cast", None)
    if last is not None:
        source, version, cast = last[0](), last[1], last[2]()
        if source is x and version == x._version and cast is not None and cast.dtype == dtype:
            return cast
    cast = flat.to(dtype)
    _scratch.cast = (weakref.ref(x), x._version, weakref.ref(cast))
    return cast


def _lora_forward(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                  b: torch.Tensor, scale: float, fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x·W0ᵀ + bias + s·h·Bᵀ, h = x·Aᵀ) for a 2-D x, everything in x's dtype."""
    dtype = flat.dtype
    w = _widened(weight, dtype)
    w = w.T if fan_in_fan_out else w  # (out, in)
    hidden = flat @ a.to(dtype).T  # (tokens, r)
    out = flat @ w.T if bias is None else torch.addmm(bias.to(dtype), flat, w.T)
    # In place: out-of-place addmm first copies its (tokens × fan_out) input into a new result.
    return out.addmm_(hidden, b.to(dtype).T, alpha=scale), hidden


def _lora_backward(g: torch.Tensor, flat: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor, scale: float, fan_in_fan_out: bool, need_x: bool):
    """(dx, dA, dB) of the layer above for the output gradient g; dx = g·W0 + (s·g·B)·A in one addmm."""
    dtype = flat.dtype
    grad_hidden = (g @ b.to(dtype)) * scale  # (tokens, r)
    grad_b = ((g.T @ hidden) * scale).to(b.dtype)
    grad_a = (grad_hidden.T @ flat).to(a.dtype)
    grad_x = None
    if need_x:
        w = _widened(weight, dtype)
        w = w.T if fan_in_fan_out else w  # (out, in)
        grad_x = (g @ w).addmm_(grad_hidden, a.to(dtype))
    return grad_x, grad_a, grad_b


class _FrozenLinearLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float, fan_in_fan_out: bool):
        dtype = compute_dtype(x)  # read before autocast is switched off for the explicit casts below
        with torch.autocast(x.device.type, enabled=False):
            flat = _flat_in(x, dtype)
            out, hidden = _lora_forward(flat, weight, bias, a, b, scale, fan_in_fan_out)
        ctx.save_for_backward(flat, hidden, weight, a, b)
        ctx.scale, ctx.fan_in_fan_out, ctx.x_shape, ctx.x_dtype = scale, fan_in_fan_out, x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, hidden, weight, a, b = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(flat.dtype)
        grad_x, grad_a, grad_b = _lora_backward(g, flat, hidden, weight, a, b, ctx.scale, ctx.fan_in_fan_out,
                                                ctx.needs_input_grad[0])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


class _SwiGluLora(torch.autograd.Function):
    """down(silu(gate(x)) · up(x)), each projection a frozen linear + one adapter (no biases). Saves x, the gate
    and up outputs and the three rank-r products; silu(gate) and the product are recomputed in backward — two
    (tokens × intermediate) tensors fewer than autograd over the separate ops keeps."""

    @staticmethod
    def forward(ctx, x, scales: tuple[float, float, float], *tensors):
        (wg, ag, bg), (wu, au, bu), (wd, ad, bd) = tensors[0:3], tensors[3:6], tensors[6:9]
        sg, su, sd = scales
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            flat = _flat_in(x, dtype)
            gate, hg = _lora_forward(flat, wg, None, ag, bg, sg, False)
            up, hu = _lora_forward(flat, wu, None, au, bu, su, False)
            out, hd = _lora_forward(F.silu(gate) * up, wd, None, ad, bd, sd, False)
        ctx.save_for_backward(flat, gate, up, hg, hu, hd, *tensors)
        ctx.scales, ctx.x_shape, ctx.x_dtype = scales, x.shape, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, gate, up, hg, hu, hd, *tensors = ctx.saved_tensors
        (wg, ag, bg), (wu, au, bu), (wd, ad, bd) = tensors[0:3], tensors[3:6], tensors[6:9]
        sg, su, sd = ctx.scales
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(flat.dtype)
        act = F.silu(gate)
        grad_p, grad_ad, grad_bd = _lora_backward(g, act * up, hd, wd, ad, bd, sd, False, True)
        grad_up = grad_p * act
        grad_gate = torch.ops.aten.silu_backward(grad_p.mul_(up), gate)  # one kernel for ·silu'(gate)
        need_x = ctx.needs_input_grad[0]
        grad_xg, grad_ag, grad_bg = _lora_backward(grad_gate, flat, hg, wg, ag, bg, sg, False, need_x)
        grad_xu, grad_au, grad_bu = _lora_backward(grad_up, flat, hu, wu, au, bu, su, False, need_x)
        grad_x = grad_xg.add_(grad_xu).view(ctx.x_shape).to(ctx.x_dtype) if need_x else None
        return (grad_x, None, None, grad_ag, grad_bg, None, grad_au, grad_bu, None, grad_ad, grad_bd)


def frozen_linear_with_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                            b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """x·W0ᵀ + bias + scale·(x·Aᵀ)·Bᵀ; W0 (and bias) frozen, W0 as (out, in), or (in, out) for GPT-2 Conv1D."""
    return _FrozenLinearLora.apply(x, weight, bias, a, b, scale, fan_in_fan_out)


def swiglu_with_lora(x: torch.Tensor, projections: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]
                     ) -> torch.Tensor:
    """A Llama-style MLP, down(silu(gate(x)) · up(x)), from (W0, A, B, scale) of gate, up and down."""
    scales = tuple(p[3] for p in projections)
    return _SwiGluLora.apply(x, scales, *(t for p in projections for t in p[:3]))
