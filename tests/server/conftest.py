"""Live ``winnow serve`` apps for the HTTP tests, started in this test session.

Each server is built exactly as the CLI builds it (``prepare_engine`` -> ``ServerState`` ->
``create_app``) and run by a real ``uvicorn.Server`` in a background thread (uvicorn only installs
signal handlers in the main thread) on a socket bound to a free port before start-up, so there is
no port race. ``serving()`` waits until ``/health`` answers 200 and always stops the server, even
when the test fails. Session fixtures start each model's server once; tests share them and must
leave them as they found them.

Determinism: where a test needs requests to pile up in the engine's queue (batching across
clients, 429, client disconnect), ``EngineGate`` blocks the engine thread inside its ``on_step``
observer after one batch ran, until the test releases it. Every wait is bounded polling.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from winnow.engine.builder import EngineArgs, prepare_engine
from winnow.engine.engine_core import StepStats
from winnow.server.app import create_app
from winnow.server.state import ServerSettings, ServerState

TIMEOUT = 30.0  # seconds; only a bound for waits that should end much sooner
ATOL = 1e-6

# Joins the message contents with spaces; " answer" marks add_generation_prompt.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %} answer{% endif %}"
)

USAGE_KEYS = {
    "prompt_tokens",
    "total_tokens",
    "completion_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
}


def wait_until(condition: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class LiveServer:
    url: str
    path: Path
    state: ServerState
    server: uvicorn.Server
    client: httpx.Client

    def post(self, route: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.client.post(route, json=body, **kwargs)  # json=None sends no body

    def get(self, route: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(route, **kwargs)

    def ok(self, route: str, body: Any) -> dict[str, Any]:
        """POST and return the JSON body, failing with the server's answer unless it is 200."""
        response = self.post(route, body)
        assert response.status_code == 200, response.text
        return response.json()

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the Prometheus samples called ``name`` whose labels include ``labels``."""
        return metric_value(self.get("/metrics").text, name, **labels)

    def assert_serving(self) -> None:
        """Still healthy and still answering a good request correctly."""
        assert self.get("/health").status_code == 200
        tokens = self.ok("/tokenize", {"prompt": "hello world"})["tokens"]
        body = self.ok("/pooling", {"input": "hello world"})  # the model's active task
        assert body["usage"]["prompt_tokens"] == len(tokens)


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def make_state(path: Path, *, engine: dict[str, Any] | None = None, state_class: type = ServerState, **settings: Any):
    """What ``winnow serve`` builds before uvicorn starts: config and tokenizer, not the weights."""
    config, inputs = prepare_engine(EngineArgs(model=str(path), device="cpu", **(engine or {})))
    settings.setdefault("served_model_names", (path.name,))
    return state_class(config, inputs, ServerSettings(**settings))


@contextlib.contextmanager
def serving(state: ServerState, path: Path, *, ready: bool = True) -> Iterator[LiveServer]:
    """Run ``create_app(state)`` under uvicorn in a thread; ``ready`` waits for /health 200."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    client = httpx.Client(base_url=f"http://{host}:{port}", timeout=TIMEOUT)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        assert thread.is_alive(), "uvicorn stopped during start-up"
        live = LiveServer(f"http://{host}:{port}", path, state, server, client)
        if ready:
            wait_until(lambda: client.get("/health").status_code == 200, "/health 200")
        yield live
    finally:
        client.close()
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def live_server(path: Path, *, engine: dict[str, Any] | None = None, **settings: Any) -> Iterator[LiveServer]:
    with serving(make_state(path, engine=engine, **settings), path) as live:
        yield live


