"""The objectives against their published formulas, computed here independently with plain Python floats."""

import math

import pytest
import torch

from loraforge.data import IGNORE_INDEX
from loraforge.objectives import (CROSS_ENTROPY, dpo, dpo_terms, group_advantages, named_objective,
                                  policy_gradient, row_sums)

X = IGNORE_INDEX


def _log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def _batch(labels: list[list[int]], **extra) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor(labels), **{k: torch.tensor(v, dtype=torch.float32) for k, v in extra.items()}}


# Two pairs: rows 0, 1 chosen; rows 2, 3 rejected. Targets (labels ≠ -100, from position 1) per row: 2, 1, 3, 2.
LABELS = [[X, X, 5, 6, X], [X, 7, X, X, X], [X, 4, 4, 4, X], [X, X, X, 8, 9]]
LOGPROBS = torch.tensor([-1.0, -0.5, -2.0, -0.3, -0.2, -0.1, -3.0, -1.5])  # row by row
ROW_SUMS = [-1.5, -2.0, -0.6, -4.5]
REFERENCE = [-1.2, -2.5, -0.4, -4.0]


def test_row_sums_follow_the_target_order():
    assert row_sums(LOGPROBS, _batch(LABELS)).tolist() == pytest.approx(ROW_SUMS)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_sigmoid_loss_and_metrics_equal_the_formula(smoothing):
    beta = 0.3
    loss, stats = dpo(beta, "sigmoid", smoothing).loss(LOGPROBS, _batch(LABELS, reference_logprobs=REFERENCE))
    expected, accuracy, margins = 0.0, 0, 0.0
    for k in range(2):
        h = (ROW_SUMS[k] - ROW_SUMS[k + 2]) - (REFERENCE[k] - REFERENCE[k + 2])
        expected += -(1 - smoothing) * _log_sigmoid(beta * h) - smoothing * _log_sigmoid(-beta * h)
        chosen, rejected = beta * (ROW_SUMS[k] - REFERENCE[k]), beta * (ROW_SUMS[k + 2] - REFERENCE[k + 2])
        accuracy += chosen > rejected
        margins += chosen - rejected
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert stats["accuracy"] == accuracy and stats["margin"] == pytest.approx(margins, rel=1e-6)
    assert stats["chosen_logp"] == pytest.approx(ROW_SUMS[0] + ROW_SUMS[1])
    assert dpo(beta).count(_batch(LABELS)) == 2


def test_ipo_uses_per_token_averages():
    beta = 0.5
    loss, _ = dpo(beta, "ipo").loss(LOGPROBS, _batch(LABELS, reference_logprobs=REFERENCE))
    counts = [2, 1, 3, 2]
    avg = [s / n for s, n in zip(ROW_SUMS, counts)]
    ref = [s / n for s, n in zip(REFERENCE, counts)]
    expected = sum(((avg[k] - avg[k + 2]) - (ref[k] - ref[k + 2]) - 1 / (2 * beta)) ** 2 for k in range(2))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_dpo_of_the_reference_itself_is_log_2_and_pulls_towards_chosen():
    chosen, rejected = torch.tensor([-3.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _, _ = dpo_terms(chosen, rejected, chosen.detach(), rejected.detach(), beta=0.1)
    assert float(loss.detach()) == pytest.approx(math.log(2))
    loss.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()  # descending raises chosen, lowers rejected


def test_group_advantages_equal_the_formula():
    rewards = [[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]]
    got = group_advantages(torch.tensor(rewards))
    for g, group in enumerate(rewards):
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        assert got[g].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in group], abs=1e-6)
    assert group_advantages(torch.tensor(rewards), scale=False)[0].tolist() == pytest.approx([0.5, -0.5, 0, 0])


def _pg_reference(logprobs, old, advantages, per_row, low, high, beta=0.0, reference=None, per_sequence=False):
    total, position = 0.0, 0
    for row, n in enumerate(per_row):
        row_total = 0.0
        for _ in range(n):
            ratio = math.exp(logprobs[position] - old[position])
            clipped = min(max(ratio, 1 - low), 1 + high)
            term = -min(ratio * advantages[row], clipped * advantages[row])
            if beta:
                d = reference[position] - logprobs[position]
                term += beta * (math.exp(d) - d - 1)
            row_total += term
            position += 1
        total += row_total / n if per_sequence else row_total
    return total


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_gradient_equals_the_clipped_surrogate(per_sequence, beta):
    labels = [[X, X, 5, 6, 7], [X, 3, 4, X, X]]
    logprobs = torch.tensor([-1.0, -0.2, -2.0, -0.5, -0.9])
    old_flat = [-1.3, -0.2, -1.0, -0.9, -0.8]  # ratios: e^0.3 (clipped above), 1, e^-1 (clipped below), …
    ref_flat = [-1.1, -0.4, -1.8, -0.6, -1.0]
    old = [[0, 0, -1.3, -0.2, -1.0], [0, -0.9, -0.8, 0, 0]]  # aligned with labels (position t: token t)
    ref = [[0, 0, -1.1, -0.4, -1.8], [0, -0.6, -1.0, 0, 0]]
    advantages = [1.5, -0.7]
    objective = policy_gradient(0.2, 0.28, beta, per_sequence)
    batch = _batch(labels, old_logprobs=old, advantages=advantages, reference_token_logprobs=ref)
    loss, stats = objective.loss(logprobs, batch)
    expected = _pg_reference(logprobs.tolist(), old_flat, advantages, [3, 2], 0.2, 0.28, beta, ref_flat,
                             per_sequence)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert objective.count(batch) == (2 if per_sequence else 5)
    assert stats["clip_fraction"] > 0 and ("kl" in stats) == bool(beta)


def test_policy_gradient_at_ratio_one_is_reinforce_with_the_group_baseline():
    logprobs = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    batch = _batch([[X, 1, 2], [X, 3, X]], old_logprobs=[[0, -1.0, -2.0], [0, -0.5, 0]], advantages=[2.0, -1.0])
    loss, _ = policy_gradient().loss(logprobs, batch)
    loss.backward()
    assert logprobs.grad.tolist() == pytest.approx([-2.0, -2.0, 1.0])  # -A per token


def test_weighted_cross_entropy_and_names():
    batch = _batch([[X, 1, 2]], weights=[[0.0, 0.5, 2.0]])
    loss, _ = CROSS_ENTROPY.loss(torch.tensor([-1.0, -3.0]), batch)
    assert float(loss) == pytest.approx(0.5 * 1.0 + 2.0 * 3.0)
    assert named_objective("cross_entropy") is CROSS_ENTROPY
    with pytest.raises(ValueError, match="unknown loss"):
        named_objective("ppo2")
