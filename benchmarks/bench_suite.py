"""The CPU suite: winnow and every CPU baseline on the same models and the same deterministic workloads.

Methodology
-----------
* Models: random weights (``torch.manual_seed(0)``), real shapes, built by
  ``bench_offline.build_model_folder`` with the real BERT uncased tokenizer; nothing is downloaded.
  ``minilm`` = all-MiniLM-L6-v2 shape (384 hidden, 6 layers, 12 heads, 1536 ffn), 2 labels;
  ``bert-base`` = 768/12/12/3072, 2 labels; ``cross-encoder`` = bert-base shape with 1 label, fed
  (query, document) pairs; ``qwen3-0.6b`` (Qwen3-0.6B's shape, ``bench_decoder``) and
  ``deberta-v3-base`` (``bench_deberta``) are 2-label text classifiers of the other families, for
  which the ONNX Runtime systems do not apply. Speed depends on the shapes, not on the weight values.
* Workloads (seeded): ``bench_offline.make_workload`` texts, token counts log-uniform in [8, 256].
  Cross-encoder items pair a query of 8-24 tokens with a workload text; documents are cut word by word
  (each word is one token) so that no pair exceeds 256 tokens, hence no system truncates anything.
  Latency set: 64 short prompts of 8-32 tokens (for the cross-encoder: a short query with each).
* Outputs: every system returns probabilities in input order. A 1-label model's score sigmoid(x) is
  carried as the two columns [1 - sigmoid(x), sigmoid(x)] = softmax([0, x]) (:class:`SigmoidAsBinary`),
  so bench_offline's transformers loops, which apply softmax, serve pairs unchanged, and winnow's
  ``score`` (sigmoid of the logit) and sentence-transformers' ``CrossEncoder`` (Sigmoid, its default
  for 1 label, passed explicitly) compare on the same activation.
* Systems (each gets one untimed warm-up pass over the workload; its outputs are checked against
  hf-sorted's: max |diff| <= 1e-3 for fp32 systems, 0.02 for bf16/int8 ones):
  winnow (``LLM(folder, device="cpu", dtype="float32").classify`` / ``.score``), winnow-bf16 (only
  on CPUs with AVX512-BF16 or AMX, where it is what ``dtype="auto"`` picks), winnow-fp16w
  (``dtype="auto"`` on other x86 CPUs: float32 arithmetic on float16-stored weights), winnow-int8
  (``quantization="int8"``: bfloat16 activations on bf16 CPUs, float32 elsewhere), winnow-int8-fp32
  (``quantization="int8", dtype="float32"``), winnow-single / winnow-bf16-single / winnow-int8-single (one prompt
  per call, and winnow-fp16w-single);
  hf-sorted / hf-arrival (``bench_offline``'s hand-tuned transformers loops: SDPA, ``inference_mode``,
  tokenized once and sorted by length / batched in arrival order, batches of 32; hf-sorted-bf16 is
  the sorted loop on the model loaded in bfloat16, on bf16 CPUs only); pipeline
  (``pipeline("text-classification", batch_size=32)``, ``top_k=None``; classifiers only);
  crossencoder (sentence-transformers ``CrossEncoder.predict(batch_size=32)``; cross-encoder only);
  ort-fp32 / ort-int8 (ONNX Runtime with its BERT fusions, fp32 and dynamic int8, see
  ``baselines_onnx.py``) in length-sorted batches of 32, and ort-fp32-single / ort-int8-single one
  request at a time in arrival order. Tokenization is inside the timed region for every system.
* Timing: ``--repeats`` timed passes per system, interleaved in a rotating order so that drift hits
  every system alike; the median pass is reported with the runs' min-max. The ``*-single`` systems
  are also timed per request over the latency set (``--repeats`` passes; median ms reported).
* Useful work: per sequence of L tokens a BERT encoder does
  ``layers * (2 * L * (4 h^2 + 2 h ffn) + 4 L^2 h)`` FLOPs (the projections, the feed-forward and the
  two attention products; the classifier is negligible), counted on real tokens, never on padding.
  "% fp32" divides a system's useful GFLOP/s by the fp32 GEMM rate of the machine, measured here with
  ``torch.mm`` ([1024 x 1024] @ [1024 x 4096], median of 7); bf16 and int8 (``torch._int_mm``)
  rates are printed too for context.
* Threads: ``TOKENIZERS_PARALLELISM=false`` (set before tokenizers loads), ``torch.set_num_threads``
  = cores, ONNX Runtime ``intra_op_num_threads`` = cores and ``inter_op_num_threads`` = 1. The
  systems run one after another in one process, so each has all cores while it runs.

Usage::

    .venv/bin/python benchmarks/bench_suite.py --cache-dir /tmp/winnow-suite --json suite.json
    .venv/bin/python benchmarks/bench_suite.py --models minilm --systems winnow,hf-sorted,ort-fp32
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers loads: torch and ORT own the cores

import argparse
import dataclasses
import datetime as dt
import functools
import gc
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import sentence_transformers
import torch
import transformers
from sentence_transformers import CrossEncoder
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config, Qwen3Config, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baselines_onnx  # the sibling modules, importable once their folder is on the path
import bench_deberta
import bench_decoder
import bench_offline as offline

import winnow
from winnow import LLM
from winnow.layers.linear import cpu_has_fp16_weights

Items = list[Any]  # texts (str) or (query, document) pairs
Runner = Callable[[Items], np.ndarray]

BATCH_SIZE = 32
MAX_PAIR_TOKENS = offline.MAX_TOKENS
QUERY_TOKENS = (8, 24)
LATENCY_PROMPTS, LATENCY_TOKENS = 64, (8, 32)
QUERY_SEED, LATENCY_SEED = offline.WORKLOAD_SEED + 1, offline.WORKLOAD_SEED + 2
FP32_ATOL, LOW_PRECISION_ATOL = 1e-3, 0.02
GEMM_SHAPE, GEMM_RUNS = (1024, 1024, 4096), 7  # M, K, N
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
DEFAULT_REPEATS = 3

SUITE_MODELS: dict[str, offline.ModelSpec] = {
    "minilm": dataclasses.replace(offline.MODELS["minilm"], default_num_prompts=512),
    "bert-base": dataclasses.replace(offline.MODELS["bert-base"], default_num_prompts=128),
    "cross-encoder": dataclasses.replace(
        offline.MODELS["bert-base"], name="cross-encoder", num_labels=1, default_num_prompts=128
    ),
    # The other families of the issue, as 2-label text classifiers; fewer prompts: on 2 cores a
    # Qwen3-0.6B-shape pass over 32 prompts takes ~20 s in float32.
    "qwen3-0.6b": offline.ModelSpec(
        "qwen3-0.6b", 1024, 28, 16, 3072, default_num_prompts=32, vocab_size=151669, family="qwen3"
    ),
    "deberta-v3-base": offline.ModelSpec(
        "deberta-v3-base", 768, 12, 12, 3072, default_num_prompts=64, vocab_size=128100, family="deberta-v2"
    ),
}


@dataclass(frozen=True)
class SystemInfo:
    atol: float = FP32_ATOL  # allowed max |probs diff| against hf-sorted
    single: bool = False  # one request per call: also timed per request on the latency set
    only: str | None = None  # "texts" or "pairs" when the system serves one kind of model only


SYSTEMS: dict[str, SystemInfo] = {
    "winnow": SystemInfo(),
    "winnow-bf16": SystemInfo(LOW_PRECISION_ATOL),
    "winnow-fp16w": SystemInfo(LOW_PRECISION_ATOL),
    "winnow-int8": SystemInfo(LOW_PRECISION_ATOL),
    "winnow-int8-fp32": SystemInfo(LOW_PRECISION_ATOL),
    "winnow-single": SystemInfo(single=True),
    "winnow-bf16-single": SystemInfo(LOW_PRECISION_ATOL, single=True),
    "winnow-fp16w-single": SystemInfo(LOW_PRECISION_ATOL, single=True),
    "winnow-int8-single": SystemInfo(LOW_PRECISION_ATOL, single=True),
    "hf-sorted": SystemInfo(),
    "hf-sorted-bf16": SystemInfo(LOW_PRECISION_ATOL),
    "hf-arrival": SystemInfo(),
    "pipeline": SystemInfo(only="texts"),
    "crossencoder": SystemInfo(only="pairs"),
    "ort-fp32": SystemInfo(),
    "ort-fp32-single": SystemInfo(single=True),
    "ort-int8": SystemInfo(LOW_PRECISION_ATOL),
    "ort-int8-single": SystemInfo(LOW_PRECISION_ATOL, single=True),
}


def is_pair_model(spec: offline.ModelSpec) -> bool:
    """A 1-label model is a cross-encoder: it scores (query, document) pairs."""
    return spec.num_labels == 1


def takes_token_types(spec: offline.ModelSpec) -> bool:
    """Decoders take no token_type_ids (the BERT tokenizer the suite saves would produce them)."""
    return spec.family != "qwen3"


def load_tokenizer(spec: offline.ModelSpec, folder: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not takes_token_types(spec):  # so that hf-arrival and pipeline pass none
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def build_folder(spec: offline.ModelSpec, root: Path) -> Path:
    """A random-weight classifier of ``spec``'s family and shape, with the BERT uncased tokenizer."""
    if spec.family == "bert":
        return offline.build_model_folder(spec, root)
    if spec.family == "qwen3":
        architecture = "Qwen3ForSequenceClassification"
        config: Any = Qwen3Config(**bench_decoder.QWEN3_0_6B, pad_token_id=0, architectures=[architecture])
    elif spec.family == "deberta-v2":
        architecture = "DebertaV2ForSequenceClassification"
        config = DebertaV2Config(**bench_deberta.V3_BASE, architectures=[architecture])
    else:
        raise ValueError(f"unknown model family {spec.family!r}")
    config.num_labels = spec.num_labels
    return offline.save_random_model(root / f"{spec.name}-random-cls", config)


