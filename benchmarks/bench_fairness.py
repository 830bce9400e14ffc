"""Latency of small requests while a large one runs: does ``winnow serve`` make them wait for it?

Methodology
-----------
* Server: ``winnow serve`` as a subprocess on a free port, started and stopped by this script
  (``bench_serve.running_server``; the batching flags are passed through).
* Model: one of ``bench_serve.SERVE_MODELS`` (default ``minilm-ce``, a MiniLM-L6-shape cross-encoder
  with random weights, built locally); workload texts from ``bench_offline.make_workload`` (seeded,
  log-uniform 8-256 tokens).
* Each round: one *bulk* client sends a single POST /rerank with ``--bulk-docs`` documents (one
  query); ``--delay`` seconds later (it is then tokenized and queued) one *interactive* client sends
  POST /rerank requests with one document each, one after another, until the bulk answer is back.
  Before the first round the interactive client runs ``--alone`` requests with the server idle.
* Printed per round: the bulk request's seconds and documents/s, and the interactive requests'
  count, mean, p50, p90 and max latency (client side, send to parsed answer); then the medians over the
  rounds, and the interactive p50 during the bulk over the p50 alone. The JSON also holds each
  interactive request's send time (seconds after the bulk's) and latency.

Usage::

    .venv/bin/python benchmarks/bench_fairness.py --rounds 3 --cache-dir /tmp/wbs/serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_offline import describe_lengths, load_average, make_workload
from bench_serve import SERVE_MODELS, Connection, environment, make_query, prepare_model, running_server


async def rerank(conn: Connection, query: str, documents: list[str]) -> float:
    """Seconds from send to parsed answer; raises on anything but a full 200 answer."""
    body = json.dumps({"query": query, "documents": documents}).encode()
    start = time.perf_counter()
    status, raw = await conn.post("/rerank", body)
    if status != 200:
        raise RuntimeError(f"/rerank answered {status}: {raw[:300]!r}")
    got = len(json.loads(raw)["results"])
    if got != len(documents):
        raise RuntimeError(f"/rerank gave {got} results for {len(documents)} documents")
    return time.perf_counter() - start


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {
        "n": len(ms),
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "max": float(ms.max()),
    }


async def one_round(host: str, port: int, query: str, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    bulk_docs = [texts[i % len(texts)] for i in range(args.bulk_docs)]
    bulk_conn, small_conn = Connection(host, port, args.timeout), Connection(host, port, args.timeout)
    try:
        started = time.perf_counter()
        bulk = asyncio.ensure_future(rerank(bulk_conn, query, bulk_docs))
        await asyncio.sleep(args.delay)
        latencies: list[float] = []
        sent_at: list[float] = []  # seconds after the bulk request was sent
        while not bulk.done():
            sent_at.append(time.perf_counter() - started)
            latencies.append(await rerank(small_conn, query, [texts[(args.bulk_docs + len(sent_at)) % len(texts)]]))
        bulk_s = await bulk
    finally:
        bulk_conn.close()
        small_conn.close()
    if not latencies:
        raise RuntimeError("the bulk request finished before the first small one was sent; lower --delay")
    trace = [[round(t, 3), round(s * 1e3, 1)] for t, s in zip(sent_at, latencies)]
    small = percentiles_ms(latencies)
    return {"bulk_s": bulk_s, "bulk_docs_per_s": args.bulk_docs / bulk_s, "small": small, "trace": trace}


async def alone(host: str, port: int, query: str, texts: list[str], args: argparse.Namespace) -> dict[str, float]:
    conn = Connection(host, port, args.timeout)
    try:
        return percentiles_ms([await rerank(conn, query, [texts[i % len(texts)]]) for i in range(args.alone)])
    finally:
        conn.close()


async def run_rounds(base_url: str, query: str, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    host, port = base_url.removeprefix("http://").split(":")
    report: dict[str, Any] = {"alone": await alone(host, int(port), query, texts, args), "rounds": []}
    print(f"alone: p50 {report['alone']['p50']:.1f} ms over {args.alone} requests")
    for r in range(args.rounds):
        result = await one_round(host, int(port), query, texts, args)
        report["rounds"].append(result)
        small = result["small"]
        print(
            f"round {r + 1}: bulk {result['bulk_s']:.2f} s ({result['bulk_docs_per_s']:.1f} docs/s); "
            f"{small['n']} small requests mean {small['mean']:.1f}, p50 {small['p50']:.1f} / p90 {small['p90']:.1f} / "
            f"max {small['max']:.1f} ms"
        )
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    rerankers = sorted(name for name, m in SERVE_MODELS.items() if "rerank" in m.workloads)
    p.add_argument("--model", choices=rerankers, default="minilm-ce")
    p.add_argument("--bulk-docs", type=int, default=3000, help="documents in the one large /rerank request")
    p.add_argument("--delay", type=float, default=1.0, help="seconds between the bulk request and the first small one")
    p.add_argument("--alone", type=int, default=20, help="small requests with the server idle, first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-items", type=int, default=4096, help="distinct workload texts")
    p.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    # what bench_serve.server_command reads
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--cpu-workers", type=int, default=None)
    p.add_argument("--server-args", default="", help="more `winnow serve` flags")
    p.add_argument("--server-log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--cache-dir", type=Path, default=None, help="keep built model folders here and reuse them")
    p.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = p.parse_args(argv)
    if min(args.bulk_docs, args.alone, args.rounds, args.num_items) < 1 or args.delay < 0:
        p.error("--bulk-docs, --alone, --rounds and --num-items must be positive, --delay >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    print(json.dumps(env))
    with tempfile.TemporaryDirectory(prefix="winnow-bench-fairness-") as tmp:
        root = args.cache_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model_arg, tokenizer_dir = prepare_model(SERVE_MODELS[args.model], root)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        texts, lengths = make_workload(tokenizer, args.num_items)
        query = make_query(tokenizer)
        print(f"workload: {describe_lengths(lengths)}")
        with running_server(model_arg, args, Path(tmp) / "server.log") as (base_url, _, _):
            report = asyncio.run(run_rounds(base_url, query, texts, args))
    rounds = report["rounds"]
    summary = {
        "bulk_s": statistics.median(r["bulk_s"] for r in rounds),
        "small_mean_ms": statistics.median(r["small"]["mean"] for r in rounds),
        "small_p50_ms": statistics.median(r["small"]["p50"] for r in rounds),
        "small_max_ms": statistics.median(r["small"]["max"] for r in rounds),
    }
    summary["small_p50_over_alone"] = summary["small_p50_ms"] / report["alone"]["p50"]
    report |= {**env, "settings": {k: str(v) for k, v in vars(args).items()}, "summary": summary}
    report["loadavg_end"] = load_average()
    print(
        f"median of {len(rounds)} rounds: bulk {summary['bulk_s']:.2f} s; small requests during it mean "
        f"{summary['small_mean_ms']:.1f} ms, p50 {summary['small_p50_ms']:.1f} ms "
        f"({summary['small_p50_over_alone']:.1f}x alone), max {summary['small_max_ms']:.1f} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
