"""Quantized frozen bases (QLoRA, Dettmers et al. 2023); the only module that imports bitsandbytes, and it imports
nothing else of loraforge but its errors (the LoRA core and the application import it, not the other way round).

    quantize_model(model, "nf4")    # every nn.Linear but the output head -> 4-bit NF4 ("int8": LLM.int8())
    frozen_weight_bytes(model)      # what the frozen weights take, against the same weights in bf16

NF4 as in the QLoRA paper: 4-bit NormalFloat codes in blocks of 64 weights, each block's absmax itself
quantized to 8 bits in blocks of 256 (double quantization): about 4.13 bits per weight. The layer
dequantizes its weight and multiplies in the compute dtype; adapters stay fp32 (layers.adapter_dtype).
int8 is LLM.int8() (Dettmers et al. 2022): row-wise int8 weights, activation outliers above 6 in 16-bit.

A 4-bit weight cannot take an adapter in place: the quant-aware merge (dequantize, add ΔW, optionally re-quantize,
report) is merge.py.
"""

from __future__ import annotations

import ctypes
import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from loraforge.errors import AdapterError, ConfigError, QuantizationError
from loraforge.memory import forget_checkpoint_pages, release_checkpoint_mapping

logger = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "int8")
NF4_BLOCKSIZE = 64  # QLoRA's weight block; bitsandbytes quantizes the blocks' absmax in blocks of 256
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold (also transformers' default)


def _bnb():
    import bitsandbytes  # on first use only: importing it takes seconds and probes the hardware

    _route_misaligned_4bit_rows_to_the_reference_kernel(bitsandbytes)
    return bitsandbytes


# bitsandbytes quantizes a 4-bit weight in blocks of the FLAT tensor, but its AVX-512 CPU kernel for
# dequantize_4bit (csrc/cpu_ops.cpp, dequantizeBlockwise4bitCpu, through 0.50.2) reads each row's block scales at
# absmax[row * (width // blocksize) + col // blocksize], as if every row started a block. Rows whose width is a
# multiple of 16 but not of the block size (96, 160, 2880, …) then take other blocks' scales: a relative error of
# 0.27 instead of NF4's 0.09, on AVX-512 CPUs only (the kernel is registered when torch reports AVX512). Such
# shapes go to bitsandbytes' own reference kernel (the one every other CPU runs); aligned rows keep the fast one.
_native_4bit_dequantize = None


def _route_misaligned_4bit_rows_to_the_reference_kernel(bnb, force: bool = False) -> bool:
    """Install the routing once; `force` installs it on any CPU (tests). True when it is installed."""
    global _native_4bit_dequantize
    if _native_4bit_dequantize is not None:
        return True
    if not force and torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    from bitsandbytes.backends.cpu.ops import get_ptr, lib  # the native CPU library bitsandbytes loaded
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def native(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape, dtype) -> torch.Tensor:
        rows, width = math.prod(shape[:-1]), shape[-1]
        out = torch.empty(tuple(shape), dtype=dtype, device=A.device)
        scales = absmax.float().contiguous()  # bound to a name: the kernel reads it through a raw pointer
        suffix = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}")(
            get_ptr(A), get_ptr(scales), get_ptr(out), ctypes.c_longlong(blocksize), ctypes.c_longlong(rows),
            ctypes.c_longlong(width))
        return out

    def dequantize_4bit(A: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, shape,
                        dtype: torch.dtype) -> torch.Tensor:
        A = A.view(torch.uint8) if A.dtype != torch.uint8 else A
        shape = tuple(shape) if len(shape) > 1 else (1, shape[0])
        if shape[-1] % blocksize == 0 and blocksize < 2048:  # rows hold whole blocks: the kernel indexes right
            return native(A.contiguous(), absmax, blocksize, quant_type, shape, dtype)
        code = _get_4bit_code(quant_type, A.device)
        return _dequantize_4bit_compute(A.reshape(-1), absmax, code, blocksize, shape, dtype)

    with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore", UserWarning)
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
    _native_4bit_dequantize = native
    logger.info("bitsandbytes: 4-bit rows that do not hold whole blocks are dequantized by the reference kernel")
    return True


