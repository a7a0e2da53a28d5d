"""Exports checked with the readers of the targets, not with our writer: gguf's GGUFReader and transformers' own
GGUF tensor processor (its q/k un-permutation) for llama.cpp's LoRA GGUF; the real `peft` for the vLLM folder."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from loraforge.cli import main
from loraforge.config import LoraConfig
from loraforge.errors import AdapterError
from loraforge.export import check_adapter, plain_lora, write_gguf_adapter, write_vllm_adapter
from loraforge.lora import LoraModel
from loraforge.models import load_model

from conftest import perturb


def _lora(model_dir, **options) -> LoraModel:
    model, _ = load_model(model_dir)
    lora = LoraModel(model, LoraConfig(**{"targets": "all-linear", **options}))
    perturb(lora, "default")
    return lora


def _fields(reader: gguf.GGUFReader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _deltas_from_gguf(path, config) -> dict[str, torch.Tensor]:
    """ΔW of each base tensor as llama.cpp computes it (alpha / rank · B·A), in transformers' row order."""
    reader = gguf.GGUFReader(str(path))
    alpha = _fields(reader)["adapter.lora.alpha"]
    unpermute = LlamaTensorProcessor(config={"num_attention_heads": config.num_attention_heads,
                                             "num_key_value_heads": config.num_key_value_heads})
    parts: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        base, _, suffix = tensor.name.rpartition(".")
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        parts.setdefault(base, {})[suffix] = data
    deltas = {}
    for base, ab in parts.items():
        a, b = ab["lora_a"], ab["lora_b"]
        b = unpermute.process(b, base).weights
        deltas[base] = torch.from_numpy(alpha / a.shape[0] * (b @ a))
    return deltas


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _gguf_name(module_name: str) -> str:
    layer = module_name.split("layers.")[1].split(".")[0]
    return f"blk.{layer}.{GGUF_NAMES[module_name.rsplit('.', 1)[1]]}.weight"


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-6), ("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 2e-2)])
def test_a_gguf_adapter_reads_back_as_the_trained_update(tiny_model_dir, tmp_path, dtype, tolerance):
    """rsLoRA with a per-module rank: llama.cpp's one alpha / rank must still give every layer its own scale, and
    q/k come back through transformers' un-permutation to the trained rows."""
    lora = _lora(tiny_model_dir, r=4, alpha=8, use_rslora=True, rank_pattern={"v_proj": 2})
    path = write_gguf_adapter(plain_lora(lora, "default"), lora.model.config, tmp_path / "a.gguf", dtype)
    reader = gguf.GGUFReader(str(path))
    fields = _fields(reader)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    deltas = _deltas_from_gguf(path, lora.model.config)
    layers = dict(lora.lora_layers())
    assert set(deltas) == {_gguf_name(name) for name in layers}
    for name, layer in layers.items():
        expected = layer.delta_weight("default")
        got = deltas[_gguf_name(name)]
        assert got.shape == expected.shape
        error = float((got - expected).norm() / expected.norm())
        assert error < tolerance, (name, error)


def test_dora_exports_by_svd_with_the_error_it_reports(tiny_model_dir, tmp_path):
    lora = _lora(tiny_model_dir, r=4, use_dora=True)
    layers = plain_lora(lora, "default")
    assert all(layer.error is not None and 0 < layer.error < 1 for layer in layers.values())
    path = write_gguf_adapter(layers, lora.model.config, tmp_path / "d.gguf", "f32")
    deltas = _deltas_from_gguf(path, lora.model.config)
    for name, layer in lora.lora_layers():
        merged = layer.merged_weight(["default"]) - layer.dense_base_weight()
        error = float((deltas[_gguf_name(name)] - merged).norm() / merged.norm())
        assert error == pytest.approx(layers[name].error, rel=1e-3, abs=1e-6)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("options, rank", [({"r": 4}, None), ({"method": "loha", "r": 4}, 16)], ids=["lora", "loha"])
def test_a_vllm_folder_loads_in_peft_and_answers_as_the_adapter(tiny_model_dir, tmp_path, options, rank):
    """Rank 4 is padded to 8 with zeros (exact); LoHa's rank-16 ΔW is exact as a rank-16 SVD."""
    from peft import PeftModel

    lora = _lora(tiny_model_dir, **options)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    ours = _logits(lora.model, ids)
    written = write_vllm_adapter(plain_lora(lora, "default", rank), tmp_path / "vllm", None)
    assert written == (8 if rank is None else 16)
    base, _ = load_model(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "vllm")).eval()
    assert check_adapter(tmp_path / "vllm", "vllm") == []
    torch.testing.assert_close(_logits(peft_model, ids), ours, rtol=1e-4, atol=1e-4)


