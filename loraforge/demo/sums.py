"""The bundled reinforcement-learning task of `loraforge train stage=grpo` with no data: add two one-digit
numbers, answering briefly.

    python -m loraforge.demo.sums        # rewrites loraforge/demo/sums.jsonl (same bytes every run)

SmolLM2-135M-Instruct gets about half of these sums right, greedy, and wraps them in words ("To add 9 and 2, we
simply…", "The answer is 18."), so there is reward to gain, and its samples at temperature 0.7 vary enough for
group-relative advantages to point the way. Two rewards, summed (demo_grpo.yaml): `correct` — the last number in
the answer is the sum; `brief` — correct, and short (1 for the number alone, less for every extra character).
Rows carry the sum as `answer`, which the rewards read from the row.
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


def brief(prompt: list[dict], completion: str, row: dict) -> float:
    """`correct`, less 1/20 for every character beyond the number: 1 for "7", 0.6 for "3 + 4 = 7", 0.25 for
    "The answer is 7.", 0 from 21 extra characters on — a slope towards the number alone."""
    extra = len(completion.strip()) - len(row["answer"])
    return correct(prompt, completion, row) * max(0.0, 1.0 - extra / 20)


if __name__ == "__main__":
    target = Path(__file__).with_name("sums.jsonl")
    target.write_text("".join(json.dumps(row) + "\n" for row in make_rows()))
    print(f"wrote {target}")
