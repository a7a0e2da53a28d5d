"""Adapter folders: PEFT layout and keys, several adapters, and load errors that name the tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CASES, lora_modules, make_inputs, make_model, perturb, run
from loraforge import AdapterError, AdapterFileError, LoraConfig, LoraModel


def _saved(tmp_path, config: LoraConfig | None = None, arch: str = "llama") -> LoraModel:
    lora = LoraModel(make_model(arch), config or LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    perturb(lora, "default")
    lora.save(tmp_path)
    return lora


def test_files_and_keys_follow_peft(tmp_path):
    _saved(tmp_path, LoraConfig(r=4, targets=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    assert "base_model.model.lm_head.weight" in keys
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["embed_tokens", "q_proj"] and config["modules_to_save"] == ["lm_head"]
    assert config["task_type"] == "CAUSAL_LM"


def test_all_linear_is_written_as_the_module_names_it_selected(tmp_path):
    _saved(tmp_path, LoraConfig(r=2, targets="all-linear"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def test_expert_parameter_keys_nest_like_peft(tmp_path):
    _saved(tmp_path, CASES[6].config(), arch="mixtral")
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    # gate_up_proj (first parameter) innermost, down_proj outermost
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.mlp.experts.lora_B.weight" in keys


def test_several_adapters_save_to_subfolders_and_load_back(tmp_path):
    lora = LoraModel(make_model("llama"), LoraConfig(r=4, targets=["q_proj"]))
    lora.add_adapter("legal", LoraConfig(r=2, targets=["v_proj", "down_proj"]))
    perturb(lora, "default")
    perturb(lora, "legal", seed=9)
    inputs = make_inputs("llama")
    lora.set_active("legal")
    expected_legal = run(lora, inputs)
    lora.save(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert (tmp_path / "legal" / "adapter_model.safetensors").exists()

    fresh = LoraModel.from_pretrained(make_model("llama"), tmp_path)
    fresh.load_adapter(tmp_path / "legal", "legal")
    fresh.set_active("legal")
    torch.testing.assert_close(run(fresh, inputs), expected_legal, atol=1e-5, rtol=0)


def test_unknown_module_tensor_is_named_and_model_left_untouched(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.nope.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, path)
    model = make_model("llama")
    lora = LoraModel(model)
    with pytest.raises(AdapterFileError, match=r"self_attn\.nope\.lora_A\.weight"):
        lora.load_adapter(tmp_path)
    assert lora.configs == {} and lora_modules(model) == []


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(17, 4)
    save_file(tensors, path)
    with pytest.raises(AdapterFileError, match=r"v_proj\.lora_B\.weight.*\(17, 4\).*\(16, 4\)"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)


def test_wrong_rank_is_reported_as_rank(tmp_path):
    _saved(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 8
    config_path.write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match=r"lora_A\.weight.*rank 4 in the file, 8 from adapter_config"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)


def test_missing_tensor_is_named(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    del tensors[key]
    save_file(tensors, path)
    with pytest.raises(AdapterFileError, match="missing tensor.*layers.0.self_attn.q_proj.lora_A"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)


def test_adapter_for_another_model_says_so(tmp_path):
    _saved(tmp_path, arch="llama")
    with pytest.raises(AdapterError, match="match no module"), pytest.warns(UserWarning, match="matches no module"):
        LoraModel.from_pretrained(make_model("gpt2"), tmp_path)


def test_pickle_is_refused_with_an_explanation(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                              "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(AdapterFileError, match="pickle.*arbitrary code"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)


def test_corrupt_files_and_unsupported_configs_are_clear_errors(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="not a readable safetensors"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)
    _saved(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    with pytest.raises(AdapterFileError, match="lora_bias"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterFileError, match="peft_type is 'IA3'"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterFileError, match="missing tensor.*lora_magnitude_vector"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(AdapterFileError, match=r"adapter_config.json.r: "):
        LoraModel.from_pretrained(make_model("llama"), tmp_path)
    with pytest.raises(AdapterFileError, match="does not exist"):
        LoraModel.from_pretrained(make_model("llama"), tmp_path / "nowhere")


def test_save_replaces_files_atomically(tmp_path):
    lora = _saved(tmp_path)
    before = load_file(tmp_path / "adapter_model.safetensors")
    perturb(lora, "default", seed=11)
    lora.save(tmp_path)
    after = load_file(tmp_path / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_a_failed_load_on_a_model_without_adapters_leaves_it_as_it_was(tmp_path):
    source = LoraModel(make_model("llama"), LoraConfig(r=2, targets=["q_proj"]))
    source.save(tmp_path / "good")
    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "good" / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))  # tensors say 2
    lora = LoraModel(make_model("llama"))
    with pytest.raises(AdapterFileError, match="rank 2 in the file"):
        lora.load_adapter(tmp_path / "good", "x")
    assert lora.active_adapters == () and not lora.configs
    with lora.disable_adapters():  # raised "unknown adapter(s) ['x']" on the way out before
        pass
    assert lora.active_adapters == ()
