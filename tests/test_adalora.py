"""AdaLoRA against PEFT 0.21: the math, the rank allocator step by step, the pruned file format both ways,
and a short training run that prunes to the target budget."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import DEVICE, check_merge_round_trip, lora_modules, make_inputs, make_model, perturb, run
from loraforge import AdapterError, ConfigError, LoraConfig, LoraModel
from loraforge.config import TrainConfig, parse_section
from loraforge.lora.adalora import AdaLoraLinear, adapter_ranks

peft = pytest.importorskip("peft")

ATOL = 1e-5
TARGETS = ["q_proj", "v_proj"]


def _config(**adalora) -> LoraConfig:
    options = {"init_r": 4, "target_r": 2, "total_step": 8, **adalora}
    return LoraConfig(method="adalora", alpha=8, targets=TARGETS, adalora=options)


def _peft_config(**kwargs):
    options = {"init_r": 4, "target_r": 2, "total_step": 8, "lora_alpha": 8, "target_modules": TARGETS, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.AdaLoraConfig(**options)


def _peft_model(arch: str, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(make_model(arch), config)


def _peft_load(arch: str, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(make_model(arch), str(directory)).eval()


def _pairs(ours: LoraModel, theirs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(our tensor, PEFT's tensor) for every adapter tensor, matched by name."""
    peft_params = {n.removeprefix("base_model.model."): p for n, p in theirs.named_parameters() if "lora_" in n}
    pairs = [(p, peft_params[n.removeprefix("model.")]) for n, p in ours.named_parameters() if "lora_" in n]
    assert len(pairs) == len(peft_params) == 3 * len(lora_modules(ours.model))
    return pairs


