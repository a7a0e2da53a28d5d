"""The run report: one self-contained HTML page (images embedded, no scripts, no external resources) and
the same data as JSON. Every section is optional and shows only what the run folder holds."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import yaml

from loraforge.atomic import write_text
from loraforge.errors import LoraforgeError

RATE_METRICS = ("exact_match", "token_f1", "rouge1", "rouge2", "rougeL", "accuracy", "macro_f1",
                "prefers_chosen")  # in [0, 1]
KEY_SETTINGS = ("model", "data.path", "max_steps", "epochs", "batch_size", "grad_accum", "lr", "schedule", "lora.r",
                "lora.alpha", "lora.dropout", "lora.targets", "max_seq_len", "precision", "seed")
STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2328;max-width:1100px;margin:2rem auto;
padding:0 1rem;line-height:1.45}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #d0d7de;
padding-bottom:.3rem}.summary{color:#57606a}table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #d0d7de;padding:.35rem .6rem;vertical-align:top;text-align:left}th{background:#f6f8fa}
tr:nth-child(even) td{background:#fbfcfd}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.best{font-weight:700;color:#1a7f37}pre,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;
font-size:.85rem;white-space:pre-wrap;word-break:break-word}.ok{color:#1a7f37}img{max-width:100%}
details{margin:.5rem 0}
"""


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def collect_run(run_dir: Path) -> dict:
    """Everything a run folder holds that the report shows."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    data = {
        "run": str(run_dir),
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").exists() else None,
        "data_report": _read_json(run_dir / "data_report.json"),
        "metrics": [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics_path.exists() else [],
        "summary": _read_json(run_dir / "summary.json"),
        "evaluation": _read_json(run_dir / "evaluation.json"),
    }
    if not any(data[k] for k in ("config", "data_report", "metrics", "summary", "evaluation")):
        raise LoraforgeError(f"no run data in {run_dir} (expected config.yaml, metrics.jsonl, evaluation.json, …)")
    return data


def write_report(run_dir: Path, data: dict | None = None) -> tuple[Path, Path]:
    """Write report.html and report.json into the run folder (atomically); returns their paths."""
    run_dir = Path(run_dir)
    data = collect_run(run_dir) if data is None else data
    html_path, json_path = run_dir / "report.html", run_dir / "report.json"
    write_text(html_path, render_html(data))
    text = json.dumps(json_safe(data), indent=1, ensure_ascii=False, default=str, allow_nan=False)
    write_text(json_path, text)
    return html_path, json_path


def json_safe(value):
    """NaN / inf (e.g. the grad norm of an unclipped run) become null: strict JSON for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


# -- pieces ---------------------------------------------------------------------------------------
def escape(value) -> str:
    """Any value as text safe inside HTML."""
    return html.escape(str(value), quote=True)


