"""stage=dpo: preference pairs → DPO against the base with the adapter switched off (no second model in memory).

Rows, as TRL's preference datasets (JSONL or a JSON list; checked row by row, errors name file:line):
    {"prompt": [messages…], "chosen": [assistant turn(s)], "rejected": [assistant turn(s)]}   conversational
    {"prompt": "text", "chosen": "text", "rejected": "text"}                                  plain strings
    {"chosen": [whole conversation], "rejected": [whole conversation]}                       implicit prompt
Each side is tokenized as prompt + completion with loss on the completion only; a step's micro-batch holds its
pairs' chosen rows, then their rejected rows (objectives.dpo), and the reference log-probabilities come from a
no-gradient pass of the same model with the adapter off.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.advise import BITS_PER_EPISODE
from loraforge.atomic import write_text
from loraforge.config import DataConfig, TrainConfig
from loraforge.data import (IGNORE_INDEX, DataReport, Example, Messages, checked_rows, clean, collate, read_rows,
                            three_splits, tokenize, validate, write_rows)
from loraforge.distributed import is_main
from loraforge.errors import DataError
from loraforge.loss import token_logprobs
from loraforge.objectives import CROSS_ENTROPY, dpo, row_sums, sequence_logprobs
from loraforge.train.client import TrainingClient
from loraforge.train.sft import seeded_micro_batches
from loraforge.train.stage import StageData, Validation, base_side_cache, examples_per_step, total_steps
from loraforge.train.state import TrainingState


@dataclass
class PreferencePair:
    prompt: Messages
    chosen: Messages  # the completion turns after the prompt
    rejected: Messages
    source: str  # file:line

    def to_row(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class TokenizedPair:
    chosen: Example
    rejected: Example
    pair: PreferencePair


# -- reading -----------------------------------------------------------------------------------------------
def _side(value: object, key: str) -> Messages:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        turns = []
        for i, turn in enumerate(value):
            if not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                raise ValueError(f"{key!r} turn {i} needs string 'role' and 'content'")
            turns.append({"role": turn["role"], "content": turn["content"]})
        return turns
    raise ValueError(f"{key!r} must be a string or a non-empty list of messages")


def to_pair(row: object, source: str) -> PreferencePair:
    """A row as a prompt and two completions; ValueError with the reason when it is not one."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        raise ValueError(f"a preference row needs 'chosen' and 'rejected' (missing {missing}; keys "
                         f"{sorted(row)[:6]})")
    chosen, rejected = _side(row["chosen"], "chosen"), _side(row["rejected"], "rejected")
    if "prompt" in row:
        prompt = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else \
            _side(row["prompt"], "prompt")
    else:  # implicit prompt: the turns both conversations share, up to the last assistant answer
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    prompt, _, _ = clean(prompt)
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        cleaned, _, _ = clean(side)
        if not cleaned or any(t["role"] != "assistant" for t in cleaned):
            raise ValueError(f"{name!r} must be a non-empty assistant answer (after the prompt)")
        validate(prompt + cleaned)
    chosen, rejected = clean(chosen)[0], clean(rejected)[0]
    if chosen == rejected:
        raise ValueError("'chosen' and 'rejected' are the same answer: the pair prefers nothing")
    return PreferencePair(prompt, chosen, rejected, source)


def load_pairs(path: Path, config: DataConfig, report: DataReport) -> list[PreferencePair]:
    pairs, seen = [], set()
    for _, pair in checked_rows(path, config, report, to_pair):
        key = json.dumps(pair.to_row(), sort_keys=True, ensure_ascii=False)
        if config.dedupe and key in seen:
            report.duplicates_dropped += 1
            continue
        seen.add(key)
        pairs.append(pair)
    report.kept += len(pairs)
    report.formats["preference"] = report.formats.get("preference", 0) + len(pairs)
    return pairs


def tokenize_pair(tokenizer, pair: PreferencePair, max_seq_len: int) -> TokenizedPair | None:
    """Both sides with loss on the completion only; None when truncation leaves either side no target."""
    sides = [tokenize(tokenizer, pair.prompt + side, max_seq_len, from_turn=len(pair.prompt))
             for side in (pair.chosen, pair.rejected)]
    if any(all(label == IGNORE_INDEX for label in e.labels) for e in sides):
        return None
    return TokenizedPair(sides[0], sides[1], pair)


