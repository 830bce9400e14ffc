"""Readiness, client disconnects and engine failures.

The app routes and tokenizes from start-up while the weights load in the background: until the
engine is loaded (or after loading failed) inference and /health answer 503 and /tokenize works.
A client that leaves while its prompts wait in the queue has them dropped before they cost compute.
A crashing batch fails only its own request (500, no internals); a dead engine turns /health 503.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import shutil
import socket
import threading

import pytest

from tests.server.conftest import (
    TIMEOUT,
    assert_close,
    assert_error,
    engine_gate,
    in_background,
    live_server,
    make_state,
    serving,
    wait_until,
)
from tests.tiny_models import PROMPTS
from winnow.engine.builder import load_engine
from winnow.server.state import GC_YOUNG_THRESHOLD, ServerState


class HeldLoad(ServerState):
    """Loads the weights only once the test sets ``go``."""

    go: threading.Event

    async def load(self, on_fatal=None) -> None:
        await asyncio.to_thread(self.go.wait, TIMEOUT)
        await super().load(on_fatal)


def test_inference_waits_for_the_model(classifier_path, classifier_llm):
    state = make_state(classifier_path, state_class=HeldLoad)
    state.go = threading.Event()
    try:
        with serving(state, classifier_path, ready=False) as live:
            assert_error(live.get("/health"), 503, "ServiceUnavailableError", "still loading")
            assert_error(live.get("/ping"), 503, "ServiceUnavailableError", "still loading")
            assert_error(live.post("/classify", {"input": "hello"}), 503, "ServiceUnavailableError", "still loading")
            assert_error(live.post("/pooling", {"input": "hello"}), 503, "ServiceUnavailableError")
            # What needs only the config and tokenizer works at once.
            assert live.ok("/tokenize", {"prompt": "hello"})["count"] == 3
            assert live.get("/v1/models").status_code == 200
            assert live.get("/metrics").status_code == 200
            assert live.post("/classify", {"input": "hello", "model": "x"}).status_code == 404
            state.go.set()
            wait_until(lambda: live.get("/health").status_code == 200, "/health 200 after loading")
            [expected] = classifier_llm.classify("hello", use_tqdm=False)
            assert_close(live.ok("/classify", {"input": "hello"})["data"][0]["probs"], expected.outputs.probs)
    finally:
        state.go.set()


def test_loading_freezes_what_lives_as_long_as_the_server(classifier_path):
    """After warm-up the objects alive for the server's whole life leave the cyclic GC's scans
    (``gc.freeze``): a full collection would otherwise walk them all while holding the GIL."""
    gc.unfreeze()  # whatever an earlier server in this process froze
    try:
        with serving(make_state(classifier_path, tune_gc=True), classifier_path) as live:
            assert live.get("/health").status_code == 200
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_only_the_cli_tunes_the_process_gc(classifier_path):
    """Freezing and the GC threshold are process-wide: an app embedded in another process (these
    tests) leaves them alone; `winnow serve` turns them on."""
    before = gc.get_threshold(), gc.get_freeze_count()
    with serving(make_state(classifier_path), classifier_path) as live:
        assert live.get("/health").status_code == 200
        assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_loading_runs_in_a_thread_that_ends(classifier_path, monkeypatch):
    """Loading and warm-up run on every core; libgomp keeps a thread's OpenMP team for the thread's
    life, so they run in a thread of their own that ends, not in a pooled one that would keep a
    second team beside the engine's (engine/cpu_cores.py)."""
    loaded_in: list[threading.Thread] = []

    def recording_load(*args, **kwargs):
        loaded_in.append(threading.current_thread())
        return load_engine(*args, **kwargs)

    monkeypatch.setattr("winnow.server.state.load_engine", recording_load)
    state = make_state(classifier_path)
    with serving(state, classifier_path) as live:
        assert live.get("/health").status_code == 200
        [thread] = loaded_in
        assert thread is not threading.main_thread()
        wait_until(lambda: not thread.is_alive(), "the thread that loaded the model to end")


def test_loading_makes_young_gc_passes_rare(classifier_path):
    """A busy server's many live request objects would start a young-generation pass (GIL held)
    every 700 net allocations; after loading the threshold is ``GC_YOUNG_THRESHOLD``, the older
    generations' thresholds unchanged."""
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    try:
        state = make_state(classifier_path, tune_gc=True)
        with serving(state, classifier_path) as live:
            assert live.get("/health").status_code == 200
            assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_failed_load_answers_503(classifier_path, tmp_path, caplog):
    """The weights vanish between prepare_engine and loading: 503 with the reason, tokenizer still up.
    The log says why in one line: the operator's mistake needs no traceback."""
    folder = tmp_path / "copy"
    shutil.copytree(classifier_path, folder)
    state = make_state(folder)
    (folder / "model.safetensors").unlink()
    with serving(state, folder, ready=False) as live:
        wait_until(lambda: state.load_error is not None, "the load to fail")
        [record] = [r for r in caplog.records if r.getMessage().startswith("Loading the model failed")]
        assert "model.safetensors" in record.getMessage() and record.exc_info is None
        for response in (live.get("/health"), live.post("/classify", {"input": "hello"})):
            assert_error(response, 503, "ServiceUnavailableError", "The model failed to load")
        assert_error(live.post("/pooling", {"input": "hello"}), 503, "ServiceUnavailableError")
        assert live.ok("/tokenize", {"prompt": "hello"})["count"] == 3
        assert live.ok("/detokenize", {"tokens": [5]})["prompt"]


