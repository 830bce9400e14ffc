"""``winnow serve`` as a real process: flags, the environment, and graceful shutdown on SIGTERM.

Each serving scenario is one subprocess of ``python -m winnow.cli serve`` on a tiny local model. They boot
in parallel (importing torch is most of the ~4 s start-up), each on a port found free just before,
and every process is killed at the end whatever happened. A failing test prints the server's log.
Flags the server refuses are checked on processes that exit at once, before torch loads.
"""

from __future__ import annotations

import logging
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
from winnow import cli
from winnow.engine import builder
from winnow.inputs.scoring import shipped_templates
from winnow.params import PoolerConfig

BOOT_TIMEOUT = 90.0  # several interpreters import torch at once on 2 cores
API_KEY_VARIABLES = ("WINNOW_API_KEY", "VLLM_API_KEY")
# vLLM engine flags, as its commands pass them -> the flag the warning names: accepted, and warned about once.
VLLM_ENGINE_FLAGS = {
    "--enforce-eager": ["--enforce-eager"],
    "--seed": ["--seed", "0"],
    "--gpu-memory-utilization": ["--gpu-memory-utilization=0.5"],
    "--tensor-parallel-size": ["-tp", "1"],
    "--pipeline-parallel-size": ["-pp", "1"],
    "--tokenizer-mode": ["--tokenizer_mode", "auto"],
    "--enable-prefix-caching": ["--enable-prefix-caching"],
    "--no-enable-prefix-caching": ["--no-enable-prefix-caching"],
    "--enable-chunked-prefill": ["--enable-chunked-prefill"],
    "--no-enable-chunked-prefill": ["--no-enable-chunked-prefill"],
    "--kv-cache-dtype": ["--kv-cache-dtype", "auto"],
    "--swap-space": ["--swap-space", "4"],
    "--disable-log-requests": ["--disable-log-requests"],
    "--disable-log-stats": ["--disable-log-stats"],
    "--enable-server-load-tracking": ["--enable-server-load-tracking"],
    "--enable-request-id-headers": ["--enable-request-id-headers"],
}


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
        environment = {k: v for k, v in os.environ.items() if k not in API_KEY_VARIABLES}
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
    vllm_flags = [arg for args in VLLM_ENGINE_FLAGS.values() for arg in args]
    scenarios = {
        "shutdown": (["--max-num-batched-tokens", "64"], None),
        "api_key": (["--api-key", "k1", "k2"], None),
        "env_key": ([], {"WINNOW_API_KEY": "from-env"}),
        # vLLM's underscore spellings, the flag names' only.
        "token_task": (["--pooler_config.task", "token_classify", "--served_model_name", "tok", "t2"], None),
        "int8": (["--quantization", "int8"], None),
        "access_log": (["--uvicorn-log-level", "info", *vllm_flags], None),
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
    while the other info logs stay. (The access_log scenario sets info with vLLM's --uvicorn-log-level.)"""
    server = clis[scenario].wait_ready()
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        assert client.post("/classify", json={"input": "hello world"}).status_code == 200
    deadline = time.monotonic() + TIMEOUT
    while logged and '"POST /classify HTTP/1.1" 200' not in server.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    output = server.output()
    assert ('"POST /classify HTTP/1.1" 200' in output) is logged, output
    assert "ready to serve" in output


def test_vllm_engine_flags_are_accepted_with_one_warning_each(clis):
    server = clis["access_log"].wait_ready()
    output = server.output()
    for flag in VLLM_ENGINE_FLAGS:
        assert output.count(f"Ignoring {flag}: ") == 1, output
    assert "Ignoring --enable-server-load-tracking: winnow always tracks /load" in output


# -- the command line alone: parsed in this process, or refused by a process that exits at once ----------------


def _serve(*flags: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k not in API_KEY_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", "winnow.cli", "serve", *flags],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**environment, "HF_HUB_OFFLINE": "1"},
    )


def _refused(*flags: str) -> str:
    """A user's mistake: exit code 2 and a one-line message, never a traceback."""
    result = _serve(*flags)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_bad_flags_exit_with_usage_error(classifier_path):
    assert "expected a JSON object" in _refused(str(classifier_path), "--pooler-config", "[1]")
    assert "--pooler-config.task needs a value" in _refused(str(classifier_path), "--pooler-config.task")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "argument --port: must be from 0 to 65535, got 70000"),
        (["--port", "-1"], "argument --port: must be from 0 to 65535, got -1"),
        (["--max-concurrent-requests", "0"], "argument --max-concurrent-requests: must be at least 1, got 0"),
        (["--max-request-body-bytes", "0"], "argument --max-request-body-bytes: must be at least 1, got 0"),
        (["--max-request-body-bytes", "-1"], "argument --max-request-body-bytes: must be at least 1, got -1"),
        (["--max-num-seqs", "0"], "argument --max-num-seqs: must be at least 1, got 0"),
    ],
)
def test_out_of_range_numbers_are_refused(classifier_path, flags, message):
    assert message in _refused(str(classifier_path), *flags)


@pytest.mark.parametrize("keys", [[""], ["k1", " "]])
def test_an_empty_api_key_is_refused(classifier_path, keys):
    """``--api-key "$KEY"`` with KEY unset would otherwise start a server that lets every request in."""
    line = _refused(str(classifier_path), "--api-key", *keys)
    assert "argument --api-key: an empty key would let every request in" in line


