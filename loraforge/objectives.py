"""The training objectives as formulas over per-token log-probabilities: SFT's cross-entropy, DPO, GRPO's
clipped policy gradient. Pure tensor code (no model, no I/O), so each is checked against its published formula.

Every objective is a pair:
- `loss(logprobs, batch) -> (summed loss, stats)`: `logprobs` are log p(label) at the batch's target positions,
  flattened row by row (loss.token_logprobs); the loss is a *sum*, and `stats` are sums in the same weighting;
- `count(batch)`: what the sums are divided by (target tokens, preference pairs, sequences). The trainer adds the
  counts of all micro-batches of a step first, so gradient accumulation gives the same mean as one big batch.

Batch keys besides input_ids / labels / attention_mask:
- DPO: rows [chosen_0 … chosen_{k-1}, rejected_0 … rejected_{k-1}]; `reference_logprobs` [2k]: each row's summed
  log-probability under the reference model (the base, adapter off).
- GRPO: `advantages` [B]; `old_logprobs` [B, T] aligned with labels (position t: log p(token t | before it))
  under the policy that sampled them; `reference_token_logprobs` [B, T] likewise when the KL term is on.
- weighted cross-entropy: `weights` [B, T] aligned with labels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraforge.loss import target_mask, target_rows, target_tokens, targets_per_row

Batch = dict[str, torch.Tensor]
LossFunction = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class Objective:
    name: str
    loss: LossFunction
    count: Callable[[Batch], float]


def row_sums(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-row sums [B] of per-target values flattened row by row."""
    return values.new_zeros(batch["labels"].shape[0]).index_add(0, target_rows(batch), values)


# -- SFT ---------------------------------------------------------------------------------------------------
def cross_entropy(logprobs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token cross-entropy summed over target tokens; with `weights` in the batch, each token's term is
    weighted (Tinker's weighted cross-entropy)."""
    if "weights" in batch:
        return -(logprobs * batch["weights"][:, 1:][target_mask(batch)]).sum(), {}
    return -logprobs.sum(), {}


CROSS_ENTROPY = Objective("cross_entropy", cross_entropy, target_tokens)


# -- DPO ---------------------------------------------------------------------------------------------------
def dpo_terms(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
              reference_rejected: torch.Tensor, beta: float, kind: str = "sigmoid",
              label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) from sequence log-probabilities.

    sigmoid (Rafailov et al. 2023, with cDPO's label smoothing ε):
        -(1-ε)·log σ(β·h) - ε·log σ(-β·h),  h = (log π(y_w) - log π(y_l)) - (log π_ref(y_w) - log π_ref(y_l))
    ipo (Azar et al. 2023): (h - 1/(2β))², on log-probabilities averaged per token (as TRL computes it: the
    caller passes averages). Rewards are β·(log π - log π_ref), DPO's implicit reward."""
    h = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    if kind == "sigmoid":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {kind!r} (sigmoid or ipo)")
    return loss, beta * (policy_chosen - reference_chosen).detach(), beta * (policy_rejected - reference_rejected).detach()


def sequence_logprobs(logprobs: torch.Tensor, batch: Batch, average: bool) -> torch.Tensor:
    """Each row's log-probability of its targets: summed, or averaged per target token."""
    sums = row_sums(logprobs, batch)
    return sums / targets_per_row(batch) if average else sums


def dpo(beta: float, kind: str = "sigmoid", label_smoothing: float = 0.0) -> Objective:
    average = kind == "ipo"

    def loss(logprobs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        policy = sequence_logprobs(logprobs, batch, average)
        reference = batch["reference_logprobs"]
        if average:
            reference = reference / targets_per_row(batch)
        k = policy.shape[0] // 2
        per_pair, chosen, rejected = dpo_terms(policy[:k], policy[k:], reference[:k], reference[k:], beta, kind,
                                               label_smoothing)
        summed = sequence_logprobs(logprobs.detach(), batch, average=False)
        stats = {"accuracy": float((chosen > rejected).sum()), "margin": float((chosen - rejected).sum()),
                 "chosen_reward": float(chosen.sum()), "rejected_reward": float(rejected.sum()),
                 "chosen_logp": float(summed[:k].sum()), "rejected_logp": float(summed[k:].sum())}
        return per_pair.sum(), stats

    return Objective("dpo", loss, lambda batch: batch["labels"].shape[0] // 2)


# -- GRPO --------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024): each completion's reward minus its group's mean, divided by the
    group's standard deviation (unbiased, as TRL) unless `scale` is off (Dr. GRPO). rewards: [groups, G]."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def policy_gradient(epsilon_low: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                    per_sequence: bool = False) -> Objective:
    """The clipped surrogate of PPO/GRPO, per token t of completion i:

        -min(ρ·A_i, clip(ρ, 1-ε_low, 1+ε_high)·A_i) + β·KL_t,  ρ = exp(log π(t) - log π_old(t)),
        KL_t = exp(ref - log π) - (ref - log π) - 1   (Schulman's k3 estimator, as GRPO's paper and TRL)

    per_sequence=False ("dapo", TRL's default): summed over tokens and divided by the step's completion tokens;
    True ("grpo", the paper): each completion's tokens averaged first, then divided by the step's completions.
    With old = current log-probabilities (one step per rollout) ρ = 1 and this is REINFORCE with a group baseline.
    """
    high = epsilon_low if epsilon_high is None else epsilon_high

    def loss(logprobs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        mask, rows = target_mask(batch), target_rows(batch)
        old = batch["old_logprobs"][:, 1:][mask]
        advantages = batch["advantages"][rows]
        ratio = torch.exp(logprobs - old)
        clipped = ratio.clamp(1 - epsilon_low, 1 + high)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        weight = (1 / targets_per_row(batch))[rows] if per_sequence else torch.ones_like(old)
        stats = {"clip_fraction": float(((ratio != clipped).float() * weight).sum())}
        if beta:
            reference = batch["reference_token_logprobs"][:, 1:][mask]
            kl = torch.exp(reference - logprobs) - (reference - logprobs) - 1
            per_token = per_token + beta * kl
            stats["kl"] = float((kl.detach() * weight).sum())
        return (per_token * weight).sum(), stats

    count = (lambda batch: batch["labels"].shape[0]) if per_sequence else target_tokens
    return Objective("policy_gradient", loss, count)


def named_objective(name: str) -> Objective:
    """The built-in objectives by name, with their default settings (Tinker's loss names)."""
    objectives = {"cross_entropy": CROSS_ENTROPY, "dpo": dpo(0.1), "policy_gradient": policy_gradient(),
                  "importance_sampling": policy_gradient(epsilon_low=float("inf"))}
    if name not in objectives:
        raise ValueError(f"unknown loss {name!r}; built in: {', '.join(objectives)}, or pass an Objective")
    return objectives[name]