# -- the math --------------------------------------------------------------------------------------
def test_update_is_svd_form_scaled_by_alpha_over_init_r():
    inputs = make_inputs("llama")
    base = run(make_model("llama"), inputs)
    lora = LoraModel(make_model("llama"), _config())
    torch.testing.assert_close(run(lora, inputs), base, atol=0, rtol=0)  # Λ = 0: fresh == base exactly
    perturb(lora, "default")
    layer = lora.model.model.layers[0].self_attn.q_proj
    a, e, b = (layer.peft_tensors("default")[k] for k in ("lora_A", "lora_E", "lora_B"))
    assert e.shape == (4, 1)
    torch.testing.assert_close(layer.delta_weight("default"), b @ (a * e) * 8 / (4 + 1e-5))
    x = torch.randn(5, 32, device=DEVICE)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight("default").T, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_invariants_and_peft_interop(arch, tmp_path):
    """fresh == base, merge ≈ unmerged, unmerge restores, save/load, and PEFT both ways (GPT-2: Conv1D)."""
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else TARGETS
    config = _config().model_copy(update={"targets": targets, "dropout": 0.1})
    inputs = make_inputs(arch)
    base = run(make_model(arch), inputs)
    lora = LoraModel(make_model(arch), config)
    assert all(isinstance(layer, AdaLoraLinear) for _, layer in lora.lora_layers())
    torch.testing.assert_close(run(lora, inputs), base, atol=0, rtol=0)
    perturb(lora, "default")
    lora.eval()
    unmerged = check_merge_round_trip(lora, inputs, ATOL, unload=False)
    assert (unmerged - base).abs().max() > 1e-3

    lora.save(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 4 and saved["rank_pattern"] is None
    loaded = LoraModel.from_pretrained(make_model(arch), tmp_path / "ours")
    torch.testing.assert_close(run(loaded, inputs), unmerged, atol=ATOL, rtol=0)
    theirs = _peft_load(arch, tmp_path / "ours")
    torch.testing.assert_close(run(theirs, inputs), unmerged, atol=ATOL, rtol=0)

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    from_peft = LoraModel.from_pretrained(make_model(arch), tmp_path / "theirs")
    torch.testing.assert_close(run(from_peft, inputs), run(theirs, inputs), atol=ATOL, rtol=0)


def test_trains_on_a_4bit_base():
    from loraforge.quant import quantize_model

    model = make_model("llama")
    quantize_model(model, "nf4", device=DEVICE)
    inputs = make_inputs("llama")
    quantized = run(model, inputs)
    lora = LoraModel(model, _config())
    torch.testing.assert_close(run(lora, inputs), quantized, atol=0, rtol=0)
    perturb(lora, "default")
    run(lora.train(), inputs).pow(2).mean().backward()
    assert all(t.grad.abs().sum() > 0 for t in lora.adapter_parameters("default"))


def test_orthogonality_penalty_equals_peft():
    inputs = make_inputs("llama")
    lora = LoraModel(make_model("llama"), _config(orth_reg_weight=0.3))
    theirs = _peft_model("llama", _peft_config(orth_reg_weight=0.3))
    perturb(lora, "default")
    with torch.no_grad():
        for ours, peft_tensor in _pairs(lora, theirs):
            peft_tensor.copy_(ours)
    with_penalty = theirs.base_model(input_ids=inputs, labels=inputs).loss  # AdaLoraModel.forward adds it
    plain = lora.model(input_ids=inputs, labels=inputs).loss
    torch.testing.assert_close(plain + lora.regularization_loss(), with_penalty, atol=1e-6, rtol=0)
    assert lora.regularization_loss() > 0.1
    assert LoraModel(make_model("llama"), _config(orth_reg_weight=0)).regularization_loss() is None


def test_mixed_batch_rows_match_separate_runs():
    lora = LoraModel(make_model("llama"), _config(), adapter_name="a")
    lora.add_adapter("b", _config(init_r=3))
    perturb(lora, "a", seed=1)
    perturb(lora, "b", seed=2)
    inputs = make_inputs("llama", batch=3)
    mixed = run(lora, inputs, adapter_names=["a", None, "b"])
    for row, name in enumerate(["a", None, "b"]):
        lora.set_active([name] if name else [])
        torch.testing.assert_close(mixed[row], run(lora, inputs)[row], atol=ATOL, rtol=0)


# -- the rank allocator ----------------------------------------------------------------------------
def test_allocator_matches_peft_step_by_step_then_prunes_to_the_target():
    """Same tensors, same fake updates and gradients: the same triplets are dropped at every step, and at
    total_step ours cuts them out, leaving exactly PEFT's final rank_pattern."""
    schedule = {"tinit": 2, "tfinal": 2, "total_step": 12}
    lora = LoraModel(make_model("llama"), _config(**schedule, delta_t=2))
    theirs = _peft_model("llama", _peft_config(**schedule, deltaT=2))
    pairs = _pairs(lora, theirs)
    with torch.no_grad():
        for ours, peft_tensor in pairs:
            ours.copy_(peft_tensor)
    allocator, peft_allocator = lora.controllers["default"], theirs.base_model.rankallocator
    generator = torch.Generator().manual_seed(0)
    kept_history = []
    for step in range(1, 13):
        assert allocator.budget(step) == peft_allocator.budget_schedule(step)
        with torch.no_grad():
            for ours, peft_tensor in pairs:  # an "optimizer step", then this step's gradient
                update, grad = (torch.randn(ours.shape, generator=generator).to(DEVICE) for _ in range(2))
                for tensor in (ours, peft_tensor):
                    tensor.add_(update * 0.1)
                    tensor.grad = grad.clone()
        theirs.base_model.update_and_allocate(step)
        lora.after_optimizer_step(step)
        if step < 12:
            for ours, peft_tensor in pairs:
                assert torch.equal(ours, peft_tensor), step
            kept_history.append(sum(allocator.ranks().values()))
    # 4 modules × init_r 4 = 16 until tinit; allocations at even steps follow the cubic
    # int(8·(1 − (step − 2)/8)³ + 8): 11 at step 4, 9 at 6, then the target 4 × 2 = 8 from step 8.
    assert kept_history == [16, 16, 16, 11, 11, 9, 9, 8, 8, 8, 8]
    final = theirs.peft_config["default"].rank_pattern
    expected = {key.replace(".default", ""): mask for key, mask in final.items()}
    assert lora.configs["default"].adalora.rank_pattern == expected
    assert adapter_ranks(lora, "default") == {k.removesuffix(".lora_E"): sum(m) for k, m in expected.items()}
    assert sum(adapter_ranks(lora, "default").values()) == 2 * 4  # target_r × modules
    for module_name, layer in lora.lora_layers():
        keep = torch.tensor(expected[f"{module_name}.lora_E"])
        peft_layer = theirs.base_model.model.get_submodule(module_name)
        torch.testing.assert_close(layer.lora_A["default"], peft_layer.lora_A["default"][keep])
        torch.testing.assert_close(layer.lora_B["default"], peft_layer.lora_B["default"][:, keep])


def test_schedule_errors_name_the_key():
    lora = LoraModel(make_model("llama"), _config(total_step=None))
    run(lora, make_inputs("llama")).pow(2).mean().backward()
    with pytest.raises(ConfigError, match="adalora.total_step is not set"):
        lora.after_optimizer_step(1)
    lora = LoraModel(make_model("llama"), _config(tinit=8))
    run(lora, make_inputs("llama")).pow(2).mean().backward()
    with pytest.raises(ConfigError, match="tinit"):
        lora.after_optimizer_step(1)
    with pytest.raises(ConfigError, match="must not exceed init_r"):
        parse_section(LoraConfig, {"method": "adalora", "adalora": {"init_r": 2, "target_r": 3}})


@pytest.mark.parametrize("option", [{"use_rslora": True}, {"alpha_pattern": {"q_proj": 2.0}}, {"init": "pissa"},
                                    {"rank_pattern": {"q_proj": 2}}, {"targets": ["embed_tokens"]}])
def test_lora_only_options_are_refused(option):
    with pytest.raises(AdapterError, match="adalora"):
        LoraModel(make_model("llama"), _config().model_copy(update=option))


def test_a_stopped_run_prunes_to_its_latest_allocation_and_peft_loads_it(tmp_path):
    lora = LoraModel(make_model("llama"), _config(total_step=20), adapter_name="a")
    lora.add_adapter("idle", _config(total_step=20))  # trainable too, but inactive: no gradients, no allocation
    lora.train()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    inputs = make_inputs("llama")
    silent = lora.model.model.layers[1].self_attn.v_proj  # no gradient: the least important module
    for step in range(1, 9):
        lora.model(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.step()
        for tensor in silent.peft_tensors("a").values():
            tensor.grad = None
        lora.after_optimizer_step(step)
        optimizer.zero_grad()
    assert lora.controllers["idle"].keep is None
    allocator = lora.controllers["a"]
    ranks = allocator.ranks()
    assert sum(ranks.values()) == 9  # int(8·(1 − 8/20)³ + 8) on the way from 4 × 4 to 4 × 2
    assert ranks["model.layers.1.self_attn.v_proj"] == 0
    assert allocator.finish().startswith("AdaLoRA ranks: 9 in all over 4 modules")
    assert adapter_ranks(lora, "a") == ranks == {m: layer.ranks["a"] for m, layer in lora.lora_layers()}
    lora.eval()
    expected = run(lora, inputs)
    lora.save(tmp_path, ["a"])
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert saved["base_model.model.model.layers.1.self_attn.v_proj.lora_A"].shape == (0, 32)
    torch.testing.assert_close(run(_peft_load("llama", tmp_path / "a"), inputs), expected, atol=ATOL, rtol=0)


# -- PEFT's pruned files -------------------------------------------------------------------------------
def _train_in_peft(tmp_path, **options):
    """A PEFT AdaLoRA adapter trained for total_step steps with update_and_allocate, then saved."""
    theirs = _peft_model("llama", _peft_config(**options))
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    inputs = make_inputs("llama")
    for step in range(1, theirs.peft_config["default"].total_step + 1):
        theirs(input_ids=inputs, labels=inputs).loss.backward()
        optimizer.step()
        theirs.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that rank-0 tensors look like unsharded ZeRO-3 saves
        theirs.save_pretrained(str(tmp_path))
    return json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]


def test_peft_trained_pruned_adapter_loads_in_ours_and_saves_back(tmp_path):
    masks = _train_in_peft(tmp_path / "peft", target_r=3, tinit=1, tfinal=1, total_step=6)
    ranks = {key.removesuffix(".lora_E"): sum(mask) for key, mask in masks.items()}
    assert min(ranks.values()) > 0 and sum(ranks.values()) == 3 * 4 < 4 * 4  # pruned, no module emptied
    inputs = make_inputs("llama")
    theirs = run(_peft_load("llama", tmp_path / "peft"), inputs)
    ours = LoraModel.from_pretrained(make_model("llama"), tmp_path / "peft")
    assert adapter_ranks(ours, "default") == ranks
    torch.testing.assert_close(run(ours, inputs), theirs, atol=ATOL, rtol=0)

    ours.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["rank_pattern"] == masks
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    our_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in peft_tensors.items()}
    torch.testing.assert_close(run(_peft_load("llama", tmp_path / "ours"), inputs), theirs, atol=ATOL, rtol=0)


