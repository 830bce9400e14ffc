"""POST /classify (and /v1/classify): one label and probability vector per prompt."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HTTPRequest

from winnow.params import PoolingParams
from winnow.server.errors import NotImplementedRouteError
from winnow.server.json_body import JSONRoute
from winnow.server.protocol import ClassifyRequest, ClassifyResponse
from winnow.server.serving import FastJSONResponse, get_state, list_body, tokenize_body

router = APIRouter(tags=["classification"], route_class=JSONRoute)


@router.post("/classify", response_model=ClassifyResponse)
@router.post("/v1/classify", response_model=ClassifyResponse, include_in_schema=False)
async def classify(body: ClassifyRequest, http: HTTPRequest) -> FastJSONResponse:
    """Classify each input (a text, a token-id list, or a batch of either) or one chat conversation."""
    state = get_state(http)
    state.check_model(body.model)
    if state.model_config.task != "classify":
        raise NotImplementedRouteError("The model does not support Classification API")
    params = state.model_config.bind_params(PoolingParams(use_activation=body.use_activation_value()), "classify")
    async with state.admission():
        prompts = await tokenize_body(state, body)
        outputs = await state.run(http, prompts, [params] * len(prompts))
    id2label = state.model_config.id2label
    rid, model = state.response_id("classify", http, body.request_id), body.model or state.served_name

    def answer() -> FastJSONResponse:
        data = []
        for index, output in enumerate(outputs):
            probs = output.tolist()
            # The first largest, as torch.argmax picks; in Python, because a torch op on the event loop
            # took ~70 us under load (its dispatch competes with the engine threads).
            best = max(range(len(probs)), key=probs.__getitem__)
            data.append({"index": index, "label": id2label.get(best), "probs": probs, "num_classes": len(probs)})
        return FastJSONResponse(list_body(rid, model, data, sum(len(p.token_ids) for p in prompts)))

    return await state.off_loop_if_large(len(outputs), answer)
