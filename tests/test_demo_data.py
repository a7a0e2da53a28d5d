"""The bundled demo dataset (loraforge/demo/orders.jsonl): well-formed, answerable from the message, reproducible."""

from __future__ import annotations

import json
import re

import pytest

from loraforge.demo import DEMO_DATA
from loraforge.demo.make_dataset import KEYS, SYSTEM, TEMPLATES, dataset_text


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return DEMO_DATA.read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def conversations(lines) -> list[dict]:
    return [json.loads(line) for line in lines]


def test_size(lines):
    assert len(lines) >= 1000


def test_roles_and_system_prompt(conversations):
    for conv in conversations:
        assert list(conv) == ["messages"]
        messages = conv["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in messages)
        assert messages[0]["content"] == SYSTEM


def test_answers_are_compact_json_taken_from_the_message(conversations):
    for conv in conversations:
        user, answer = conv["messages"][1]["content"], conv["messages"][2]["content"]
        data = json.loads(answer)
        assert tuple(data) == KEYS, answer
        assert answer == json.dumps(data)  # default separators, fixed key order: one canonical text per answer
        assert isinstance(data["quantity"], int) and not isinstance(data["quantity"], bool)
        assert 1 <= data["quantity"] <= 20
        assert re.search(rf"(?<!\d){data['quantity']}(?!\d)", user), (user, answer)
        for key in ("name", "item", "city"):
            assert isinstance(data[key], str) and data[key] and data[key] in user, (key, user, answer)


def test_messages_never_name_the_keys():
    # The base model must not be told the schema; only the system prompt may say "JSON".
    for template in TEMPLATES:
        fixed_text = re.sub(r"\{\w+\}", " ", template).lower()
        for key in KEYS:
            assert not re.search(rf"\b{key}\b", fixed_text), (key, template)


def test_no_duplicates(lines):
    assert len(set(lines)) == len(lines)


def test_varied_phrasings(conversations):
    # Field order varies: count which field comes first in each message.
    first = {}
    for conv in conversations:
        user = conv["messages"][1]["content"]
        data = json.loads(conv["messages"][2]["content"])
        positions = {key: user.find(str(data[key])) for key in KEYS}
        first[min(positions, key=positions.get)] = True
    assert len(TEMPLATES) >= 12
    assert len(first) >= 3


def test_file_matches_the_generator():
    assert DEMO_DATA.read_bytes() == dataset_text().encode("utf-8")
