"""QLoRA: NF4 / int8 frozen bases, training on them, and merging out of them (loraforge.quant)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DEVICE, VOCAB, _causal_lm, crash_loss_at_call, make_inputs, make_model, perturb
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from loraforge import LoraConfig, LoraModel
from loraforge import quant as quant_module
from loraforge.train import client as client_module
from loraforge.train.checkpoint import complete_checkpoints
from loraforge.config import load_train_config
from loraforge.data import Example
from loraforge.demo import DEMO_DATA
from loraforge.errors import AdapterError, ConfigError, MergeError, QuantizationError
from loraforge.models import load_model
from loraforge.merge import LOST_FRACTION, merge_quantized
from loraforge.quant import (
    compute_dtype_for,
    dequantized_weight,
    frozen_weight_bytes,
    is_quantized_linear,
    model_quant,
    quantize_model,
    round_trip,
)
from loraforge.train import train

# Unmerged forward through the 4-bit layer vs the merged float model: with fp32 compute both multiply the same
# dequantized weights, so they differ by fp32 rounding only; bf16 compute (CUDA) rounds the base matmul's input.
MERGE_ATOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[compute_dtype_for(DEVICE)]
# LLM.int8() also quantizes the activations, row by row, which the merged float model does not.
INT8_MERGE_RTOL = 2e-2


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).logits.float()


def _quantized_llama(quant: str = "nf4", seed: int = 0) -> nn.Module:
    model = make_model("llama", seed)
    quantize_model(model, quant, device=DEVICE)
    return model


# -- quantization ---------------------------------------------------------------------------------
def _block_absmax(weight: torch.Tensor, block: int) -> torch.Tensor:
    flat = weight.reshape(-1).abs()
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % block)).view(-1, block)
    return padded.amax(1).repeat_interleave(block)[: flat.numel()].view_as(weight)


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (256, 512), (30, 10)])
def test_nf4_round_trip_error_is_bounded(shape):
    """NF4's codes are 16 values in [-1, 1] scaled by each block's absmax; the widest gap (-1 to -0.696) bounds the
    rounding at 0.152·absmax, and the 8-bit absmax of double quantization adds a little: ≤ 0.16·absmax measured.
    On Gaussian weights (what trained layers look like) the relative Frobenius error is 0.092 (bound: 0.10).
    A size that is not a multiple of the block (30×10) quantizes too."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    restored = round_trip(weight, "nf4")
    error = (restored - weight).abs()
    assert bool((error <= 0.16 * _block_absmax(weight, quant_module.NF4_BLOCKSIZE)).all())
    assert 0.05 < float((restored - weight).norm() / weight.norm()) < 0.10  # lossy, and by the documented amount


@pytest.fixture
def routed_4bit_kernel():
    """bitsandbytes' AVX-512 dequantize kernel behind loraforge's routing, installed on any CPU: aligned rows go to
    the native kernel (its scalar path where the CPU lacks AVX-512), misaligned rows to the reference kernel."""
    assert quant_module._route_misaligned_4bit_rows_to_the_reference_kernel(quant_module._bnb(), force=True)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the routing is for bitsandbytes' CPU kernel")