def bf16_supported() -> bool:
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# -- workloads ----------------------------------------------------------------------------------


@dataclass
class Workload:
    items: Items  # texts, or (query, document) pairs
    lengths: list[int]  # tokens the model sees per item, [CLS]/[SEP] included
    latency_items: Items


def token_counts(tokenizer: Any, items: Items) -> list[int]:
    return [len(ids) for ids in tokenizer(items)["input_ids"]]


def short_texts(tokenizer: Any, n: int, tokens: tuple[int, int], seed: int) -> list[str]:
    """``n`` texts of whole vocabulary words whose token counts are uniform in ``tokens`` (inclusive)."""
    rng = np.random.default_rng(seed)
    words = offline.word_list(tokenizer)
    sizes = rng.integers(tokens[0], tokens[1] + 1, n)
    return [" ".join(rng.choice(words, size=int(k) - 3)).capitalize() + "." for k in sizes]  # -3: CLS, SEP, "."


def drop_words(text: str, count: int) -> str:
    """Remove the last ``count`` words of a workload text ("Word word ... word.")."""
    if count <= 0:
        return text
    words = text[:-1].split(" ")
    return " ".join(words[: len(words) - count]) + "."


def pair_up(tokenizer: Any, documents: list[str], seed: int) -> list[tuple[str, str]]:
    """A short query for each document; documents cut so that each pair fits in MAX_PAIR_TOKENS."""
    queries = short_texts(tokenizer, len(documents), QUERY_TOKENS, seed)
    q_lens, d_lens = token_counts(tokenizer, queries), token_counts(tokenizer, documents)
    # [CLS] q [SEP] d [SEP] has one special token fewer than the two texts apart; each word is one token.
    return [
        (q, drop_words(d, q_len + d_len - 1 - MAX_PAIR_TOKENS))
        for q, d, q_len, d_len in zip(queries, documents, q_lens, d_lens)
    ]


