"""What every training loss is made of: the model's log-probability of each target token, and SFT's summed
next-token cross-entropy over them.

Summed, not averaged: the trainer divides by the target tokens of the whole step (all micro-batches), so every
token weighs the same however the batch is split (nanoGPT averages per micro-batch instead). The other stages'
losses (DPO, GRPO: objectives.py) are functions of the same per-token log-probabilities.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraforge.data import IGNORE_INDEX
from loraforge.lora.fused import compute_dtype


def _plain_head(model: nn.Module) -> bool:
    # Models that post-process logits (Gemma-2 soft-capping, Cohere's logit_scale) need their own forward.
    config = getattr(model, "config", None)
    return (
        hasattr(model, "get_output_embeddings")
        and hasattr(model, getattr(model, "base_model_prefix", "") or "-")
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
    )


# Logits of at most this many elements exist at once in the loss (256 MB in fp32); beyond it the head runs in
# chunks whose logits are recomputed in backward instead of kept.
LOGITS_CHUNK_ELEMENTS = 2**26
# Scoring without gradients keeps smaller chunks: nothing is saved for backward, so small chunks cost no
# recomputation, and the comparison's batches of 32 rows would otherwise hold ~200 MB of logits at once.
SCORING_CHUNK_ELEMENTS = 2**23
# A frozen head in training (_FrozenHeadCrossEntropy) runs at the end of forward, when the step's activations are
# all alive: its chunk's logits, their fp32 log-softmax and probabilities are the step's peak. SmolLM2 (49k vocab):
# 42 rows a chunk instead of 170 took the demo's peak RSS 1,317 → 1,268 MB at the same step time (three
# alternating 40-step runs each; the head's weight is read ~6 times a step instead of twice).
FROZEN_HEAD_CHUNK_ELEMENTS = 2**21


# Rows that all begin with the same tokens (a chat template's system prompt, a shared instruction) compute those
# once, their KV cache broadcast to every row, where the positions that saves pay for the extra forward call. On a
# CPU a call costs about a read of the weights: SmolLM2's 14-token system prompt alone took 0.23 s, the compute of
# ~60 positions. On a GPU a small model's call is bound by kernel launches, worth thousands of positions.
MIN_SAVED_POSITIONS = {"cpu": 64, "other": 4096}


def target_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B, T-1] True where a label is predicted (the positions token_logprobs returns, row by row)."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(target_mask(batch).sum())


def target_rows(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The row of each target position, in the flattened order: indexes a per-row tensor once per token."""
    return target_mask(batch).nonzero()[:, 0]


def targets_per_row(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[B] target positions of each row (at least 1, so that it can divide)."""
    return target_mask(batch).sum(1).clamp(min=1)


def perplexity(loss: float) -> float:
    """exp(mean loss per token), capped at e^50 so that a diverged run still reports a finite number."""
    return math.exp(min(loss, 50.0))


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(label) at every target position, flattened row by row (the order of `labels[:, 1:] != -100`).

    The output head runs only on positions that carry loss: with a 49k vocabulary the head is a large
    share of a small model's compute, and prompt tokens need no logits. Packed batches (see data.collate)
    carry position ids and no attention mask. With `temperature` [B] in the batch, each row's logits are divided
    by it first: the log-probs of the distribution a sampler at that temperature drew from (GRPO's policy).
    """
    outputs, labels, head = _at_targets(model, batch)
    temperature = None
    if "temperature" in batch:
        temperature = batch["temperature"][target_rows(batch)][:, None]
    if head is not None:
        return -head_cross_entropy(head, outputs, labels, model.config.get_text_config().vocab_size, temperature)
    logits = outputs.float() if temperature is None else outputs.float() / temperature
    return -F.cross_entropy(logits, labels, reduction="none")


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens)."""
    logprobs = token_logprobs(model, batch)
    return -logprobs.sum(), int(logprobs.numel())


@torch.no_grad()
def loss_and_predictions(model: nn.Module, batch: dict[str, torch.Tensor], cache: dict | None = None
                         ) -> tuple[float, int, torch.Tensor]:
    """(summed cross-entropy over target tokens, their count, the greedy (argmax) next token at each target
    position, flattened row by row): scoring a reference and checking whether greedy decoding would write it,
    in one pass. `cache`: {keyword: an empty KV cache}, which the pass fills (to continue decoding from it)."""
    outputs, labels, head = _at_targets(model, batch, cache)
    rows = max(1, SCORING_CHUNK_ELEMENTS // model.config.get_text_config().vocab_size)
    total, predictions = 0.0, []
    for start in range(0, outputs.shape[0], rows):
        chunk = outputs[start : start + rows]
        logits = (head(chunk) if head is not None else chunk).float()
        total += float(F.cross_entropy(logits, labels[start : start + rows], reduction="sum"))
        predictions.append(logits.argmax(-1))
    return total, int(labels.numel()), torch.cat(predictions) if predictions else labels.new_zeros(0)


def _at_targets(model: nn.Module, batch: dict[str, torch.Tensor], cache: dict | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, nn.Module | None]:
    """(what the head reads at each target position — or the logits there, for models that post-process them —,
    the labels, the head or None)."""
    labels = batch["labels"][:, 1:]
    targets = target_mask(batch)
    plain = _plain_head(model)
    run = _backbone_hidden(model) if plain else lambda **inputs: model(**inputs).logits
    head = model.get_output_embeddings() if plain else None
    if "prompt_ids" in batch:
        outputs, shared_labels = _at_targets_shared_prompts(model, run, batch)
        if shared_labels.numel() != int(targets.sum()):
            raise ValueError("with shared prompts, every completion token must be a target and nothing else")
        return outputs, shared_labels, head
    prefix = _prefix_to_share(model, batch)
    if prefix:
        return _shared_prefix_forward(model, run, batch, prefix, cache)[:, :-1][targets], labels[targets], head
    # `inputs_embeds` instead of ids lets a caller differentiate with respect to the input activations.
    inputs = {"inputs_embeds": batch["inputs_embeds"]} if "inputs_embeds" in batch else {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    caching = dict(use_cache=True, **cache) if cache else dict(use_cache=False)
    return run(**inputs, **caching)[:, :-1][targets], labels[targets], head


def _backbone_hidden(model: nn.Module):
    backbone = getattr(model, model.base_model_prefix)
    return lambda **inputs: backbone(**inputs).last_hidden_state


def shared_prefix_length(batch: dict[str, torch.Tensor]) -> int:
    """How many leading tokens every row of the batch has in common (real tokens, not padding), short of the
    batch's last position; 0 for a single row."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.shape[0] < 2:
        return 0
    same = ((ids == ids[:1]) & mask.bool()).all(0)
    return min(int(same.int().cumprod(0).sum()), ids.shape[1] - 1)


