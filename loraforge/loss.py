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


def perplexity(loss: float) -> float:
    """exp(mean loss per token), capped at e^50 so that a diverged run still reports a finite number."""
    return math.exp(min(loss, 50.0))


def token_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(label) at every target position, flattened row by row (the order of `labels[:, 1:] != -100`).

    The output head runs only on positions that carry loss: with a 49k vocabulary the head is a large
    share of a small model's compute, and prompt tokens need no logits. Packed batches (see data.collate)
    carry position ids and no attention mask.
    """
    outputs, labels, head = _at_targets(model, batch)
    if head is not None:
        return -head_cross_entropy(head, outputs, labels, model.config.get_text_config().vocab_size)
    return -F.cross_entropy(outputs.float(), labels, reduction="none")


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens)."""
    logprobs = token_logprobs(model, batch)
    return -logprobs.sum(), int(logprobs.numel())


@torch.no_grad()
def loss_and_predictions(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int, torch.Tensor]:
    """(summed cross-entropy over target tokens, their count, the greedy (argmax) next token at each target
    position, flattened row by row): scoring a reference and checking whether greedy decoding would write it,
    in one pass."""
    outputs, labels, head = _at_targets(model, batch)
    rows = max(1, SCORING_CHUNK_ELEMENTS // model.config.get_text_config().vocab_size)
    total, predictions = 0.0, []
    for start in range(0, outputs.shape[0], rows):
        chunk = outputs[start : start + rows]
        logits = (head(chunk) if head is not None else chunk).float()
        total += float(F.cross_entropy(logits, labels[start : start + rows], reduction="sum"))
        predictions.append(logits.argmax(-1))
    return total, int(labels.numel()), torch.cat(predictions) if predictions else labels.new_zeros(0)


def _at_targets(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, nn.Module | None]:
    """(what the head reads at each target position — or the logits there, for models that post-process them —,
    the labels, the head or None)."""
    labels = batch["labels"][:, 1:]
    targets = labels != IGNORE_INDEX
    # `inputs_embeds` instead of ids lets a caller differentiate with respect to the input activations.
    inputs = {"inputs_embeds": batch["inputs_embeds"]} if "inputs_embeds" in batch else {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        inputs["position_ids"] = batch["position_ids"]
    else:
        inputs["attention_mask"] = batch["attention_mask"]
    if _plain_head(model):
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
        return hidden[:, :-1][targets], labels[targets], model.get_output_embeddings()
    return model(**inputs, use_cache=False).logits[:, :-1][targets], labels[targets], None


def head_cross_entropy(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cross-entropy of head(hidden) against labels, per token, never holding more than LOGITS_CHUNK_ELEMENTS
    logits: beyond that the head runs in chunks whose logits are recomputed in backward instead of kept."""

    def chunk_loss(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), y, reduction="none")

    rows = max(1, LOGITS_CHUNK_ELEMENTS // vocab_size)
    if hidden.shape[0] <= rows:
        return chunk_loss(hidden, labels)
    chunks = []
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start : start + rows], labels[start : start + rows]
        if torch.is_grad_enabled():
            chunks.append(checkpoint(chunk_loss, h, y, use_reentrant=False))
        else:
            chunks.append(chunk_loss(h, y))
    return torch.cat(chunks)
