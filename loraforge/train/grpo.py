"""stage=grpo: prompt rows + a reward written in Python → group relative policy optimisation (Shao et al. 2024).

Each rollout takes the next `batch_size × grad_accum` prompts of the seeded order and samples `group_size`
completions of each from the policy (the adapter being trained) on our own engine: one continuous batch, no
merge, no weight sync, no second model. Every completion is scored by the reward function(s); advantages are
the rewards normalised within each prompt's group (objectives.group_advantages); the clipped policy-gradient
objective (objectives.policy_gradient) trains on them for `iterations` optimizer steps. The policy is the
model at the sampling temperature (logits / T, as TRL computes it), and the sampler's log-probs are π_old, so the
ratio needs no extra forward pass.

Rows: {"messages": [… ending with a user turn]} or {"prompt": "text" | [messages]}, plus any other fields; the
reward gets the raw row (e.g. a reference answer to check against):

    def reward(prompt_messages: list[dict], completion: str, row: dict) -> float
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge.advise import BITS_PER_EPISODE
from loraforge.atomic import write_text
from loraforge.config import DataConfig, TrainConfig
from loraforge.demo import DEMO_PROMPTS
from loraforge.data import (IGNORE_INDEX, DataReport, Messages, checked_rows, clean, example_order, prompt_ids, read_rows,
                            three_splits, write_rows)
from loraforge.distributed import all_gather, all_sum, is_main, own_block, rank, world_size
from loraforge.errors import ConfigError, DataError, TrainingError
from loraforge.loss import target_mask
from loraforge.models import gradient_checkpointing_on
from loraforge.objectives import CROSS_ENTROPY, group_advantages, policy_gradient
from loraforge.serve.batch import left_padded
from loraforge.serve.engine import SamplingParams
from loraforge.train.client import Datum, SharedBase, TrainingClient, batch_of
from loraforge.train.stage import StageData, Validation, examples_per_step, total_steps
from loraforge.train.state import TrainingState

RewardFunction = Callable[[Messages, str, dict], float]


# -- prompts -----------------------------------------------------------------------------------------------
@dataclass
class PromptRow:
    messages: Messages  # ends with the user turn to answer
    row: dict  # the raw data row, as the reward sees it
    source: str  # file:line
    prompt_ids: list[int] = field(default_factory=list)


def to_prompt(row: object, source: str) -> PromptRow:
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    if "messages" in row:
        turns = row["messages"]
    elif "prompt" in row:
        turns = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
    else:
        raise ValueError(f"a prompt row needs 'messages' or 'prompt' (keys {sorted(row)[:6]})")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("role"), str)
                                              and isinstance(t.get("content"), str) for t in turns):
        raise ValueError("the prompt must be a list of messages with string 'role' and 'content'")
    messages, _, _ = clean([{"role": t["role"], "content": t["content"]} for t in turns])
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the prompt must end with a non-empty user turn (the answer is what the policy samples)")
    for i, message in enumerate(messages):
        if message["role"] not in ("system", "user", "assistant") or (message["role"] == "system" and i):
            raise ValueError(f"turn {i}: role {message['role']!r} does not belong there")
    return PromptRow(messages, row, source)


def load_prompts(path: Path, config: DataConfig, report: DataReport) -> list[PromptRow]:
    prompts = [prompt for _, prompt in checked_rows(path, config, report, to_prompt)]
    report.kept += len(prompts)
    return prompts


def read_prompts(path: Path) -> list[PromptRow]:
    return [to_prompt(row, source) for source, row in read_rows(path)] if path.exists() else []


# -- rewards -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reward:
    name: str
    function: RewardFunction
    weight: float


def load_reward(spec: str) -> RewardFunction:
    """'path/to/file.py:function' or 'package.module:function'."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"grpo.reward: {spec!r} must look like file.py:function or module:function")
    try:
        if target.endswith(".py") or Path(target).is_file():
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"grpo.reward: {path} does not exist")
            module_name = f"loraforge_reward_{abs(hash(str(path.resolve())))}"
            spec_ = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[module_name] = module
            spec_.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as error:  # the user's module failed to import: say so, with what it raised
        raise ConfigError(f"grpo.reward: importing {target} failed: {type(error).__name__}: {error}") from error
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"grpo.reward: {target} has no function {name!r}")
    return function


