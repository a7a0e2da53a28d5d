"""The fused LoRA linear node (lora/fused.py) against the generic path it replaces on the hot path."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraforge import LoraConfig
from loraforge.lora.layers import LoraLinear


def _layer(kind: str, bias: bool, weight_dtype: torch.dtype = torch.float32) -> LoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias) if kind == "linear" else Conv1D(40, 24)  # Conv1D always has a bias
    base.requires_grad_(False)
    base.to(weight_dtype)
    layer = LoraLinear(base)
    layer.add_adapter("a", 4, 8, LoraConfig())
    layer.active_adapters = ("a",)
    nn.init.normal_(layer.lora_B["a"].weight, std=0.1)
    return layer


def _forward_backward(layer: LoraLinear, x: torch.Tensor, fused: bool, autocast: bool = False):
    if not fused:
        layer._fused_adapter = lambda: None  # the generic path: base layer, then the adapter's addmm
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    out.float().square().sum().backward()
    grads = [x.grad] + [p.grad for p in (layer.lora_A["a"].weight, layer.lora_B["a"].weight)]
    layer.zero_grad(set_to_none=True)
    layer.__dict__.pop("_fused_adapter", None)
    return out, grads


@pytest.mark.parametrize("kind, bias", [("linear", True), ("linear", False), ("conv1d", True)])
def test_fused_node_equals_the_generic_path(kind, bias):
    layer = _layer(kind, bias)
    x = torch.randn(3, 5, 24)
    out, grads = _forward_backward(layer, x, fused=True)
    assert type(out.grad_fn).__name__ == "_FrozenLinearLoraBackward"  # the hot path really is fused
    expected, expected_grads = _forward_backward(layer, x, fused=False)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert layer.base_layer.weight.grad is None  # never a gradient for W0


def test_fused_node_widens_a_bf16_stored_base_exactly_like_a_float_copy():
    narrow = _layer("linear", True, torch.bfloat16)
    wide = _layer("linear", True)
    wide.base_layer.load_state_dict({k: v.float() for k, v in narrow.base_layer.state_dict().items()})
    x = torch.randn(2, 7, 24)
    out, grads = _forward_backward(narrow, x, fused=True)
    assert out.dtype == torch.float32 and narrow.base_layer.weight.dtype == torch.bfloat16
    expected, expected_grads = _forward_backward(wide, x, fused=False)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_narrow_weights_are_widened_into_one_reused_buffer_per_shape():
    from loraforge.lora.fused import _widened

    first, second = torch.randn(40, 24).bfloat16(), torch.randn(40, 24).bfloat16()
    widened_first = _widened(first, torch.float32)
    torch.testing.assert_close(widened_first, first.float(), atol=0, rtol=0)
    widened_second = _widened(second, torch.float32)
    assert widened_second is widened_first  # no fresh (out × in) tensor per layer and pass
    torch.testing.assert_close(widened_second, second.float(), atol=0, rtol=0)
    assert _widened(torch.randn(8, 24).bfloat16(), torch.float32).shape == (8, 24)
    assert _widened(widened_first, torch.float32) is widened_first  # already the compute dtype: no copy


def test_fused_node_under_autocast_computes_in_the_autocast_dtype():
    layer = _layer("linear", True)
    x = torch.randn(2, 6, 24)
    out, grads = _forward_backward(layer, x, fused=True, autocast=True)
    expected, expected_grads = _forward_backward(layer, x, fused=False, autocast=True)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [torch.float32] * 3  # gradients in each input's own dtype
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)


def _saved_tensors(run) -> tuple[list[torch.Tensor], object]:
    """(the tensors autograd keeps while `run()` builds its graph, what `run()` returned)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        result = run()
    return saved, result


