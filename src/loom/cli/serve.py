"""`loom serve`: load a model and serve it over an OpenAI-compatible HTTP API (completions, chat,
streaming, metrics, embeddings / rerank / score, optionally with an embedding model of their own, LoRA
adapters chosen per request by ``model``) until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import os
import sys

from loom.cli.options import (add_device_option, add_engine_options, add_lora_serving_options, add_model_options,
                              add_speculative_options, llm_from_args)
from loom.serve.protocol import RequestLimits


def register(subparsers: argparse._SubParsersAction) -> None:
    sv = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    add_model_options(sv)
    add_device_option(sv)
    add_engine_options(sv)
    add_speculative_options(sv)
    add_lora_serving_options(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every route but /health (default: $LOOM_API_KEY)")
    sv.add_argument("--api-key-file", default=None, help="read the API key from this file (keeps it out of `ps`)")
    sv.add_argument("--public-docs", action="store_true", help="serve /openapi.json and /docs without the API key")
    sv.add_argument("--served-model-name", default=None, help="the model id clients send (default: file name)")
    sv.add_argument("--max-waiting", type=int, default=256, help="requests waiting beyond this get 503")
    sv.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger bodies get 413")
    sv.add_argument("--request-body-timeout", type=float, default=30.0,
                    help="seconds a request body may take to arrive (slower ones get 408)")
    limits = RequestLimits()
    sv.add_argument("--max-prompts-per-request", type=int, default=limits.max_prompts,
                    help="prompts in one /v1/completions request")
    sv.add_argument("--max-stop-strings", type=int, default=limits.max_stop_strings, help="stop sequences per request")
    sv.add_argument("--max-stop-chars", type=int, default=limits.max_stop_chars,
                    help="total characters of a request's stop sequences")
    sv.add_argument("--embedding-model", nargs="?", const="", default=None, metavar="PATH",
                    help="an embedding model folder for /v1/embeddings, /v1/rerank, /v1/score (no PATH: "
                         "all-MiniLM-L6-v2; without the option the served model embeds, by its pooled final hidden "
                         "states)")
    sv.add_argument("--embedding-model-name", default=None,
                    help="its model id (default: the folder name, all-MiniLM-L6-v2 for the default)")
    sv.add_argument("--max-embedding-inputs", type=int, default=None,
                    help="inputs in one /v1/embeddings request, documents in one rerank (default 2048)")
    sv.add_argument("--graceful-timeout", type=float, default=30.0,
                    help="seconds in-flight requests may finish after SIGTERM")
    sv.add_argument("--log-level", default="info")


def default_served_name(path: str) -> str:
    """The model id served by default: the file or folder name, without .gguf."""
    name = os.path.basename(os.path.normpath(path))
    return name[:-5] if name.endswith(".gguf") else name


def api_key(args: argparse.Namespace) -> str | None:
    """The API key: --api-key, else the first line of --api-key-file, else $LOOM_API_KEY (None: no key)."""
    if args.api_key:
        return args.api_key
    if args.api_key_file:
        with open(args.api_key_file, encoding="utf-8") as f:
            key = f.readline().strip()
        if not key:
            raise ValueError(f"{args.api_key_file}: the API key file is empty")
        return key
    return os.environ.get("LOOM_API_KEY") or None


def run(args: argparse.Namespace) -> int:
    import logging

    from loom.default_model import DEFAULT_EMBEDDING_NAME, default_embedding_model_path
    from loom.llm import LLM
    from loom.serve.app import create_app
    from loom.serve.server import serve
    from loom.serve.state import MAX_EMBEDDING_INPUTS

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    key = api_key(args)
    limits = RequestLimits(args.max_prompts_per_request, args.max_stop_strings, args.max_stop_chars)
    llm = llm_from_args(args)  # --max-waiting bounds the scheduler's queue
    name = args.served_model_name or default_served_name(llm.model_path)
    embedder, embedding_name = None, None
    if args.embedding_model is not None:
        path = args.embedding_model or default_embedding_model_path()
        embedder = LLM(path, device=args.device).embedder
        embedding_name = args.embedding_model_name or (DEFAULT_EMBEDDING_NAME if not args.embedding_model
                                                       else default_served_name(path))
    app = create_app(llm.engine, llm.tokenizer, name, api_key=key, max_request_bytes=args.max_request_bytes,
                     body_timeout_s=args.request_body_timeout, limits=limits, public_docs=args.public_docs,
                     embedder=embedder, embedding_model_name=embedding_name,
                     max_embedding_inputs=args.max_embedding_inputs or MAX_EMBEDDING_INPUTS, model_root=llm.model_path,
                     allow_runtime_lora=args.allow_runtime_lora)
    adapters = [a.name for a in llm.engine.list_loras()]
    print(f"loom: serving {name!r} on http://{args.host}:{args.port} (load {llm.load_seconds:.2f} s; "
          f"{llm.engine.describe()})" + (f"; embeddings by {embedding_name!r}" if embedding_name else "")
          + (f"; LoRA adapters {', '.join(map(repr, adapters))}" if adapters else "")
          + ("; runtime LoRA loading on" if args.allow_runtime_lora else ""), file=sys.stderr)
    status = serve(app, args.host, args.port, args.log_level, args.graceful_timeout)
    llm.shutdown()
    return status
