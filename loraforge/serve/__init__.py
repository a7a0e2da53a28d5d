"""`loraforge serve`: one base model, many LoRA adapters, one OpenAI-compatible HTTP server.

    engine.py    continuous batching: rows with different adapters share every forward pass (KV cache)
    batch.py     the running batch's left-padded KV cache: rows join after prefill, leave when done
    text.py      token ids to text, streamed in pieces, with stop strings
    registry.py  adapters by name from one folder: path safety, lazy loading, LRU residency
    protocol.py  OpenAI request/response bodies, and the limits on what a request may ask
    api.py       the FastAPI app: routes, authentication, limits, JSON errors

    from loraforge.serve import build_server
    from loraforge.serve.api import create_app
    app = create_app(build_server("default", "adapters/"))   # then: uvicorn.run(app, host="127.0.0.1")
"""

from __future__ import annotations

import argparse
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loraforge.hardware import TORCH_NAMES, dtype_named
from loraforge.serve.protocol import Limits

if TYPE_CHECKING:  # the HTTP app (FastAPI) is imported by what serves, not by every command that names `serve`
    from loraforge.serve.api import Server

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def build_server(base: str, adapters_dir: str | Path, *, device: str = "auto", dtype: str = "float32",
                 max_adapters: int = 16, max_batch: int = 32, threads: int | None = None,
                 limits: Limits | None = None, api_key: str | None = None, admin_token: str | None = None,
                 base_name: str | None = None) -> Server:
    """Load the base model and wire engine, adapter registry and limits together (no adapter is loaded yet)."""
    from loraforge.lora import LoraModel
    from loraforge.models import DEFAULT_MODEL, is_default_model, load_model
    from loraforge.serve.api import Server
    from loraforge.serve.engine import Engine
    from loraforge.serve.registry import AdapterRegistry

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(base, dtype=dtype_named(dtype), device=device)
    lora = LoraModel(model)
    model_lock = threading.Lock()
    registry = AdapterRegistry(lora, adapters_dir, max_adapters, model_lock)
    engine = Engine(lora, tokenizer, model_lock, max_batch=max_batch, threads=threads)
    name = base_name or (DEFAULT_MODEL if is_default_model(base) else Path(base).resolve().name)
    return Server(engine, registry, tokenizer, name, limits or Limits(), api_key, admin_token)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `loraforge serve`."""
    serve = commands.add_parser(
        "serve", help="OpenAI-compatible server: one base model, many adapters per batch",
        description="Serve a base model and every adapter under --adapters-dir over an OpenAI-compatible API. "
                    "A request's `model` names an adapter (the base model's name: no adapter); requests for "
                    "different adapters share each forward pass. See docs/serving.md.")
    serve.add_argument("--base", default="default", help="base model folder, or 'default' (SmolLM2-135M-Instruct)")
    serve.add_argument("--adapters-dir", required=True, help="folder whose subfolders are adapters, by name")
    serve.add_argument("--base-name", help="the base model's id in the API (default: its folder name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("LORAFORGE_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $LORAFORGE_API_KEY; unset: no key)")
    serve.add_argument("--admin-token", default=os.environ.get("LORAFORGE_ADMIN_TOKEN"),
                       help="enable /admin/adapters load/unload behind this token (default: "
                            "$LORAFORGE_ADMIN_TOKEN; unset: no admin endpoints)")
    serve.add_argument("--max-adapters", type=int, default=16, help="adapters kept loaded (least recently used out)")
    serve.add_argument("--max-batch", type=int, default=32, help="rows decoded together")
    serve.add_argument("--max-tokens", type=int, default=Limits.max_tokens, help="cap on a request's max_tokens")
    serve.add_argument("--max-n", type=int, default=Limits.max_n, help="cap on choices per request")
    serve.add_argument("--max-body-bytes", type=int, default=Limits.max_body_bytes)
    serve.add_argument("--max-concurrent", type=int, default=Limits.max_concurrent,
                       help="requests in flight; more are answered 429")
    serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, …")
    serve.add_argument("--dtype", choices=sorted(TORCH_NAMES), default="float32")
    serve.add_argument("--threads", type=int, help="torch threads of the engine (default: torch's)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from loraforge.serve.api import create_app

    limits = Limits(max_tokens=args.max_tokens, default_max_tokens=min(Limits.default_max_tokens, args.max_tokens),
                    max_n=args.max_n, max_body_bytes=args.max_body_bytes, max_concurrent=args.max_concurrent)
    server = build_server(args.base, args.adapters_dir, device=args.device, dtype=args.dtype,
                          max_adapters=args.max_adapters, max_batch=args.max_batch, threads=args.threads,
                          limits=limits, api_key=args.api_key, admin_token=args.admin_token,
                          base_name=args.base_name)
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it")
    adapters = server.registry.available()
    print(f"base model {server.base_name!r}; {len(adapters)} adapter(s) in {args.adapters_dir}: "
          f"{', '.join(adapters[:8])}{' …' if len(adapters) > 8 else ''}")
    print(f"OpenAI-compatible API at http://{args.host}:{args.port}/v1")
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
