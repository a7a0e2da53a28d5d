"""Every way `loraforge serve` refuses a request or an adapter: a JSON error with a clear message, never a trace."""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time

import httpx
import openai
import pytest
import torch
from transformers import LlamaConfig

from conftest import _causal_lm, perturb
from loraforge import LoraConfig, LoraModel
from loraforge.serve import add_parser
from loraforge.lora.files import CONFIG_FILE, WEIGHTS_FILE
from loraforge.serve.api import Limits
from serve_support import (  # noqa: F401 (fixtures)
    adapters_root, chat_prompt, client, live, make_server, single_torch_thread)

API_KEY = "s3cret"
LIMITS = Limits(max_tokens=16, default_max_tokens=4, max_n=2, max_body_bytes=4096, max_concurrent=1)
HELLO = [{"role": "user", "content": "hello"}]


def _save(lora: LoraModel, folder) -> None:
    perturb(lora, "default")
    lora.save(folder)


@pytest.fixture(scope="module")
def root(tiny_model_dir, adapters_root, tmp_path_factory):  # noqa: F811
    """One good adapter next to every kind of bad one."""
    root = tmp_path_factory.mktemp("hostile-adapters")
    outside = tmp_path_factory.mktemp("outside")
    shutil.copytree(adapters_root / "skill-0", root / "ok")
    shutil.copytree(adapters_root / "skill-1", root / "other")
    shutil.copytree(adapters_root / "skill-0", outside / "elsewhere")
    (root / "escape").symlink_to(outside / "elsewhere", target_is_directory=True)
    (root / "linked-weights").mkdir()
    shutil.copy(adapters_root / "skill-0" / CONFIG_FILE, root / "linked-weights")
    (root / "linked-weights" / WEIGHTS_FILE).symlink_to(outside / "elsewhere" / WEIGHTS_FILE)
    (root / "pickled").mkdir()
    shutil.copy(adapters_root / "skill-0" / CONFIG_FILE, root / "pickled")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    shutil.copytree(adapters_root / "skill-0", root / "wrong-rank")
    config = json.loads((root / "wrong-rank" / CONFIG_FILE).read_text())
    (root / "wrong-rank" / CONFIG_FILE).write_text(json.dumps({**config, "r": config["r"] + 1}))
    torch.manual_seed(0)
    wider = _causal_lm(LlamaConfig(vocab_size=400, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2))
    _save(LoraModel(wider, LoraConfig(r=2, targets=["q_proj"])), root / "other-base")
    from loraforge.models import load_model

    _save(LoraModel(load_model(str(tiny_model_dir))[0], LoraConfig(r=2, targets=["q_proj"], use_dora=True)),
          root / "dora")
    for method in ("adalora", "loha"):  # methods the core runs in mixed batches: served like plain LoRA
        options = {"adalora": {"init_r": 4, "target_r": 2, "total_step": 10}} if method == "adalora" else {}
        _save(LoraModel(load_model(str(tiny_model_dir))[0], LoraConfig(method=method, targets=["q_proj", "v_proj"],
                                                                       **options)), root / method)
    return root


@pytest.fixture(scope="module")
def server(tiny_model_dir, root):
    return make_server(tiny_model_dir, root, api_key=API_KEY, limits=LIMITS, max_adapters=1)


@pytest.fixture(scope="module")
def url(server):
    with live(server) as base_url:
        yield base_url


@pytest.fixture()
def api(url):
    return client(url, API_KEY)


def _post(url: str, path: str = "/v1/chat/completions", key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", headers={**headers, **kwargs.pop("headers", {})}, timeout=60, **kwargs)


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"message", "type"} and "Traceback" not in response.text
    return body["error"]["message"]


# -- who may call -------------------------------------------------------------------------------------
def test_requests_without_the_right_api_key_are_refused(url):
    for key in ("wrong", API_KEY + "x"):
        with pytest.raises(openai.AuthenticationError, match="API key"):
            client(url, key).chat.completions.create(model="tiny-base", messages=HELLO)
    for headers in ({}, {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}):
        response = httpx.get(f"{url}/v1/models", headers=headers)
        assert "API key" in _error(response, 401) and response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # health needs no key


def test_admin_endpoints_are_off_without_an_admin_token(url):
    _error(_post(url, "/admin/adapters/ok"), 404)


def test_the_cli_binds_loopback_by_default(monkeypatch):
    monkeypatch.delenv("LORAFORGE_ADMIN_TOKEN", raising=False)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--adapters-dir", "x"])
    assert args.host == "127.0.0.1" and args.admin_token is None


# -- which adapter -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../ok", "/etc", "ok/../ok", ".hidden", "a" * 65, "with space", "", "ok\n"])
def test_adapter_names_outside_the_pattern_are_refused(api, name):
    with pytest.raises(openai.BadRequestError, match="invalid adapter name"):
        api.chat.completions.create(model=name, messages=HELLO)


@pytest.mark.parametrize("name", ["escape", "linked-weights"])
def test_symlinks_out_of_the_adapter_folder_are_refused(api, name):
    with pytest.raises(openai.BadRequestError, match="resolves outside the adapter folder"):
        api.chat.completions.create(model=name, messages=HELLO)
    assert name not in [m.id for m in api.models.list().data]


def test_unknown_adapters_are_404(api):
    with pytest.raises(openai.NotFoundError, match="'nope' not found"):
        api.chat.completions.create(model="nope", messages=HELLO)


