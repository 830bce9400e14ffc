"""Shared request handling for the routes: wire prompts -> token ids (off the event loop), usage, state lookup."""

from __future__ import annotations

import time
from typing import Any, Protocol

import pydantic_core
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from winnow.errors import InvalidInputError
from winnow.inputs.prompts import Prompt, TokenizedPrompt, TruncationOptions, parse_truncation
from winnow.inputs.scoring import template_kwargs_of
from winnow.server.protocol import BaseRequest, PromptInput, PromptRequest
from winnow.server.state import ServerState


class FastJSONResponse(JSONResponse):
    """JSON rendered by pydantic-core (Rust): 0.4 ms instead of 4.9 ms (``json.dumps``) for 16
    embeddings of 384 floats. The event loop holds the GIL while it renders, and the engine threads
    need the GIL between operators, so rendering time is taken from the forward passes too."""

    def render(self, content: Any) -> bytes:
        return pydantic_core.to_json(content)


def get_state(http: HTTPRequest) -> ServerState:
    state: ServerState = http.app.state.winnow
    return state


class ChatOptions(Protocol):
    """What ``render_chat`` reads of a request: the chat form of /classify and /pooling, and /tokenize's."""

    chat_template: str | None
    chat_template_kwargs: dict[str, Any] | None
    add_generation_prompt: bool
    continue_final_message: bool


def truncation_of(state: ServerState, body: BaseRequest, *, add_special_tokens: bool) -> TruncationOptions:
    return parse_truncation(
        {
            "truncate_prompt_tokens": body.truncate_prompt_tokens,
            "truncation_side": body.truncation_side,
            "add_special_tokens": add_special_tokens,
        },
        max_model_len=state.model_config.max_model_len,
    )


def prompts_of(value: PromptInput) -> list[Prompt]:
    """``input``: one text, a list of texts, one token-id list, or a list of token-id lists."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidInputError("You must pass at least one prompt", param="input")
    if all(isinstance(v, int) for v in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


def render_chat(state: ServerState, body: ChatOptions, messages: list[dict[str, Any]]) -> str:
    """Render a conversation with the request's, the server's or the tokenizer's chat template."""
    template = body.chat_template
    if template is not None and not state.settings.trust_request_chat_template:
        raise InvalidInputError(
            "chat_template in a request is refused unless the server runs with --trust-request-chat-template.",
            param="chat_template",
        )
    tokenizer = state.inputs.tokenizers.hf_tokenizer
    template = template or state.config.chat_template or getattr(tokenizer, "chat_template", None)
    if template is None:
        raise InvalidInputError(
            "This model has no chat template; send `input` instead of `messages`, or start the server with "
            "--chat-template.",
            param="messages",
        )
    kwargs = template_kwargs_of(body.chat_template_kwargs)
    try:
        text = tokenizer.apply_chat_template(
            [_with_text_content(m, i) for i, m in enumerate(messages)],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
            **kwargs,
        )
    except Exception as e:  # Jinja and template errors come in many types
        raise InvalidInputError(f"The chat template failed to render: {type(e).__name__}: {e}", param="messages") from e
    return str(text)


def _with_text_content(message: dict[str, Any], index: int) -> dict[str, Any]:
    """OpenAI content parts (``[{"type": "text", "text": ...}, ...]``) joined into one string, as
    vLLM's "string" content format does: classifier chat templates print ``content`` as it is, and
    a list would be classified as its Python repr."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return message
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return {**message, "content": "\n".join(p["text"] for p in content)}
    raise InvalidInputError(
        f"messages[{index}].content must be a string or a list of text parts "
        '([{"type": "text", "text": ...}]); this is a text-only model.',
        param="messages",
    )


async def tokenize_body(state: ServerState, body: PromptRequest) -> list[TokenizedPrompt]:
    """The completion form gives one prompt per input; the chat form one prompt per conversation."""
    if body.messages is not None:
        prompts: list[Prompt] = [render_chat(state, body, body.messages)]
        add_special = bool(body.add_special_tokens) if body.add_special_tokens is not None else False
    else:
        assert body.input is not None
        prompts = prompts_of(body.input)
        add_special = body.add_special_tokens if body.add_special_tokens is not None else True
    options = truncation_of(state, body, add_special_tokens=add_special)
    return await state.off_loop(state.inputs.process, prompts, options)


def list_body(rid: str, model: str, data: list[dict[str, Any]], num_tokens: int) -> dict[str, Any]:
    """The ``ListResponse`` envelope shared by /classify, /score and /pooling."""
    return {
        "id": rid,
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": usage(num_tokens),
    }


def usage(num_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": num_tokens,
        "total_tokens": num_tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
