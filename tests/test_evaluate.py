"""Evaluation on a tiny model: before/after, consistency, resources, batched generation."""

from __future__ import annotations

import pytest
import torch

from conftest import perturb
from loraforge import LoraConfig, LoraModel
from loraforge.data import Conversation
from loraforge.evaluate import consistency, evaluate_models, generate_answers, resources
from loraforge.models import load_model

QUESTIONS = ["hello world", "what is the capital of France?", "send 3 blue mugs to Oslo", "0123456789",
             "the quick brown fox", "answer the question"]


@pytest.fixture()
def tiny(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    return LoraModel(model), tokenizer


def _prompts():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


def test_batched_generation_equals_one_by_one(tiny):
    lora, tokenizer = tiny
    batched = generate_answers(lora, tokenizer, _prompts(), max_new_tokens=6, batch_size=4)
    single = [generate_answers(lora, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in _prompts()]
    assert batched == single


def test_before_after_sees_an_adapter_that_changes_answers(tiny):
    lora, tokenizer = tiny
    # References are the base model's own answers: base scores 100%, a strong random adapter does not.
    base_answers = generate_answers(lora, tokenizer, _prompts(), max_new_tokens=6)
    conversations = [Conversation(p + [{"role": "assistant", "content": a}], f"t:{i}")
                     for i, (p, a) in enumerate(zip(_prompts(), base_answers))]
    lora.add_adapter("noisy", LoraConfig(r=4, targets="all-linear"))
    perturb(lora, "noisy", std=1.0)
    result = evaluate_models(lora, tokenizer, conversations, ["noisy"], ["exact_match", "token_f1", "chrf"],
                             max_new_tokens=6, max_seq_len=64)
    assert result["n"] == len(QUESTIONS) and list(result["models"]) == ["base", "noisy"]
    assert result["models"]["base"]["exact_match"] == 1.0 and result["models"]["base"]["chrf"] == pytest.approx(100)
    assert result["models"]["noisy"]["exact_match"] < 1.0
    assert result["models"]["noisy"]["loss"] > result["models"]["base"]["loss"]
    assert [s["answers"]["base"] for s in result["samples"]] == base_answers
    assert lora.active_adapters == ("noisy",)  # evaluation puts the active set back


def test_consistency_near_zero_temperature_agrees_and_hot_sampling_does_not(tiny):
    lora, tokenizer = tiny
    conversations = [Conversation(p + [{"role": "assistant", "content": "x"}], "t") for p in _prompts()]
    cold = consistency(lora, tokenizer, conversations, [], prompts=3, samples_per_prompt=4, temperature=1e-4,
                       max_new_tokens=5)["base"]
    assert cold["agreement"] == 1.0 and cold["distinct"] == 1.0 and cold["prompts"] == 3
    hot = consistency(lora, tokenizer, conversations, [], prompts=3, samples_per_prompt=4, temperature=50.0,
                      max_new_tokens=5)["base"]
    assert hot["distinct"] > 1.0 and hot["agreement"] < 1.0


def test_resources_count_parameters_measure_each_side_and_leave_the_adapter_unmerged(tiny, tiny_model_dir, tmp_path):
    lora, tokenizer = tiny
    lora.add_adapter("a", LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    perturb(lora, "a")
    lora.save(tmp_path / "ad", ["a"])
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    result = resources(lora, tokenizer, "a", tmp_path / "ad" / "a", tiny_model_dir, _prompts()[0], new_tokens=8)
    # q_proj 32→32 and v_proj 32→16 in 2 layers: r·(d+k)
    assert result["trainable_params"] == 2 * (4 * 64 + 4 * 48)
    assert result["base_params"] == sum(p.numel() for n, p in lora.named_parameters() if "lora_" not in n)
    files = sum(f.stat().st_size for f in (tmp_path / "ad" / "a").iterdir()) / 2**20
    assert result["adapter_mb"] == pytest.approx(files) and result["base_mb"] > result["adapter_mb"]
    latency = result["latency"]
    assert set(latency) == {"base", "unmerged", "merged"} and all(v["peak_mb"] > 0 for v in latency.values())
    # Timings themselves are a benchmark's job (bench/), not a test's: a loaded CI machine made a ratio flaky.
    assert all(v["ms_per_token"] > 0 for v in latency.values())
    for name, param in lora.named_parameters():  # unmerged again afterwards (to fp32 rounding)
        torch.testing.assert_close(param, before[name], atol=1e-6, rtol=0)
    assert not any(layer.merged_adapters for _, layer in lora.lora_layers())


def test_answers_from_the_reference_pass_equal_plain_greedy_decoding(tiny):
    """score_and_answer + finish_answers (the comparison's path) against generate(): the same greedy answers
    and the same loss as evaluate_loss, for references the models do and do not follow."""
    from loraforge.data import tokenize
    from loraforge.evaluate import evaluate_loss

    lora, tokenizer = tiny
    lora.add_adapter("noisy", LoraConfig(r=4, targets="all-linear"))
    perturb(lora, "noisy", std=1.0)
    base_answers = generate_answers(lora, tokenizer, _prompts(), max_new_tokens=8)
    # Half the references are the base's own answers (followed to the end), half are other text (left at once).
    references = [a if i % 2 else "send the parcel to Oslo by Friday" for i, a in enumerate(base_answers)]
    conversations = [Conversation(p + [{"role": "assistant", "content": r}], f"t:{i}")
                     for i, (p, r) in enumerate(zip(_prompts(), references))]
    result = evaluate_models(lora, tokenizer, conversations, ["noisy"], ["exact_match"], max_new_tokens=8,
                             batch_size=4, max_seq_len=64)
    examples = [tokenize(tokenizer, c.messages, 64) for c in conversations]
    for label, adapter in (("base", None), ("noisy", "noisy")):
        with lora.using(adapter):
            expected = generate_answers(lora, tokenizer, _prompts(), max_new_tokens=8)
            loss = evaluate_loss(lora, examples, tokenizer.pad_token_id, 4, torch.device("cpu"))["loss"]
        assert [s["answers"][label] for s in result["samples"]] == expected, label
        assert result["models"][label]["loss"] == pytest.approx(loss, rel=1e-5), label


def test_the_reference_pass_keeps_what_greedy_decoding_would_write_and_only_that():
    from loraforge.evaluate import _follow

    eos = frozenset({2})
    followed = _follow([7], [5, 6, 2], [5, 6, 2], max_new_tokens=10, eos=eos)  # the model writes the reference
    assert followed.tokens == [5, 6, 2] and followed.done
    left = _follow([7], [5, 6, 2], [5, 9, 4], max_new_tokens=10, eos=eos)  # leaves it at the second token
    assert left.tokens == [5, 9] and not left.done and left.budget == 8
    ended = _follow([7], [5, 6, 2], [5, 2, 4], max_new_tokens=10, eos=eos)  # ends early
    assert ended.tokens == [5, 2] and ended.done
    capped = _follow([7], [5, 6, 8, 2], [5, 6, 8, 2], max_new_tokens=2, eos=eos)
    assert capped.tokens == [5, 6] and capped.done
    cut = _follow([7], [5, 6], [5, 6], max_new_tokens=10, eos=eos)  # a truncated reference: decoding goes on
    assert cut.tokens == [5, 6] and not cut.done and cut.budget == 8


def test_the_comparison_computes_in_the_precision_it_is_given(tiny):
    lora, tokenizer = tiny
    conversations = [Conversation(p + [{"role": "assistant", "content": "send 3 mugs"}], f"t:{i}")
                     for i, p in enumerate(_prompts())]
    fp32 = evaluate_models(lora, tokenizer, conversations, [], ["exact_match"], max_new_tokens=4, max_seq_len=64)
    bf16 = evaluate_models(lora, tokenizer, conversations, [], ["exact_match"], max_new_tokens=4, max_seq_len=64,
                           autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    base32, base16 = fp32["models"]["base"]["loss"], bf16["models"]["base"]["loss"]
    assert base16 != base32 and base16 == pytest.approx(base32, rel=0.05)
