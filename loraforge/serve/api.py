"""The HTTP side: an OpenAI-compatible FastAPI app in front of the engine and the adapter registry.

    GET  /v1/models                 the base model and every adapter under the adapter folder
    POST /v1/chat/completions       `model` names an adapter (the base model's name: no adapter); SSE with stream
    POST /v1/completions            the same for raw text prompts
    GET|POST|DELETE /admin/adapters[/{name}]   list / load / unload, only when an admin token is set

Every error is a JSON body in OpenAI's shape with a 4xx/5xx status; tracebacks stay in the server log.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedTokenizerBase

from loraforge.data import prompt_ids
from loraforge.errors import AdapterError, AdapterFileError, LoraforgeError
import loraforge.serve.protocol as wire
from loraforge.serve.engine import Delta, Engine, Event, Failed, Finished, Generation, SamplingParams
from loraforge.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, GenerationRequest, Limits
from loraforge.serve.registry import AdapterBusy, AdapterNotFound, AdapterRegistry, InvalidAdapterName

logger = logging.getLogger(__name__)


@dataclass
class Server:
    """Everything the routes use."""

    engine: Engine
    registry: AdapterRegistry
    tokenizer: PreTrainedTokenizerBase
    base_name: str
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    admin_token: str | None = None  # None: no admin endpoints
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    tokenizer_lock: threading.Lock = field(default_factory=threading.Lock)


ERROR_STATUS = [  # most specific first
    (ApiError, None), (InvalidAdapterName, 400), (AdapterNotFound, 404), (AdapterBusy, 503),
    (AdapterFileError, 422), (AdapterError, 422), (LoraforgeError, 400),
]


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.engine.start()
        yield
        server.engine.shutdown()

    app = FastAPI(title="loraforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=server.limits.max_body_bytes)
    app.include_router(_openai_routes(server))
    if server.admin_token:
        app.include_router(_admin_routes(server))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "in_flight": server.in_flight}

    return app


# -- errors --------------------------------------------------------------------------------------
def _error(status: int, message: str, kind: str | None = None, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(wire.error_body(message, kind, param), status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LoraforgeError)
    async def project_error(request: Request, error: LoraforgeError) -> JSONResponse:
        if isinstance(error, ApiError):
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return _error(error.status, str(error), error.kind, error.param, headers)
        status = next(code for kind, code in ERROR_STATUS if isinstance(error, kind))
        return _error(status, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        return _error(400, _describe_validation(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
        return _error(500, f"internal server error ({type(error).__name__}); the server log has the details")


def _describe_validation(errors: list[dict]) -> str:
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        message = "unknown field" if error.get("type") == "extra_forbidden" else error.get("msg", "invalid")
        parts.append(f"{location or 'body'}: {message}")
    return "invalid request: " + "; ".join(parts)


class BodySizeLimit:
    """Answers 413 to a body over `max_bytes`, whether it declares its length or arrives in chunks."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later reads wait for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        response = _error(413, f"request body too large: the limit is {self.max_bytes} bytes")
        await response(scope, receive, send)


# -- authentication ------------------------------------------------------------------------------
def _bearer_matches(request: Request, secret: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), secret.encode())


def _require(secret_of: Callable[[], str | None], what: str):
    def check(request: Request) -> None:
        secret = secret_of()
        if secret and not _bearer_matches(request, secret):
            raise ApiError(401, f"missing or wrong {what}: send the header 'Authorization: Bearer <{what}>'",
                           "authentication_error")
    return check


# -- OpenAI endpoints ----------------------------------------------------------------------------
def _openai_routes(server: Server) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_require(lambda: server.api_key, "API key"))])

    @router.get("/models")
    async def list_models() -> dict:
        adapters = await asyncio.to_thread(server.registry.available)
        cards = [wire.model_card(server.base_name, server.created)]
        cards += [wire.model_card(name, server.created, parent=server.base_name) for name in adapters
                  if name != server.base_name]
        return {"object": "list", "data": cards}

    @router.get("/models/{model_id}")
    async def get_model(model_id: str) -> dict:
        if model_id == server.base_name:
            return wire.model_card(model_id, server.created)
        await asyncio.to_thread(server.registry.folder, model_id)
        return wire.model_card(model_id, server.created, parent=server.base_name)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt = await _encode(server, lambda t: prompt_ids(t, messages))
        return await _complete(server, body, [prompt], chat=True)

    @router.post("/completions")
    async def completions(body: CompletionRequest):
        texts = body.prompts()
        prompts = await _encode(server, lambda t: [t(text)["input_ids"] for text in texts])
        return await _complete(server, body, prompts, chat=False)

    return router


async def _encode(server: Server, encode: Callable):
    def run():
        with server.tokenizer_lock:
            return encode(server.tokenizer)
    return await asyncio.to_thread(run)


def _sampling(server: Server, body: GenerationRequest, prompts: list[list[int]]) -> SamplingParams:
    limits, context = server.limits, server.engine.context_length
    if body.n * len(prompts) > limits.max_n:
        raise ApiError(400, f"this request asks for {body.n * len(prompts)} choices (prompts × n); the server's "
                            f"limit is {limits.max_n}", param="n")
    requested = body.requested_max_tokens()
    if requested is not None and requested > limits.max_tokens:
        raise ApiError(400, f"max_tokens={requested} is over the server's limit of {limits.max_tokens}",
                       param="max_tokens")
    longest = max(len(p) for p in prompts)
    room = context - longest if context else limits.max_tokens
    if (requested or 1) > room:
        raise ApiError(400, f"the prompt has {longest} tokens; with max_tokens={requested or 1} that exceeds the "
                            f"model's context of {context} tokens")
    max_new_tokens = requested or min(limits.default_max_tokens, limits.max_tokens, room)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=body.temperature, top_p=body.top_p,
                          seed=body.seed, stop=body.stop_strings())


