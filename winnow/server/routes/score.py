"""POST /score and /rerank (also /v1/score, /v1/rerank, /v2/rerank): cross-encoder or embedding similarity.

Registered only for models that can score: 1-label classifiers (cross-encoders) and embedding models.
A request with 10,000 documents is one request per pair inside the engine, batched with everyone
else's under the token budget and reassembled in order.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HTTPRequest

from winnow.inputs.scoring import ScorePlan, parse_score_side, plan_scores
from winnow.params import PoolingParams
from winnow.server.json_body import JSONRoute
from winnow.server.protocol import RerankRequest, RerankResponse, ScoreOptions, ScoreRequest, ScoreResponse
from winnow.server.serving import FastJSONResponse, get_state, list_body, truncation_of
from winnow.server.state import ServerState

router = APIRouter(tags=["scoring"], route_class=JSONRoute)


@router.post("/score", response_model=ScoreResponse)
async def score(body: ScoreRequest, http: HTTPRequest) -> FastJSONResponse:
    """Score (query, document) pairs: 1:1, 1:N or N:N; results in document order."""
    state = get_state(http)
    state.check_model(body.model)
    queries, documents = body.sides()
    scores, plan = await _run_scores(state, http, body, queries, documents)
    rid, model = state.response_id("score", http, body.request_id), body.model or state.served_name

    def answer() -> FastJSONResponse:
        data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
        return FastJSONResponse(list_body(rid, model, data, plan.num_usage_tokens))

    return await state.off_loop_if_large(len(scores), answer)


@router.post("/v1/score", response_model=ScoreResponse, include_in_schema=False)
async def score_v1(body: ScoreRequest, http: HTTPRequest) -> FastJSONResponse:
    get_state(http).warn_once("/v1/score is deprecated; use /score.")
    return await score(body, http)


@router.post("/rerank", response_model=RerankResponse)
@router.post("/v2/rerank", response_model=RerankResponse, include_in_schema=False)
async def rerank(body: RerankRequest, http: HTTPRequest) -> FastJSONResponse:
    """Rank documents by relevance to the query (Jina/Cohere shape), best first, top_n of them."""
    state = get_state(http)
    state.check_model(body.model)
    documents = body.documents if isinstance(body.documents, list) else [body.documents]
    # Legacy {"text": ...} documents are plain text.
    documents = [d["text"] if isinstance(d, Mapping) and isinstance(d.get("text"), str) else d for d in documents]
    scores, plan = await _run_scores(state, http, body, body.query, documents)
    rid, model = state.response_id("score", http, body.request_id), body.model or state.served_name

    def answer() -> FastJSONResponse:
        order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep document order
        if 0 < body.top_n < len(order):
            order = order[: body.top_n]
        results = [
            {
                "index": i,
                "document": _echo(documents[i]) if body.return_documents else None,
                "relevance_score": scores[i],
            }
            for i in order
        ]
        num_tokens = plan.num_usage_tokens
        return FastJSONResponse(
            {
                "id": rid,
                "model": model,
                "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
                "results": results,
            }
        )

    return await state.off_loop_if_large(len(scores), answer)


@router.post("/v1/rerank", response_model=RerankResponse, include_in_schema=False)
async def rerank_v1(body: RerankRequest, http: HTTPRequest) -> FastJSONResponse:
    get_state(http).warn_once("/v1/rerank is kept for compatibility; use /rerank.")
    return await rerank(body, http)


async def _run_scores(
    state: ServerState, http: HTTPRequest, body: ScoreOptions, queries: Any, documents: Any
) -> tuple[list[float], ScorePlan]:
    params = PoolingParams(
        use_activation=body.use_activation_value(),
        extra_kwargs={"max_tokens_per_query": body.max_tokens_per_query, "max_tokens_per_doc": body.max_tokens_per_doc},
    )
    async with state.admission():
        plan = await state.off_loop(
            lambda: plan_scores(
                state.inputs,
                state.model_config,
                parse_score_side(queries, "queries"),
                parse_score_side(documents, "documents"),
                truncation=truncation_of(state, body, add_special_tokens=True),
                params=params,
                default_template=state.config.chat_template,
                template_kwargs=body.template_kwargs(),
                pad_token_id=state.inputs.tokenizers.hf_tokenizer.pad_token_id or 0,
            )
        )
        outputs = await state.run(http, plan.prompts, [plan.params] * len(plan.prompts))
    return plan.scores(outputs), plan


def _echo(document: Any) -> dict[str, Any]:
    if isinstance(document, str):
        return {"text": document, "multi_modal": None}
    return {"text": None, "multi_modal": list(document.get("content", []))}
