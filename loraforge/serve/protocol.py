"""The OpenAI wire format: request bodies (validated by pydantic), the limits on what one may ask, and the JSON
the server answers with.

Only what the server implements is accepted: an unknown field is a 400 naming it, not silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loraforge.errors import LoraforgeError
from loraforge.serve.engine import Finished

MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask, and on requests in flight (waiting or generating)."""

    max_tokens: int = 1024
    default_max_tokens: int = 256  # when a request names none, as `loraforge chat`
    max_n: int = 4  # choices per request (prompts × n)
    max_body_bytes: int = 1 << 20
    max_concurrent: int = 256


class ApiError(LoraforgeError):
    """An error answered as OpenAI does: HTTP status + {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- requests ------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy (the answer `loraforge chat` gives)")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None)
    # Row i of n samples with seed + i; torch takes seeds below 2⁶⁴.
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}", param="stop")
        return tuple(stops)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]

    def prompts(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or not all(prompts):
            raise ApiError(400, "prompt must be a non-empty string or a list of non-empty strings", param="prompt")
        return prompts


# -- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, finals: list[Finished]) -> dict:
    """Token counts; the prompt counts once however many choices it has, as OpenAI counts it."""
    completion = sum(f.completion_tokens for f in finals)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def chat_response(response_id: str, model: str, finals: list[Finished], usage_info: dict) -> dict:
    choices = [{"index": f.index, "message": {"role": "assistant", "content": f.text}, "finish_reason": f.reason,
                "logprobs": None} for f in finals]
    return {"id": response_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_info}


def completion_response(response_id: str, model: str, finals: list[Finished], usage_info: dict) -> dict:
    choices = [{"index": f.index, "text": f.text, "finish_reason": f.reason, "logprobs": None} for f in finals]
    return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_info}


def chat_chunk(response_id: str, model: str, index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": response_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion_chunk(response_id: str, model: str, index: int, text: str, finish_reason: str | None = None) -> dict:
    return {"id": response_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def usage_chunk(response_id: str, model: str, obj: str, usage_info: dict) -> dict:
    return {"id": response_id, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_info}


def sse(data: dict | str) -> str:
    """One server-sent event, as OpenAI streams them."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def model_card(model_id: str, created: int, parent: str | None = None) -> dict:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "loraforge"}
    if parent is not None:
        card["parent"] = parent
    return card
