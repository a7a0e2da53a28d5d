"""Each metric against values computed by hand on tiny inputs."""

from __future__ import annotations

import pytest

from loraforge.errors import ConfigError
from loraforge.metrics import (
    accuracy, answers_match, bleu, choose_metrics, chrf, exact_match, looks_like_labels, macro_f1, normalize, rouge,
    score, token_f1, token_f1_one,
)


def test_normalize_and_exact_match():
    assert normalize("The  Cat, sat!") == "cat sat"
    assert exact_match(["The cat.", "a dog"], ["the cat", "cat"]) == 0.5
    assert answers_match('{"b":2, "a": 1}', '{"a": 1, "b": 2}')  # JSON: parsed values, order-free
    assert not answers_match('{"a": 1, "b": 3}', '{"a": 1, "b": 2}')
    assert not answers_match("a: 1, b: 2", '{"a": 1, "b": 2}')


def test_token_f1_by_hand():
    # pred {cat, sat}, ref {cat, sat, on, mat}: P = 1, R = 1/2 → F1 = 2/3
    assert token_f1_one("the cat sat", "cat sat on mat") == pytest.approx(2 / 3)
    assert token_f1_one("dog", "cat") == 0.0 and token_f1_one("", "") == 1.0
    assert token_f1(["the cat sat", "dog"], ["cat sat on mat", "dog"]) == pytest.approx((2 / 3 + 1) / 2)


def test_rouge_by_hand():
    scores = rouge(["the cat sat on the mat"], ["the cat on the mat"])
    # unigrams: 5 of 6 predicted appear in the 5-word reference → P 5/6, R 1 → F 10/11
    assert scores["rouge1"] == pytest.approx(10 / 11)
    # bigrams: 3 shared of 5 predicted and 4 reference → P 3/5, R 3/4 → F 2/3
    assert scores["rouge2"] == pytest.approx(2 / 3)
    # longest common subsequence "the cat on the mat" (5): same as rouge1 here
    assert scores["rougeL"] == pytest.approx(10 / 11)


def test_bleu_and_chrf_bounds():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert bleu(["xyz qqq"], ["the cat sat on the mat"]) == pytest.approx(0.0)
    assert chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    assert 0 < chrf(["the cat"], ["the cap"]) < 100


def test_label_metrics_by_hand():
    refs, preds = ["pos", "neg", "pos", "neg"], ["pos", "neg", "neg", "neg"]
    assert accuracy(preds, refs) == 0.75
    # pos: tp 1, fp 0, fn 1 → 2/3; neg: tp 2, fp 1, fn 0 → 4/5; macro = (2/3 + 4/5) / 2
    assert macro_f1(preds, refs) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert macro_f1(["maybe"] * 4, refs) == 0.0


def test_metric_choice():
    assert looks_like_labels(["pos", "neg"] * 5) and not looks_like_labels(['{"a": 1}', '{"a": 2}'])
    assert choose_metrics(["pos", "neg"] * 5) == ["accuracy", "macro_f1", "exact_match"]
    assert choose_metrics(["a long answer here", "another one"])[0] == "exact_match"
    assert choose_metrics(["x"], ["bleu", "rougeL"]) == ["bleu", "rougeL"]
    with pytest.raises(ConfigError, match="unknown \\['blue'\\]"):
        choose_metrics(["x"], ["blue"])
    assert score(["the cat"], ["the cat"], ["exact_match", "rouge1", "chrf"]) == pytest.approx(
        {"exact_match": 1.0, "rouge1": 1.0, "chrf": 100.0})