@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (30, 10), (32, 48), (6, 4096)])
def test_nf4_round_trip_is_bounded_through_the_routed_cpu_kernel(routed_4bit_kernel, shape):
    """The shapes the AVX-512 kernel got wrong (rows of 96 or 48: multiples of 16, not of 64) and aligned ones."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    restored = round_trip(weight, "nf4")
    assert bool(((restored - weight).abs() <= 0.16 * _block_absmax(weight, quant_module.NF4_BLOCKSIZE)).all())
    assert 0.05 < float((restored - weight).norm() / weight.norm()) < 0.10


def _dequantize_like_the_avx512_kernel(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """What bitsandbytes ≤ 0.50.2's AVX-512 kernel returned: each row's scales read as if rows started blocks."""
    state = weight.quant_state
    rows, width = state.shape
    correct = quant_module._bnb().functional.dequantize_4bit(weight.data, state)
    codes = correct.reshape(-1) / state.absmax.float().repeat_interleave(state.blocksize)[: rows * width]
    scales = quant_module._bnb().functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    col = torch.arange(width)
    index = (torch.arange(rows)[:, None] * (width // state.blocksize) + col // state.blocksize).clamp_max(
        scales.numel() - 1)
    return codes.view(rows, width) * scales[index]


def test_self_check_stops_on_a_kernel_that_reads_the_wrong_scales(monkeypatch):
    """The bug as it was on AVX-512 CPUs (relative error ~0.27): quantizing stops, naming the layer and the figure."""
    monkeypatch.setattr(quant_module, "dequantized_weight", _dequantize_like_the_avx512_kernel)
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.self_attn\.q_proj: the NF4 round trip is off: "
                                                r"relative error 0\.[2-9]"):
        quantize_model(make_model("llama"), "nf4")


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_self_check_accepts_heavy_tailed_weights_with_outliers_and_near_zero_rows(quant):
    """The bound is per element, against the block's own scale: outliers (relative error 0.11 for NF4, above the
    Gaussian 0.09) and a row a thousand times smaller than the rest pass, and the figure is returned."""
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(2.0).sample((64, 256))
    weight[3] *= 1e-4
    weight[5, :64] = 0
    linear = nn.Linear(256, 64, bias=False)
    linear.weight.data = weight
    layer = quant_module._quantized_linear(linear, quant, torch.float32, torch.device("cpu"))
    assert 0 < quant_module.check_round_trip("layer", weight, layer) < (0.2 if quant == "nf4" else 0.05)


def test_int8_round_trip_error_is_half_a_step_per_row():
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    restored = round_trip(weight, "int8")
    step = weight.abs().amax(1, keepdim=True) / 127  # row-wise absmax scaling; +fp16 rounding before quantizing
    assert bool(((restored - weight).abs() <= 0.6 * step).all())
    assert float((restored - weight).norm() / weight.norm()) < 0.01


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantize_model_replaces_every_linear_but_the_head(quant):
    float_model = make_model("llama")
    model = _quantized_llama(quant)
    linears = [n for n, m in float_model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    assert linears and all(is_quantized_linear(model.get_submodule(n)) for n in linears)
    assert type(model.lm_head) is nn.Linear and model.model.embed_tokens.weight.dtype == torch.float32
    assert model_quant(model) == quant and model_quant(float_model) == "none"
    inputs = make_inputs("llama")
    expected, got = _logits(float_model, inputs), _logits(model, inputs)
    assert not torch.equal(got, expected)  # the weights really are rounded …
    assert float((got - expected).norm() / expected.norm()) < 0.1  # … and the model is still the same model


def test_frozen_nf4_weights_take_at_most_030_of_bf16():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2), dtype=torch.float32)
    before = frozen_weight_bytes(model)
    assert before.quantized == 0 and before.other == 2 * before.other_bf16  # fp32 is twice bf16
    nf4 = quantize_model(model, "nf4", device=DEVICE)
    linear_params = sum(m.in_features * m.out_features for m in model.modules() if is_quantized_linear(m))
    assert nf4.quantized_bf16 == 2 * linear_params
    # 4 bits + an 8-bit absmax per 64 weights + its fp32 scale per 256 blocks + code tables: 0.27× here.
    assert nf4.ratio <= 0.30
    assert nf4.other == before.other - 4 * linear_params  # embeddings, norms and head untouched
    int8 = quantize_model(make_model("llama"), "int8", device=DEVICE)
    assert 0.5 <= int8.ratio <= 0.6  # one byte per weight + an fp32 scale per row


def test_quantize_errors_are_clear():
    with pytest.raises(ConfigError, match="fp8"):
        quantize_model(make_model("llama"), "fp8")
    lora = LoraModel(make_model("llama"), LoraConfig(r=2))
    with pytest.raises(AdapterError, match="before adding adapters"):
        quantize_model(lora.model, "nf4")
    with pytest.raises(ConfigError, match="Conv1D"):  # GPT-2: Conv1D layers and the head only
        quantize_model(make_model("gpt2"), "nf4")
    with pytest.raises(AdapterError, match="PiSSA"):  # PiSSA splits the float weight; a 4-bit one cannot be split
        LoraModel(_quantized_llama(), LoraConfig(r=2, init="pissa"))


# -- adapters on a quantized base ------------------------------------------------------------------
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_adapters_on_a_quantized_base_are_fp32_and_start_at_the_base(quant):
    model = _quantized_llama(quant)
    inputs = make_inputs("llama")
    base, sizes = _logits(model, inputs), frozen_weight_bytes(model)
    lora = LoraModel(model, LoraConfig(r=4, alpha=8))
    assert frozen_weight_bytes(lora) == sizes  # the adapters are not frozen weights
    q_proj = lora.model.model.layers[0].self_attn.q_proj
    assert (q_proj.in_features, q_proj.out_features) == (32, 32)  # not the packed weight's shape
    assert all(p.dtype == torch.float32 for p in lora.adapter_parameters("default"))
    torch.testing.assert_close(_logits(lora, inputs), base, atol=0, rtol=0)  # B = 0
    perturb(lora, "default")
    assert not torch.allclose(_logits(lora, inputs), base, atol=1e-3)
    with pytest.raises(MergeError, match="merge_quantized"):  # a 4-bit weight cannot take ΔW in place
        lora.merge()


def test_adapter_trained_on_nf4_base_saves_and_loads(tmp_path):
    lora = LoraModel(_quantized_llama(), LoraConfig(r=4, alpha=8, use_dora=True))
    perturb(lora, "default")
    inputs = make_inputs("llama")
    expected = _logits(lora, inputs)
    lora.save(tmp_path)
    # Quantization is deterministic: the same float model quantizes to the same base the adapter was trained on.
    reloaded = LoraModel.from_pretrained(_quantized_llama(), tmp_path)
    torch.testing.assert_close(_logits(reloaded, inputs), expected, atol=0, rtol=0)


# -- merging out of a quantized base --------------------------------------------------------------------
MERGE_CASES = {
    "lora-all-linear": {"targets": "all-linear"},
    "dora-qv": {"targets": ["q_proj", "v_proj"], "use_dora": True},
    "loha": {"method": "loha", "targets": ["q_proj", "down_proj"]},
    "lokr": {"method": "lokr", "targets": ["q_proj", "down_proj"]},
    "adalora": {"method": "adalora", "targets": ["q_proj", "down_proj"], "adalora": {"total_step": 10}},
}


@pytest.mark.parametrize("config", MERGE_CASES.values(), ids=MERGE_CASES.keys())
def test_merge_from_a_4bit_base_equals_the_unmerged_quantized_forward(config):
    rank = {} if config.get("method") == "adalora" else {"r": 4}  # AdaLoRA's rank is adalora.init_r
    lora = LoraModel(_quantized_llama(), LoraConfig(**rank, alpha=8, **config))
    perturb(lora, "default")
    inputs = make_inputs("llama")
    unmerged = _logits(lora, inputs)
    with lora.disable_adapters():
        base = _logits(lora, inputs)
    plain, report = merge_quantized(lora)
    assert not any(is_quantized_linear(m) for m in plain.modules()) and model_quant(plain) == "none"
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert report.base_quant == "nf4" and report.adapters == ["default"] and not report.warnings
    merged = _logits(plain, inputs)
    assert (unmerged - base).abs().max() > 100 * MERGE_ATOL  # the adapter matters at this tolerance
    torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL, rtol=0)


def test_merge_from_an_int8_base_equals_the_unmerged_forward_up_to_activation_rounding():
    lora = LoraModel(_quantized_llama("int8"), LoraConfig(r=4, alpha=8))
    perturb(lora, "default")
    inputs = make_inputs("llama")
    unmerged = _logits(lora, inputs)
    plain, report = merge_quantized(lora)
    assert report.base_quant == "int8"
    assert float((_logits(plain, inputs) - unmerged).norm() / unmerged.norm()) < INT8_MERGE_RTOL


def _examples(n: int = 6, length: int = 12) -> list[Example]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 96, (n, length), generator=generator).tolist()
    return [Example(row, row) for row in ids]


def test_requantize_reports_layer_errors_and_validation_loss():
    lora = LoraModel(_quantized_llama(), LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    perturb(lora, "default")  # a large update: it survives re-quantization
    inputs = make_inputs("llama")
    unmerged = _logits(lora, inputs)
    plain, report = merge_quantized(lora, requantize="nf4", validation=_examples(), pad_token_id=0)
    assert model_quant(plain) == "nf4" and plain.config.quantization_config.load_in_4bit
    assert [layer.name for layer in report.layers] == [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    for layer in report.layers:
        assert 0.05 < layer.weight_error < 0.15 and layer.update_norm > 0 and not layer.adapter_lost
    assert report.update_error < LOST_FRACTION and not report.warnings
    assert set(report.loss) == {"base", "unmerged", "merged", "requantized"} and report.tokens == 6 * 11
    assert abs(report.loss["merged"] - report.loss["unmerged"]) < 1e-4  # merging changes nothing
    assert report.loss["requantized"] != report.loss["merged"]  # re-quantizing does
    assert float((_logits(plain, inputs) - unmerged).norm() / unmerged.norm()) < 0.2
    saved = json.loads(json.dumps(report.to_dict()))  # strict JSON
    assert saved["layers"][0]["name"] == "model.layers.0.self_attn.q_proj" and "perplexity" in saved


def test_requantize_warns_when_the_update_is_rounded_away():
    lora = LoraModel(_quantized_llama(), LoraConfig(r=4, alpha=8))
    perturb(lora, "default", std=0.003)  # ΔW ~ 1e-4, far below NF4's step at these weights (~6e-3)
    _, report = merge_quantized(lora, requantize="nf4")
    assert report.update_error > 0.9 and all(layer.adapter_lost for layer in report.layers)
    assert any("loses most of the adapter" in warning for warning in report.warnings)


def test_requantized_model_reloads_with_transformers(tmp_path):
    """The saved 4-bit weights come back bit for bit, and the reloaded model answers like the one saved. Where the
    CPU has AVX-512 BF16, bitsandbytes runs eval-mode 4-bit layers that transformers builds through its own bf16
    kernel (repacking each weight on first use, which needs out_features % 32 == 0 and rows of whole 64-blocks: the
    model is sized for it), so there the logits agree to bf16's precision; elsewhere to fp32's."""
    pytest.importorskip("accelerate")  # transformers' bitsandbytes loader needs it
    torch.manual_seed(0)
    model = _causal_lm(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    quantize_model(model.eval().to(DEVICE), "nf4", device=DEVICE)
    lora = LoraModel(model, LoraConfig(r=4, alpha=8))
    perturb(lora, "default")
    plain, _ = merge_quantized(lora, requantize="nf4")
    inputs = make_inputs("llama")
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": DEVICE.type}).eval()
    assert model_quant(reloaded) == "nf4"
    saved = {name: module for name, module in plain.named_modules() if is_quantized_linear(module)}
    restored = {name: module for name, module in reloaded.named_modules() if is_quantized_linear(module)}
    assert saved.keys() == restored.keys() and len(saved) == 14
    for name, module in saved.items():
        torch.testing.assert_close(dequantized_weight(restored[name], restored[name].weight),
                                   dequantized_weight(module, module.weight), atol=0, rtol=0, msg=name)
    bf16_kernel = DEVICE.type == "cpu" and any(getattr(m, "support_avx512bf16_for_cpu", False)
                                               for m in restored.values())
    expected = _logits(plain, inputs)
    got = _logits(reloaded, inputs)
    if bf16_kernel:  # measured 1.1% on a Sapphire Rapids Xeon: as far as the saved model under bf16 autocast is
        assert float((got - expected).norm() / expected.norm()) < 2e-2
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# -- training on a quantized base --------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("qdata") / "orders.jsonl"
    path.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:40]))
    return path


def _qlora_config(tiny_model_dir, data, output, *overrides):
    return load_train_config(None, [
        f"model={tiny_model_dir}", f"data={data}", f"output={output}", "quant=nf4", "batch_size=4", "max_steps=6",
        "lr=5e-2", "lora.r=4", "eval_every=3", "save_every=2", "compare=false", "report=false",
        "tensorboard=false", "max_seq_len=128", *overrides])


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, small_data, tmp_path_factory, request):
    """One QLoRA run (6 steps on an NF4 base), with the base model it trained recorded."""
    output = tmp_path_factory.mktemp("qlora-run")
    bases = []
    original = quant_module.quantize_model

    def recording(model, *args, **kwargs):
        bases.append(model)
        return original(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant_module, "quantize_model", recording)
        result = train(_qlora_config(tiny_model_dir, small_data, output))
    return result, bases


def test_qlora_training_lowers_the_loss(qlora_run):
    result, bases = qlora_run
    assert len(bases) == 1 and model_quant(bases[0]) == "nf4"  # it trained on the 4-bit base
    assert result.steps == 6 and result.skipped_steps == 0
    assert result.losses[-1] < 0.85 * result.losses[0]  # 9.6 -> 7.7 here


def test_qlora_resume_is_step_exact(qlora_run, tiny_model_dir, small_data, tmp_path, monkeypatch):
    straight, _ = qlora_run
    original = crash_loss_at_call(monkeypatch, 5)  # the 5th step's loss
    with pytest.raises(RuntimeError, match="power cut"):
        train(_qlora_config(tiny_model_dir, small_data, tmp_path))
    assert complete_checkpoints(tmp_path / "checkpoints")[-1].name == "step-0000004"
    monkeypatch.setattr(client_module, "token_logprobs", original)
    resumed = train(_qlora_config(tiny_model_dir, small_data, tmp_path, "resume=true"))
    assert resumed.losses == straight.losses[4:]


def test_cli_merge_uses_the_runs_nf4_base_and_reports_requantization(qlora_run, tmp_path, capsys):
    from loraforge.cli import main

    result, _ = qlora_run
    adapter = result.adapter
    model, tokenizer = load_model(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"],
                                  quant="nf4")
    lora = LoraModel.from_pretrained(model, adapter)
    ids = tokenizer("hello world", return_tensors="pt")["input_ids"]
    expected = _logits(lora, ids)

    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(adapter), "--output", str(merged_dir)]) == 0
    assert "nf4" in capsys.readouterr().out  # the run's config says how the base was quantized
    plain = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    torch.testing.assert_close(_logits(plain, ids), expected, atol=MERGE_ATOL, rtol=0)
    report = json.loads((merged_dir / "merge_report.json").read_text())
    assert report["base_quant"] == "nf4" and {"base", "unmerged", "merged"} <= report["loss"].keys()

    requantized_dir = tmp_path / "requantized"
    assert main(["merge", "--adapter", str(adapter), "--output", str(requantized_dir), "--requantize", "nf4"]) == 0
    report = json.loads((requantized_dir / "merge_report.json").read_text())
    assert report["requantize"] == "nf4" and len(report["layers"]) == 14 and "requantized" in report["loss"]
    config = json.loads((requantized_dir / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_cli_eval_judges_a_qlora_adapter_on_the_runs_nf4_base(qlora_run, tmp_path, capsys):
    from loraforge.cli import main

    result, _ = qlora_run
    run = result.adapter.parent
    quantized = tmp_path / "nf4.json"
    assert main(["eval", str(run), "--split", "validation", "--samples", "2", "--consistency", "0",
                 "--max-new-tokens", "2", "--metrics", "exact_match", "--output", str(quantized)]) == 0
    assert "(nf4 base)" in capsys.readouterr().out  # the run's quant is the default
    plain = tmp_path / "none.json"
    assert main(["eval", str(run), "--split", "validation", "--samples", "2", "--consistency", "0",
                 "--max-new-tokens", "2", "--metrics", "exact_match", "--quant", "none", "--output", str(plain)]) == 0
    on_nf4, on_float = json.loads(quantized.read_text()), json.loads(plain.read_text())
    # the 4-bit base has no in-place merge, so only the float base reports a merged latency
    assert set(on_nf4["resources"]["latency"]) == {"base", "unmerged"}
    assert set(on_float["resources"]["latency"]) == {"base", "unmerged", "merged"}
    assert on_nf4["models"]["base"]["loss"] != pytest.approx(on_float["models"]["base"]["loss"], abs=1e-6)