def build_workload(tokenizer: Any, spec: offline.ModelSpec, num_prompts: int) -> Workload:
    texts, _ = offline.make_workload(tokenizer, num_prompts)
    short = short_texts(tokenizer, LATENCY_PROMPTS, LATENCY_TOKENS, LATENCY_SEED)
    if is_pair_model(spec):
        items: Items = pair_up(tokenizer, texts, QUERY_SEED)
        latency: Items = pair_up(tokenizer, short, QUERY_SEED + 1)
    else:
        items, latency = list(texts), list(short)
    lengths = token_counts(tokenizer, items)
    if max(lengths) > MAX_PAIR_TOKENS:
        raise RuntimeError(f"workload item of {max(lengths)} tokens exceeds {MAX_PAIR_TOKENS}")
    return Workload(items, lengths, latency)


def encoder_flops(spec: offline.ModelSpec, lengths: Sequence[int]) -> float:
    """Useful FLOPs over sequences of ``lengths`` real tokens (no padding). BERT and DeBERTa (whose
    relative-position terms are not counted): projections, feed-forward, both attention products.
    Qwen3: grouped-query projections, the gated feed-forward's three matrices, causal attention
    (half the score matrix)."""
    h, ffn = spec.hidden_size, spec.intermediate_size
    if spec.family == "qwen3":
        shape = bench_decoder.QWEN3_0_6B
        q = shape["num_attention_heads"] * shape["head_dim"]
        kv = shape["num_key_value_heads"] * shape["head_dim"]
        weights = 2 * h * q + 2 * h * kv + 3 * h * ffn  # q and o, k and v, gate / up / down
        per_layer = sum(2 * n * weights + 2 * n * n * q for n in lengths)
    else:
        per_layer = sum(2 * n * (4 * h * h + 2 * h * ffn) + 4 * n * n * h for n in lengths)
    return float(spec.num_hidden_layers * per_layer)


