"""``cpu_workers``: one worker against two (or any set), offline throughput and lone-request latency.

Methodology
-----------
* Models and workloads: the suite's (``bench_suite.py``): random weights of real shapes, its
  mixed-length workload (``--num-prompts``, default the suite's per model) and its latency set of 64
  short prompts; the cross-encoder is fed (query, document) pairs through ``LLM.score``.
* Systems: ``LLM(folder, device="cpu", cpu_workers=N)`` for each N in ``--workers``, in the default
  dtype (bfloat16 on CPUs with bf16 instructions), all loaded in one process.
* Timing: ``--rounds`` rounds; in each, every engine in turn (the order rotating) runs the whole
  workload in one call (texts/s) and then the latency set one prompt per call (median ms). Reported:
  the median over rounds, and each engine's ratio to the first.
* Threads: torch gets every core; tokenizers' pool is off.

Usage::

    .venv/bin/python benchmarks/bench_workers.py --cache-dir /tmp/winnow-suite
    .venv/bin/python benchmarks/bench_workers.py --models minilm --rounds 7
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers loads: torch owns the cores

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_offline as offline
import bench_suite as suite

from winnow import LLM


def bench_model(spec: Any, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = suite.load_tokenizer(spec, folder)
    workload = suite.build_workload(tokenizer, spec, offline.prompts_for(spec, args))
    run = suite.winnow_score if suite.is_pair_model(spec) else offline.winnow_classify
    engines = {n: LLM(str(folder), device="cpu", cpu_workers=n) for n in args.workers}
    for llm in engines.values():  # warm-up: the workload's shapes and a lone request
        run(llm, workload.items[:64])
        run(llm, workload.latency_items[:1])
    rates: dict[int, list[float]] = {n: [] for n in engines}
    latencies: dict[int, list[float]] = {n: [] for n in engines}
    for order in offline.rotations(list(engines), args.rounds):
        for n in order:
            start = time.perf_counter()
            run(engines[n], workload.items)
            rates[n].append(len(workload.items) / (time.perf_counter() - start))
            samples = []
            for item in workload.latency_items:
                start = time.perf_counter()
                run(engines[n], [item])
                samples.append(1e3 * (time.perf_counter() - start))
            latencies[n].append(statistics.median(samples))
    return {
        "model": spec.name,
        "num_prompts": len(workload.items),
        "tokens": sum(workload.lengths),
        "results": {
            n: {
                "items_per_s": statistics.median(rates[n]),
                "round_items_per_s": rates[n],
                "lone_p50_ms": statistics.median(latencies[n]),
                "round_lone_p50_ms": latencies[n],
            }
            for n in engines
        },
    }


def print_report(report: dict[str, Any]) -> None:
    results = report["results"]
    first = next(iter(results.values()))
    print(f"\n[{report['model']}] {report['num_prompts']} items, {report['tokens']} tokens")
    print(f"{'cpu_workers':>11} {'items/s':>8} {'ratio':>6} {'rounds min-max':>16} {'lone p50 ms':>12} {'ratio':>6}")
    for n, r in results.items():
        spread = f"{min(r['round_items_per_s']):.1f}-{max(r['round_items_per_s']):.1f}"
        print(
            f"{n:>11} {r['items_per_s']:8.1f} {r['items_per_s'] / first['items_per_s']:6.2f} {spread:>16} "
            f"{r['lone_p50_ms']:12.2f} {r['lone_p50_ms'] / first['lone_p50_ms']:6.2f}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    bert_shapes = [name for name, spec in suite.SUITE_MODELS.items() if spec.family == "bert"]
    p.add_argument("--models", default=",".join(bert_shapes), help="comma-separated subset of the suite's models")
    p.add_argument("--workers", default="1,2", help="comma-separated cpu_workers values (the first is the base)")
    p.add_argument("--num-prompts", type=int, default=None, help="workload items (default: the suite's per model)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (median reported)")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep the model folders here")
    p.add_argument("--json", type=Path, default=None, help="write every round's numbers here")
    args = p.parse_args(argv)
    args.models = suite.parse_list(args.models, list(suite.SUITE_MODELS), "models", p)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        p.error("--workers takes comma-separated integers")
    if args.rounds < 1 or any(w < 1 for w in args.workers):
        p.error("--rounds and every --workers value must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return suite.run_per_model(parse_args(argv), bench_model, print_report, "winnow-workers-")


if __name__ == "__main__":
    sys.exit(main())
