"""One short request at a time: winnow against ONNX Runtime, interleaved request by request.

Methodology
-----------
* Models and prompts: the suite's (``bench_suite.py``): random weights of real shapes, the latency
  set of 64 short prompts of 8-32 tokens (for the cross-encoder, a short query with each).
* Systems: any of the suite's one-at-a-time systems (``winnow-single``, ``winnow-bf16-single``,
  ``winnow-int8-single``, ``ort-fp32-single``, ``ort-int8-single``); each is built as the suite
  builds it and warmed up over the latency set. Every request is tokenized inside the timed region.
* Timing: ``--rounds`` rounds; in each round every system in turn (in an order that rotates every
  round, so the machine's drift hits all of them alike) sends the 64 prompts one after another.
  Systems take turns by round, not by prompt: both ONNX Runtime's pool and torch's OpenMP workers
  keep spinning for a while after a call, and taking turns prompt by prompt had each system's
  request compete with the other's spinning threads (winnow bf16 8.9 ms, ORT 6.4 ms, against
  ~4-5 ms for both when run in rounds). Per system and round the median latency over the prompts
  is taken; the report gives the median of those round medians, their min-max, and each system's
  ratio to the first ORT system (below 1: faster than ORT).
* Threads as in the suite: torch and ONNX Runtime each get every core; tokenizers' pool is off.

Usage::

    .venv/bin/python benchmarks/bench_latency.py --cache-dir /tmp/winnow-suite
    .venv/bin/python benchmarks/bench_latency.py --models minilm --systems winnow-bf16-single,ort-fp32-single
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers loads: torch and ORT own the cores

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_suite as suite

SINGLE_SYSTEMS = [name for name, info in suite.SYSTEMS.items() if info.single]
DEFAULT_SYSTEMS = ["winnow-single", "winnow-bf16-single", "ort-fp32-single"]


def time_rounds(runners: dict[str, suite.Runner], items: suite.Items, rounds: int) -> dict[str, list[float]]:
    """Per system, the median request latency (ms) of each round."""
    names = list(runners)
    medians: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples = []
            for item in items:
                start = time.perf_counter()
                runners[name]([item])
                samples.append(1e3 * (time.perf_counter() - start))
            medians[name].append(statistics.median(samples))
    return medians


def bench_model(spec: Any, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = suite.load_tokenizer(spec, folder)
    items = suite.build_workload(tokenizer, spec, 1).latency_items  # one workload item: only the latency set is used
    runners, skipped, _ = suite.build_runners(spec, folder, tokenizer, args.root, set(args.systems), args.cores)
    runners = {name: run for name, run in runners.items() if name in args.systems}
    outputs = suite.warm_up(spec.name, runners, items, skipped)
    reference = next((outputs[n] for n in outputs if n.startswith("ort-fp32")), None)
    medians = time_rounds(runners, items, args.rounds)
    results = {
        name: {
            "p50_ms": statistics.median(medians[name]),
            "round_p50s_ms": medians[name],
            "max_abs_diff_vs_ort_fp32": None if reference is None else float(np.abs(outputs[name] - reference).max()),
        }
        for name in runners
    }
    return {"model": spec.name, "tokens": suite.token_counts(tokenizer, items), "skipped": skipped, "results": results}


def print_report(report: dict[str, Any]) -> None:
    results = report["results"]
    base = next((n for n in results if n.startswith("ort-")), None)
    tokens = report["tokens"]
    print(f"\n[{report['model']}] {len(tokens)} prompts of {min(tokens)}-{max(tokens)} tokens")
    print(f"{'system':22} {'p50 ms':>8} {'rounds min-max':>16} {'/ ' + (base or '-'):>22}")
    for name, r in results.items():
        ratio = f"{r['p50_ms'] / results[base]['p50_ms']:.3f}" if base else "-"
        spread = f"{min(r['round_p50s_ms']):.2f}-{max(r['round_p50s_ms']):.2f}"
        print(f"{name:22} {r['p50_ms']:8.2f} {spread:>16} {ratio:>22}")
    for name, why in report["skipped"].items():
        print(f"{name:22} skipped: {why}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    bert_shapes = [name for name, spec in suite.SUITE_MODELS.items() if spec.family == "bert"]  # ORT's reach
    p.add_argument("--models", default=",".join(bert_shapes), help="comma-separated subset of the models")
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"from {', '.join(SINGLE_SYSTEMS)}")
    p.add_argument("--rounds", type=int, default=5, help="rounds over the latency set (median reported)")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep model folders and ONNX exports here")
    p.add_argument("--json", type=Path, default=None, help="write every round's numbers here")
    args = p.parse_args(argv)
    args.models = suite.parse_list(args.models, list(suite.SUITE_MODELS), "models", p)
    args.systems = suite.parse_list(args.systems, SINGLE_SYSTEMS, "systems", p)
    if args.rounds < 1:
        p.error("--rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return suite.run_per_model(parse_args(argv), bench_model, print_report, "winnow-latency-")


if __name__ == "__main__":
    sys.exit(main())