@pytest.mark.parametrize(("flag", "what"), [("--api-key", "a key"), ("--served-model-name", "a served name")])
def test_a_model_swallowed_by_a_list_flag_is_refused(classifier_path, flag, what):
    """Both flags take every word after them: with no model before them, an existing folder among their values
    is the model the user meant, not the default model with a folder as key or name."""
    line = _refused(flag, "first", str(classifier_path))
    assert f"{str(classifier_path)!r} was read as {what} ({flag} takes every word after it)" in line
    assert f"put the model first: winnow serve {classifier_path} {flag} ..." in line


def test_underscore_spellings_are_the_dashed_flags():
    """As vLLM's parser: the flag name's underscores only, never a value's; a dotted field keeps its own."""
    flags = ["--max_model_len", "512", "--hf_overrides", '{"num_labels": 3}', "--api_key", "a_b", "--chat_template=x_y"]
    dotted_flags = ["--pooler_config.step_tag_id", "7", "--pooler_config.returned-token-ids=[1, 2]"]
    args, dotted = cli.parse_args(["serve", "my_model", *flags, *dotted_flags])
    assert (args.model, args.max_model_len, args.hf_overrides) == ("my_model", 512, {"num_labels": 3})
    assert (args.api_key, args.chat_template) == (["a_b"], "x_y")
    assert dotted == {"step_tag_id": 7, "returned_token_ids": [1, 2]}


def test_the_model_defaults_after_parsing():
    args, _ = cli.parse_args(["serve", "--api-key", "secret", "not-a-folder"])
    assert (args.model, args.api_key) == (cli.DEFAULT_MODEL, ["secret", "not-a-folder"])


@pytest.mark.parametrize(
    ("flags", "convert", "pooler"),
    [
        (["--task", "reward"], "auto", PoolerConfig(task="token_classify")),
        (["--task", "embed"], "embed", None),
        (["--task", "classify"], "auto", None),
        (["--task", "embed", "--convert", "classify"], "classify", None),
        (["--task", "reward", "--pooler-config.use_activation", "false"], "auto", {"use_activation": False}),
    ],
)
def test_legacy_task_flag_maps_as_the_offline_api(flags, convert, pooler, caplog):
    """``--task`` is ``LLM(task=...)``: a convert, and reward's token task when no pooler config is given."""
    with caplog.at_level(logging.WARNING, logger="winnow"):
        engine_args = cli._engine_args(*cli.parse_args(["serve", "m", *flags]))
    assert (engine_args.convert, engine_args.pooler_config) == (convert, pooler)
    assert f"--task is deprecated; --task {flags[1]} is served as --convert {convert}" in caplog.text


def test_legacy_task_flag_refuses_a_task_winnow_does_not_serve(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli._engine_args(*cli.parse_args(["serve", "m", "--task", "generate"]))
    assert exit_.value.code == 2
    assert "--task generate is not a pooling task; --task takes" in capsys.readouterr().err


def test_override_pooler_config_is_the_deprecated_pooler_config(caplog):
    with caplog.at_level(logging.WARNING, logger="winnow"):
        engine_args = cli._engine_args(*cli.parse_args(["serve", "m", "--override_pooler_config", '{"task": "x"}']))
    assert engine_args.pooler_config == {"task": "x"}
    assert "--override-pooler-config is deprecated; use --pooler-config." in caplog.text


@pytest.mark.parametrize(
    ("environ", "keys"),
    [
        ({"VLLM_API_KEY": "v"}, ["v"]),
        ({"WINNOW_API_KEY": "w", "VLLM_API_KEY": "v"}, ["w"]),
        ({"WINNOW_API_KEY": "", "VLLM_API_KEY": "v"}, ["v"]),
        ({"WINNOW_API_KEY": "", "VLLM_API_KEY": ""}, []),
    ],
)
def test_api_key_variables(environ, keys):
    """vLLM users' VLLM_API_KEY counts when WINNOW_API_KEY is not set; an empty variable is an unset one."""
    args, _ = cli.parse_args(["serve", "m"])
    assert cli._api_keys(args, environ) == keys
    args, _ = cli.parse_args(["serve", "m", "--api-key", "flag"])
    assert cli._api_keys(args, environ) == ["flag"]


def test_help_documents_defaults_templates_and_environment():
    result = _serve("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines wherever it likes
    assert "--log-level LEVEL, --uvicorn-log-level LEVEL debug, info, warning, error or critical" in text
    assert f"a shipped one: {', '.join(shipped_templates())}." in text
    assert "more get 429 (default: 512)" in text
    assert "get 413 (default: 67108864, 64 MiB)" in text
    cpu, gpu = builder._CPU_BATCHED_TOKENS, builder._GPU_BATCHED_TOKENS
    assert f"Token budget per forward pass (default: {cpu} on a CPU, {gpu} on a GPU)" in text
    cpu, gpu = builder._CPU_MAX_SEQS, builder._GPU_MAX_SEQS
    assert f"Sequences per forward pass (default: {cpu} on a CPU, {gpu} on a GPU)" in text
    workers = builder._DEFAULT_CPU_WORKERS
    assert f"(default: {workers} for winnow's own model code on {workers} threads or more, else 1)" in text
    assert "WINNOW_API_KEY, else VLLM_API_KEY: the API key when --api-key is not given" in text
    ignored = text.split("accepted and ignored, with a warning saying why:")[1].split("Legacy spellings")[0]
    assert set(VLLM_ENGINE_FLAGS) <= {flag.split(" (")[0].strip() for flag in ignored.split(",")}
