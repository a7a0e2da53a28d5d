"""The `loraforge` command: train, chat, merge, eval, report (+ serve, estimate, compare, sweep from their modules). Errors users can cause print one clear message
(tracebacks with --debug)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from rich.console import Console

from loraforge.console import make_console, quiet_libraries
from loraforge.errors import LoraforgeError
from loraforge.runtime import relaunch_for_training

TRAIN_HELP = """Fine-tune a LoRA adapter. With no arguments: SmolLM2-135M-Instruct on the bundled demo data
(JSON extraction from order messages), then base vs tuned on held-out test prompts.

Stages: stage=sft (default), stage=dpo (data: prompt/chosen/rejected rows), stage=grpo (data: prompt rows,
grpo.reward=file.py:function; with no data: the bundled RL demo). See docs/stages.md.

Configuration: an optional YAML file, then key=value overrides with dotted keys, e.g.
  loraforge train data=chats.jsonl output=runs/mine max_steps=200 lora.r=16 lora.targets='[q_proj,v_proj]'
Keys: see --print-config (every key with its current value)."""


INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C


def _train(args: argparse.Namespace) -> int | None:
    from loraforge.config import config_to_yaml, load_train_config

    console = make_console() if not _torchrun_rank() else Console(quiet=True)  # rank 0 speaks for the job
    config_file = args.config
    using_demo = config_file is None and not any(o.split("=", 1)[0] in ("data", "data.path") for o in args.overrides)
    stage = next((o.split("=", 1)[1] for o in reversed(args.overrides) if o.startswith("stage=")), "sft")
    if using_demo:
        from loraforge.demo import demo_config

        config_file = demo_config(stage)
        using_demo = config_file is not None
    config = load_train_config(config_file, args.overrides)
    if args.print_config:  # plain YAML on stdout, nothing else: it can be saved as a config file
        console.print(config_to_yaml(config), end="", markup=False, highlight=False)
        return
    if using_demo:
        console.print("no data given: the bundled RL demo (one-digit sums, rewarded for the right sum said briefly; "
                      "demo_grpo.yaml)" if config.stage == "grpo" else
                      "no data given: the bundled demo (JSON extraction from order messages, demo.yaml)")
    from loraforge.hardware import autocast_dtype, autocast_for, resolve_precision
    from loraforge.train import train
    from loraforge.train.stages import compare_after_training

    result = train(config, console, keep_model=config.compare and config.finetune != "full")
    if result.rank != 0:  # torchrun: rank 0 compares and reports
        # Leave without running destructors: a second guard against the teardown deadlock distributed.leave()
        # orders around (gloo's thread waiting for the GIL to free a finished collective while this thread, holding
        # the GIL, joins it — seen as a rank that never exits). Everything this rank wrote is closed by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED if result.stopped == "interrupted" else 0)
    if result.stopped == "interrupted":  # the user wants out: no comparison, no report
        console.print(f"interrupted at step {result.steps}; the run is checkpointed in {config.output}. Continue it "
                      f"with the same command and resume=true", markup=False)
        return INTERRUPTED
    if config.finetune == "full" and config.compare:
        console.print(f"finetune=full: the tuned model is in {result.adapter}; compare it with `loraforge compare` "
                      "(the base-vs-adapter comparison needs an adapter)")
    elif config.compare and config.compare_samples:
        lora, tokenizer = _comparison_model(config, result)
        console.print(f"answering up to {config.compare_samples} held-out test prompts with the base model and with "
                      "the adapter …")
        device, precision = resolve_precision(config)  # the precision training computed in
        evaluation = compare_after_training(config, lora, tokenizer, autocast_for(device, autocast_dtype(precision)))
        if evaluation is None:
            console.print("[yellow]no test split: skipping the base vs tuned comparison[/]")
        else:
            _write_json(config.output / "evaluation.json", {"split": "test", "stage": config.stage, **evaluation})
            if "base_from_cache" in evaluation:
                console.print(f"the base model's side (loss and answers) is an earlier run's, kept for the same base, "
                              f"test prompts and settings in {evaluation['base_from_cache']} (compare_cache=false "
                              "computes it afresh)", markup=False)
            _print_evaluation(evaluation, console)
    if config.report:
        from loraforge.report import write_report

        console.print(f"report: {write_report(config.output)[0]}")


def _comparison_model(config, result):
    """The base and the tuned adapter (best/ if there is one) for the comparison: the model training left in
    memory, so that no second copy is loaded — a QLoRA adapter is judged on the quantized base it trained on, and
    so is "base". PiSSA trained on a residual base, not the base: that one is loaded afresh."""
    import gc

    from loraforge.hardware import resolve_device, trim_cpu_heap

    adapter = result.best_adapter or result.adapter
    if result.lora is not None and not config.lora.init.startswith("pissa"):
        result.lora.load_adapter(adapter, "tuned")
        return result.lora, result.tokenizer
    result.lora = None
    gc.collect()
    trim_cpu_heap()  # the training model's memory goes back before the next one is loaded
    return _load_for_inference(config.model, [f"tuned={adapter}"], device=resolve_device(config.device),
                               quant=config.quant)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False))


def _print_evaluation(evaluation: dict, console, samples: int = 4) -> None:
    from rich.table import Table

    # A terminal fits about six numbers; every metric is in evaluation.json and the report.
    metrics = evaluation["metric_names"][:5]
    table = Table(title=f"held-out prompts (n={evaluation['n']}); all metrics in evaluation.json")
    table.add_column("model")
    has_loss = any("loss" in row for row in evaluation["models"].values())
    for column in (["loss"] if has_loss else []) + metrics:
        table.add_column(column, justify="right")
    for model, row in evaluation["models"].items():
        cells = [f"{row['loss']:.3f}"] if has_loss else []
        cells += [f"{row[m]:.1f}" if m in ("bleu", "chrf") else f"{row[m]:.2f}" if m.startswith("reward") else
                  f"{100 * row[m]:.0f}%" for m in metrics]
        table.add_row(model, *cells)
    console.print(table)
    side = Table(title="answers side by side", show_lines=True)
    for column in ["prompt", "reference", *evaluation["models"]]:
        side.add_column(column, overflow="fold")
    for sample in evaluation["samples"][:samples]:
        side.add_row(sample["prompt"], sample["reference"], *sample["answers"].values())
    console.print(side)


def _load_for_inference(model_name: str | None, adapters: list[str], device: str = "cpu", quant: str = "none"):
    """Base model (optionally NF4/int8-quantized) plus named adapters: each entry is DIR or NAME=DIR (name
    defaults to the folder name)."""
    from loraforge.lora import LoraModel
    from loraforge.lora.files import read_adapter_files
    from loraforge.models import load_model

    if model_name is None and adapters:
        model_name = read_adapter_files(Path(adapters[0].rpartition("=")[2]))[0].base_model_name_or_path
    model, tokenizer = load_model(model_name, device=device, quant=quant)
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
    from loraforge.config import TrainConfig, load_train_config
    from loraforge.hardware import dtype_named
    from loraforge.data import read_conversations, tokenize
    from loraforge.lora import LoraModel
    from loraforge.lora.files import read_adapter_files
    from loraforge.models import load_model
    from loraforge.merge import merge_quantized

    adapter = Path(args.adapter)
    # An adapter inside a `loraforge train` run (run/adapter, run/best, run/checkpoints/step-N) has the run's
    # config next to it: how the base was quantized in training, and the validation split.
    run = next((d for d in (adapter.parent, adapter.parent.parent) if (d / "config.yaml").is_file()), None)
    run_config = load_train_config(run / "config.yaml") if run else TrainConfig()
    base_quant = args.dequantized_base or run_config.quant
    if args.dequantized_base is None and base_quant != "none":
        print(f"{run / 'config.yaml'}: the adapter was trained on a {base_quant} base, so it is merged into that "
              "base, dequantized (--dequantized-base none merges into the float base instead)")
    model, tokenizer = load_model(args.model or read_adapter_files(adapter)[0].base_model_name_or_path,
                                  quant=base_quant)
    lora = LoraModel.from_pretrained(model, adapter)
    quantized = base_quant != "none" or args.requantize is not None
    validation = Path(args.validation) if args.validation else (run / "data" / "validation.jsonl" if run else None)
    examples = [tokenize(tokenizer, c.messages, run_config.max_seq_len) for c in read_conversations(validation)] \
        if quantized and validation else []
    dtype = dtype_named(args.dtype) if args.dtype else None
    model, report = merge_quantized(lora, requantize=args.requantize, validation=examples,
                                    pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    output = Path(args.output)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    if quantized:
        _write_json(output / "merge_report.json", report.to_dict())
        print("\n".join(report.describe()))
    loads = " (needs bitsandbytes and accelerate)" if args.requantize else ""
    print(f"merged model written to {output} (loads with AutoModelForCausalLM.from_pretrained{loads})")


def _eval(args: argparse.Namespace) -> None:
    from loraforge.config import TrainConfig, load_train_config

    console = make_console()
    run = Path(args.run_dir) if args.run_dir else None
    config = load_train_config(run / "config.yaml") if run and (run / "config.yaml").exists() else TrainConfig()
    adapters = args.adapter or ([f"tuned={run / 'best'}"] if run and (run / "best").exists() else
                                [f"tuned={run / 'adapter'}"] if run and (run / "adapter").exists() else [])
    data_file = Path(args.data) if args.data else (run / "data" / f"{args.split}.jsonl" if run else None)
    if data_file is None:
        raise LoraforgeError("eval needs a run folder or --data FILE")
    if run and config.stage != "sft" and not args.data:
        evaluation = _stage_evaluation(args, run, config, adapters)
    else:
        evaluation = _answer_evaluation(args, config, adapters, data_file, console)
    _print_evaluation(evaluation, console)
    output = Path(args.output) if args.output else (run / "evaluation.json" if run else None)
    if output:
        _write_json(output, evaluation)
        console.print(f"written: {output}")
    if run and args.report:
        from loraforge.report import write_report

        console.print(f"report: {write_report(run)[0]}")


def _answer_evaluation(args: argparse.Namespace, config, adapters: list[str], data_file: Path, console) -> dict:
    """Base and adapters answering held-out conversations: loss, answer metrics, consistency, resources."""
    from loraforge.data import read_conversations
    from loraforge.evaluate import consistency, evaluate_models, resources
    from loraforge.models import resolve_model_path

    conversations = read_conversations(data_file)
    if not conversations:
        raise LoraforgeError(f"no conversations in {data_file}")
    quant = args.quant or config.quant
    lora, tokenizer = _load_for_inference(args.model or config.model, adapters, device=args.device, quant=quant)
    names = list(lora.configs)
    on_base = f" ({quant} base)" if quant != "none" else ""
    console.print(f"evaluating base{on_base} + {names or 'no adapter'} on {min(len(conversations), args.samples)} "
                  f"conversations of {data_file}")
    evaluation = {"split": args.split if not args.data else str(data_file),
                  **evaluate_models(lora, tokenizer, conversations, names, args.metrics, args.samples,
                                    args.max_new_tokens, args.batch_size, config.max_seq_len)}
    if args.consistency:
        evaluation["consistency"] = consistency(lora, tokenizer, conversations, names, prompts=args.consistency,
                                                max_new_tokens=args.max_new_tokens)
    if names and not args.no_resources:
        adapter_dir = Path(adapters[0].rpartition("=")[2])
        evaluation["resources"] = resources(lora, tokenizer, names[0], adapter_dir,
                                            resolve_model_path(args.model or config.model),
                                            conversations[0].messages[:-1])
    return evaluation


def _stage_evaluation(args: argparse.Namespace, run: Path, config, adapters: list[str]) -> dict:
    """A DPO / GRPO run's own comparison (preference or reward, base vs the run's adapter) on its test split: its
    split files hold pairs or prompts, not conversations."""
    from contextlib import nullcontext

    from loraforge.train.stages import compare_after_training

    if args.adapter or args.split != "test":
        raise LoraforgeError(f"{run} is a stage={config.stage} run: eval compares base and its adapter on its test "
                             "split; for other adapters or splits pass --data FILE of conversations")
    lora, tokenizer = _load_for_inference(args.model or config.model, adapters, device=args.device,
                                          quant=args.quant or config.quant)
    config = config.model_copy(update={"output": run, "compare_samples": args.samples})
    evaluation = compare_after_training(config, lora, tokenizer, nullcontext)
    if evaluation is None:
        raise LoraforgeError(f"{run / 'data' / 'test.jsonl'} holds no rows to compare on")
    return {"split": "test", "stage": config.stage, **evaluation}


def _report(args: argparse.Namespace) -> None:
    from loraforge.report import write_report

    html, data = write_report(Path(args.run_dir))
    print(f"report: {html}\ndata: {data}")


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
    merge.add_argument("--dequantized-base", choices=["none", "nf4", "int8"],
                       help="the adapter was trained on this quantized base (QLoRA): merge into that base, "
                            "dequantized (default: the run's quant when the adapter is in a run folder, else none)")
    merge.add_argument("--requantize", choices=["nf4", "int8"],
                       help="quantize the merged model again and write it in bitsandbytes format; reports each "
                            "layer's error and warns when the adapter's effect is rounded away")
    merge.add_argument("--validation", help="JSONL conversations for the loss / perplexity check of a quantized "
                                            "merge (default: the run's validation split)")
    merge.add_argument("--dtype", choices=["float32", "bfloat16"], help="dtype of the merged model (default: as "
                                                                        "the base loads, float32)")
    merge.set_defaults(run=_merge)

    evaluate = commands.add_parser("eval", help="base vs adapters: loss, answer metrics, consistency, cost")
    evaluate.add_argument("run_dir", nargs="?", help="run folder of `loraforge train` (its split, config, adapter)")
    evaluate.add_argument("--split", choices=["validation", "test", "train"], default="test")
    evaluate.add_argument("--data", help="JSONL file instead of the run's split")
    evaluate.add_argument("--model", help="base model (default: the run's)")
    evaluate.add_argument("--adapter", action="append", default=[],
                          help="adapter folder or NAME=DIR, repeatable (default: the run's best, else last)")
    evaluate.add_argument("--metrics", default="auto", type=lambda v: v if v == "auto" else v.split(","),
                          help="auto, or a comma list of exact_match,token_f1,rouge1,rouge2,rougeL,bleu,chrf,"
                               "accuracy,macro_f1")
    evaluate.add_argument("--samples", type=int, default=100, help="held-out conversations to answer")
    evaluate.add_argument("--consistency", type=int, default=10, metavar="N",
                          help="prompts asked 5 times at temperature 0.7 (0: skip)")
    evaluate.add_argument("--no-resources", action="store_true", help="skip the size / latency / memory check")
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--quant", choices=["none", "nf4", "int8"],
                          help="quantize the base as in QLoRA training (default: the run's quant, else none)")
    evaluate.add_argument("--output", help="where to write evaluation.json (default: the run folder)")
    evaluate.add_argument("--report", action="store_true", help="also write the run's HTML report")
    evaluate.set_defaults(run=_eval)

    report = commands.add_parser("report", help="write report.html + report.json for a run folder")
    report.add_argument("run_dir", help="run folder of `loraforge train`")
    report.set_defaults(run=_report)

    from loraforge import compare, estimate, export, serve  # each registers its own subcommands

    serve.add_parser(commands)
    estimate.add_parser(commands)
    compare.add_parser(commands)
    export.add_parser(commands)
    return parser


def _torchrun_rank() -> int | None:
    """This process's rank when torchrun started several (its environment; known before the process group is
    joined, and without importing torch), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"])
    return None


