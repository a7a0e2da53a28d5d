"""loraforge vs PEFT + TRL on the same fine-tune: whole processes, timed from outside, reported as ratios.

    python bench/bench_train.py --steps 20 --runs 3      # SmolLM2-135M, demo data, CPU
    python bench/bench_train.py --device cuda --model DIR --steps 60
    python bench/bench_train.py --micro                  # the LoRA step against its physical bound

Each row is one command a user would run, started as its own process; the wall time runs from the process's
start (imports included) to its exit and the peak memory is the process's largest resident set (sampled every
50 ms by bench/timeline.py; on CUDA the worker also reports max allocated). The rows alternate, and medians of
--runs are reported:

- `loraforge train` — the default job: the demo's settings with --steps, validation, capacity advice, the
  base-vs-tuned comparison on held-out prompts and the report included, as on a user's first run (the base
  model's side of the comparison computed: `compare_cache=false`);
- the same default job run again, as on a user's second run with another setting: the base's side of the
  comparison comes from the cache (warmed once, untimed, before the rounds);
- `loraforge train`, training only: no validation split, no comparison, no report, no TensorBoard;
- the same with `gradient_checkpointing=true`: the lowest-memory setting, for its price in time;
- PEFT+TRL with TRL's defaults (`SFTConfig`: bf16 and gradient checkpointing on, even on CPU): bare
  `trainer.train()` + save — what the job costs a TRL user before any evaluation;
- PEFT+TRL matched to loraforge: the precision `precision=auto` picks on this machine (bf16 autocast where the
  hardware probe chose it, else fp32) and no gradient checkpointing.

Same job everywhere: the demo data (seeded 80/10/10 split; loss on assistant tokens only: TRL's
`completion_only_loss` on prompt/completion rows), steps × batch, lr 1e-3 cosine with 5 warmup steps, LoRA
r=16 / alpha=32 on all linear layers, dropout 0, max length 128. After the timed runs, the adapters of the last
round are scored on the validation split by the same code (untimed), so the speed comes at equal quality.

`--model` takes a model folder; a folder holding only config.json + tokenizer gets random weights
(for GPU machines where the real weights cannot be copied: speed and memory need no trained weights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import timeline  # noqa: E402  (bench/timeline.py, next to this file)

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


def our_precision(device: str) -> str:
    """What loraforge's precision=auto computes in on this device (hardware.auto_precision: probed, cached)."""
    from loraforge.hardware import auto_precision

    return auto_precision(torch.device(device)).name


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def loraforge_command(args, output: str, training_only: bool = False, base_side: str = "computed",
                      steps: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """The demo job (demo.yaml: lr 1e-3, cosine, 5 warmup steps, r=16, alpha=32, all-linear) at --steps;
    base_side "computed" turns the comparison's cache off (a first run), "cached" leaves it on."""
    script = Path(sys.executable).with_name("loraforge")  # absent where loraforge is on PYTHONPATH (gpu_check.sh)
    cli = [str(script)] if script.exists() else [sys.executable, "-m", "loraforge"]
    command = [*cli, "train", f"model={args.model}", f"output={output}", f"max_steps={steps or args.steps}",
               f"batch_size={args.batch}", f"device={args.device}", "overwrite=true"]
    if base_side == "computed" and not training_only:
        command.append("compare_cache=false")
    if training_only:  # the same 960 training rows; no validation split, no comparison, no report
        command += ["data.split=[0.8,0.0,0.2]", "compare=false", "report=false", "tensorboard=false"]
    return command + list(extra) + args.ours


def peft_trl_command(args, output: str, defaults: bool) -> list[str]:
    return [sys.executable, __file__, "--worker", "peft", "--model", args.model, "--steps", str(args.steps),
            "--batch", str(args.batch), "--device", args.device, "--output", output] + \
        (["--trl-defaults"] if defaults else [])


def run_peft_trl(args) -> dict:
    """Bare PEFT+TRL training: load, build the dataset, trainer.train(), save the adapter."""
    import peft
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = load_bench_model(args.model, args.device)
    data = bench_data(tokenizer)
    rows = [{"prompt": c.messages[:-1], "completion": c.messages[-1:]} for c in data.train.conversations]
    matched = {} if args.trl_defaults else {"bf16": our_precision(args.device) == "bf16",
                                            "gradient_checkpointing": False}
    sft = SFTConfig(
        output_dir=args.output, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=BENCH_LR,
        lr_scheduler_type="cosine", warmup_steps=5, logging_steps=args.steps, save_strategy="no", report_to=[],
        max_length=MAX_SEQ_LEN, completion_only_loss=True, use_cpu=args.device == "cpu", seed=0,
        dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0, **matched)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora)
    metrics = trainer.train().metrics
    trainer.model.save_pretrained(Path(args.output) / "adapter")
    return {"train_s": metrics["train_runtime"], "bf16": sft.bf16, "gradient_checkpointing": sft.gradient_checkpointing,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None}


def validation_loss(args) -> dict:
    """Untimed: each adapter's loss on the demo's validation split, by the same code (ours; PEFT's files load
    through our interop)."""
    from loraforge.evaluate import evaluate_loss
    from loraforge.lora import LoraModel

    losses = {}
    for folder in args.adapters:
        model, tokenizer = load_bench_model(args.model, args.device)
        lora = LoraModel.from_pretrained(model, folder)
        examples = bench_data(tokenizer).validation.examples
        losses[folder] = evaluate_loss(lora, examples, tokenizer.pad_token_id, args.batch,
                                       torch.device(args.device))["loss"]
    return losses


