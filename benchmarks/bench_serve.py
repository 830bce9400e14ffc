"""Online serving throughput and latency: ``winnow serve`` under concurrent HTTP load vs. offline ``LLM``.

Methodology
-----------
* Server: ``python -m winnow.cli serve [MODEL] --host 127.0.0.1 --port <free port>`` as a subprocess
  (``--device`` and the batching flags passed through, access log off unless ``--server-log-level
  info``), started fresh for every run and stopped at the end (SIGTERM, then SIGKILL), also on errors
  and Ctrl-C. The load starts once ``GET /health`` answers 200 (the model is loaded and warmed up).
* Models: ``default`` is the bundled all-MiniLM-L6-v2 (``winnow serve`` with no model argument,
  task embed); the others are random-weight ``BertForSequenceClassification`` folders built by
  ``bench_offline.build_model_folder`` with the shapes of MiniLM-L6 / bert-base: ``*-ce`` have 1
  label (cross-encoders: /rerank and /classify), ``*-cls`` have 2 labels (/classify only).
  ``tiny-cls`` (one layer of width 64) makes the forward nearly free, so its numbers are the
  server's own cost per request.
* Workload: ``--num-items`` texts from ``bench_offline.make_workload`` (seeded, token counts with
  [CLS]/[SEP] log-uniform in [8, 256]) using the model's tokenizer. Requests take the next
  ``--batch`` texts of that list in turn (cycling), so every run sends the same sequence of texts:
  ``embed``: POST /v1/embeddings ``{"input": [texts]}``; ``rerank``: POST /rerank with one fixed short
  query and the texts as ``documents``; ``classify``: POST /classify ``{"input": [texts]}``.
  An *item* is one text (embed, classify) or one (query, document) pair (rerank).
* Load: ``--concurrency`` closed-loop clients in one asyncio loop, each with its own keep-alive
  HTTP/1.1 connection (a minimal client over asyncio streams: httpx took ~1 ms of CPU per request
  from the two cores the server also needs); each sends its next request as soon as the previous
  one is answered. Clients run ``--warmup`` seconds unmeasured, then ``--duration``
  seconds measured; after that no new requests start and the ones in flight are drained.
* Served numbers count the requests that COMPLETED inside the measured window (whatever their start),
  divided by the window's length: requests/s, items/s, tokens/s (the ``usage.prompt_tokens`` of the
  responses). Latency percentiles are over the successful requests of the window, client side
  (send to full response parsed). Errors are counted by HTTP status (or exception name); the first
  error body is printed.
* Server batch statistics: ``GET /metrics`` is scraped when the window opens and when it closes; the
  difference gives the window's batches: mean sequences per batch (``winnow_batch_size``), mean
  tokens per batch, mean padding fraction of the attention grid, mean queue time per prompt, mean
  forward time per batch, and the engine's busy share (forward seconds / window seconds).
* CPU: the load generator runs on the same machine as the server. The client's and the server's CPU
  seconds inside the window are printed (Linux ``/proc``), so it is visible how much of the cores the
  client took from the server; so is the CPU time of the server's main thread (uvicorn's event loop:
  HTTP, routing, validation, rendering) per request completed in the window.
* Offline reference: after the server has stopped (so the two never share the cores), the same
  script loads ``winnow.LLM(<same model>, device=--device)`` with the same ``--max-num-batched-tokens``
  / ``--max-num-seqs`` / ``--cpu-workers`` (and the same default dtype as the server: bfloat16 on CPUs with bf16
  instructions, else float32), runs one untimed warm-up over the first 64 items, then times ONE call
  (``embed`` / ``score(query, docs)`` / ``classify``) over exactly the items the server completed
  in the window, in the same order (``--offline-max-items`` caps that). The headline ratio is
  served items/s divided by offline items/s: what HTTP, JSON, tokenization in the server and
  batching from a queue cost relative to handing the engine every item at once.
* The machine must be otherwise idle for the numbers to mean anything: the load average at the start
  and end is printed and stored.

Usage::

    .venv/bin/python benchmarks/bench_serve.py                                    # default model, embed
    .venv/bin/python benchmarks/bench_serve.py --model minilm-ce --workload rerank --json rerank.json
    .venv/bin/python benchmarks/bench_serve.py --model bert-base-cls --batch 8 --cache-dir /tmp/winnow-bench
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import transformers
from transformers import AutoTokenizer

import winnow

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_offline import (
    MAX_TOKENS,
    MIN_TOKENS,
    MODELS,
    WORKLOAD_SEED,
    ModelSpec,
    build_model_folder,
    core_count,
    cpu_model,
    describe_lengths,
    load_average,
    make_workload,
    tokenizer_source,
    word_list,
)

WORKLOADS = ("embed", "rerank", "classify")
ENDPOINTS = {"embed": "/v1/embeddings", "rerank": "/rerank", "classify": "/classify"}
DEFAULT_BATCH = {"embed": 1, "rerank": 16, "classify": 1}
QUERY_TOKENS = 8  # words in the rerank query
OFFLINE_WARMUP_ITEMS = 64
ERROR_BODY_CHARS = 500


class ServerError(RuntimeError):
    """The server did not come up."""


@dataclass(frozen=True)
class ServeModel:
    name: str
    spec: ModelSpec | None  # None: the bundled all-MiniLM-L6-v2 (no model argument)
    workloads: tuple[str, ...]  # the first is the default


SERVE_MODELS: dict[str, ServeModel] = {
    "default": ServeModel("default", None, ("embed", "rerank")),
    "minilm-ce": ServeModel(
        "minilm-ce", dataclasses.replace(MODELS["minilm"], name="minilm-ce", num_labels=1), ("rerank", "classify")
    ),
    "bert-base-ce": ServeModel(
        "bert-base-ce",
        dataclasses.replace(MODELS["bert-base"], name="bert-base-ce", num_labels=1),
        ("rerank", "classify"),
    ),
    "minilm-cls": ServeModel("minilm-cls", dataclasses.replace(MODELS["minilm"], name="minilm-cls"), ("classify",)),
    "bert-base-cls": ServeModel(
        "bert-base-cls", dataclasses.replace(MODELS["bert-base"], name="bert-base-cls"), ("classify",)
    ),
    # One layer of width 64: the forward costs next to nothing, so what is measured is the server's
    # own work per request (HTTP, routing, validation, tokenization, hand-offs, rendering).
    "tiny-cls": ServeModel("tiny-cls", ModelSpec("tiny-cls", 64, 1, 2, 128), ("classify",)),
}
DEFAULT_MODEL_FOR = {"embed": "default", "rerank": "minilm-ce", "classify": "minilm-cls"}


@dataclass
class Record:
    """One HTTP request as the client saw it."""

    start: float
    end: float
    status: str  # "200", "400", ..., or an exception name
    items: list[int]  # workload indices sent
    tokens: int = 0  # usage.prompt_tokens of a successful answer
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "200"


@dataclass
class Window:
    """The measured interval and what was sampled at its ends."""

    start: float = 0.0
    end: float = 0.0
    metrics_before: dict[str, float] = dataclasses.field(default_factory=dict)
    metrics_after: dict[str, float] = dataclasses.field(default_factory=dict)
    client_cpu_s: float | None = None
    server_cpu_s: float | None = None
    event_loop_cpu_s: float | None = None  # the server's main thread: uvicorn's event loop

    @property
    def seconds(self) -> float:
        return self.end - self.start


# -- server process -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_command(model_arg: str | None, port: int, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "winnow.cli", "serve"]
    if model_arg is not None:
        cmd.append(model_arg)
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", args.device]
    cmd += ["--log-level", args.server_log_level]
    if args.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.cpu_workers is not None:
        cmd += ["--cpu-workers", str(args.cpu_workers)]
    cmd += args.server_args.split()
    return cmd


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def wait_healthy(proc: subprocess.Popen[bytes], base_url: str, timeout_s: float, log: Path) -> float:
    """Poll GET /health until 200; returns the seconds it took. Raises if the server dies or times out."""
    started = time.perf_counter()
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        while time.perf_counter() - started < timeout_s:
            if proc.poll() is not None:
                raise ServerError(f"server exited with code {proc.returncode}:\n{log_tail(log)}")
            try:
                if client.get("/health").status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.5)
    raise ServerError(f"server not healthy after {timeout_s:.0f}s:\n{log_tail(log)}")


def stop_server(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited after ``timeout_s``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"server did not stop within {timeout_s:.0f}s of SIGTERM; killing it")
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def running_server(model_arg: str | None, args: argparse.Namespace, log: Path) -> Iterator[tuple[str, int, float]]:
    """Start the server, wait until healthy; yields (base URL, pid, startup seconds); always stops it."""
    port = free_port()
    cmd = server_command(model_arg, port, args)
    print("starting:", " ".join(cmd))
    with log.open("wb") as log_file:
        # Own session: a Ctrl-C in the terminal reaches only this script, which then stops the server itself.
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base_url = f"http://127.0.0.1:{port}"
        startup_s = wait_healthy(proc, base_url, args.startup_timeout, log)
        print(f"server healthy after {startup_s:.1f}s (pid {proc.pid}, log {log})")
        yield base_url, proc.pid, startup_s
    finally:
        code = stop_server(proc)
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it: -15 is the normal outcome here.
        how = "by SIGTERM" if code == -signal.SIGTERM else f"with exit code {code}"
        print(f"server stopped {how}")


def process_cpu_seconds(pid: int, thread: int | None = None) -> float | None:
    """utime + stime of a process (all its threads), or of one of its threads, from /proc; None where
    /proc is missing."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- requests -----------------------------------------------------------------------------------


