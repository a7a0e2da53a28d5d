"""What LoHa (loha.py) and LoKr (lokr.py) share, the LyCORIS family's layer: both build a full ΔW in the base
weight's layout and apply it as the base layer would (its linear map or its convolution), and both train with
PEFT's two dropouts: rank dropout zeroes whole output rows of ΔW, module dropout skips the whole update for a
step. Also their adapter_config.json keys and the Tucker form of a convolution kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.config import LoraConfig, LycorisOptions
from loraforge.errors import AdapterError
from loraforge.lora.layers import LoraLayer, RowAdapters, adapter_dtype


def tucker(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor) -> torch.Tensor:
    """A (out, in, kh, kw) kernel from an (r, r, kh, kw) core and (r, out), (r, in) factors (LyCORIS' Tucker conv)."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, out_factor, in_factor)


class LycorisLayer(LoraLayer):
    """A frozen nn.Linear / nn.Conv2d plus adapters whose update is a full weight: h = base(x) + s·op(x; ΔW).

    Subclasses name their tensors (`tensor_names`, PEFT's names, one ParameterDict each), create them in
    `_create_update` and build the unscaled ΔW in `unscaled_delta`."""

    method_name = ""
    tensor_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            # PEFT 0.21 has no LoHa/LoKr for GPT-2's Conv1D or Embedding either: such a file would load nowhere else.
            raise AdapterError(f"method={self.method_name} supports Linear and Conv2d layers (as PEFT), not "
                               f"{type(base_layer).__name__}; narrow the targets, or use method=lora")
        if isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
            raise AdapterError(f"method={self.method_name} needs Conv2d padding_mode='zeros' (as PEFT); this layer "
                               f"pads with {base_layer.padding_mode!r}")
        for tensor_name in self.tensor_names:
            setattr(self, tensor_name, nn.ParameterDict())
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rescale_rank_dropout: dict[str, bool] = {}

    # -- what each method provides -------------------------------------------------------------
    def _create_update(self, name: str, r: int, options: LycorisOptions) -> None:
        raise NotImplementedError

    def unscaled_delta(self, name: str) -> torch.Tensor:
        """ΔW / s in the dense base weight's layout."""
        raise NotImplementedError

    def _rescales_rank_dropout(self, options: LycorisOptions) -> bool:
        return options.rank_dropout_scale

    # -- shared ----------------------------------------------------------------------------------
    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The dense base weight's shape: (out, in) or (out, in/groups, kh, kw); a 4-bit weight is stored packed."""
        base = self.base_layer
        if isinstance(base, nn.Conv2d):
            return (base.out_channels, base.in_channels // base.groups, *base.kernel_size)
        return (base.out_features, base.in_features)

    def _uses_tucker_core(self, options: LycorisOptions) -> bool:
        # A 1×1 kernel is a plain matrix product, for which the flattened factors are the same and cheaper (PEFT).
        return options.use_effective_conv2d and len(self.weight_shape) == 4 and self.weight_shape[2:] != (1, 1)

    def _create_factors(self, name: str, r: int, config: LoraConfig) -> None:
        options = config.lycoris
        self.rank_dropout[name] = options.rank_dropout
        self.module_dropout[name] = options.module_dropout
        self.rescale_rank_dropout[name] = self._rescales_rank_dropout(options)
        self._create_update(name, r, options)

    def _new_tensor(self, tensor_name: str, name: str, shape: tuple[int, ...]) -> None:
        tensor = torch.empty(shape, device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))  # PEFT's (and nn.Linear's) init for every factor
        getattr(self, tensor_name)[name] = nn.Parameter(tensor)

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        stores = {t: getattr(self, t) for t in self.tensor_names}
        return {t: store[name] for t, store in stores.items() if name in store}

    def delta_weight(self, name: str) -> torch.Tensor:
        return self.unscaled_delta(name) * self.scaling[name]

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight = self.unscaled_delta(name)
        if self.training and self.rank_dropout[name]:
            weight = weight * self._rank_dropout_mask(weight, name)
        # Under autocast F.linear / F.conv2d cast both operands themselves; an fp32 copy of x would be wasted.
        return self._apply(x if torch.is_autocast_enabled(x.device.type) else x.to(weight.dtype), weight)

    def draws_random_numbers(self) -> bool:
        return self.training and bool(self.active_adapters)  # module dropout draws even at p = 0 (below)

    # Both dropouts draw from the CPU generator exactly as PEFT does (a draw per layer and step even when
    # module_dropout is 0), so a seeded training step drops the same rows and modules in both.
    def _rank_dropout_mask(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        # LyCORIS' "rank" dropout keeps or drops whole output rows of ΔW; the optional rescale divides by the
        # kept fraction (guarded: PEFT divides 0 by 0 when every row is dropped).
        keep = (torch.rand(weight.shape[0]) > self.rank_dropout[name]).to(weight.device, weight.dtype)
        if self.rescale_rank_dropout[name]:
            keep = keep / keep.mean().clamp_min(1.0 / keep.numel())
        return keep.view(-1, *[1] * (weight.dim() - 1))

    def _skips_update(self, name: str) -> bool:
        # Module dropout: PEFT keeps the update when rand > p, and does not rescale it.
        return self.training and float(torch.rand(1)) <= self.module_dropout[name]

    def _apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, nn.Conv2d):
            return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
        return F.linear(x, weight)

    def _add_update(self, result: torch.Tensor, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        return result if self._skips_update(name) else super()._add_update(result, x, name, base_out)

    # -- mixed batches: each group of rows runs its own adapter's ΔW --------------------------------
    # A full ΔW per adapter does not stack into LoRA's batched A/B products.
    def _mixed_update(self, x: torch.Tensor, plan: RowAdapters) -> torch.Tensor | None:
        if not any(n in self.ranks for n in plan.names):
            return None
        self._check_rows(x, plan)
        out = None
        for index, name in enumerate(plan.names, start=1):
            picked = (plan.rows == index).nonzero().squeeze(1)
            if name not in self.ranks or picked.numel() == 0 or self._skips_update(name):
                continue
            term = self.scaling[name] * self._adapter_output(x[picked], name)
            if out is None:
                out = term.new_zeros(x.shape[:1] + term.shape[1:])
            out = out.index_copy(0, picked, term)
        return out


# -- adapter_config.json ------------------------------------------------------------------------------
def lycoris_to_peft(config: LoraConfig, keys: tuple[str, ...]) -> dict:
    options = config.lycoris.model_dump()
    return {"alpha": config.alpha, **{key: options[key] for key in keys}}


def lycoris_from_peft(raw: dict, keys: tuple[str, ...]) -> dict:
    return {"alpha": raw.get("alpha", 8), "lycoris": {key: raw[key] for key in keys if key in raw}}  # PEFT: alpha=8
