"""Serving throughput: many adapters in mixed batches vs one merged model vs PEFT's generate(adapter_names=...).

    python bench/bench_serve.py                        # SmolLM2-135M-Instruct, CPU: 16 adapters r=16, 3 runs
    python bench/bench_serve.py --random-weights --rank 8 --requests 64 --max-tokens 32 --runs 5 --threads 1

The same load for all three: `--requests` chat prompts from the bundled demo data, each answered with exactly
`--max-tokens` tokens (the end-of-sequence token is ignored, so every side does the same work), at most
`--batch` rows at a time, greedy.
  mixed   loraforge's serving engine, request i on adapter i mod N (every batch mixes all N adapters)
  merged  the same engine on a plain model with one adapter merged in (no LoRA work at all)
  peft    PEFT's PeftModel with the same N adapters, `generate(adapter_names=...)` in static batches
Tokens/s = generated tokens / wall time of the whole load; the runs alternate and medians are reported. A
second check compares, per adapter, the engine's greedy answer (eos honoured) with the single-row offline
`generate` answer (`loraforge chat`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from loraforge import LoraConfig, LoraModel
from loraforge.data import render
from loraforge.evaluate import generate_answers
from loraforge.models import load_model, resolve_model_path
from loraforge.serve.engine import Engine, Finished, Generation, SamplingParams


def load_base(args):
    """The base model; with --random-weights, its architecture with seeded random weights."""
    model, tokenizer = load_model(args.model)
    if args.random_weights:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    return model.to(args.device), tokenizer


def write_adapters(args, folder: Path) -> list[Path]:
    """N LoRA adapters on every linear layer: A as initialised, B random and non-zero."""
    model, _ = load_base(args)
    lora = LoraModel(model)
    generator = torch.Generator().manual_seed(0)
    folders = []
    for k in range(args.adapters):
        name = f"skill{k}"
        lora.add_adapter(name, LoraConfig(r=args.rank, alpha=2 * args.rank, targets="all-linear"))
        with torch.no_grad():
            for _, layer in lora.lora_layers():
                b = layer.factors(name)[1]
                b.copy_(torch.randn(b.shape, generator=generator) * args.b_std)
        lora.save(folder, [name])  # a named adapter goes to folder/name
        folders.append(folder / name)
    return folders


def chat_prompts(tokenizer, count: int) -> list[list[dict]]:
    from loraforge.data import read_rows, to_messages
    from loraforge.demo import DEMO_DATA

    rows = [to_messages(row, "messages") for _, row in read_rows(DEMO_DATA)]
    return [[m for m in messages if m["role"] != "assistant"] for messages in rows[:count]]


def engine_for(lora: LoraModel, tokenizer, args) -> Engine:
    engine = Engine(lora, tokenizer, max_batch=args.batch, threads=args.threads)
    engine.start()
    return engine


def run_engine(engine: Engine, prompt_ids: list[list[int]], adapters: list[str | None], max_tokens: int,
               ignore_eos: bool = True) -> tuple[int, float, list[Finished]]:
    params = SamplingParams(max_new_tokens=max_tokens, ignore_eos=ignore_eos)
    generations = [Generation(ids, adapter, params, strip=True) for ids, adapter in zip(prompt_ids, adapters)]
    start = time.perf_counter()
    results = engine.generate(generations)
    seconds = time.perf_counter() - start
    failed = [r for r in results if not isinstance(r, Finished)]
    if failed:
        raise RuntimeError(f"the engine failed: {failed[0]}")
    return sum(r.completion_tokens for r in results), seconds, results


def run_peft(peft_model, tokenizer, texts: list[str], adapters: list[str], max_tokens: int,
             batch: int) -> tuple[int, float]:
    tokenizer.padding_side = "left"
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(texts), batch):
            inputs = tokenizer(texts[first : first + batch], return_tensors="pt", padding=True,
                               add_special_tokens=False).to(peft_model.device)
            out = peft_model.generate(**inputs, adapter_names=adapters[first : first + batch],
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
            tokens += out[:, inputs["input_ids"].shape[1] :].numel()
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--random-weights", action="store_true", help="the model's config with random weights")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--b-std", type=float, default=0.02, help="std of the random B factors")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    workdir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    folders = write_adapters(args, workdir)
    names = [f.name for f in folders]
    model, tokenizer = load_base(args)
    lora = LoraModel(model)
    for folder in folders:
        lora.load_adapter(folder, folder.name)
    lora.set_active([])
    merged_model, _ = load_base(args)
    merged = LoraModel(LoraModel.from_pretrained(merged_model, folders[0]).merge_and_unload())

    conversations = chat_prompts(tokenizer, args.requests)
    texts = [render(tokenizer, messages, generation_prompt=True) for messages in conversations]
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    adapters = [names[i % len(names)] for i in range(len(texts))]
    # each system answers the first n requests with max_tokens tokens each
    systems = {"mixed": lambda n, max_tokens: run_engine(mixed_engine, prompt_ids[:n], adapters[:n], max_tokens)[:2],
               "merged": lambda n, max_tokens: run_engine(merged_engine, prompt_ids[:n], [None] * n, max_tokens)[:2]}
    mixed_engine, merged_engine = engine_for(lora, tokenizer, args), engine_for(merged, tokenizer, args)
    if not args.skip_peft:
        from peft import PeftModel

        peft_base, _ = load_base(args)
        peft_model = PeftModel.from_pretrained(peft_base, str(folders[0]), adapter_name=names[0])
        for folder in folders[1:]:
            peft_model.load_adapter(str(folder), adapter_name=folder.name)
        peft_model.eval()
        systems["peft"] = lambda n, max_tokens: run_peft(peft_model, tokenizer, texts[:n], adapters[:n], max_tokens,
                                                         args.batch)

    print(f"{resolve_model_path(args.model).name}{' (random weights)' if args.random_weights else ''}: "
          f"{args.adapters} adapters r={args.rank}, {args.requests} requests × {args.max_tokens} tokens, batch "
          f"{args.batch}, {args.device}, {torch.get_num_threads()} threads", flush=True)
    for run in systems.values():  # warm-up: first calls allocate and dispatch slowly
        run(min(4, len(texts)), 2)
    results: dict[str, list[float]] = {name: [] for name in systems}
    for repeat in range(args.runs):
        for name, run in systems.items():
            tokens, seconds = run(len(texts), args.max_tokens)
            results[name].append(tokens / seconds)
            print(f"  run {repeat + 1} {name:>6}: {tokens} tokens in {seconds:6.2f} s = {tokens / seconds:7.1f} tok/s",
                  flush=True)

    equal = 0
    check = [names[k % len(names)] for k in range(min(args.adapters, len(texts)))]
    _, _, answers = run_engine(mixed_engine, prompt_ids[: len(check)], check, args.max_tokens, ignore_eos=False)
    for messages, name, answer in zip(conversations, check, answers):
        with lora.using(name):
            offline = generate_answers(lora, tokenizer, [messages], max_new_tokens=args.max_tokens, batch_size=1)[0]
        equal += offline == answer.text
    mixed_engine.shutdown()
    merged_engine.shutdown()

    medians = {name: statistics.median(values) for name, values in results.items()}
    summary = {"model": args.model, "random_weights": args.random_weights, "adapters": args.adapters,
               "rank": args.rank, "requests": args.requests, "max_tokens": args.max_tokens, "batch": args.batch,
               "threads": torch.get_num_threads(), "runs": args.runs, "tokens_per_s": results,
               "median_tokens_per_s": medians, "mixed_vs_merged": medians["mixed"] / medians["merged"],
               "greedy_equal_offline": f"{equal}/{len(check)}"}
    if "peft" in medians:
        summary["mixed_vs_peft"] = medians["mixed"] / medians["peft"]
    print("median tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in medians.items()))
    print(f"mixed / merged = {summary['mixed_vs_merged']:.2f}"
          + (f"; mixed / peft = {summary['mixed_vs_peft']:.2f}" if "peft" in medians else ""))
    print(f"greedy answers equal to offline single-row generate: {summary['greedy_equal_offline']}")
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    sys.exit(main())
