"""``winnow serve [MODEL]``: the HTTP server. Flags are named as ``vllm serve`` names them.

The only place that reads the environment (``WINNOW_API_KEY``, else ``VLLM_API_KEY``;
``TOKENIZERS_PARALLELISM`` and ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` get defaults that suit a server).
vLLM commands run unchanged: its engine flags that mean nothing here are accepted with a warning
(``_IGNORED_FLAGS``), and so are its legacy spellings (``--task``, ``--override-pooler-config``, ``--flag_name``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import uvicorn

from winnow.models.files import DEFAULT_MODEL

if TYPE_CHECKING:
    from winnow.engine.builder import EngineArgs

logger = logging.getLogger("winnow")

# vLLM flags for what winnow does not have: flag -> (takes a value, why it means nothing here).
_IGNORED_FLAGS: dict[str, tuple[bool, str]] = {
    "--enforce-eager": (False, "winnow runs eagerly; CUDA graphs are opt-in (--cuda-graph-max-tokens)"),
    "--seed": (True, "pooling samples nothing, so there is nothing to seed"),
    "--gpu-memory-utilization": (True, "winnow reserves no KV-cache memory up front"),
    "--tensor-parallel-size": (True, "winnow runs a model on one device"),
    "--pipeline-parallel-size": (True, "winnow runs a model on one device"),
    "--tokenizer-mode": (True, "winnow always uses the model's fast (Rust) tokenizer"),
    "--enable-prefix-caching": (False, "winnow keeps no KV cache between requests"),
    "--no-enable-prefix-caching": (False, "winnow keeps no KV cache between requests"),
    "--enable-chunked-prefill": (False, "every prompt runs whole in one forward pass"),
    "--no-enable-chunked-prefill": (False, "every prompt runs whole in one forward pass"),
    "--kv-cache-dtype": (True, "winnow keeps no KV cache"),
    "--swap-space": (True, "winnow keeps no KV cache to swap out"),
    "--disable-log-requests": (False, "winnow never logs what requests contain (see --disable-uvicorn-access-log)"),
    "--disable-log-stats": (False, "winnow logs no periodic stats; they are on /metrics"),
    "--enable-server-load-tracking": (False, "winnow always tracks /load"),
    "--enable-request-id-headers": (False, "winnow always honours X-Request-Id"),
}
_SHORT_FLAGS = {"--tensor-parallel-size": "-tp", "--pipeline-parallel-size": "-pp"}
# The names scoring.shipped_templates() gives, without loading torch to print --help.
_SHIPPED_TEMPLATES = sorted(p.stem for p in (Path(__file__).parent / "templates").glob("*.jinja"))

_IGNORED_LIST = ", ".join(f"{flag} ({_SHORT_FLAGS[flag]})" if flag in _SHORT_FLAGS else flag for flag in _IGNORED_FLAGS)
_SERVE_EPILOG = f"""examples:
  winnow serve                                             the bundled all-MiniLM-L6-v2 on :8000
  winnow serve cross-encoder/ms-marco-MiniLM-L-6-v2 --port 8080
  winnow serve ./my-classifier --pooler-config.task token_classify --api-key secret

vLLM flags accepted and ignored, with a warning saying why:
{textwrap.fill(_IGNORED_LIST, 100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)}
Legacy spellings: --task, --override-pooler-config (deprecated, with a warning); --flag_name is --flag-name.

environment:
  WINNOW_API_KEY, else VLLM_API_KEY: the API key when --api-key is not given.
  TOKENIZERS_PARALLELISM=false, OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=20000: set unless already set.
  Hugging Face's own (HF_HOME, HF_TOKEN, HF_HUB_OFFLINE...) apply to downloads.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="winnow", description="Serve transformer classification models.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="Serve a model over HTTP (vLLM-compatible pooling endpoints).",
        description="Serve a model over HTTP: /classify, /score, /rerank, /pooling, /v1/embeddings, /tokenize...",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # None, not DEFAULT_MODEL, so that _check can tell whether a model was given.
    serve.add_argument("model", nargs="?", default=None, help=f"Hub id or local folder (default: {DEFAULT_MODEL}).")
    net = serve.add_argument_group("server")
    net.add_argument("--host", default="0.0.0.0", help="Interface to bind (default: all interfaces).")
    net.add_argument("--port", type=_int_in(0, 65535), default=8000, help="Port (default: 8000).")
    net.add_argument(
        "--served-model-name", nargs="+", default=None, help="Names clients use in `model`; the first is echoed."
    )
    net.add_argument(
        "--api-key",
        nargs="+",
        type=_api_key,
        default=None,
        help="Require `Authorization: Bearer <key>` on every route but /health and /ping "
        "(default: WINNOW_API_KEY, else VLLM_API_KEY, else none).",
    )
    net.add_argument(
        "--max-concurrent-requests",
        type=_int_in(1),
        default=512,
        help="Inference requests in flight; more get 429 (default: 512).",
    )
    net.add_argument(
        "--max-request-body-bytes",
        type=_int_in(1),
        default=64 * 1024 * 1024,
        help="Larger request bodies get 413 (default: 67108864, 64 MiB).",
    )
    net.add_argument(
        "--trust-request-chat-template", action="store_true", help="Allow a chat_template field in requests."
    )
    net.add_argument("--disable-fastapi-docs", action="store_true", help="Do not serve /docs and /openapi.json.")
    net.add_argument(
        "--log-level",
        "--uvicorn-log-level",
        default="info",
        choices=["debug", "info", "warning", "error", "critical"],
        metavar="LEVEL",
        help="debug, info, warning, error or critical: the least severe logs shown, winnow's and uvicorn's "
        "(default: info).",
    )
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
    model.add_argument(
        "--override-pooler-config", type=_json_object, default=None, help="Deprecated: use --pooler-config."
    )
    model.add_argument(
        "--task", default=None, help="Deprecated: use --convert and --pooler-config.task (mapped as LLM(task=...))."
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
        "--chat-template",
        default=None,
        help="Jinja template for chat requests and score prompts: inline text, a file, or a shipped one: "
        f"{', '.join(_SHIPPED_TEMPLATES)}.",
    )
    batching = serve.add_argument_group("batching")
    batching.add_argument(
        "--max-num-batched-tokens",
        type=_int_in(1),
        default=None,
        help="Token budget per forward pass (default: 4096 on a CPU, 16384 on a GPU).",
    )
    batching.add_argument(
        "--max-num-seqs",
        type=_int_in(1),
        default=None,
        help="Sequences per forward pass (default: 128 on a CPU, 512 on a GPU).",
    )
    batching.add_argument(
        "--cuda-graph-max-tokens",
        type=_int_in(0),
        default=0,
        help="GPU, experimental: batches of up to this many tokens replay captured CUDA graphs (0: off).",
    )
    batching.add_argument(
        "--cpu-workers",
        type=_int_in(1),
        default=None,
        help="CPU: batches run side by side, each on cores // N threads; a lone request still gets every core "
        "(default: 2 for winnow's own model code on 2 threads or more, else 1).",
    )
    for flag, (takes_value, reason) in _IGNORED_FLAGS.items():
        short = [_SHORT_FLAGS[flag]] if flag in _SHORT_FLAGS else []
        serve.add_argument(
            flag,
            *short,
            dest="ignored",
            action=_IgnoredFlag,
            nargs=None if takes_value else 0,
            const=reason,
            default=None,
            help=argparse.SUPPRESS,
        )
    return parser


