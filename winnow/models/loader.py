"""Build a native model on the meta device and fill it with checkpoint tensors, strictly by name.

A checkpoint tensor either lands in exactly one parameter, is fused into one (``packed_modules``),
or is on the model's short list of known-unused weights (``ignored_weights``). Anything else,
and any parameter left without a tensor, is a ``ModelLoadError`` naming the keys.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from winnow.errors import ModelLoadError

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


def _canonical_name(name: str) -> str:
    # Very old TF-converted checkpoints name LayerNorm parameters gamma/beta (transformers renames too).
    if name.endswith(".gamma"):
        return name[: -len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[: -len("beta")] + "bias"
    return name


def load_weights(
    model_class: type[nn.Module],
    hf_config: Any,
    files: list[Path],
    *,
    dtype: torch.dtype,
    head_dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """Instantiate ``model_class(hf_config)`` and load ``files`` into it, strictly."""
    with torch.device("meta"):
        model = model_class(hf_config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    packed: dict[str, tuple[str, int]] = getattr(model_class, "packed_modules", {})
    ignored: tuple[str, ...] = getattr(model_class, "ignored_weights", ())
    head_prefixes: tuple[str, ...] = getattr(model_class, "head_prefixes", ())
    # Bare encoders (BertModel...) are saved with and without their base prefix ("bert.").
    prefix = getattr(model_class, "base_model_prefix", None)

    state: dict[str, torch.Tensor] = {}
    shards: dict[str, dict[int, torch.Tensor]] = {}
    unexpected: list[str] = []
    for raw_name, tensor in iter_checkpoint(files, device):
        name = _canonical_name(raw_name)
        if name.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES:
            continue
        if prefix and name.startswith(prefix + "."):
            name = name[len(prefix) + 1 :]
        if name.startswith(ignored):
            continue
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in packed:
            fused, index = packed[parts[-2]]
            fused_name = ".".join([*parts[:-2], fused, parts[-1]])
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
    return model.eval().requires_grad_(False)


def _listed(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"
