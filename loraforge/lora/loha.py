"""LoHa: ΔW = s · (W1a·W1b) ⊙ (W2a·W2b), s = alpha/r (Hyeon-Woo et al. 2022, "FedPara"; LyCORIS).

The Hadamard product of two rank-r products reaches rank up to r² for the parameters of two rank-r LoRAs.
W1a, W1b and W2a start Kaiming-uniform and W2b at zero, so a fresh adapter changes nothing (PEFT's
init_weights=True). On a k×k Conv2d with `use_effective_conv2d`, each product is a Tucker form with an
r×r×k×k core (`hada_t1`, `hada_t2`); otherwise the kernel is flattened into the input side.

The layer plumbing it shares with LoKr (a full ΔW applied as the base layer would, PEFT's two dropouts) is
lycoris.py. Tensor names and shapes are PEFT 0.21's (peft/tuners/loha/layer.py), so files load both ways.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraforge.config import LycorisOptions
from loraforge.errors import AdapterError
from loraforge.lora.lycoris import LycorisLayer, lycoris_from_peft, lycoris_to_peft, tucker
from loraforge.lora.methods import Method


class LoHaLayer(LycorisLayer):
    """nn.Linear or nn.Conv2d with LoHa adapters: h = base(x) + s·op(x; (W1a·W1b) ⊙ (W2a·W2b))."""

    method_name = "loha"
    tensor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def _rescales_rank_dropout(self, options: LycorisOptions) -> bool:
        return True  # PEFT's LoHa always divides by the kept fraction (it has no rank_dropout_scale)

    def _create_update(self, name: str, r: int, options: LycorisOptions) -> None:
        if options.init_weights == "lycoris":
            raise AdapterError("lycoris.init_weights='lycoris' is a LoKr option; LoHa takes true or false")
        out, fan_in, *kernel = self.weight_shape
        for i in (1, 2):
            if self._uses_tucker_core(options):
                self._new_tensor(f"hada_t{i}", name, (r, r, *kernel))
                self._new_tensor(f"hada_w{i}_a", name, (r, out))
                self._new_tensor(f"hada_w{i}_b", name, (r, fan_in))
            else:
                self._new_tensor(f"hada_w{i}_a", name, (out, r))
                self._new_tensor(f"hada_w{i}_b", name, (r, fan_in * math.prod(kernel)))
        if options.init_weights:
            nn.init.zeros_(self.hada_w2_b[name])

    def unscaled_delta(self, name: str) -> torch.Tensor:
        if torch.is_grad_enabled():
            # Autograd would keep both (out × in) products for backward; recomputing them there instead (as PEFT's
            # HadaWeight does) keeps only the small factors: a third of the memory per adapted layer.
            return checkpoint(self._hadamard, name, use_reentrant=False)
        return self._hadamard(name)

    def _hadamard(self, name: str) -> torch.Tensor:
        return (self._product(name, 1) * self._product(name, 2)).reshape(self.weight_shape)

    def _product(self, name: str, i: int) -> torch.Tensor:
        a, b = getattr(self, f"hada_w{i}_a")[name], getattr(self, f"hada_w{i}_b")[name]
        cores = getattr(self, f"hada_t{i}")
        return tucker(cores[name], a, b) if name in cores else a @ b


LOHA_KEYS = ("rank_dropout", "module_dropout", "init_weights", "use_effective_conv2d")

METHOD = Method("loha", "LOHA", LoHaLayer, partial(lycoris_to_peft, keys=LOHA_KEYS),
                partial(lycoris_from_peft, keys=LOHA_KEYS))
