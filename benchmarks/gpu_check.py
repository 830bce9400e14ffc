"""GPU check: parity of winnow on CUDA against transformers, then throughput and latency side by side.

Runs on a machine with an NVIDIA GPU and no network, in one process, in a few minutes:

1. Parity. Tiny random models of every native family and head (built as in the tests), run by
   winnow on the GPU in float32 (max abs diff <= 1e-4 against transformers in float32 on CPU,
   each prompt alone) and in bfloat16, the ``dtype="auto"`` choice on GPU (probabilities within
   2e-2: bf16 keeps 8 mantissa bits, so logits of magnitude ~3 carry ~1e-2 rounding; where winnow
   exceeds that, within transformers' own bf16 error on the same device). Each line
   also counts the host-device synchronisations inside ``ModelRunner.launch`` (torch's sync debug
   mode): every one stalls the overlap of host and device work.
2. Throughput. bert-base-shape and MiniLM-shape classifiers (random weights), a deterministic
   log-uniform 8..256-token workload; transformers bf16 + SDPA + inference mode with length-sorted
   batches (the best a user does by hand) against winnow ``dtype="auto"``. Median of repeats.
   Useful TFLOP/s are also shown as % of the card's bf16 GEMM rate, measured first (8192^3), and
   the header says whether flash attention's varlen kernel (winnow's bf16 attention) is available.
3. Latency. One 32-token request through ``LLM.classify``, median of 50, eager and with CUDA graphs
   (``cuda_graph_max_tokens=512``), after checking the graphs against the eager outputs.

The table printed last is what goes into docs/benchmarks.md.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --tokenizer-dir PATH_TO_BERT_TOKENIZER

``--device cpu`` runs the same script end to end on the CPU with small sizes (the CUDA-only
parts, sync counting and CUDA graphs, report "n/a"): a smoke test of the script itself, so a
GPU session is not spent on a Python error.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --tokenizer-dir DIR --device cpu --num-prompts 32 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_offline import MODELS, build_model_folder, make_workload, pad_batch

import winnow.llm
from tests.tiny_models import PROMPTS, build_model
from winnow import LLM, PoolingParams
from winnow.params import PoolingTask

FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "distilbert"]
DECODER_FAMILIES = ["qwen2", "qwen3", "llama", "gemma", "gemma2", "gpt2"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _parity_cases(root: Path) -> list[tuple[str, str, Path]]:
    """(family, head, folder) of tiny random models of every native family, built as the tests build them."""
    from tests.models.test_deberta_v2 import build_deberta
    from tests.models.test_decoders import build_decoder
    from tests.models.test_modernbert import build_modernbert

    cases = [(f, h, build_model(root, f, h, num_labels=3)) for f in FAMILIES for h in ("seq", "tok")]
    for family in DECODER_FAMILIES:
        for head in ("seq", "tok"):
            folder = root / f"{family}-{head}"
            folder.mkdir()
            cases.append((family, head, build_decoder(folder, family, head, num_labels=3)))
    # Causal sliding windows through the variable-length kernel (window (W, 0)): every layer.
    folder = root / "mistral-window-seq"
    folder.mkdir()
    cases.append(("mistral-w6", "seq", build_decoder(folder, "mistral", "seq", num_labels=3, sliding_window=6)))
    cases += [("deberta-v3", h, build_deberta(root, h, "v3", num_labels=3)) for h in ("seq", "tok")]
    for head in ("seq", "tok"):
        folder = root / f"modernbert-{head}"
        folder.mkdir()
        cases.append(("modernbert", head, build_modernbert(folder, head, num_labels=3)))
    return cases


def launch_syncs(llm: LLM, task: PoolingTask) -> int | str:
    """Host-device synchronisations inside ``ModelRunner.launch`` for a small mixed batch: each one
    makes the host wait for the batch already running, which undoes the engine's overlap (0 wanted).
    On a CPU only the untimed launch runs (so the smoke test covers this code) and the count is n/a."""
    from winnow.engine.request import Request
    from winnow.inputs.prompts import TokenizedPrompt

    params = llm.model_config.bind_params(PoolingParams(), task)
    ids = [[2, *range(5, 5 + n), 3] for n in (3, 9, 17)]
    requests = [Request(f"sync-{i}", TokenizedPrompt(token_ids=t), params) for i, t in enumerate(ids)]
    runner = llm.engine.core.runner
    runner.collect(runner.launch(requests))  # warm: first-use copies (rotary tables) are not counted
    if runner.device.type != "cuda":
        return "n/a"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            launched = runner.launch(requests)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    runner.collect(launched)
    return sum("synchroniz" in str(w.message) for w in caught)


def hf_half_error(auto: Any, path: Path, tok: Any, refs: list[torch.Tensor], dtype: torch.dtype, device: str) -> float:
    """transformers' own error in ``dtype`` on ``device`` against its float32 probabilities: the
    rounding the half-precision model itself carries (random tiny models can exceed the fixed
    tolerance in either library: ModernBERT token tagging, transformers bf16 4.9e-2 on CPU)."""
    model = auto.from_pretrained(path, attn_implementation="eager", dtype=dtype).to(device).eval()
    worst = 0.0
    with torch.no_grad():
        for prompt, ref in zip(PROMPTS, refs):
            logits = model(**tok(prompt, return_tensors="pt").to(device)).logits[0].float().cpu()
            worst = max(worst, (logits.softmax(-1) - ref.softmax(-1)).abs().max().item())
    return worst


def parity(root: Path, device: str) -> list[str]:
    """float32: max abs logit diff <= 1e-4 against transformers in float32 (CPU). ``auto`` (bf16):
    probabilities within 2e-2, or within 1.5x transformers' own error in that dtype where it is larger.
    A family that raises is reported as ERROR and the others still run."""
    lines = []
    for family, head, path in _parity_cases(root):
        try:
            lines += _parity_case(family, head, path, device)
        except Exception as exc:
            lines.append(f"parity {family:12s} {head} ERROR {type(exc).__name__}: {exc}")
            print(lines[-1], flush=True)
            traceback.print_exc()
    return lines


def _parity_case(family: str, head: str, path: Path, device: str) -> list[str]:
    """Both dtypes of one tiny model."""
    import transformers

    auto = (
        transformers.AutoModelForSequenceClassification
        if head == "seq"
        else transformers.AutoModelForTokenClassification
    )
    ref_model = auto.from_pretrained(path, attn_implementation="eager").eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        refs = [ref_model(**tok(p, return_tensors="pt")).logits[0] for p in PROMPTS]
    lines = []
    for dtype, atol in (("float32", 1e-4), ("auto", 2e-2)):
        llm = LLM(str(path), device=device, dtype=dtype)
        task: PoolingTask = "classify" if head == "seq" else "token_classify"
        params = PoolingParams(use_activation=False) if dtype == "float32" else None
        outs = llm.encode(PROMPTS, params, pooling_task=task, use_tqdm=False)
        sync(device)  # an asynchronous CUDA error surfaces here, against this family
        worst = 0.0
        for ref, out in zip(refs, outs):
            expected = ref if dtype == "float32" else torch.softmax(ref, -1)
            worst = max(worst, (out.outputs.data.float() - expected).abs().max().item())
        bound, theirs = atol, ""
        if dtype != "float32" and worst > atol:
            # Its own rounding, with a margin: the two run different kernels (flash varlen against
            # transformers' eager attention), each rounding in its own places.
            hf_error = hf_half_error(auto, path, tok, refs, llm.model_config.dtype, device)
            bound, theirs = max(atol, 1.5 * hf_error), f", 1.5 x transformers' own {hf_error:.2e}"
        status = "ok" if worst <= bound else "FAIL"
        syncs = launch_syncs(llm, task)
        lines.append(
            f"parity {family:12s} {head} {llm.model_config.dtype!s:15s} max|diff| {worst:.2e} "
            f"(atol {atol:g}{theirs}) {status}; host syncs in launch: {syncs}"
        )
        print(lines[-1], flush=True)
    return lines


def useful_flops_per_token(model: Any, mean_len: float) -> float:
    """Matmul FLOPs per real token: 2 x the weights outside the embeddings, plus attention's
    scores and weighted sum (2 x 2 x mean_len x attention width per layer)."""
    config = model.config
    weights = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.dim() == 2 and "embed" not in n and "wte" not in n and "wpe" not in n
    )
    heads = config.num_attention_heads
    width = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2.0 * weights + 4.0 * config.num_hidden_layers * mean_len * width


def throughput(root: Path, tokenizer_dir: str, num_prompts: int, repeats: int, device: str) -> list[dict[str, Any]]:
    from bench_decoder import build_model_folder as build_qwen3

    rows: list[dict[str, Any]] = []
    for name in ("bert-base", "minilm"):
        rows += bench_model(build_model_folder(MODELS[name], root, tokenizer_dir), name, num_prompts, repeats, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    # The Qwen3-0.6B-shape reranker (1 label): a quarter of the prompts keeps its run as long as bert-base's.
    rows += bench_model(build_qwen3(root, tokenizer_dir), "qwen3-0.6b", max(1, num_prompts // 4), repeats, device)
    return rows


def bench_model(folder: Path, name: str, num_prompts: int, repeats: int, device: str) -> list[dict[str, Any]]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    texts, lengths = make_workload(tok, num_prompts)
    num_tokens = sum(lengths)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    hf = hf.to(device).eval()
    flops = useful_flops_per_token(hf, float(np.mean(lengths))) * num_tokens
    systems: dict[str, Any] = {
        "hf bf16 sorted b128": lambda: hf_sorted(hf, tok, texts, 128, device),
        "hf bf16 sorted b512": lambda: hf_sorted(hf, tok, texts, 512, device),
    }
    for budget in (16384, 65536):
        llm = LLM(str(folder), device=device, max_num_batched_tokens=budget, max_num_seqs=2048)
        systems[f"winnow auto t{budget}"] = lambda llm=llm: _winnow_run(llm, texts, device)
    # The engine alone: the same texts as token ids, so the row shows the device's side without
    # the host's tokenization, which the "host tokenization" row times by itself.
    token_prompts = [{"prompt_token_ids": ids} for ids in tok(texts)["input_ids"]]
    systems["winnow t65536 token ids"] = lambda llm=llm: _winnow_run(llm, token_prompts, device)
    # The A/B for host/device overlap. An offline call on a GPU tokenizes the next chunk of texts
    # while the device runs the batch just launched: first that alone switched off, then also the
    # launch of each batch before the previous one is collected.
    systems["winnow t65536 tokenize first"] = lambda llm=llm: _tokenize_first(llm, texts, device)
    sequential = LLM(str(folder), device=device, max_num_batched_tokens=65536, max_num_seqs=2048)
    sequential.engine.core.runner.overlaps = False
    systems["winnow t65536 no overlap"] = lambda: _winnow_run(sequential, texts, device)
    systems["host tokenization"] = lambda: tok(texts)
    times: dict[str, list[float]] = {k: [] for k in systems}
    for fn in systems.values():
        fn()  # warm-up
    for _ in range(repeats):
        for label, fn in systems.items():
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    best_hf = max(num_prompts / statistics.median(times[k]) for k in times if k.startswith("hf"))
    rows = []
    for label, ts in times.items():
        t = statistics.median(ts)
        host_only = label == "host tokenization"  # no model work: no FLOP/s, no ratio
        rows.append(
            {
                "model": name,
                "system": label,
                "seq_s": num_prompts / t,
                "tok_s": num_tokens / t,
                "tflops": None if host_only else flops / t / 1e12,
                "vs_best_hf": None if host_only else (num_prompts / t) / best_hf,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def hf_sorted(model: Any, tok: Any, texts: list[str], batch_size: int, device: str) -> np.ndarray:
    """The CPU baseline's loop (tokenize all, sort by length, pad per batch) with batches on ``device``."""
    encoded = tok(texts)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    probs = torch.empty(len(texts), model.config.num_labels)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {k: v.to(device, non_blocking=True) for k, v in pad_batch(encoded, rows, tok.pad_token_id).items()}
            probs[rows] = model(**batch).logits.float().softmax(dim=-1).cpu()
    return probs.numpy()


