"""loraforge vs PEFT + TRL on the same fine-tune, in the same run, reported as ratios.

    python bench/bench_train.py                       # SmolLM2-135M, demo data, 3 runs each, CPU
    python bench/bench_train.py --device cuda --model DIR --runs 5 --steps 60
    python bench/bench_train.py --micro               # the LoRA step against its physical bound

Same job for both: model, data (the demo split, assistant-only loss), steps, batch, lr and cosine
schedule, LoRA r=16 / alpha=32 on all linear layers, max_seq_len 128. Every run is its own process
(clean peak memory), the two tools alternate, and medians are reported. The final validation loss of
both adapters is computed by the same code (ours; the PEFT adapter is loaded through our interop).

`--model` takes a model folder; a folder holding only config.json + tokenizer gets random weights
(for GPU machines where the real weights cannot be copied: speed and memory need no trained weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH_LR = 1e-3
MAX_SEQ_LEN = 128


def load_bench_model(model: str, device: str):
    from loraforge.models import load_model

    return load_model(model, device=device)


def materialize(model: str, into: Path) -> str:
    """A folder with only config.json + tokenizer gets seeded random weights, saved once for all runs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = Path(model)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return model
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32).save_pretrained(into)
    AutoTokenizer.from_pretrained(folder).save_pretrained(into)
    return str(into)


def bench_data(tokenizer):
    from loraforge.config import DataConfig
    from loraforge.data import prepare_data
    from loraforge.demo import DEMO_DATA

    return prepare_data(DataConfig(path=DEMO_DATA), tokenizer, MAX_SEQ_LEN, seed=0)


def mean_train_tokens(model: str) -> float:
    from transformers import AutoTokenizer

    from loraforge.models import resolve_model_path

    examples = bench_data(AutoTokenizer.from_pretrained(resolve_model_path(model))).train.examples
    return sum(len(e.input_ids) for e in examples) / len(examples)


def peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_loraforge(args) -> dict:
    from loraforge.config import load_train_config
    from loraforge.train import train

    with tempfile.TemporaryDirectory() as out:
        config = load_train_config(None, [
            f"model={args.model}", f"output={out}", f"max_steps={args.steps}", f"batch_size={args.batch}",
            f"lr={BENCH_LR}", "schedule=cosine", f"eval_every={args.steps}", "compare=false", "report=false",
            "tensorboard=false", f"max_seq_len={MAX_SEQ_LEN}", "lora.r=16", "lora.alpha=32", f"device={args.device}",
            f"precision={args.precision}", "max_grad_norm=1.0",
            f"gradient_checkpointing={str(args.checkpointing).lower()}", f"packing={str(args.packing).lower()}",
            f"base_dtype={args.base_dtype}", f"compact_cpu_memory={str(args.compact_cpu_memory).lower()}"])
        start = time.perf_counter()
        result = train(config)
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "final_val_loss": result.final_val_loss, "peak_mb": peak_mb(args.device),
            "train_s": sum(r["step_s"] for r in rows if "step_s" in r), "steps": result.steps}


def run_peft_trl(args) -> dict:
    import peft
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from loraforge.evaluate import evaluate_loss

    start = time.perf_counter()
    model, tokenizer = load_bench_model(args.model, args.device)
    data = bench_data(tokenizer)
    rows = [{"prompt": c.messages[:-1], "completion": c.messages[-1:]} for c in data.train.conversations]
    with tempfile.TemporaryDirectory() as out:
        sft = SFTConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=BENCH_LR,
            lr_scheduler_type="cosine", warmup_steps=0, logging_steps=args.steps, save_strategy="no", report_to=[],
            max_length=MAX_SEQ_LEN, completion_only_loss=True, use_cpu=args.device == "cpu", seed=0,
            bf16=args.precision == "bf16", dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0,
            optim="adamw_torch_fused" if args.device.startswith("cuda") else "adamw_torch",
            # TRL turns checkpointing on by default; the same job means the same setting on both sides.
            gradient_checkpointing=args.checkpointing)
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM")
        trainer = SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             peft_config=lora)
        metrics = trainer.train().metrics
        trainer.model.save_pretrained(out + "/adapter")
        # The validation pass runs on the trained model itself (PEFT's modules, our loss code), as ours does
        # inside its job.
        val = evaluate_loss(trainer.model.base_model.model, data.validation.examples, tokenizer.pad_token_id,
                            args.batch, torch.device(args.device))["loss"]
        wall = time.perf_counter() - start
        memory = peak_mb(args.device)
    return {"wall_s": wall, "final_val_loss": val, "peak_mb": memory, "train_s": metrics["train_runtime"],
            "steps": args.steps}


