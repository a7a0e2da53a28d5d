"""The LoRA invariants, for every architecture × layer type × option in conftest.CASES."""

from __future__ import annotations

import pytest
import torch

from conftest import CASES, check_merge_round_trip, lora_modules, make_inputs, make_model, perturb, run
from loraforge import AdapterError, LoraConfig, LoraModel, MergeError
from loraforge.lora.layers import LoraLayer

ATOL = 1e-5


def test_fresh_adapter_equals_base_and_trained_one_changes_output(case):
    model = make_model(case.arch)
    inputs = make_inputs(case.arch)
    base = run(model, inputs)
    lora = LoraModel(model, case.config())
    assert torch.equal(run(lora, inputs), base)  # B = 0 (A = 0 for embeddings): exactly the base
    perturb(lora, "default")
    assert (run(lora, inputs) - base).abs().max() > 1e-3


def test_merge_unmerge_and_merge_and_unload(case):
    inputs = make_inputs(case.arch)
    lora = LoraModel(make_model(case.arch), case.config())
    perturb(lora, "default")
    originals = {n: layer.base_weight.detach().clone() for n, layer in lora.lora_layers()}
    lora.merge()
    after_first = {n: layer.base_weight.detach().clone() for n, layer in lora.lora_layers()}
    lora.merge()  # merging twice merges once
    for name, layer in lora.lora_layers():
        assert torch.equal(layer.base_weight, after_first[name])
        assert not torch.equal(layer.base_weight, originals[name])
    lora.unmerge()
    check_merge_round_trip(lora, inputs, ATOL)


def test_unload_returns_the_base_model(case):
    model = make_model(case.arch)
    inputs = make_inputs(case.arch)
    base = run(model, inputs)
    lora = LoraModel(model, case.config())
    perturb(lora, "default")
    lora.merge()
    plain = lora.unload()
    assert lora_modules(plain) == []
    torch.testing.assert_close(run(plain, inputs), base, atol=ATOL, rtol=0)


def test_disable_adapters_runs_base_and_restores_state(case):
    model = make_model(case.arch)
    inputs = make_inputs(case.arch)
    base = run(model, inputs)
    lora = LoraModel(model, case.config())
    lora.add_adapter("other", case.config(r=2))
    perturb(lora, "default")
    perturb(lora, "other", seed=3)
    lora.set_active(["default", "other"])
    both = run(lora, inputs)
    with lora.disable_adapters():
        assert lora.active_adapters == ()
        torch.testing.assert_close(run(lora, inputs), base, atol=ATOL, rtol=0)
    assert lora.active_adapters == ("default", "other")
    torch.testing.assert_close(run(lora, inputs), both, atol=0, rtol=0)


def test_several_active_adapters_add_up(case):
    model = make_model(case.arch)
    inputs = make_inputs(case.arch)
    lora = LoraModel(model, case.config())
    lora.add_adapter("other", case.config(r=3))
    perturb(lora, "default")
    perturb(lora, "other", seed=3)
    lora.set_active(["default", "other"])
    both = run(lora, inputs)
    lora.merge(["default"])  # default folded into the weights, other still applied on the fly
    torch.testing.assert_close(run(lora, inputs), both, atol=ATOL, rtol=0)
    lora.merge(["other"])
    torch.testing.assert_close(run(lora, inputs), both, atol=ATOL, rtol=0)
    lora.set_active("default")
    with pytest.raises(AdapterError, match="merged"):
        run(lora, inputs)  # "other" is baked into the weights: switching it off needs unmerge()


def test_save_load_round_trip_into_fresh_model(case, tmp_path):
    model = make_model(case.arch)
    inputs = make_inputs(case.arch)
    lora = LoraModel(model, case.config())
    perturb(lora, "default")
    expected = run(lora, inputs)
    lora.save(tmp_path)

    torch.manual_seed(1234)  # a different adapter init, overwritten by the load
    fresh = LoraModel.from_pretrained(make_model(case.arch), tmp_path)
    torch.testing.assert_close(run(fresh, inputs), expected, atol=ATOL, rtol=0)
    assert fresh.configs["default"].r == lora.configs["default"].r
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference unless asked