def _winnow_run(llm: LLM, prompts: list[Any], device: str) -> None:
    llm.classify(prompts, use_tqdm=False)
    sync(device)


def _tokenize_first(llm: LLM, prompts: list[Any], device: str) -> None:
    """Every text tokenized before the first batch launches, as on a CPU (one chunk)."""
    with mock.patch.object(winnow.llm, "_TOKENIZE_CHUNK", len(prompts)):
        _winnow_run(llm, prompts, device)


def latency(root: Path, tokenizer_dir: str, device: str) -> list[str]:
    """One 32-token request, eager and with CUDA graphs (``cuda_graph_max_tokens=512``), after
    checking that the graphs were captured and give the eager probabilities on a mixed batch."""
    folder = build_model_folder(MODELS["bert-base"], root, tokenizer_dir)
    # On a CPU (which refuses graphs) the second engine is another eager one, so that the smoke test
    # runs every line below: this section once read a field the classify output does not have.
    label = "cuda graphs" if device == "cuda" else "eager again (no graphs on a CPU)"
    systems = {"eager": LLM(str(folder), device=device)}
    graph_tokens = 512 if device == "cuda" else 0
    graphs = systems[label] = LLM(str(folder), device=device, cuda_graph_max_tokens=graph_tokens)
    captured = graphs.engine.core.runner.graphs
    if device != "cuda":
        status = "n/a (CUDA only)"
    else:
        status = f"captured for {captured.sizes}" if captured else "NOT captured (see the warning)"
    lines = [f"cuda graphs: {status}"]
    texts = [" ".join(["word"] * n) for n in (3, 10, 30, 70, 150, 300)]  # ~5 to ~302 tokens
    # Each text alone replays its own bucket (16 to 512 tokens); the first five together (~273
    # tokens) replay one bucket with several sequences and the filler; all six (~575 tokens) are
    # more than the largest bucket and run eagerly.
    calls = [[t] for t in texts] + [texts[:5], texts]
    replays = captured.replays if captured else 0
    worst = max(
        max(abs(x - y) for x, y in zip(a.outputs.probs, b.outputs.probs))
        for call in calls
        for a, b in zip(systems["eager"].classify(call, use_tqdm=False), graphs.classify(call, use_tqdm=False))
    )
    replayed = (captured.replays - replays) if captured else 0
    ok = worst <= 2e-2 and (device != "cuda" or replayed >= len(calls) - 1)
    lines.append(
        f"{label} vs eager, {len(calls)} calls ({replayed} replayed a graph): max|diff| {worst:.2e} "
        f"{'ok' if ok else 'FAIL'}"
    )
    prompt = {"prompt_token_ids": [101, *range(2000, 2030), 102]}  # 32 tokens
    for label, llm in systems.items():
        for _ in range(10):
            llm.classify(prompt, use_tqdm=False)
        samples = []
        for _ in range(50):
            start = time.perf_counter()
            llm.classify(prompt, use_tqdm=False)
            samples.append(time.perf_counter() - start)
        median_ms, min_ms = statistics.median(samples) * 1e3, min(samples) * 1e3
        lines.append(f"latency bert-base 1x32 tokens, {label}: median {median_ms:.2f} ms, min {min_ms:.2f} ms")
    for line in lines:
        print(line, flush=True)
    return lines