def load_rewards(config: TrainConfig) -> list[Reward]:
    weights = config.grpo.reward_weights or [1.0] * len(config.grpo.reward)
    return [Reward(spec.rpartition(":")[2], load_reward(spec), weight)
            for spec, weight in zip(config.grpo.reward, weights)]


def score(rewards: Sequence[Reward], prompt: PromptRow, completion: str) -> tuple[float, dict[str, float]]:
    """(weighted total, each reward's value). A reward that raises or returns no finite number stops the run with
    the row, the completion and what went wrong."""
    values = {}
    for reward in rewards:
        try:
            value = reward.function(prompt.messages, completion, prompt.row)
        except Exception as error:
            raise TrainingError(f"{prompt.source}: reward {reward.name} raised {type(error).__name__}: {error} "
                                f"(completion {completion[:120]!r})") from error
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TrainingError(f"{prompt.source}: reward {reward.name} returned {value!r}, not a finite number "
                                f"(completion {completion[:120]!r})")
        values[reward.name] = float(value)
    return sum(r.weight * values[r.name] for r in rewards), values


def score_all(rewards: Sequence[Reward], prompts: Sequence[PromptRow], completions: Sequence[str]
              ) -> tuple[list[float], dict[str, float]]:
    """Each completion's weighted total (completion i answers prompts[i]), and the means: "reward" of the
    totals, "reward_<name>" of each reward's own values."""
    totals, sums = [], {r.name: 0.0 for r in rewards}
    for prompt, completion in zip(prompts, completions):
        total, values = score(rewards, prompt, completion)
        totals.append(total)
        for name, value in values.items():
            sums[name] += value
    n = max(len(totals), 1)
    return totals, {"reward": sum(totals) / n, **{f"reward_{name}": value / n for name, value in sums.items()}}


