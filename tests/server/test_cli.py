"""``winnow serve`` as a real process: flags, the environment, and graceful shutdown on SIGTERM.

Each scenario is one subprocess of ``python -m winnow.cli serve`` on a tiny local model. They boot
in parallel (importing torch is most of the ~4 s start-up), each on a port found free just before,
and every process is killed at the end whatever happened. A failing test prints the server's log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server.conftest import TIMEOUT, assert_close, assert_error, metric_value

BOOT_TIMEOUT = 90.0  # several interpreters import torch at once on 2 cores


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CliServer:
    """One ``winnow serve`` subprocess; its output goes to a log file shown when a check fails."""

    def __init__(self, model: Path, log: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "winnow.cli", "serve", str(model), "--host", "127.0.0.1"]
        # float32 as in the rest of the suite (conftest's auto_dtype_is_float32 cannot reach a subprocess).
        command += ["--port", str(self.port), "--log-level", "warning", "--dtype", "float32", *flags]
        environment = {k: v for k, v in os.environ.items() if k != "WINNOW_API_KEY"}
        environment.update({"HF_HUB_OFFLINE": "1", **(env or {})})
        with log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=environment)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> CliServer:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"winnow serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        pytest.fail(f"winnow serve was not healthy after {BOOT_TIMEOUT}s:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TIMEOUT)


@pytest.fixture(scope="module")
def clis(tmp_path_factory, classifier_path) -> Iterator[dict[str, CliServer]]:
    logs = tmp_path_factory.mktemp("cli-logs")
    servers: dict[str, CliServer] = {}
    scenarios = {
        "shutdown": (["--max-num-batched-tokens", "64"], None),
        "api_key": (["--api-key", "k1", "k2"], None),
        "env_key": ([], {"WINNOW_API_KEY": "from-env"}),
        "token_task": (["--pooler-config.task", "token_classify", "--served-model-name", "tok", "t2"], None),
        "int8": (["--quantization", "int8"], None),
        "access_log": (["--log-level", "info"], None),
        "no_access_log": (["--log-level", "info", "--disable-uvicorn-access-log"], None),
    }
    try:
        for name, (flags, env) in scenarios.items():
            servers[name] = CliServer(classifier_path, logs / f"{name}.log", *flags, env=env)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


# -- graceful shutdown --------------------------------------------------------------------------------

NUM_CLIENTS, PROMPTS_PER_CLIENT = 4, 150
LONG_TEXT = "the quick brown fox jumps over the lazy dog " * 5  # ~47 tokens: one prompt per 64-token batch


def _client_prompts(client: int) -> list[str]:
    return [f"{LONG_TEXT}{client} {i}" for i in range(PROMPTS_PER_CLIENT)]


@pytest.fixture(scope="module")
def sigterm_run(clis):
    """SIGTERM while 4 large requests are in flight: (responses, their finish times, SIGTERM time, exit code)."""
    server = clis["shutdown"].wait_ready()
    finished: list[float] = [0.0] * NUM_CLIENTS
    # The clients connect first and send together: a client whose thread started late must not
    # find the first one's request already answered.
    start = threading.Barrier(NUM_CLIENTS)

    def client(i: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=TIMEOUT * 2) as http:
            http.get("/health")  # connected
            start.wait(TIMEOUT)
            response = http.post("/classify", json={"input": _client_prompts(i)})
        finished[i] = time.monotonic()
        return response

    with ThreadPoolExecutor(NUM_CLIENTS) as pool:
        futures = [pool.submit(client, i) for i in range(NUM_CLIENTS)]
        deadline = time.monotonic() + TIMEOUT
        while metric_value(httpx.get(f"{server.url}/metrics").text, "winnow_requests_in_flight") < NUM_CLIENTS:
            assert time.monotonic() < deadline, "the requests never were in flight together"
            assert not any(f.done() for f in futures), "a request finished before the others were sent"
            time.sleep(0.005)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        responses = [f.result(TIMEOUT * 2) for f in futures]
    try:
        code = server.proc.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"winnow serve did not exit within {TIMEOUT}s of SIGTERM:\n{server.output()}")
    return responses, finished, signalled, code, server


def test_sigterm_finishes_every_request_in_flight(sigterm_run, classifier_llm):
    responses, finished, signalled, _, server = sigterm_run
    assert min(finished) > signalled, "the requests must still have been running at SIGTERM"
    for i, response in enumerate(responses):
        assert response.status_code == 200, f"{response.text}\n{server.output()}"
        data = response.json()["data"]
        assert len(data) == PROMPTS_PER_CLIENT
        expected = [o.outputs.probs for o in classifier_llm.classify(_client_prompts(i), use_tqdm=False)]
        assert_close([d["probs"] for d in data], expected)


def test_sigterm_exits_with_code_zero(sigterm_run):
    """A graceful stop is a success: exit status 0, not death by the re-raised signal, and no traceback."""
    _, _, _, code, server = sigterm_run
    assert code == 0, server.output()
    assert "Traceback" not in server.output()


# -- flags and environment -------------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "keys"), [("api_key", ["k1", "k2"]), ("env_key", ["from-env"])])
def test_api_key_flag_and_environment(clis, scenario, keys):
    server = clis[scenario].wait_ready()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        assert_error(client.get("/v1/models"), 401, "AuthenticationError")
        assert_error(client.post("/classify", json={"input": "hi"}), 401, "AuthenticationError")
        assert_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401)
        assert client.get("/health").status_code == 200
        for key in keys:
            headers = {"Authorization": f"Bearer {key}"}
            assert client.get("/v1/models", headers=headers).status_code == 200
            assert client.post("/classify", json={"input": "hi"}, headers=headers).status_code == 200


def test_dotted_pooler_config_task(clis, classifier_path, make_llm):
    server = clis["token_task"].wait_ready()
    [expected] = make_llm(classifier_path, pooler_config={"task": "token_classify"}).encode(
        "hello world", pooling_task="token_classify", use_tqdm=False
    )
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        body = client.post("/pooling", json={"input": "hello world", "model": "t2"}).json()
        assert body["model"] == "t2"
        assert np.asarray(body["data"][0]["data"]).shape == (len(expected.prompt_token_ids), 2)
        assert_close(body["data"][0]["data"], expected.outputs.data)
        response = client.post("/classify", json={"input": "hello world"})
        assert_error(response, 501, "NotImplementedError", "The model does not support Classification API")
        assert [card["id"] for card in client.get("/v1/models").json()["data"]] == ["tok", "t2"]


def test_quantization_flag_serves_the_int8_engine(clis, classifier_path, make_llm):
    server = clis["int8"].wait_ready()
    [expected] = make_llm(classifier_path, quantization="int8").classify("hello world", use_tqdm=False)
    [exact] = make_llm(classifier_path).classify("hello world", use_tqdm=False)
    assert expected.outputs.probs != exact.outputs.probs
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        body = client.post("/classify", json={"input": "hello world"}).json()
    assert_close(body["data"][0]["probs"], expected.outputs.probs)


@pytest.mark.parametrize(("scenario", "logged"), [("access_log", True), ("no_access_log", False)])
def test_access_log_flag(clis, scenario, logged):
    """A line per request at info level, as uvicorn logs; none with --disable-uvicorn-access-log,
    while the other info logs stay."""
    server = clis[scenario].wait_ready()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        assert client.post("/classify", json={"input": "hello world"}).status_code == 200
    deadline = time.monotonic() + TIMEOUT
    while logged and '"POST /classify HTTP/1.1" 200' not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    output = server.output()
    assert ('"POST /classify HTTP/1.1" 200' in output) is logged, output
    assert "ready to serve" in output


def test_bad_flags_exit_with_usage_error(classifier_path):
    result = subprocess.run(
        [sys.executable, "-m", "winnow.cli", "serve", str(classifier_path), "--pooler-config", "[1]"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 2
    assert "expected a JSON object" in result.stderr
