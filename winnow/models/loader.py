"""Build a native model on the meta device and fill it with checkpoint tensors, strictly by name.

A checkpoint tensor either lands in exactly one parameter, is fused into one (``packed_modules``),
or is on the model's short list of known-unused weights (``ignored_weights`` prefixes,
``ignored_suffixes`` endings). Anything else,
and any parameter left without a tensor, is a ``ModelLoadError`` naming the keys.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from winnow.errors import ModelLoadError
from winnow.models.base import ModelBase, TokenScoreHead

logger = logging.getLogger(__name__)

# Non-persistent buffers that old checkpoints saved anyway; they carry no learned values.
_BUFFER_SUFFIXES = ("position_ids", "token_type_ids")
_MAX_LISTED = 8


def iter_checkpoint(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from safetensors or PyTorch .bin files; corrupt files raise ModelLoadError."""
    for path in files:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                # NOTE: safetensors loads straight to the GPU when asked; CPU tensors are mmapped.
                with safe_open(str(path), framework="pt", device=str(device)) as f:
                    for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                        yield name, f.get_tensor(name)
            else:
                # mmap needs the zip container (torch >= 1.6); older .bin files are read whole.
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
                yield from state.items()
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"Could not read weights from {path}: {type(e).__name__}: {e}") from e