def test_sibling_projections_share_one_cast_of_their_input():
    """q, k and v read the same fp32 input under bf16 autocast: it is cast once and that copy is what all three keep;
    the gradients equal separate casts'. An input changed in place between calls is cast afresh."""
    layers = [_layer("linear", False) for _ in range(3)]
    x = torch.randn(2, 6, 24, requires_grad=True)

    def qkv():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return [layer(x) for layer in layers]

    saved, outs = _saved_tensors(qkv)
    casts = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.bfloat16 and t.shape == (12, 24)}
    assert len(casts) == 1
    sum(o.float().square().sum() for o in outs).backward()
    shared = [x.grad.clone()] + [p.grad.clone() for layer in layers for p in layer.parameters() if p.requires_grad]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # one cast per call: a fresh copy of x each time
        outs = [layer(x.clone()) for layer in layers]
    sum(o.float().square().sum() for o in outs).backward()
    separate = [x.grad] + [p.grad for layer in layers for p in layer.parameters() if p.requires_grad]
    for got, want in zip(shared, separate):
        torch.testing.assert_close(got, want, atol=0, rtol=0)

    y = torch.randn(2, 6, 24, requires_grad=True) * 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = layers[0](y)  # its node keeps the cast alive
        y.mul_(2)  # in place: that cast is stale now
        after = layers[0](y)
    torch.testing.assert_close(after, 2 * before, atol=2e-2, rtol=2e-2)


def test_input_without_grad_still_trains_the_adapter():
    layer = _layer("linear", False)
    out = layer(torch.randn(2, 3, 24))  # e.g. the first layer after a frozen embedding
    out.sum().backward()
    assert layer.lora_A["a"].weight.grad is not None and layer.lora_B["a"].weight.grad is not None


@pytest.mark.parametrize("setup", ["dropout", "two_adapters", "dora", "merged", "trainable_base"])
def test_other_cases_take_the_generic_path(setup):
    layer = _layer("linear", True)
    if setup == "dropout":
        layer.dropout_p["a"] = 0.1
        layer.train()
    elif setup == "two_adapters":
        layer.add_adapter("b", 4, 8, LoraConfig())
        layer.active_adapters = ("a", "b")
    elif setup == "dora":
        layer.add_adapter("d", 4, 8, LoraConfig(use_dora=True))
        layer.active_adapters = ("d",)
    elif setup == "merged":
        layer.merge(["a"])
    else:
        layer.base_layer.weight.requires_grad_(True)
    assert layer._fused_adapter() is None
    out = layer(torch.randn(2, 3, 24, requires_grad=True))
    assert type(out.grad_fn).__name__ != "_FrozenLinearLoraBackward"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_bf16_stored_base_trains_like_its_widened_copy(arch):
    """store_frozen_weights(bf16) on fp32 compute: the same model as a float base holding the rounded values,
    on the fused path and (with dropout) on the generic one; the adapter file is unaffected."""
    from conftest import make_inputs, make_model, perturb

    from loraforge import LoraModel

    for dropout in (0.0, 0.1):
        config = LoraConfig(r=4, alpha=8, targets="all-linear", dropout=dropout)
        narrow = LoraModel(make_model(arch), config)
        perturb(narrow, "default")
        wide = LoraModel(make_model(arch), config)
        wide.load_state_dict(narrow.state_dict())
        saved = narrow.store_frozen_weights(torch.bfloat16)
        layers = [layer for _, layer in narrow.lora_layers()]
        assert saved == sum(layer.base_weight.numel() * 2 for layer in layers) > 0
        assert all(layer.base_weight.dtype == torch.bfloat16 for layer in layers)
        for _, layer in wide.lora_layers():  # the float copy holds exactly the rounded values
            layer.base_weight.data = layer.base_weight.data.to(torch.bfloat16).float()
        inputs = make_inputs(arch)
        for model in (narrow, wide):
            model.train()
            torch.manual_seed(3)  # the same dropout masks on both
            model(inputs).logits.float().square().mean().backward()
        torch.testing.assert_close(narrow.eval()(inputs).logits, wide.eval()(inputs).logits, atol=1e-5, rtol=1e-5)
        for (name, p), (_, q) in zip(narrow.named_parameters(), wide.named_parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
        assert narrow.state_dict().keys() == wide.state_dict().keys()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # an untied head, a tied one
def test_embeddings_stored_in_the_compute_dtype_compute_what_autocast_computed(arch):
    """store_embeddings_in(bf16) under bf16 autocast: the head's matmul gets the weight autocast made of the float
    one (the same rounding), the looked-up rows come back widened (the residual stream stays fp32), so logits and
    the adapter's gradients equal those of a float model holding the rounded values; outside autocast the head
    still runs (in the weight's dtype)."""
    from conftest import make_inputs, make_model, perturb

    from loraforge import LoraModel
    from loraforge.memory import frozen_embedding_weights, store_embeddings_in

    config = LoraConfig(r=4, alpha=8, targets="all-linear")
    narrow = LoraModel(make_model(arch), config)
    perturb(narrow, "default")
    wide = LoraModel(make_model(arch), config)
    wide.load_state_dict(narrow.state_dict())
    weights = frozen_embedding_weights(narrow.model)
    assert len(weights) == (1 if arch == "gpt2" else 2)  # a tied head is the embedding's tensor, counted once
    assert store_embeddings_in(narrow.model, torch.bfloat16) == sum(w.numel() * 2 for w in weights)
    assert all(w.dtype == torch.bfloat16 for w in weights)
    for weight in frozen_embedding_weights(wide.model):
        weight.data = weight.data.to(torch.bfloat16).float()
    inputs = make_inputs(arch)
    assert narrow.model.get_input_embeddings()(inputs).dtype == torch.float32
    logits = []
    for model in (narrow, wide):
        model.train()
        torch.manual_seed(3)  # gpt2's dropout: the same masks on both
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(inputs).logits.float()
        out.square().mean().backward()
        logits.append(out)
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)
    for (name, p), (_, q) in zip(narrow.named_parameters(), wide.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)
    plain = narrow.eval()(inputs).logits
    assert plain.dtype == torch.bfloat16
    torch.testing.assert_close(plain.float(), wide.eval()(inputs).logits, atol=0.05, rtol=0.05)


