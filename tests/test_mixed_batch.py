"""Mixed-adapter batches: one forward where every row uses its own adapter (or none), in training too."""

from __future__ import annotations

import pytest
import torch

from conftest import CASES, make_inputs, make_model, perturb, run
from loraforge import AdapterError, LoraConfig, LoraModel
from loraforge.lora.layers import LoraLayer

ROWS = ["a", None, "b", "a"]
MIXABLE = [c for c in CASES if c.mixable]


def _two_adapters(case) -> LoraModel:
    lora = LoraModel(make_model(case.arch), case.config(), adapter_name="a")
    lora.add_adapter("b", case.config(r=2))  # a different rank: the stacked factors are zero-padded
    perturb(lora, "a", seed=1)
    perturb(lora, "b", seed=2)
    return lora


def _row_weights(out: torch.Tensor) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)


def _grads(lora: LoraModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", MIXABLE, ids=[c.id for c in MIXABLE])
def test_mixed_batch_equals_each_row_alone_outputs_and_gradients(case):
    lora = _two_adapters(case)
    inputs = make_inputs(case.arch, batch=len(ROWS))

    mixed = run(lora, inputs, adapter_names=ROWS)
    weights = _row_weights(mixed)
    (mixed * weights).sum().backward()
    mixed_grads = _grads(lora)
    lora.zero_grad(set_to_none=True)

    alone = []
    for i, name in enumerate(ROWS):
        lora.set_active([name] if name else [])
        out = run(lora, inputs[i : i + 1])
        if name:  # a base-model row has no trainable path, hence nothing to backpropagate
            (out * weights[i : i + 1]).sum().backward()
        alone.append(out)
    torch.testing.assert_close(mixed, torch.cat(alone), atol=1e-5, rtol=0)
    alone_grads = _grads(lora)
    assert mixed_grads.keys() == alone_grads.keys()
    assert any(".a." in k or k.endswith(".a") for k in mixed_grads) and any(".b." in k for k in mixed_grads)
    for key, expected in alone_grads.items():
        # fp32 sums in another order (batched vs single-row kernels): the error grows with the gradient's
        # magnitude (up to ~40 here); seen ≤ 5e-6 relative on CPU and ≤ 1.3e-5 on an H100.
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(mixed_grads[key], expected, atol=5e-5 * scale, rtol=0, msg=key)


def test_gradients_reach_only_the_adapters_of_the_batch():
    case = CASES[0]
    lora = _two_adapters(case)
    lora.add_adapter("c", case.config())
    perturb(lora, "c", seed=3)
    inputs = make_inputs(case.arch, batch=2)
    run(lora, inputs, adapter_names=["a", None]).sum().backward()
    touched = {n for n, p in lora.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(".a." in n for n in touched)


def test_mixed_batch_with_dropout_trains_and_keeps_base_rows_exact():
    lora = LoraModel(make_model("llama"), LoraConfig(r=4, targets="all-linear", dropout=0.5), adapter_name="a")
    perturb(lora, "a")
    inputs = make_inputs("llama", batch=2)
    with lora.disable_adapters():
        base = run(lora, inputs)
    lora.train()
    out = run(lora, inputs, adapter_names=[None, "a"])
    torch.testing.assert_close(out[0], base[0], atol=1e-5, rtol=0)  # dropout only touches adapter rows
    assert (out[1] - base[1]).abs().max() > 1e-3


def test_mixed_batch_generate_matches_per_adapter_generate():
    lora = _two_adapters(CASES[0])
    prompts = make_inputs("llama", batch=3)
    names = ["a", "b", None]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    together = lora.generate(prompts, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        lora.set_active([name] if name else [])
        assert torch.equal(lora.generate(prompts[i : i + 1], **kwargs)[0], together[i])


def test_expert_parameters_refuse_rows_with_different_adapters():
    case = next(c for c in CASES if not c.mixable)
    lora = _two_adapters(case)
    inputs = make_inputs(case.arch, batch=2)
    with pytest.raises(AdapterError, match="mixed-adapter batches are not supported"):
        run(lora, inputs, adapter_names=["a", "b"])
    # rows that agree are fine, and equal the plain active-adapter forward
    same = run(lora, inputs, adapter_names=["b", "b"])
    lora.set_active("b")
    torch.testing.assert_close(same, run(lora, inputs), atol=1e-5, rtol=0)


def test_row_count_mismatch_and_unknown_names_are_errors():
    lora = _two_adapters(CASES[0])
    with pytest.raises(AdapterError, match="names 2 rows but the input has 3"):
        run(lora, make_inputs("llama", batch=3), adapter_names=["a", "b"])
    with pytest.raises(AdapterError, match="unknown adapter"):
        run(lora, make_inputs("llama", batch=1), adapter_names=["zzz"])
    assert all(layer.row_adapters is None for _, layer in lora.lora_layers() if isinstance(layer, LoraLayer))


def test_inference_reuses_stacked_factors_until_an_adapter_changes():
    lora = LoraModel(make_model("llama"), CASES[0].config(), adapter_name="a")
    lora.add_adapter("b", CASES[0].config(r=2))
    perturb(lora, "a", seed=1)
    perturb(lora, "b", seed=2)
    inputs = make_inputs("llama", batch=2)
    with torch.no_grad():
        first = run(lora, inputs, adapter_names=["a", "b"])
        torch.testing.assert_close(run(lora, inputs, adapter_names=["a", "b"]), first, atol=0, rtol=0)
        perturb(lora, "b", seed=5)  # in-place change: the cache must notice
        changed = run(lora, inputs, adapter_names=["a", "b"])
        lora.set_active("b")
        torch.testing.assert_close(changed[1], run(lora, inputs[1:]).squeeze(0), atol=1e-5, rtol=0)
        lora.delete_adapter("b")
        lora.add_adapter("b", CASES[0].config(r=2))  # fresh: B = 0, so row 1 is the base again
        lora.set_active([])
        torch.testing.assert_close(run(lora, inputs, adapter_names=["a", "b"])[1], run(lora, inputs[1:])[0],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_training_under_gradient_checkpointing_equals_without(arch):
    """The recomputation inside backward() runs after the mixed-batch block has exited: it must route rows the same
    way, or every row's gradient goes through the base model."""
    from loraforge.models import enable_gradient_checkpointing

    results = []
    for checkpointed in (False, True):
        lora = LoraModel(make_model(arch), LoraConfig(r=4, targets="all-linear"), adapter_name="a")
        lora.add_adapter("b", LoraConfig(r=2, targets="all-linear"))
        lora.set_active(["a", "b"])
        for name in ("a", "b"):
            for param in (p for n, p in lora.named_parameters() if f".{name}." in n):
                param.requires_grad_(True)
        perturb(lora, "a", seed=1)
        perturb(lora, "b", seed=2)
        lora.train()
        if checkpointed:
            enable_gradient_checkpointing(lora.model)
        inputs = make_inputs(arch, batch=len(ROWS))
        out = lora(inputs, adapter_names=ROWS).logits
        (out * _row_weights(out)).sum().backward()
        results.append((out.detach(), _grads(lora)))
    (plain_out, plain_grads), (ckpt_out, ckpt_grads) = results
    torch.testing.assert_close(ckpt_out, plain_out)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    assert any(".b." in name for name in plain_grads)
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], msg=name)
