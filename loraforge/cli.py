"""The `loraforge` command: train, chat, merge, eval. Errors users can cause print one clear message
(tracebacks with --debug)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loraforge.errors import LoraforgeError

TRAIN_HELP = """Fine-tune a LoRA adapter. With no arguments: SmolLM2-135M-Instruct on the bundled demo data
(JSON extraction from order messages), then base vs tuned on held-out test prompts.

Configuration: an optional YAML file, then key=value overrides with dotted keys, e.g.
  loraforge train data=chats.jsonl output=runs/mine max_steps=200 lora.r=16 lora.targets='[q_proj,v_proj]'
Keys: see --print-config (every key with its current value)."""


def _train(args: argparse.Namespace) -> None:
    from rich.console import Console

    from loraforge.config import config_to_yaml, load_train_config

    console = Console()
    config_file = args.config
    if config_file is None and not any(o.split("=", 1)[0] in ("data", "data.path") for o in args.overrides):
        from loraforge.demo import DEMO_CONFIG

        config_file = DEMO_CONFIG
        console.print(f"no data given: the bundled demo ({DEMO_CONFIG.name}: JSON extraction from order messages)")
    config = load_train_config(config_file, args.overrides)
    if args.print_config:
        console.print(config_to_yaml(config), end="", markup=False, highlight=False)
        return
    from loraforge.train import train

    result = train(config, console)
    if config.compare and config.compare_samples:
        _compare(config, result.best_adapter or result.adapter, console)


def _compare(config, adapter_dir: Path, console) -> None:
    from rich.table import Table

    from loraforge.data import Conversation, read_rows, to_messages
    from loraforge.evaluate import compare_answers
    from loraforge.lora import LoraModel
    from loraforge.models import load_model
    from loraforge.train import resolve_device

    test_file = config.output / "data" / "test.jsonl"
    conversations = [Conversation(to_messages(row, "messages"), source) for source, row in read_rows(test_file)]
    if not conversations:
        console.print("[yellow]no test split: skipping the base vs tuned comparison[/]")
        return
    device, _ = resolve_device(config)
    model, tokenizer = load_model(config.model, device=device)
    lora = LoraModel.from_pretrained(model, adapter_dir)
    console.print(f"answering {min(len(conversations), config.compare_samples)} held-out test prompts "
                  "with the base model and with the adapter …")
    result = compare_answers(lora, tokenizer, conversations, config.compare_samples, config.max_new_tokens,
                             batch_size=32)
    (config.output / "comparison.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))

    table = Table(title=f"held-out test prompts: {result['metric']} (n={result['n']})")
    table.add_column("model")
    table.add_column(result["metric"], justify="right")
    table.add_row("base", f"{100 * result['base']:.1f}%")
    table.add_row(f"tuned ({adapter_dir.name})", f"{100 * result['tuned']:.1f}%")
    console.print(table)
    samples = Table(title="answers side by side", show_lines=True)
    for column in ("prompt", "reference", "base", "tuned"):
        samples.add_column(column, overflow="fold")
    for sample in result["samples"][:4]:
        samples.add_row(sample["prompt"], sample["reference"], sample["base"], sample["tuned"])
    console.print(samples)


def _load_for_inference(model_name: str | None, adapters: list[str]):
    """Base model plus named adapters: each entry is DIR or NAME=DIR (name defaults to the folder name)."""
    from loraforge.lora import LoraModel
    from loraforge.lora.files import read_adapter_files
    from loraforge.models import load_model

    if model_name is None and adapters:
        model_name = read_adapter_files(Path(adapters[0].rpartition("=")[2]))[0].base_model_name_or_path
    model, tokenizer = load_model(model_name)
    lora = LoraModel(model)
    for entry in adapters:
        name, sep, directory = entry.partition("=")
        if not sep:
            directory, name = entry, Path(entry).resolve().name.replace(".", "_")
        lora.load_adapter(directory, name)
    return lora, tokenizer


def _chat(args: argparse.Namespace) -> None:
    import torch

    from loraforge.data import render

    lora, tokenizer = _load_for_inference(args.model, args.adapter)
    names = list(lora.configs)
    lora.set_active(names[:1])

    def reply(history: list[dict]) -> str:
        text = render(tokenizer, history, generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(lora.parameters()).device)
        sampling = dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = lora.generate(**inputs, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                **sampling)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        print(reply(system + [{"role": "user", "content": args.prompt}]))
        return
    print(f"adapters: {names or 'none'}; active: {lora.active_adapters or 'base'}. "
          "Commands: /use NAME|base, /reset, /quit")
    history = list(system)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = list(system)
            continue
        if line.startswith("/use"):
            choice = line.removeprefix("/use").strip()
            lora.set_active([] if choice in ("", "base") else [choice])
            print(f"active: {lora.active_adapters or 'base'}")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        answer = reply(history)
        history.append({"role": "assistant", "content": answer})
        print(f"model> {answer}")


def _merge(args: argparse.Namespace) -> None:
    lora, tokenizer = _load_for_inference(args.model, [f"default={args.adapter}"])
    model = lora.merge_and_unload()
    output = Path(args.output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    print(f"merged model written to {output} (loads with AutoModelForCausalLM.from_pretrained)")


def _eval(args: argparse.Namespace) -> None:
    from loraforge.config import TrainConfig, load_train_config
    from loraforge.data import DataReport, load_conversations, tokenize
    from loraforge.evaluate import evaluate_loss

    run = Path(args.run_dir) if args.run_dir else None
    config = load_train_config(run / "config.yaml") if run else TrainConfig()
    model_name = args.model or config.model
    adapter = args.adapter or (str(run / "best") if run and (run / "best").exists() else
                               str(run / "adapter") if run else None)
    data_file = Path(args.data) if args.data else (run / "data" / f"{args.split}.jsonl" if run else None)
    if data_file is None:
        raise LoraforgeError("eval needs a run folder or --data FILE")
    lora, tokenizer = _load_for_inference(model_name, [f"default={adapter}"] if adapter else [])
    conversations = load_conversations(data_file, config.data.model_copy(update={"dedupe": False}), DataReport())
    examples = [tokenize(tokenizer, c.messages, config.max_seq_len) for c in conversations]
    device = next(lora.parameters()).device
    rows = {}
    with lora.disable_adapters():
        rows["base"] = evaluate_loss(lora, examples, tokenizer.pad_token_id, args.batch_size, device)
    if adapter:
        rows["adapter"] = evaluate_loss(lora, examples, tokenizer.pad_token_id, args.batch_size, device)
    for name, result in rows.items():
        print(f"{name:8s} {data_file.name}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
              f"({result['tokens']} target tokens)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description="LoRA fine-tuning for LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune an adapter", description=TRAIN_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", nargs="?", help="YAML config file (optional)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.set_defaults(run=_train)

    chat = commands.add_parser("chat", help="talk to the base model or an adapter")
    chat.add_argument("--model", help="base model folder (default: the adapter's base, else SmolLM2)")
    chat.add_argument("--adapter", action="append", default=[], help="adapter folder, or NAME=DIR; repeatable")
    chat.add_argument("--prompt", help="answer one prompt and exit")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    chat.set_defaults(run=_chat)

    merge = commands.add_parser("merge", help="fold an adapter into its base and write a plain HF model")
    merge.add_argument("--adapter", required=True, help="adapter folder")
    merge.add_argument("--output", required=True, help="folder for the merged model and tokenizer")
    merge.add_argument("--model", help="base model (default: base_model_name_or_path of the adapter)")
    merge.set_defaults(run=_merge)

    evaluate = commands.add_parser("eval", help="loss and perplexity of base and adapter on a split")
    evaluate.add_argument("run_dir", nargs="?", help="run folder of `loraforge train`")
    evaluate.add_argument("--split", choices=["validation", "test", "train"], default="test")
    evaluate.add_argument("--data", help="JSONL file instead of the run's split")
    evaluate.add_argument("--model", help="base model (default: the run's)")
    evaluate.add_argument("--adapter", help="adapter folder (default: the run's best, else last)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides.insert(0, args.config)  # `loraforge train key=value` without a YAML file
        args.config = None
    try:
        args.run(args)
    except LoraforgeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
