"""``winnow serve [MODEL]``: the HTTP server. Flags are named as ``vllm serve`` names them.

The only place that reads the environment (``WINNOW_API_KEY``; ``TOKENIZERS_PARALLELISM`` and
``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` get defaults that suit a server).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn

from winnow.models.files import DEFAULT_MODEL

logger = logging.getLogger("winnow")

_SERVE_EXAMPLES = """examples:
  winnow serve                                             the bundled all-MiniLM-L6-v2 on :8000
  winnow serve cross-encoder/ms-marco-MiniLM-L-6-v2 --port 8080
  winnow serve ./my-classifier --pooler-config.task token_classify --api-key secret
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="winnow", description="Serve transformer classification models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="Serve a model over HTTP (vLLM-compatible pooling endpoints).",
        description="Serve a model over HTTP: /classify, /score, /rerank, /pooling, /v1/embeddings, /tokenize...",
        epilog=_SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "model", nargs="?", default=DEFAULT_MODEL, help=f"Hub id or local folder (default: {DEFAULT_MODEL})."
    )
    net = serve.add_argument_group("server")
    net.add_argument("--host", default="0.0.0.0", help="Interface to bind (default: all interfaces).")
    net.add_argument("--port", type=int, default=8000, help="Port (default: 8000).")
    net.add_argument(
        "--served-model-name", nargs="+", default=None, help="Names clients use in `model`; the first is echoed."
    )
    net.add_argument(
        "--api-key",
        nargs="+",
        default=None,
        help="Require `Authorization: Bearer <key>` on every route but /health and /ping (also WINNOW_API_KEY).",
    )
    net.add_argument(
        "--max-concurrent-requests", type=int, default=512, help="Inference requests in flight; more get 429."
    )
    net.add_argument(
        "--max-request-body-bytes", type=int, default=64 * 1024 * 1024, help="Larger request bodies get 413."
    )
    net.add_argument(
        "--trust-request-chat-template", action="store_true", help="Allow a chat_template field in requests."
    )
    net.add_argument("--disable-fastapi-docs", action="store_true", help="Do not serve /docs and /openapi.json.")
    net.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    net.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="No log line per request (the other info logs stay); the event loop then spends ~15%% less per request.",
    )
    model = serve.add_argument_group("model")
    model.add_argument("--runner", default="auto", choices=["auto", "pooling"], help="Model runner (pooling only).")
    model.add_argument(
        "--convert", default="auto", choices=["auto", "none", "embed", "classify"], help="Adapt the architecture."
    )
    model.add_argument(
        "--pooler-config",
        type=_json_object,
        default=None,
        help='Pooler options as JSON, e.g. \'{"task": "token_classify"}\', or dotted: --pooler-config.task X',
    )
    model.add_argument("--hf-overrides", type=_json_object, default=None, help="JSON patched into config.json.")
    model.add_argument("--max-model-len", type=int, default=None, help="Max tokens per prompt (or per pair).")
    model.add_argument(
        "--dtype",
        default="auto",
        help="auto (bf16 on GPUs and on CPUs with AVX512-BF16/AMX, else fp32), float32, float16, bfloat16.",
    )
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
    model.add_argument(
        "--quantization", default=None, choices=["int8"], help="int8: feed-forward layers in int8 (CPU, opt-in)."
    )
    model.add_argument("--tokenizer", default=None, help="Tokenizer folder or hub id (default: the model's).")
    model.add_argument("--revision", default=None, help="Hub revision.")
    model.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (fallback).")
    model.add_argument(
        "--chat-template", default=None, help="Jinja template (path or text): chat requests and score prompts."
    )
    batching = serve.add_argument_group("batching")
    batching.add_argument("--max-num-batched-tokens", type=int, default=None, help="Token budget per forward pass.")
    batching.add_argument("--max-num-seqs", type=int, default=None, help="Sequences per forward pass.")
    batching.add_argument(
        "--cuda-graph-max-tokens",
        type=int,
        default=0,
        help="GPU, experimental: batches of up to this many tokens replay captured CUDA graphs (0: off).",
    )
    batching.add_argument(
        "--cpu-workers",
        type=int,
        default=None,
        help="CPU: batches run side by side, each on cores // N threads; a lone request still gets every core.",
    )
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _split_dotted(argv: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """Pull ``--pooler-config.<field> <value>`` (or ``=value``) out of argv; values parse as JSON when they can."""
    rest, dotted, items = [], {}, list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg.startswith("--pooler-config."):
            key, _, value = arg[len("--pooler-config.") :].partition("=")
            if not value:
                if i + 1 >= len(items):
                    raise SystemExit(f"winnow serve: {arg} needs a value")
                i += 1
                value = items[i]
            try:
                dotted[key.replace("-", "_")] = json.loads(value)
            except ValueError:
                dotted[key.replace("-", "_")] = value
        else:
            rest.append(arg)
        i += 1
    return rest, dotted


def serve(args: argparse.Namespace, dotted_pooler: dict[str, Any]) -> int:
    from winnow.engine.builder import EngineArgs, prepare_engine
    from winnow.errors import WinnowError
    from winnow.server.app import create_app
    from winnow.server.state import ServerSettings, ServerState

    api_keys = args.api_key or ([os.environ["WINNOW_API_KEY"]] if os.environ.get("WINNOW_API_KEY") else [])
    pooler = {**(args.pooler_config or {}), **dotted_pooler} or None
    engine_args = EngineArgs(
        model=args.model,
        runner=args.runner,
        convert=args.convert,
        pooler_config=pooler,
        hf_overrides=args.hf_overrides,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        device=args.device,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        quantization=args.quantization,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
        cuda_graph_max_tokens=args.cuda_graph_max_tokens,
        cpu_workers=args.cpu_workers,
    )
    try:
        config, inputs = prepare_engine(engine_args)
    except WinnowError as e:
        logger.error("%s", e)
        return 2
    settings = ServerSettings(
        served_model_names=tuple(args.served_model_name or [args.model]),
        api_keys=tuple(api_keys),
        max_concurrent_requests=args.max_concurrent_requests,
        max_request_body_bytes=args.max_request_body_bytes,
        trust_request_chat_template=args.trust_request_chat_template,
        enable_docs=not args.disable_fastapi_docs,
        tune_gc=True,  # this process serves and nothing else
    )
    state = ServerState(config, inputs, settings)
    server: GracefulServer | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(state, on_fatal=stop)
    logger.info(
        "Serving %s as %s: %s, at http://%s:%d%s",
        config.model.model,
        list(settings.served_model_names),
        config.describe(),
        args.host,
        args.port,
        " (API key required)" if api_keys else "",
    )
    logger.info("Loading weights in the background; /health answers 503 until the model is warmed up.")
    server = GracefulServer(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=not args.disable_uvicorn_access_log,
            timeout_graceful_shutdown=60,
        )
    )
    server.run()
    return 1 if state.load_error is not None else 0


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, so the process would die by the
    signal; a server that stopped accepting, finished its requests and shut down cleanly exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv_list, dotted = _split_dotted(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv_list)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # NOTE: torch's intra-op pool owns the cores; the Rust tokenizer's own thread pool would compete with it
    # (tokenization already runs beside the model in worker threads), so it is off unless the user set it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # torch's OpenMP workers otherwise spin between operators, taking the cores from the threads
    # that parse, tokenize and answer requests: on 2 cores, bench_serve's default embed run served
    # 68-77 items/s with workers that sleep at once against 64-67 with spinning ones. A short spin
    # (libgomp counts ~100k spins per ms: ~0.2 ms) still bridges the microsecond gaps between the
    # operators of one forward pass, where waking a sleeping worker costs most: in bfloat16 it served
    # 103.9-114.5 items/s against 100.1-102.1 with no spin (4 alternating pairs). OpenMP reads both
    # once, when torch loads, which is below (``import winnow`` does not load torch).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "20000")
    if args.command == "serve":
        return serve(args, dotted)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
