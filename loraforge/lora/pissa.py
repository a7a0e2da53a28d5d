"""PiSSA (Meng et al. 2024): start the adapter on W0's principal components instead of at zero.

W0 = U·S·Vᵀ; with the top r singular triplets, A = √(S_r/s)·V_rᵀ and B = U_r·√(S_r/s), so s·B·A is the
best rank-r approximation of W0, and the frozen weight keeps the residual W0 − s·B·A. The model's output is
unchanged at step 0, but training moves the directions that matter most. `pissa_niter_N` uses a randomized
SVD with N power iterations (Halko et al.), minutes faster on large layers at a tiny loss of precision.

Files: a PiSSA adapter only makes sense next to its residual base. So that it applies to the ORIGINAL base
(and loads in PEFT and any LoRA tool), the saved adapter is converted to plain LoRA with rank 2r:
ΔW = s·B·A − s·B₀·A₀ = s'·[B, −B₀]·[A; A₀] with s' = s (PEFT's path_initial_model_for_weight_conversion).
Checkpoints keep the live rank-r factors (train/trainee.py), so a resumed run continues on the residual base.
"""

from __future__ import annotations

import math

import torch

from loraforge.errors import AdapterError
from loraforge.lora.variant import LoraVariant


class PiSSA(LoraVariant):
    def __init__(self, init: str, use_rslora: bool) -> None:
        super().__init__()
        self.niter = None if init == "pissa" else int(init.removeprefix("pissa_niter_"))
        self.use_rslora = use_rslora
        # A₀, B₀ as initialised: the file form subtracts them (buffers: not trained, not in the state of others)
        self.register_buffer("initial_a", None, persistent=False)
        self.register_buffer("initial_b", None, persistent=False)

    def init(self, layer, name: str) -> None:
        if not layer.base_weight.is_floating_point():
            raise AdapterError("PiSSA needs the full-precision weight to split; initialise on the unquantized model")
        r, s = layer.ranks[name], layer.scaling[name]
        weight = layer.base_weight.detach().to(torch.float32)
        weight = weight.T if layer.fan_in_fan_out else weight
        if self.niter is None:
            u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
        else:
            u, sigma, v = torch.svd_lowrank(weight, q=r, niter=self.niter)
            vh = v.T
        root = (sigma[:r] / s).sqrt()
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
        residual = weight - s * (b @ a)
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
            base = layer.base_weight
            base.copy_((residual.T if layer.fan_in_fan_out else residual).to(base.dtype))
        self.initial_a, self.initial_b = a.clone(), b.clone()

    def as_plain_lora(self, layer, name: str, tensors: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, torch.Tensor], int, float]:
        """[A; A₀] and [B, −B₀] at rank 2r with the same scale: α/r = α'/2r, or α/√r = α'/√(2r) with rsLoRA."""
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        converted = {**tensors,
                     "lora_A.weight": torch.cat([a, self.initial_a.to(a.dtype)], dim=0),
                     "lora_B.weight": torch.cat([b, -self.initial_b.to(b.dtype)], dim=1)}
        r = layer.ranks[name]
        alpha = layer.scaling[name] * (math.sqrt(r) if self.use_rslora else r)
        return converted, 2 * r, alpha * (math.sqrt(2) if self.use_rslora else 2)
