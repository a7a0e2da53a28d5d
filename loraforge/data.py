"""Conversations → cleaned, split, tokenized examples with an assistant-only loss mask.

Reads JSONL (or a JSON list) in three formats, detected per row from its keys:
- messages: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}   (OpenAI)
- alpaca:   {"instruction": "...", "input": "...", "output": "...", "system"?: "..."}
- sharegpt: {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}]}
Every row is validated (known roles, string content, a user turn, a final assistant turn); a bad row
stops loading with file:line and the reason, or is skipped and counted with `skip_invalid`.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from loraforge.config import DataConfig
from loraforge.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
# Control characters other than tab and newline corrupt tokenization and are never meant.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

Messages = list[dict[str, str]]
T = TypeVar("T")


@dataclass
class Conversation:
    messages: Messages
    source: str  # "file:line", for messages about this row


@dataclass
class DataReport:
    """What happened to the data, as counts (shown to the user and written to the run folder)."""

    rows_read: int = 0
    rows_invalid: int = 0
    invalid_reasons: list[str] = field(default_factory=list)  # the first few, with file:line
    formats: dict[str, int] = field(default_factory=dict)
    rows_with_control_chars: int = 0
    empty_turns_dropped: int = 0
    duplicates_dropped: int = 0
    kept: int = 0
    split_sizes: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    dropped_no_target: int = 0
    tokens: dict[str, int] = field(default_factory=dict)  # per split: all tokens
    target_tokens: dict[str, int] = field(default_factory=dict)  # per split: tokens that carry loss

    def to_dict(self) -> dict:
        return asdict(self)


# -- reading -------------------------------------------------------------------------------------
def require_data_file(path: Path, key: str | None = None) -> None:
    """A missing data file is the user's error: say which, and by the config key that named it where known."""
    if not path.is_file():
        raise DataError(f"{key}: data file {path} does not exist" if key else f"data file {path} does not exist")