def bf16_matrix_rate(device: str) -> float:
    """The device's measured bf16 GEMM rate in TFLOP/s (n^3, median of 10): the 100 % of the table.
    n = 8192 on a GPU; 2048 on a CPU, where the larger product takes minutes."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    samples = []
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        samples.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(samples) / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-dir", required=True, help="folder with a BERT uncased tokenizer")
    parser.add_argument("--num-prompts", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of this script")
    args = parser.parse_args()
    from winnow.layers.attention import _varlen_kernel

    device = args.device
    # On a GPU the host's cores are free for the tokenizers library's own thread pool (its default,
    # which an offline user gets); on a CPU torch owns them, as in every CPU benchmark here. Read by
    # the library at each batch call, so setting it here is in time. Both systems tokenize alike.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true" if device == "cuda" else "false")
    print(f"tokenizers parallelism: {os.environ['TOKENIZERS_PARALLELISM']}")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke test of the script)"
    print(f"torch {torch.__version__}, {name}", flush=True)
    print(f"varlen attention kernel: {'available' if _varlen_kernel() is not None else 'MISSING (padded grid)'}")
    report: dict[str, Any] = {"bf16_tflops": bf16_matrix_rate(device)}
    print(f"bf16 matrix rate: {report['bf16_tflops']:.1f} TFLOP/s", flush=True)
    # The model folders take ~3 GB (Qwen3-0.6B's shape alone 2.4 GB): removed at the end.
    with tempfile.TemporaryDirectory(prefix="winnow-gpu-") as tmp:
        root = Path(tmp)
        for section, fn in (
            ("parity", lambda: parity(root, device)),
            ("throughput", lambda: throughput(root, args.tokenizer_dir, args.num_prompts, args.repeats, device)),
            ("latency", lambda: latency(root, args.tokenizer_dir, device)),
        ):
            try:
                report[section] = fn()
            except Exception:  # report and go on to the next section
                report[section] = traceback.format_exc()
                print(report[section], flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print("\n==== summary ====")
    for line in report.get("parity", []) if isinstance(report.get("parity"), list) else [report.get("parity")]:
        print(line)
    if isinstance(report.get("throughput"), list):
        rate = report["bf16_tflops"]
        print(f"bf16 matrix rate {rate:.1f} TFLOP/s")
        header = ("model", "system", "seq/s", "tok/s", "TFLOP/s", "% rate", "vs best hf")
        print("{:10s} {:28s} {:>9s} {:>10s} {:>8s} {:>7s} {:>10s}".format(*header))
        for r in report["throughput"]:
            if r["tflops"] is None:
                model_cols = f"{'-':>8s} {'-':>7s} {'-':>10s}"
            else:
                model_cols = f"{r['tflops']:8.1f} {100 * r['tflops'] / rate:6.0f}% {r['vs_best_hf']:9.2f}x"
            print(f"{r['model']:10s} {r['system']:28s} {r['seq_s']:9.0f} {r['tok_s']:10.0f} {model_cols}")
    for line in report["latency"] if isinstance(report.get("latency"), list) else [report.get("latency")]:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