class RequestSource:
    """Hands out the workload's texts in order, ``batch`` at a time, cycling; one asyncio loop, no locks."""

    def __init__(self, num_texts: int, batch: int) -> None:
        self.num_texts, self.batch, self.next = num_texts, batch, 0

    def take(self) -> list[int]:
        ids = [(self.next + i) % self.num_texts for i in range(self.batch)]
        self.next += self.batch
        return ids


def request_body(workload: str, texts: list[str], query: str, args: argparse.Namespace) -> dict[str, Any]:
    if workload == "embed":
        return {"input": texts, "encoding_format": args.encoding_format}
    if workload == "rerank":
        return {"query": query, "documents": texts}
    return {"input": texts}


def answered_items(workload: str, payload: dict[str, Any]) -> int:
    return len(payload["results" if workload == "rerank" else "data"])


class Connection:
    """One keep-alive HTTP/1.1 connection, written for the load generator: it shares the server's two
    cores, so every microsecond it spends is taken from the server (httpx cost ~1 ms of CPU per request,
    this ~0.1 ms). Requests are pre-encoded bytes; the answer is the status and the raw body."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        try:
            return await asyncio.wait_for(self._post(path, body), self.timeout_s)
        except BaseException:
            self.close()  # a half-read answer leaves the connection unusable
            raise

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode("ascii") + body)
        status_line, *header_lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in header_lines if ": " in line)
        length = next((int(v) for k, v in headers.items() if k.lower() == "content-length"), None)
        if length is None:
            raise ConnectionError("the answer has no Content-Length (chunked answers are not expected)")
        payload = await self.reader.readexactly(length)
        return int(status_line.split(" ", 2)[1]), payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def send_one(
    conn: Connection, workload: str, ids: list[int], texts: list[str], query: str, args: argparse.Namespace
) -> Record:
    body = json.dumps(request_body(workload, [texts[i] for i in ids], query, args)).encode()
    start = time.perf_counter()
    try:
        status, raw = await conn.post(ENDPOINTS[workload], body)
        if status != 200:
            return Record(start, time.perf_counter(), str(status), ids, error=raw.decode(errors="replace"))
        payload = json.loads(raw)
        got = answered_items(workload, payload)
        tokens = int(payload["usage"]["prompt_tokens"])
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
        return Record(start, time.perf_counter(), type(e).__name__, ids, error=repr(e))
    except (ValueError, KeyError, TypeError) as e:
        return Record(start, time.perf_counter(), "bad-response", ids, error=repr(e))
    end = time.perf_counter()
    if got != len(ids):
        return Record(start, end, "bad-response", ids, error=f"{got} results for {len(ids)} items")
    return Record(start, end, "200", ids, tokens=tokens)


async def client_loop(
    conn: Connection,
    source: RequestSource,
    stop_at: float,
    records: list[Record],
    workload: str,
    texts: list[str],
    query: str,
    args: argparse.Namespace,
) -> None:
    try:
        while time.perf_counter() < stop_at:
            records.append(await send_one(conn, workload, source.take(), texts, query, args))
    finally:
        conn.close()


async def scrape_metrics(client: httpx.AsyncClient) -> dict[str, float]:
    try:
        response = await client.get("/metrics")
        response.raise_for_status()
    except httpx.HTTPError as e:
        print(f"GET /metrics failed: {e!r}; server batch statistics will be missing")
        return {}
    return parse_metrics(response.text)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


async def run_load(
    base_url: str, server_pid: int, workload: str, texts: list[str], query: str, args: argparse.Namespace
) -> tuple[list[Record], Window]:
    source = RequestSource(len(texts), args.batch)
    records: list[Record] = []
    window = Window()
    url = httpx.URL(base_url)
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as admin:  # /metrics, outside the load
        begin = time.perf_counter()
        stop_at = begin + args.warmup + args.duration
        tasks = [
            asyncio.create_task(
                client_loop(
                    Connection(url.host, url.port or 80, args.request_timeout),
                    source,
                    stop_at,
                    records,
                    workload,
                    texts,
                    query,
                    args,
                )
            )
            for _ in range(args.concurrency)
        ]
        try:
            print(f"warm-up {args.warmup:g}s with {args.concurrency} clients ...")
            await asyncio.sleep(args.warmup)
            window.start = time.perf_counter()
            cpu0 = (time.process_time(), process_cpu_seconds(server_pid), process_cpu_seconds(server_pid, server_pid))
            window.metrics_before = await scrape_metrics(admin)
            print(f"measuring {args.duration:g}s ...")
            await asyncio.sleep(max(0.0, stop_at - time.perf_counter()))
            window.end = time.perf_counter()
            cpu1 = (time.process_time(), process_cpu_seconds(server_pid), process_cpu_seconds(server_pid, server_pid))
            window.metrics_after = await scrape_metrics(admin)
            window.client_cpu_s = cpu1[0] - cpu0[0]
            if cpu0[1] is not None and cpu1[1] is not None:
                window.server_cpu_s = cpu1[1] - cpu0[1]
            if cpu0[2] is not None and cpu1[2] is not None:
                window.event_loop_cpu_s = cpu1[2] - cpu0[2]
            _, pending = await asyncio.wait(tasks, timeout=args.request_timeout)
            if pending:
                print(f"{len(pending)} clients still waiting {args.request_timeout:g}s after the window; cancelling")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    return records, window


# -- served statistics --------------------------------------------------------------------------


def in_window(records: list[Record], window: Window) -> list[Record]:
    return [r for r in records if window.start <= r.end <= window.end]


def percentiles_ms(latencies_s: list[float]) -> dict[str, float | None]:
    if not latencies_s:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ms = np.asarray(latencies_s) * 1e3
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)} | {"max": float(ms.max())}


def served_stats(records: list[Record], window: Window) -> dict[str, Any]:
    measured = in_window(records, window)
    ok = [r for r in measured if r.ok]
    errors = [r for r in records if not r.ok]  # all phases: an error during warm-up matters too
    first_error = errors[0] if errors else None
    seconds = window.seconds
    items = sum(len(r.items) for r in ok)
    tokens = sum(r.tokens for r in ok)
    return {
        "window_s": seconds,
        "requests_total": len(records),
        "requests_in_window": len(measured),
        "ok_in_window": len(ok),
        "requests_per_s": len(ok) / seconds,
        "items": items,
        "items_per_s": items / seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "latency_ms": percentiles_ms([r.end - r.start for r in ok]),
        "errors_by_status": dict(Counter(r.status for r in errors)),
        "errors_in_window": len(measured) - len(ok),
        "first_error": None
        if first_error is None
        else {"status": first_error.status, "body": (first_error.error or "")[:ERROR_BODY_CHARS]},
        "client_cpu_s": window.client_cpu_s,
        "server_cpu_s": window.server_cpu_s,
        "event_loop_cpu_s": window.event_loop_cpu_s,
        "event_loop_cpu_ms_per_request": None
        if window.event_loop_cpu_s is None or not measured
        else 1e3 * window.event_loop_cpu_s / len(measured),
    }


def _delta(window: Window, key: str) -> float:
    return window.metrics_after.get(key, 0.0) - window.metrics_before.get(key, 0.0)


def _mean(window: Window, histogram: str) -> float | None:
    count = _delta(window, f"{histogram}_count")
    return _delta(window, f"{histogram}_sum") / count if count > 0 else None


def server_stats(window: Window, route: str) -> dict[str, Any]:
    """Batch statistics of the window from the difference of two /metrics scrapes."""
    batches = _delta(window, "winnow_batch_size_count")
    forward_s = _delta(window, "winnow_inference_duration_seconds_sum")
    label = f'{{route="{route}"}}'
    requests = _delta(window, f"winnow_request_duration_seconds_count{label}")
    return {
        "batches": batches,
        "mean_batch_size": _mean(window, "winnow_batch_size"),
        "mean_batch_tokens": _mean(window, "winnow_batch_tokens"),
        "mean_padding_fraction": _mean(window, "winnow_batch_padding_fraction"),
        "mean_queue_ms": _ms(_mean(window, "winnow_queue_duration_seconds")),
        "mean_forward_ms": _ms(_mean(window, "winnow_inference_duration_seconds")),
        "engine_busy_fraction": forward_s / window.seconds if window.seconds > 0 else None,
        "prompt_tokens": _delta(window, "winnow_prompt_tokens_total"),
        "route_requests": requests,
        "route_mean_latency_ms": _ms(_delta(window, f"winnow_request_duration_seconds_sum{label}") / requests)
        if requests > 0
        else None,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


# -- offline reference --------------------------------------------------------------------------


def offline_llm(model_arg: str | None, args: argparse.Namespace) -> winnow.LLM:
    kwargs: dict[str, Any] = {"device": args.device}
    if args.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.max_num_seqs is not None:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.cpu_workers is not None:
        kwargs["cpu_workers"] = args.cpu_workers
    return winnow.LLM(model_arg, **kwargs) if model_arg is not None else winnow.LLM(**kwargs)


def offline_pass(llm: winnow.LLM, workload: str, texts: list[str], query: str) -> int:
    """Run the workload's offline call over ``texts``; returns the prompt tokens processed."""
    if workload == "embed":
        outputs: Sequence[Any] = llm.embed(texts, use_tqdm=False)
    elif workload == "rerank":
        outputs = llm.score(query, texts, use_tqdm=False)
    else:
        outputs = llm.classify(texts, use_tqdm=False)
    if len(outputs) != len(texts):
        raise RuntimeError(f"offline {workload} returned {len(outputs)} results for {len(texts)} items")
    return sum(len(o.prompt_token_ids) for o in outputs)