def read_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(source, parsed row) for a JSONL file, or a .json file holding a list of rows."""
    require_data_file(path)
    text = path.read_text(encoding="utf-8", errors="strict") if path.suffix == ".json" else None
    if text is not None:
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json data file must hold a list of rows")
        for index, row in enumerate(rows, start=1):
            yield f"{path}:row {index}", row
        return
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row or "output" in row:
        return "alpaca"
    raise ValueError(f"unknown row format with keys {sorted(row)[:6]}; expected messages, conversations "
                     "(sharegpt) or instruction/output (alpaca)")


def to_messages(row: object, fmt: str) -> Messages:
    """The row as OpenAI-style messages; ValueError with the reason when it does not fit `fmt`."""
    if not isinstance(row, dict):
        raise ValueError(f"a row must be a JSON object, not {type(row).__name__}")
    if fmt == "messages":
        turns = row.get("messages")
        if not isinstance(turns, list):
            raise ValueError("'messages' must be a list")
        return [_turn(t, "role", "content", i) for i, t in enumerate(turns)]
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list):
            raise ValueError("'conversations' must be a list")
        messages = []
        for i, t in enumerate(turns):
            turn = _turn(t, "from", "value", i)
            if turn["role"] not in SHAREGPT_ROLES:
                raise ValueError(f"turn {i}: unknown speaker {turn['role']!r} (expected human, gpt or system)")
            messages.append({"role": SHAREGPT_ROLES[turn["role"]], "content": turn["content"]})
        return messages
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise ValueError(f"alpaca row needs a string {key!r}")
    for key in ("input", "system"):
        if row.get(key) is not None and not isinstance(row[key], str):
            raise ValueError(f"alpaca {key!r} must be a string")
    prompt = row["instruction"] + (f"\n\n{row['input']}" if row.get("input", "").strip() else "")
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _turn(turn: object, role_key: str, content_key: str, index: int) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise ValueError(f"turn {index} must be an object")
    role, content = turn.get(role_key), turn.get(content_key)
    if not isinstance(role, str):
        raise ValueError(f"turn {index} has no {role_key!r}")
    if not isinstance(content, str):
        raise ValueError(f"turn {index} ({role}): {content_key!r} must be a string, not {type(content).__name__}")
    return {"role": role, "content": content}


def clean(messages: Messages) -> tuple[Messages, int, bool]:
    """Strip control characters and drop empty turns: (messages, empty turns dropped, had control chars)."""
    had_control = False
    kept = []
    for message in messages:
        content = CONTROL_CHARS.sub("", message["content"])
        had_control |= content != message["content"]
        if content.strip():
            kept.append({"role": message["role"], "content": content})
    return kept, len(messages) - len(kept), had_control


def validate(messages: Messages) -> None:
    for i, message in enumerate(messages):
        if message["role"] not in ROLES:
            raise ValueError(f"turn {i}: unknown role {message['role']!r} (expected one of {', '.join(ROLES)})")
        if message["role"] == "system" and i != 0:
            raise ValueError(f"turn {i}: a system message may only come first")
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("no non-empty user turn")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last turn must be a non-empty assistant answer")


def checked_rows(path: Path, config: DataConfig, report: DataReport, parse: Callable[[object, str], T]
                 ) -> Iterator[tuple[str, T]]:
    """(source, parse(row, source)) for each row that parses; a row whose parse raises ValueError stops the
    load with file:line and the reason, or with `skip_invalid` is counted in `report` and skipped."""
    for source, row in read_rows(path):
        report.rows_read += 1
        try:
            parsed = parse(row, source)
        except ValueError as exc:
            if not config.skip_invalid:
                raise DataError(f"{source}: {exc} (set data.skip_invalid=true to skip such rows)") from None
            report.rows_invalid += 1
            if len(report.invalid_reasons) < 10:
                report.invalid_reasons.append(f"{source}: {exc}")
            continue
        yield source, parsed


def three_splits(config: DataConfig, seed: int, load: Callable[[Path], list]) -> list[list]:
    """Train / validation / test rows: the explicit validation_path / test_path files when given, else a seeded
    split of the data file by config.split. `load` reads one file."""
    rows = load(Path(config.path))
    if config.validation_path or config.test_path:
        return [rows] + [load(Path(extra)) if extra else [] for extra in (config.validation_path, config.test_path)]
    return list(split_conversations(rows, config.split, seed))


def load_conversations(path: Path, config: DataConfig, report: DataReport) -> list[Conversation]:
    """Read, convert, clean, validate and dedupe one file, adding counts to `report`."""
    conversations, seen = [], set()
    formats: Counter[str] = Counter(report.formats)

    def parse(row: object, source: str) -> tuple[str, Messages, int, bool]:
        fmt = detect_format(row) if config.format == "auto" and isinstance(row, dict) else config.format
        messages, empty, had_control = clean(to_messages(row, "messages" if fmt == "auto" else fmt))
        validate(messages)
        return fmt, messages, empty, had_control

    for source, (fmt, messages, empty, had_control) in checked_rows(path, config, report, parse):
        formats[fmt] += 1
        report.empty_turns_dropped += empty
        report.rows_with_control_chars += had_control
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        if config.dedupe and key in seen:
            report.duplicates_dropped += 1
            continue
        seen.add(key)
        conversations.append(Conversation(messages, source))
    report.formats = dict(formats)
    report.kept += len(conversations)
    return conversations


def split_conversations(conversations: list[Conversation], fractions: tuple[float, float, float],
                        seed: int) -> tuple[list[Conversation], list[Conversation], list[Conversation]]:
    """Seeded shuffle, then cut into train/validation/test by the fractions (each non-zero part ≥ 1 row)."""
    order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [conversations[i] for i in order]
    n = len(shuffled)
    n_val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
    n_test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
    if n - n_val - n_test < 1:
        raise DataError(f"only {n} conversations: too few to split {fractions} and keep a training set")
    return shuffled[: n - n_val - n_test], shuffled[n - n_val - n_test : n - n_test], shuffled[n - n_test :]


def read_conversations(path: Path) -> list[Conversation]:
    """A run's split as written by write_jsonl (empty when the file does not exist)."""
    if not path.exists():
        return []
    return [Conversation(to_messages(row, "messages"), source) for source, row in read_rows(path)]