# -- systems ------------------------------------------------------------------------------------


def as_binary(scores: np.ndarray) -> np.ndarray:
    """1-label scores s as the rows [1 - s, s] (the probabilities every system is compared on)."""
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    return np.stack([1.0 - s, s], axis=1)


class SigmoidAsBinary:
    """A 1-logit classifier whose logits become [0, x]: softmax of that is [1 - sigmoid(x), sigmoid(x)]."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = SimpleNamespace(num_labels=2)

    def __call__(self, **inputs: torch.Tensor) -> Any:
        logits = self.model(**inputs).logits
        return SimpleNamespace(logits=torch.cat([torch.zeros_like(logits), logits], dim=-1))


def sorted_batches(model: Any, tokenizer: Any, token_types: bool = True) -> Runner:
    return functools.partial(
        offline.hf_classify_sorted, model, tokenizer, batch_size=BATCH_SIZE, token_type_ids=token_types
    )


def arrival_batches(model: Any, tokenizer: Any, batch_size: int) -> Runner:
    return functools.partial(offline.hf_classify_arrival, model, tokenizer, batch_size=batch_size)


def one_at_a_time(run: Runner) -> Runner:
    return lambda items: np.concatenate([run(items[i : i + 1]) for i in range(len(items))])


def winnow_score(llm: LLM, pairs: Items) -> np.ndarray:
    queries, documents = zip(*pairs)
    outputs = llm.score(list(queries), list(documents), use_tqdm=False)
    return as_binary(np.array([o.outputs.score for o in outputs]))


def pipeline_classify(pipe: Any, texts: Items) -> np.ndarray:
    """Probabilities from the pipeline's per-label dicts (sorted by score) back into label order."""
    label2id = pipe.model.config.label2id
    probs = np.empty((len(texts), len(label2id)), dtype=np.float32)
    for row, scores in enumerate(pipe(list(texts), top_k=None)):
        for entry in scores:
            probs[row, label2id[entry["label"]]] = entry["score"]
    return probs


def crossencoder_score(model: Any, pairs: Items) -> np.ndarray:
    return as_binary(model.predict(list(pairs), batch_size=BATCH_SIZE, show_progress_bar=False))


def record_error(skipped: dict[str, str], name: str, exc: Exception, stage: str) -> None:
    """A broken system must not sink the other measurements: note it, print it, go on."""
    skipped[name] = f"error: {type(exc).__name__}: {exc}"
    print(f"[{name}] FAILED in {stage}: {skipped[name]}")


WINNOW_VARIANTS: dict[str, dict[str, str]] = {
    "winnow": {"dtype": "float32"},  # auto is bfloat16 on CPUs with bf16 instructions: that is winnow-bf16
    "winnow-bf16": {"dtype": "bfloat16"},
    # auto on an x86 CPU without bf16 instructions: float32 arithmetic, float16-stored linear weights
    "winnow-fp16w": {"dtype": "auto"},
    "winnow-int8": {"quantization": "int8"},
    "winnow-int8-fp32": {"quantization": "int8", "dtype": "float32"},  # float32 activations between the int8 GEMMs
}


def winnow_runners(folder: Path, pairs: bool, wanted: set[str], skipped: dict[str, str]) -> dict[str, Runner]:
    """One LLM per variant; ``<variant>-single`` shares its variant's. A variant that fails to load is recorded."""
    run = winnow_score if pairs else offline.winnow_classify
    runners: dict[str, Runner] = {}
    for name, kwargs in WINNOW_VARIANTS.items():
        single = f"{name}-single"
        if not wanted & {name, single}:
            continue
        try:
            runners[name] = functools.partial(run, LLM(str(folder), device="cpu", **kwargs))
        except Exception as exc:
            record_error(skipped, name, exc, "loading")
            if single in wanted:
                skipped[single] = skipped[name]
            continue
        if single in wanted:
            runners[single] = one_at_a_time(runners[name])
    return runners


def load_hf(folder: Path, dtype: torch.dtype) -> Any:
    """transformers' classifier with SDPA, or eager attention where the family has no SDPA (DeBERTa)."""
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype)
    except (ValueError, ImportError):
        model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager", dtype=dtype)
    return model.eval()