def test_a_trained_or_wrapped_embedding_keeps_its_dtype():
    from conftest import make_model

    from loraforge import LoraModel
    from loraforge.memory import frozen_embedding_weights, store_embeddings_in

    saving_head = LoraModel(make_model("llama"), LoraConfig(targets=["q_proj"], modules_to_save=["lm_head"]))
    adapted_embedding = LoraModel(make_model("llama"), LoraConfig(targets=["embed_tokens", "q_proj"]))
    for lora, kept in ((saving_head, "lm_head"), (adapted_embedding, "embed_tokens")):
        plain = lora.model.get_input_embeddings() if kept == "lm_head" else lora.model.get_output_embeddings()
        assert frozen_embedding_weights(lora.model) == [plain.weight]
        store_embeddings_in(lora.model, torch.bfloat16)
        dtypes = {name: p.dtype for name, p in lora.model.named_parameters() if kept in name}
        assert dtypes and set(dtypes.values()) == {torch.float32}, dtypes


def test_releasing_the_checkpoint_map_keeps_values_and_ties(tiny_model_dir):
    from loraforge.memory import release_checkpoint_mapping
    from loraforge.models import load_model

    model, _ = load_model(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(ids).logits
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    release_checkpoint_mapping(model)
    assert all(p.data_ptr() != pointers[n] for n, p in model.named_parameters())  # every tensor owns new memory
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)


def test_the_fixed_mmap_threshold_gives_a_large_block_its_own_mapping():
    """After compact_cpu_allocator(LARGE_BLOCK_THRESHOLD) a tensor above it is mapped on its own (glibc's mallinfo2
    counts it in hblkhd) and unmapped when freed, whatever glibc's dynamic threshold had grown to; elsewhere the
    call is a no-op that says so."""
    from loraforge.hardware import LARGE_BLOCK_THRESHOLD, compact_cpu_allocator

    torch.empty(3 * LARGE_BLOCK_THRESHOLD, dtype=torch.uint8)  # freed at once: glibc's own threshold rises to its size
    glibc = platform.libc_ver()[0] == "glibc"
    assert compact_cpu_allocator(LARGE_BLOCK_THRESHOLD) == glibc
    if not glibc:
        return

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    block = torch.empty(2 * LARGE_BLOCK_THRESHOLD, dtype=torch.uint8)
    assert libc.mallinfo2().hblkhd - before >= block.numel()
    del block
    assert libc.mallinfo2().hblkhd == before


