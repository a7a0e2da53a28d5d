"""Attention in training on short rows on a CPU: what transformers' "sdpa" computes, in ~0.6× its time.

PyTorch's CPU flash-attention kernel is built for long rows: its backward on the rows of short-answer data (a
chat turn of ~60–100 tokens) runs at ~25 GFLOP/s, and transformers first repeats K and V to every query head
(grouped-query models under a padding mask). SmolLM2 at batch 8 of the demo spent ~280 ms of a 1.98 s profiled
step there. Here the scores are explicit matrices in fp32, as the kernel's are: each group of query heads meets its
own K/V head once (no repeat), and one autograd node keeps q, k, v and the softmax's log-normaliser — not the
probabilities, not the output: backward recomputes the probabilities from them, as flash attention does.

Only where that is faster (bench/bench_attention.py on a Zen 4 CPU, bf16 inputs): a CPU, gradients flowing, and
at most SHORT_ROW_SCORES query × key positions per head (forward + backward 0.6× sdpa's time at 58 × 72,
0.8–0.9× at 96 × 96, even at 128 × 128, 1.6× at 192 × 192; without gradients sdpa's forward is 1.4–2.5×
faster). Everything else — a GPU, long rows, scoring and generation, dropout, soft-capping, sinks, position
biases — is transformers' own sdpa_attention_forward, unchanged. Installed under its own name with sdpa's masks
(`use_short_row_attention`), so the model builds exactly the masks it builds for "sdpa".
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "loraforge_short_rows"
# Query × key positions per head up to which the explicit path is the faster (measured: 0.6× sdpa's time at 58 × 72,
# 0.8–0.9× at 96 × 96, even at 128 × 128; bench/bench_attention.py).
SHORT_ROW_SCORES = 96 * 96
# And at most this many scores per call (64 MB in fp32, one layer's at a time), whatever the batch and heads.
SCORES_ELEMENTS = 2**24


_last_bias = threading.local()


def _additive_bias(mask: torch.Tensor | None, is_causal: bool, q_len: int, k_len: int,
                   device: torch.device) -> torch.Tensor | None:
    """The mask as an fp32 bias added to the scores ([B or 1, 1, Tq, Tk]). A boolean mask (True = attend) becomes
    0 / the most negative float, as eager attention's: a row with nothing to attend (a padded query) then spreads
    evenly instead of turning into NaN. Every layer gets the model's one mask, so its bias is made once (held by
    weak references, as fused._flat_in's cast): all layers keep that one tensor for backward."""
    if mask is None:
        if not is_causal or q_len == 1:
            return None
        return _bias_of(torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)[None, None])
    last = getattr(_last_bias, "entry", None)
    if last is not None and last[0]() is mask and last[1] == mask._version and last[2]() is not None:
        return last[2]()
    bias = _bias_of(mask)
    _last_bias.entry = (weakref.ref(mask), mask._version, weakref.ref(bias))
    return bias


