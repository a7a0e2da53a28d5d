"""The bundled demo task for `loraforge train` with no arguments: JSON extraction from short customer orders.

`orders.jsonl` holds 1,200 chat conversations (system / user / assistant). The user writes a one-line order in
one of many phrasings; the assistant answers with compact JSON whose keys (name, item, quantity, city) are never
named in the prompt, so the base model cannot guess the schema and fine-tuning has something visible to teach.
Regenerate the file with `python -m loraforge.demo.make_dataset` (deterministic: same bytes every run).

`loraforge train stage=grpo` with no data learns `sums.jsonl` (one-digit sums, answered briefly) from the rewards
in sums.py, with demo_grpo.yaml's settings (rank 1).
"""

from pathlib import Path

DEMO_DATA = Path(__file__).with_name("orders.jsonl")
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")  # training settings used when no data is given
# stage=grpo with no data: one-digit sums, answered briefly (sums.py holds the task and its rewards).
DEMO_PROMPTS = Path(__file__).with_name("sums.jsonl")
DEMO_GRPO_CONFIG = Path(__file__).with_name("demo_grpo.yaml")



def default_data(stage: str) -> Path | None:
    """The bundled data a stage trains on when no data is given (DPO has none)."""
    return {"sft": DEMO_DATA, "grpo": DEMO_PROMPTS}.get(stage)


def demo_config(stage: str) -> Path | None:
    """The bundled settings of `loraforge train [stage=…]` with no data."""
    return {"sft": DEMO_CONFIG, "grpo": DEMO_GRPO_CONFIG}.get(stage)


__all__ = ["DEMO_CONFIG", "DEMO_DATA", "DEMO_GRPO_CONFIG", "DEMO_PROMPTS", "default_data", "demo_config"]