def compute_dtype_for(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA GPUs that have it, else fp32. On CPU a 4-bit layer computing in bf16 measured 34× slower
    than in fp32 (576→1536 forward + backward on 2 AVX2 cores: 1.03 s vs 0.030 s), like bf16 autocast there."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_quantized_linear(module: nn.Module) -> bool:
    if not any(isinstance(p, torch.Tensor) and not p.is_floating_point() for p in module.parameters(recurse=False)):
        return False  # float layers never need bitsandbytes imported
    bnb = _bnb()
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantizable(module: nn.Module, head: nn.Module | None) -> bool:
    """Whether quantize_model replaces this module: a plain nn.Linear that is not the output head."""
    # Subclasses are left alone: quantized layers already are, and MultiheadAttention's out_proj is used
    # through its .weight, which a packed weight would break.
    return type(module) is nn.Linear and module is not head


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output projection (kept in float by quantize_model), if it has one."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


# -- quantize ------------------------------------------------------------------------------------
def quantize_model(model: nn.Module, quant: str, device: str | torch.device = "cpu",
                   compute_dtype: torch.dtype | None = None) -> WeightBytes:
    """Replace every nn.Linear but the output head by its NF4 / int8 version, in place, one layer at a time
    on `device` (so only one layer's float weight is ever needed there). Embeddings, norms, biases and the
    head stay as loaded. Returns the frozen-weight sizes. Quantize before adding adapters."""
    if quant == "none":
        return frozen_weight_bytes(model)
    if quant not in QUANT_TYPES:
        raise ConfigError(f"quant: {quant!r} is not one of none, {', '.join(QUANT_TYPES)}")
    if any(_adapter_wrapper(m) for m in model.modules()):
        raise AdapterError("quantize the base model before adding adapters (its adapter factors are Linear too)")
    device = torch.device(device)
    compute_dtype = compute_dtype or compute_dtype_for(device)
    head = output_head(model)
    names = [name for name, module in model.named_modules() if quantizable(module, head)]
    if not names:
        raise ConfigError(f"quant={quant}: the model has no nn.Linear layer besides the output head to quantize "
                          "(GPT-2 style Conv1D layers are not supported)")
    for name in names:
        linear = model.get_submodule(name)
        layer = _quantized_linear(linear, quant, compute_dtype, device)
        check_round_trip(name, linear.weight.detach().to(device), layer)
        model.set_submodule(name, layer)
        forget_checkpoint_pages(linear.weight)  # else the float file stays resident until every layer is done
    if device.type == "cpu":
        release_checkpoint_mapping(model)
    sizes = frozen_weight_bytes(model)
    logger.info("quant=%s: %d linear layers; %s", quant, len(names), sizes.describe())
    return sizes


def _quantized_linear(linear: nn.Linear, quant: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    bnb = _bnb()
    has_bias = linear.bias is not None
    if quant == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=NF4_BLOCKSIZE,
                                         compress_statistics=True, quant_type="nf4", module=layer)
        # On AVX512-BF16 CPUs bitsandbytes repacks the weight at the first no-grad eval forward into an
        # inference-only layout whose matmul has no backward: training after a validation pass would lose the
        # gradient through every base layer.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                                    threshold=INT8_THRESHOLD, device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.to(device).train(linear.training)  # .to(device) is where bitsandbytes quantizes


def round_trip(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """Q(W): the weight (out, in) quantized exactly as quantize_model does it, then dequantized to fp32."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    layer = _quantized_linear(linear, quant, torch.float32, weight.device)
    return dequantized_weight(layer, layer.weight).float()


# -- the self-check -------------------------------------------------------------------------------
# NF4's 16 codes are normalized to [-1, 1]; the widest gap between neighbours (-1 to -0.6962) bounds the rounding
# of x / absmax at half of it. Elements are rounded against the block's exact absmax, but dequantized with the
# stored one (8-bit in double quantization), so each element's bound is 0.1520·absmax + |stored − exact absmax|.
NF4_HALF_GAP = 0.1520
# LLM.int8() rounds each row to absmax/127 steps (half a step) after casting the weight to fp16 (≤ 2⁻¹¹ of it).
INT8_HALF_STEP = 0.5
FP16_ROUNDING = 2.0**-11


def check_round_trip(name: str, weight: torch.Tensor, layer: nn.Module) -> float:
    """Compare a quantized layer's dequantized weight with the float `weight` it was made from, element by element,
    against the format's own bound; raise QuantizationError naming the layer and the figures when any element is
    off (a kernel that reads the wrong scales), never train on a silently worse base. Returns ‖Q(W) − W‖ / ‖W‖."""
    weight = weight.float()
    error = (dequantized_weight(layer, layer.weight).float() - weight).abs()
    bound = _elementwise_bound(layer, weight)
    relative = float(error.norm() / weight.norm().clamp_min(1e-30))
    worst = float((error / bound.clamp_min(1e-30)).max()) if error.numel() else 0.0
    if worst > 1.0 + 1e-3:  # fp32 rounding of the products leaves ~1e-7 of slack
        off = int((error > bound * (1.0 + 1e-3)).sum())
        fmt = "NF4" if isinstance(layer.weight, _bnb().nn.Params4bit) else "int8"
        raise QuantizationError(
            f"{name}: the {fmt} round trip is off: relative error {relative:.3f} of ‖W‖ (NF4 on Gaussian weights: "
            f"0.09; int8: < 0.01), {off} of {error.numel()} elements beyond the format's bound, the worst "
            f"{worst:.1f}× it (weight {tuple(weight.shape)}, bitsandbytes {_bnb().__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}). This bitsandbytes build dequantizes this shape wrongly "
            "here; use quant=none, or another bitsandbytes version.")
    return relative


def _elementwise_bound(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    bnb = _bnb()
    if isinstance(layer.weight, bnb.nn.Params4bit):
        state = layer.weight.quant_state
        stored = state.absmax
        if state.nested:
            stored = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        blocksize = state.blocksize
        flat = weight.reshape(-1).abs()
        exact = torch.nn.functional.pad(flat, (0, (-flat.numel()) % blocksize)).view(-1, blocksize).amax(1)
        per_block = NF4_HALF_GAP * exact + (stored.float().reshape(-1)[: exact.numel()] - exact).abs()
        return per_block.repeat_interleave(blocksize)[: flat.numel()].view_as(weight)
    step = weight.abs().amax(1, keepdim=True) / 127
    return INT8_HALF_STEP * step + FP16_ROUNDING * weight.abs() + 1e-12


# -- dequantize ----------------------------------------------------------------------------------
def dequantized_weight(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A module's weight as a float tensor (out, in): unchanged when it already is one, dequantized when 4/8-bit."""
    if weight.is_floating_point():
        return weight
    bnb = _bnb()
    if isinstance(weight, bnb.nn.Params4bit):
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            raise AdapterError(f"{type(module).__name__}: bitsandbytes repacked this 4-bit weight for CPU inference "
                               "and cannot unpack it exactly; quantize the base with loraforge.quant.quantize_model")
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if weight.dtype == torch.int8:
        # The row scales move from the weight to the layer's matmul state at the first forward.
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        if scales is not None:
            return bnb.functional.int8_vectorwise_dequant(weight.data, scales)
    raise AdapterError(f"cannot dequantize the {weight.dtype} weight of a {type(module).__name__}")


def dequantize_model(model: nn.Module) -> int:
    """Replace every 4/8-bit linear layer (adapted ones too) by an fp32 nn.Linear holding its dequantized
    weight, in place; returns how many were replaced."""
    names = [name for name, module in model.named_modules() if is_quantized_linear(module)]
    for name in names:
        layer = model.get_submodule(name)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(dequantized_weight(layer, layer.weight).float(), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        model.set_submodule(name, linear.train(layer.training))
    return len(names)


def model_quant(model: nn.Module) -> str:
    """"nf4", "int8" or "none": how the model's linear layers are stored."""
    for module in model.modules():
        if is_quantized_linear(module):
            return "nf4" if isinstance(module.weight, _bnb().nn.Params4bit) else "int8"
    return "none"


# -- sizes ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightBytes:
    """Bytes of a model's frozen tensors as stored, and of the same tensors in bf16."""

    quantized: int  # quantized weights with their statistics (absmax, scales, code tables)
    quantized_bf16: int
    other: int  # every other frozen tensor (embeddings, norms, head, biases) as stored
    other_bf16: int

    @property
    def ratio(self) -> float:
        """Quantized weights against the same weights in bf16 (QLoRA's NF4: about 0.26)."""
        return self.quantized / self.quantized_bf16 if self.quantized_bf16 else 1.0

    @property
    def total_ratio(self) -> float:
        """All frozen weights against the whole frozen model in bf16."""
        return (self.quantized + self.other) / max(self.quantized_bf16 + self.other_bf16, 1)

    def describe(self) -> str:
        mb = 2**20
        return (f"frozen weights {(self.quantized + self.other) / mb:.1f} MB = {self.total_ratio:.2f}× the model in "
                f"bf16 ({(self.quantized_bf16 + self.other_bf16) / mb:.1f} MB); quantized layers "
                f"{self.quantized / mb:.1f} MB = {self.ratio:.2f}× bf16, other tensors {self.other / mb:.1f} MB")


def frozen_weight_bytes(model: nn.Module) -> WeightBytes:
    """Sizes of the base model's parameters (tied ones once), with or without adapters attached: LoRA factors
    and modules_to_save copies are not counted."""
    quantized = quantized_bf16 = other = other_bf16 = 0
    seen: set[int] = set()
    for module in _base_modules(model):
        quantized_layer = is_quantized_linear(module)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if quantized_layer and name == "weight":
                quantized += sum(t.numel() * t.element_size() for t in _quantized_tensors(module))
                quantized_bf16 += 2 * module.in_features * module.out_features
            else:
                other += param.numel() * param.element_size()
                other_bf16 += 2 * param.numel()
    return WeightBytes(quantized, quantized_bf16, other, other_bf16)


def _adapter_wrapper(module: nn.Module) -> str | None:
    """Which part of a LoRA wrapper holds the base module ("base_layer" of a LoraLayer, "original_module" of a
    ModulesToSave), None for other modules. By attribute, so that this module needs none of the LoRA code."""
    if hasattr(module, "ranks") and isinstance(getattr(module, "base_layer", None), nn.Module):
        return "base_layer"
    if hasattr(module, "modules_to_save") and isinstance(getattr(module, "original_module", None), nn.Module):
        return "original_module"
    return None


def _base_modules(module: nn.Module) -> Iterator[nn.Module]:
    yield module
    held = _adapter_wrapper(module)
    children = [getattr(module, held)] if held else list(module.children())
    for child in children:
        yield from _base_modules(child)


def _quantized_tensors(layer: nn.Module) -> list[torch.Tensor]:
    weight = layer.weight
    if isinstance(weight, _bnb().nn.Params4bit):
        state = weight.quant_state
        nested = [state.state2.absmax, state.state2.code] if state.nested else []
        return [weight.data, state.absmax, state.code, *nested]
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return [weight.data, scales]