def transformers_runners(
    folder: Path, tokenizer: Any, pairs: bool, wanted: set[str], token_types: bool = True
) -> dict[str, Runner]:
    """hf-sorted, hf-arrival and pipeline (texts) or crossencoder (pairs); hf-sorted is always built."""
    hf = load_hf(folder, torch.float32)
    model = SigmoidAsBinary(hf) if pairs else hf
    runners = {
        "hf-sorted": sorted_batches(model, tokenizer, token_types),  # also the reference of the agreement check
        "hf-arrival": arrival_batches(model, tokenizer, BATCH_SIZE),
    }
    if "hf-sorted-bf16" in wanted:  # the same loop in bfloat16: winnow-bf16's like-for-like baseline
        half = load_hf(folder, torch.bfloat16)
        runners["hf-sorted-bf16"] = sorted_batches(SigmoidAsBinary(half) if pairs else half, tokenizer, token_types)
    if "pipeline" in wanted and not pairs:
        pipe = pipeline("text-classification", model=hf, tokenizer=tokenizer, device=-1, batch_size=BATCH_SIZE)
        runners["pipeline"] = functools.partial(pipeline_classify, pipe)
    if "crossencoder" in wanted and pairs:
        cross = CrossEncoder(str(folder), device="cpu", activation_fn=torch.nn.Sigmoid())
        runners["crossencoder"] = functools.partial(crossencoder_score, cross)
    return runners


def ort_runners(
    spec: offline.ModelSpec, folder: Path, tokenizer: Any, root: Path, wanted: set[str], cores: int
) -> tuple[dict[str, Runner], dict[str, dict[str, int]]]:
    """ort-fp32 / ort-int8 in sorted batches and one at a time; also the fused-operator counts."""
    models = baselines_onnx.build_onnx_models(folder, root, spec.num_attention_heads, spec.hidden_size)
    runners: dict[str, Runner] = {}
    for name, path in (("ort-fp32", models.fp32), ("ort-int8", models.int8)):
        if not wanted & {name, f"{name}-single"}:
            continue
        session = baselines_onnx.OrtClassifier(baselines_onnx.make_session(path, cores), spec.num_labels)
        model = SigmoidAsBinary(session) if is_pair_model(spec) else session
        runners[name] = sorted_batches(model, tokenizer)
        runners[f"{name}-single"] = arrival_batches(model, tokenizer, 1)
    return runners, {"fp32": models.fp32_ops, "int8": models.int8_ops}


def check_fusions(spec: offline.ModelSpec, ops: dict[str, int]) -> None:
    """Print the optimizer's fused operators; warn when they are not one Attention per layer."""
    print(f"[{spec.name}] ort fp32 fused ops: {ops['fp32']}")
    print(f"[{spec.name}] ort int8 ops:      {ops['int8']}")
    layers = spec.num_hidden_layers
    if ops["fp32"].get("Attention", 0) != layers or ops["fp32"].get("SkipLayerNormalization", 0) < 2 * layers - 1:
        print(f"[{spec.name}] WARNING: onnxruntime's BERT fusions were not fully applied ({layers} layers)")


def skip_reasons(spec: offline.ModelSpec, wanted: set[str]) -> dict[str, str]:
    kind = "pairs" if is_pair_model(spec) else "texts"
    reasons = {n: f"n/a: {SYSTEMS[n].only} only" for n in wanted if SYSTEMS[n].only not in (None, kind)}
    if spec.family != "bert":  # baselines_onnx exports and fuses BERT-shape models only
        reasons.update({n: "n/a: ORT's BERT fusions (BERT-shape models only)" for n in wanted if n.startswith("ort-")})
    if not bf16_supported():
        no_bf16 = {"winnow-bf16", "winnow-bf16-single", "hf-sorted-bf16"}
        reasons.update(dict.fromkeys(wanted & no_bf16, "skipped: no bf16 hardware"))
    if bf16_supported() or not cpu_has_fp16_weights():  # auto is bfloat16 or plain float32 there
        fp16w = {"winnow-fp16w", "winnow-fp16w-single"}
        reasons.update(dict.fromkeys(wanted & fp16w, "skipped: auto does not store float16 weights here"))
    return reasons


# -- measurement --------------------------------------------------------------------------------


def warm_up(label: str, runners: dict[str, Runner], items: Items, skipped: dict[str, str]) -> dict[str, np.ndarray]:
    """One untimed pass per system (its outputs feed the agreement check); a failing system is dropped."""
    outputs = {}
    for name, run in list(runners.items()):
        try:
            seconds, outputs[name] = offline.timed(functools.partial(run, items))
        except Exception as exc:
            record_error(skipped, name, exc, f"{label} warm-up")
            del runners[name]
            continue
        print(f"[{label}] warm-up {name:<16} {seconds:8.2f}s")
    return outputs


