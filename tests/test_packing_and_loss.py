"""The speed paths of the loss change nothing: padding-free packing gives every conversation the loss and the
gradient it has alone, the chunked head gives the loss and gradient of the plain one, and a batch's common prefix
computed once gives every row the log-probs, gradients and KV cache of its own forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, make_model
from loraforge import LoraConfig, LoraModel
from loraforge import evaluate as evaluate_module
from loraforge import loss as loss_module
from loraforge.data import IGNORE_INDEX, Example, collate
from loraforge.loss import causal_lm_loss, target_tokens, token_logprobs


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


def test_scoring_without_gradients_runs_the_head_in_scoring_chunks(monkeypatch):
    """Without gradients the head's logits exist one scoring chunk at a time (SCORING_CHUNK_ELEMENTS, not the
    larger LOGITS_CHUNK_ELEMENTS of a trained head's backward), with the same log-probs."""
    model = make_model("llama")
    batch = collate(_examples([30, 25, 18]), 0)
    with torch.no_grad():
        whole = token_logprobs(model, batch)
    rows_seen: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    monkeypatch.setattr(loss_module, "SCORING_CHUNK_ELEMENTS", 3 * VOCAB)
    with torch.no_grad():
        chunked = token_logprobs(model, batch)
    assert max(rows_seen) == 3 and sum(rows_seen) == whole.numel()
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_frozen_head_keeps_no_logits_and_gives_the_plain_gradients(arch, monkeypatch):
    """The frozen head's one node (loss._FrozenHeadCrossEntropy) against autograd over head + cross-entropy: the same
    log-probs and adapter gradients under per-token weights (as DPO and GRPO weigh tokens), with and without a
    per-row temperature and in chunks of rows, while it keeps no logits for backward."""
    lora = LoraModel(_without_dropout(arch), LoraConfig(r=4, targets="all-linear"))
    lora.train()
    for p in lora.adapter_parameters("default"):
        torch.nn.init.normal_(p, std=0.05)
    batch = collate(_examples([30, 25, 18]), 0)
    weights = torch.linspace(0.5, 2.0, target_tokens(batch))
    frozen_linear = loss_module._frozen_linear
    monkeypatch.setattr(loss_module, "FROZEN_HEAD_CHUNK_ELEMENTS", 5 * VOCAB)  # rows of 5 logits: 49 targets, 10 chunks
    for temperature in (None, torch.tensor([0.7, 1.0, 1.3])):
        if temperature is not None:
            batch = {**batch, "temperature": temperature}
        results = []
        for fused in (True, False):
            monkeypatch.setattr(loss_module, "_frozen_linear", frozen_linear if fused else lambda head: False)
            lora.zero_grad()
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
                logprobs = token_logprobs(lora.model, batch)
            (logprobs * weights).sum().backward()
            results.append((logprobs.detach(), [p.grad.clone() for p in lora.adapter_parameters("default")], saved))
        (fused_lp, fused_grads, fused_saved), (plain_lp, plain_grads, plain_saved) = results
        torch.testing.assert_close(fused_lp, plain_lp, atol=1e-5, rtol=1e-5)
        for got, want in zip(fused_grads, plain_grads):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        # Autograd over the ops keeps at least the log-softmax of every target; the node keeps none of it.
        kept = [sum(shape.numel() for shape in shapes) for shapes in (plain_saved, fused_saved)]
        assert kept[0] - kept[1] >= target_tokens(batch) * VOCAB


def test_a_trained_head_takes_the_autograd_path():
    lora = LoraModel(make_model("llama"), LoraConfig(r=4, targets="all-linear", modules_to_save=["lm_head"]))
    assert not loss_module._frozen_linear(lora.model.get_output_embeddings())
    plain = make_model("llama")
    assert loss_module._frozen_linear(plain.requires_grad_(False).get_output_embeddings())
    assert not loss_module._frozen_linear(plain.requires_grad_(True).get_output_embeddings())


