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


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mixtral"])
def test_kv_bytes_per_token_is_what_a_forward_adds_to_the_cache(arch):
    from transformers import DynamicCache

    from conftest import make_inputs, make_model
    from loraforge.evaluate import kv_bytes_per_token
    from loraforge.serve.batch import cache_keyword

    model = make_model(arch)
    ids = make_inputs(arch, batch=1)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_keyword(model): cache})
    cached = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_bytes_per_token(model) * ids.shape[1] == cached


def test_decode_rows_widen_the_batch_only_where_the_cache_fits():
    from conftest import make_model
    from loraforge.evaluate import DECODE_KV_BYTES, DECODE_ROWS, decode_rows, kv_bytes_per_token

    model = make_model("llama")
    per_token = kv_bytes_per_token(model)
    assert decode_rows(model, 100, batch_size=8) == DECODE_ROWS  # a tiny cache: the wide batch
    too_long = DECODE_KV_BYTES // per_token // 4  # only 4 such rows fit
    assert decode_rows(model, too_long, batch_size=8) == 8  # the caller's batch is never lowered
    assert decode_rows(model, too_long, batch_size=2) == 4
    assert decode_rows(model, 10**9, batch_size=0) == 1


@pytest.mark.parametrize("with_loss", [True, False])
def test_the_base_side_comes_from_the_cache_when_nothing_it_depends_on_changed(tiny, tmp_path, monkeypatch, with_loss):
    from loraforge import evaluate

    lora, tokenizer = tiny
    lora.add_adapter("noisy", LoraConfig(r=4, targets="all-linear"))
    perturb(lora, "noisy", std=1.0)
    conversations = [Conversation(p + [{"role": "assistant", "content": "send 3 mugs"}], f"t:{i}")
                     for i, p in enumerate(_prompts())]
    computed = []  # the adapters whose answers were computed (None: the base)
    for name in ("score_and_answer", "generate_answers"):
        def spy(lora_, *args, _real=getattr(evaluate, name), _scoring=name == "score_and_answer", **kwargs):
            computed.append(args[2] if _scoring else (list(lora_.active_adapters) or [None])[0])
            return _real(lora_, *args, **kwargs)
        monkeypatch.setattr(evaluate, name, spy)
    cache = evaluate.BaseSideCache(tmp_path / "cache", {"model": "tiny"})

    def run(max_new_tokens=4, rows=conversations, base_cache=cache):
        computed.clear()
        return evaluate_models(lora, tokenizer, rows, ["noisy"], ["exact_match", "token_f1"], max_new_tokens=max_new_tokens,
                               batch_size=4, max_seq_len=64, with_loss=with_loss, base_cache=base_cache)

    first = run()
    assert None in computed and "base_from_cache" not in first
    second = run()
    assert None not in computed and computed  # the adapter is still computed, the base is not
    assert second.pop("base_from_cache").startswith(str(tmp_path / "cache"))
    assert second == first
    # Anything the base side depends on makes it computed again: the generation length, the rows, the identity.
    assert "base_from_cache" not in run(max_new_tokens=3) and None in computed
    assert "base_from_cache" not in run(rows=conversations[:-1]) and None in computed
    other = evaluate.BaseSideCache(tmp_path / "cache", {"model": "another"})
    assert "base_from_cache" not in run(base_cache=other) and None in computed
    # An unreadable or foreign file is recomputed (and replaced), never trusted.
    for path in (tmp_path / "cache").iterdir():
        path.write_text('{"key": {}, "base": {"model": {}, "answers": []}}')
    assert run() == first and None in computed
    assert "base_from_cache" in run()


def test_the_scoring_pass_hands_diverging_rows_their_kv_cache(tiny):
    from loraforge.evaluate import score_and_answer

    lora, tokenizer = tiny
    conversations = [Conversation(p + [{"role": "assistant", "content": "send the parcel to Oslo by Friday"}], f"t:{i}")
                     for i, p in enumerate(_prompts())]
    _, answers = score_and_answer(lora, tokenizer, conversations, None, max_new_tokens=8, batch_size=4, max_seq_len=64)
    open_rows = [a for a in answers if not a.done]
    assert open_rows  # a random model leaves this reference
    layers = lora.model.config.num_hidden_layers
    for answer in answers:
        if answer.done:
            assert answer.cache is None
            continue
        assert len(answer.cache) == layers
        for keys, values in answer.cache:  # (KV heads, the prompt and the answer so far but its last token, head)
            assert keys.shape[1] == values.shape[1] == len(answer.prompt_ids) + len(answer.tokens) - 1
            assert keys._base is None  # a copy: the batch's whole cache is not kept alive


def test_scoring_between_steps_takes_up_to_four_micro_batches_of_rows_unless_checkpointing():
    from loraforge.evaluate import SCORING_ROWS, scoring_rows

    assert [scoring_rows(rows, False) for rows in (1, 2, 8, 64)] == [4, 8, SCORING_ROWS, 64]
    assert [scoring_rows(rows, True) for rows in (1, 8, 64)] == [1, 8, 64]