def test_optimizer_step_changes_only_adapter_parameters(case):
    model = make_model(case.arch)
    inputs = make_inputs(case.arch)
    lora = LoraModel(model, case.config())
    perturb(lora, "default")  # B = 0 would leave A without gradient
    lora.train()
    trainable = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    run(lora, inputs).pow(2).mean().backward()
    optimizer.step()
    for name, param in lora.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"frozen {name} changed"
        else:
            assert not torch.equal(param, trainable[name]), f"adapter {name} did not move"
    assert all(".lora_" in n or "modules_to_save" in n for n in trainable)


def test_safe_merge_refuses_nan_and_changes_nothing(case):
    model = make_model(case.arch)
    lora = LoraModel(model, case.config())
    perturb(lora, "default")
    before = {n: layer.base_weight.detach().clone() for n, layer in lora.lora_layers()}
    name, layer = list(lora.lora_layers())[-1]  # the last layer: every earlier one would merge fine
    with torch.no_grad():
        for tensor in layer.peft_tensors("default").values():
            tensor.view(-1)[0] = float("nan")
    with pytest.raises(MergeError, match=name):
        lora.merge()
    for key, layer in lora.lora_layers():
        assert torch.equal(layer.base_weight, before[key]), f"{key} changed by a refused merge"
        assert not layer.merged_adapters


def test_merged_adapter_cannot_be_silently_disabled():
    lora = LoraModel(make_model("llama"), LoraConfig(r=2, targets=["q_proj"]))
    perturb(lora, "default")
    lora.merge()
    with pytest.raises(AdapterError, match="unmerge"), lora.disable_adapters():
        run(lora, make_inputs("llama"))


def test_tied_embedding_merge_is_refused_with_the_tied_name():
    model = make_model("gpt2")  # GPT-2 ties lm_head.weight to wte.weight
    lora = LoraModel(model, LoraConfig(r=2, targets=["wte"]))
    perturb(lora, "default")
    with pytest.raises(MergeError, match="lm_head"):
        lora.merge()


def test_trainable_parameter_report_counts_r_times_d_plus_k(capsys):
    model = make_model("llama")
    lora = LoraModel(model, LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    # q_proj 32→32 and v_proj 32→16 in each of 2 layers: r·(d+k) per matrix
    expected = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    trainable, total = lora.trainable_parameters()
    assert trainable == expected
    assert total == sum(p.numel() for p in model.parameters())
    line = lora.print_trainable_parameters()
    assert f"trainable params: {expected:,}" in line and f"{100 * expected / total:.4f}" in line
    assert line in capsys.readouterr().out


def test_unknown_adapter_name_is_an_error():
    lora = LoraModel(make_model("llama"), LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(AdapterError, match="unknown adapter"):
        lora.set_active("nope")
    with pytest.raises(AdapterError, match="already exists"):
        lora.add_adapter("default", LoraConfig(r=2, targets=["q_proj"]))


def test_delete_adapter_unwraps_modules_left_without_adapters():
    model = make_model("mixtral")
    lora = LoraModel(model, CASES[6].config())
    lora.add_adapter("extra", LoraConfig(r=2, targets=["q_proj"]))
    lora.delete_adapter("default")
    wrapped = lora_modules(lora.model)
    assert wrapped and all(name.endswith("q_proj") for name in wrapped)
    lora.delete_adapter("extra")
    assert lora_modules(lora.model) == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_base_keeps_fp32_adapters_and_runs(arch):
    model = make_model(arch).to(torch.bfloat16)
    lora = LoraModel(model, LoraConfig(r=4, targets="all-linear"))
    perturb(lora, "default")
    layer = next(layer for _, layer in lora.lora_layers())
    assert layer.base_weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in layer.peft_tensors("default").values())
    out = run(lora, make_inputs(arch))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert isinstance(layer, LoraLayer)
