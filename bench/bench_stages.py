"""The preference and RL stages on the embedded model: what they learn and what a step costs.

    python bench/bench_stages.py                 # the RL demo at r=1 and r=16, and a DPO run
    python bench/bench_stages.py --only grpo --ranks 1

Every run is a whole `loraforge train` process (bench/timeline.py: wall time, peak RSS of the process tree):

- GRPO: the bundled demo (`loraforge train stage=grpo`: one-digit sums, rewards `correct` + `brief`, the
  number-alone rate reported) at each rank of --ranks, alpha 32; reported: base vs tuned mean reward on the
  held-out prompts (greedy), and a step's time split into sampling (generation of the group's completions),
  scoring (the rewards) and training (forward + backward + optimizer: the rest of the step).
- DPO: pairs made from the SFT demo's orders (`preference_pairs`: chosen = the JSON answer, rejected = the same
  facts as an English sentence, which the base model finds likelier: a preference it does not hold yet),
  40 steps × 4 pairs; reported: preference accuracy and margin on the validation pairs, and how often base and
  tuned give the chosen answer the higher per-token log-probability on the test pairs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timeline import run  # noqa: E402

from loraforge.demo import DEMO_DATA  # noqa: E402


def preference_pairs(path: Path, rows: int = 400) -> Path:
    """Order messages → (the JSON answer, the same facts as an English sentence)."""
    with path.open("w") as out:
        for line in DEMO_DATA.read_text().splitlines()[:rows]:
            messages = json.loads(line)["messages"]
            order = json.loads(messages[-1]["content"])
            sentence = f"{order['name']} ordered {order['quantity']} {order['item']}, to be shipped to {order['city']}."
            out.write(json.dumps({"prompt": messages[:-1], "chosen": messages[-1]["content"],
                                  "rejected": sentence}) + "\n")
    return path


def _checked(measured: dict) -> dict:
    if measured["exit"] != 0:
        raise SystemExit("\n".join(line["line"] for line in measured["lines"][-20:]))
    return measured


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def grpo(rank: int, work: Path) -> dict:
    output = work / f"grpo-r{rank}"
    measured = _checked(run([sys.executable, "-m", "loraforge", "train", "stage=grpo", f"output={output}",
                             f"lora.r={rank}", "tensorboard=false"], echo=False))
    rows = [r for r in _rows(output) if "train_sample_s" in r]
    models = json.loads((output / "evaluation.json").read_text())["models"]
    sample = statistics.median(r["train_sample_s"] for r in rows)
    score = statistics.median(r["train_score_s"] for r in rows)
    step = statistics.median(r["step_s"] for r in rows)
    return {"rank": rank, "wall_s": measured["wall_s"], "peak_mb": measured["peak_rss_mb"], "steps": len(rows),
            "base": models["base"], "tuned": models["tuned"],
            "step_s": step, "sample_s": sample, "score_s": score, "train_s": step - sample - score}


def dpo(work: Path) -> dict:
    output = work / "dpo"
    pairs = preference_pairs(work / "pairs.jsonl")
    measured = run([sys.executable, "-m", "loraforge", "train", "stage=dpo", f"data={pairs}", f"output={output}",
                    "max_steps=40", "batch_size=4", "lr=2e-4", "lora.r=16", "lora.alpha=32", "eval_every=10",
                    "max_seq_len=128", "compare_samples=40", "tensorboard=false"], echo=False)
    _checked(measured)
    validation = [r for r in _rows(output) if "val_accuracy" in r]
    models = json.loads((output / "evaluation.json").read_text())["models"]
    steps = [r["step_s"] for r in _rows(output) if "step_s" in r]
    return {"wall_s": measured["wall_s"], "peak_mb": measured["peak_rss_mb"], "step_s": statistics.median(steps),
            "val_accuracy": [(r["step"], r["val_accuracy"]) for r in validation],
            "val_margin_last": validation[-1]["val_margin"],
            "prefers_chosen": {m: models[m]["prefers_chosen"] for m in models}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["grpo", "dpo"])
    parser.add_argument("--ranks", default="1,16", help="GRPO ranks, comma-separated")
    parser.add_argument("--work", help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-stages-"))
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only in (None, "grpo"):
        results["grpo"] = [grpo(int(r), work) for r in args.ranks.split(",")]
    if args.only in (None, "dpo"):
        results["dpo"] = dpo(work)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
