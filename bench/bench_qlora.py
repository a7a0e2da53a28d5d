"""QLoRA vs LoRA on the same job: size of the frozen base, peak memory and time of a training step.

    python bench/bench_qlora.py                         # SmolLM2-135M, demo data, batch 8, CPU
    python bench/bench_qlora.py --device cuda --model DIR --steps 10

Every variant (quant none / nf4 / int8) runs in its own process, so peaks do not mix. Memory is the
process's resident set sampled during the steps on CPU (its level before the first step is the model at
rest), torch's max allocated on CUDA. On CPU the workers run with a fixed glibc mmap threshold, so that
every large tensor is its own mapping and freeing it lowers the resident set: otherwise the float weights
that quantization frees stay in the heap and the RSS shows them. The adapter is the demo's: r=16 on all
linear layers, max_seq_len 128.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def measure(model_name: str, quant: str, device: str, steps: int, batch_size: int) -> dict:
    import psutil

    from loraforge.config import load_train_config
    from loraforge.data import collate, prepare_data
    from loraforge.demo import DEMO_CONFIG, DEMO_DATA
    from loraforge.evaluate import PeakMemory
    from loraforge.loss import causal_lm_loss
    from loraforge.lora import LoraModel
    from loraforge.models import load_model
    from loraforge.quant import frozen_weight_bytes

    config = load_train_config(DEMO_CONFIG, [f"model={model_name}", f"batch_size={batch_size}"])
    model, tokenizer = load_model(model_name, device=device, quant=quant)
    sizes = frozen_weight_bytes(model)
    data = prepare_data(config.data, tokenizer, config.max_seq_len, 0, default_path=DEMO_DATA)
    lora = LoraModel(model, config.lora)
    lora.train()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=config.lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    rest_mb = (torch.cuda.memory_allocated() if device == "cuda" else psutil.Process().memory_info().rss) / 2**20
    times = []
    with PeakMemory(torch.device(device)) as peak:
        for step in range(steps):
            batch = collate(data.train.examples[step * batch_size:(step + 1) * batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            start = time.perf_counter()
            with autocast:
                loss, count = causal_lm_loss(lora.model, batch)
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"quant": quant, "frozen_mb": (sizes.quantized + sizes.other) / 2**20, "frozen_vs_bf16": sizes.total_ratio,
            "quantized_vs_bf16": sizes.ratio, "rest_mb": rest_mb, "peak_mb": peak.peak_mb,
            "step_s": statistics.median(times[1:] or times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quants", default="none,nf4,int8")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.model, args.worker, args.device, args.steps, args.batch_size)))
        return
    rows = []
    for quant in args.quants.split(","):
        command = [sys.executable, __file__, "--worker", quant, "--model", args.model, "--device", args.device,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: large tensors always mmapped
        output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    plain = rows[0]
    print(f"{'quant':6} {'frozen MB':>10} {'vs bf16':>8} {'linears':>8} {'at rest MB':>11} {'step peak MB':>13} "
          f"{'vs LoRA':>8} {'step s':>7}")
    for row in rows:
        print(f"{row['quant']:6} {row['frozen_mb']:10.1f} {row['frozen_vs_bf16']:8.2f} {row['quantized_vs_bf16']:8.2f} "
              f"{row['rest_mb']:11.0f} {row['peak_mb']:13.0f} {row['peak_mb'] / plain['peak_mb']:8.2f} "
              f"{row['step_s']:7.2f}")


if __name__ == "__main__":
    main()