def _prefix_to_share(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """The batch's common prefix where computing it once gives every row what its own forward gives and saves
    enough to pay for the extra call; else 0. Packed rows (position ids) and input embeddings are left alone."""
    if "input_ids" not in batch or "position_ids" in batch or "inputs_embeds" in batch:
        return 0
    prefix = shared_prefix_length(batch)
    ids = batch["input_ids"]
    least = MIN_SAVED_POSITIONS["cpu" if ids.device.type == "cpu" else "other"]
    if prefix == 0 or prefix * (ids.shape[0] - 1) < least or not hasattr(model, "config"):
        return 0  # (a wrapper without the model's config, such as a LoraModel itself, runs every row whole)
    return prefix if _rows_independent(model) else 0


def _rows_independent(model: nn.Module) -> bool:
    """Whether each row's outputs depend on its own tokens alone, the same through a KV cache: no mixed-adapter
    batch (rows differ in adapter), no random draw in training (dropout, router jitter), no gradient checkpointing
    in training (transformers drops the cache under it), plain full attention in every layer, and no FSDP2 sharding
    (each forward call gathers the weights: every rank would have to make the same calls)."""
    from torch.distributed.fsdp import FSDPModule

    from loraforge.errors import LoraforgeError
    from loraforge.models import gradient_checkpointing_on
    from loraforge.serve.batch import check_full_attention

    training = model.training
    config = model.config.get_text_config()
    if training and any(isinstance(value, float) and value > 0 and ("drop" in key or "jitter" in key)
                        for key, value in vars(config).items()):
        return False
    if training and gradient_checkpointing_on(model):
        return False
    for module in model.modules():
        if getattr(module, "row_adapters", None) is not None or isinstance(module, FSDPModule):
            return False
        if training and ((isinstance(module, nn.Dropout) and module.training and module.p > 0)
                         or (hasattr(module, "draws_random_numbers") and module.draws_random_numbers())):
            return False
    try:
        check_full_attention(model.config)
    except LoraforgeError:
        return False
    return True


def _shared_prefix_forward(model: nn.Module, run, batch: dict[str, torch.Tensor], prefix: int,
                           cache: dict | None = None) -> torch.Tensor:
    """run()'s output for the whole batch, the first `prefix` positions (the same in every row) computed once:
    their KV cache is broadcast to all rows (an expanded view: backward sums every row's gradient into it) and the
    rest of each row runs on top. `cache`, when given, ends up holding every row's whole KV, as without sharing."""
    from transformers import DynamicCache

    from loraforge.serve.batch import cache_keyword

    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, length = ids.shape
    cache = cache or {cache_keyword(model): DynamicCache(config=model.config)}
    head = run(input_ids=ids[:1, :prefix], attention_mask=mask[:1, :prefix],
               position_ids=torch.arange(prefix, device=ids.device)[None], use_cache=True, **cache)
    for layer in next(iter(cache.values())).layers:
        layer.keys, layer.values = layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
    rest = run(input_ids=ids[:, prefix:], attention_mask=mask,
               position_ids=torch.arange(prefix, length, device=ids.device).expand(rows, -1), use_cache=True, **cache)
    return torch.cat([head.expand(rows, -1, -1), rest], 1)


def _at_targets_shared_prompts(model: nn.Module, run, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same outputs for rows that are completions of a few shared prompts (a GRPO group: 8 completions of one
    prompt), computing each prompt once: the prompts' forward fills a KV cache (with gradients), its rows are
    copied to every completion of that prompt, and the completions run on top of it. Batch keys: `prompt_ids`,
    `prompt_mask` (left-padded, one row per prompt), `prompt_index` (each row's prompt), `completion_ids`,
    `completion_mask` (right-padded); every completion token is a target."""
    from transformers import DynamicCache

    from loraforge.serve.batch import cache_keyword, positions_of

    keyword = cache_keyword(model)
    prompt_mask, index = batch["prompt_mask"], batch["prompt_index"]
    cache = DynamicCache(config=model.config)
    prompt_out = run(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=positions_of(prompt_mask),
                     use_cache=True, **{keyword: cache})
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]
    row_prompt_mask = prompt_mask[index]
    completion, completion_mask = batch["completion_ids"], batch["completion_mask"]
    positions = row_prompt_mask.sum(-1, keepdim=True) + torch.arange(completion.shape[1], device=completion.device)
    out = run(input_ids=completion, attention_mask=torch.cat([row_prompt_mask, completion_mask], 1),
              position_ids=positions, use_cache=True, **{keyword: cache})
    # Completion token j is predicted from position j-1; token 0 from the prompt's last position.
    before = torch.cat([prompt_out[index, -1:], out[:, :-1]], 1)
    targets = completion_mask.bool()
    return before[targets], completion[targets]


def head_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                       temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of head(hidden) / temperature against labels, per token. A frozen plain head in training runs
    as one node that keeps no logits (_FrozenHeadCrossEntropy); otherwise never more than LOGITS_CHUNK_ELEMENTS
    logits exist at once (SCORING_CHUNK_ELEMENTS without gradients): beyond that the head runs in chunks whose
    logits are recomputed in backward instead of kept. `temperature`: None, or one per token ([N, 1])."""
    if torch.is_grad_enabled() and hidden.requires_grad and _frozen_linear(head):
        rows = max(1, FROZEN_HEAD_CHUNK_ELEMENTS // vocab_size)
        return _FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, labels, temperature, rows)

    def chunk_loss(h: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        logits = head(h).float()
        return F.cross_entropy(logits if t is None else logits / t, y, reduction="none")

    # Without gradients nothing is recomputed, so the smaller scoring chunks cost nothing (validation's batches of
    # 32 demo rows held ~400 MB of logits and log-softmax at once with the larger ones: the default job's peak).
    rows = max(1, (LOGITS_CHUNK_ELEMENTS if torch.is_grad_enabled() else SCORING_CHUNK_ELEMENTS) // vocab_size)
    if hidden.shape[0] <= rows:
        return chunk_loss(hidden, labels, temperature)
    chunks = []
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start : start + rows], labels[start : start + rows]
        t = None if temperature is None else temperature[start : start + rows]
        if torch.is_grad_enabled():
            chunks.append(checkpoint(chunk_loss, h, y, t, use_reentrant=False))
        else:
            chunks.append(chunk_loss(h, y, t))
    return torch.cat(chunks)


def _frozen_linear(head: nn.Module) -> bool:
    """A plain nn.Linear head that trains nothing (not an adapted layer, not full fine-tuning, not 4-bit)."""
    return (type(head) is nn.Linear and head.weight.is_floating_point() and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """loss_i = logsumexp(z_i) − z_i[y_i] with z_i = (W·h_i + b) / t_i, for a frozen head W.

    Its gradient with respect to h_i does not depend on anything after the loss but the incoming scalar g_i:
    ∂loss_i/∂h_i = ((softmax(z_i) − onehot(y_i)) / t_i)·W. So forward computes it, one chunk of rows at a time,
    right after each chunk's logits, and keeps only those rows (targets × hidden); backward scales each by g_i.
    Autograd over the separate ops keeps the log-softmax of every target (targets × vocab, fp32) and, under
    autocast, the head's weight cast to the compute dtype: SmolLM2 at batch 8 of the demo (~250 targets, a 49k
    vocabulary), ~100 MB at the step's peak, for the same matmuls."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, temperature, rows: int):
        dtype = compute_dtype(hidden)  # read before autocast is switched off for the explicit casts below
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = None if bias is None else bias.to(dtype)
            losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            grad = torch.empty_like(h)
            for start in range(0, h.shape[0], rows):
                part = slice(start, start + rows)
                logits = h[part] @ w.T if b is None else torch.addmm(b, h[part], w.T)
                if temperature is not None:
                    logits = logits.float() / temperature[part]
                y = labels[part, None]
                logprobs = torch.log_softmax(logits, -1, dtype=torch.float32)  # one pass, fp32 out
                del logits  # before the cast of the probabilities below: two chunk-sized buffers at a time, not three
                losses[part] = logprobs.gather(1, y).squeeze(1).neg()
                probs = logprobs.exp_().scatter_add_(1, y, torch.full_like(y, -1, dtype=torch.float32))
                if temperature is not None:
                    probs /= temperature[part]
                grad[part] = probs.to(dtype) @ w
        ctx.save_for_backward(grad)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grad,) = ctx.saved_tensors
        grad_hidden = (grad.float() * grad_losses[:, None]).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None
