"""AdaLoRA: h = W0·x + s·P·(Λ⊙Q)·dropout(x), s = alpha / (init_r + 1e-5) (Zhang et al. 2023, "Adaptive Budget
Allocation for Parameter-Efficient Fine-Tuning").

Each adapter is an SVD-like triplet form: Q (r × fan_in, PEFT's `lora_A`), the singular values Λ (r × 1,
`lora_E`) and P (fan_out × r, `lora_B`). Λ starts at zero and P, Q at N(0, 0.02), so a fresh adapter changes
nothing. During training a `RankAllocator` scores every triplet (Pᵢ, λᵢ, Qᵢ) by the smoothed sensitivity
|w·∂L/∂w| of its entries times that sensitivity's uncertainty, and zeroes the λ of the lowest-scoring ones
until the total rank falls, on a cubic schedule, from init_r per module to target_r per module on average.
An orthogonality penalty ‖PᵀP − I‖ + ‖QQᵀ − I‖ keeps P and Q close to singular vectors.

Everything follows PEFT 0.21 (peft/tuners/adalora/): the math (ΔW is divided by `ranknum` = init_r for
every module, whatever it was pruned to), the schedule, the masks and the file. After the schedule's last
step the pruned triplets are cut out of the tensors, and the file records which of the init_r triplets
each module kept, as PEFT does: `rank_pattern` = {"<module>.lora_E": [bool] * init_r}, the tensors holding
only the kept rows / columns. Loading reads that pattern back into per-module ranks.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loraforge.config import AdaLoraOptions, LoraConfig
from loraforge.errors import AdapterError, AdapterFileError, ConfigError
from loraforge.lora.layers import LowRankLinear, adapter_dtype
from loraforge.lora.methods import Method, _lora_from_peft, _lora_to_peft

if TYPE_CHECKING:
    from loraforge.lora.model import LoraModel

# PEFT divides by ranknum + 1e-5 (peft/tuners/adalora/layer.py); the same constant keeps outputs equal.
RANKNUM_EPS = 1e-5
INIT_STD = 0.02  # PEFT's AdaLoRA init for P and Q
TENSOR_NAMES = ("lora_A", "lora_E", "lora_B")
MASK_SUFFIX = ".lora_E"  # PEFT keys rank_pattern by the Λ tensor of each module


class AdaLoraLinear(LowRankLinear):
    """nn.Linear or GPT-2 Conv1D: h = W0·x + b + s·B·(A⊙E)·dropout(x), E (r × 1) the singular values."""

    min_rank = 0  # a module pruned to rank 0 is legal (PEFT produces them on small budgets)

    def __init__(self, base_layer: nn.Linear | Conv1D) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()

    def _scale(self, alpha: float, r: int, config: LoraConfig) -> float:
        # Not alpha/r: PEFT scales by alpha / (ranknum + 1e-5) with ranknum = init_r in every module.
        return alpha / (config.adalora.init_r + RANKNUM_EPS)

    def _create_factors(self, name: str, r: int, config: LoraConfig) -> None:
        kw = dict(device=self.base_weight.device, dtype=adapter_dtype(self.base_weight))
        self.lora_A[name] = nn.Parameter(torch.randn(r, self.in_features, **kw) * INIT_STD)
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, **kw))
        self.lora_B[name] = nn.Parameter(torch.randn(self.out_features, r, **kw) * INIT_STD)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name] * self.lora_E[name], self.lora_B[name]

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        x = self._dropout(x.to(a.dtype), name)
        return (x @ a.T) @ b.T

    def peft_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {tensor_name: getattr(self, tensor_name)[name] for tensor_name in TENSOR_NAMES}

    @torch.no_grad()
    def keep_triplets(self, name: str, keep: torch.Tensor) -> None:
        """Cut the triplets where `keep` is False out of the tensors. The Parameter objects stay the same, so an
        optimizer that still holds them fails loudly on the shape change instead of training stale copies."""
        index = keep.nonzero().view(-1)
        for tensor_name, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
            param = getattr(self, tensor_name)[name]
            param.data = param.data.index_select(dim, index)
            param.grad = None
        self.ranks[name] = int(index.numel())


def _wrap(module: nn.Module) -> AdaLoraLinear:
    if isinstance(module, (nn.Linear, Conv1D)):
        return AdaLoraLinear(module)
    raise AdapterError(
        f"method=adalora supports Linear and GPT-2 Conv1D layers, not {type(module).__name__}; narrow the targets"
    )


# -- the rank budget ---------------------------------------------------------------------------------
class RankAllocator:
    """The budget of one trainable adapter: the orthogonality loss, and after every optimizer step PEFT's
    `update_and_allocate`: update the sensitivity EMAs, and every delta_t steps zero the λ of the
    lowest-scoring triplets so that the total rank follows the schedule (`budget`). From step
    total_step − tfinal the allocation is final; at total_step the pruned triplets are cut out."""

    def __init__(self, lora: LoraModel, name: str, config: LoraConfig) -> None:
        self.lora, self.name = lora, name
        self.layers = {m: layer for m, layer in lora.lora_layers()
                       if isinstance(layer, AdaLoraLinear) and name in layer.ranks}
        self.initial_budget = sum(layer.ranks[name] for layer in self.layers.values())
        self.target_budget = config.adalora.target_r * len(self.layers)
        self.sensitivity: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # EMA, uncertainty
        self.keep: dict[str, torch.Tensor] | None = None  # the latest allocation: kept triplets per module
        self.pruned = False

    @property
    def options(self) -> AdaLoraOptions:
        return self.lora.configs[self.name].adalora

    # -- training hooks ------------------------------------------------------------------------
    def regularization_loss(self) -> torch.Tensor | None:
        """orth_reg_weight × the mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F over every P and Q (PEFT's penalty)."""
        weight = self.options.orth_reg_weight
        if not weight or not self.layers:
            return None
        norms = []
        for layer in self.layers.values():
            q, p = layer.lora_A[self.name], layer.lora_B[self.name]
            for gram in (q @ q.T, p.T @ p):
                identity = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                norms.append(torch.linalg.matrix_norm(gram - identity))
        return weight * torch.stack(norms).mean()

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """PEFT's AdaLoraModel.update_and_allocate(step), then the cut at the schedule's end."""
        if self.pruned or not self.layers:
            return
        if all(t.grad is None for layer in self.layers.values() for t in layer.peft_tensors(self.name).values()):
            return  # the adapter took no part in this step (another one was trained)
        end = self._schedule_end()
        if step < end:
            self._update_sensitivity()
            budget, due = self.budget(step)
            if due:
                self._apply(self._allocate(budget))
        elif step == end or self.keep is None:
            # The final allocation, at the target budget; a run resumed past `end` makes it from this step alone
            # (PEFT has no sensitivities to offer there either).
            if not self.sensitivity:
                self._update_sensitivity()
            self._apply(self._allocate(self.target_budget))
            self.sensitivity = {}
        else:  # λ of dropped triplets got gradients in this step too: drop them again
            self._apply(self.keep)
        if step >= self.options.total_step:
            self.prune()

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed after `step`, whether to re-allocate at this step): init budget until tinit,
        then a cubic decrease to the target budget at total_step − tfinal (PEFT's budget_schedule)."""
        options, end = self.options, self._schedule_end()
        if step <= options.tinit:
            return self.initial_budget, False
        if step > end:
            return self.target_budget, True
        remaining = 1 - (step - options.tinit) / (end - options.tinit)
        budget = int((self.initial_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % options.delta_t == 0

    def _schedule_end(self) -> int:
        options = self.options
        if options.total_step is None:
            raise ConfigError("lora.adalora.total_step is not set: the rank budget schedule needs the run's length "
                              "(loraforge.train fills it in; set it when training in your own loop)")
        if options.tinit >= options.total_step - options.tfinal:
            raise ConfigError(
                f"lora.adalora: tinit ({options.tinit}) must be below total_step − tfinal "
                f"({options.total_step} − {options.tfinal}), or no step is left for pruning ranks"
            )
        return options.total_step - options.tfinal

    def _tensors(self) -> Iterator[tuple[tuple[str, str], torch.Tensor]]:
        for module_name, layer in self.layers.items():
            for tensor_name, tensor in layer.peft_tensors(self.name).items():
                yield (module_name, tensor_name), tensor

    def _update_sensitivity(self) -> None:
        beta1, beta2 = self.options.beta1, self.options.beta2
        for key, tensor in self._tensors():
            grad = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
            sensitivity = (tensor * grad).abs()
            smooth, uncertainty = self.sensitivity.get(key, (torch.zeros_like(tensor), torch.zeros_like(tensor)))
            smooth = beta1 * smooth + (1 - beta1) * sensitivity
            uncertainty = beta2 * uncertainty + (1 - beta2) * (sensitivity - smooth).abs()
            self.sensitivity[key] = (smooth, uncertainty)

    def _triplet_scores(self, module_name: str) -> torch.Tensor:
        """One score per triplet i: s(λᵢ) + mean_j s(Qᵢⱼ) + mean_j s(Pⱼᵢ), s = smoothed sensitivity × uncertainty."""
        score = {t: smooth * uncertainty for (m, t), (smooth, uncertainty) in self.sensitivity.items()
                 if m == module_name}
        return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))

    def _allocate(self, budget: int) -> dict[str, torch.Tensor]:
        """Keep the `budget` best triplets over all modules (ties at the threshold are all dropped, as PEFT)."""
        scores = {m: self._triplet_scores(m) for m in self.layers}
        to_drop = self.initial_budget - budget
        if to_drop <= 0:
            return {m: torch.ones_like(s, dtype=torch.bool) for m, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), to_drop).values
        return {m: s > threshold for m, s in scores.items()}

    def _apply(self, keep: dict[str, torch.Tensor]) -> None:
        self.keep = keep
        for module_name, layer in self.layers.items():
            layer.lora_E[self.name].masked_fill_(~keep[module_name].view(-1, 1), 0.0)

    # -- the end of the schedule ---------------------------------------------------------------
    def prune(self) -> None:
        """Cut the triplets dropped by the latest allocation out of every module and record which of the init_r
        triplets each kept in the adapter's config (PEFT's rank_pattern), so that the saved file is PEFT's
        pruned format. Runs by itself after step total_step; call it to keep the ranks of a run stopped early.
        The adapter's tensors change shape: an optimizer built before cannot step them any more."""
        if self.pruned or self.keep is None:
            return
        keep, config = self.keep, self.lora.configs[self.name]
        masks = dict(config.adalora.rank_pattern or {})
        for module_name, layer in self.layers.items():
            key = module_name + MASK_SUFFIX
            # A module loaded already pruned keeps a subset of its earlier subset of the init_r triplets.
            earlier = torch.tensor(masks[key]) if key in masks else torch.ones(layer.ranks[self.name], dtype=torch.bool)
            now = earlier.clone()
            now[earlier] = keep[module_name].cpu()
            masks[key] = now.tolist()
            layer.keep_triplets(self.name, keep[module_name])
        self.lora.configs[self.name] = config.model_copy(update={
            "rank_pattern": ranks_from_masks(masks),
            "adalora": config.adalora.model_copy(update={"rank_pattern": masks}),
        })
        self.keep, self.pruned = None, True

    # -- checkpoints ---------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything a step-exact resume needs: the sensitivity EMAs, the latest allocation, whether pruned."""
        tensors = {"pruned": torch.tensor(self.pruned)}
        for (module_name, tensor_name), (smooth, uncertainty) in self.sensitivity.items():
            tensors[f"sensitivity.{module_name}.{tensor_name}"] = smooth
            tensors[f"uncertainty.{module_name}.{tensor_name}"] = uncertainty
        keep = self.keep or {}
        if self.pruned:  # the final allocation lives in the config's masks then (over the init_r triplets)
            masks = self.lora.configs[self.name].adalora.rank_pattern or {}
            keep = {m: torch.tensor(masks[m + MASK_SUFFIX]) for m in self.layers if m + MASK_SUFFIX in masks}
        for module_name, mask in keep.items():
            tensors[f"keep.{module_name}"] = mask
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """The state of state_tensors back, before the adapter's own tensors are loaded (a pruned adapter is cut
        to its final ranks first, so that their shapes match)."""
        device = next(iter(self.layers.values())).lora_E[self.name].device if self.layers else None
        self.sensitivity = {}
        for key, value in tensors.items():
            kind, _, rest = key.partition(".")
            if kind == "sensitivity":
                module_name, tensor_name = rest.rsplit(".", 1)
                self.sensitivity[(module_name, tensor_name)] = (
                    value.to(device), tensors[f"uncertainty.{rest}"].to(device))
        keep = {key.removeprefix("keep."): value.to(device) for key, value in tensors.items()
                if key.startswith("keep.")}
        self.keep, self.pruned = keep or None, False
        if bool(tensors["pruned"]):
            self.prune()

    # -- reporting -----------------------------------------------------------------------------
    def ranks(self) -> dict[str, int]:
        """The rank of every module under the latest allocation."""
        if self.keep is not None:
            return {m: int(k.sum()) for m, k in self.keep.items()}
        return {m: layer.ranks[self.name] for m, layer in self.layers.items()}

    def summary(self) -> str:
        return rank_summary(self.ranks(), self.options)

    def finish(self) -> str:
        """End of training (whenever it stopped): prune to the latest allocation; returns the rank summary."""
        self.prune()
        return self.summary()


