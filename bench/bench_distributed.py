"""One process vs two under torchrun (DDP, FSDP2) on the same job: the embedded model, the demo data, the same
global batch (1 process: batch 4 × grad_accum 2; 2 processes: batch 4 × grad_accum 1 each).

    python bench/bench_distributed.py                  # 3 rounds, alternating, 20 steps each
    python bench/bench_distributed.py --rounds 1 --steps 10

Whole processes timed from outside (bench/timeline.py: wall time, peak RSS of the process tree, so a 2-process
job's memory is both ranks together). Also: the median step time from metrics.jsonl (steps 2… , the first one
warms up), whether the per-step losses of the layouts agree, and what FSDP says each rank holds.

On a CPU with few cores this is not a speed claim: the ranks share the cores one process would use, so what it
shows is the cost of the layout (communication, one thread per rank) and the memory a second copy of the process
takes (DDP) or saves (FSDP's sharded frozen weights).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timeline import run  # noqa: E402

LAYOUTS = {
    "1 process": ([sys.executable, "-m", "loraforge", "train"], ["grad_accum=2"]),
    "2 × ddp": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                 "loraforge", "train"], ["grad_accum=1", "distributed.strategy=ddp"]),
    "2 × fsdp": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                  "loraforge", "train"], ["grad_accum=1", "distributed.strategy=fsdp"]),
}


def one_run(layout: str, steps: int, work: Path, round_: int) -> dict:
    command, extra = LAYOUTS[layout]
    output = work / f"{layout.replace(' ', '').replace('×', 'x')}-{round_}"
    measured = run([*command, f"output={output}", f"max_steps={steps}", "batch_size=4", "compare=false",
                    "report=false", "tensorboard=false", f"eval_every={steps}", "lora.dropout=0", *extra], echo=False)
    if measured["exit"] != 0:
        raise SystemExit("\n".join(line["line"] for line in measured["lines"][-30:]))
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    held = next((m.groups() for line in measured["lines"]
                 if (m := re.search(r"this rank holds ([\d.,]+) MB of the ([\d.,]+) MB", line["line"]))), None)
    return {"wall_s": measured["wall_s"], "peak_mb": measured["peak_rss_mb"],
            "step_s": statistics.median(r["step_s"] for r in rows if "step_s" in r and r["step"] > 1),
            "losses": [r["train_loss"] for r in rows if "train_loss" in r], "held": held}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):  # alternating: a slow minute of the machine hits every layout alike
            for name in LAYOUTS:
                results[name].append(one_run(name, args.steps, Path(tmp), round_))
                print(f"round {round_ + 1} {name}: {results[name][-1]['wall_s']:.1f} s", flush=True)
    base = results["1 process"]
    print(f"\n| layout | wall (median of {args.rounds}) | ratio | step | ratio | peak RSS, all processes | "
          "max |loss − 1-process loss| |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        wall, step = (statistics.median(r[k] for r in runs) for k in ("wall_s", "step_s"))
        peak = statistics.median(r["peak_mb"] for r in runs)
        gap = max(abs(a - b) for r in runs for a, b in zip(r["losses"], base[0]["losses"]))
        ratio_wall = wall / statistics.median(r["wall_s"] for r in base)
        ratio_step = step / statistics.median(r["step_s"] for r in base)
        print(f"| {name} | {wall:.1f} s | {ratio_wall:.2f}× | {step:.2f} s | {ratio_step:.2f}× | {peak:,.0f} MB | "
              f"{gap:.1e} |")
    held = results["2 × fsdp"][0]["held"]
    if held:
        print(f"\nfsdp: each rank holds {held[0]} MB of the {held[1]} MB of frozen weights")


if __name__ == "__main__":
    main()