class EngineGate:
    """Parks the engine thread in ``on_step`` after its next batch until ``release()``.

    While parked, requests sent to the server pile up in the scheduler's queue, so what happens to a
    known queue (merged batches, 429, a client leaving) does not depend on timing. The metrics
    observer still runs first, so the parked batch is already counted.
    """

    def __init__(self, state: ServerState) -> None:
        assert state.engine is not None, "the model is not loaded"
        self.core = state.engine.core
        self.observer = self.core.on_step
        self.parked = threading.Event()
        self.released = threading.Event()

    def __call__(self, stats: StepStats) -> None:
        if self.observer is not None:
            self.observer(stats)
        if not self.released.is_set():
            self.parked.set()
            self.released.wait(TIMEOUT)  # bounded, so a failing test cannot hang the server

    def wait_parked(self) -> None:
        assert self.parked.wait(TIMEOUT), "the engine never ran a batch"

    def release(self) -> None:
        self.released.set()

    @property
    def num_waiting(self) -> int:
        return int(self.core.scheduler.num_waiting)


@contextlib.contextmanager
def engine_gate(live: LiveServer) -> Iterator[EngineGate]:
    gate = EngineGate(live.state)
    gate.core.on_step = gate
    try:
        yield gate
    finally:
        gate.release()
        gate.core.on_step = gate.observer


@contextlib.contextmanager
def in_background(fn: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    """Run ``fn`` in a thread; yields ``result()``, which waits for it (bounded) and re-raises its error."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def result() -> Any:
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "the background call did not finish"
        if "error" in box:
            raise box["error"]
        return box["value"]

    try:
        yield result
    finally:
        thread.join(TIMEOUT)


def assert_close(got: Any, expected: Any, atol: float = ATOL) -> None:
    got_array, expected_array = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got_array.shape == expected_array.shape
    np.testing.assert_allclose(got_array, expected_array, rtol=0, atol=atol)


def assert_error(response: httpx.Response, status: int, error_type: str | None = None, contains: str = "") -> dict:
    """The vLLM error shape ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status
    assert isinstance(error["message"], str) and error["message"]
    if error_type is not None:
        assert error["type"] == error_type
    assert contains in error["message"]
    return error


def assert_usage(usage: dict[str, Any], num_tokens: int) -> None:
    assert usage == {
        "prompt_tokens": num_tokens,
        "total_tokens": num_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


# -- model folders --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def classifier_path(make_model):
    return make_model("bert", "seq", num_labels=2)


@pytest.fixture(scope="session")
def cross_encoder_path(make_model):
    return make_model("bert", "seq", num_labels=1)


@pytest.fixture(scope="session")
def token_classifier_path(make_model):
    return make_model("bert", "tok", num_labels=3)


@pytest.fixture(scope="session")
def embedder_path(make_model):
    return make_model("bert", "base", sentence_transformers={"pooling": "mean"})


# -- servers, one per model for the whole session ---------------------------------------------------


@pytest.fixture(scope="session")
def classifier(classifier_path):
    """2-label classifier, small batches (8 sequences, 128 tokens), a chat template, two served names."""
    engine = {"max_num_batched_tokens": 128, "max_num_seqs": 8, "chat_template": CHAT_TEMPLATE}
    with live_server(classifier_path, engine=engine, served_model_names=("classifier", "clf-alias")) as live:
        yield live


@pytest.fixture(scope="session")
def cross_encoder(cross_encoder_path):
    """1-label classifier (cross-encoder) with a 64-token budget: a few pairs per forward pass."""
    with live_server(
        cross_encoder_path, engine={"max_num_batched_tokens": 64}, served_model_names=("reranker",)
    ) as live:
        yield live


@pytest.fixture(scope="session")
def token_classifier(token_classifier_path):
    with live_server(token_classifier_path, served_model_names=("ner",)) as live:
        yield live


@pytest.fixture(scope="session")
def embedder(embedder_path):
    with live_server(embedder_path, engine={"max_num_seqs": 4}, served_model_names=("embedder",)) as live:
        yield live


# -- offline references -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def classifier_llm(make_llm, classifier_path):
    return make_llm(classifier_path)


@pytest.fixture(scope="session")
def cross_encoder_llm(make_llm, cross_encoder_path):
    return make_llm(cross_encoder_path)


@pytest.fixture(scope="session")
def token_classifier_llm(make_llm, token_classifier_path):
    return make_llm(token_classifier_path)


@pytest.fixture(scope="session")
def embedder_llm(make_llm, embedder_path):
    return make_llm(embedder_path)
