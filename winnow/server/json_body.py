"""Request bodies parsed by pydantic-core's JSON parser instead of the standard library's.

``json.loads`` accepts what no text input can carry: a lone UTF-16 surrogate escape (``"\\ud800"``)
reaches the Rust tokenizer, or the JSON renderer of the answer, as a string neither can encode,
and the request fails with a 500; a body nested thousands of levels deep raises ``RecursionError``.
pydantic-core refuses both while parsing (and parses ~10x faster), so a bad body is a 400 naming
what is wrong, like any other schema error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute

from winnow.errors import InvalidInputError


def parse_json(body: bytes) -> Any:
    """The body as Python values; ``InvalidInputError`` saying what to change if it is not UTF-8 JSON."""
    try:
        return pydantic_core.from_json(body)
    except ValueError as e:
        raise InvalidInputError(f"The body is not valid JSON: {e}. {_HINT}") from e


_HINT = "Send UTF-8 JSON whose strings hold valid Unicode (a surrogate escape must be half of a pair)."


class _StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError as e:
                # The one parse error FastAPI turns into a RequestValidationError (a 400 in our shape).
                raise json.JSONDecodeError(f"{e}. {_HINT}", body.decode("utf-8", "replace"), 0) from e
        return self._json


class JSONRoute(APIRoute):
    """An API route whose JSON body is parsed by ``parse_json``'s rules (FastAPI's documented way
    to swap the request class)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(_StrictJSONRequest(request.scope, request.receive))

        return handle
