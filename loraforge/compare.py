"""LoRA against full fine-tuning, and a learning-rate × rank grid: the two experiments behind the advisors.

    loraforge compare job.yaml --output runs/compare        # full / LoRA / QLoRA, each at its own lr
    loraforge sweep job.yaml --ranks 4,64 --lrs 3e-4,1e-3,3e-3 --full-lrs 3e-5,1e-4,3e-4

Every run is `loraforge train` with the same model, data, steps and batch size (so the same tokens), in its own
folder under --output. `compare` writes compare.html / compare.json: validation loss against steps and against
training FLOPs, peak memory, wall time, the size of what each run writes, and forgetting (the loss on general
conversations that the data never shows, before and after). `sweep` writes sweep.html / sweep.json: the final
validation loss against the learning rate, one line per rank and target set, full fine-tuning beside them, so
that the best rate's independence of the rank (with α fixed, α/r scaling) can be seen.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from loraforge.atomic import write_text
from loraforge.config import TrainConfig, load_train_config, parse_section
from loraforge.console import make_console
from loraforge.errors import LoraforgeError, TrainingError

# Target sets of `sweep --targets`, as regexes on module names (unsupported matches such as containers are skipped).
TARGET_SETS = {"all-linear": "all-linear", "attention": r".*(attn|attention)\.[^.]+",
               "mlp": r".*(mlp|feed_forward|ffn)\.[^.]+"}

# General conversations the fine-tuning data never shows: their loss before and after measures forgetting.
GENERAL_CONVERSATIONS = [
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("Give me a synonym for 'happy'.", "Joyful."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("Translate 'thank you' into Spanish.", "Gracias."),
    ("What is 12 times 12?", "12 times 12 is 144."),
    ("Which planet in our solar system has the most famous rings?", "Saturn."),
    ("Why do we see lightning before we hear thunder?", "Because light travels much faster than sound."),
    ("Write a short greeting for a birthday card.", "Happy birthday! Wishing you a wonderful year ahead."),
    ("What is photosynthesis?", "Photosynthesis is how plants turn sunlight, water and carbon dioxide into sugar "
                                "and oxygen."),
    ("Suggest a name for a pet goldfish.", "How about Bubbles?"),
    ("What language is spoken in Brazil?", "Portuguese is the main language of Brazil."),
]


def derive(base: TrainConfig, updates: dict) -> TrainConfig:
    """A copy of `base` with dotted keys replaced ({"lora.r": 16, "lr": 1e-3}), validated like any config."""
    values = base.model_dump(mode="json")
    for dotted, value in updates.items():
        node = values
        *parents, key = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[key] = value
    return parse_section(TrainConfig, values)


def general_conversations(path: Path | None = None) -> list:
    from loraforge.data import Conversation, DataReport, load_conversations

    if path is not None:
        from loraforge.config import DataConfig

        return load_conversations(Path(path), DataConfig(), DataReport())
    return [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a}], "general")
            for q, a in GENERAL_CONVERSATIONS]


def _general_loss(model, tokenizer, conversations: list, config: TrainConfig, device) -> float:
    from loraforge.data import tokenize
    from loraforge.evaluate import evaluate_loss

    examples = [tokenize(tokenizer, c.messages, config.max_seq_len) for c in conversations]
    return evaluate_loss(model, examples, tokenizer.pad_token_id, config.batch_size, device)["loss"]


def _trained_model(config: TrainConfig, folder: Path, device):
    """The model a run wrote: a whole model (finetune=full), or its base (quantized as in training) + adapter."""
    from loraforge.lora import LoraModel
    from loraforge.models import load_model

    if config.finetune == "full":
        return load_model(folder, device=device)
    model, tokenizer = load_model(config.model, device=device, quant=config.quant)
    return LoraModel.from_pretrained(model, folder), tokenizer


def _curves(run_dir: Path, flops_per_token: float) -> tuple[list, list]:
    """(step, validation loss, training FLOPs so far) at every evaluation, and (step, train loss) per step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tokens, val, train = 0.0, [], []
    for row in rows:
        if "train_loss" in row:
            tokens += row["tokens_per_s"] * row["step_s"]
            train.append((row["step"], row["train_loss"]))
        if "val_loss" in row:
            val.append((row["step"], row["val_loss"], tokens * flops_per_token))
    return val, train


# -- compare ----------------------------------------------------------------------------------------
ARMS = ("full", "lora", "qlora")


