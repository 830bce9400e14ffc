"""POST /pooling (any task the model serves), and for embedding models POST /v1/embeddings (OpenAI
shape) and POST /v2/embed (Cohere Embed v2)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import Response

from winnow.errors import InvalidInputError, UnsupportedTaskError
from winnow.inputs.prompts import parse_truncation
from winnow.params import PoolingParams, check_task
from winnow.server.json_body import JSONRoute
from winnow.server.protocol import (
    CohereEmbedRequest,
    CohereEmbedResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    PoolingRequest,
    PoolingResponse,
)
from winnow.server.serving import FastJSONResponse, get_state, list_body, prompts_of, tokenize_body, truncation_of

router = APIRouter(tags=["pooling"], route_class=JSONRoute)
embeddings_router = APIRouter(tags=["embeddings"], route_class=JSONRoute)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


@router.post("/pooling", response_model=PoolingResponse)
async def pooling(body: PoolingRequest, http: HTTPRequest) -> Response:
    """Raw pooled outputs of the active task: classify ``[num_labels]``, token tasks ``[num_tokens][k]``."""
    state = get_state(http)
    state.check_model(body.model)
    if body.dimensions is not None:
        raise InvalidInputError("dimensions is currently not supported", param="dimensions")
    config = state.model_config
    task = check_task(body.task) if body.task is not None else config.task
    if task not in config.supported_tasks:  # vLLM's online wording, before check_task's offline advice
        raise UnsupportedTaskError(
            f"Unsupported task: {task!r} Supported tasks: {config.supported_tasks}", param="task"
        )
    config.require_task(task)
    params = config.bind_params(PoolingParams(use_activation=body.use_activation_value()), task)
    async with state.admission():
        prompts = await tokenize_body(state, body)
        outputs = await state.run(http, prompts, [params] * len(prompts))
    rid, created, model = (
        state.response_id("pooling", http, body.request_id),
        int(time.time()),
        body.model or state.served_name,
    )
    num_tokens = sum(len(p.token_ids) for p in prompts)

    def answer() -> Response:
        if body.encoding_format in ("bytes", "bytes_only"):
            return _bytes_response(outputs, body, rid, created, model, num_tokens)
        data = [
            {
                "index": i,
                "object": "pooling",
                "data": _b64(out, body.embed_dtype, body.endianness)
                if body.encoding_format == "base64"
                else out.tolist(),
            }
            for i, out in enumerate(outputs)
        ]
        return FastJSONResponse(list_body(rid, model, data, num_tokens))

    return await state.off_loop_if_large(len(outputs), answer)


@embeddings_router.post("/v1/embeddings", response_model=EmbeddingResponse)
async def embeddings(body: EmbeddingRequest, http: HTTPRequest) -> FastJSONResponse:
    """OpenAI-compatible embeddings (L2-normalised unless use_activation is false)."""
    state = get_state(http)
    state.check_model(body.model)
    config = state.model_config
    config.require_task("embed")
    params = config.bind_params(
        PoolingParams(use_activation=body.use_activation_value(), dimensions=body.dimensions), "embed"
    )
    async with state.admission():
        options = truncation_of(state, body, add_special_tokens=body.add_special_tokens)
        prompts = await state.off_loop(state.inputs.process, prompts_of(body.input), options)
        outputs = await state.run(http, prompts, [params] * len(prompts))
    num_tokens = sum(len(p.token_ids) for p in prompts)
    rid, model = state.response_id("embd", http, body.request_id), body.model or state.served_name

    def answer() -> FastJSONResponse:
        data = [
            {
                "index": i,
                "object": "embedding",
                "embedding": _b64(out, "float32", "little") if body.encoding_format == "base64" else out.tolist(),
            }
            for i, out in enumerate(outputs)
        ]
        return FastJSONResponse(
            {
                "id": rid,
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens},
            }
        )

    return await state.off_loop_if_large(len(outputs), answer)


@embeddings_router.post("/v2/embed", response_model=CohereEmbedResponse)
async def cohere_embed(body: CohereEmbedRequest, http: HTTPRequest) -> FastJSONResponse:
    """Cohere's Embed v2: ``texts`` in, ``embeddings`` by type out (float, base64, binary, ubinary)."""
    state = get_state(http)
    state.check_model(body.model)
    config = state.model_config
    config.require_task("embed")
    calibrated = sorted({"int8", "uint8"} & set(body.embedding_types))
    if calibrated:
        raise InvalidInputError(
            f"embedding_types {calibrated} need per-dimension calibration ranges, which a served model does "
            "not have; ask for float, base64, binary or ubinary.",
            param="embedding_types",
        )
    params = config.bind_params(PoolingParams(dimensions=body.output_dimension), "embed")
    # truncate END / START: cut the end / the start to fit (max_tokens, else max_model_len); NONE: refuse.
    options = parse_truncation(
        {
            "truncate_prompt_tokens": None if body.truncate == "NONE" else (body.max_tokens or -1),
            "truncation_side": "left" if body.truncate == "START" else "right",
        },
        max_model_len=config.max_model_len,
    )
    async with state.admission():
        prompts = await state.off_loop(state.inputs.process, list(body.texts), options)
        outputs = await state.run(http, prompts, [params] * len(prompts))
    rid = state.response_id("embd", http, body.request_id)

    def answer() -> FastJSONResponse:
        return FastJSONResponse(
            {
                "id": rid,
                "embeddings": {kind: _cohere_embeddings(outputs, kind) for kind in dict.fromkeys(body.embedding_types)},
                "texts": body.texts,
                "meta": {
                    "api_version": {"version": "2"},
                    "billed_units": {"input_tokens": sum(len(p.token_ids) for p in prompts)},
                },
                "response_type": "embeddings_by_type",
            }
        )

    return await state.off_loop_if_large(len(outputs), answer)