def _fused(name: str, packed: Mapping[str, tuple[str, int]]) -> tuple[str, int | None]:
    """The parameter a checkpoint name lands in after fusing, and its shard index there
    (``...query.weight`` -> ``(...qkv_proj.weight, 0)``); an unfused name comes back with None."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in packed:
        fused, index = packed[parts[-2]]
        return ".".join([*parts[:-2], fused, parts[-1]]), index
    return name, None


def checkpoint_names(files: list[Path]) -> set[str]:
    """Tensor names of a checkpoint without reading the tensors (safetensors headers; .bin files are read)."""
    names: set[str] = set()
    for path in files:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    names.update(_canonical_name(n) for n in f.keys())  # noqa: SIM118 - not a mapping
            except Exception as e:
                raise ModelLoadError(f"Could not read weights from {path}: {type(e).__name__}: {e}") from e
        else:
            names.update(_canonical_name(n) for n, _ in iter_checkpoint([path], torch.device("cpu")))
    return names


def _canonical_name(name: str) -> str:
    # Very old TF-converted checkpoints name LayerNorm parameters gamma/beta (transformers renames too).
    if name.endswith(".gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[: -len("beta")] + "bias"
    return name


def load_weights(
    model_class: type[ModelBase],
    hf_config: Any,
    files: list[Path],
    *,
    dtype: torch.dtype,
    head_dtype: torch.dtype,
    device: torch.device,
    token_score_head: TokenScoreHead | None = None,
) -> ModelBase:
    """Instantiate ``model_class(hf_config)`` and load ``files`` into it, strictly.

    With ``token_score_head``, the classifier ``score.weight`` is built from LM-head rows of the
    checkpoint (the causal LM's ``lm_head``, or its tied input embedding) and the LM head is dropped.
    """
    # Some choices depend on what the checkpoint holds (an optional bias): the class may look first.
    init_kwargs = model_class.init_kwargs(hf_config, checkpoint_names(files))
    with torch.device("meta"):
        model = model_class(hf_config, **init_kwargs)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    packed, ignored = model_class.packed_modules, model_class.ignored_weights
    ignored_suffixes, head_prefixes = model_class.ignored_suffixes, model_class.head_prefixes
    # Bare encoders (BertModel...) are saved with and without their base prefix ("bert.").
    prefix = model_class.base_model_prefix

    lm_head_names = model_class.lm_head_names if token_score_head else ()
    if not getattr(hf_config, "tie_word_embeddings", False):
        lm_head_names = lm_head_names[:1]  # untied: only the LM head itself holds the output rows
    # Classifiers accept names relative to their body too ("h.0..." for "transformer.h.0..."), as a
    # causal LM saved as its bare base model has them.
    body_prefix = model_class.body_prefix

    state: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[int, torch.Tensor]] = {}
    lm_heads: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for raw_name, tensor in iter_checkpoint(files, device):
        name = _canonical_name(raw_name)
        if name.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES:
            continue
        if prefix and name.startswith(prefix + "."):
            name = name[len(prefix) + 1 :]
        if body_prefix and _fused(f"{body_prefix}.{name}", packed)[0] in expected:
            name = f"{body_prefix}.{name}"
        if name in lm_head_names:
            lm_heads[name] = tensor
            if name not in expected:  # the LM head itself is not kept; a tied embedding is
                continue
        if name.startswith(ignored) or (ignored_suffixes and name.endswith(ignored_suffixes)):
            continue
        fused_name, index = _fused(name, packed)
        if index is not None:
            shards.setdefault(fused_name, {})[index] = tensor
        elif name in expected:
            state[name] = tensor
        else:
            unexpected.append(raw_name)

    # fused module -> {shard index: checkpoint module name}, e.g. qkv_proj -> {0: query, 1: key, 2: value}
    parts_of: dict[str, dict[int, str]] = {}
    for hf_name, (fused, index) in packed.items():
        parts_of.setdefault(fused, {})[index] = hf_name
    missing: list[str] = []
    for fused_name, parts_by_index in shards.items():
        *module, fused, leaf = fused_name.split(".")
        needed = parts_of[fused]
        if fused_name not in expected:
            unexpected.extend(".".join([*module, needed[i], leaf]) for i in parts_by_index)
        elif set(parts_by_index) != set(needed):
            missing.extend(".".join([*module, needed[i], leaf]) for i in sorted(set(needed) - set(parts_by_index)))
        else:
            state[fused_name] = torch.cat([parts_by_index[i] for i in sorted(needed)], dim=0)

    if token_score_head is not None:
        source = next((n for n in lm_head_names if n in lm_heads), None)
        if source is None:
            raise ModelLoadError(
                f"classifier_from_token needs the LM head, but the checkpoint has none of {list(lm_head_names)}."
            )
        state["score.weight"] = token_score_head.weight(lm_heads[source])

    for name in sorted(set(expected) - set(state)):
        *module, fused, leaf = name.split(".")
        if fused in parts_of and name not in shards:  # no shard of this fused module arrived at all
            missing.extend(".".join([*module, hf, leaf]) for hf in parts_of[fused].values())
        elif name not in shards:
            missing.append(name)
    missing.sort()
    if missing or unexpected:
        raise ModelLoadError(
            f"The checkpoint does not match {model_class.__name__}: "
            f"missing weights {_listed(missing)}; unexpected weights {_listed(sorted(unexpected))}."
            + _missing_head_advice(missing, head_prefixes, loaded=state)
        )
    wrong_shape = [
        f"{n}: checkpoint {tuple(t.shape)} vs model {expected[n]}"
        for n, t in state.items()
        if tuple(t.shape) != expected[n]
    ]
    if wrong_shape:
        raise ModelLoadError(f"Weight shapes do not match the config: {_listed(wrong_shape)}.")

    for name, tensor in state.items():
        target = head_dtype if name.startswith(head_prefixes) else dtype
        state[name] = tensor.to(device=device, dtype=target if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.process_weights_after_loading()
    return model


def _missing_head_advice(missing: list[str], head_prefixes: tuple[str, ...], *, loaded: Mapping[str, object]) -> str:
    """What to do when the checkpoint holds no classifier head at all: it is a bare encoder or a
    causal LM (``--convert classify`` on a model trained for something else)."""
    if not missing or not head_prefixes or not all(name.startswith(head_prefixes) for name in missing):
        return ""
    if any(name.startswith(head_prefixes) for name in loaded):  # part of a head: a damaged checkpoint
        return ""
    return (
        " The checkpoint has no trained classification head: serve it as an embedder (convert='embed'), "
        "or, for an LLM reranker, build the head from LM-head rows (hf_overrides "
        '{"architectures": [...ForSequenceClassification], "classifier_from_token": [...], "method": ...}).'
    )


def _listed(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"
