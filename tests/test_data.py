"""Data: formats, validation errors with file:line, cleaning counts, splits, and exact loss-mask positions."""

from __future__ import annotations

import json

import pytest

from conftest import LLAMA3, make_tokenizer
from loraforge.config import DataConfig
from loraforge.data import (
    IGNORE_INDEX, DataReport, collate, example_order, load_conversations, prepare_data, split_conversations,
    tokenize,
)
from loraforge.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _write(tmp_path, rows, name="data.jsonl") -> object:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _load(path, **config):
    report = DataReport()
    return load_conversations(path, DataConfig(**config), report), report


def test_three_formats_are_detected_and_converted(tmp_path):
    path = _write(tmp_path, [
        GOOD,
        {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "be brief"},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ])
    conversations, report = _load(path)
    assert report.formats == {"messages": 1, "alpaca": 1, "sharegpt": 1}
    assert conversations[1].messages == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"}]
    assert conversations[2].messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert conversations[2].source == f"{path}:3"


def test_json_list_files_are_read_too(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD | {"messages": GOOD["messages"][:1] + [
        {"role": "assistant", "content": "other"}]}]))
    conversations, _ = _load(path)
    assert len(conversations) == 2 and conversations[1].source == f"{path}:row 2"


BAD_ROWS = [
    ("{not json", "not valid JSON"),
    ('["a list"]', "must be a JSON object"),
    ({"text": "no known keys"}, "unknown row format"),
    ({"messages": "nope"}, "'messages' must be a list"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}, "unknown role 'wizard'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}, "must be a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "last turn must be a non-empty assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "last turn"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "no non-empty user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system message may only come first"),
    ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}, "turn 0 has no 'role'"),
    ({"instruction": "do", "output": 3}, "alpaca row needs a string 'output'"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown speaker 'robot'"),
]


@pytest.mark.parametrize("row,reason", BAD_ROWS, ids=[r[1][:30] for r in BAD_ROWS])
def test_bad_row_names_file_line_and_reason(tmp_path, row, reason):
    path = _write(tmp_path, [GOOD, row, GOOD])
    with pytest.raises(DataError) as info:
        _load(path)
    assert f"{path}:2: " in str(info.value) and reason in str(info.value)


def test_skip_invalid_counts_and_keeps_the_rest(tmp_path):
    path = _write(tmp_path, [GOOD] + [row for row, _ in BAD_ROWS[1:]] + [GOOD | {"messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}])
    conversations, report = _load(path, skip_invalid=True)
    assert len(conversations) == 2 and report.rows_invalid == len(BAD_ROWS) - 1
    assert report.invalid_reasons[0].startswith(f"{path}:2: ")


def test_forced_format_rejects_other_rows(tmp_path):
    path = _write(tmp_path, [GOOD])
    with pytest.raises(DataError, match=r":1: alpaca row needs a string 'instruction'"):
        _load(path, format="alpaca")


def test_cleaning_strips_control_chars_drops_empty_turns_and_duplicates(tmp_path):
    path = _write(tmp_path, [
        {"messages": [{"role": "system", "content": " "}, {"role": "user", "content": "he\x00llo\x07"},
                      {"role": "assistant", "content": "wo\x1brld"}]},
        GOOD, GOOD,
    ])
    conversations, report = _load(path)
    assert conversations[0].messages == [{"role": "user", "content": "hello"},
                                         {"role": "assistant", "content": "world"}]
    assert (report.rows_with_control_chars, report.empty_turns_dropped, report.duplicates_dropped) == (1, 1, 1)
    assert report.kept == 2


def test_split_is_seeded_and_covers_everything(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(50)]
    conversations, _ = _load(_write(tmp_path, rows))
    train, val, test = split_conversations(conversations, (0.8, 0.1, 0.1), seed=3)
    assert (len(train), len(val), len(test)) == (40, 5, 5)
    assert sorted(c.source for c in train + val + test) == sorted(c.source for c in conversations)
    again = split_conversations(conversations, (0.8, 0.1, 0.1), seed=3)
    assert [c.source for c in again[2]] == [c.source for c in test]
    assert [c.source for c in split_conversations(conversations, (0.8, 0.1, 0.1), seed=4)[2]] != \
        [c.source for c in test]
    with pytest.raises(DataError, match="too few"):
        split_conversations(conversations[:2], (0.4, 0.3, 0.3), seed=0)


def _trained_runs(tokenizer, example) -> list[str]:
    """The text of each contiguous run of tokens that carries loss."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "answer 42"},
    {"role": "user", "content": "question"},
    {"role": "assistant", "content": "0123"},
]


def test_mask_chatml_trains_exactly_the_answers_and_end_of_turn():
    tokenizer = make_tokenizer()
    example = tokenize(tokenizer, CONVERSATION, max_seq_len=512)
    assert _trained_runs(tokenizer, example) == ["answer 42<|im_end|>\n", "0123<|im_end|>\n"]
    # the prompt positions are masked: the first token is <|im_start|> and carries no loss
    assert example.labels[0] == IGNORE_INDEX and example.input_ids[0] == tokenizer.convert_tokens_to_ids(
        "<|im_start|>")
    assert not example.truncated


def test_mask_llama3_template():
    tokenizer = make_tokenizer(LLAMA3, eos="<|eot_id|>")
    example = tokenize(tokenizer, CONVERSATION, max_seq_len=512)
    assert _trained_runs(tokenizer, example) == ["answer 42<|eot_id|>", "0123<|eot_id|>"]
    assert tokenizer.convert_ids_to_tokens(example.input_ids[0]) == "<|begin_of_text|>"  # not doubled
    assert tokenizer.convert_ids_to_tokens(example.input_ids[1]) == "<|start_header_id|>"


def test_truncation_is_counted_and_answerless_examples_dropped(tmp_path):
    tokenizer = make_tokenizer()
    long_answer = {"messages": [{"role": "user", "content": "q"},
                                {"role": "assistant", "content": "answer " * 20}]}
    long_prompt = {"messages": [{"role": "user", "content": "question " * 40},
                                {"role": "assistant", "content": "a"}]}
    path = _write(tmp_path, [long_answer, long_prompt, GOOD])
    config = DataConfig(path=path, split=(1.0, 0.0, 0.0))
    data = prepare_data(config, tokenizer, max_seq_len=24, seed=0)
    assert data.report.truncated == 2 and data.report.dropped_no_target == 1
    assert data.report.split_sizes == {"train": 2, "validation": 0, "test": 0}
    assert all(len(e.input_ids) <= 24 for e in data.train.examples)


def test_template_that_rewrites_history_is_refused():
    template = "{% for m in messages %}{{ m['content'] + ('!' if loop.last else '') }}{% endfor %}"
    with pytest.raises(DataError, match="renders earlier turns differently"):
        tokenize(make_tokenizer(template), CONVERSATION, max_seq_len=64)


def test_collate_pads_right_and_masks_padding():
    tokenizer = make_tokenizer()
    examples = [tokenize(tokenizer, CONVERSATION[1:3], 512), tokenize(tokenizer, CONVERSATION, 512)]
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape == (2, len(examples[1].input_ids))
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert batch["attention_mask"][1].all()


def test_example_order_is_an_endless_stream_of_epochs_and_resumable():
    stream = example_order(10, seed=1, start=0, count=30)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]
    assert example_order(10, seed=1, start=7, count=9) == stream[7:16]
