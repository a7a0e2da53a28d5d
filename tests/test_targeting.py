"""Which modules a config selects: suffix lists, regex, all-linear, layers, patterns, modules_to_save."""

from __future__ import annotations

import pytest

from conftest import make_model
from loraforge import AdapterError, ConfigError, LoraConfig, LoraModel
from loraforge.config import parse_section
from loraforge.lora.layers import LoraEmbedding, LoraLinear, LoraParameter, ModulesToSave
from loraforge.lora.targeting import find_targets, layer_index


def _ranks(lora: LoraModel) -> dict[str, int]:
    return {name: layer.ranks["default"] for name, layer in lora.lora_layers()}


def test_all_linear_takes_every_linear_but_the_head():
    targets = find_targets(make_model("llama"), LoraConfig(targets="all-linear")).modules
    assert len(targets) == 2 * 7 and "lm_head" not in targets
    gpt2 = find_targets(make_model("gpt2"), LoraConfig(targets="all-linear")).modules
    assert sorted({t.rsplit(".", 1)[-1] for t in gpt2}) == ["c_attn", "c_fc", "c_proj"]


def test_suffix_list_regex_and_layers_to_transform():
    model = make_model("llama")
    assert find_targets(model, LoraConfig(targets=["q_proj"])).modules == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, LoraConfig(targets=["q_proj"], layers_to_transform=[1])).modules == [
        "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, LoraConfig(targets=r".*\.0\.mlp\.(up|down)_proj")).modules == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    # "proj" is not a suffix of "q_proj" at a dot boundary
    with pytest.raises(AdapterError, match="match no module"), pytest.warns(UserWarning, match="'proj'"):
        find_targets(model, LoraConfig(targets=["proj"]))


def test_layer_index_takes_the_first_numbered_segment():
    assert layer_index("model.layers.3.mlp.experts.7.up", None) == 3
    assert layer_index("transformer.h.11.attn.c_attn", None) == 11
    assert layer_index("encoder.block.2.layer.1.x", "layer") == 1
    assert layer_index("lm_head", None) is None


def test_rank_and_alpha_patterns_apply_per_module():
    lora = LoraModel(make_model("llama"), LoraConfig(
        r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 1.0}))
    ranks = _ranks(lora)
    assert ranks["model.layers.1.self_attn.q_proj"] == 2 and ranks["model.layers.0.self_attn.q_proj"] == 4
    scaling = {n: layer.scaling["default"] for n, layer in lora.lora_layers()}
    assert scaling["model.layers.0.self_attn.v_proj"] == 1.0 / 4
    assert scaling["model.layers.1.self_attn.q_proj"] == 8 / 2


def test_rslora_scales_by_square_root_of_rank():
    lora = LoraModel(make_model("llama"), LoraConfig(r=16, alpha=8, targets=["q_proj"], use_rslora=True))
    assert all(layer.scaling["default"] == 2.0 for _, layer in lora.lora_layers())


def test_layer_kinds_and_modules_to_save():
    lora = LoraModel(make_model("mixtral"), LoraConfig(
        targets=["embed_tokens", "q_proj"], target_parameters=["mlp.experts.down_proj"], modules_to_save=["lm_head"]))
    kinds = {type(m) for _, m in lora.wrappers()}
    assert kinds == {LoraEmbedding, LoraLinear, LoraParameter, ModulesToSave}
    experts = lora.model.model.layers[0].mlp.experts
    assert isinstance(experts, LoraParameter) and experts.num_experts == 4
    assert experts.lora_A["default"].weight.shape == (8 * 4, 48)  # (r·E, in) as PEFT


def test_modules_to_save_are_never_lora_targets():
    targets = find_targets(make_model("llama"), LoraConfig(targets=r".*(q_proj|lm_head)", modules_to_save=["lm_head"]))
    assert "lm_head" not in targets.modules and targets.modules_to_save == ["lm_head"]


def test_unsupported_module_and_missing_parameter_are_named():
    with pytest.raises(AdapterError, match="'model.norm' is a LlamaRMSNorm"):
        find_targets(make_model("llama"), LoraConfig(targets=["norm"]))
    with pytest.raises(AdapterError, match="target_parameters.*nope"):
        find_targets(make_model("mixtral"), LoraConfig(targets=["q_proj"], target_parameters=["experts.nope"]))
    with pytest.raises(AdapterError, match="modules_to_save.*'head'"):
        find_targets(make_model("llama"), LoraConfig(targets=["q_proj"], modules_to_save=["head"]))


def test_bad_config_names_the_key():
    with pytest.raises(ConfigError, match=r"lora\.r: .*greater than or equal to 1"):
        parse_section(LoraConfig, {"r": 0}, where="lora")
    with pytest.raises(ConfigError, match=r"lora\.rank: Extra inputs"):
        parse_section(LoraConfig, {"rank": 8}, where="lora")
    with pytest.raises(ConfigError, match=r"lora\.targets: .*not a valid regex"):
        parse_section(LoraConfig, {"targets": "(["}, where="lora")


def test_comma_separated_targets_are_a_list_of_names_as_in_llama_factory():
    from loraforge.config import load_train_config

    config = load_train_config(None, ["lora.targets=q_proj,v_proj"])
    assert config.lora.targets == ["q_proj", "v_proj"]
    assert set(find_targets(make_model("llama"), config.lora).modules) == {
        f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    assert LoraConfig(targets="self_attn.q_proj, mlp.up_proj").targets == ["self_attn.q_proj", "mlp.up_proj"]
    assert LoraConfig(targets=r"layers\.[0-1]\.(q|v)_proj").targets == r"layers\.[0-1]\.(q|v)_proj"  # a regex
    assert LoraConfig(targets=r"q_proj{1,2}").targets == r"q_proj{1,2}"  # a comma inside a regex stays a regex


@pytest.mark.parametrize("method,values,key", [
    ("adalora", {"r": 16}, "r"),  # AdaLoRA's ranks are adalora.init_r / target_r: r was printed and ignored
    ("adalora", {"use_dora": True}, "use_dora"),
    ("loha", {"dropout": 0.1}, "dropout"),
    ("lokr", {"plus_ratio": 16}, "plus_ratio"),
    ("lora", {"adalora": {"target_r": 4}}, "adalora"),
    ("lora", {"lycoris": {"rank_dropout": 0.1}}, "lycoris"),
])
def test_an_option_the_method_does_not_read_is_an_error_naming_the_key(method, values, key):
    with pytest.raises(ConfigError, match=rf"lora\.{key}: .*method={method}"):
        parse_section(LoraConfig, {"method": method, **values}, where="lora")


def test_a_saved_config_of_every_method_parses_back():
    """config.yaml holds every field, defaults included: none of them counts as set for another method."""
    import yaml

    from loraforge.config import config_to_yaml, load_train_config

    for method in ("lora", "loha", "lokr", "adalora"):
        config = load_train_config(None, [f"lora.method={method}"])
        assert parse_section(LoraConfig, yaml.safe_load(config_to_yaml(config))["lora"], where="lora") == config.lora