def _saved_bytes(fn) -> int:
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_swiglu_mlp_equals_the_separate_ops_and_keeps_less(arch):
    from conftest import make_inputs, make_model, perturb

    from loraforge import LoraModel
    from loraforge.lora.fused_mlp import fused_mlp_forward

    lora = LoraModel(make_model(arch), LoraConfig(r=4, alpha=8, targets="all-linear"))
    perturb(lora, "default")
    lora.train()
    mlps = [m for m in lora.model.modules() if type(m).__name__.endswith("MLP")]
    assert mlps and all(m.forward.func is fused_mlp_forward for m in mlps)
    inputs = make_inputs(arch)
    params = [p for p in lora.parameters() if p.requires_grad]

    def loss_and_grads():
        out, saved = _saved_bytes(lambda: lora(inputs).logits)
        grads = torch.autograd.grad(out.square().mean(), params)
        return out, grads, saved

    fused, fused_grads, fused_saved = loss_and_grads()
    calls = []
    for m in mlps:  # the class forward: LoRA linears one by one, silu and product by autograd
        m.forward = lambda x, m=m: calls.append(1) or type(m).forward(m, x)
    plain, plain_grads, plain_saved = loss_and_grads()
    assert len(calls) == len(mlps)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert fused_saved < plain_saved  # silu(gate) and the product are recomputed, not kept


def test_fused_mlp_falls_back_and_unload_restores_the_class_forward():
    from conftest import make_inputs, make_model, perturb

    from loraforge import LoraModel

    model = make_model("llama")
    base = model(make_inputs("llama")).logits
    lora = LoraModel(model, LoraConfig(r=4, alpha=8, targets="all-linear"))
    perturb(lora, "default")
    lora.add_adapter("second", LoraConfig(r=4, alpha=8, targets="all-linear"))
    perturb(lora, "second", seed=9)
    lora.set_active(["default", "second"])  # two adapters: the MLP takes the generic path
    both = lora(make_inputs("llama")).logits
    lora.set_active(["default"])
    one = lora(make_inputs("llama")).logits
    assert (both - one).abs().max() > 1e-4
    plain = lora.unload()
    assert all("forward" not in m.__dict__ for m in plain.modules())
    torch.testing.assert_close(plain(make_inputs("llama")).logits, base, atol=0, rtol=0)


def _resident_bytes_of(file: Path) -> int | None:
    """This process's resident bytes of its mappings of `file` (/proc/self/smaps), None where none is mapped."""
    total, inside, found = 0, False, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            inside = line.endswith(str(file))
            found = found or inside
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total if found else None


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_narrowing_a_mapped_checkpoint_drops_its_pages_and_keeps_every_value(tmp_path):
    """transformers maps an fp32 safetensors file and hands out views into it; narrowing a weight drops that
    weight's pages from the resident set (set-up held the whole file beside the narrowed copies), and the weights
    still viewing the file read the same values back."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loraforge.memory import narrow_in_place

    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    linears = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    originals = [w.detach().clone() for w in linears]  # reads every page of the linear weights
    kept = {name: p.detach().clone() for name, p in model.named_parameters() if "norm" in name or "embed" in name}
    checkpoint = tmp_path / "model.safetensors"
    before = _resident_bytes_of(checkpoint)
    assert before is not None, "transformers no longer maps the checkpoint: narrow_in_place's page dropping is moot"
    linear_bytes = sum(o.numel() * o.element_size() for o in originals)
    assert before >= linear_bytes
    for weight in linears:
        narrow_in_place(weight, torch.bfloat16)
    assert _resident_bytes_of(checkpoint) <= before - 0.95 * linear_bytes
    for weight, original in zip(linears, originals):
        assert weight.dtype == torch.bfloat16 and torch.equal(weight, original.to(torch.bfloat16))
    for name, p in model.named_parameters():
        if name in kept:
            assert torch.equal(p, kept[name]), name