def micro(args) -> dict:
    """Median seconds of: the bound (frozen forward + backward to activations), a LoRA step, a full step."""
    from loraforge.attention import use_short_row_attention
    from loraforge.config import LoraConfig, TrainConfig
    from loraforge.loss import causal_lm_loss
    from loraforge.lora import LoraModel
    from loraforge.hardware import frozen_storage_dtype
    from loraforge.rms_norm import keep_rms_norm_outputs

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
    use_short_row_attention(model)  # the attention training runs (train/trainee.py)
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
    keep_rms_norm_outputs(model)  # as training does (train/trainee.py)
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
    result = {"peft": run_peft_trl, "micro": micro, "validation": validation_loss}[args.worker](args)
    print("RESULT " + json.dumps(result))


def spawn(args, role: str) -> dict:
    command = [sys.executable, __file__, "--worker", role, "--model", args.model, "--steps", str(args.steps),
               "--batch", str(args.batch), "--device", args.device, "--precision", args.precision,
               "--repeats", str(args.repeats), "--base-dtype", args.base_dtype]
    if role == "validation":
        command += ["--adapters", *args.adapters]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{role} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def timed(command: list[str]) -> dict:
    """Wall time and peak resident set of the whole process, measured from outside."""
    result = timeline.run(command, echo=False)
    if result["exit"]:
        tail = "\n".join(line["line"] for line in result["lines"][-30:])
        raise SystemExit(f"failed ({result['exit']}): {' '.join(command)}\n{tail}")
    # The printed lines with their time and resident set: the phases of a default job, in the --json file.
    return {"wall_s": result["wall_s"], "peak_mb": result["peak_rss_mb"], "lines": result["lines"]}


ROWS = (("loraforge", "`loraforge train` (default job: validation, advice, comparison, report), first run"),
        ("loraforge_again", "`loraforge train` (default job), run again: the base's side from the cache"),
        ("loraforge_train", "`loraforge train`, training only"),
        ("loraforge_train_checkpointing", "`loraforge train`, training only, `gradient_checkpointing=true`"),
        ("peft_trl_defaults", "PEFT+TRL bare train + save, TRL defaults (bf16, gradient checkpointing)"),
        ("peft_trl_matched", "PEFT+TRL bare train + save, matched (our precision, no checkpointing)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", default=",".join(key for key, _ in ROWS),
                        help="which rows to run (comma list of: " + ", ".join(key for key, _ in ROWS) + ")")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per micro measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="micro only")
    parser.add_argument("--base-dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="micro only")
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--ours", nargs="*", default=[],
                        help="extra key=value overrides for both loraforge rows (e.g. gradient_checkpointing=true)")
    parser.add_argument("--json", help="write all raw results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--trl-defaults", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
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
        chosen = [key for key, _ in ROWS if key in args.rows.split(",")]
        results: dict[str, list[dict]] = {key: [] for key in chosen}
        outputs = {key: str(Path(scratch.name) / key) for key in chosen}
        commands = {"loraforge": lambda: loraforge_command(args, outputs["loraforge"]),
                    "loraforge_again": lambda: loraforge_command(args, outputs["loraforge_again"], base_side="cached"),
                    "loraforge_train": lambda: loraforge_command(args, outputs["loraforge_train"], training_only=True),
                    "loraforge_train_checkpointing": lambda: loraforge_command(
                        args, outputs["loraforge_train_checkpointing"], training_only=True,
                        extra=("gradient_checkpointing=true",)),
                    "peft_trl_defaults": lambda: peft_trl_command(args, outputs["peft_trl_defaults"], defaults=True),
                    "peft_trl_matched": lambda: peft_trl_command(args, outputs["peft_trl_matched"], defaults=False)}
        if "loraforge_again" in chosen:  # the base side depends on the base and the test rows, not the steps
            timed(loraforge_command(args, outputs["loraforge_again"], base_side="cached", steps=1))
        for run in range(args.runs):  # alternating: every round runs each row once
            for key in chosen:
                results[key].append(timed(commands[key]()))
                print(f"round {run + 1}, {key}: {results[key][-1]['wall_s']:.1f} s, "
                      f"{results[key][-1]['peak_mb']:,.0f} MB", file=sys.stderr, flush=True)
        if args.json:  # the timed runs are kept even if scoring the adapters fails
            Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results}, indent=1))
        args.adapters = [str(Path(outputs[key]) / "adapter") for key in chosen]
        losses = spawn(args, "validation")
        med = {key: {m: statistics.median(r[m] for r in rows) for m in ("wall_s", "peak_mb")}
               for key, rows in results.items()}
        reference = "peft_trl_defaults" if "peft_trl_defaults" in med else chosen[-1]
        print(f"| {args.steps} steps × batch {args.batch}, {args.device}, whole process, median of {args.runs} "
              f"| wall (s) | peak RSS (MB) | wall / {reference} | memory / {reference} | validation loss |")
        print("|---|---|---|---|---|---|")
        for key, label in ROWS:
            if key in med:
                loss = losses[str(Path(outputs[key]) / "adapter")]
                print(f"| {label} | {med[key]['wall_s']:.1f} | {med[key]['peak_mb']:,.0f} | "
                      f"{med[key]['wall_s'] / med[reference]['wall_s']:.2f}× | "
                      f"{med[key]['peak_mb'] / med[reference]['peak_mb']:.2f}× | {loss:.4f} |")
        raw = {"runs": results, "validation_loss": losses}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **raw}, indent=1))


if __name__ == "__main__":
    main()
