"""`loraforge serve` through the official openai client against a live server on loopback."""

from __future__ import annotations

import httpx
import pytest

from loraforge.cli import main
from serve_support import (  # noqa: F401 (fixtures)
    ADAPTER_CONFIGS, MAX_TOKENS, adapters_root, chat_prompt, client, live, make_server, offline_answer, reference,
    single_torch_thread)

API_KEY = "test-key"
ADMIN_TOKEN = "admin-secret"


@pytest.fixture(scope="module")
def url(tiny_model_dir, adapters_root):  # noqa: F811
    with live(make_server(tiny_model_dir, adapters_root, api_key=API_KEY, admin_token=ADMIN_TOKEN)) as base_url:
        yield base_url


@pytest.fixture()
def api(url):
    return client(url, API_KEY)


def test_models_lists_the_base_and_every_adapter(api):
    models = api.models.list().data
    assert [m.id for m in models] == ["tiny-base", *sorted(ADAPTER_CONFIGS)]
    assert all(getattr(m, "parent", None) == "tiny-base" for m in models[1:])
    assert api.models.retrieve("legal.v2").id == "legal.v2"


def test_greedy_chat_answers_equal_offline_chat_for_the_base_and_each_adapter(api, reference):  # noqa: F811
    messages = [{"role": "system", "content": "Extract the order as JSON."}, *chat_prompt(7, 11)]
    answers = {}
    for model in [None, *ADAPTER_CONFIGS]:
        response = api.chat.completions.create(model=model or "tiny-base", messages=messages, temperature=0,
                                               max_tokens=MAX_TOKENS)
        answers[model] = response.choices[0].message.content
        assert answers[model] == offline_answer(reference, model, messages)
        assert response.usage.completion_tokens <= MAX_TOKENS and response.model == (model or "tiny-base")
    assert len(set(answers.values())) == len(answers)  # every adapter changes the answer: none was skipped


def test_server_answer_equals_what_loraforge_chat_prints(api, tiny_model_dir, adapters_root, capsys):  # noqa: F811
    prompt = "Please send 3 blue mugs to Oslo."
    assert main(["chat", "--model", str(tiny_model_dir), "--adapter", str(adapters_root / "skill-4"), "--prompt",
                 prompt, "--max-new-tokens", str(MAX_TOKENS)]) == 0
    response = api.chat.completions.create(model="skill-4", messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=MAX_TOKENS)
    assert capsys.readouterr().out == response.choices[0].message.content + "\n"


def test_streamed_chunks_add_up_to_the_answer_and_report_usage(api, reference):  # noqa: F811
    messages = chat_prompt(9, 12)
    stream = api.chat.completions.create(model="skill-2", messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == offline_answer(reference, "skill-2", messages)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_text_completions_equal_offline_generate(api, reference):  # noqa: F811
    lora, tokenizer, names = reference
    prompt = "The quick brown fox"
    lora.set_active([names["med_7"]])
    try:
        inputs = tokenizer(prompt, return_tensors="pt")
        out = lora.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    finally:
        lora.set_active([])
    expected = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    response = api.completions.create(model="med_7", prompt=[prompt, prompt], max_tokens=6, temperature=0)
    assert [c.text for c in response.choices] == [expected, expected]
    streamed = api.completions.create(model="med_7", prompt=prompt, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_n_choices_stop_strings_and_seeded_sampling(api, reference):  # noqa: F811
    messages = chat_prompt(5, 13)
    full = offline_answer(reference, "skill-0", messages)
    response = api.chat.completions.create(model="skill-0", messages=messages, temperature=0, n=2,
                                           max_tokens=MAX_TOKENS)
    assert [c.message.content for c in response.choices] == [full, full] and [c.index for c in response.choices] == [0, 1]
    stop = full[2:4]
    stopped = api.chat.completions.create(model="skill-0", messages=messages, temperature=0, stop=[stop],
                                          max_tokens=MAX_TOKENS)
    assert stopped.choices[0].message.content == full.split(stop)[0].rstrip()
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [api.chat.completions.create(model="skill-0", messages=messages, temperature=1.2, seed=5,
                                           max_tokens=MAX_TOKENS).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_admin_endpoints_load_and_unload_behind_their_token(url):
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert admin.post("/admin/adapters/Finance-X").json() == {"loaded": "Finance-X"}
    assert "Finance-X" in [a["name"] for a in admin.get("/admin/adapters").json()["loaded"]]
    assert admin.delete("/admin/adapters/Finance-X").json() == {"unloaded": "Finance-X"}
    assert "Finance-X" not in [a["name"] for a in admin.get("/admin/adapters").json()["loaded"]]
    assert admin.delete("/admin/adapters/Finance-X").status_code == 404
    # the API key is not the admin token
    assert httpx.post(f"{url}/admin/adapters/skill-0", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401


def test_adapters_beyond_max_adapters_are_evicted_least_recently_used_first(tiny_model_dir, adapters_root,  # noqa: F811
                                                                            reference):  # noqa: F811
    server = make_server(tiny_model_dir, adapters_root, max_adapters=2)
    messages = chat_prompt(4, 14)
    with live(server) as url:
        api = client(url)
        for model in ["skill-0", "skill-1", "skill-0", "skill-3", "skill-1"]:
            answer = api.chat.completions.create(model=model, messages=messages, temperature=0).choices[0]
            assert answer.message.content == offline_answer(reference, model, messages)
        # skill-1 was least recently used when skill-3 came, then came back in place of skill-0
        assert list(server.registry.resident()) == ["skill-3", "skill-1"]
        assert len(server.engine.lora.configs) == 2  # evicted adapters are gone from the model too