def _cohere_embeddings(outputs: list[torch.Tensor], kind: str) -> list[Any]:
    """One embedding type for every text. binary / ubinary: one bit per dimension (positive = 1),
    packed 8 to a byte, as signed (value - 128) or unsigned ints: sentence-transformers'
    ``quantize_embeddings`` and Cohere's encoding."""
    if kind == "float":
        return [out.tolist() for out in outputs]
    if kind == "base64":
        return [_b64(out, "float32", "little") for out in outputs]
    bits = np.packbits(torch.stack(outputs).float().numpy() > 0, axis=-1)  # [num_texts, ceil(dim / 8)] uint8
    return (bits.astype(np.int16) - 128).tolist() if kind == "binary" else bits.tolist()


def _raw_bytes(tensor: torch.Tensor, embed_dtype: str, endianness: str) -> bytes:
    """The tensor cast to ``embed_dtype``, as bytes in the requested byte order."""
    array = tensor.to(_DTYPES[embed_dtype]).contiguous().view(torch.uint8).numpy()
    itemsize = torch.tensor([], dtype=_DTYPES[embed_dtype]).element_size()
    if endianness == "big" and itemsize > 1:  # torch tensors are little-endian on every supported host
        array = array.reshape(-1, itemsize)[:, ::-1]
    return bytes(array.tobytes())


def _b64(tensor: torch.Tensor, embed_dtype: str, endianness: str) -> str:
    return base64.b64encode(_raw_bytes(tensor, embed_dtype, endianness)).decode("ascii")


def _bytes_response(
    outputs: list[torch.Tensor], body: PoolingRequest, rid: str, created: int, model: str, num_tokens: int
) -> Response:
    chunks, items, offset = [], [], 0
    for i, out in enumerate(outputs):
        raw = _raw_bytes(out, body.embed_dtype, body.endianness)
        chunks.append(raw)
        items.append(
            {
                "index": i,
                "embed_dtype": body.embed_dtype,
                "endianness": body.endianness,
                "start": offset,
                "end": offset + len(raw),
                "shape": list(out.shape),
            }
        )
        offset += len(raw)
    headers: dict[str, Any] = {}
    if body.encoding_format == "bytes":
        meta = {"id": rid, "created": created, "model": model, "data": items}
        meta["usage"] = {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
        headers["metadata"] = json.dumps(meta)
    return Response(b"".join(chunks), media_type="application/octet-stream", headers=headers)