def adapter_ranks(lora: LoraModel, name: str) -> dict[str, int]:
    """The current rank of every module of AdaLoRA adapter `name` (after pruning: its final ranks)."""
    controller = lora.controllers.get(name)
    if isinstance(controller, RankAllocator):
        return controller.ranks()
    return {m: layer.ranks[name] for m, layer in lora.lora_layers()
            if isinstance(layer, AdaLoraLinear) and name in layer.ranks}


def rank_summary(ranks: dict[str, int], options: AdaLoraOptions) -> str:
    """One line: total rank against the budget, then min–max and mean rank per kind of module."""
    by_kind: dict[str, list[int]] = {}
    for module_name, rank in ranks.items():
        by_kind.setdefault(module_name.rsplit(".", 1)[-1], []).append(rank)
    kinds = ", ".join(f"{kind} {min(r)}–{max(r)} (mean {sum(r) / len(r):.1f})" for kind, r in sorted(by_kind.items()))
    return (f"AdaLoRA ranks: {sum(ranks.values())} in all over {len(ranks)} modules (init_r {options.init_r}, "
            f"target_r {options.target_r}); {kinds}")


# -- adapter_config.json --------------------------------------------------------------------------
# Our option names → PEFT's AdaLoraConfig keys.
PEFT_KEYS = {"init_r": "init_r", "target_r": "target_r", "tinit": "tinit", "tfinal": "tfinal", "delta_t": "deltaT",
             "beta1": "beta1", "beta2": "beta2", "orth_reg_weight": "orth_reg_weight", "total_step": "total_step"}