def write_rows(rows: Sequence[dict], path: Path) -> None:
    """Rows as JSONL (a run's copy of its data splits)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def write_jsonl(conversations: list[Conversation], path: Path) -> None:
    write_rows([{"messages": conversation.messages} for conversation in conversations], path)


# -- tokens --------------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    truncated: bool = False


def render(tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; use a chat/instruct model or set one")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """The token ids a model answers from: the rendered messages and the template's generation prompt (the
    template writes its special tokens itself)."""
    return tokenizer(render(tokenizer, messages, generation_prompt=True), add_special_tokens=False)["input_ids"]


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Messages,
                    from_turn: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss: each assistant answer from turn
    `from_turn` on, with the template's end-of-turn marker (so the model learns to stop), found by rendering
    prefixes — most templates have no generation markers."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < from_turn:
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError("this chat template renders earlier turns differently once later turns exist; "
                            "cannot tell which tokens are the assistant's")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize(tokenizer: PreTrainedTokenizerBase, messages: Messages, max_seq_len: int, from_turn: int = 0) -> Example:
    """Token ids and labels; only assistant turns from `from_turn` on carry loss (DPO: the completion alone)."""
    text, spans = assistant_spans(tokenizer, messages, from_turn)
    # The template writes special tokens (bos, <|im_start|>) itself; adding them again would double them.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start < end_span and end > start_span for start_span, end_span in spans) else IGNORE_INDEX
        for token, (start, end) in zip(ids, encoded["offset_mapping"])
    ]
    truncated = len(ids) > max_seq_len
    return Example(ids[:max_seq_len], labels[:max_seq_len], truncated)


@dataclass
class Split:
    conversations: list[Conversation]
    examples: list[Example]


@dataclass
class PreparedData:
    train: Split
    validation: Split
    test: Split
    report: DataReport


def prepare_data(config: DataConfig, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, seed: int,
                 default_path: Path | None = None) -> PreparedData:
    report = DataReport()
    path = config.path or default_path
    if path is None:
        raise DataError("no data file given (data=FILE)")
    config = config.model_copy(update={"path": Path(path)})
    parts = three_splits(config, seed, lambda file: load_conversations(file, config, report))
    splits = []
    for name, part in zip(("train", "validation", "test"), parts):
        kept_conversations, examples = [], []
        for conversation in part:
            example = tokenize(tokenizer, conversation.messages, max_seq_len)
            report.truncated += example.truncated
            if all(label == IGNORE_INDEX for label in example.labels):
                report.dropped_no_target += 1  # the answer was cut off entirely
                continue
            kept_conversations.append(conversation)
            examples.append(example)
        report.split_sizes[name] = len(examples)
        report.tokens[name] = sum(len(e.input_ids) for e in examples)
        report.target_tokens[name] = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
        splits.append(Split(kept_conversations, examples))
    if not splits[0].examples:
        raise DataError(f"{path}: no usable training conversations")
    return PreparedData(*splits, report)


def collate(examples: list[Example], pad_token_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example.

    packed=True puts several conversations into one row (first fit, longest first, rows no longer than the
    longest example), with position ids restarting at each conversation: far less padding, and the same
    per-conversation loss — given position ids and no attention mask, transformers builds a block-diagonal
    causal mask, so attention never crosses conversations. `attention_mask` is still returned (1 on real
    tokens) for counting; the loss function does not pass it on for packed batches.
    """
    rows = _pack_rows(examples) if packed else [[e] for e in examples]
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for example in row:
            n = len(example.input_ids)
            input_ids[r, offset : offset + n] = torch.tensor(example.input_ids)
            labels[r, offset : offset + n] = torch.tensor(example.labels)
            labels[r, offset] = IGNORE_INDEX  # never predict a conversation's first token from the one before
            attention_mask[r, offset : offset + n] = 1
            position_ids[r, offset : offset + n] = torch.arange(n)
            offset += n
        position_ids[r, offset:] = torch.arange(width - offset)  # trailing padding: a segment of its own
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if packed:
        batch["position_ids"] = position_ids
    return batch


def _pack_rows(examples: list[Example]) -> list[list[Example]]:
    capacity = max(len(e.input_ids) for e in examples)
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(example.input_ids)
        slot = next((i for i, free in enumerate(room) if free >= n), None)
        if slot is None:
            rows.append([example])
            room.append(capacity - n)
        else:
            rows[slot].append(example)
            room[slot] -= n
    return rows


def example_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices `start … start+count-1` of an endless stream of seeded per-epoch shuffles of range(n).
    A run's data position is one integer, so resuming continues the same order exactly."""
    indices = []
    for position in range(start, start + count):
        epoch, offset = divmod(position, n)
        if offset == 0 or not indices:
            permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        indices.append(permutation[offset])
    return indices