def time_passes(label: str, runners: dict[str, Runner], items: Items, repeats: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    for rep, order in enumerate(offline.rotations(list(runners), repeats)):
        for name in order:
            elapsed, _ = offline.timed(functools.partial(runners[name], items))
            seconds[name].append(elapsed)
            print(f"[{label}] run {rep + 1}/{repeats} {name:<16} {elapsed:8.2f}s")
    return seconds


def time_requests(runners: dict[str, Runner], items: Items, repeats: int) -> dict[str, list[float]]:
    """Per-request latency (ms) of the one-at-a-time systems, each item sent alone."""
    latency: dict[str, list[float]] = {name: [] for name in runners}
    for order in offline.rotations(list(runners), repeats):
        for name in order:
            latency[name] += [1e3 * offline.timed(functools.partial(runners[name], [item]))[0] for item in items]
    return latency


def matmul_rates() -> dict[str, float | None]:
    """GFLOP/s (int8: GOP/s) of one [M x K] @ [K x N] product, median of GEMM_RUNS after a warm-up."""
    m, k, n = GEMM_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    a8, b8 = (torch.randint(-128, 128, shape, dtype=torch.int8) for shape in ((m, k), (k, n)))
    cases: dict[str, Callable[[], Any]] = {"fp32": lambda: torch.mm(a, b), "int8": lambda: torch._int_mm(a8, b8)}
    rates: dict[str, float | None] = {"bf16": None}
    if bf16_supported():
        a16, b16 = a.bfloat16(), b.bfloat16()
        cases["bf16"] = lambda: torch.mm(a16, b16)
    for name, fn in cases.items():
        fn()
        rates[name] = 2 * m * k * n / statistics.median(offline.timed(fn)[0] for _ in range(GEMM_RUNS)) / 1e9
    return rates


# -- one model ----------------------------------------------------------------------------------


def build_runners(
    spec: offline.ModelSpec, folder: Path, tokenizer: Any, root: Path, wanted: set[str], cores: int
) -> tuple[dict[str, Runner], dict[str, str], dict[str, dict[str, int]] | None]:
    """The selected systems' runners (in SYSTEMS order, plus hf-sorted), skip reasons, ORT fused ops."""
    skipped = skip_reasons(spec, wanted)
    active = wanted - set(skipped)
    pairs = is_pair_model(spec)
    runners = {
        **winnow_runners(folder, pairs, active, skipped),
        **transformers_runners(folder, tokenizer, pairs, active, takes_token_types(spec)),
    }
    ops = None
    if any(name.startswith("ort-") for name in active):
        ort, ops = ort_runners(spec, folder, tokenizer, root, active, cores)
        runners.update(ort)
        check_fusions(spec, ops)
    selected = {n: runners[n] for n in SYSTEMS if n in runners and (n in active or n == "hf-sorted")}
    return selected, skipped, ops


def summarize(
    name: str,
    seconds: list[float],
    workload: Workload,
    flops: float,
    fp32_rate: float,
    max_diff: float,
    latency: list[float] | None,
) -> dict[str, Any]:
    median_s = statistics.median(seconds)
    gflops = flops / median_s / 1e9
    info = SYSTEMS[name]
    return {
        "seconds": seconds,
        "median_s": median_s,
        "seqs_per_s": len(workload.items) / median_s,
        "tokens_per_s": sum(workload.lengths) / median_s,
        "useful_gflops": gflops,
        "pct_fp32_matmul": 100 * gflops / fp32_rate,
        "max_abs_diff": max_diff,
        "atol": info.atol,
        "agrees": max_diff <= info.atol,
        "latency_ms": latency,
        "latency_p50_ms": statistics.median(latency) if latency else None,
    }


def add_winnow_ratios(results: dict[str, dict[str, Any]]) -> None:
    """winnow/x: the system's median time over winnow's (winnow-single's for the one-at-a-time systems)."""
    for name, r in results.items():
        own = results.get("winnow-single" if SYSTEMS[name].single else "winnow")
        r["winnow_ratio"] = r["median_s"] / own["median_s"] if own else None


def bench_model(spec: offline.ModelSpec, folder: Path, args: argparse.Namespace, fp32_rate: float) -> dict[str, Any]:
    label = spec.name
    tokenizer = load_tokenizer(spec, folder)
    workload = build_workload(tokenizer, spec, args.num_prompts or spec.default_num_prompts)
    flops = encoder_flops(spec, workload.lengths)
    print(f"[{label}] workload: {offline.describe_lengths(workload.lengths)}; {flops / 1e9:.0f} useful GFLOP")
    runners, skipped, ops = build_runners(spec, folder, tokenizer, args.root, set(args.systems), args.cores)
    outputs = warm_up(label, runners, workload.items, skipped)
    if "hf-sorted" not in outputs:
        raise SystemExit(f"[{label}] the reference system hf-sorted failed: {skipped.get('hf-sorted')}")
    reference = outputs["hf-sorted"]
    if "hf-sorted" not in args.systems:  # built only as the reference
        del runners["hf-sorted"]
    seconds = time_passes(label, runners, workload.items, args.repeats)
    single = {n: run for n, run in runners.items() if SYSTEMS[n].single}
    latency = time_requests(single, workload.latency_items, args.repeats)
    results = {
        name: summarize(
            name,
            seconds[name],
            workload,
            flops,
            fp32_rate,
            float(np.abs(outputs[name] - reference).max()),
            latency.get(name),
        )
        for name in runners
    }
    add_winnow_ratios(results)
    lengths = np.asarray(workload.lengths)
    return {
        "model": label,
        "shape": dataclasses.asdict(spec),
        "pairs": is_pair_model(spec),
        "num_prompts": len(workload.items),
        "total_tokens": int(lengths.sum()),
        "lengths": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())},
        "latency_set_tokens": token_counts(tokenizer, workload.latency_items),
        "useful_gflop": flops / 1e9,
        "ort_ops": ops,
        "skipped": skipped,
        "results": results,
    }