def test_modules_pruned_to_rank_zero_load_and_save_back(tmp_path):
    masks = _train_in_peft(tmp_path / "peft", target_r=2, tinit=1, tfinal=1, total_step=6)
    assert min(sum(mask) for mask in masks.values()) == 0
    inputs = make_inputs("llama")
    theirs = run(_peft_load("llama", tmp_path / "peft"), inputs)
    ours = LoraModel.from_pretrained(make_model("llama"), tmp_path / "peft")
    torch.testing.assert_close(run(ours, inputs), theirs, atol=ATOL, rtol=0)
    ours.save(tmp_path / "ours")
    again = LoraModel.from_pretrained(make_model("llama"), tmp_path / "ours")
    torch.testing.assert_close(run(again, inputs), theirs, atol=ATOL, rtol=0)


# -- training -------------------------------------------------------------------------------------------
def test_training_run_lowers_the_loss_and_saves_the_final_ranks(tiny_model_dir, tmp_path):
    from loraforge.demo import DEMO_DATA
    from loraforge.train import train

    data = tmp_path / "data.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:40]))
    config = TrainConfig(
        model=str(tiny_model_dir), data=data, output=tmp_path / "run", batch_size=4, max_steps=12, lr=1e-1,
        max_seq_len=128, eval_every=6, compare=False, tensorboard=False, report=False,
        lora={"method": "adalora", "targets": "all-linear", "adalora": {"init_r": 4, "target_r": 3, "tinit": 2}})
    result = train(config)
    assert result.losses[-1] < result.losses[0] * 0.8
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["total_step"] == 12
    masks = saved["rank_pattern"]
    assert len(masks) == 14 and sum(sum(mask) for mask in masks.values()) == 3 * 14  # 7 linears × 2 layers
    adapter = tmp_path / "run" / "adapter"
    loaded = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(DEVICE), adapter).eval()
    assert adapter_ranks(loaded, "default") == {k.removesuffix(".lora_E"): sum(m) for k, m in masks.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir).to(DEVICE),
                                                str(adapter))
    inputs = make_inputs("llama")
    torch.testing.assert_close(run(theirs.eval(), inputs), run(loaded, inputs), atol=ATOL, rtol=0)
