"""The `loraforge` command. Errors users can cause print one clear message (tracebacks with --debug)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from loraforge.errors import LoraforgeError


def _demo(args: argparse.Namespace) -> None:
    """Put a LoRA adapter on the embedded model, show that it changes answers, merge, save and reload."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from loraforge import LoraConfig, LoraModel
    from loraforge.models import load_model

    console = Console()
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    console.print(f"[bold]model[/] {args.model or 'SmolLM2-135M-Instruct (embedded)'} loaded in "
                  f"{time.perf_counter() - start:.1f}s")

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")

    def answer(m) -> str:
        with torch.no_grad():
            out = m.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def logits(m) -> torch.Tensor:
        with torch.no_grad():
            return m(**inputs).logits

    base_answer, base_logits = answer(model), logits(model)
    lora = LoraModel(model, LoraConfig(r=args.rank, alpha=2 * args.rank, targets="all-linear"))
    trainable, total = lora.trainable_parameters()
    console.print(f"[bold]LoRA[/] r={args.rank} on all linear layers: {trainable:,} trainable of {total:,} "
                  f"({100 * trainable / total:.2f}%)")
    fresh_diff = (logits(lora) - base_logits).abs().max().item()

    # Until training lands, stand in for a trained adapter with small random B factors.
    with torch.no_grad():
        for _, layer in lora.lora_layers():
            layer.lora_B["default"].weight.normal_(std=args.noise)
    adapted_answer, adapted_logits = answer(lora), logits(lora)

    lora.merge()
    merged_diff = (logits(lora) - adapted_logits).abs().max().item()
    lora.unmerge()
    unmerged_diff = (logits(lora) - adapted_logits).abs().max().item()

    with tempfile.TemporaryDirectory() as tmp:
        lora.save(tmp)
        size_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
        reloaded = LoraModel.from_pretrained(load_model(args.model)[0], tmp)
        reload_diff = (logits(reloaded) - adapted_logits).abs().max().item()
        plain = lora.merge_and_unload()
        export_diff = (logits(plain) - adapted_logits).abs().max().item()

    table = Table(title="LoRA core check (max |Δlogit|)")
    table.add_column("comparison")
    table.add_column("max abs difference", justify="right")
    table.add_row("fresh adapter vs base (must be 0)", f"{fresh_diff:.2e}")
    table.add_row("adapter vs base (must be > 0)", f"{(adapted_logits - base_logits).abs().max().item():.2e}")
    table.add_row("merged vs unmerged", f"{merged_diff:.2e}")
    table.add_row("unmerged again vs before merge", f"{unmerged_diff:.2e}")
    table.add_row(f"saved ({size_mb:.1f} MB) and reloaded vs live", f"{reload_diff:.2e}")
    table.add_row("merge_and_unload() plain model vs adapter", f"{export_diff:.2e}")
    console.print(table)
    console.print(f"[bold]prompt[/]  {args.prompt}")
    console.print(f"[bold]base[/]    {base_answer}")
    console.print(f"[bold]adapter[/] {adapted_answer}")
    ok = fresh_diff == 0 and max(merged_diff, unmerged_diff, reload_diff, export_diff) < 1e-3
    console.print("[green]all checks passed[/]" if ok else "[red]a check failed[/]")
    if not ok:
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraforge", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help=_demo.__doc__)
    demo.add_argument("--model", default=None, help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--prompt", default="Give me three tips for staying focused while studying.")
    demo.add_argument("--rank", type=int, default=16)
    demo.add_argument("--noise", type=float, default=0.01, help="std of the stand-in B factors")
    demo.add_argument("--max-new-tokens", type=int, default=40)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LoraforgeError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