# -- reporting ----------------------------------------------------------------------------------


def cpu_flags() -> dict[str, bool]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    line = next((x for x in text.splitlines() if x.startswith("flags")), "flags:")
    flags = set(line.split(":", 1)[1].split())
    return {flag: flag in flags for flag in CPU_FLAGS}


def environment(cores: int) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": offline.cpu_model(),
        "cores": cores,
        "cpu_flags": cpu_flags(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        **baselines_onnx.versions(),
        "winnow": winnow.__version__,
        "torch_threads": torch.get_num_threads(),
        "ort_threads": {"intra_op": cores, "inter_op": 1},
        "tokenizers_parallelism": os.environ["TOKENIZERS_PARALLELISM"],
        "loadavg_start": offline.load_average(),
    }


def print_header(env: dict[str, Any], rates: dict[str, float | None]) -> None:
    present = " ".join(f for f, on in env["cpu_flags"].items() if on) or "-"
    absent = " ".join(f for f, on in env["cpu_flags"].items() if not on) or "-"
    print(f"{env['date']}  {env['cpu']}, {env['cores']} cores, flags: {present} (absent: {absent})")
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, onnxruntime {env['onnxruntime']}, "
        f"sentence-transformers {env['sentence_transformers']}, winnow {env['winnow']}, python {env['python']}"
    )
    matmul = ", ".join(f"{k} {v:.0f}" if v else f"{k} n/a" for k, v in rates.items())
    print(f"matrix rate (GFLOP/s, int8 GOP/s; {'x'.join(map(str, GEMM_SHAPE))}): {matmul}")
    print(f"load average at start: {env['loadavg_start']}")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


COLUMNS = (  # header, width, cell
    ("model", 15, lambda m, n, r: m),
    ("system", 16, lambda m, n, r: n),
    ("seq/s", 8, lambda m, n, r: fmt(r["seqs_per_s"], ".1f")),
    ("tok/s", 8, lambda m, n, r: fmt(r["tokens_per_s"], ".0f")),
    ("GFLOP/s", 8, lambda m, n, r: fmt(r["useful_gflops"], ".1f")),
    ("%fp32", 6, lambda m, n, r: fmt(r["pct_fp32_matmul"], ".0f")),
    ("winnow/x", 9, lambda m, n, r: fmt(r["winnow_ratio"], ".2f")),
    ("max|diff|", 9, lambda m, n, r: fmt(r["max_abs_diff"], ".1e")),
    ("runs min-max s", 15, lambda m, n, r: f"{min(r['seconds']):.2f}-{max(r['seconds']):.2f}"),
    ("p50 ms", 7, lambda m, n, r: fmt(r["latency_p50_ms"], ".1f")),
    ("check", 5, lambda m, n, r: "ok" if r["agrees"] else "FAIL"),
)


def table_row(cells: Sequence[str]) -> str:
    """The first two columns left-aligned, the numbers right-aligned, at the widths of COLUMNS."""
    return " ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, (_, w, _)) in enumerate(zip(cells, COLUMNS)))


def print_table(reports: list[dict[str, Any]], repeats: int) -> None:
    header = table_row([h for h, _, _ in COLUMNS])
    print(f"\nMedian of {repeats} timed passes (tokenization included); p50 ms = per-request latency, 64 short items")
    print(header)
    print("-" * len(header))
    for report in reports:
        for name, r in report["results"].items():
            print(table_row([cell(report["model"], name, r) for _, _, cell in COLUMNS]))
        for name, reason in report["skipped"].items():
            print(f"{report['model']:<15} {name:<16} {reason}")
    print(
        "\nwinnow/x = system time / winnow time (winnow-single for *-single): above 1, winnow is faster. "
        f"check: max|diff| vs hf-sorted <= {FP32_ATOL:g} (fp32) or {LOW_PRECISION_ATOL:g} (bf16, int8)."
    )


