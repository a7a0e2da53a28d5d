"""Memory over a longer run whose rows vary in length: `loraforge train` (training only) with oneDNN's per-shape
caches bounded (loraforge's default, runtime.bound_onednn_caches) against torch's own defaults (1,024 entries
each, set through the environment, which loraforge leaves alone), alternating, medians.

    python bench/bench_memory.py                       # 100 steps × batch 8, 3 rounds
    python bench/bench_memory.py --steps 40 --runs 2

The data: chat rows whose answers repeat a word 2–150 times (prompts and answers from 20 to ~330 tokens), so
nearly every batch has a sequence length not seen before — as real chat data does. Every new length compiles
~25 new matmul primitives in oneDNN (bf16 on CPU); unbounded, they stay. Whole processes, timed from outside,
peak resident set sampled every 50 ms (bench/timeline.py); the RSS column "last quarter" is the largest sample
in the run's last quarter, "second quarter" in its second: their difference is how far memory still grew.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import timeline  # noqa: E402  (bench/timeline.py, next to this file)

WORDS = ["apple", "river", "stone", "cloud", "lamp", "garden", "window", "paper"]
UNBOUNDED = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"}  # torch's own defaults


def write_varied_data(path: Path, rows: int = 1200, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(rows):
            word, count = rng.choice(WORDS), rng.randint(2, 150)
            messages = [{"role": "user", "content": f"Write the word {word} {count} times."},
                        {"role": "assistant", "content": " ".join([word] * count)}]
            out.write(json.dumps({"messages": messages}) + "\n")


def quarter_peak(samples: list[tuple[float, int]], quarter: int) -> int:
    end = samples[-1][0]
    inside = [rss for t, rss in samples if (quarter - 1) * end / 4 <= t < quarter * end / 4]
    return max(inside, default=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp())
    data = scratch / "varied.jsonl"
    write_varied_data(data)
    command = [str(Path(sys.executable).with_name("loraforge")), "train", "model=default", f"data.path={data}",
               f"max_steps={args.steps}", f"batch_size={args.batch}", "lr=1e-3", "data.split=[0.9,0.0,0.1]",
               "compare=false", "report=false", "tensorboard=false", "overwrite=true"]
    settings = {"bounded (loraforge's default: 64 entries)": {},
                "torch's defaults (1,024 entries)": UNBOUNDED}
    results: dict[str, list[dict]] = {name: [] for name in settings}
    for run in range(args.runs):
        for name, env in settings.items():
            os.environ.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
            os.environ.pop("LRU_CACHE_CAPACITY", None)
            os.environ.update(env)
            result = timeline.run([*command, f"output={scratch / 'run'}"], echo=False)
            if result["exit"]:
                raise SystemExit("\n".join(line["line"] for line in result["lines"][-30:]))
            samples = result["rss"]
            results[name].append({"wall_s": result["wall_s"], "peak_mb": result["peak_rss_mb"],
                                  "q2_mb": quarter_peak(samples, 2), "q4_mb": quarter_peak(samples, 4)})
            print(f"round {run + 1}, {name}: {results[name][-1]}", file=sys.stderr, flush=True)
    print(f"| {args.steps} steps × batch {args.batch}, varied lengths, training only, median of {args.runs} "
          "| wall (s) | peak RSS (MB) | second quarter (MB) | last quarter (MB) |")
    print("|---|---|---|---|---|")
    for name, rows in results.items():
        med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"| {name} | {med['wall_s']:.1f} | {med['peak_mb']:,.0f} | {med['q2_mb']:,.0f} | {med['q4_mb']:,.0f} |")


if __name__ == "__main__":
    main()
