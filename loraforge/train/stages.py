"""The stages by name: the one `config.stage` asks for, and its comparison after training."""

from __future__ import annotations

import torch

from loraforge.config import TrainConfig
from loraforge.train.dpo import DpoStage
from loraforge.train.dpo import compare as compare_dpo
from loraforge.train.grpo import GrpoStage
from loraforge.train.grpo import compare as compare_grpo
from loraforge.train.sft import SftStage
from loraforge.train.sft import compare as compare_sft
from loraforge.train.stage import Stage

STAGES = {"sft": (SftStage, compare_sft), "dpo": (DpoStage, compare_dpo), "grpo": (GrpoStage, compare_grpo)}


def stage_for(config: TrainConfig, device: torch.device) -> Stage:
    return STAGES[config.stage][0](config, device)


def compare_after_training(config: TrainConfig, lora, tokenizer, autocast) -> dict | None:
    """The stage's base-vs-tuned comparison on the run's test split (None when there is none): the model's
    adapter "tuned" against the base, in the precision training used."""
    return STAGES[config.stage][1](config, lora, tokenizer, autocast)