def pair_batch(pairs: Sequence[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, as objectives.dpo reads them."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id)


def read_pairs(path: Path) -> list[PreferencePair]:
    return [to_pair(row, source) for source, row in read_rows(path)] if path.exists() else []


# -- the stage ---------------------------------------------------------------------------------------------
class DpoStage:
    name, metric, higher_is_better = "dpo", "loss", False

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        options = config.dpo
        self.objective = dpo(options.beta, options.loss, options.label_smoothing)

    def prepare(self, config: TrainConfig, tokenizer, run_root: Path, say: Callable[[str], None]) -> StageData:
        if config.data.path is None:
            raise DataError("stage=dpo needs preference data: data=pairs.jsonl (rows with prompt, chosen, rejected)")
        self.pad_id = tokenizer.pad_token_id
        report = DataReport()
        parts = three_splits(config.data, config.seed, lambda file: load_pairs(file, config.data, report))
        splits = []
        for name, part in zip(("train", "validation", "test"), parts):
            tokenized = [t for t in (tokenize_pair(tokenizer, p, config.max_seq_len) for p in part) if t is not None]
            report.dropped_no_target += len(part) - len(tokenized)
            report.split_sizes[name] = len(tokenized)
            report.tokens[name] = sum(len(t.chosen.input_ids) + len(t.rejected.input_ids) for t in tokenized)
            if is_main():
                write_rows([t.pair.to_row() for t in tokenized], run_root / "data" / f"{name}.jsonl")
            splits.append(tokenized)
        if is_main():
            write_text(run_root / "data_report.json", json.dumps(report.to_dict(), indent=1))
        if not splits[0]:
            raise DataError(f"{config.data.path}: no usable preference pairs")
        self.train = splits[0]
        summary = (f"data: {report.rows_read} preference rows read, {report.kept} kept ({report.rows_invalid} "
                   f"invalid, {report.duplicates_dropped} duplicates, {report.dropped_no_target} cut off) → "
                   f"train/validation/test pairs {report.split_sizes}")
        # A preference label carries at most one bit; the adapter has to hold no more than that.
        pairs_trained = total_steps(config, len(self.train)) * examples_per_step(config)
        return StageData(splits[0], splits[1], splits[2], summary, BITS_PER_EPISODE * pairs_trained,
                         f"≈ {BITS_PER_EPISODE:g} bit per preference pair, {pairs_trained} pairs trained")

    def _with_reference(self, client: TrainingClient, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        reference = client.forward(batch, CROSS_ENTROPY, adapter=False).logprobs
        return {**batch, "reference_logprobs": row_sums(reference, batch)}

    def micro_batches(self, client: TrainingClient, state: TrainingState) -> list[dict[str, torch.Tensor]]:
        batches = seeded_micro_batches(self.train, self.config, state, lambda rows: pair_batch(rows, self.pad_id),
                                       self.device)
        return [self._with_reference(client, b) for b in batches]

    def step_stats(self) -> dict[str, float]:
        return {}

    def validate(self, client: TrainingClient, rows: Sequence[TokenizedPair]) -> Validation:
        sums: dict[str, float] = {}
        for start in range(0, len(rows), self.config.batch_size):
            batch = {k: v.to(self.device) for k, v in pair_batch(rows[start : start + self.config.batch_size],
                                                                 self.pad_id).items()}
            result = client.forward(self._with_reference(client, batch), self.objective)
            for key, value in {"loss": result.loss, **result.stats}.items():
                sums[key] = sums.get(key, 0.0) + value
        return Validation({k: v / max(len(rows), 1) for k, v in sums.items()}, len(rows))

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def describe(self) -> str | None:
        options = self.config.dpo
        return (f"stage dpo: loss {options.loss}, beta {options.beta}, label smoothing {options.label_smoothing}; "
                "reference = the base with the adapter off")


# -- after training ----------------------------------------------------------------------------------------
@torch.no_grad()
def compare(config: TrainConfig, lora, tokenizer, autocast=nullcontext) -> dict | None:
    """Base vs tuned on the held-out pairs: how often each model gives the chosen answer the higher log-probability
    per token (averaged, so that length does not decide), and their answers to the prompts scored against the
    chosen answer."""
    from loraforge.data import Conversation
    from loraforge.evaluate import SCORING_ROWS, evaluate_models

    pairs = read_pairs(config.output / "data" / "test.jsonl")[: config.compare_samples]
    if not pairs:
        return None
    tokenized = [t for t in (tokenize_pair(tokenizer, p, config.max_seq_len) for p in pairs) if t is not None]
    conversations = [Conversation(t.pair.prompt + t.pair.chosen, t.pair.source) for t in tokenized]
    evaluation = evaluate_models(lora, tokenizer, conversations, ["tuned"], config.eval_metrics, len(conversations),
                                 config.max_new_tokens, batch_size=SCORING_ROWS, max_seq_len=config.max_seq_len,
                                 autocast=autocast, base_cache=base_side_cache(config))
    device = next(lora.parameters()).device
    was_training = lora.training
    lora.eval()
    for label, adapter in (("base", None), ("tuned", "tuned")):
        preferred = 0
        for start in range(0, len(tokenized), 16):
            batch = {k: v.to(device) for k, v in pair_batch(tokenized[start : start + 16], tokenizer.pad_token_id).items()}
            with lora.using(adapter), autocast():
                means = sequence_logprobs(token_logprobs(lora.model, batch), batch, average=True)
            k = means.shape[0] // 2
            preferred += int((means[:k] > means[k:]).sum())
        evaluation["models"][label]["prefers_chosen"] = preferred / max(len(tokenized), 1)
    lora.train(was_training)
    evaluation["metric_names"] = ["prefers_chosen", *evaluation["metric_names"]]
    return evaluation
