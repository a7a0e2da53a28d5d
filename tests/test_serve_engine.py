"""The serving engine without HTTP: continuous batching over mixed adapters equals offline greedy answers."""

from __future__ import annotations

import pytest

from transformers import MistralConfig

from conftest import VOCAB, _causal_lm, make_tokenizer
from loraforge import LoraforgeError, LoraModel
from loraforge.data import render
from loraforge.serve.engine import Engine, Failed, Finished, Generation, SamplingParams
from loraforge.serve.text import TextStream
from serve_support import (  # noqa: F401 (fixtures)
    adapters_root, chat_prompt, make_server, offline_answer, reference, single_torch_thread)


@pytest.fixture()
def server(tiny_model_dir, adapters_root):  # noqa: F811
    return make_server(tiny_model_dir, adapters_root)


def _generation(server, adapter, messages, max_tokens, events=None, **sampling) -> Generation:
    ids = server.tokenizer(render(server.tokenizer, messages, generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
    internal = server.registry.acquire(adapter) if adapter else None
    emit = events.append if events is not None else (lambda event: None)
    return Generation(ids, internal, SamplingParams(max_new_tokens=max_tokens, **sampling), emit, strip=True)


def _run_until_done(engine, generations, limit=200) -> None:
    for _ in range(limit):
        if all(g.done for g in generations):
            return
        engine.step()
    raise AssertionError("generations did not finish")


def _final(events) -> Finished:
    (final,) = [e for e in events if isinstance(e, Finished)]
    return final


def test_rows_join_between_decode_steps_and_answer_as_offline(server, reference):  # noqa: F811
    engine = server.engine
    plan = [("skill-0", chat_prompt(2, 1), 8), ("skill-3", chat_prompt(25, 2), 8), (None, chat_prompt(6, 3), 8),
            ("legal.v2", chat_prompt(12, 4), 3)]
    events = [[] for _ in plan]
    first = _generation(server, *plan[0], events[0])
    engine.submit([first])
    engine.step()  # prefill and one decode step: the first row is decoding when the others arrive
    assert len(first.tokens) == 2
    # the second prompt is longer than the first row's cache, the others shorter: both sides get left-padded
    later = [_generation(server, *p, e) for p, e in zip(plan[1:], events[1:])]
    engine.submit(later)
    engine.step()
    assert engine.stats.peak_rows == 4 and engine.stats.peak_adapters == 4
    _run_until_done(engine, [first, *later])
    for (adapter, messages, max_tokens), row_events in zip(plan, events):
        assert _final(row_events).text == offline_answer(reference, adapter, messages, max_tokens)
    assert len(engine._batch) == 0


def test_leaving_rows_free_their_cache_columns_and_the_rest_stay_exact(server, reference):  # noqa: F811
    engine = server.engine
    plan = [("skill-1", chat_prompt(30, 5), 1), ("skill-4", chat_prompt(3, 6), 8), ("med_7", chat_prompt(5, 7), 8)]
    events = [[] for _ in plan]
    generations = [_generation(server, *p, e) for p, e in zip(plan, events)]
    engine.submit(generations)
    engine.step()  # prefill: the long row gets its one token and leaves
    assert generations[0].done and len(engine._batch) == 2
    longest = max(len(g.prompt_ids) + len(g.tokens) for g in generations[1:])
    assert engine._batch.mask.shape[1] == longest - 1  # the newest token is not in the cache yet
    _run_until_done(engine, generations)
    for (adapter, messages, max_tokens), row_events in zip(plan, events):
        assert _final(row_events).text == offline_answer(reference, adapter, messages, max_tokens)


def test_sampling_is_reproducible_by_seed_and_a_tiny_top_p_is_greedy(server, reference):  # noqa: F811
    messages = chat_prompt(4, 8)

    def sample(**sampling) -> str:
        events = []
        generation = _generation(server, "skill-2", messages, 8, events, **sampling)
        server.engine.submit([generation])
        _run_until_done(server.engine, [generation])
        return _final(events).text

    assert sample(temperature=1.5, seed=3) == sample(temperature=1.5, seed=3)
    assert len({sample(temperature=1.5, seed=s) for s in range(4)}) > 1
    assert sample(temperature=1.5, top_p=1e-6, seed=1) == offline_answer(reference, "skill-2", messages, 8)


def test_a_failing_step_fails_its_rows_and_the_engine_goes_on(server, reference, monkeypatch):  # noqa: F811
    engine = server.engine
    events = []
    generation = _generation(server, "skill-0", chat_prompt(3, 9), 4, events)
    monkeypatch.setattr(engine, "_decode", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.submit([generation])
    engine.step()
    assert [type(e) for e in events] == [Failed] and "RuntimeError" in events[0].message
    assert "boom" not in events[0].message  # the exception text stays in the server log, not with the client
    assert len(engine._batch) == 0
    monkeypatch.undo()
    events.clear()
    again = _generation(server, "skill-0", chat_prompt(3, 9), 4, events)
    engine.submit([again])
    _run_until_done(engine, [again])
    assert _final(events).text == offline_answer(reference, "skill-0", chat_prompt(3, 9), 4)


def test_cancelled_rows_leave_and_release_their_adapter(server):
    generation = _generation(server, "skill-1", chat_prompt(3, 10), 50)
    released = []
    generation.on_exit = lambda: released.append(True)
    server.engine.submit([generation])
    server.engine.step()
    generation.cancel()
    server.engine.step()
    assert released == [True] and len(server.engine._batch) == 0


def test_models_with_sliding_window_caches_are_refused_up_front():
    model = _causal_lm(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=8))
    with pytest.raises(LoraforgeError, match="plain full attention; this one has DynamicSlidingWindowLayer"):
        Engine(LoraModel(model), make_tokenizer())


# -- text ------------------------------------------------------------------------------------------
def _pieces(stream: TextStream, ids: list[int]) -> list[str]:
    pieces = []
    for end in range(1, len(ids) + 1):
        pieces.append(stream.update(ids[:end]))
        if stream.stopped:
            break
    pieces.append(stream.finish(ids[:end]))
    return pieces


def test_streamed_pieces_add_up_to_the_final_text():
    tokenizer = make_tokenizer()
    text = "  Hi, this is Maria.  Ünïcode ✓ 3 blue mugs to Oslo.  "
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    for strip in (False, True):
        stream = TextStream(tokenizer, strip=strip)
        pieces = _pieces(stream, ids)
        assert "".join(pieces) == stream.text == (text.strip() if strip else text)
        assert all("\ufffd" not in piece for piece in pieces)  # half a character is never sent


def test_stop_strings_cut_the_text_and_are_never_sent_in_part():
    tokenizer = make_tokenizer()
    ids = tokenizer("Please send 3 blue mugs to Oslo.", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=("blue mugs", "never"), strip=True)
    pieces = _pieces(stream, ids)
    assert stream.stopped and stream.text == "Please send 3"
    assert "".join(pieces) == "Please send 3" and not any("blu" in piece for piece in pieces)


def test_decoding_hands_the_kv_cache_over_without_a_deprecated_keyword(server, reference):  # noqa: F811
    """transformers renamed forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40)."""
    import warnings

    from loraforge.serve.batch import cache_keyword

    assert cache_keyword(server.engine.lora.model) == "cache"  # the locked transformers has the new keyword
    plan = ("skill-0", chat_prompt(2, 1), 4)
    events = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        generation = _generation(server, *plan, events)
        server.engine.submit([generation])
        _run_until_done(server.engine, [generation])
    assert _final(events).text == offline_answer(reference, *plan)


def test_rows_that_bring_their_kv_cache_skip_the_prefill_and_answer_as_offline(server, reference):  # noqa: F811
    """The comparison hands its scoring pass's cache to the engine: such a row joins without a forward pass, its
    last prompt token is its first decode input, and it decodes beside freshly prefilled rows."""
    import torch
    from transformers import DynamicCache

    from loraforge.serve.batch import cache_keyword

    engine = server.engine
    plan = [("skill-0", chat_prompt(9, 5), 6, True), (None, chat_prompt(3, 6), 6, True),
            ("skill-3", chat_prompt(14, 7), 6, False)]
    generations, events = [], [[] for _ in plan]
    for (adapter, messages, max_tokens, prefilled), row_events in zip(plan, events):
        generation = _generation(server, adapter, messages, max_tokens, row_events)
        if prefilled:
            cache = DynamicCache(config=engine.lora.model.config)
            with torch.no_grad(), engine.lora.using(generation.adapter):
                engine.lora.model(input_ids=torch.tensor([generation.prompt_ids[:-1]]), use_cache=True,
                                  **{cache_keyword(engine.lora.model): cache})
            generation.prefilled = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
        generations.append(generation)
    engine.submit(generations)
    engine.step()
    assert engine.stats.prefills == 1  # only the fresh row was prefilled
    assert all(g.prefilled is None for g in generations)
    _run_until_done(engine, generations)
    for (adapter, messages, max_tokens, _), row_events in zip(plan, events):
        assert _final(row_events).text == offline_answer(reference, adapter, messages, max_tokens)


@pytest.mark.parametrize("autocast", [False, True])
def test_the_engine_cache_appends_in_place_and_holds_what_attention_reads(autocast):
    """RoomyLayer: a decode step writes into spare room (the buffer is not copied), and the keys/values equal
    DynamicCache's — stored in the dtype attention computes in (under bf16 autocast: DynamicCache's fp32 keys
    rounded to bf16, the same cast attention applies) — and so do the logits."""
    import torch
    from transformers import DynamicCache

    from conftest import make_model
    from loraforge.serve.batch import RoomyLayer, cache_keyword, decode_cache

    model = make_model("llama")
    keyword = cache_keyword(model)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    roomy, plain = decode_cache(model.config), DynamicCache(config=model.config)
    assert all(isinstance(layer, RoomyLayer) for layer in roomy.layers)
    dtype = torch.bfloat16 if autocast else torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = [model(input_ids=ids, use_cache=True, **{keyword: c}).logits for c in (roomy, plain)]
        buffers = [layer.keys.data_ptr() for layer in roomy.layers]
        for step in range(3):
            token = logits[0][:, -1:].argmax(-1)
            logits = [model(input_ids=token, use_cache=True, **{keyword: c}).logits for c in (roomy, plain)]
            torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    assert [layer.keys.data_ptr() for layer in roomy.layers] == buffers  # appended in place, never moved
    for mine, theirs in zip(roomy.layers, plain.layers):
        assert mine.keys.shape == theirs.keys.shape == (2, 2, 8, 8) and mine.keys.dtype == dtype
        assert torch.equal(mine.keys, theirs.keys.to(dtype)) and torch.equal(mine.values, theirs.values.to(dtype))


def test_the_engine_cache_takes_views_the_batch_replaced():
    """Rows leaving (RunningBatch.keep) or joining replace a layer's keys with new tensors: the next token lands
    after them, in a fresh buffer."""
    import torch

    from loraforge.serve.batch import RoomyLayer

    layer = RoomyLayer()
    first = torch.randn(3, 2, 4, 8)
    layer.update(first, first)
    layer.keys, layer.values = layer.keys[[0, 2], :, 1:], layer.values[[0, 2], :, 1:]
    token = torch.randn(2, 2, 1, 8)
    keys, values = layer.update(token, token)
    assert torch.equal(keys, torch.cat([first[[0, 2], :, 1:], token], dim=2)) and torch.equal(values, keys)