class _IgnoredFlag(argparse.Action):
    """Records the flag and why it is ignored in ``args.ignored``; main warns once per flag."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest) or {}), self.option_strings[0]: self.const})


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


def _api_key(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "an empty key would let every request in (an unset variable?); pass a non-empty key or leave --api-key out"
        )
    return text


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _usage_error(message: str) -> NoReturn:
    print(f"winnow serve: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _dashed(argv: Sequence[str]) -> list[str]:
    """``--flag_name`` -> ``--flag-name``, as vLLM's parser does: the flag's name only (not its ``=value``,
    nor a dotted ``--pooler-config.<field>``, whose field _split_dotted reads), and nothing after ``--``."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            head, dot, field = name.partition(".")
            out[i] = head.replace("_", "-") + dot + field + eq + value
    return out


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
                    _usage_error(f"{arg} needs a value")
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


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The parsed flags and the dotted ``--pooler-config.<field>`` ones; a user's mistake exits with code 2."""
    rest, dotted = _split_dotted(_dashed(argv))
    args = build_parser().parse_args(rest)
    if args.command == "serve":
        _check_model_given(args)
    return args, dotted


def _check_model_given(args: argparse.Namespace) -> None:
    """``--api-key`` and ``--served-model-name`` take every word after them: ``winnow serve --api-key k ./model``
    would serve the default model with ``./model`` as a key."""
    if args.model is None:
        for flag, values, what in (
            ("--api-key", args.api_key, "a key"),
            ("--served-model-name", args.served_model_name, "a served name"),
        ):
            for value in values or []:
                if os.path.exists(value):
                    _usage_error(
                        f"{value!r} was read as {what} ({flag} takes every word after it) and no model was given; "
                        f"put the model first: winnow serve {value} {flag} ..."
                    )
        args.model = DEFAULT_MODEL


def _api_keys(args: argparse.Namespace, environ: Mapping[str, str]) -> list[str]:
    if args.api_key:
        return list(args.api_key)
    key = environ.get("WINNOW_API_KEY") or environ.get("VLLM_API_KEY")
    return [key] if key else []


def _engine_args(args: argparse.Namespace, dotted_pooler: dict[str, Any]) -> EngineArgs:
    """The engine's arguments, with the deprecated --override-pooler-config and --task mapped as ``LLM`` maps them."""
    from winnow.engine.builder import EngineArgs

    pooler: Any = {**(args.pooler_config or {}), **dotted_pooler} or None
    if args.override_pooler_config is not None:
        logger.warning("--override-pooler-config is deprecated; use --pooler-config.")
        pooler = pooler or args.override_pooler_config
    convert = args.convert
    if args.task is not None:
        from winnow.engine.builder import LEGACY_TASKS, legacy_task_args

        if args.task not in LEGACY_TASKS:
            _usage_error(
                f"--task {args.task} is not a pooling task; --task takes {', '.join(LEGACY_TASKS)} "
                "(better: --convert and --pooler-config.task)."
            )
        given = pooler
        convert, pooler = legacy_task_args(args.task, convert, pooler)
        token_task = " --pooler-config.task token_classify" if pooler is not given else ""
        logger.warning("--task is deprecated; --task %s is served as --convert %s%s.", args.task, convert, token_task)
    return EngineArgs(
        model=args.model,
        runner=args.runner,
        convert=convert,
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


def serve(args: argparse.Namespace, dotted_pooler: dict[str, Any]) -> int:
    from winnow.engine.builder import prepare_engine
    from winnow.errors import WinnowError
    from winnow.server.app import create_app
    from winnow.server.state import ServerSettings, ServerState

    api_keys = _api_keys(args, os.environ)
    engine_args = _engine_args(args, dotted_pooler)
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
    args, dotted = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for flag, reason in (getattr(args, "ignored", None) or {}).items():
        logger.warning("Ignoring %s: %s.", flag, reason)
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