async def _complete(server: Server, body: GenerationRequest, prompts: list[list[int]], chat: bool):
    """Run the generations of one request; answer in one JSON body or as a stream of SSE chunks."""
    params = _sampling(server, body, prompts)
    if server.in_flight >= server.limits.max_concurrent:
        raise ApiError(429, f"the server is busy ({server.limits.max_concurrent} requests in flight); retry later",
                       "rate_limit_error")
    adapter = None if body.model == server.base_name else body.model
    server.in_flight += 1
    left = False

    def leave() -> None:
        nonlocal left
        if not left:
            left = True
            server.in_flight -= 1

    try:
        events, generations = await _start(server, adapter, prompts, params, body, chat)
    except BaseException:
        leave()
        raise
    stop_all = _stopper(generations, leave)
    if body.stream:
        stream = _stream(server, body, prompts, events, len(generations), chat, stop_all)
        return StreamingResponse(stream, media_type="text/event-stream", background=BackgroundTask(stop_all))
    try:
        finals = await _collect(events, len(generations))
    finally:
        stop_all()
    response_id = wire.new_id("chatcmpl" if chat else "cmpl")
    build = wire.chat_response if chat else wire.completion_response
    return build(response_id, body.model, finals, wire.usage(sum(map(len, prompts)), finals))


async def _start(server: Server, adapter: str | None, prompts: list[list[int]], params: SamplingParams,
                 body: GenerationRequest, chat: bool) -> tuple[asyncio.Queue, list[Generation]]:
    """Pin the adapter (loading it if needed) and submit one generation per choice."""
    internal_name = await asyncio.to_thread(server.registry.acquire, adapter) if adapter is not None else None
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: Event) -> None:  # called on the engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is gone: the server is shutting down

    remaining = len(prompts) * body.n
    lock = threading.Lock()

    def exited() -> None:  # the adapter stays pinned until the engine let go of every row using it
        nonlocal remaining
        with lock:
            remaining -= 1
            if remaining == 0 and adapter is not None:
                server.registry.release(adapter)

    generations = [Generation(prompt, internal_name, params, emit, index=p * body.n + c, stream=body.stream,
                              strip=chat, on_exit=exited)
                   for p, prompt in enumerate(prompts) for c in range(body.n)]
    try:
        server.engine.submit(generations)
    except BaseException as error:  # whatever went wrong, the pin goes: a leaked pin blocks the adapter for good
        if adapter is not None:
            server.registry.release(adapter)
        if isinstance(error, LoraforgeError):
            raise ApiError(503, str(error), "server_error") from None
        logger.exception("submitting a generation failed")
        raise ApiError(500, f"the request could not be started ({type(error).__name__}); the server log has the "
                            "details", "server_error") from None
    return events, generations


def _stopper(generations: list[Generation], leave: Callable[[], None]) -> Callable[[], None]:
    def stop_all() -> None:  # idempotent: runs when the answer is complete or the client went away
        for generation in generations:
            generation.cancel()
        leave()
    return stop_all


async def _collect(events: asyncio.Queue, count: int) -> list[Finished]:
    finals: dict[int, Finished] = {}
    while len(finals) < count:
        event = await events.get()
        if isinstance(event, Failed):
            raise ApiError(500, event.message, "server_error")
        if isinstance(event, Finished):
            finals[event.index] = event
    return [finals[i] for i in sorted(finals)]


async def _stream(server: Server, body: GenerationRequest, prompts: list[list[int]], events: asyncio.Queue,
                  count: int, chat: bool, stop_all: Callable[[], None]) -> AsyncIterator[str]:
    response_id = wire.new_id("chatcmpl" if chat else "cmpl")
    model = body.model

    def chunk(index: int, text: str | None = None, reason: str | None = None) -> str:
        if chat:
            return wire.sse(wire.chat_chunk(response_id, model, index, {} if text is None else {"content": text},
                                            reason))
        return wire.sse(wire.completion_chunk(response_id, model, index, text or "", reason))

    try:
        if chat:
            for index in range(count):
                yield wire.sse(wire.chat_chunk(response_id, model, index, {"role": "assistant", "content": ""}))
        finals: list[Finished] = []
        while len(finals) < count:
            event = await events.get()
            if isinstance(event, Delta):
                yield chunk(event.index, event.text)
            elif isinstance(event, Finished):
                finals.append(event)
                yield chunk(event.index, reason=event.reason)
            else:
                yield wire.sse(wire.error_body(event.message, "server_error"))
                break
        else:
            if body.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield wire.sse(wire.usage_chunk(response_id, model, obj, wire.usage(sum(map(len, prompts)), finals)))
        yield wire.sse("[DONE]")
    finally:
        stop_all()


# -- admin endpoints -------------------------------------------------------------------------------
def _admin_routes(server: Server) -> APIRouter:
    router = APIRouter(prefix="/admin", dependencies=[Depends(_require(lambda: server.admin_token, "admin token"))])

    @router.get("/adapters")
    async def resident() -> dict:
        return {"max_adapters": server.registry.max_adapters,
                "loaded": [{"name": name, "in_use": users} for name, users in server.registry.resident().items()]}

    @router.post("/adapters/{name}")
    async def load(name: str) -> dict:
        await asyncio.to_thread(server.registry.load, name)
        return {"loaded": name}

    @router.delete("/adapters/{name}")
    async def unload(name: str) -> dict:
        await asyncio.to_thread(server.registry.unload, name)
        return {"unloaded": name}

    return router