def ranks_from_masks(masks: dict[str, list[bool]]) -> dict[str, int]:
    """LoraConfig.rank_pattern (full module names → rank) from PEFT's AdaLoRA rank_pattern masks."""
    return {key.removesuffix(MASK_SUFFIX): sum(mask) for key, mask in masks.items()}


def _to_peft(config: LoraConfig) -> dict:
    options = config.adalora
    values = {peft_key: getattr(options, ours) for ours, peft_key in PEFT_KEYS.items()}
    # PEFT refuses a config without total_step even for inference; an adapter never trained records the
    # shortest schedule PEFT accepts.
    values["total_step"] = options.total_step or options.tinit + options.tfinal + 1
    # None while the tensors hold all init_r triplets (PEFT writes the same before its first allocation).
    values["rank_pattern"] = options.rank_pattern
    return {**_lora_to_peft(config), **values}


def _from_peft(raw: dict) -> dict:
    lora = _lora_from_peft(raw)  # refuses bias / lora_bias / layer_replication
    if raw.get("use_dora") or raw.get("target_parameters"):
        raise AdapterFileError("AdaLoRA adapters have no DoRA or target_parameters (PEFT refuses them too)")
    options = {ours: raw[peft_key] for ours, peft_key in PEFT_KEYS.items() if peft_key in raw}
    masks = _masks_from_peft(raw.get("rank_pattern"), options.get("init_r", AdaLoraOptions().init_r))
    return {
        "alpha": lora["alpha"],
        "dropout": lora["dropout"],
        # PEFT's AdaLoRA ignores these LoRA options; so do we, and say so by not carrying them over.
        "alpha_pattern": {},
        "use_rslora": False,
        "rank_pattern": ranks_from_masks(masks or {}),
        "adalora": {**options, "rank_pattern": masks},
    }


def _masks_from_peft(rank_pattern, init_r: int) -> dict[str, list[bool]] | None:
    if not rank_pattern:
        return None
    masks = {}
    for key, mask in rank_pattern.items():
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(b, bool) for b in mask):
            raise AdapterFileError(
                f"rank_pattern[{key!r}] must be a list of {init_r} booleans (PEFT's AdaLoRA mask over init_r "
                f"triplets), got {mask!r}"
            )
        # During training PEFT keys the mask with the adapter name after lora_E; saved files drop it.
        masks[key.split(MASK_SUFFIX)[0] + MASK_SUFFIX] = mask
    return masks


METHOD = Method("adalora", "ADALORA", _wrap, _to_peft, _from_peft, RankAllocator)
