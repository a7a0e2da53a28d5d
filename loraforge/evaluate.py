"""Held-out loss and answers: how good is the model, before and after the adapter."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from loraforge.data import IGNORE_INDEX, Example, Messages, collate, render


def _plain_head(model: nn.Module) -> bool:
    # Models that post-process logits (Gemma-2 soft-capping, Cohere's logit_scale) need their own forward.
    config = getattr(model, "config", None)
    return (
        hasattr(model, "get_output_embeddings")
        and hasattr(model, getattr(model, "base_model_prefix", "") or "-")
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
    )


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens).

    The output head runs only on positions that carry loss: with a 49k vocabulary the head is a large
    share of a small model's compute, and prompt tokens need no logits.
    """
    labels = batch["labels"][:, 1:]
    targets = labels != IGNORE_INDEX
    count = int(targets.sum())
    if _plain_head(model):
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][targets])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][targets]
    return F.cross_entropy(logits.float(), labels[targets], reduction="sum"), count


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], pad_token_id: int, batch_size: int,
                  device: torch.device, autocast=nullcontext) -> dict[str, float]:
    """Mean token loss and perplexity over examples (model put in eval mode for the call)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(examples[start : start + batch_size]), pad_token_id).items()}
        with autocast():
            loss_sum, n = causal_lm_loss(model, batch)
        total, count = total + loss_sum.item(), count + n
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages],
                     max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy answers to chat prompts, batched with left padding and the KV cache."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    was_training = model.training
    model.eval()
    answers = []
    try:
        # Longest first: rows of similar length waste less padding.
        order = sorted(range(len(prompts)), key=lambda i: -len(render(tokenizer, prompts[i], True)))
        by_index: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            texts = [render(tokenizer, prompts[i], generation_prompt=True) for i in chunk]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            for i, row in zip(chunk, out[:, inputs["input_ids"].shape[1] :]):
                by_index[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
        answers = [by_index[i] for i in range(len(prompts))]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def _as_json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def answers_match(prediction: str, reference: str) -> bool:
    """Exact match; when the reference is JSON, equal parsed values (key order and spacing don't matter)."""
    expected = _as_json(reference)
    if expected is not None and isinstance(expected, (dict, list)):
        return _as_json(prediction.strip()) == expected
    return " ".join(prediction.split()).lower() == " ".join(reference.split()).lower()


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    return sum(answers_match(p, r) for p, r in zip(predictions, references)) / max(len(references), 1)


def compare_answers(lora, tokenizer: PreTrainedTokenizerBase, conversations: Sequence, limit: int,
                    max_new_tokens: int, batch_size: int = 16) -> dict:
    """Base vs adapter on the same held-out prompts: exact-match accuracy of each and the answers."""
    chosen = list(conversations)[:limit]
    prompts = [c.messages[:-1] for c in chosen]
    references = [c.messages[-1]["content"] for c in chosen]
    with lora.disable_adapters():
        base = generate_answers(lora, tokenizer, prompts, max_new_tokens, batch_size)
    tuned = generate_answers(lora, tokenizer, prompts, max_new_tokens, batch_size)
    return {
        "metric": "exact match" + (" (JSON-aware)" if references and _as_json(references[0]) is not None else ""),
        "n": len(chosen),
        "base": exact_match(base, references),
        "tuned": exact_match(tuned, references),
        "samples": [
            {"prompt": p[-1]["content"], "reference": r, "base": b, "tuned": t}
            for p, r, b, t in zip(prompts, references, base, tuned)
        ],
    }
