"""The speed paths of the loss change nothing: padding-free packing gives every conversation the loss and the
gradient it has alone, and the chunked head gives the loss and gradient of the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, make_model
from loraforge import LoraConfig, LoraModel
from loraforge import evaluate as evaluate_module
from loraforge import loss as loss_module
from loraforge.data import IGNORE_INDEX, Example, collate
from loraforge.loss import causal_lm_loss


def _examples(lengths: list[int], seed: int = 0) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=generator).tolist()
        prompt = n // 3  # loss on the "answer" only, like the assistant mask
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return examples


def _per_conversation_losses(model, batch) -> list[float]:
    """Summed token losses of each conversation in a (packed or padded) batch, in row/segment order."""
    inputs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {
        "attention_mask": batch["attention_mask"]}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none",
                                 ignore_index=IGNORE_INDEX).view(labels.shape)
    starts = (batch["position_ids"][:, 1:] == 0 if "position_ids" in batch  # a new conversation begins
              else torch.zeros_like(labels, dtype=torch.bool))
    losses = []
    for row in range(labels.shape[0]):
        segment = torch.cumsum(starts[row].long(), 0)
        for s in segment[labels[row] != IGNORE_INDEX].unique():
            losses.append(float(token_loss[row][(segment == s) & (labels[row] != IGNORE_INDEX)].sum()))
    return losses


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_packed_batch_gives_each_conversation_its_own_loss_and_the_same_gradient(arch):
    lengths = [20, 7, 12, 5, 9, 14]
    examples = _examples(lengths)
    padded, packed = collate(examples, 0), collate(examples, 0, packed=True)
    assert packed["input_ids"].shape[0] < len(examples)  # several conversations share a row
    assert packed["input_ids"].numel() < padded["input_ids"].numel()
    assert int(packed["attention_mask"].sum()) == sum(lengths)

    lora = LoraModel(make_model(arch), LoraConfig(r=4, targets="all-linear", init="gaussian"))
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            layer.factors("default")[1].normal_(std=0.1)
    with torch.no_grad():
        alone = sorted(loss for e in examples for loss in _per_conversation_losses(lora.model, collate([e], 0)))
        together = sorted(_per_conversation_losses(lora.model, packed))
    assert len(together) == len(examples)
    torch.testing.assert_close(torch.tensor(together), torch.tensor(alone), atol=1e-4, rtol=1e-5)

    grads = []
    for batch in (padded, packed):
        lora.zero_grad()
        loss, count = causal_lm_loss(lora.model, batch)
        loss.backward()
        grads.append([p.grad.clone() for p in lora.adapter_parameters("default")])
        assert count == sum(n - n // 3 for n in lengths)
    for padded_grad, packed_grad in zip(*grads):
        torch.testing.assert_close(packed_grad, padded_grad, atol=1e-5, rtol=1e-4)


def test_chunked_head_gives_the_plain_loss_and_gradient(monkeypatch):
    lora = LoraModel(make_model("llama"), LoraConfig(r=4, targets="all-linear", modules_to_save=["lm_head"]))
    batch = collate(_examples([30, 25, 18]), 0)
    results = []
    for chunk in (10**9, 3 * VOCAB):  # no chunking, then chunks of 3 rows of logits
        monkeypatch.setattr(loss_module, "LOGITS_CHUNK_ELEMENTS", chunk)
        lora.zero_grad()
        loss, _ = causal_lm_loss(lora.model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in lora.adapter_parameters("default")]))
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, plain_loss, atol=1e-5, rtol=1e-6)
    for chunked, plain in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(chunked, plain, atol=1e-6, rtol=1e-5)


def test_training_with_packing_follows_the_padded_run(tiny_model_dir, tmp_path):
    from loraforge.config import load_train_config
    from loraforge.demo import DEMO_DATA
    from loraforge.train import train

    data = tmp_path / "orders.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:40]))
    losses = {}
    for packing in ("false", "true"):
        config = load_train_config(None, [
            f"model={tiny_model_dir}", f"data={data}", f"output={tmp_path / packing}", "batch_size=4",
            "max_steps=4", "lr=5e-3", "lora.r=4", "compare=false", "report=false", "tensorboard=false",
            f"packing={packing}"])
        losses[packing] = train(config).losses
    torch.testing.assert_close(torch.tensor(losses["true"]), torch.tensor(losses["false"]), atol=1e-4, rtol=1e-4)


def test_validation_batches_rows_of_similar_length_and_keeps_the_loss(monkeypatch):
    model = make_model("llama").eval()
    examples = _examples([5, 30, 6, 31])
    one_by_one = evaluate_module.evaluate_loss(model, examples, 0, 1, torch.device("cpu"))
    widths = []

    def recording_collate(rows, pad_token_id):
        widths.append(max(len(row.input_ids) for row in rows))
        return collate(rows, pad_token_id)

    monkeypatch.setattr(evaluate_module, "collate", recording_collate)
    batched = evaluate_module.evaluate_loss(model, examples, 0, 2, torch.device("cpu"))
    assert sorted(widths) == [6, 31]  # the short rows share a batch, not each with a long one
    assert batched["tokens"] == one_by_one["tokens"]
    assert batched["loss"] == pytest.approx(one_by_one["loss"], rel=1e-5)
