"""``create_app``: the FastAPI application for one model. Thin: routes parse, call the engine, render.

Routes are registered by what the model can do (spec §6.1): /classify for classifiers, /score and
/rerank for 1-label classifiers and embedding models, /v1/embeddings and /v2/embed for embedding models;
/pooling, /tokenize, /detokenize, /v1/models, /health, /ping, /version, /metrics and /invocations
always. The weights load in the background after start-up; until then inference answers 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

import winnow
from winnow.server.errors import install_handlers
from winnow.server.middleware import install_middleware
from winnow.server.protocol import ClassifyRequest, EmbeddingRequest, PoolingRequest, RerankRequest, ScoreRequest
from winnow.server.routes import admin, classify, pooling, score, tokenize
from winnow.server.state import ServerState


def create_app(state: ServerState, *, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """``on_fatal`` is called if the model fails to load (the CLI stops the server with exit code 1)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load(on_fatal))
        try:
            yield
        finally:
            await state.shutdown()  # in-flight requests already finished; stop the engine loop threads
            loading.cancel()

    docs = state.settings.enable_docs
    app = FastAPI(
        title="winnow",
        version=winnow.__version__,
        summary="Serving engine for transformer classification, reranking and embedding models.",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.winnow = state
    install_handlers(app)
    install_middleware(app, state)

    config = state.model_config
    invocations: list[admin.Invocation] = []
    # Inference routes first: each request is matched against the routes in order, and the
    # embeddings route behind the admin ones took 13 checks per request.
    if "classify" in config.supported_tasks:
        app.include_router(classify.router)
        invocations.append((ClassifyRequest, classify.classify))
    if config.score_type is not None:
        app.include_router(score.router)
        invocations += [(RerankRequest, score.rerank), (ScoreRequest, score.score)]
    if "embed" in config.supported_tasks:
        app.include_router(pooling.embeddings_router)
    app.include_router(pooling.router)
    invocations.append((PoolingRequest, pooling.pooling))
    if "embed" in config.supported_tasks:
        invocations.append((EmbeddingRequest, pooling.embeddings))
    app.include_router(tokenize.router)
    app.include_router(admin.router)
    app.state.invocations = invocations
    return app
