"""The bundled demo task for `loraforge train` with no arguments: JSON extraction from short customer orders.

`orders.jsonl` holds 1,200 chat conversations (system / user / assistant). The user writes a one-line order in
one of many phrasings; the assistant answers with compact JSON whose keys (name, item, quantity, city) are never
named in the prompt, so the base model cannot guess the schema and fine-tuning has something visible to teach.
Regenerate the file with `python -m loraforge.demo.make_dataset` (deterministic: same bytes every run).
"""

from pathlib import Path

DEMO_DATA = Path(__file__).with_name("orders.jsonl")
DEMO_CONFIG = Path(__file__).with_name("demo.yaml")  # training settings used when no data is given

__all__ = ["DEMO_CONFIG", "DEMO_DATA"]
