"""LoHa and LoKr beyond the generic matrix of test_variants.py: every tensor layout PEFT 0.21 can produce
(Tucker conv cores, 1×1 and grouped convs, decomposed Kronecker factors, decompose_factor, LyCORIS init),
PEFT's factorization rule, its training-mode dropouts, mixed batches, and the errors for what PEFT lacks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import DEVICE, Case, check_merge_round_trip, make_inputs, make_model, perturb, run
from torch import nn

from loraforge import AdapterError, ConfigError, LoraConfig, LoraModel
from loraforge.config import load_train_config, parse_section
from loraforge.demo import DEMO_DATA
from loraforge.lora.files import adapter_state, read_adapter_files
from loraforge.lora.lokr import factorization
from loraforge.train import train

peft = pytest.importorskip("peft")

ATOL = 1e-5


class ConvZoo(nn.Module):
    """A k×k conv, a 1×1 conv, a grouped + strided + dilated conv and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pointwise = nn.Conv2d(8, 8, 1)
        self.grouped = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=2)
        self.head = nn.Linear(12, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pointwise(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.grouped(h)).mean((2, 3)))


def _model(arch: str) -> nn.Module:
    if arch != "zoo":
        return make_model(arch)
    torch.manual_seed(0)
    return ConvZoo().eval().to(DEVICE)


def _inputs(arch: str) -> torch.Tensor:
    return make_inputs("convnet" if arch == "zoo" else arch)