def html_table(header: list[str], rows: list[list], numeric_from: int = 1, best: dict[int, int] | None = None) -> str:
    """A table of already-escaped cells; columns from `numeric_from` align as numbers, best[column] = row is marked."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for r, row in enumerate(rows):
        cells = []
        for c, cell in enumerate(row):
            classes = ["num"] if c >= numeric_from else []
            if best and best.get(c) == r:
                classes.append("best")
            cells.append(f'<td class="{" ".join(classes)}">{cell}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def png_img(fig) -> str:
    """A matplotlib figure as a self-contained <img> (the report is one file); closes the figure."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def new_figure(width: float, height: float):
    """(figure, axes) drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _format_metric(name: str, value) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if name in RATE_METRICS:
        return f"{100 * value:.1f}%"
    return f"{value:.1f}" if name in ("bleu", "chrf") else f"{value:.4f}"


# -- sections -------------------------------------------------------------------------------------
def _summary(data: dict) -> str:
    summary, config = data.get("summary") or {}, data.get("config") or {}
    parts = [f"model <b>{escape(config.get('model', '?'))}</b>"]
    if summary:
        parts.append(f"{summary.get('steps')} steps ({escape(summary.get('stopped'))})")
        figure = summary.get("val_metric", "loss")
        if summary.get("stage", "sft") != "sft":
            parts.append(f"stage {escape(summary['stage'])}")
        if summary.get("final_val_loss") is not None:
            parts.append(f"final validation {figure} {summary['final_val_loss']:.4f}")
        if summary.get("best_val_loss") is not None:
            parts.append(f"best on the validation sample {summary['best_val_loss']:.4f}")
        if summary.get("seconds") is not None:
            parts.append(f"{summary['seconds'] / 60:.1f} min")
    return f'<p class="summary">{" · ".join(parts)}</p>'


def _config_section(config: dict | None) -> str:
    if not config:
        return ""
    shown = {key: _get(config, key) for key in KEY_SETTINGS}
    if shown["data.path"] is None:
        shown["data.path"] = "(the bundled demo data)"
    rows = [[escape(key), f'<span class="mono">{escape(value)}</span>'] for key, value in shown.items()]
    full = escape(yaml.safe_dump(config, sort_keys=False))
    return (f"<h2>Configuration</h2>{html_table(['setting', 'value'], rows, numeric_from=99)}"
            f"<details><summary>full configuration</summary><pre>{full}</pre></details>")


def _data_section(report: dict | None) -> str:
    if not report:
        return ""
    counts = [["rows read", report.get("rows_read")], ["kept", report.get("kept")],
              ["invalid (skipped)", report.get("rows_invalid")],
              ["duplicates dropped", report.get("duplicates_dropped")],
              ["empty turns dropped", report.get("empty_turns_dropped")],
              ["rows with control characters", report.get("rows_with_control_chars")],
              ["truncated", report.get("truncated")], ["dropped: no answer left", report.get("dropped_no_target")]]
    splits = [[escape(name), report.get("split_sizes", {}).get(name, 0), report.get("tokens", {}).get(name, 0),
               report.get("target_tokens", {}).get(name, 0)] for name in ("train", "validation", "test")]
    reasons = "".join(f"<li class='mono'>{escape(r)}</li>" for r in report.get("invalid_reasons") or [])
    return ("<h2>Data</h2>" + html_table(["", "rows"], [[escape(a), escape(b)] for a, b in counts])
            + html_table(["split", "conversations", "tokens", "tokens with loss"], splits)
            + (f"<p>first invalid rows:</p><ul>{reasons}</ul>" if reasons else ""))


def learning_curve_figure(rows: list[dict]):
    """Train and validation figures against step, from metrics.jsonl rows — the loss, or for a GRPO run the
    reward (sampled completions in training, greedy answers in validation); None when there are none."""
    metric = "reward" if any("train_reward" in r or "val_reward" in r for r in rows) else "loss"
    unit = {"reward": "reward (mean per completion)", "loss": "DPO loss (per pair)"
            if any("train_accuracy" in r for r in rows) else "loss (nats / target token)"}[metric]
    key, sample_key = f"val_{metric}", f"val_sample_{metric}"
    train = [(r["step"], r[f"train_{metric}"]) for r in rows if f"train_{metric}" in r]
    # Intervals evaluate a fixed sample of the validation split (comparable with each other), the end the whole
    # split: the sample's curve, and the whole split's points beside it.
    val = [(r["step"], r.get(sample_key, r[key])) for r in rows if key in r]
    largest = max((r.get("val_rows", 0) for r in rows if key in r), default=0)
    whole = [(r["step"], r[key]) for r in rows
             if sample_key in r and r.get("val_rows") == largest and r[key] != r[sample_key]]
    if not train and not val:
        return None
    fig, ax = new_figure(8, 3.6)
    if train:
        ax.plot(*zip(*train), label=f"train {metric}", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label=f"validation {metric}" + (" (sample)" if whole else ""))
    if whole:
        ax.plot(*zip(*whole), "s", label=f"validation {metric} (whole split)")
    ax.set(xlabel="step", ylabel=unit, title="learning curves")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _curves_section(rows: list[dict]) -> str:
    fig = learning_curve_figure(rows)
    if fig is None:
        return ""
    images = png_img(fig)
    lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if lrs:
        fig, ax = new_figure(8, 2.2)
        ax.plot(*zip(*lrs), color="tab:green")
        ax.set(xlabel="step", ylabel="learning rate")
        ax.grid(alpha=0.3)
        images += png_img(fig)
    return f"<h2>Learning curves</h2>{images}"


def _metrics_section(evaluation: dict | None) -> str:
    if not evaluation or not evaluation.get("models"):
        return ""
    models = evaluation["models"]
    names = [m for m in ("loss", "perplexity") if any(m in row for row in models.values())]
    names += evaluation.get("metric_names", [])
    rows, best = [], {}
    for column, metric in enumerate(names, start=1):
        values = [(row.get(metric), r) for r, row in enumerate(models.values()) if isinstance(row.get(metric), float)
                  or isinstance(row.get(metric), int)]
        if len(values) > 1:
            pick = min if metric in ("loss", "perplexity") else max
            best[column] = pick(values)[1]
    for model, row in models.items():
        rows.append([escape(model)] + [_format_metric(m, row.get(m)) for m in names])
    title = f"<h2>Before / after ({escape(evaluation.get('split', 'held-out'))}, n={escape(evaluation.get('n'))})</h2>"
    chart = ""
    rates = [m for m in names if m in RATE_METRICS]
    if rates:
        fig, ax = new_figure(8, 3.2)
        width = 0.8 / len(models)
        for i, (model, row) in enumerate(models.items()):
            ax.bar([x + i * width for x in range(len(rates))], [row.get(m, 0) or 0 for m in rates], width, label=model)
        ax.set_xticks([x + width * (len(models) - 1) / 2 for x in range(len(rates))], rates)
        ax.set(ylim=(0, 1.25), ylabel="score")  # headroom so the legend never covers a bar
        ax.legend(loc="upper left", ncols=len(models))
        chart = png_img(fig)
    return title + html_table(["model", *names], rows, best=best) + chart


def _samples_section(evaluation: dict | None, limit: int = 10) -> str:
    samples = (evaluation or {}).get("samples") or []
    if not samples:
        return ""
    from loraforge.metrics import answers_match

    models = list(samples[0].get("answers", {}))
    rows = []
    for sample in samples[:limit]:
        cells = [f'<span class="mono">{escape(sample.get("prompt", ""))}</span>',
                 f'<span class="mono">{escape(sample.get("reference", ""))}</span>']
        for model in models:
            answer = sample["answers"].get(model, "")
            mark = ' <span class="ok">✓</span>' if answers_match(answer, sample.get("reference", "")) else ""
            cells.append(f'<span class="mono">{escape(answer)}</span>{mark}')
        rows.append(cells)
    return "<h2>Answers side by side</h2>" + html_table(["prompt", "reference", *models], rows, numeric_from=99)


def _consistency_section(evaluation: dict | None) -> str:
    consistency = (evaluation or {}).get("consistency")
    if not consistency:
        return ""
    any_row = next(iter(consistency.values()))
    rows = [[escape(m), f"{100 * r['agreement']:.1f}%", f"{r['distinct']:.2f}"] for m, r in consistency.items()]
    return (f"<h2>Consistency</h2><p>{any_row.get('prompts')} prompts, each asked {any_row.get('samples_per_prompt')} "
            f"times at temperature {any_row.get('temperature')}.</p>"
            + html_table(["model", "agreement with the most common answer", "distinct answers"], rows))


def _resources_section(evaluation: dict | None) -> str:
    res = (evaluation or {}).get("resources")
    if not res:
        return ""
    size = [["trainable parameters", f"{res.get('trainable_params', 0):,}"],
            ["of the base's", f"{res.get('trainable_percent', 0):.2f}%"],
            ["adapter on disk", f"{res['adapter_mb']:.1f} MB" if res.get("adapter_mb") else "–"],
            ["base model on disk", f"{res['base_mb']:.1f} MB" if res.get("base_mb") else "–"]]
    latency = [[escape(name), f"{row['ms_per_token']:.2f}", f"{row['peak_mb']:.0f}"]
               for name, row in (res.get("latency") or {}).items()]
    return ("<h2>Resources</h2>" + html_table(["", ""], size)
            + (html_table(["model", "ms / generated token", "peak memory (MB)"], latency) if latency else ""))


def render_html(data: dict) -> str:
    evaluation = data.get("evaluation")
    body = "".join([
        f"<h1>loraforge run report</h1>{_summary(data)}",
        _metrics_section(evaluation), _samples_section(evaluation), _curves_section(data.get("metrics") or []),
        _data_section(data.get("data_report")), _consistency_section(evaluation), _resources_section(evaluation),
        _config_section(data.get("config")),
    ])
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>loraforge report: '
            f'{escape(data.get("run", ""))}</title><style>{STYLE}</style></head><body>{body}</body></html>\n')
