"""RMSNorm keeping its bf16 output in training (rms_norm.py) against transformers' own forward and backward."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import DEVICE, make_inputs, make_model, perturb

from loraforge import LoraConfig, LoraModel
from loraforge.rms_norm import RMS_NORMS, keep_rms_norm_outputs, rms_norm_forward


def _autocast(enabled: bool = True):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=enabled)


def _norm(class_path: tuple[str, str], hidden: int = 48) -> torch.nn.Module:
    module_name, class_name = class_path
    norm = getattr(importlib.import_module(module_name), class_name)(hidden, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(-1.5, 1.5)  # negative and small weights too: y / w must recover the input
    return norm.requires_grad_(False)


def _residual(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 11, 48, generator=generator) * 4).to(DEVICE)


@pytest.mark.parametrize("model_type", sorted(RMS_NORMS))
def test_output_is_the_bf16_cast_of_transformers_output_bit_for_bit(model_type):
    norm = _norm(RMS_NORMS[model_type])
    assert keep_rms_norm_outputs(norm) == 1
    x = _residual().requires_grad_(True)
    with _autocast():
        got = norm(x)
        want = type(norm).forward(norm, x)
    assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
    assert torch.equal(got, want.to(torch.bfloat16))


def test_input_gradient_is_as_accurate_as_the_bf16_gradient_it_is_given():
    norm = _norm(RMS_NORMS["llama"])
    keep_rms_norm_outputs(norm)
    x = _residual()
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
    ours = x.clone().requires_grad_(True)
    with _autocast():
        norm(ours).backward(grad_out)
    theirs = x.clone().requires_grad_(True)
    with _autocast():
        type(norm).forward(norm, theirs).backward(grad_out.float())
    exact = x.double().requires_grad_(True)
    inverse_rms = torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    (norm.weight.double() * exact * inverse_rms).backward(grad_out.double())

    def error(grad: torch.Tensor) -> float:
        return float((grad.double() - exact.grad).norm() / exact.grad.norm())

    # Recovering x / rms(x) from the bf16 output costs bf16's rounding (2⁻⁸ relative) at most, and averages below.
    assert error(theirs.grad) < 1e-5
    assert error(ours.grad) < 2**-9


def test_a_lora_model_keeps_no_fp32_norm_input_and_trains_as_before():
    """On a tiny Llama under bf16 autocast: no (tokens × hidden) fp32 tensor is kept for backward any more, fewer
    bytes are kept, and the loss and the adapter's gradients are what transformers' norms give, to bf16 accuracy."""
    lora = LoraModel(make_model("llama"), LoraConfig(r=4, alpha=8, targets="all-linear"))
    perturb(lora, "default")
    lora.train()
    inputs = make_inputs("llama")
    params = [p for p in lora.parameters() if p.requires_grad]
    hidden = lora.model.config.hidden_size

    def step():
        kept: dict[int, torch.Tensor] = {}

        def pack(tensor):
            kept[tensor.untyped_storage().data_ptr()] = tensor
            return tensor

        with _autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = lora(inputs).logits.float().square().mean()
        wide = [t for t in kept.values() if t.dtype == torch.float32 and t.shape[-1] == hidden and t.dim() == 3]
        nbytes = sum(t.untyped_storage().nbytes() for t in kept.values() if not isinstance(t, torch.nn.Parameter))
        return loss, torch.autograd.grad(loss, params), wide, nbytes

    plain_loss, plain_grads, plain_wide, plain_bytes = step()
    assert keep_rms_norm_outputs(lora.model) == 2 * 2 + 1  # two a layer and the final one
    loss, grads, wide, nbytes = step()
    assert plain_wide and not wide
    assert nbytes < plain_bytes - len(plain_wide) * inputs.numel() * hidden * 2
    assert loss == plain_loss  # the forward is the same bits
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))


def test_everything_else_is_the_class_forward():
    norm = _norm(RMS_NORMS["qwen2"])
    keep_rms_norm_outputs(norm)
    x = _residual().requires_grad_(True)

    def class_forward(inputs: torch.Tensor) -> bool:
        out = norm(inputs)
        return torch.equal(out, type(norm).forward(norm, inputs)) and "KeepingOutput" not in type(out.grad_fn).__name__

    with _autocast():
        assert not class_forward(x)  # (the one case this module is for)
        assert class_forward(x.detach())  # no gradient to give (below the first adapted layer)
        assert class_forward(x.bfloat16())  # a bf16 stream (Qwen3's q/k norms): its input is no wider than y
    assert class_forward(x)  # no autocast: fp32 training
    with _autocast(), torch.no_grad():
        assert class_forward(x)  # scoring and generation
    trained = _norm(RMS_NORMS["llama"]).requires_grad_(True)  # full fine-tuning trains the weight
    with_zero = _norm(RMS_NORMS["llama"])
    with torch.no_grad():
        with_zero.weight[5] = 0  # its channel's input could not be recovered from the output
    assert keep_rms_norm_outputs(trained) == 0 and keep_rms_norm_outputs(with_zero) == 0
    gemma_like = torch.nn.LayerNorm(48)  # not in the table
    assert keep_rms_norm_outputs(gemma_like) == 0
    assert "forward" not in trained.__dict__ and "forward" not in with_zero.__dict__


def test_training_keeps_norm_outputs_for_adapters_only(tiny_model_dir):
    from loraforge.config import TrainConfig
    from loraforge.models import load_model
    from loraforge.train.trainee import build_trainee

    for finetune, installed in (("lora", True), ("full", False)):
        model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
        build_trainee(TrainConfig(model=str(tiny_model_dir), finetune=finetune), model, tokenizer, 1, None,
                      say=lambda line: None)
        norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        assert norms and all((getattr(m.forward, "func", None) is rms_norm_forward) == installed for m in norms)