def test_check_adapter_names_what_each_target_cannot_take(tiny_model_dir, tmp_path):
    dora = _lora(tiny_model_dir, r=12, use_dora=True, use_rslora=True)
    dora.save(tmp_path / "dora")
    vllm = {f.what: f for f in check_adapter(tmp_path / "dora", "vllm")}
    assert set(vllm) == {"use_dora", "r"} and all(f.convertible for f in vllm.values())
    assert "(1, 8, 16, 32" in vllm["r"].reason and "pads the rank" in vllm["r"].fix
    llamacpp = {f.what for f in check_adapter(tmp_path / "dora", "llamacpp")}
    assert llamacpp == {"use_dora", "use_rslora"}
    assert check_adapter(tmp_path / "dora", "peft") == []
    saved = _lora(tiny_model_dir, r=8, modules_to_save=["lm_head"])
    saved.save(tmp_path / "saved")
    (refused,) = [f for f in check_adapter(tmp_path / "saved", "vllm") if not f.convertible]
    assert "modules_to_save" in refused.what and "merge" in refused.fix
    with pytest.raises(AdapterError, match="modules_to_save"):
        plain_lora(saved, "default")


def test_export_for_ollama_writes_the_adapter_and_a_modelfile(tiny_model_dir, tmp_path, capsys):
    lora = _lora(tiny_model_dir, r=4)
    lora.save(tmp_path / "adapter")
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--model", str(tiny_model_dir), "--format",
                 "ollama", "--output", str(tmp_path / "ollama"), "--ollama-base", "smollm2:135m"]) == 0
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    assert modelfile.startswith("FROM smollm2:135m\nADAPTER ./adapter.gguf\n")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert len(gguf.GGUFReader(str(tmp_path / "ollama" / "adapter.gguf")).tensors) == 2 * len(list(lora.lora_layers()))
    assert main(["check-adapter", str(tmp_path / "adapter"), "--target", "llamacpp"]) == 0
    assert "nothing to fix" in capsys.readouterr().out
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--model", str(tiny_model_dir), "--merged",
                 "--format", "gguf", "--dtype", "f32", "--output", str(tmp_path / "merged.gguf")]) == 0
    assert _fields(gguf.GGUFReader(str(tmp_path / "merged.gguf")))["general.type"] == "model"


@pytest.mark.parametrize("dtype, tolerance", [("f32", 1e-4), ("f16", 2e-2)])
def test_a_merged_gguf_loads_in_transformers_and_answers_as_the_adapter(tiny_model_dir, tmp_path, dtype, tolerance):
    """transformers' GGUF loader (its own config, tokenizer and q/k un-permutation) reads our merged GGUF back; its
    logits equal the unmerged adapter's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraforge.export import write_gguf_model

    lora = _lora(tiny_model_dir, r=4)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 11]])
    ours = _logits(lora.model, ids)
    _, tokenizer = load_model(tiny_model_dir)
    write_gguf_model(lora.merge_and_unload(), tokenizer, tmp_path / "merged.gguf", dtype)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="merged.gguf", dtype=torch.float32).eval()
    theirs = _logits(loaded, ids)
    assert float((theirs - ours).abs().max() / ours.abs().max()) < tolerance
    read = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="merged.gguf")
    text = "Extract the order as JSON. Hi, this is Maria."
    assert read(text)["input_ids"] == tokenizer(text)["input_ids"]
