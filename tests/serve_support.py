"""Shared by the serve tests: tiny adapters on disk, a live server on loopback, offline reference answers."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest
import torch
import uvicorn

from conftest import CORPUS, perturb
from loraforge import LoraConfig, LoraModel
from loraforge.evaluate import generate_answers
from loraforge.models import load_model
from loraforge.serve import build_server
from loraforge.serve.api import Limits, Server, create_app

# Ranks, targets and extra layers differ between adapters: stacked factors are zero-padded to the largest
# rank, embedding and lm_head copies take their own mixed-batch paths.
ADAPTER_CONFIGS = {
    "skill-0": dict(r=4, targets="all-linear"),
    "skill-1": dict(r=2, targets=["q_proj", "v_proj"]),
    "skill-2": dict(r=3, targets=["embed_tokens", "o_proj", "down_proj"]),
    "skill-3": dict(r=4, targets=["gate_proj", "up_proj"], modules_to_save=["lm_head"]),
    "skill-4": dict(r=8, targets="all-linear", use_rslora=True),
    "legal.v2": dict(r=1, targets="all-linear"),
    "med_7": dict(r=5, targets=["k_proj", "o_proj", "up_proj"]),
    "Finance-X": dict(r=2, targets="all-linear", layers_to_transform=[1]),
}
MAX_TOKENS = 8


def write_adapters(model_dir: Path, root: Path) -> Path:
    """Every adapter of ADAPTER_CONFIGS, with random non-zero factors, saved in PEFT format under root."""
    for seed, (name, options) in enumerate(ADAPTER_CONFIGS.items()):
        model, _ = load_model(str(model_dir))
        lora = LoraModel(model, LoraConfig(**options))
        perturb(lora, "default", std=0.3, seed=seed)
        lora.save(root / name)
    return root


def reference_model(model_dir: Path, root: Path) -> tuple[LoraModel, object, dict[str, str]]:
    """The offline side: one LoraModel holding every adapter, and the served name -> loaded name map."""
    model, tokenizer = load_model(str(model_dir))
    lora = LoraModel(model)
    names = {}
    for name in ADAPTER_CONFIGS:
        names[name] = name.replace(".", "_")  # LoraModel names allow no '.'
        lora.load_adapter(root / name, names[name])
    lora.set_active([])
    return lora, tokenizer, names


def offline_answer(reference, adapter: str | None, messages: list[dict], max_tokens: int = MAX_TOKENS) -> str:
    """What `loraforge chat --adapter DIR --prompt …` prints (greedy, one prompt, no padding)."""
    lora, tokenizer, names = reference
    with lora.using(names[adapter] if adapter else None):
        return generate_answers(lora, tokenizer, [messages], max_new_tokens=max_tokens, batch_size=1)[0]


def make_server(model_dir: Path, root: Path, **options) -> Server:
    limits = options.pop("limits", Limits(max_tokens=64, default_max_tokens=MAX_TOKENS))
    # One engine thread: the tiny model gains nothing from two, and OpenMP's spinning hurts on a shared CPU.
    return build_server(str(model_dir), root, device="cpu", base_name="tiny-base", threads=1, limits=limits,
                        **options)


@contextmanager
def live(server: Server) -> Iterator[str]:
    """Serve on 127.0.0.1 (a free port) in a background thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


def client(url: str, api_key: str = "unused", async_: bool = False):
    kind = openai.AsyncOpenAI if async_ else openai.OpenAI
    return kind(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120)


# -- fixtures (imported by the serve test modules) ----------------------------------------------------
@pytest.fixture(scope="session")
def adapters_root(tiny_model_dir, tmp_path_factory) -> Path:
    return write_adapters(tiny_model_dir, tmp_path_factory.mktemp("served-adapters"))


@pytest.fixture(scope="session")
def reference(tiny_model_dir, adapters_root):
    return reference_model(tiny_model_dir, adapters_root)


def chat_prompt(words: int, seed: int) -> list[dict]:
    """A user message of `words` words from the tiny tokenizer's corpus: prompts of many lengths."""
    vocabulary = " ".join(CORPUS).split()
    rng = random.Random(seed)
    return [{"role": "user", "content": " ".join(rng.choice(vocabulary) for _ in range(words))}]


@pytest.fixture(autouse=True)
def single_torch_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared 2-core CPU OpenMP's spin-waiting
    made the offline reference answers ~10× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