@pytest.mark.parametrize("name, message", [
    ("pickled", "is a pickle"),
    ("other-base", "has shape"),
    ("wrong-rank", r"rank \d+ in the file"),
    ("dora", "DoRA"),
])
def test_adapters_that_do_not_fit_are_refused_before_use(api, server, name, message):
    with pytest.raises(openai.UnprocessableEntityError, match=message):
        api.chat.completions.create(model=name, messages=HELLO)
    # nothing of the refused adapter stays in the model
    assert name not in server.registry.resident()
    assert len(server.engine.lora.configs) == len(server.registry.resident())
    assert api.chat.completions.create(model="ok", messages=HELLO).choices[0].message.content is not None


# -- how much ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(max_tokens=17), "max_tokens=17 is over the server's limit of 16"),
    (dict(n=3), "limit is 2"),
    (dict(stop=["a", "b", "c", "d", "e"]), "at most 4 stop strings"),
    (dict(messages=chat_prompt(120, 0), max_tokens=16), "exceeds the model's context of 256"),
    (dict(temperature=3), "temperature"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
])
def test_requests_over_the_caps_or_malformed_are_400(api, options, message):
    with pytest.raises(openai.BadRequestError, match=message):
        api.chat.completions.create(**{"model": "ok", "messages": HELLO, **options})


def test_unknown_fields_and_broken_json_are_400(url):
    assert "logit_bias: unknown field" in _error(_post(url, json={"model": "ok", "messages": HELLO,
                                                                  "logit_bias": {}}), 400)
    assert "not valid JSON" in _error(_post(url, content=b"{nope", headers={"content-type": "application/json"}),
                                      400)
    assert "prompt" in _error(_post(url, "/v1/completions", json={"model": "ok", "prompt": ""}), 400)


def test_bodies_over_the_limit_are_413_declared_or_chunked(url):
    big = json.dumps({"model": "ok", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    assert "limit is 4096 bytes" in _error(_post(url, content=big, headers={"content-type": "application/json"}),
                                           413)

    def chunks():
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    _error(_post(url, content=chunks(), headers={"content-type": "application/json"}), 413)


def test_requests_beyond_the_concurrency_cap_are_429(url, server):
    with server.engine.model_lock:  # the engine cannot step: the first request stays in flight
        first = threading.Thread(target=_post, args=(url,), kwargs={"json": {"model": "tiny-base", "messages": HELLO}})
        first.start()
        deadline = time.monotonic() + 30
        while server.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "busy" in _error(_post(url, json={"model": "tiny-base", "messages": HELLO}), 429)
    first.join()
    assert server.in_flight == 0


def test_an_adapter_that_cannot_get_a_slot_is_503(api, server):
    server.registry.acquire("ok")  # as a running request does; max_adapters=1, so "other" cannot evict it
    try:
        with pytest.raises(openai.InternalServerError, match="all 1 resident adapters are in use"):
            api.chat.completions.create(model="other", messages=HELLO)
    finally:
        server.registry.release("ok")
    assert api.chat.completions.create(model="other", messages=HELLO).choices[0].message.content is not None
    assert list(server.registry.resident()) == ["other"]


# -- what goes wrong inside -------------------------------------------------------------------------------
def test_unknown_routes_and_methods_answer_json(url):
    _error(httpx.get(f"{url}/v1/nothing", headers={"Authorization": f"Bearer {API_KEY}"}), 404)
    _error(httpx.get(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}), 405)


def test_a_failure_inside_generation_is_a_500_without_a_traceback(url, server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(server.engine, "_decode", broken)
    message = _error(_post(url, json={"model": "tiny-base", "messages": HELLO, "max_tokens": 4}), 500)
    assert "RuntimeError" in message and "server log" in message
    assert "kernel exploded" not in message  # the engine's exception text stays in the server's log
    monkeypatch.undo()
    assert _post(url, json={"model": "tiny-base", "messages": HELLO, "max_tokens": 4}).status_code == 200


def test_a_seed_beyond_torchs_range_is_400_and_a_failed_start_releases_the_adapter(api, url, server, monkeypatch):
    """Seeds ≥ 2⁶³ once raised inside submit and left the adapter pinned for good (unload refused, slots full)."""
    assert "seed" in _error(_post(url, json={"model": "ok", "messages": HELLO, "temperature": 0.5,
                                             "seed": 2**64}), 400)

    def broken_submit(generations):
        raise RuntimeError("engine refused")

    monkeypatch.setattr(server.engine, "submit", broken_submit)
    for _ in range(2):
        message = _error(_post(url, json={"model": "ok", "messages": HELLO}), 500)
        assert "RuntimeError" in message and "engine refused" not in message
    monkeypatch.undo()
    assert server.registry.resident().get("ok", 0) == 0  # no pin left behind
    assert api.chat.completions.create(model="other", messages=HELLO).choices[0].message.content is not None


@pytest.mark.parametrize("method", ["adalora", "loha"])
def test_every_method_the_core_mixes_per_row_is_served(api, server, method):
    """The server asks the core (LoraModel.mixed_batch_refusal) instead of a list of its own: it refused AdaLoRA."""
    answer = api.chat.completions.create(model=method, messages=HELLO, max_tokens=4)
    assert answer.choices[0].message.content is not None and answer.model == method