def test_failed_load_calls_on_fatal(classifier_path, tmp_path):
    """create_app's on_fatal hook (the CLI stops the server with it) runs once when loading fails."""
    from winnow.server.app import create_app

    folder = tmp_path / "copy"
    shutil.copytree(classifier_path, folder)
    state = make_state(folder)
    (folder / "model.safetensors").unlink()
    calls: list[int] = []
    app = create_app(state, on_fatal=lambda: calls.append(1))

    async def lifespan() -> None:
        async with app.router.lifespan_context(app):
            while state.load_error is None:
                await asyncio.sleep(0.01)

    asyncio.run(asyncio.wait_for(lifespan(), TIMEOUT))
    assert calls == [1]


# -- client disconnect ---------------------------------------------------------------------------------


def _raw_post(url: str, route: str, body: dict) -> socket.socket:
    """Send a complete HTTP request on a raw socket and return it unread, so the test decides when to hang up."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    sock.sendall(head + payload)
    return sock


def _leave_while_queued(live, route: str, body: dict) -> float:
    """Queue ``body`` behind a parked batch, hang up, wait until its prompts are dropped, then let the
    engine go. Returns winnow_prompt_tokens_total from before the request was sent."""
    with engine_gate(live) as gate, in_background(lambda: live.post("/classify", {"input": "hello"})) as plug:
        gate.wait_parked()  # the engine is busy with the plug: the next request waits in the queue
        tokens_before = live.metric("winnow_prompt_tokens_total")
        sock = _raw_post(live.url, route, body)
        wait_until(lambda: gate.num_waiting == len(body["input"]), "the request to be queued")
        assert live.metric("winnow_queue_depth") == len(body["input"])
        sock.close()
        wait_until(lambda: gate.num_waiting == 0, "the queued prompts to be dropped")
        gate.release()
        assert plug().status_code == 200
    wait_until(lambda: live.metric("winnow_requests_in_flight") == 0, "the in-flight gauge to drop")
    return tokens_before


@pytest.mark.parametrize("route", ["/classify", "/pooling"])
def test_disconnected_client_work_is_dropped(classifier, route):
    tokens_before = _leave_while_queued(classifier, route, {"input": PROMPTS * 5})
    assert classifier.metric("winnow_prompt_tokens_total") == tokens_before  # none of its prompts ran
    classifier.assert_serving()


def test_disconnect_is_not_a_server_error(classifier):
    errors_before = classifier.metric("winnow_requests_total", status="500")
    _leave_while_queued(classifier, "/classify", {"input": PROMPTS * 2})
    assert classifier.metric("winnow_requests_total", status="500") == errors_before


def test_a_client_gone_before_its_body_arrived_is_499_not_500(classifier):
    """A client that hangs up mid-body gets no answer; it is counted as 499 "disconnected", so it
    does not trip 5xx alerts."""
    errors_before = classifier.metric("winnow_requests_total", status="500")
    left_before = classifier.metric("winnow_requests_total", route="disconnected", status="499")
    host, port = classifier.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"input": '
        )
    wait_until(
        lambda: classifier.metric("winnow_requests_total", route="disconnected", status="499") == left_before + 1,
        "the hang-up to be counted",
    )
    assert classifier.metric("winnow_requests_total", status="500") == errors_before
    classifier.assert_serving()


# -- engine failures -------------------------------------------------------------------------------------

POISON = [2, 77, 77, 77, 77, 77, 77, 77, 3]  # a token-id prompt the broken runner below refuses


def test_a_failing_batch_fails_only_its_request(classifier_path, caplog):
    """A crash inside the model is a 500 without internals, logged with its traceback; the engine,
    other requests and the client's keep-alive connection carry on."""
    caplog.set_level(logging.ERROR, logger="winnow.server.middleware")
    with live_server(classifier_path, engine={"max_num_seqs": 1}) as live:
        runner = live.state.engine.core.runner
        real_launch = runner.launch

        def launch(requests):
            if any(list(r.prompt.token_ids) == POISON for r in requests):
                raise RuntimeError("kernel exploded at /secret/path")
            return real_launch(requests)

        runner.launch = launch
        hello = live.ok("/tokenize", {"prompt": "hello"})["tokens"]
        response = live.post("/classify", {"input": [hello, POISON]})
        error = assert_error(response, 500, "InternalServerError")
        assert error["message"] == "Internal server error."
        assert "kernel exploded at /secret/path" in caplog.text and "Traceback" in caplog.text
        assert live.ok("/classify", {"input": PROMPTS[:3]})["data"]  # same connection
        live.assert_serving()


def test_a_dead_engine_is_reported(classifier_path):
    """The engine thread dies: requests fail fast with 500 (as in vLLM; no internals in the message)
    and /health turns 503 so an orchestrator replaces the server."""
    with live_server(classifier_path) as live:
        core = live.state.engine.core

        def schedule():
            raise RuntimeError("scheduler crashed")

        core.schedule = schedule
        first = live.post("/classify", {"input": "hello"})
        assert_error(first, 500, "InternalServerError")
        assert "scheduler crashed" not in first.text
        wait_until(lambda: live.get("/health").status_code == 503, "/health 503")
        assert_error(live.post("/classify", {"input": "hello"}), 500, "InternalServerError")
        assert live.ok("/tokenize", {"prompt": "hello"})["count"] == 3
