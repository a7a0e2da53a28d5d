"""LoKr: ΔW = s · W1 ⊗ W2 (Kronecker product), s = alpha/r (Yeh et al. 2024, "LyCORIS"; PEFT 0.21's LoKr).

Both sides of the weight are split into two factors, out = l·k and in = m·n (`factorization`), so W1 is
(l × m) and W2 is (k × n) — or (k × n × kh × kw) on a Conv2d, W2 carrying the kernel. A factor becomes a
rank-r product (`lokr_w*_a` · `lokr_w*_b`) only where r is below half its larger side (W1 only with
`decompose_both`); a decomposed W2 on a k×k Conv2d with `use_effective_conv2d` is a Tucker form with an
r×r×kh×kw core (`lokr_t2`). W1 (or W1a) starts at zero, so a fresh adapter changes nothing
(init_weights=True); init_weights='lycoris' zeroes W2 (or W2b) instead, as the LyCORIS repository.
The layer plumbing (dropouts, applying ΔW, mixed batches) is shared with LoHa: lycoris.LycorisLayer.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from loraforge.config import LycorisOptions
from loraforge.lora.lycoris import LycorisLayer, lycoris_from_peft, lycoris_to_peft, tucker
from loraforge.lora.methods import Method


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into the two Kronecker sides, by LyCORIS' rule (which PEFT copies):
    `factor` itself when it divides `dimension` (returned first), else the divisor pair closest to square
    whose smaller side stays ≤ factor (-1: no bound), smaller side first. 256 → (16, 16), 128 → (8, 16),
    127 → (1, 127), (128, 4) → (4, 32)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    for divisor in range(2, dimension + 1):
        if dimension % divisor:
            continue
        if divisor > bound:
            break
        m = divisor
        if divisor * divisor >= dimension:
            break
    return min(m, dimension // m), max(m, dimension // m)


class LoKrLayer(LycorisLayer):
    """nn.Linear or nn.Conv2d with LoKr adapters: h = base(x) + s·op(x; W1 ⊗ W2)."""

    method_name = "lokr"
    tensor_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def _create_update(self, name: str, r: int, options: LycorisOptions) -> None:
        out, fan_in, *kernel = self.weight_shape
        out_l, out_k = factorization(out, options.decompose_factor)
        in_m, in_n = factorization(fan_in, options.decompose_factor)
        if options.decompose_both and r < max(out_l, in_m) / 2:
            self._new_tensor("lokr_w1_a", name, (out_l, r))
            self._new_tensor("lokr_w1_b", name, (r, in_m))
        else:
            self._new_tensor("lokr_w1", name, (out_l, in_m))
        if r >= max(out_k, in_n) / 2:
            self._new_tensor("lokr_w2", name, (out_k, in_n, *kernel))
        elif self._uses_tucker_core(options):
            self._new_tensor("lokr_t2", name, (r, r, *kernel))
            self._new_tensor("lokr_w2_a", name, (r, out_k))
            self._new_tensor("lokr_w2_b", name, (r, in_n))
        else:
            self._new_tensor("lokr_w2_a", name, (out_k, r))
            self._new_tensor("lokr_w2_b", name, (r, in_n * math.prod(kernel)))
        if options.init_weights == "lycoris":
            nn.init.zeros_((self.lokr_w2 if name in self.lokr_w2 else self.lokr_w2_b)[name])
        elif options.init_weights:
            nn.init.zeros_((self.lokr_w1 if name in self.lokr_w1 else self.lokr_w1_a)[name])

    def unscaled_delta(self, name: str) -> torch.Tensor:
        w1 = self.lokr_w1[name] if name in self.lokr_w1 else self.lokr_w1_a[name] @ self.lokr_w1_b[name]
        if name in self.lokr_w2:
            w2 = self.lokr_w2[name]
        elif name in self.lokr_t2:
            w2 = tucker(self.lokr_t2[name], self.lokr_w2_a[name], self.lokr_w2_b[name])
        else:
            w2 = self.lokr_w2_a[name] @ self.lokr_w2_b[name]
        # W1 ⊗ (W2 flattened to k × n·kh·kw), reshaped, is the (out, in, kh, kw) kernel PEFT builds with a 4-D kron.
        return torch.kron(w1, w2.reshape(w2.shape[0], -1)).reshape(self.weight_shape)


LOKR_KEYS = ("rank_dropout", "module_dropout", "init_weights", "use_effective_conv2d", "decompose_both",
             "decompose_factor", "rank_dropout_scale")

METHOD = Method("lokr", "LOKR", LoKrLayer, partial(lycoris_to_peft, keys=LOKR_KEYS),
                partial(lycoris_from_peft, keys=LOKR_KEYS))
