"""Where training's resident memory goes in glibc's heap, step by step, with glibc's small-block cache (tcache) as
glibc ships it and as `loraforge train` runs (off, runtime.py): what malloc has in use at each step's peak, how
large its heap is, how much of the heap is free, and the process's resident set.

    python bench/bench_heap.py                 # 12 steps of the demo job (SmolLM2, batch 8), both settings
    python bench/bench_heap.py --steps 20 --batch 4

Each setting runs in a process of its own (glibc reads GLIBC_TUNABLES when a process starts), one thread, the
training step loraforge runs (LoRA r=16 on all linear layers, bf16 frozen weights, bf16 autocast where the
hardware probe picks it, AdamW, training's mmap threshold). "in use" is glibc's mallinfo2 sampled every 0.5 ms
from a second thread, the step's largest; glibc-only (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import bench_data, load_bench_model, our_precision  # noqa: E402

SETTINGS = {"glibc's default (7 blocks per size)": "glibc.malloc.tcache_count=7",
            "loraforge train's (off)": "glibc.malloc.tcache_count=0"}
MB = 2**20


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def resident_mb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def run_steps(args) -> list[dict]:
    """This process's rows: one per step."""
    import torch

    from loraforge.attention import use_short_row_attention
    from loraforge.config import LoraConfig
    from loraforge.data import collate
    from loraforge.hardware import LARGE_BLOCK_THRESHOLD, compact_cpu_allocator
    from loraforge.loss import causal_lm_loss
    from loraforge.lora import LoraModel
    from loraforge.rms_norm import keep_rms_norm_outputs

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    compact_cpu_allocator(LARGE_BLOCK_THRESHOLD)  # as training sets it
    torch.set_num_threads(1)
    model, tokenizer = load_bench_model("default", "cpu")
    examples = bench_data(tokenizer).train.examples
    for p in model.parameters():
        p.requires_grad_(False)
    use_short_row_attention(model)
    lora = LoraModel(model, LoraConfig(r=16, alpha=32, targets="all-linear"))
    keep_rms_norm_outputs(model)  # as training does (train/trainee.py)
    amp = torch.bfloat16 if our_precision("cpu") == "bf16" else None
    if amp is not None:
        lora.store_frozen_weights(amp)
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    peak = [0]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], libc.mallinfo2().uordblks)
            time.sleep(0.0005)

    threading.Thread(target=sample, daemon=True).start()
    rows = []
    for step in range(args.steps):
        peak[0] = 0
        batch = collate(examples[step * args.batch:(step + 1) * args.batch], tokenizer.pad_token_id)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss, n = causal_lm_loss(lora.model, batch)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        info = libc.mallinfo2()
        rows.append({"step": step + 1, "in_use_peak_mb": peak[0] // MB, "heap_mb": info.arena // MB,
                     "heap_free_mb": info.fordblks // MB, "rss_mb": resident_mb()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_steps(args)))
        return
    for name, tunable in SETTINGS.items():
        environment = {**os.environ, "GLIBC_TUNABLES": tunable, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps), "--batch",
                               str(args.batch)], env=environment, capture_output=True, text=True, check=True)
        rows = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(f"\n{name}: {tunable}")
        print("| step | malloc in use, step's peak (MB) | heap (MB) | heap free (MB) | RSS (MB) |")
        print("|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['step']} | {row['in_use_peak_mb']} | {row['heap_mb']} | {row['heap_free_mb']} | "
                  f"{row['rss_mb']} |")


if __name__ == "__main__":
    main()