# -- command line -------------------------------------------------------------------------------


def run_per_model(
    args: argparse.Namespace,
    bench_model: Callable[[offline.ModelSpec, Path, argparse.Namespace], dict[str, Any]],
    print_report: Callable[[dict[str, Any]], None],
    prefix: str,
) -> int:
    """The per-model loop of the single-purpose scripts (bench_latency, bench_workers): torch on every
    core, model folders under ``--cache-dir`` (or a temp dir), one report per model printed as it
    ends, the load average, and ``--json`` with the environment, ``args.rounds`` and the reports.
    Sets ``args.cores`` and ``args.root`` for ``bench_model``."""
    args.cores = offline.core_count()
    torch.set_num_threads(args.cores)
    env = environment(args.cores)
    reports = []
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        args.root = args.cache_dir or Path(tmp)
        args.root.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            spec = SUITE_MODELS[name]
            reports.append(bench_model(spec, build_folder(spec, args.root), args))
            print_report(reports[-1])
    env["loadavg_end"] = offline.load_average()
    print(f"\nload average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.json:
        args.json.write_text(json.dumps({**env, "rounds": args.rounds, "reports": reports}, indent=2))
        print(f"wrote {args.json}")
    return 0


def parse_list(value: str, choices: Sequence[str], what: str, parser: argparse.ArgumentParser) -> list[str]:
    picked = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(picked) - set(choices))
    if unknown or not picked:
        parser.error(f"unknown or no {what} {unknown}; choose from {','.join(choices)}")
    return [c for c in choices if c in picked]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--models", default=",".join(SUITE_MODELS), help="comma-separated subset of the models")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of the systems")
    p.add_argument(
        "--num-prompts", type=int, default=None, help="items per model (default minilm 512, bert-base 128, ...)"
    )
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed passes per system (median reported)")
    p.add_argument("--cache-dir", type=Path, default=None, help="keep model folders and ONNX exports here")
    p.add_argument("--json", type=Path, default=None, help="write everything, per-run times included, here")
    args = p.parse_args(argv)
    args.models = parse_list(args.models, list(SUITE_MODELS), "models", p)
    args.systems = parse_list(args.systems, list(SYSTEMS), "systems", p)
    if args.repeats < 1 or (args.num_prompts is not None and args.num_prompts < 1):
        p.error("--repeats and --num-prompts must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.cores = offline.core_count()
    torch.set_num_threads(args.cores)
    env = environment(args.cores)
    rates = matmul_rates()
    print_header(env, rates)
    settings = {
        "models": args.models,
        "systems": args.systems,
        "num_prompts": {m: args.num_prompts or SUITE_MODELS[m].default_num_prompts for m in args.models},
        "repeats": args.repeats,
        "batch_size": BATCH_SIZE,
        "token_range": [offline.MIN_TOKENS, offline.MAX_TOKENS],
        "query_tokens": list(QUERY_TOKENS),
        "latency_set": {"prompts": LATENCY_PROMPTS, "tokens": list(LATENCY_TOKENS)},
        "atol": {"fp32": FP32_ATOL, "bf16_int8": LOW_PRECISION_ATOL},
        "workload_seed": offline.WORKLOAD_SEED,
    }
    with tempfile.TemporaryDirectory(prefix="winnow-suite-") as tmp:
        args.root = args.cache_dir or Path(tmp)
        args.root.mkdir(parents=True, exist_ok=True)
        reports = []
        for name in args.models:
            spec = SUITE_MODELS[name]
            reports.append(bench_model(spec, build_folder(spec, args.root), args, rates["fp32"] or 1.0))
            gc.collect()  # free this model's copies before the next one loads
    env["loadavg_end"] = offline.load_average()
    print_table(reports, args.repeats)
    print(f"load average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}")
    if args.json:
        args.json.write_text(
            json.dumps({**env, "matmul_rates": rates, "settings": settings, "reports": reports}, indent=2)
        )
        print(f"wrote {args.json}")
    failed = [f"{r['model']}/{n}" for r in reports for n, x in r["results"].items() if not x["agrees"]]
    errors = [f"{r['model']}/{n}" for r in reports for n, why in r["skipped"].items() if why.startswith("error")]
    if failed or errors:
        print(f"FAIL: disagreeing {failed}, errors {errors}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
