"""Operational routes: models, health, version, metrics, and SageMaker's /invocations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

import winnow
from winnow.errors import InvalidInputError
from winnow.server.errors import describe
from winnow.server.json_body import parse_json
from winnow.server.serving import FastJSONResponse, get_state

router = APIRouter(tags=["admin"])

# (request model, handler) pairs /invocations tries in order; filled per app by create_app.
Invocation = tuple[type[BaseModel], Callable[[Any, HTTPRequest], Awaitable[Response]]]


@router.get("/v1/models")
async def models(http: HTTPRequest) -> FastJSONResponse:
    state = get_state(http)
    cards: list[dict[str, Any]] = [
        {
            "id": name,
            "object": "model",
            "created": state.started,
            "owned_by": "winnow",
            "root": str(state.model_config.path),
            "parent": None,
            "max_model_len": state.model_config.max_model_len,
            "permission": [_permission(state.started)],
        }
        for name in state.settings.served_model_names
    ]
    return FastJSONResponse({"object": "list", "data": cards})


def _permission(created: int) -> dict[str, Any]:
    """vLLM's (OpenAI's legacy) model permission object: everything a pooling model can be used for."""
    return {
        "id": f"modelperm-{created}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


@router.get("/load")
async def load(http: HTTPRequest) -> FastJSONResponse:
    """Inference requests in flight (vLLM's ``server_load``; always tracked here)."""
    return FastJSONResponse({"server_load": get_state(http).in_flight})


@router.get("/health")
@router.get("/ping")
@router.post("/ping", include_in_schema=False)
async def health(http: HTTPRequest) -> Response:
    """200 once the model is loaded and warmed up; 503 while loading, after a failure, or when shutting down."""
    state = get_state(http)
    if state.is_ready:
        return Response(status_code=200)
    state.require_engine()  # raises the reason (503)
    return Response(status_code=503)


@router.get("/version")
async def version() -> FastJSONResponse:
    return FastJSONResponse({"version": winnow.__version__})


@router.get("/metrics", include_in_schema=False)
async def metrics(http: HTTPRequest) -> Response:
    return Response(get_state(http).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.post("/invocations")
async def invocations(http: HTTPRequest) -> Response:
    """SageMaker: the body is dispatched to the first enabled API whose request schema it fits."""
    body = parse_json(await http.body())
    routes: list[Invocation] = http.app.state.invocations
    errors: list[ValidationError] = []
    for schema, handler in routes:
        try:
            request = schema.model_validate(body)
        except ValidationError as e:
            errors.append(e)
            continue
        return await handler(request, http)
    names = ", ".join(schema.__name__ for schema, _ in routes)
    # The first API's complaints say what to change for the model's main use.
    raise InvalidInputError(
        f"The body matches none of the APIs this model serves ({names}). As {names.split(',')[0]}: "
        + "; ".join(describe(e) for e in errors[0].errors())
    )
