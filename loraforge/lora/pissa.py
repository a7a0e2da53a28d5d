"""PiSSA (Meng et al. 2024): start the adapter on W0's principal components instead of at zero.

W0 = U·S·Vᵀ; with the top r singular triplets, A = √(S_r/s)·V_rᵀ and B = U_r·√(S_r/s), so s·B·A is the
best rank-r approximation of W0, and the frozen weight keeps the residual W0 − s·B·A. The model's output is
unchanged at step 0, but training moves the directions that matter most. `pissa_niter_N` uses a randomized
SVD with N power iterations (Halko et al.), minutes faster on large layers at a tiny loss of precision.

Files: a PiSSA adapter only makes sense next to its residual base. So that it applies to the ORIGINAL base
(and loads in PEFT and any LoRA tool), the saved adapter is converted to plain LoRA with rank 2r:
ΔW = s·B·A − s·B₀·A₀ = s'·[B, −B₀]·[A; A₀] with s' = s (PEFT's path_initial_model_for_weight_conversion).
"""

from __future__ import annotations

import math

import torch

from loraforge.errors import AdapterError


def init_pissa(layer, name: str, init: str) -> None:
    if not layer.base_weight.is_floating_point():
        raise AdapterError("PiSSA needs the full-precision weight to split; initialise on the unquantized model")
    r, s = layer.ranks[name], layer.scaling[name]
    weight = layer.base_weight.detach().to(torch.float32)
    weight = weight.T if layer.fan_in_fan_out else weight
    if init == "pissa":
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
    else:
        niter = int(init.removeprefix("pissa_niter_"))
        u, sigma, v = torch.svd_lowrank(weight, q=r, niter=niter)
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
    layer.pissa_initial = getattr(layer, "pissa_initial", {})
    layer.pissa_initial[name] = (a.clone(), b.clone())


def as_plain_lora(layer, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter's tensors for the original base: [A; A₀] and [B, −B₀] (rank 2r, same scale)."""
    a0, b0 = layer.pissa_initial[name]
    return {
        "lora_A.weight": torch.cat([tensors["lora_A.weight"], a0.to(tensors["lora_A.weight"].dtype)], dim=0),
        "lora_B.weight": torch.cat([tensors["lora_B.weight"], -b0.to(tensors["lora_B.weight"].dtype)], dim=1),
    }


def doubled_alpha(alpha: float, use_rslora: bool) -> float:
    """alpha at rank 2r that keeps the scale s of rank r: α/r = α'/2r, or α/√r = α'/√(2r) with rsLoRA."""
    return alpha * (math.sqrt(2) if use_rslora else 2)