def compare(base: TrainConfig, output: Path, arms: Sequence[str] = ARMS, full_lr: float | None = None,
            lora_lr: float | None = None, general: list | None = None, console: Console | None = None) -> dict:
    """Train each arm (full fine-tuning, LoRA, QLoRA) on the same data and token budget, each at its own learning
    rate (default: the advisor's), and write compare.json + compare.html into `output`. Returns the data."""
    from loraforge.advise import suggested_lr
    from loraforge.estimate import estimate, load_model_config, memory_in_use, track_freed_memory
    from loraforge.evaluate import PeakMemory, folder_mb
    from loraforge.models import load_model
    from loraforge.hardware import resolve_device
    from loraforge.train import train

    console = console or make_console()
    model_config = load_model_config(base.model)
    lora = base.lora
    lrs = {"full": full_lr or suggested_lr(model_config.model_type, model_config.hidden_size, "full"),
           "lora": lora_lr or suggested_lr(model_config.model_type, model_config.hidden_size, "lora", base.max_steps,
                                           lora.r, lora.alpha, lora.use_rslora)}
    device = resolve_device(base.device)
    if device.type == "cpu":
        track_freed_memory()  # so that each arm's peak is its own, not what the allocator kept from the last
    general = general if general is not None else general_conversations()
    model, tokenizer = load_model(base.model, device=device)
    general_before = _general_loss(model, tokenizer, general, base, device)
    del model
    results, skipped = [], {}
    for arm in arms:
        config = derive(base, {"finetune": "full" if arm == "full" else "lora", "lr": lrs["full" if arm == "full"
                               else "lora"], "quant": "nf4" if arm == "qlora" else "none",
                               "output": str(Path(output) / arm), "compare": False, "report": False,
                               "resume": False, "overwrite": True})
        console.rule(f"{arm}: lr={config.lr:.2g}")
        gc.collect()
        baseline = memory_in_use(device)
        if arm == "qlora" and (missing := _qlora_unsupported(device)):
            console.print(f"[yellow]QLoRA arm skipped: {missing}[/]")
            skipped[arm] = missing
            continue
        with PeakMemory(device) as peak:
            result = train(config, console)
        if result.stopped == "interrupted":  # Ctrl-C stops the comparison, not just this arm
            raise KeyboardInterrupt
        est = estimate(config.model, config, model_config=model_config)
        mode = "lora" if arm == "qlora" else arm
        val, train_curve = _curves(result.output, est.flops_per_token[mode])
        model, tokenizer = _trained_model(config, result.adapter, device)
        before = general_before
        if arm != "full":  # the base this adapter trained on: QLoRA's is the quantized one
            with model.disable_adapters():
                before = _general_loss(model, tokenizer, general, config, device)
        results.append({
            "arm": arm, "lr": config.lr, "steps": result.steps, "stopped": result.stopped,
            "trainable": est.parameters.total if arm == "full" else est.parameters.adapter.trainable,
            "final_val_loss": result.final_val_loss, "best_val_loss": result.best_val_loss,
            "peak_mb": peak.peak_mb - baseline / 2**20, "seconds": result.seconds,
            "file_mb": folder_mb(result.adapter), "flops_per_token": est.flops_per_token[mode],
            "general_before": before, "general_after": _general_loss(model, tokenizer, general, config, device),
            "val_curve": val, "train_curve": train_curve})
        del model
    data = {"model": base.model, "data": str(base.data.path or "(the bundled demo data)"),
            "max_steps": base.max_steps, "batch_size": base.batch_size, "grad_accum": base.grad_accum,
            "lora": {"r": lora.r, "alpha": lora.alpha, "targets": lora.targets}, "runs": results,
            "skipped": skipped}
    _write(Path(output), "compare", data, render_compare(data))
    return data


