"""Shared fixtures: tiny models built once per session, winnow engines and transformers references."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import winnow.config
from tests.tiny_models import build_model
from winnow import LLM

logging.getLogger("winnow").setLevel(logging.WARNING)
torch.set_num_threads(2)

# The CPU's own answers, for the tests of ``dtype="auto"`` itself (see ``auto_dtype_is_float32``).
REAL_AUTO_CPU_DTYPE = winnow.config.auto_cpu_dtype
REAL_AUTO_CPU_FP16_WEIGHTS = winnow.config.auto_cpu_fp16_weights


@pytest.fixture(scope="session", autouse=True)
def auto_dtype_is_float32() -> Iterator[None]:
    """The suite checks parity in float32 (1e-4), but ``dtype="auto"`` picks bfloat16 on CPUs with
    bf16 instructions and float16 weights on other x86 CPUs. So engines built by tests see plain
    float32; tests of auto's real choice use ``real_auto``. Engines started as subprocesses are not
    patched: those tests pass ``--dtype float32``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(winnow.config, "auto_cpu_dtype", lambda: torch.float32)
        patch.setattr(winnow.config, "auto_cpu_fp16_weights", lambda device, dtype: False)
        yield


@pytest.fixture
def real_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dtype="auto"`` as this CPU really resolves it, for this test."""
    monkeypatch.setattr(winnow.config, "auto_cpu_dtype", REAL_AUTO_CPU_DTYPE)
    monkeypatch.setattr(winnow.config, "auto_cpu_fp16_weights", REAL_AUTO_CPU_FP16_WEIGHTS)


ModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory) -> ModelFactory:
    """``make_model(family, head, num_labels=2, seed=0, config_extra=None, sentence_transformers=None)``."""
    cache: dict[str, Path] = {}

    def make(family: str, head: str, **kwargs: Any) -> Path:
        key = json.dumps([family, head, kwargs], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = build_model(tmp_path_factory.mktemp(f"{family}-{head}"), family, head, **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_llm() -> Callable[..., LLM]:
    """Engines are stateless between calls, so tests share one per (folder, options)."""
    cache: dict[str, LLM] = {}

    def make(path: Path | str, **kwargs: Any) -> LLM:
        key = json.dumps([str(path), kwargs], sort_keys=True, default=str)
        if key not in cache:
            cache[key] = LLM(str(path), device="cpu", **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def hf_reference() -> Callable[..., Any]:
    """``hf_reference(path, head)`` -> (transformers model, tokenizer), loaded once per folder."""
    import transformers

    cache: dict[tuple[str, str], Any] = {}
    classes = {
        "seq": transformers.AutoModelForSequenceClassification,
        "tok": transformers.AutoModelForTokenClassification,
        "base": transformers.AutoModel,
    }

    def load(path: Path, head: str) -> Any:
        key = (str(path), head)
        if key not in cache:
            model = classes[head].from_pretrained(path, attn_implementation="eager").eval()
            cache[key] = (model, transformers.AutoTokenizer.from_pretrained(path))
        return cache[key]

    return load