def micro(args) -> dict:
    """Median seconds of: the bound (frozen forward + backward to activations), a LoRA step, a full step."""
    from loraforge.config import LoraConfig, TrainConfig
    from loraforge.loss import causal_lm_loss
    from loraforge.lora import LoraModel
    from loraforge.hardware import frozen_storage_dtype

    model, tokenizer = load_bench_model(args.model, args.device)
    data = bench_data(tokenizer)
    from loraforge.data import collate

    batch = collate(data.train.examples[: args.batch], tokenizer.pad_token_id)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    amp_dtype = torch.bfloat16 if args.precision == "bf16" else None
    device_type = torch.device(args.device).type
    autocast = lambda: torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def timed(step, repeats=args.repeats) -> float:
        step()
        times = []
        for _ in range(repeats):
            _sync(args.device)
            start = time.perf_counter()
            step()
            _sync(args.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()

    def bound():
        # Gradient w.r.t. the input activations forces the whole backward-to-activations pass, no weight grads;
        # the same loss code as the LoRA step (output head on target positions only).
        hidden = embed(batch["input_ids"]).detach().requires_grad_(True)
        with autocast():
            loss, n = causal_lm_loss(model, {**batch, "inputs_embeds": hidden})
        (loss / n).backward()

    results = {"bound_s": timed(bound)}
    lora = LoraModel(model, LoraConfig(r=16, alpha=32, targets="all-linear"))
    # The same storage training would choose (auto: the autocast dtype).
    storage = frozen_storage_dtype(TrainConfig(base_dtype=args.base_dtype), amp_dtype)
    if storage is not None:
        lora.store_frozen_weights(storage)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)

    def lora_step():
        with autocast():
            loss, n = causal_lm_loss(lora.model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    results["lora_step_s"] = timed(lora_step)
    plain = lora.unload().float()  # the full step trains the weights as loaded, whatever storage the LoRA step used
    for p in plain.parameters():
        p.requires_grad_(True)
    full_opt = torch.optim.AdamW(plain.parameters(), lr=1e-5)

    def full_step():
        with autocast():
            loss, n = causal_lm_loss(plain, batch)
        (loss / n).backward()
        full_opt.step()
        full_opt.zero_grad(set_to_none=True)

    results["full_step_s"] = timed(full_step)
    results["tokens"] = int(batch["attention_mask"].sum())
    return results


def worker(args) -> None:
    result = {"loraforge": run_loraforge, "peft": run_peft_trl, "micro": micro}[args.worker](args)
    print("RESULT " + json.dumps(result))


def spawn(args, role: str) -> dict:
    command = [sys.executable, __file__, "--worker", role, "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--device", args.device, "--precision", args.precision,
               "--repeats", str(args.repeats), "--base-dtype", args.base_dtype] + \
        [flag for flag, on in (("--checkpointing", args.checkpointing), ("--packing", args.packing),
                               ("--compact-cpu-memory", args.compact_cpu_memory)) if on]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{role} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per micro measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    parser.add_argument("--packing", action="store_true",
                        help="loraforge packs conversations padding-free (TRL keeps its default, padded batches)")
    parser.add_argument("--base-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="loraforge's base_dtype: storage of the adapted layers' frozen weights")
    parser.add_argument("--compact-cpu-memory", action="store_true",
                        help="loraforge's compact_cpu_memory: the allocator returns freed memory (lower RSS, slower)")
    parser.add_argument("--json", help="write all raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    scratch = tempfile.TemporaryDirectory()
    args.model = materialize(args.model, Path(scratch.name) / "model")

    if args.micro:
        runs = [spawn(args, "micro") for _ in range(args.runs)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| micro ({args.device}, {args.precision}, batch {args.batch}, {int(med['tokens'])} tokens) | median s |")
        print("|---|---|")
        for key in ("bound_s", "lora_step_s", "full_step_s"):
            print(f"| {key} | {med[key]:.4f} |")
        print(f"| LoRA step / bound | {med['lora_step_s'] / med['bound_s']:.2f}× |")
        print(f"| LoRA step / full fine-tuning step | {med['lora_step_s'] / med['full_step_s']:.2f}× |")
        raw = {"micro": runs}
    else:
        ours, theirs = [], []
        for _ in range(args.runs):
            ours.append(spawn(args, "loraforge"))
            theirs.append(spawn(args, "peft"))
        # Both tools consume steps × batch conversations of the same split: the same real tokens.
        tokens = args.steps * args.batch * mean_train_tokens(args.model)
        for row in ours + theirs:
            row["tokens_per_s"] = tokens / row["train_s"]
        med = lambda rows, key: statistics.median(r[key] for r in rows)
        ours_options = ", ".join(f"{k}={v}" for k, v in (("packing", args.packing), ("base_dtype", args.base_dtype),
                                                         ("compact_cpu_memory", args.compact_cpu_memory))
                                 if v not in (False, "auto"))
        print(f"| {args.steps} steps × batch {args.batch}, {args.device}/{args.precision}, checkpointing "
              f"{'on' if args.checkpointing else 'off'}, median of {args.runs}"
              f"{f' (loraforge: {ours_options})' if ours_options else ''} "
              "| loraforge | PEFT+TRL | ratio |")
        print("|---|---|---|---|")
        for key, label in (("wall_s", "job wall time, load to saved adapter (s)"), ("train_s", "training loop (s)"),
                           ("tokens_per_s", "real tokens / s in training"), ("peak_mb", "peak memory (MB)"),
                           ("final_val_loss", "final validation loss")):
            a, b = med(ours, key), med(theirs, key)
            print(f"| {label} | {a:.4g} | {b:.4g} | {a / b:.2f}× |")
        tokens_per_step = tokens / args.steps
        raw = {"loraforge": ours, "peft_trl": theirs, "tokens_per_step": tokens_per_step}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **raw}, indent=1))


if __name__ == "__main__":
    main()