def render_compare(data: dict) -> str:
    """compare.html: the summary table and the validation curves against steps and against FLOPs."""
    from loraforge.report import escape, html_table, new_figure, png_img

    runs = data["runs"]
    full = next((r for r in runs if r["arm"] == "full" and r["final_val_loss"]), None)
    rows = []
    for run in runs:
        gap = (f"{100 * (run['final_val_loss'] / full['final_val_loss'] - 1):+.1f}%"
               if full and run is not full and run["final_val_loss"] else "")
        rows.append([escape(run["arm"]), f"{run['lr']:.2g}", f"{run['trainable']:,}", _loss(run["final_val_loss"]), gap,
                     _loss(run["best_val_loss"]), f"{run['peak_mb']:,.0f}", f"{run['seconds']:.0f}",
                     f"{run['file_mb']:,.1f}", f"{run['flops_per_token'] / 1e9:.3g}",
                     f"{run['general_before']:.3f} → {run['general_after']:.3f}"])
    table = html_table(["arm", "lr", "trainable", "final val loss", "vs full", "best val loss", "peak memory (MB)",
                    "wall time (s)", "written (MB)", "GFLOPs / token", "general-text loss before → after"], rows)
    images = ""
    for x, label in ((0, "step"), (2, "training FLOPs")):
        fig, ax = new_figure(5.6, 3.6)
        for run in runs:
            if run["val_curve"]:
                points = [(point[x], point[1]) for point in run["val_curve"]]
                ax.plot(*zip(*points), "o-", label=f"{run['arm']} (lr {run['lr']:.2g})")
        ax.set(xlabel=label, ylabel="validation loss", title=f"validation loss vs {label}")
        if x == 2:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        images += png_img(fig)
    intro = (f"<p class=\"summary\">model <b>{escape(data['model'])}</b> · data {escape(data['data'])} · "
             f"{escape(data['max_steps'])} steps × {data['batch_size'] * data['grad_accum']} conversations, the same "
             f"for every arm · LoRA r={data['lora']['r']}, α={data['lora']['alpha']}, "
             f"targets {escape(data['lora']['targets'])}"
             "</p><p>A LoRA step costs ≈ 2/3 of a full fine-tuning step (no weight gradient for the frozen base). "
             "Forgetting: loss on general conversations that the data never shows (lower is better; a rise is "
             "forgetting). Peak memory is measured above what the process held before the arm started.</p>")
    notes = "".join(f"<p>{escape(arm)} arm skipped: <span class=\"mono\">{escape(why)}</span></p>"
                    for arm, why in data.get("skipped", {}).items())
    return _page("LoRA vs full fine-tuning", intro + table + notes + images)


