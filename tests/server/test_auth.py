"""API keys: with ``api_keys`` set, every route but the liveness probes needs ``Authorization: Bearer <key>``.

Deliberately stricter than vLLM (spec §6.8 protects only /v1, /v2, ... paths): /classify, /metrics,
/tokenize and /docs are protected too, and a refusal uses the usual error body.
"""

from __future__ import annotations

import pytest

from tests.server.conftest import assert_error, live_server, metric_value

ROUTES = [
    ("POST", "/classify", {"input": "hello"}),
    ("POST", "/v1/classify", {"input": "hello"}),
    ("POST", "/score", {"queries": "a", "documents": "b"}),
    ("POST", "/rerank", {"query": "a", "documents": ["b"]}),
    ("POST", "/v1/rerank", {"query": "a", "documents": ["b"]}),
    ("POST", "/pooling", {"input": "hello"}),
    ("POST", "/tokenize", {"prompt": "hello"}),
    ("POST", "/detokenize", {"tokens": [5]}),
    ("POST", "/invocations", {"input": "hello"}),
    ("GET", "/v1/models", None),
    ("GET", "/metrics", None),
    ("GET", "/version", None),
    ("GET", "/docs", None),
    ("GET", "/openapi.json", None),
]
ROUTE_IDS = [f"{m} {r}" for m, r, _ in ROUTES]


@pytest.fixture(scope="module")
def secured(cross_encoder_path):
    with live_server(cross_encoder_path, api_keys=("secret", "other")) as live:
        yield live


def _call(live, method, route, body, headers):
    return live.client.request(method, route, json=body, headers=headers)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}, {"Authorization": "Basic secret"}],
    ids=["none", "wrong", "no-scheme", "basic"],
)
@pytest.mark.parametrize(("method", "route", "body"), ROUTES, ids=ROUTE_IDS)
def test_refused_without_a_valid_key(secured, method, route, body, headers):
    response = _call(secured, method, route, body, headers)
    assert_error(response, 401, "AuthenticationError", "API key")


@pytest.mark.parametrize("key", ["secret", "other"])
@pytest.mark.parametrize(("method", "route", "body"), ROUTES, ids=ROUTE_IDS)
def test_served_with_a_valid_key(secured, method, route, body, key):
    response = _call(secured, method, route, body, {"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text


def test_scheme_is_case_insensitive(secured):
    assert secured.get("/v1/models", headers={"Authorization": "bearer secret"}).status_code == 200


@pytest.mark.parametrize(("method", "route"), [("GET", "/health"), ("GET", "/ping"), ("POST", "/ping")])
def test_probes_are_open(secured, method, route):
    assert secured.client.request(method, route).status_code == 200


def test_unknown_path_needs_a_key_too(secured):
    assert_error(secured.get("/nope"), 401, "AuthenticationError")
    assert secured.get("/nope", headers={"Authorization": "Bearer secret"}).status_code == 404


def test_refusals_are_counted(secured):
    def refused() -> float:
        text = secured.get("/metrics", headers={"Authorization": "Bearer secret"}).text
        return metric_value(text, "winnow_requests_total", status="401")

    before = refused()
    secured.post("/classify", {"input": "hello"})
    assert refused() == before + 1
