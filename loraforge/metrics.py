"""Text metrics for generated answers against references.

Exact match and token F1 follow SQuAD's normalisation (lowercase, no punctuation or articles, single
spaces); when a reference is JSON, exact match compares parsed values instead. ROUGE comes from
`rouge-score`, BLEU and chrF from `sacrebleu` (0–100, corpus level). Accuracy and macro-F1 treat
answers as labels. Every metric except BLEU and chrF is in [0, 1].
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from loraforge.errors import ConfigError

GENERATION_METRICS = ("exact_match", "token_f1", "rouge1", "rouge2", "rougeL", "bleu", "chrf")
LABEL_METRICS = ("accuracy", "macro_f1")
ALL_METRICS = GENERATION_METRICS + LABEL_METRICS
# A reference set this small and repetitive (≤ this many distinct short answers) looks like labels.
MAX_LABELS = 20


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _as_json(text: str):
    try:
        value = json.loads(text.strip())
    except (json.JSONDecodeError, TypeError, AttributeError):
        return None
    return value if isinstance(value, (dict, list)) else None


def answers_match(prediction: str, reference: str) -> bool:
    """Exact match; when the reference is JSON, equal parsed values (key order and spacing don't matter)."""
    expected = _as_json(reference)
    if expected is not None:
        return _as_json(prediction) == expected
    return normalize(prediction) == normalize(reference)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _mean([float(answers_match(p, r)) for p, r in zip(predictions, references)])


def token_f1_one(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _mean([token_f1_one(p, r) for p, r in zip(predictions, references)])


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    return {key: _mean([s[key].fmeasure for s in scores]) for key in ("rouge1", "rouge2", "rougeL")}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_chrf(list(predictions), [list(references)]).score


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    return _mean([float(normalize(p) == normalize(r)) for p, r in zip(predictions, references)])


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over reference labels of each label's F1 (answers outside the label set count as wrong)."""
    pred = [normalize(p) for p in predictions]
    ref = [normalize(r) for r in references]
    scores = []
    for label in sorted(set(ref)):
        tp = sum(p == label and r == label for p, r in zip(pred, ref))
        fp = sum(p == label and r != label for p, r in zip(pred, ref))
        fn = sum(p != label and r == label for p, r in zip(pred, ref))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return _mean(scores)


def looks_like_labels(references: Sequence[str]) -> bool:
    """Short answers drawn from a small set repeat: a classification task."""
    distinct = {normalize(r) for r in references}
    return (len(references) >= 2 * len(distinct) and len(distinct) <= MAX_LABELS
            and all(len(r.split()) <= 3 for r in distinct))


def choose_metrics(references: Sequence[str], requested: Sequence[str] | str = "auto") -> list[str]:
    """The metrics to report: those requested, or for 'auto' label metrics on label-like answers and
    generation metrics otherwise."""
    if requested == "auto":
        return list(LABEL_METRICS + ("exact_match",) if looks_like_labels(references) else GENERATION_METRICS)
    names = [requested] if isinstance(requested, str) else list(requested)
    unknown = [n for n in names if n not in ALL_METRICS]
    if unknown:
        raise ConfigError(f"metrics: unknown {unknown}; choose from {', '.join(ALL_METRICS)} or 'auto'")
    return names


SCORERS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "exact_match": exact_match,
    "token_f1": token_f1,
    "bleu": bleu,
    "chrf": chrf,
    "accuracy": accuracy,
    "macro_f1": macro_f1,
}


def score(predictions: Sequence[str], references: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    result: dict[str, float] = {}
    rouge_names = [n for n in names if n.startswith("rouge")]
    if rouge_names:
        all_rouge = rouge(predictions, references)
        result.update({n: all_rouge[n] for n in rouge_names})
    for name in names:
        if name not in result:
            result[name] = SCORERS[name](predictions, references)
    return {name: result[name] for name in names}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
