"""stage=sft: conversations → assistant-only cross-entropy (data.py, loss.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from loraforge.atomic import write_text
from loraforge.config import TrainConfig
from loraforge.data import PreparedData, collate, read_conversations, example_order, prepare_data, write_jsonl
from loraforge.demo import default_data
from loraforge.distributed import is_main, own_block
from loraforge.evaluate import SCORING_ROWS, evaluate_loss, scoring_rows
from loraforge.loss import perplexity
from loraforge.models import gradient_checkpointing_on
from loraforge.objectives import CROSS_ENTROPY
from loraforge.train.client import TrainingClient
from loraforge.train.stage import StageData, Validation, base_side_cache, examples_per_step
from loraforge.train.state import TrainingState


def save_run_inputs(root: Path, data: PreparedData) -> None:
    for name in ("train", "validation", "test"):
        write_jsonl(getattr(data, name).conversations, root / "data" / f"{name}.jsonl")
    write_text(root / "data_report.json", json.dumps(data.report.to_dict(), indent=1))


class SftStage:
    name, objective, metric, higher_is_better = "sft", CROSS_ENTROPY, "loss", False

    def __init__(self, config: TrainConfig, device: torch.device) -> None:
        self.config, self.device = config, device

    def prepare(self, config: TrainConfig, tokenizer, run_root: Path, say: Callable[[str], None]) -> StageData:
        self.pad_id = tokenizer.pad_token_id
        data = prepare_data(config.data, tokenizer, config.max_seq_len, config.seed, default_path=default_data("sft"))
        if is_main():
            save_run_inputs(run_root, data)
        report = data.report
        summary = (f"data: {report.rows_read} rows read, {report.kept} kept ({report.rows_invalid} invalid, "
                   f"{report.duplicates_dropped} duplicates, {report.empty_turns_dropped} empty turns, "
                   f"{report.truncated} truncated) → train/validation/test {report.split_sizes}")
        self.train = data.train.examples
        return StageData(data.train.examples, data.validation.examples, data.test.examples, summary)

    def micro_batches(self, client: TrainingClient, state: TrainingState) -> list[dict[str, torch.Tensor]]:
        """The next step's micro-batches from the seeded data order; advances state.consumed."""
        return seeded_micro_batches(self.train, self.config, state, lambda rows: collate(rows, self.pad_id,
                                                                                         self.config.packing),
                                    self.device)

    def step_stats(self) -> dict[str, float]:
        return {}

    def validate(self, client: TrainingClient, rows: Sequence) -> Validation:
        # Several ranks: through the DDP / FSDP2 module (a sharded base runs only inside it).
        wrapped = client.parallel.module if client.parallel is not None else None
        rows_per_batch = scoring_rows(self.config.batch_size, gradient_checkpointing_on(client.model))
        result = evaluate_loss(client.model, rows, self.pad_id, rows_per_batch, self.device, client.autocast,
                               logprobs=wrapped)
        return Validation({"loss": result["loss"]}, result["tokens"])

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """What is not an average of parts, from the combined figures."""
        return {**metrics, "perplexity": perplexity(metrics["loss"])}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def describe(self) -> str | None:
        return None


def seeded_micro_batches(rows: list, config: TrainConfig, state: TrainingState, make_batch: Callable[[list], dict],
                         device: torch.device) -> list[dict[str, torch.Tensor]]:
    """This rank's `grad_accum` micro-batches of `batch_size` rows from the seeded endless shuffle (the step's rows
    over all ranks come next in it); advances state.consumed by the step's rows over all ranks."""
    per_step = examples_per_step(config)
    indices = example_order(len(rows), config.seed, state.consumed, per_step)
    state.consumed += per_step
    mine = own_block(indices, config.batch_size * config.grad_accum)
    return [{k: v.to(device) for k, v in make_batch([rows[i] for i in mine[k0 : k0 + config.batch_size]]).items()}
            for k0 in range(0, len(mine), config.batch_size)]


def compare(config: TrainConfig, lora, tokenizer, autocast=nullcontext) -> dict | None:
    """Base vs tuned on the held-out test conversations: loss, answer metrics, the answers (evaluation.json)."""
    from loraforge.evaluate import evaluate_models

    test = read_conversations(config.output / "data" / "test.jsonl")
    if not test:
        return None
    return evaluate_models(lora, tokenizer, test, ["tuned"], config.eval_metrics, config.compare_samples,
                           config.max_new_tokens, batch_size=SCORING_ROWS, max_seq_len=config.max_seq_len,
                           autocast=autocast, base_cache=base_side_cache(config))
