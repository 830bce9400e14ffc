"""Every native family in bfloat16 on the CPU, which is what ``dtype="auto"`` picks on CPUs with bf16
instructions: probabilities within the low-precision tolerance of the same model in float32
(which the parity tests hold to transformers at 1e-4)."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_output_rows import BUILDERS
from tests.tiny_models import PROMPTS

ATOL = 2e-2  # bf16 against fp32 probabilities, the suite's low-precision tolerance


@pytest.mark.parametrize("family", list(BUILDERS))
def test_bfloat16_probabilities_stay_close_to_float32(family, tmp_path, make_llm):
    path = BUILDERS[family](tmp_path)
    half = make_llm(path, dtype="bfloat16")
    assert half.model_config.dtype == torch.bfloat16
    got = half.classify(PROMPTS, use_tqdm=False)
    expected = make_llm(path, dtype="float32").classify(PROMPTS, use_tqdm=False)
    for g, e in zip(got, expected):
        torch.testing.assert_close(torch.tensor(g.outputs.probs), torch.tensor(e.outputs.probs), atol=ATOL, rtol=0)