def _bias_of(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(
            ~mask, torch.finfo(torch.float32).min)
    return mask.float()


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H, T, D] → [B, H/groups, groups·T, D]: the query heads that share one K/V head, stacked."""
    b, h, t, d = x.shape
    return x.reshape(b, h // groups, groups * t, d)


class _ShortRowAttention(torch.autograd.Function):
    """softmax(q·kᵀ·scale + bias)·v per K/V head, the query heads of its group stacked; all in fp32, the output in
    q's dtype. Saves q, k, v, bias and the log-normaliser (rows × 4 bytes)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, groups: int):
        with torch.autocast(q.device.type, enabled=False):  # fp32 here, whatever autocast would pick
            qf, kf, vf = _grouped(q, groups).float(), k.float(), v.float()
            scores = _scores(qf, kf, bias, scale, groups)
            peak = scores.amax(-1, keepdim=True)
            probs = scores.sub_(peak).exp_()
            total = probs.sum(-1, keepdim=True)
            out = probs.div_(total) @ vf
            lse = total.log_().add_(peak)  # log Σ exp(scores): a third of torch.logsumexp's time here
        ctx.save_for_backward(q, k, v, bias, lse)
        ctx.scale, ctx.groups = scale, groups
        return out.reshape(q.shape).to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, lse = ctx.saved_tensors
        scale, groups = ctx.scale, ctx.groups
        with torch.autocast(q.device.type, enabled=False):  # a backward called under autocast stays fp32 too
            qf, kf, vf = _grouped(q, groups).float(), k.float(), v.float()
            probs = _scores(qf, kf, bias, scale, groups).sub_(lse).exp_()
            g = _grouped(grad_out, groups).float()
            grad_v = probs.transpose(-1, -2) @ g
            grad_probs = g @ vf.transpose(-1, -2)
            # softmax backward: p · (dp − Σ p·dp), the row sums over the keys
            grad_scores = grad_probs.sub_((grad_probs * probs).sum(-1, keepdim=True)).mul_(probs).mul_(scale)
            grad_q = (grad_scores @ kf).reshape(q.shape).to(q.dtype)
            grad_k = (grad_scores.transpose(-1, -2) @ qf).to(k.dtype)
        return grad_q, grad_k, grad_v.to(v.dtype), None, None, None


def _scores(qf: torch.Tensor, kf: torch.Tensor, bias: torch.Tensor | None, scale: float,
            groups: int) -> torch.Tensor:
    """q·kᵀ·scale + bias as [B, Hkv, groups·Tq, Tk] (the bias broadcast over heads and over the groups' rows)."""
    scores = (qf @ kf.transpose(-1, -2)).mul_(scale)
    if bias is not None:
        b, hkv, rows, k_len = scores.shape
        scores = scores.view(b, hkv, groups, rows // groups, k_len).add_(bias.unsqueeze(2)).view(b, hkv, rows, k_len)
    return scores


def _explicit_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, dropout: float,
                      is_causal: bool, kwargs: dict) -> bool:
    if query.device.type != "cpu" or not torch.is_grad_enabled():
        return False
    if not (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] or not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        return False
    if attention_mask is None and is_causal and query.shape[2] != key.shape[2]:
        return False  # sdpa aligns that causal mask top-left over a static cache's empty slots: left to it
    if dropout or any(kwargs.get(k) is not None for k in ("softcap", "position_bias", "s_aux", "sinks")):
        return False
    if kwargs.get("output_attentions"):
        return False
    if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.shape[1] != 1):
        return False  # per-head masks: left to sdpa
    b, h, q_len, _ = query.shape
    per_head = q_len * key.shape[2]
    return per_head <= SHORT_ROW_SCORES and b * h * per_head <= SCORES_ELEMENTS


def short_row_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None,
                                **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: [B, H, T, D] in, ([B, T, H, D], None) out."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not _explicit_applies(query, key, value, attention_mask, dropout, causal, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return explicit_attention(query, key, value, attention_mask, scaling, causal)


def explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None,
                       is_causal: bool = True) -> tuple[torch.Tensor, None]:
    """The explicit path itself, wherever it is called (bench/bench_attention.py times it against sdpa)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as autocast casts sdpa's inputs: what is kept for backward is narrow
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    bias = _additive_bias(attention_mask, is_causal, query.shape[2], key.shape[2], query.device)
    out = _ShortRowAttention.apply(query, key, value, bias, scale, query.shape[1] // key.shape[1])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, short_row_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_short_row_attention(model: nn.Module) -> bool:
    """Switch a model that runs transformers' "sdpa" to this module's attention (which hands back to sdpa wherever
    its explicit path does not apply). Returns whether it switched: models on other implementations are left."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    if not model._can_set_attn_implementation():  # attention not behind transformers' AttentionInterface
        return False
    model.set_attn_implementation(NAME)
    return model.config._attn_implementation == NAME
