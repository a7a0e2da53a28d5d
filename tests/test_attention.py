"""The short-row attention (loraforge/attention.py) computes what transformers' sdpa computes — values and
gradients, grouped-query heads, padding, a cached prefix, under autocast — keeps less for backward, and hands
every case where it would not pay back to sdpa."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from loraforge import LoraConfig, LoraModel, attention
from loraforge.attention import NAME, short_row_attention_forward, use_short_row_attention


def _qkv(batch=3, heads=6, kv_heads=2, q_len=9, k_len=13, dim=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h, t: torch.randn(batch, h, t, dim, generator=generator).to(dtype).requires_grad_()  # noqa: E731
    return make(heads, q_len), make(kv_heads, k_len), make(kv_heads, k_len)


def _padded_mask(batch, q_len, k_len):
    """Causal over the last q_len of k_len positions (a cached prefix before them), row 0 right-padded."""
    mask = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)[None, None].repeat(batch, 1, 1, 1)
    mask[0, :, :, -3:] = False
    return mask


def _count_explicit_calls(monkeypatch) -> list:
    """A list that gets an entry each time the explicit path runs."""
    taken = []
    original = attention._ShortRowAttention.apply
    monkeypatch.setattr(attention._ShortRowAttention, "apply", lambda *a: taken.append(1) or original(*a))
    return taken


def _module(groups):
    return types.SimpleNamespace(num_key_value_groups=groups, is_causal=True)


def _values_and_grads(forward, q, k, v, mask, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, _ = forward(_module(q.shape[1] // k.shape[1]), q, k, v, mask, scaling=q.shape[-1] ** -0.5)
    out.backward(grad)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("mask_kind", ["padded, cached prefix", "causal, none given", "float bias"])
def test_equals_sdpa_in_values_and_gradients(mask_kind, monkeypatch):
    q_len, k_len = (9, 13) if mask_kind == "padded, cached prefix" else (9, 9)
    q, k, v = _qkv(q_len=q_len, k_len=k_len)
    mask = None if mask_kind == "causal, none given" else _padded_mask(3, q_len, k_len)
    if mask_kind == "float bias":
        mask = torch.zeros(mask.shape).masked_fill(~mask, -1e4) + torch.randn(mask.shape)
    grad = torch.randn(3, q_len, 6, 8)
    taken = _count_explicit_calls(monkeypatch)
    ours = _values_and_grads(short_row_attention_forward, q, k, v, mask, grad)
    theirs = _values_and_grads(sdpa_attention_forward, q, k, v, mask, grad)
    assert taken == [1]
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_under_bf16_autocast_it_is_as_close_to_exact_as_sdpa():
    """Inputs cast to bf16 as autocast casts sdpa's; scores and softmax in fp32. Measured against float64."""
    q, k, v = _qkv(batch=4, heads=9, kv_heads=3, q_len=20, k_len=30, dim=16, dtype=torch.bfloat16)
    mask = _padded_mask(4, 20, 30)
    grad = torch.randn(4, 20, 9, 16).bfloat16()
    exact = [t.detach() for t in _values_and_grads(sdpa_attention_forward, *(t.double() for t in (q, k, v)), mask,
                                                    grad.double())]
    errors = {}
    for name, forward in (("ours", short_row_attention_forward), ("sdpa", sdpa_attention_forward)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = [t.detach() for t in _values_and_grads(forward, q, k, v, mask, grad)]
        assert got[0].dtype == torch.bfloat16
        errors[name] = max(float((g.double() - e).abs().max() / e.abs().max()) for g, e in zip(got, exact))
    assert errors["ours"] < 1e-2
    assert errors["ours"] <= 1.5 * errors["sdpa"]


def test_keeps_no_repeated_keys_and_values_for_backward():
    q, k, v = _qkv(batch=4, heads=12, kv_heads=2, q_len=16, k_len=16, dim=16)
    mask = _padded_mask(4, 16, 16)

    def saved_bytes(forward):
        storages = {}

        def keep(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            forward(_module(6), q, k, v, mask)
        return sum(storages.values())

    kv_repeated = 2 * 4 * 12 * 16 * 16 * 4  # sdpa's K and V at every query head, fp32
    assert saved_bytes(short_row_attention_forward) < saved_bytes(sdpa_attention_forward) - kv_repeated // 2


@pytest.mark.parametrize("case", ["no gradients", "long rows", "dropout", "soft-capping"])
def test_hands_back_to_sdpa_where_it_would_not_pay(case, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward", lambda *a, **kw: calls.append(kw) or (None, None))
    q_len = 128 if case == "long rows" else 9
    q, k, v = _qkv(q_len=q_len, k_len=q_len)
    kwargs = {"dropout": 0.1} if case == "dropout" else {"softcap": 30.0} if case == "soft-capping" else {}
    with torch.set_grad_enabled(case != "no gradients"):
        short_row_attention_forward(_module(3), q, k, v, None, **kwargs)
    assert len(calls) == 1
    assert q_len * q_len > attention.SHORT_ROW_SCORES or case != "long rows"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mixtral"])
def test_a_model_switched_to_it_trains_as_with_sdpa(arch, monkeypatch):
    """Logits and every adapter gradient of a padded batch, before and after the switch (fp32)."""
    from conftest import make_inputs, make_model, perturb

    lora = LoraModel(make_model(arch), LoraConfig(r=4, alpha=8, targets="all-linear"))
    perturb(lora, "default")
    lora.train()
    for module in lora.modules():  # GPT-2's dropout would make the two passes differ (and sends attention to sdpa)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    inputs = make_inputs(arch, batch=3)
    padding = torch.ones_like(inputs)
    padding[0, -2:] = 0
    params = [p for p in lora.parameters() if p.requires_grad]

    def logits_and_grads():
        logits = lora(input_ids=inputs, attention_mask=padding).logits
        return logits, torch.autograd.grad((logits * padding[..., None]).square().mean(), params)

    plain = logits_and_grads()
    assert use_short_row_attention(lora.model) and lora.model.config._attn_implementation == NAME
    taken = _count_explicit_calls(monkeypatch)
    switched = logits_and_grads()
    assert len(taken) == lora.model.config.get_text_config().num_hidden_layers
    real = padding.bool()
    torch.testing.assert_close(switched[0][real], plain[0][real], atol=1e-5, rtol=1e-5)
    for got, want in zip(switched[1], plain[1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_training_switches_sdpa_models_only(tmp_path):
    from conftest import make_model

    from loraforge.config import TrainConfig
    from loraforge.train.trainee import build_trainee

    model = make_model("llama")
    build_trainee(TrainConfig(lora={"targets": "all-linear"}), model, None, 1, None, lambda line: None)
    assert model.config._attn_implementation == NAME
    eager = make_model("llama")
    eager.set_attn_implementation("eager")
    assert not use_short_row_attention(eager) and eager.config._attn_implementation == "eager"
    model.save_pretrained(tmp_path)  # the name is the run's, never the checkpoint's
    assert NAME not in (tmp_path / "config.json").read_text()