ZOO_TARGETS = ["conv", "pointwise", "grouped", "head"]
CASES = [
    Case("loha-llama-patterns-dropouts", "llama", {
        "method": "loha", "targets": ["q_proj", "v_proj", "down_proj"], "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"q_proj": 3.0}, "lycoris": {"rank_dropout": 0.3, "module_dropout": 0.2}}),
    Case("loha-zoo-effective-conv", "zoo", {
        "method": "loha", "targets": ZOO_TARGETS, "lycoris": {"use_effective_conv2d": True}}),
    Case("loha-zoo-flat-conv", "zoo", {"method": "loha", "targets": ZOO_TARGETS, "r": 3}),
    Case("lokr-llama-r1-decompose-both", "llama", {
        "method": "lokr", "targets": "all-linear", "r": 1, "lycoris": {"decompose_both": True}}),
    Case("lokr-llama-factor4-lycoris-init", "llama", {
        "method": "lokr", "targets": ["q_proj", "up_proj", "down_proj"], "r": 2, "lycoris": {
            "decompose_factor": 4, "init_weights": "lycoris", "rank_dropout": 0.1, "rank_dropout_scale": True}}),
    Case("lokr-zoo-effective-conv-r1", "zoo", {
        "method": "lokr", "targets": ZOO_TARGETS, "r": 1,
        "lycoris": {"use_effective_conv2d": True, "decompose_both": True}}),
    Case("lokr-zoo-flat-conv-r2", "zoo", {"method": "lokr", "targets": ZOO_TARGETS, "r": 2}),
]


@pytest.fixture(params=CASES, ids=[c.id for c in CASES])
def case(request) -> Case:
    return request.param


def _peft_load(arch: str, directory, trainable: bool = False) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about our fan_in_fan_out key, which LoHa/LoKr configs lack
        model = peft.PeftModel.from_pretrained(_model(arch), str(directory), is_trainable=trainable)
    return model.train(trainable)


def _adapter_shapes(named: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k.replace(".default", ""): tuple(v.shape) for k, v in named.items() if "hada_" in k or "lokr_" in k}


# -- the invariants, on every layout ------------------------------------------------------------------
def test_fresh_is_exactly_the_base_because_one_factor_is_zero(case):
    inputs = _inputs(case.arch)
    base = run(_model(case.arch), inputs)
    lora = LoraModel(_model(case.arch), case.config())
    torch.testing.assert_close(run(lora, inputs), base, atol=0, rtol=0)
    options = lora.configs["default"].lycoris
    for _, layer in lora.lora_layers():
        tensors = layer.peft_tensors("default")
        if case.lora["method"] == "loha":
            zero = "hada_w2_b"
        elif options.init_weights == "lycoris":
            zero = "lokr_w2" if "lokr_w2" in tensors else "lokr_w2_b"
        else:
            zero = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
        assert [k for k, t in tensors.items() if not t.any()] == [zero]
    perturb(lora, "default")
    assert (run(lora, inputs) - base).abs().max() > 1e-3


def test_merge_matches_unmerged_and_unmerge_restores(case):
    lora = LoraModel(_model(case.arch), case.config())
    perturb(lora, "default")
    check_merge_round_trip(lora, _inputs(case.arch), ATOL)


def test_save_load_and_peft_both_ways_with_peft_tensor_layout(case, tmp_path):
    inputs = _inputs(case.arch)
    lora = LoraModel(_model(case.arch), case.config())
    perturb(lora, "default")
    ours = run(lora, inputs)
    lora.save(tmp_path / "ours")
    torch.testing.assert_close(run(LoraModel.from_pretrained(_model(case.arch), tmp_path / "ours"), inputs), ours,
                               atol=ATOL, rtol=0)

    peft_model = _peft_load(case.arch, tmp_path / "ours")
    assert _adapter_shapes(dict(peft_model.named_parameters())) == _adapter_shapes(adapter_state(lora, "default"))
    torch.testing.assert_close(run(peft_model, inputs), ours, atol=ATOL, rtol=0)

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "hada_" in name or "lokr_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    theirs = run(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    loaded = LoraModel.from_pretrained(_model(case.arch), tmp_path / "theirs")
    read_back, saved = loaded.configs["default"], lora.configs["default"]
    for key in ("method", "r", "alpha", "rank_pattern", "alpha_pattern", "lycoris"):
        assert getattr(read_back, key) == getattr(saved, key), key
    torch.testing.assert_close(run(loaded, inputs), theirs, atol=ATOL, rtol=0)


def test_optimizer_step_moves_only_adapter_tensors(case):
    lora = LoraModel(_model(case.arch), case.config(lycoris={
        **case.lora.get("lycoris", {}), "rank_dropout": 0.0, "module_dropout": 0.0}))  # every tensor gets a gradient
    perturb(lora, "default", std=0.05)
    lora.train()
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    # Adam moves every tensor with a non-zero gradient by ~lr, however small the gradient of a product of four factors
    optimizer = torch.optim.Adam([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    run(lora, _inputs(case.arch)).pow(2).mean().backward()
    optimizer.step()
    adapter_ids = {id(p) for p in lora.adapter_parameters("default")}
    for name, param in lora.named_parameters():
        assert (not torch.equal(param, before[name])) == (id(param) in adapter_ids), name


# -- rules and options ----------------------------------------------------------------------------------
def test_factorization_is_peft_s_rule():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert factorization(256) == (16, 16) and factorization(128) == (8, 16)
    assert factorization(127) == (1, 127) and factorization(128, 4) == (4, 32)
    for dimension in range(1, 300):
        for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 16, 64):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


def test_lokr_decomposes_a_kronecker_factor_only_below_half_its_side():
    def layout(r: int, decompose_both: bool) -> dict:
        config = LoraConfig(method="lokr", targets=["q_proj"], r=r, lycoris={"decompose_both": decompose_both})
        layer = LoraModel(make_model("llama"), config).model.model.layers[0].self_attn.q_proj
        return {k: tuple(t.shape) for k, t in layer.peft_tensors("default").items()}

    # q_proj is 32 × 32 = (4·8) × (4·8): W1 is 4 × 4, W2 is 8 × 8
    assert layout(4, True) == {"lokr_w1": (4, 4), "lokr_w2": (8, 8)}
    assert layout(2, True) == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}
    assert layout(1, True) == {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}
    assert layout(1, False) == {"lokr_w1": (4, 4), "lokr_w2_a": (8, 1), "lokr_w2_b": (1, 8)}


def test_init_weights_false_starts_random():
    inputs = make_inputs("llama")
    base = run(make_model("llama"), inputs)
    for method in ("loha", "lokr"):
        config = LoraConfig(method=method, targets=["q_proj"], lycoris={"init_weights": False})
        lora = LoraModel(make_model("llama"), config)
        assert all(t.all() for _, layer in lora.lora_layers() for t in layer.peft_tensors("default").values())
        assert (run(lora, inputs) - base).abs().max() > 1e-4


def test_adapter_config_uses_peft_keys_and_reads_back(tmp_path):
    options = {"rank_dropout": 0.25, "module_dropout": 0.1, "decompose_both": True, "decompose_factor": 4,
               "rank_dropout_scale": True, "init_weights": "lycoris", "use_effective_conv2d": True}
    config = LoraConfig(method="lokr", targets=["q_proj"], r=2, alpha=3.0, lycoris=options)
    LoraModel(make_model("llama"), config).save(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LOKR" and raw["alpha"] == 3.0 and "lora_alpha" not in raw
    assert {k: raw[k] for k in options} == options
    assert read_adapter_files(tmp_path)[0] == config


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_adapter_made_by_peft_itself_loads(method, tmp_path):
    """PEFT's own config object (random init, Tucker convs, its defaults for everything else) on the conv zoo."""
    options = {"use_effective_conv2d": True, "init_weights": False}
    if method == "lokr":
        options.update(decompose_both=True)
    config_class = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(_model("zoo"), config_class(r=2, alpha=5, target_modules=ZOO_TARGETS,
                                                                     **options)).eval()
    inputs = _inputs("zoo")
    theirs = run(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path))
    ours = LoraModel.from_pretrained(_model("zoo"), tmp_path)
    torch.testing.assert_close(run(ours, inputs), theirs, atol=ATOL, rtol=0)
    assert ours.configs["default"].alpha == 5 and ours.configs["default"].method == method


# -- dropouts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, rescale", [("loha", False), ("lokr", False), ("lokr", True)])
def test_training_dropouts_match_peft_under_the_same_seed(method, rescale, tmp_path):
    config = LoraConfig(method=method, targets="all-linear", r=4, lycoris={
        "rank_dropout": 0.5, "module_dropout": 0.3, "rank_dropout_scale": rescale})
    lora = LoraModel(make_model("llama"), config)
    perturb(lora, "default")
    lora.save(tmp_path)
    peft_model = _peft_load("llama", tmp_path, trainable=True)
    lora.train()
    inputs = make_inputs("llama")
    outputs = []
    for model in (lora, peft_model, lora):
        torch.manual_seed(11)
        outputs.append(run(model, inputs))
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs[2], outputs[0], atol=0, rtol=0)
    torch.manual_seed(12)
    assert (run(lora, inputs) - outputs[0]).abs().max() > 1e-3  # another seed drops other rows / modules
    lora.eval()  # the dropouts act only in training: eval is deterministic and equals the merged model
    evaluated = run(lora, inputs)
    torch.testing.assert_close(run(lora, inputs), evaluated, atol=0, rtol=0)
    lora.merge()
    torch.testing.assert_close(run(lora, inputs), evaluated, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method, rescale", [("loha", True), ("lokr", False), ("lokr", True)])
def test_rank_dropout_drops_whole_output_rows(method, rescale):
    config = LoraConfig(method=method, targets=["q_proj"], lycoris={"rank_dropout": 0.5,
                                                                    "rank_dropout_scale": rescale})
    layer = LoraModel(make_model("llama"), config).model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for tensor in layer.peft_tensors("default").values():
            tensor.normal_()
    x = torch.randn(5, layer.base_layer.in_features, device=DEVICE)
    full = layer(x) - layer.base_layer(x)
    layer.train()
    torch.manual_seed(0)
    dropped = layer(x) - layer.base_layer(x)
    # Each output feature's update is either gone or the full one times one common factor.
    factor_per_feature = (dropped * full).sum(0) / (full * full).sum(0)
    kept = factor_per_feature > 0.5
    assert 0 < int(kept.sum()) < len(kept)
    factor = len(kept) / int(kept.sum()) if rescale else 1.0
    torch.testing.assert_close(dropped[:, kept], factor * full[:, kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dropped[:, ~kept], torch.zeros_like(dropped[:, ~kept]), atol=0, rtol=0)


# -- mixed batches, and what is refused --------------------------------------------------------------------
@pytest.mark.parametrize("method, arch", [("loha", "llama"), ("lokr", "llama"), ("loha", "zoo"), ("lokr", "zoo")])
def test_mixed_batch_rows_get_their_own_adapter(method, arch):
    targets = ZOO_TARGETS if arch == "zoo" else "all-linear"
    lora = LoraModel(_model(arch), LoraConfig(method=method, targets=targets, r=2), adapter_name="a")
    lora.add_adapter("b", LoraConfig(method=method, targets=targets, r=4, alpha=3.0))
    perturb(lora, "a", seed=1)
    perturb(lora, "b", seed=2)
    inputs = _inputs(arch)
    mixed = run(lora, inputs, adapter_names=["a", None, "b"])
    expected = []
    for row, name in enumerate(["a", None, "b"]):
        lora.set_active([name] if name else [])
        expected.append(run(lora, inputs[row:row + 1]))
    torch.testing.assert_close(mixed, torch.cat(expected), atol=ATOL, rtol=0)


def test_what_peft_lacks_is_refused_with_a_clear_error():
    with pytest.raises(AdapterError, match="Conv1D"):
        LoraModel(make_model("gpt2"), LoraConfig(method="loha", targets=["c_attn"]))
    with pytest.raises(AdapterError, match="not Embedding"):
        LoraModel(make_model("llama"), LoraConfig(method="lokr", targets=["embed_tokens"]))
    with pytest.raises(ConfigError, match=r"lora\.dropout: a LoRA option that method=lokr does not have"):
        parse_section(LoraConfig, {"method": "lokr", "targets": ["q_proj"], "dropout": 0.1, "use_rslora": True},
                      where="lora")
    with pytest.raises(AdapterError, match="is a LoKr option"):
        LoraModel(make_model("llama"), LoraConfig(method="loha", targets=["q_proj"],
                                                  lycoris={"init_weights": "lycoris"}))
    reflect = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(AdapterError, match="padding_mode"):
        LoraModel(reflect, LoraConfig(method="loha", targets=["0"]))


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_on_a_4bit_base_the_update_has_the_dense_shape(method):
    pytest.importorskip("bitsandbytes")
    from loraforge.quant import quantize_model

    model = make_model("llama")
    quantize_model(model, "nf4", device=DEVICE)
    inputs = make_inputs("llama")
    base = run(model, inputs)
    lora = LoraModel(model, LoraConfig(method=method, targets="all-linear", r=4))
    torch.testing.assert_close(run(lora, inputs), base, atol=0, rtol=0)
    perturb(lora, "default", std=0.1)
    layer = lora.model.model.layers[0].mlp.down_proj  # 64 → 32, stored packed as (1024, 1) uint8
    assert layer.delta_weight("default").shape == (32, 64)
    x = torch.randn(3, 64, device=DEVICE)
    expected = layer.base_layer(x) + torch.nn.functional.linear(x, layer.delta_weight("default"))
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


# -- the trainer ----------------------------------------------------------------------------------------
def test_the_trainer_lowers_the_loss_and_writes_a_peft_adapter(tiny_model_dir, tmp_path):
    """LoHa through the real trainer (LoKr takes the same path; the matrix above checks its gradients)."""
    data = tmp_path / "orders.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:40]))
    result = train(load_train_config(None, [
        f"model={tiny_model_dir}", f"data={data}", f"output={tmp_path / 'run'}", "batch_size=4", "max_steps=12",
        "lr=5e-2", "lora.method=loha", "lora.r=4", "lora.lycoris.module_dropout=0.1", "eval_every=6",
        "compare=false", "tensorboard=false", "report=false", "max_seq_len=128"]))
    assert result.losses[-1] < result.losses[0] * 0.8
    assert json.loads((result.adapter / "adapter_config.json").read_text())["peft_type"] == "LOHA"