def _page(title: str, body: str) -> str:
    from loraforge.report import STYLE, escape

    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>loraforge: {escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>\n")


def _qlora_unsupported(device) -> str | None:
    """Why bitsandbytes cannot give this device a 4-bit base (the one reason to leave the QLoRA arm out), or None.
    Every other failure of the arm is an error of the comparison and stops it."""
    import torch

    try:
        from loraforge.quant import round_trip

        round_trip(torch.randn(64, 64, device=device), "nf4")
    except (ImportError, RuntimeError, NotImplementedError) as error:
        return f"bitsandbytes cannot quantize to NF4 on {device} here ({type(error).__name__}: {error})"
    return None


def _loss(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "–"


def _write(output: Path, name: str, data: dict, page: str) -> None:
    from loraforge.report import json_safe

    output.mkdir(parents=True, exist_ok=True)
    write_text(output / f"{name}.json", json.dumps(json_safe(data), indent=1, allow_nan=False))
    write_text(output / f"{name}.html", page)


# -- sweep ------------------------------------------------------------------------------------------
# The default grid: ranks a decade and more apart, the advisor's learning rate and a half-decade either side of it.
DEFAULT_SWEEP_RANKS = (4, 16, 64)
DEFAULT_SWEEP_LR_FACTORS = (1 / 3, 1.0, 3.0)


def default_sweep_lrs(base: TrainConfig) -> list[float]:
    """The advisor's LoRA learning rate for `base` (model, steps, α), with one grid point a factor 3 either side.
    With α/r scaling the advised rate does not depend on the rank, so one list serves every rank of the sweep."""
    from loraforge.advise import suggested_lr
    from loraforge.estimate import load_model_config

    model_config = load_model_config(base.model)
    lora = base.lora
    advised = suggested_lr(model_config.model_type, model_config.hidden_size, "lora", base.max_steps, lora.r,
                           lora.alpha, lora.use_rslora)
    return [float(f"{advised * factor:.2g}") for factor in DEFAULT_SWEEP_LR_FACTORS]


def sweep(base: TrainConfig, output: Path, ranks: Sequence[int] | None = None, lrs: Sequence[float] | None = None,
          target_sets: Sequence[str] = ("all-linear",), full_lrs: Sequence[float] = (), keep_models: bool = False,
          console: Console | None = None) -> dict:
    """Train every (target set, rank, lr) LoRA and every full fine-tuning lr; write sweep.json + sweep.html with
    the final validation loss per run. α stays as configured, so the scale α/r shrinks as the rank grows.
    Without ranks: DEFAULT_SWEEP_RANKS; without lrs: the advisor's lr and a factor 3 either side."""
    from loraforge.train import train

    console = console or make_console()
    ranks = list(ranks or DEFAULT_SWEEP_RANKS)
    lrs = list(lrs or default_sweep_lrs(base))
    console.print(f"sweep: ranks {', '.join(map(str, ranks))} × learning rates {', '.join(f'{lr:g}' for lr in lrs)}"
                  f" × targets {', '.join(target_sets)}")
    grid = [("lora", targets, r, lr) for targets in target_sets for r in ranks for lr in lrs]
    grid += [("full", None, None, lr) for lr in full_lrs]
    runs = []
    for kind, targets, r, lr in grid:
        name = f"full-lr{lr:g}" if kind == "full" else f"{_slug(targets)}-r{r}-lr{lr:g}"
        # overwrite: a sweep run again moves its earlier runs aside instead of refusing at the first one
        updates = {"lr": lr, "output": str(Path(output) / name), "compare": False, "report": False, "resume": False,
                   "overwrite": True, "finetune": kind}
        if kind == "lora":
            updates.update({"lora.r": r, "lora.targets": TARGET_SETS.get(targets, targets)})
        config = derive(base, updates)
        console.rule(f"{name} ({len(runs) + 1}/{len(grid)})")
        try:
            result = train(config, console)
            final, seconds = result.final_val_loss, result.seconds
            if result.stopped == "interrupted":  # Ctrl-C stops the sweep, not just this run
                raise KeyboardInterrupt
        except TrainingError as error:  # a diverging learning rate is a result of the sweep, not its end
            console.print(f"[yellow]{name}: {error}[/]")
            final, seconds = None, None
        if kind == "full" and not keep_models:
            for folder in ("model", "best"):  # whole models are large; the sweep needs their losses only
                shutil.rmtree(config.output / folder, ignore_errors=True)
        runs.append({"name": name, "kind": kind, "targets": targets, "r": r, "lr": lr, "final_val_loss": final,
                     "seconds": seconds})
    data = {"model": base.model, "data": str(base.data.path or "(the bundled demo data)"), "steps": base.max_steps,
            "batch_size": base.batch_size, "alpha": base.lora.alpha, "runs": runs, "best": best_learning_rates(runs)}
    _write(Path(output), "sweep", data, render_sweep(data))
    return data


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "targets"


def _line(run: dict) -> str:
    return "full fine-tuning" if run["kind"] == "full" else f"{run['targets']} r={run['r']}"


def best_learning_rates(runs: list[dict]) -> dict[str, dict]:
    """Per line (full fine-tuning, or one target set and rank): the learning rate with the lowest final loss."""
    best: dict[str, dict] = {}
    for run in runs:
        line = _line(run)
        if run["final_val_loss"] is not None and (line not in best or run["final_val_loss"] < best[line]["loss"]):
            best[line] = {"lr": run["lr"], "loss": run["final_val_loss"]}
    return best


def render_sweep(data: dict) -> str:
    """sweep.html: final validation loss vs learning rate, one line per rank (a panel per target set)."""
    from loraforge.report import escape, html_table, new_figure, png_img

    runs, best = data["runs"], data["best"]
    full_runs = [r for r in runs if r["kind"] == "full"]
    images = ""
    for targets in dict.fromkeys(r["targets"] for r in runs if r["kind"] == "lora"):
        fig, ax = new_figure(7, 4)
        lines: dict[str, list] = {}
        for run in [r for r in runs if r["targets"] == targets] + full_runs:
            if run["final_val_loss"] is not None:
                lines.setdefault(_line(run), []).append((run["lr"], run["final_val_loss"]))
        for line, points in lines.items():
            style = ("o--", {"color": "black"}) if line == "full fine-tuning" else ("o-", {})
            ax.plot(*zip(*sorted(points)), style[0], label=f"{line} (best lr {best[line]['lr']:.2g})", **style[1])
        ax.set(xscale="log", xlabel="learning rate", ylabel="final validation loss",
               title=f"final validation loss vs learning rate — LoRA on {targets}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        images += png_img(fig)
    rows = [[escape(r["name"]), escape(_line(r)), f"{r['lr']:.2g}", _loss(r["final_val_loss"]),
             f"{r['seconds']:.0f}" if r["seconds"] else "diverged"] for r in runs]
    best_rows = [[escape(line), f"{b['lr']:.2g}", _loss(b["loss"])] for line, b in best.items()]
    ratio = ""
    if "full fine-tuning" in best and len(best) > 1:
        lora_lrs = [b["lr"] for line, b in best.items() if line != "full fine-tuning"]
        ratios = sorted(lr / best["full fine-tuning"]["lr"] for lr in lora_lrs)
        ratio = (f"<p>Best LoRA learning rate ÷ best full fine-tuning learning rate: "
                 f"{', '.join(f'{x:.3g}×' for x in ratios)} (the research says ≈ 10×).</p>")
    intro = (f"<p class=\"summary\">model <b>{escape(data['model'])}</b> · data {escape(data['data'])} · "
             f"{escape(data['steps'])} steps × {data['batch_size']} conversations · LoRA α={data['alpha']} for every "
             "rank (scale α/r)</p>")
    return _page("Learning rate × rank sweep", intro + images + "<h2>Best learning rate per line</h2>"
                 + html_table(["line", "best lr", "final val loss"], best_rows) + ratio + "<h2>All runs</h2>"
                 + html_table(["run", "line", "lr", "final val loss", "seconds"], rows))


# -- commands ---------------------------------------------------------------------------------------
COMPARE_HELP = """Full fine-tuning vs LoRA vs QLoRA on the same model, data and token budget, each at its own learning
rate (default: the advisor's). Writes OUTPUT/compare.html (+ .json) and one run folder per arm.
Training keys as for `loraforge train`, e.g.
  loraforge compare job.yaml max_steps=200 --output runs/compare --lora-lr 1e-3 --full-lr 1e-4"""

SWEEP_HELP = """LoRA rank × learning rate grid (and target sets), optionally with full fine-tuning learning rates;
writes OUTPUT/sweep.html (+ .json): final validation loss vs learning rate, one line per rank.
  loraforge sweep job.yaml --ranks 4,16,64 --lrs 3e-4,1e-3,3e-3 --targets all-linear,attention,mlp \\
      --full-lrs 3e-5,1e-4,3e-4"""


def _numbers(kind):
    return lambda text: [kind(part) for part in text.split(",") if part]


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `loraforge compare` and `loraforge sweep`."""
    for name, help_text, description, run in (
            ("compare", "LoRA / QLoRA vs full fine-tuning on the same data and budget", COMPARE_HELP, _run_compare),
            ("sweep", "rank × learning-rate grid: final loss vs lr per rank", SWEEP_HELP, _run_sweep)):
        parser = commands.add_parser(name, help=help_text, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("config", nargs="?", help="YAML config file (optional)")
        parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys")
        parser.add_argument("--output", default=f"runs/{name}", help="folder for the report and the runs")
        parser.set_defaults(run=run)
        if name == "compare":
            parser.add_argument("--arms", type=lambda t: t.split(","), default=list(ARMS),
                                help="comma list of full, lora, qlora")
            parser.add_argument("--full-lr", type=float, help="full fine-tuning's lr (default: the advisor's)")
            parser.add_argument("--lora-lr", type=float, help="LoRA's and QLoRA's lr (default: the advisor's)")
            parser.add_argument("--general", help="JSONL conversations for the forgetting check (default: built in)")
        else:
            parser.add_argument("--ranks", type=_numbers(int), help="comma list (default: "
                                f"{','.join(map(str, DEFAULT_SWEEP_RANKS))})")
            parser.add_argument("--lrs", type=_numbers(float), help="LoRA lrs, comma list (default: the advisor's "
                                                                    "lr for the job, and ×1/3 and ×3 of it)")
            parser.add_argument("--targets", type=lambda t: t.split(","), default=["all-linear"],
                                help="comma list of all-linear, attention, mlp (or a regex on module names)")
            parser.add_argument("--full-lrs", type=_numbers(float), default=[],
                                help="full fine-tuning lrs to run beside (comma list)")
            parser.add_argument("--keep-models", action="store_true", help="keep the whole models of full runs")


def _run_compare(args: argparse.Namespace) -> None:
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        raise LoraforgeError(f"--arms: unknown {sorted(unknown)}; choose from {', '.join(ARMS)}")
    config = load_train_config(args.config, args.overrides)
    general = general_conversations(Path(args.general)) if args.general else None
    compare(config, Path(args.output), args.arms, args.full_lr, args.lora_lr, general)
    print(f"report: {Path(args.output) / 'compare.html'}")


def _run_sweep(args: argparse.Namespace) -> None:
    config = load_train_config(args.config, args.overrides)
    sweep(config, Path(args.output), args.ranks, args.lrs, args.targets, args.full_lrs, args.keep_models)
    print(f"report: {Path(args.output) / 'sweep.html'}")
