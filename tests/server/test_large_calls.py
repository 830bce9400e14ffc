"""Calls above ``LARGE_CALL`` prompts build their engine requests and render their answer in a worker
thread (so 200k inputs do not stall every other client on the event loop). The answer must be the
same either way: each route is asked twice, once with the threshold lowered to 1 (every call takes
the worker path, which the test checks it did) and once as shipped.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.server.conftest import ATOL
from tests.tiny_models import PROMPTS
from winnow.server import state as state_module

TEXTS = PROMPTS[:6]
CASES = [
    ("classifier", "/classify", {"input": TEXTS}),
    ("cross_encoder", "/score", {"queries": "what is rain?", "documents": TEXTS}),
    ("cross_encoder", "/rerank", {"query": "what is rain?", "documents": TEXTS, "top_n": 4, "return_documents": True}),
    ("embedder", "/v1/embeddings", {"input": TEXTS}),
    ("embedder", "/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"}),
    ("embedder", "/pooling", {"input": TEXTS}),
    ("embedder", "/v2/embed", {"texts": TEXTS, "embedding_types": ["float", "binary"]}),
    ("token_classifier", "/pooling", {"input": TEXTS}),
]


def assert_same(got: Any, expected: Any, where: str = "body") -> None:
    """Equal structure and strings; floats within ATOL (the two calls may batch differently)."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            if key not in ("id", "created"):
                assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=ATOL, rel=0), where
    else:
        assert got == expected, where


@pytest.mark.parametrize(("server", "route", "body"), CASES, ids=[f"{c[0]}{c[1]}" for c in CASES])
def test_a_large_call_gets_the_answer_a_small_one_gets(server, route, body, request, monkeypatch):
    live = request.getfixturevalue(server)
    shipped = live.post(route, body)
    assert shipped.status_code == 200, shipped.text

    in_worker: list[str] = []
    off_loop = live.state.off_loop

    async def recording_off_loop(fn, *args):
        in_worker.append(getattr(fn, "__name__", type(fn).__name__))
        return await off_loop(fn, *args)

    monkeypatch.setattr(live.state, "off_loop", recording_off_loop)
    monkeypatch.setattr(state_module, "LARGE_CALL", 1)
    large = live.post(route, body)
    assert large.status_code == 200, large.text
    assert {"make_requests", "answer"} <= set(in_worker)
    assert_same(large.json(), shipped.json())


def test_a_large_call_of_bytes_gets_the_same_bytes(embedder, monkeypatch):
    body = {"input": TEXTS, "encoding_format": "bytes"}
    shipped = embedder.post("/pooling", body)
    monkeypatch.setattr(state_module, "LARGE_CALL", 1)
    large = embedder.post("/pooling", body)
    assert shipped.status_code == large.status_code == 200
    assert large.content == shipped.content
    one = embedder.post("/pooling", {"input": TEXTS[0]}).json()["data"][0]["data"]
    assert len(large.content) == len(TEXTS) * 4 * len(one)  # float32 rows, one per text
