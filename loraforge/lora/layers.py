"""LoRA layers: h = base(x) + Σ_{a ∈ active} s_a · B_a·A_a·dropout(x), with s = α/r (α/√r for rsLoRA).

A frozen base layer is wrapped once; every named adapter adds its own pair of factors A (r × fan_in)
and B (fan_out × r). B starts at zero, so a fresh adapter leaves the model exactly as it was
(Hu et al. 2021, §4.1). Each kind of base layer says only three things: how to build A and B, how
to apply them to an input, and what ΔW = s·B·A looks like in the base weight's layout. Everything
else (active set, merge/unmerge, per-row adapters for mixed batches) lives once in `LoraLayer`.

In-memory names follow PEFT's contract (`<module>.base_layer`, `<module>.lora_A.<adapter>.weight`),
so the file format is the module path with the adapter name dropped.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraforge.config import LoraConfig
from loraforge.errors import AdapterError, MergeError
from loraforge.lora.fused import frozen_linear_with_lora
from loraforge.lora.variant import LoraVariant
from loraforge.lora.variants import variants_for


@dataclass(frozen=True)
class RowAdapters:
    """The adapter of every batch row: `rows[i]` indexes `(base,) + names`, so 0 means "no adapter"."""

    names: tuple[str, ...]
    rows: torch.Tensor

    @classmethod
    def from_names(cls, per_row: Sequence[str | None], device: torch.device | str | None = None) -> RowAdapters:
        names = tuple(dict.fromkeys(name for name in per_row if name is not None))
        index = {name: i + 1 for i, name in enumerate(names)}
        rows = torch.tensor([index[name] if name is not None else 0 for name in per_row], device=device)
        return cls(names, rows)

    def uniform_choice(self) -> str | None | bool:
        """The one adapter every row uses (None for the base), or False when rows differ."""
        first = int(self.rows[0])
        if bool((self.rows == first).all()):
            return self.names[first - 1] if first else None
        return False


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    # Adapters train in fp32 whatever the base holds (bf16, fp16, 4-bit): their updates are small
    # relative to the weights and vanish in 8-bit mantissas. float64 bases (reference tests) stay float64.
    return torch.float64 if base_weight.dtype == torch.float64 else torch.float32


def _refuse_linear_only_options(config: LoraConfig, kind: str) -> None:
    variants = [type(v).__name__ for v in variants_for(config)]
    if variants:
        raise AdapterError(f"{' and '.join(variants)} {'is' if len(variants) == 1 else 'are'} implemented for Linear "
                           f"layers, not {kind}; narrow the targets")


def init_lora_a(weight: torch.Tensor, scheme: str) -> None:
    if scheme == "gaussian":  # pissa_* overwrites A afterwards
        nn.init.normal_(weight, std=1.0 / weight.shape[0])  # std 1/r, as PEFT's "gaussian"
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's own init, as PEFT's default


class LoraLayer(nn.Module):
    """Shared bookkeeping for a frozen `base_layer` with any number of named adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ranks: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout_p: dict[str, float] = {}
        self.active_adapters: tuple[str, ...] = ()
        self.merged_adapters: list[str] = []
        self.row_adapters: RowAdapters | None = None

    # -- what each kind of layer provides -------------------------------------------------------
    def _create_factors(self, name: str, r: int, config: LoraConfig) -> None:
        raise NotImplementedError

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (r, fan_in) and B as (fan_out, r) views of the adapter's parameters."""
        raise NotImplementedError

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """B·A·dropout(x), unscaled."""
        raise NotImplementedError

    def _mixed_output(self, x: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      scale: torch.Tensor, drop: list[float]) -> torch.Tensor:
        """Every row's own scaled update, from the factors stacked by `_stacked_factors` (index = rows[i])."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A laid out like the base weight."""
        raise NotImplementedError

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's parameters under PEFT's names relative to this module ('lora_A.weight', …)."""
        raise NotImplementedError

    def variants(self, name: str) -> Sequence[LoraVariant]:
        """The variant objects of adapter `name` (variant.py); only LoraLinear has any."""
        return ()

    @property
    def base_weight(self) -> nn.Parameter:
        return self.base_layer.weight

    def dense_base_weight(self) -> torch.Tensor:
        """W0 as a float tensor in the base weight's layout (4-bit / 8-bit bases dequantized)."""
        from loraforge.quant import dequantized_weight

        return dequantized_weight(self.base_layer, self.base_weight)

    # -- adapters ------------------------------------------------------------------------------
    min_rank = 1

    def add_adapter(self, name: str, r: int, alpha: float, config: LoraConfig) -> None:
        """Add adapter `name` with this layer's rank and alpha (rank/alpha patterns already applied)."""
        if name in self.ranks:
            raise AdapterError(f"adapter {name!r} already exists on this layer")
        if r < self.min_rank:
            raise AdapterError(f"rank {r} for adapter {name!r}: ranks must be at least {self.min_rank} (check "
                               "rank_pattern)")
        self._stack_cache = None
        self.ranks[name] = r
        self.scaling[name] = self._scale(alpha, r, config)
        self.dropout_p[name] = config.dropout
        self._create_factors(name, r, config)

    def _scale(self, alpha: float, r: int, config: LoraConfig) -> float:
        """s in h = W0·x + s·ΔW(x): alpha/r, or alpha/√r with rsLoRA (Kalajdzievski 2023)."""
        return alpha / (math.sqrt(r) if config.use_rslora else r)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged; unmerge() before deleting it")
        self._stack_cache = None  # a new adapter's tensors may reuse a deleted one's ids
        for store in self._factor_stores():
            if name in store:
                del store[name]
        for table in (self.ranks, self.scaling, self.dropout_p):
            table.pop(name, None)
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def _factor_stores(self) -> list[nn.ModuleDict | nn.ParameterDict]:
        return [m for m in self.children() if isinstance(m, (nn.ModuleDict, nn.ParameterDict))]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self._base_output(x, *args, **kwargs)
        self._check_merge_state()
        if self.row_adapters is not None:
            update = self._mixed_update(x, self.row_adapters)
            return result if update is None else result + update.to(result.dtype)
        base = result
        for name in self._unmerged_active():
            result = self._add_update(result, x, name, base)
        return result

    def _base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def _add_update(self, result: torch.Tensor, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        """result + what adapter `name` adds to the base output `base_out` (DoRA also rescales that output)."""
        return result + (self.scaling[name] * self._adapter_output(x, name)).to(result.dtype)

    def _unmerged_active(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.ranks and n not in self.merged_adapters]

    def _check_merge_state(self) -> None:
        # A merged adapter cannot be switched off without changing weights; we never do that implicitly
        # (loralib merges inside train()/eval() and surprises its users).
        if not self.merged_adapters:
            return
        if self.row_adapters is not None or any(n not in self.active_adapters for n in self.merged_adapters):
            raise AdapterError(
                f"adapters {self.merged_adapters} are merged into the base weights; call unmerge() before "
                "disabling them, switching adapters or running a mixed-adapter batch"
            )

    def draws_random_numbers(self) -> bool:
        """Whether a forward now draws random numbers (dropout in training): then rows that begin alike still get
        different outputs there, and a batch's common prefix cannot be computed once for all (loss.py)."""
        return self.training and any(self.dropout_p.get(name) for name in self.active_adapters)

    def _dropout(self, x: torch.Tensor, name: str) -> torch.Tensor:
        p = self.dropout_p[name]
        return F.dropout(x, p, training=True) if p and self.training else x

    # -- mixed batches: one forward, a different adapter per row --------------------------------
    def _mixed_update(self, x: torch.Tensor, plan: RowAdapters) -> torch.Tensor | None:
        """Every row's own scaled update (row i: adapter plan.rows[i], 0 = none), None when no row's adapter lives
        in this layer. Low-rank layers stack their factors and run batched products (below); a layer whose
        update is a full ΔW (LyCORIS) overrides this."""
        stacked = self._stacked_factors(plan)
        if stacked is None:
            return None
        self._check_rows(x, plan)
        return self._mixed_output(x, plan.rows, *stacked)

    def _stacked_factors(self, plan: RowAdapters):
        """A (K+1, r_max, fan_in), B (K+1, fan_out, r_max), scale (K+1,), dropout p (K+1,) over (base,)+names.

        Index 0 and adapters absent from this layer are zero, so their rows get the base output; smaller
        ranks are zero-padded, which adds nothing to B·A. Without gradients (serving: every decode step, same
        adapters) the stacks are reused until an adapter tensor changes — rebuilding them was most of the cost
        of a mixed decode step. An in-place update has to bump the tensors' version counters (autograd's
        increment_version; TrainingClient.optim_step does, since the fused AdamW kernel does not).
        """
        if torch.is_grad_enabled():
            return self._build_stacked_factors(plan)
        tensors = [t for n in plan.names if n in self.ranks for t in self.peft_tensors(n).values()]
        key = (plan.names, self.training, tuple((id(t), t._version) for t in tensors))
        cached = getattr(self, "_stack_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self._build_stacked_factors(plan))
            self._stack_cache = cached
        return cached[1]

    def _build_stacked_factors(self, plan: RowAdapters):
        present = [n for n in plan.names if n in self.ranks]
        if not present:
            return None
        for variant in (v for n in present for v in self.variants(n) if not v.mixable):
            raise AdapterError(f"{variant.not_mixable_because}; merge them, or give every row the same adapter")
        r_max = max(self.ranks[n] for n in present)
        ref_a, ref_b = self.factors(present[0])
        zero_a = ref_a.new_zeros(r_max, ref_a.shape[1])
        zero_b = ref_b.new_zeros(ref_b.shape[0], r_max)
        a_list, b_list, scales, drop = [zero_a], [zero_b], [0.0], [0.0]
        for name in plan.names:
            if name in self.ranks:
                a, b = self.factors(name)
                pad = r_max - a.shape[0]
                a_list.append(F.pad(a, (0, 0, 0, pad)))
                b_list.append(F.pad(b, (0, pad)))
                scales.append(self.scaling[name])
                drop.append(self.dropout_p[name] if self.training else 0.0)
            else:
                a_list.append(zero_a)
                b_list.append(zero_b)
                scales.append(0.0)
                drop.append(0.0)
        scale = torch.tensor(scales, device=ref_a.device, dtype=ref_a.dtype)
        return torch.stack(a_list), torch.stack(b_list), scale, drop

    @staticmethod
    def _row_dropout(x: torch.Tensor, rows: torch.Tensor, drop: list[float]) -> torch.Tensor:
        if not any(drop):
            return x
        p = torch.tensor(drop, device=x.device, dtype=x.dtype)[rows].view(-1, *([1] * (x.dim() - 1)))
        keep = torch.rand_like(x) >= p
        return x * keep / (1 - p)

    @staticmethod
    def _check_rows(x: torch.Tensor, plan: RowAdapters) -> None:
        if x.shape[0] != plan.rows.shape[0]:
            raise AdapterError(
                f"mixed-adapter batch names {plan.rows.shape[0]} rows but the input has {x.shape[0]}"
            )

    # -- merge ---------------------------------------------------------------------------------
    def merged_weight(self, names: Sequence[str]) -> torch.Tensor:
        """W0 + Σ ΔW for the given not-yet-merged adapters, computed on a float copy (the base is untouched)."""
        weight = self.dense_base_weight().detach().to(adapter_dtype(self.base_weight))
        for name in self._to_merge(names):
            weight = self._merge_one(weight, name)
        return weight

    def _merge_one(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return weight + self.delta_weight(name).detach().to(weight.dtype)

    def _unmerge_one(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return weight - self.delta_weight(name).detach().to(weight.dtype)

    def _to_merge(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if n in self.ranks and n not in self.merged_adapters]

    def check_mergeable(self, names: Sequence[str], where: str = "") -> None:
        """Raise MergeError if merging would write NaN/inf; computed on a copy, so nothing changes."""
        todo = self._to_merge(names)
        if todo and not torch.isfinite(self.merged_weight(todo)).all():
            raise MergeError(
                f"merging adapter(s) {todo} into {where or type(self.base_layer).__name__} gives NaN/inf weights; "
                "nothing was changed. The adapter is broken (check its training loss)."
            )

    @torch.no_grad()
    def merge(self, names: Sequence[str], safe: bool = True, where: str = "") -> None:
        todo = self._to_merge(names)
        if not todo:
            return  # merging twice merges once
        if not self.base_weight.is_floating_point():
            raise MergeError(
                f"{where or type(self.base_layer).__name__} holds a quantized weight; merge it with "
                "loraforge.merge.merge_quantized (dequantize, merge, optionally re-quantize), or `loraforge merge`"
            )
        if safe:
            self.check_mergeable(todo, where)
        self.base_weight.copy_(self.merged_weight(todo).to(self.base_weight.dtype))
        self.merged_adapters.extend(todo)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_weight
            weight.copy_(self._unmerge_one(weight.to(adapter_dtype(weight)), name).to(weight.dtype))


class LowRankLinear(LoraLayer):
    """nn.Linear or GPT-2 Conv1D whose adapters add s·B·A for the factors() of each (LoRA's B·A, AdaLoRA's
    P·(Λ⊙Q)): the sizes, ΔW and the mixed-batch products they share. Conv1D stores W0 as (fan_in, fan_out)."""

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        # nn.Linear's own sizes, not its weight's shape: a 4-bit weight is stored packed.
        fan_in, fan_out = base_layer.weight.shape if self.fan_in_fan_out else (base_layer.in_features,
                                                                                base_layer.out_features)
        self.in_features, self.out_features = fan_in, fan_out

    def _mixed_output(self, x, rows, a, b, scale, drop):
        tokens = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # (batch, tokens, fan_in)
        tokens = self._row_dropout(tokens, rows, drop)
        hidden = torch.bmm(tokens, a[rows].transpose(1, 2))  # (batch, tokens, r)
        out = torch.bmm(hidden, b[rows].transpose(1, 2)) * scale[rows].view(-1, 1, 1)
        return out.reshape(*x.shape[:-1], self.out_features)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        delta = (b @ a) * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta


class LoraLinear(LowRankLinear):
    """nn.Linear or GPT-2 Conv1D: h = W0·x + b + s·B·A·dropout(x)."""

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_variants = nn.ModuleDict()  # adapter name → its variant objects (DoRA, PiSSA), when it has any

    def _create_factors(self, name: str, r: int, config: LoraConfig) -> None:
        kw = dict(bias=False, device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        self.lora_A[name] = nn.Linear(self.in_features, r, **kw)
        self.lora_B[name] = nn.Linear(r, self.out_features, **kw)
        init_lora_a(self.lora_A[name].weight, config.init)
        nn.init.zeros_(self.lora_B[name].weight)
        variants = variants_for(config)
        if variants:
            self.lora_variants[name] = nn.ModuleList(variants)
            for variant in variants:
                variant.init(self, name)

    def variants(self, name: str) -> Sequence[LoraVariant]:
        return self.lora_variants[name] if name in self.lora_variants else ()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = None if args or kwargs else self._fused_adapter()
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        return frozen_linear_with_lora(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                       self.scaling[name], self.fan_in_fan_out)

    def _base_output(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        weight = base.weight
        if (weight.dtype == x.dtype or not weight.is_floating_point() or torch.is_autocast_enabled(x.device.type)
                or type(base) not in (nn.Linear, Conv1D)):
            return base(x, *args, **kwargs)
        # a frozen weight stored narrower than the compute dtype (store_frozen_weights): widen it for this call
        bias = base.bias.to(x.dtype) if base.bias is not None else None
        if self.fan_in_fan_out:
            return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight.to(x.dtype)).view(*x.shape[:-1], -1)
        return F.linear(x, weight.to(x.dtype), bias)

    def _fused_adapter(self) -> str | None:
        """The adapter when this call can run as one fused node (see fused.py): one active adapter, no dropout,
        no DoRA, a plain float frozen base without hooks; else None."""
        if self.row_adapters is not None or self.merged_adapters or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.base_layer
        if (name not in self.ranks or not all(v.fusable for v in self.variants(name))
                or (self.dropout_p[name] and self.training) or type(base) not in (nn.Linear, Conv1D)
                or base._forward_hooks or base._forward_pre_hooks
                or not base.weight.is_floating_point() or base.weight.requires_grad
                or (base.bias is not None and base.bias.requires_grad)):
            return None
        return name

    def _add_update(self, result: torch.Tensor, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        for variant in self.variants(name):
            term = variant.forward_term(self, x, name, base_out)
            if term is not None:
                return result + term
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        # Under autocast the adapter runs in the autocast dtype like the base: casting x up to the fp32 factors
        # first would only add a copy of x per layer that autograd keeps for backward.
        autocast = torch.is_autocast_enabled(x.device.type)
        hidden = F.linear(self._dropout(x if autocast else x.to(a.dtype), name), a)  # (…, r)
        if not autocast and hidden.dtype != result.dtype:  # e.g. a bf16 base without autocast
            return result + (self.scaling[name] * F.linear(hidden, b)).to(result.dtype)
        # result + s·hidden·Bᵀ in one fused kernel: no (tokens × fan_out) temporary for the scaled update.
        fused = torch.addmm(result.reshape(-1, self.out_features), hidden.reshape(-1, hidden.shape[-1]), b.T,
                            alpha=self.scaling[name])
        return fused.view(result.shape)

    def _merge_one(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        for variant in self.variants(name):
            merged = variant.merge(self, weight, name)
            if merged is not None:
                return merged
        return super()._merge_one(weight, name)

    def _unmerge_one(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        for variant in self.variants(name):
            unmerged = variant.unmerge(self, weight, name)
            if unmerged is not None:
                return unmerged
        return super()._unmerge_one(weight, name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x = self._dropout(x.to(self.lora_A[name].weight.dtype), name)
        return self.lora_B[name](self.lora_A[name](x))

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        tensors = {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}
        for variant in self.variants(name):
            tensors.update(variant.file_tensors(self, name))
        return tensors


class LoraEmbedding(LoraLayer):
    """nn.Embedding: h = E0[x] + s·(Aᵀ[x])·Bᵀ, with A (r × vocab) a per-token lookup and B (dim × r)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create_factors(self, name: str, r: int, config: LoraConfig) -> None:
        _refuse_linear_only_options(config, "Embedding")
        vocab, dim = self.base_weight.shape
        kw = dict(device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        # PEFT's embedding init: A = 0, B ~ N(0, 1); the product is zero either way.
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(r, vocab, **kw))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r, **kw))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[name], self.lora_embedding_B[name]

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq)

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return self._lookup(x, a.T) @ b.T

    def _mixed_output(self, x, rows, a, b, scale, drop):
        # embeddings take ids, so there is no input dropout
        ids = x.reshape(x.shape[0], -1)
        hidden = a.transpose(1, 2)[rows[:, None], ids]  # (batch, tokens, r): each row looks up its own A
        out = torch.bmm(hidden, b[rows].transpose(1, 2)) * scale[rows].view(-1, 1, 1)
        return out.reshape(*x.shape, b.shape[1])

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return (b @ a).T * self.scaling[name]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_embedding_A": self.lora_embedding_A[name], "lora_embedding_B": self.lora_embedding_B[name]}


class LoraConv2d(LoraLayer):
    """nn.Conv2d: h = conv(x; W0) + s·conv₁ₓ₁(conv(x; A); B), A with the base kernel/stride/padding, B 1×1."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1 or base_layer.dilation != (1, 1):
            raise AdapterError("LoRA on Conv2d needs groups=1 and dilation=1 (as PEFT)")
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_factors(self, name: str, r: int, config: LoraConfig) -> None:
        _refuse_linear_only_options(config, "Conv2d")
        base = self.base_layer
        kw = dict(bias=False, device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, **kw)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, 1, **kw)
        init_lora_a(self.lora_A[name].weight, config.init)
        nn.init.zeros_(self.lora_B[name].weight)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        x = self._dropout(x.to(self.lora_A[name].weight.dtype), name)
        return self.lora_B[name](self.lora_A[name](x))

    def _mixed_output(self, x, rows, a, b, scale, drop):
        base = self.base_layer
        batch, channels, r = x.shape[0], x.shape[1], a.shape[1]
        x = self._row_dropout(x.to(a.dtype), rows, drop)
        # Grouped convolution with one group per row: every row is convolved with its own adapter's kernels.
        kernels_a = a[rows].reshape(batch * r, channels, *base.kernel_size)
        hidden = F.conv2d(x.reshape(1, batch * channels, *x.shape[2:]), kernels_a, None, base.stride, base.padding,
                          groups=batch)
        kernels_b = b[rows].reshape(batch * b.shape[1], r, 1, 1)
        out = F.conv2d(hidden, kernels_b, groups=batch).reshape(batch, b.shape[1], *hidden.shape[2:])
        return out * scale[rows].view(-1, 1, 1, 1)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return (b @ a).reshape(self.base_weight.shape) * self.scaling[name]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}


class LoraParameter(LoraLayer):
    """One adapted parameter, e.g. MoE experts stored as a 3-D tensor W0 (experts × out × in):
    W0[e] + s·B_e·A_e per expert. The base module runs unchanged with that sum in place of W0.

    Follows PEFT's `target_parameters` layout: A is (r·E, in) with expert e in rows e·r…e·r+r-1;
    B is (out, r·E) with expert e in columns e, e+E, e+2E, … Several parameters of one module nest
    (the first parameter innermost), which is also how their keys read in the file.
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        shape = self.base_weight.shape
        if len(shape) not in (2, 3):
            raise AdapterError(f"parameter {parameter_name!r} has {len(shape)} dimensions; LoRA needs 2 or 3")
        self.num_experts = shape[0] if len(shape) == 3 else 1
        # transformers stores experts as (E, out, in) unless the module says it is transposed.
        self.transposed = len(shape) == 3 and getattr(self.owner, "is_transposed", False)
        out_dim, in_dim = shape[-2:] if not self.transposed else shape[-2:][::-1]
        self.in_features, self.out_features = in_dim, out_dim
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def owner(self) -> nn.Module:
        module = self.base_layer
        while isinstance(module, LoraParameter):
            module = module.base_layer
        return module

    @property
    def base_weight(self) -> nn.Parameter:
        return getattr(self.owner, self.parameter_name)

    def _create_factors(self, name: str, r: int, config: LoraConfig) -> None:
        _refuse_linear_only_options(config, "parameters")
        kw = dict(bias=False, device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, **kw)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, **kw)
        init_lora_a(self.lora_A[name].weight, config.init)
        nn.init.zeros_(self.lora_B[name].weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        experts, r = self.num_experts, self.ranks[name]
        a = self.lora_A[name].weight.reshape(experts, r, self.in_features)
        b = self.lora_B[name].weight.reshape(self.out_features, r, experts).permute(2, 0, 1)
        delta = torch.bmm(b, a) * self.scaling[name]  # (E, out, in)
        if self.transposed:
            delta = delta.transpose(1, 2)
        return delta if self.base_weight.dim() == 3 else delta[0]

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A[name].weight, "lora_B.weight": self.lora_B[name].weight}

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self._forward_with({}, args, kwargs)

    def _forward_with(self, replaced: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
        self._check_merge_state()
        names = self._unmerged_active()
        if self.row_adapters is not None:
            choice = self.row_adapters.uniform_choice()
            if choice is False:
                raise AdapterError(
                    f"mixed-adapter batches are not supported on adapted parameter {self.parameter_name!r} "
                    "(expert tensors); give every row the same adapter, or adapt only Linear modules"
                )
            names = [choice] if choice in self.ranks else []
        if names:
            weight = self.base_weight
            delta = sum(self.delta_weight(n) for n in names)
            replaced = {**replaced, self.parameter_name: weight + delta.to(weight.dtype)}
        if isinstance(self.base_layer, LoraParameter):
            return self.base_layer._forward_with(replaced, args, kwargs)
        if not replaced:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, replaced, args, kwargs)


class ModulesToSave(nn.Module):
    """A frozen original plus one fully trainable copy per adapter; the first active adapter's copy runs."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: tuple[str, ...] = ()
        self.row_adapters: RowAdapters | None = None

    def add_adapter(self, name: str) -> None:
        trainable = copy.deepcopy(self.original_module)
        for param in trainable.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = trainable

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = tuple(a for a in self.active_adapters if a != name)

    def active_module(self) -> nn.Module:
        for name in self.active_adapters:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self.row_adapters
        if plan is None:
            return self.active_module()(x, *args, **kwargs)
        LoraLayer._check_rows(x, plan)
        out = self.original_module(x, *args, **kwargs)
        for index, name in enumerate(plan.names, start=1):
            rows = (plan.rows == index).nonzero().squeeze(1)
            if name in self.modules_to_save and rows.numel():
                out = out.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs).to(out.dtype))
        return out


def wrap_module(module: nn.Module) -> LoraLayer:
    """The LoRA layer class for a supported base module."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if isinstance(module, nn.Conv2d):
        return LoraConv2d(module)
    raise AdapterError(
        f"cannot put LoRA on a {type(module).__name__}: supported are Linear, GPT-2 Conv1D, Embedding and Conv2d "
        "modules, and 2-D/3-D parameters via target_parameters"
    )


SUPPORTED_MODULES = (nn.Linear, Conv1D, nn.Embedding, nn.Conv2d)
LINEAR_MODULES = (nn.Linear, Conv1D)