def _runs_training(argv: list[str]) -> bool:
    """Whether this command line trains (`train`, not --print-config or --help), told before the parser is built:
    compare, estimate, export and serve register their subcommands from modules that import torch (~3 s here),
    and the relaunch for training must come before that or the job imports it twice. The top-level options take
    no value, so the command is the first word that is not an option."""
    command = next((word for word in argv if not word.startswith("-")), None)
    return command == "train" and not {"--print-config", "-h", "--help"} & set(argv)


def main(argv: list[str] | None = None) -> int:
    """The command (argv None: this process's own command line) or a call with `argv` (the process stays)."""
    if argv is None and _runs_training(sys.argv[1:]):
        relaunch_for_training()  # glibc's allocator settings for training (runtime.py); returns when set already
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides.insert(0, args.config)  # `loraforge train key=value` without a YAML file
        args.config = None
    if not args.debug:
        quiet_libraries()
    rank = _torchrun_rank()
    who = f"[rank {rank}] " if rank is not None else ""  # under torchrun every rank's error says whose it is
    try:
        code = args.run(args)
    except LoraforgeError as exc:
        if args.debug:
            raise
        print(f"{who}error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{who}interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as exc:  # a bug, or a library failing: one line that says what and where, not a traceback
        if args.debug:
            raise
        print(f"{who}error: {unexpected_error(exc)}", file=sys.stderr)
        return 1
    return code or 0


def unexpected_error(exc: BaseException) -> str:
    """One line for an error no check of loraforge's caught: what it is, the innermost loraforge line it passed
    through, and how to get the whole story."""
    package = Path(__file__).resolve().parent
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if Path(f.filename).resolve().is_relative_to(package)]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    located = ""
    if where is not None:
        path = Path(where.filename).resolve()
        name = f"loraforge/{path.relative_to(package).as_posix()}" if path.is_relative_to(package) else str(path)
        located = f" (in {name}:{where.lineno}, {where.name})"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
    return (f"unexpected {type(exc).__name__}: {message}{located}. This is a bug or a library failing; "
            "run the same command with `loraforge --debug …` for the traceback")


if __name__ == "__main__":
    raise SystemExit(main())
