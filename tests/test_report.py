"""The HTML report: parses, embeds its images, escapes user text, shows the numbers; JSON round-trips."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest

from loraforge.errors import LoraforgeError
from loraforge.report import write_report

EVALUATION = {
    "split": "test", "n": 2, "metric_names": ["exact_match", "rougeL", "bleu"],
    "models": {"base": {"loss": 2.5, "perplexity": 12.2, "exact_match": 0.0, "rougeL": 0.31, "bleu": 12.5},
               "tuned": {"loss": 0.1, "perplexity": 1.1, "exact_match": 1.0, "rougeL": 1.0, "bleu": 100.0}},
    "samples": [{"prompt": "<script>alert(1)</script> & 'quotes'", "reference": '{"a": 1}',
                 "answers": {"base": "no idea", "tuned": '{"a":1}'}}],
    "consistency": {"base": {"agreement": 0.4, "distinct": 2.8, "samples_per_prompt": 5, "temperature": 0.7,
                             "prompts": 10}},
    "resources": {"base_params": 1000, "trainable_params": 10, "trainable_percent": 1.0, "adapter_mb": 0.5,
                  "base_mb": 50.0, "latency": {"base": {"ms_per_token": 10.0, "peak_mb": 500.0},
                                               "unmerged": {"ms_per_token": 11.0, "peak_mb": 510.0},
                                               "merged": {"ms_per_token": 10.1, "peak_mb": 500.0}}},
}


def _run(tmp_path, evaluation=True):
    (tmp_path / "config.yaml").write_text("model: default\nlr: 0.001\nlora:\n  r: 16\n")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "train_loss": 2.0, "lr": 1e-3, "grad_norm": float("nan")}, {"step": 2, "train_loss": 1.0, "lr": 5e-4},
        {"step": 2, "val_loss": 1.2, "val_perplexity": 3.3}]))
    (tmp_path / "data_report.json").write_text(json.dumps({"rows_read": 10, "kept": 9, "split_sizes": {"train": 7},
                                                           "invalid_reasons": ["f.jsonl:3: bad <row>"]}))
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 2, "stopped": "max_steps", "best_val_loss": 1.2,
                                                       "seconds": 90}))
    if evaluation:
        (tmp_path / "evaluation.json").write_text(json.dumps(EVALUATION))
    return tmp_path


class _Strict(HTMLParser):
    def __init__(self):
        super().__init__()
        self.open, self.images = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_report_is_self_contained_and_shows_the_numbers(tmp_path):
    html_path, json_path = write_report(_run(tmp_path))
    text = html_path.read_text()
    parser = _Strict()
    parser.feed(text)
    parser.close()
    assert len(parser.images) == 3  # learning curves, learning rate, metric chart
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &#x27;quotes&#x27;" in text
    assert "bad &lt;row&gt;" in text
    assert "100.0%" in text and "0.0%" in text and "12.5" in text and "40.0%" in text
    assert '<td class="num best">100.0%</td>' in text  # the best exact match is marked
    assert '✓' in text  # the tuned answer equals the JSON reference
    saved = json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert saved["evaluation"] == EVALUATION and saved["metrics"][0]["grad_norm"] is None


def test_report_without_evaluation_still_has_curves(tmp_path):
    html_path, _ = write_report(_run(tmp_path, evaluation=False))
    text = html_path.read_text()
    assert text.count("data:image/png;base64,") == 2 and "Before / after" not in text


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(LoraforgeError, match="no run data in"):
        write_report(tmp_path)


def test_the_learning_curve_plots_the_validation_sample_and_the_whole_split_apart():
    from loraforge.report import learning_curve_figure

    rows = [{"step": 1, "train_loss": 2.0}, {"step": 2, "val_loss": 1.5, "val_sample_loss": 1.5, "val_rows": 16},
            {"step": 4, "val_loss": 1.1, "val_sample_loss": 1.0, "val_rows": 120}]
    lines = {line.get_label(): list(line.get_ydata()) for line in learning_curve_figure(rows).axes[0].get_lines()}
    assert lines["validation loss (sample)"] == [1.5, 1.0]  # comparable rows: the same sample every time
    assert lines["validation loss (whole split)"] == [1.1]