# -- the stage ---------------------------------------------------------------------------------------------
def per_token(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-target values (flattened row by row) as a [B, T] tensor aligned with labels."""
    out = torch.zeros(batch["labels"].shape, dtype=values.dtype, device=values.device)
    out[:, 1:][target_mask(batch)] = values
    return out


def shared_prompt_inputs(prompts: Sequence[list[int]], completions: Sequence[list[int]], group_size: int,
                         pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch keys that let the training forward compute each prompt once for its whole group
    (loss._at_targets_shared_prompts): prompts left-padded, completions right-padded, each row's prompt."""
    prompt_ids, prompt_mask = left_padded(prompts, pad_id, device)
    width = max(len(c) for c in completions)
    completion_ids = torch.full((len(completions), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.long)
    for i, tokens in enumerate(completions):
        completion_ids[i, : len(tokens)] = torch.tensor(tokens)
        completion_mask[i, : len(tokens)] = 1
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "prompt_index": torch.arange(len(prompts), device=device).repeat_interleave(group_size),
            "completion_ids": completion_ids.to(device), "completion_mask": completion_mask.to(device)}


class GrpoStage:
    name, metric, higher_is_better = "grpo", "reward", True

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config, self.device, self.options = config, device, config.grpo
        self.rewards = load_rewards(config)
        self.objective = policy_gradient(self.options.epsilon, self.options.epsilon_high, self.options.beta,
                                         per_sequence=self.options.loss_type == "grpo")
        self.rollout: list[dict[str, torch.Tensor]] | None = None
        self.rollout_stats: dict[str, float] = {}
        self.base: SharedBase | None = None

    def prepare(self, config: TrainConfig, tokenizer, run_root: Path, say: Callable[[str], None]) -> StageData:
        self.tokenizer = tokenizer
        report = DataReport()
        data = config.data.model_copy(update={"path": config.data.path or DEMO_PROMPTS})
        parts = three_splits(data, config.seed, lambda file: load_prompts(file, data, report))
        room = config.max_seq_len - self.options.max_new_tokens
        splits = []
        for name, part in zip(("train", "validation", "test"), parts):
            kept = []
            for prompt in part:
                prompt.prompt_ids = prompt_ids(tokenizer, prompt.messages)
                if len(prompt.prompt_ids) <= room:
                    kept.append(prompt)
            report.truncated += len(part) - len(kept)  # prompts with no room left for an answer: dropped
            report.split_sizes[name] = len(kept)
            report.tokens[name] = sum(len(p.prompt_ids) for p in kept)
            if is_main():
                write_rows([p.row for p in kept], run_root / "data" / f"{name}.jsonl")
            splits.append(kept)
        if is_main():
            write_text(run_root / "data_report.json", json.dumps(report.to_dict(), indent=1))
        if not splits[0]:
            raise DataError(f"{config.data.path or DEMO_PROMPTS}: no usable prompts")
        self.train = splits[0]
        summary = (f"data: {report.rows_read} prompt rows read, {report.kept} kept ({report.rows_invalid} invalid, "
                   f"{report.truncated} without room for a {self.options.max_new_tokens}-token answer) → "
                   f"train/validation/test prompts {report.split_sizes}")
        steps = total_steps(config, len(self.train))
        episodes = math.ceil(steps / self.options.iterations) * examples_per_step(config) * self.options.group_size
        return StageData(splits[0], splits[1], splits[2], summary, BITS_PER_EPISODE * episodes,
                         f"≈ {BITS_PER_EPISODE:g} bit per episode, {episodes} episodes sampled")

    def _base(self, client: TrainingClient) -> SharedBase:
        if self.base is None:
            self.base = SharedBase(client.trainee.lora, self.tokenizer, client.autocast)
        return self.base

    def micro_batches(self, client: TrainingClient, state: TrainingState) -> list[dict[str, torch.Tensor]]:
        if self.rollout is None or state.step % self.options.iterations == 0:
            self.rollout = self._roll_out(client, state)
        return self.rollout

    def _roll_out(self, client: TrainingClient, state: TrainingState) -> list[dict[str, torch.Tensor]]:
        """Sample the next prompts' groups (this rank's block of the step's prompts), score them, and build the
        micro-batches; advances state.consumed by the step's prompts over all ranks."""
        config, options = self.config, self.options
        started = time.perf_counter()
        per_step, mine = examples_per_step(config), config.batch_size * config.grad_accum
        order = example_order(len(self.train), config.seed, state.consumed, per_step)
        prompts = [self.train[i] for i in own_block(order, mine)]
        state.consumed += per_step
        rollout = state.step // options.iterations
        # Completion k of the step's prompt i draws from seed + i·n + k, whichever rank samples it.
        first = rank() * mine * options.group_size
        params = SamplingParams(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                top_p=options.top_p, seed=(config.seed * 1_000_003 + rollout) * 4099 + first,
                                logprobs=True)
        groups = self._base(client).sample([p.prompt_ids for p in prompts], options.group_size, params,
                                           client.adapter)
        sampled = time.perf_counter()
        totals, means = score_all(self.rewards, [p for p in prompts for _ in range(options.group_size)],
                                  [c.text for group in groups for c in group])
        rewards = torch.tensor(totals).view(len(prompts), options.group_size)
        advantages = group_advantages(rewards, options.scale_rewards)
        datums = [Datum(prompt.prompt_ids + list(c.token_ids), [IGNORE_INDEX] * len(prompt.prompt_ids) + list(c.token_ids),
                        {"old_logprobs": [0.0] * len(prompt.prompt_ids) + list(c.logprobs),
                         "advantages": float(advantages[i, k]), "temperature": options.temperature})
                  for i, (prompt, group) in enumerate(zip(prompts, groups)) for k, c in enumerate(group)]
        rows, pad = config.batch_size * options.group_size, self.tokenizer.pad_token_id
        batches = [batch_of(datums[start : start + rows], pad, self.device) for start in range(0, len(datums), rows)]
        if not gradient_checkpointing_on(client.trainee.lora.model):  # (it turns the KV cache off in training)
            completions = [list(c.token_ids) for group in groups for c in group]
            batches = [{**batch, **shared_prompt_inputs(
                [p.prompt_ids for p in prompts[k * config.batch_size : (k + 1) * config.batch_size]],
                completions[k * rows : (k + 1) * rows], options.group_size, pad, self.device)}
                for k, batch in enumerate(batches)]
        if options.beta:
            batches = [{**b, "reference_token_logprobs": per_token(client.forward(b, CROSS_ENTROPY, adapter=False)
                                                                   .logprobs, b)} for b in batches]
        stats = {
            **means, "reward_std": float(rewards.std(dim=1).mean()),
            "completion_tokens": sum(len(c.token_ids) for g in groups for c in g) / rewards.numel(),
            "groups_without_signal": float((rewards.std(dim=1) == 0).float().mean()),
            "sample_s": sampled - started, "score_s": time.perf_counter() - sampled}
        # Every rank's share is the same size: the step's means are the means of the ranks' means.
        self.rollout_stats = dict(zip(stats, (v / world_size() for v in all_sum(list(stats.values())))))
        return batches

    def step_stats(self) -> dict[str, float]:
        stats, self.rollout_stats = self.rollout_stats, {}  # once per rollout, on the step that sampled it
        return stats

    @torch.no_grad()
    def validate(self, client: TrainingClient, rows: Sequence[PromptRow]) -> Validation:
        """Greedy answers of the policy to the validation prompts: their mean reward (and each reward's)."""
        answers = self._base(client).sample([p.prompt_ids for p in rows], 1,
                                            SamplingParams(max_new_tokens=self.options.max_new_tokens),
                                            client.adapter)
        _, means = score_all(self.rewards, rows, [answer.text for (answer,) in answers])
        return Validation(means, len(rows))

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The rollout being trained on, when the next step reuses it (iterations > 1): a resume mid-cycle trains
        on the same completions."""
        if self.rollout is None or self.options.iterations == 1:
            return {}
        # Every rank's micro-batches, in the step's order: a resume on another number of ranks splits them anew.
        batches = [batch for part in all_gather([{k: v.cpu() for k, v in b.items()} for b in self.rollout])
                   for batch in part]
        return {f"rollout.{i}.{key}": value for i, batch in enumerate(batches) for key, value in batch.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        batches: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            _, index, key = name.split(".", 2)
            batches.setdefault(int(index), {})[key] = value.to(self.device)
        ordered = [batches[i] for i in sorted(batches)]
        self.rollout = list(own_block(ordered, len(ordered) // world_size())) if batches else None

    def describe(self) -> str | None:
        options = self.options
        rewards = ", ".join(f"{r.name} × {r.weight:g}" for r in self.rewards)
        return (f"stage grpo: {examples_per_step(self.config)} prompts × {options.group_size} "
                f"completions per rollout (temperature {options.temperature}, ≤ {options.max_new_tokens} tokens), "
                f"{options.iterations} step(s) per rollout, clip ε {options.epsilon}, KL β {options.beta}, loss "
                f"{options.loss_type}; rewards: {rewards}")


# -- after training ----------------------------------------------------------------------------------------
@torch.no_grad()
def compare(config: TrainConfig, lora, tokenizer, autocast=nullcontext) -> dict | None:
    """Base vs tuned on the held-out prompts: greedy answers of both in the same batches, and their rewards."""
    prompts = read_prompts(config.output / "data" / "test.jsonl")[: config.compare_samples]
    if not prompts:
        return None
    rewards = load_rewards(config)
    ids = [prompt_ids(tokenizer, p.messages) for p in prompts]
    base = SharedBase(lora, tokenizer, autocast)
    labels = {"base": None, "tuned": "tuned"}
    answers = base.sample(ids * 2, 1, SamplingParams(max_new_tokens=config.grpo.max_new_tokens),
                          [None] * len(ids) + ["tuned"] * len(ids))
    models, texts = {}, {}
    for offset, label in enumerate(labels):
        texts[label] = [answers[offset * len(ids) + i][0].text for i in range(len(ids))]
        models[label] = score_all(rewards, prompts, texts[label])[1]
    reference_key = next((k for k in ("answer", "solution", "reference") if k in prompts[0].row), None)
    samples = [{"prompt": p.messages[-1]["content"], "reference": str(p.row.get(reference_key, "")) if reference_key
                else "", "answers": {label: texts[label][i] for label in labels}} for i, p in enumerate(prompts)]
    return {"n": len(prompts), "metric_names": list(models["base"]), "models": models, "samples": samples}