def run_offline(
    model_arg: str | None, workload: str, texts: list[str], query: str, args: argparse.Namespace
) -> dict[str, Any]:
    print(f"offline: LLM({model_arg or ''}) on {len(texts)} items ...")
    llm = offline_llm(model_arg, args)
    offline_pass(llm, workload, texts[:OFFLINE_WARMUP_ITEMS], query)
    started = time.perf_counter()
    tokens = offline_pass(llm, workload, texts, query)
    seconds = time.perf_counter() - started
    return {
        "items": len(texts),
        "seconds": seconds,
        "items_per_s": len(texts) / seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "torch_threads": torch.get_num_threads(),
    }


# -- setup --------------------------------------------------------------------------------------


def prepare_model(model: ServeModel, root: Path) -> tuple[str | None, str]:
    """(model argument for serve/LLM, tokenizer folder); builds the random-weight folder if needed."""
    if model.spec is None:
        return None, tokenizer_source()
    folder = build_model_folder(model.spec, root)
    return str(folder), str(folder)


def make_query(tokenizer: Any) -> str:
    rng = np.random.default_rng(WORKLOAD_SEED + 1)
    return " ".join(rng.choice(word_list(tokenizer), size=QUERY_TOKENS)).capitalize() + "?"


def environment() -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "httpx": httpx.__version__,
        "winnow": winnow.__version__,
        "cpu": cpu_model(),
        "cores": core_count(),
        "loadavg_start": load_average(),
    }