def _prefixed_batch(rows: int = 4, length: int = 16, prefix: int = 6) -> dict[str, torch.Tensor]:
    """Random rows that begin with the same `prefix` tokens (a system prompt), two of them right-padded."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    ids[:, :prefix] = ids[0, :prefix]
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1, length - 4 :], mask[rows - 1, prefix + 3 :] = 0, 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, : prefix + 2] = IGNORE_INDEX
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def _without_dropout(arch: str):
    model = make_model(arch)
    config = model.config
    for key, value in vars(config).items():  # GPT-2's attn/resid/embd_pdrop are 0.1
        if isinstance(value, float) and "drop" in key:
            setattr(config, key, 0.0)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _share_from(monkeypatch, positions: int) -> None:
    """Share a common prefix where it saves at least this many positions, on every device."""
    monkeypatch.setattr(loss_module, "MIN_SAVED_POSITIONS", {"cpu": positions, "other": positions})


def _count_shared_passes(monkeypatch) -> list:
    calls, shared = [], loss_module._shared_prefix_forward
    monkeypatch.setattr(loss_module, "_shared_prefix_forward", lambda *a, **k: (calls.append(1), shared(*a, **k))[1])
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mixtral"])
def test_a_common_prefix_computed_once_gives_each_row_its_own_logprobs_and_the_same_gradient(arch, monkeypatch):
    lora = LoraModel(_without_dropout(arch), LoraConfig(r=4, targets="all-linear", init="gaussian")).train()
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            layer.factors("default")[1].normal_(std=0.1)
    batch = _prefixed_batch()
    assert loss_module.shared_prefix_length(batch) == 6
    calls = _count_shared_passes(monkeypatch)
    results = []
    for least in (1, 10**9):  # shared, then every row whole
        _share_from(monkeypatch, least)
        lora.zero_grad()
        logprobs = loss_module.token_logprobs(lora.model, batch)
        logprobs.sum().backward()
        results.append((logprobs.detach(), [p.grad.clone() for p in lora.adapter_parameters("default")]))
    assert len(calls) == 1  # the first pass shared the prefix, the second did not
    (shared, shared_grads), (whole, whole_grads) = results
    assert shared.shape == whole.shape == (int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared_grads, whole_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_scoring_with_a_shared_prefix_fills_the_cache_with_every_rows_own_keys(monkeypatch):
    from transformers import DynamicCache

    from loraforge.serve.batch import cache_keyword

    model = make_model("llama").eval()
    batch, keyword = _prefixed_batch(), cache_keyword(model)
    calls = _count_shared_passes(monkeypatch)
    results = []
    for least in (1, 10**9):
        _share_from(monkeypatch, least)
        cache = DynamicCache(config=model.config)
        total, count, predictions = loss_module.loss_and_predictions(model, batch, {keyword: cache})
        results.append((total, count, predictions, [(layer.keys, layer.values) for layer in cache.layers]))
    assert len(calls) == 1
    (total, count, predictions, kv), (whole_total, whole_count, whole_predictions, whole_kv) = results
    assert count == whole_count and torch.equal(predictions, whole_predictions)
    assert total == pytest.approx(whole_total, rel=1e-5)
    for (keys, values), (whole_keys, whole_values) in zip(kv, whole_kv):
        assert keys.shape == whole_keys.shape == (4, model.config.num_key_value_heads, 16, keys.shape[-1])
        torch.testing.assert_close(keys, whole_keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(values, whole_values, atol=1e-5, rtol=1e-5)


def test_a_common_prefix_is_shared_only_where_every_row_would_compute_it_alike(monkeypatch):
    batch = _prefixed_batch()
    assert loss_module.shared_prefix_length({k: v[:1] for k, v in batch.items()}) == 0  # one row
    padded = {**batch, "attention_mask": batch["attention_mask"].clone()}
    padded["attention_mask"][2, 4:] = 0  # a row that ends inside the common tokens: only real tokens count
    assert loss_module.shared_prefix_length(padded) == 4
    same = {k: v[:1].repeat(3, 1) for k, v in batch.items()}
    assert loss_module.shared_prefix_length(same) == 15  # identical rows: the last position still runs per row

    calls = _count_shared_passes(monkeypatch)
    _share_from(monkeypatch, 18)  # the batch saves 3 rows × 6 positions

    def shares(lora, **kwargs) -> bool:
        before = len(calls)
        loss_module.token_logprobs(lora.model, {**batch, **kwargs})
        return len(calls) > before

    plain = LoraModel(_without_dropout("llama"), LoraConfig(r=4, targets="all-linear"))
    assert shares(plain.train()) and shares(plain.eval())
    _share_from(monkeypatch, 19)
    assert not shares(plain.eval())  # saving less than the extra call costs
    _share_from(monkeypatch, 18)
    with plain.mixed_batch(["default", None, "default", None]):  # rows differ in adapter
        assert not shares(plain.eval())
    assert not shares(plain.eval(), position_ids=torch.arange(16).expand(4, -1))  # packed rows
    dropout = LoraModel(_without_dropout("llama"), LoraConfig(r=4, targets="all-linear", dropout=0.1))
    assert not shares(dropout.train()) and shares(dropout.eval())  # dropout draws per row in training only
    lycoris = LoraModel(_without_dropout("llama"), LoraConfig(method="loha", r=4, targets="all-linear"))
    assert not shares(lycoris.train())  # LoHa draws its module dropout every forward, even at p = 0
    attention_dropout = make_model("llama")
    attention_dropout.config.attention_dropout = 0.1
    assert not shares(LoraModel(attention_dropout, LoraConfig(r=4)).train())
    from loraforge.models import enable_gradient_checkpointing

    checkpointed = LoraModel(_without_dropout("llama"), LoraConfig(r=4, targets="all-linear"))
    enable_gradient_checkpointing(checkpointed.model)
    assert not shares(checkpointed.train()) and shares(checkpointed.eval())  # transformers drops the cache


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
