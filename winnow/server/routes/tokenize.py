"""POST /tokenize and /detokenize: the model's tokenizer, without running the model."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HTTPRequest

from winnow.errors import InvalidInputError
from winnow.server.json_body import JSONRoute
from winnow.server.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from winnow.server.serving import get_state, render_chat

router = APIRouter(tags=["tokenizer"], route_class=JSONRoute)


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(body: TokenizeRequest, http: HTTPRequest) -> TokenizeResponse:
    state = get_state(http)
    state.check_model(body.model)
    if body.messages is not None:
        text = render_chat(state, body, body.messages)
        add_special = bool(body.add_special_tokens)
    else:
        assert body.prompt is not None
        text = body.prompt
        add_special = body.add_special_tokens if body.add_special_tokens is not None else True
    text = state.inputs.normalize_text(text)
    [encoding] = await state.off_loop(lambda: state.inputs.tokenizers.encode([text], add_special_tokens=add_special))
    return TokenizeResponse(
        count=len(encoding.ids),
        max_model_len=state.model_config.max_model_len,
        tokens=list(encoding.ids),
        token_strs=list(encoding.tokens) if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(body: DetokenizeRequest, http: HTTPRequest) -> DetokenizeResponse:
    state = get_state(http)
    state.check_model(body.model)
    vocab_size = state.inputs.tokenizers.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidInputError(f"Token id {bad} is outside the vocabulary [0, {vocab_size}).", param="tokens")
    text = state.inputs.tokenizers.hf_tokenizer.decode(body.tokens)
    return DetokenizeResponse(prompt=str(text))