# -- reporting ----------------------------------------------------------------------------------


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    s, srv, off = report["served"], report["server_metrics"], report.get("offline")
    settings = report["settings"]
    lat = s["latency_ms"]
    print(
        f"\n{settings['model']} / {settings['workload']}: {settings['concurrency']} clients, "
        f"batch {settings['batch']}, {s['window_s']:.1f}s window, device {settings['device']}"
    )
    rows = [
        ("requests/s", fmt(s["requests_per_s"]), "-"),
        ("items/s", fmt(s["items_per_s"]), fmt(off and off["items_per_s"])),
        ("tokens/s", fmt(s["tokens_per_s"], ".0f"), fmt(off and off["tokens_per_s"], ".0f")),
        ("items", str(s["items"]), str(off["items"]) if off else "-"),
        ("latency p50/p90/p99 ms", "/".join(fmt(lat[k], ".0f") for k in ("p50", "p90", "p99")), "-"),
        ("latency max ms", fmt(lat["max"], ".0f"), "-"),
        ("server-side mean latency ms", fmt(srv["route_mean_latency_ms"], ".0f"), "-"),
        ("errors (all phases)", str(sum(s["errors_by_status"].values())), "-"),
        ("batches", fmt(srv["batches"], ".0f"), "-"),
        ("mean batch size (seqs)", fmt(srv["mean_batch_size"]), "-"),
        ("mean batch tokens", fmt(srv["mean_batch_tokens"], ".0f"), "-"),
        ("mean padding fraction", fmt(srv["mean_padding_fraction"], ".3f"), "-"),
        ("mean queue time ms", fmt(srv["mean_queue_ms"]), "-"),
        ("mean forward time ms/batch", fmt(srv["mean_forward_ms"]), "-"),
        ("engine busy fraction", fmt(srv["engine_busy_fraction"], ".2f"), "-"),
        ("CPU s in window (client/server)", f"{fmt(s['client_cpu_s'])}/{fmt(s['server_cpu_s'])}", "-"),
        ("event loop CPU ms per request", fmt(s["event_loop_cpu_ms_per_request"], ".3f"), "-"),
    ]
    print(f"{'':<32} {'served':>16} {'offline':>10}")
    for name, served, offline in rows:
        print(f"{name:<32} {served:>16} {offline:>10}")
    if s["errors_by_status"]:
        print(f"errors by status: {s['errors_by_status']}; first: {s['first_error']}")
    if lat["p50"] is not None and s["window_s"] < 10 * lat["p50"] / 1e3:
        print(
            f"warning: the window is only {s['window_s'] / (lat['p50'] / 1e3):.0f}x the median latency, so few "
            "completions fall in it and they come in lumps; use a longer --duration"
        )
    if report.get("served_over_offline") is not None:
        print(f"served items/s / offline items/s = {report['served_over_offline']:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(SERVE_MODELS), default=None, help="default: chosen by --workload")
    p.add_argument("--workload", choices=WORKLOADS, default=None, help="default: the model's first (embed)")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds of load before the window")
    p.add_argument("--batch", type=int, default=None, help="texts (documents) per request; embed/classify 1, rerank 16")
    p.add_argument("--num-items", type=int, default=2048, help="distinct workload texts, cycled")
    p.add_argument("--encoding-format", choices=["float", "base64"], default="float", help="embed responses")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="passed to the server and LLM")
    p.add_argument("--max-num-seqs", type=int, default=None, help="passed to the server and LLM")
    p.add_argument("--cpu-workers", type=int, default=None, help="passed to the server and LLM")
    p.add_argument("--device", default="cpu", help="server --device and LLM device")
    p.add_argument("--server-args", default="", help="more `winnow serve` flags, e.g. '--dtype float32'")
    p.add_argument("--offline-max-items", type=int, default=None, help="cap the offline pass (default: all served)")
    p.add_argument("--no-offline", action="store_true", help="skip the offline reference")
    p.add_argument("--request-timeout", type=float, default=120.0, help="per request, seconds")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for /health")
    p.add_argument("--server-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--server-log", type=Path, default=None, help="keep the server's output here")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep built model folders here and reuse them")
    p.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = p.parse_args(argv)
    args.workload = args.workload or (SERVE_MODELS[args.model].workloads[0] if args.model else "embed")
    args.model = args.model or DEFAULT_MODEL_FOR[args.workload]
    if args.workload not in SERVE_MODELS[args.model].workloads:
        p.error(f"--model {args.model} supports {SERVE_MODELS[args.model].workloads}, not {args.workload}")
    args.batch = args.batch or DEFAULT_BATCH[args.workload]
    if min(args.concurrency, args.batch, args.num_items) < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("--concurrency, --batch, --num-items and --duration must be positive, --warmup >= 0")
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return settings | {"endpoint": ENDPOINTS[args.workload], "token_range": [MIN_TOKENS, MAX_TOKENS]}


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM to this script unwinds like Ctrl-C, so the server is stopped too.
    signal.signal(signal.SIGTERM, interrupt)
    env = environment()
    print(json.dumps(env))
    model = SERVE_MODELS[args.model]
    with tempfile.TemporaryDirectory(prefix="winnow-bench-serve-") as tmp:
        root = args.cache_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model_arg, tokenizer_dir = prepare_model(model, root)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        texts, lengths = make_workload(tokenizer, args.num_items)
        query = make_query(tokenizer)
        print(f"workload: {describe_lengths(lengths)}")
        if args.workload == "rerank":
            print(f"rerank query ({len(tokenizer(query)['input_ids'])} tokens): {query!r}")

        log = args.server_log or Path(tmp) / "server.log"
        with running_server(model_arg, args, log) as (base_url, pid, startup_s):
            records, window = asyncio.run(run_load(base_url, pid, args.workload, texts, query, args))
        served = served_stats(records, window)
        report: dict[str, Any] = {
            **env,
            "settings": settings_of(args),
            "server_startup_s": startup_s,
            "workload_lengths": {"min": min(lengths), "mean": float(np.mean(lengths)), "max": max(lengths)},
            "served": served,
            "server_metrics": server_stats(window, ENDPOINTS[args.workload]),
        }

        measured_ids = [i for r in in_window(records, window) if r.ok for i in r.items]
        if args.offline_max_items is not None:
            measured_ids = measured_ids[: args.offline_max_items]
        if measured_ids and not args.no_offline:
            offline = run_offline(model_arg, args.workload, [texts[i] for i in measured_ids], query, args)
            report["offline"] = offline
            report["served_over_offline"] = served["items_per_s"] / offline["items_per_s"]

    report["loadavg_end"] = load_average()
    print_report(report)
    print(f"load average (1/5/15 min) at start {report['loadavg_start']}, at end {report['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0 if served["ok_in_window"] > 0 and not served["errors_by_status"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
