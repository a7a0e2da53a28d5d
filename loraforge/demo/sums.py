"""The bundled reinforcement-learning task of `loraforge train stage=grpo` with no data: add two one-digit
numbers and reply with the number alone.

    python -m loraforge.demo.sums        # rewrites loraforge/demo/sums.jsonl (same bytes every run)

SmolLM2-135M-Instruct mostly gets the sum right but never answers with the number alone ("3 + 4 = 7", "The
answer is 7."), so there is a reward to gain that a greedy base does not collect, and enough variety in its
samples for group-relative advantages to point the way. Two rewards, summed (the demo config weighs them):
`correct` — the last number in the answer is the sum; `only_the_number` — the answer is that number and nothing
else. Rows carry the sum as `answer`, which the rewards read from the row.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

SEED = 4242
PHRASINGS = (
    "What is {a} + {b}? Reply with only the number.",
    "Add {a} and {b}. Answer with just the number.",
    "{a} plus {b} = ? Give only the number.",
    "Compute {a} + {b}. Reply with the number alone.",
)


def make_rows() -> list[dict]:
    rng = random.Random(SEED)
    pairs = [(a, b) for a in range(1, 10) for b in range(1, 10)]
    rows = []
    for phrasing in PHRASINGS:
        for a, b in pairs:
            rows.append({"messages": [{"role": "user", "content": phrasing.format(a=a, b=b)}], "answer": str(a + b)})
    rng.shuffle(rows)
    return rows


def _numbers(text: str) -> list[str]:
    return re.findall(r"-?\d+", text)


def correct(prompt: list[dict], completion: str, row: dict) -> float:
    """1 when the last number in the completion is the sum."""
    numbers = _numbers(completion)
    return float(bool(numbers) and numbers[-1] == row["answer"])


def only_the_number(prompt: list[dict], completion: str, row: dict) -> float:
    """1 when the completion is the sum and nothing else (surrounding whitespace and a final period allowed)."""
    return float(completion.strip().rstrip(".") == row["answer"])


if __name__ == "__main__":
    target = Path(__file__).with_name("sums.jsonl")
    target.write_text("".join(json.dumps(row) + "\n" for row in make_rows()))
    print(f"wrote {target}")
