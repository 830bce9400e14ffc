"""The public surface is deliberate: everything in __all__ exists and nothing else is exported by accident."""

import winnow
from tests.tiny_models import PROMPTS

SUBMODULES = {"cli", "config", "engine", "errors", "inputs", "layers", "llm", "models", "outputs", "params", "runner"}


def test_exported_members():
    public = {name for name in dir(winnow) if not name.startswith("_")}
    # `server` appears once something imports winnow.server; it is a subpackage, not an export.
    assert public - SUBMODULES - {"server"} == set(winnow.__all__) - {"__version__"}


def test_errors_are_value_errors_where_users_cause_them():
    for cls in (winnow.InvalidInputError, winnow.ConfigError, winnow.ModelLoadError, winnow.PromptTooLongError):
        assert issubclass(cls, ValueError)


def test_the_cli_sets_thread_defaults_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY and GOMP_SPINCOUNT once, when torch loads: importing the CLI must
    not load torch, and `winnow serve` must have set them by the time torch is imported."""
    import os
    import subprocess
    import sys

    code = (
        "import os, sys, winnow.cli\n"
        "assert 'torch' not in sys.modules, 'import winnow.cli loaded torch'\n"
        "winnow.cli.serve = lambda args, dotted: print(\n"
        "    os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules) or 0\n"
        "raise SystemExit(winnow.cli.main(['serve', 'some-model']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["PASSIVE", "20000", "False"]


def test_results_are_instances_of_the_exported_output_classes(make_model, make_llm):
    """vLLM code checks result types and converts with ``from_base``; both work on winnow's results."""
    classifier = make_llm(make_model("bert", "seq", num_labels=3))
    [classified] = classifier.classify(PROMPTS[0], use_tqdm=False)
    assert isinstance(classified, winnow.ClassificationRequestOutput)
    assert isinstance(classified, winnow.PoolingRequestOutput)
    [encoded] = classifier.encode(PROMPTS[0], pooling_task="classify", use_tqdm=False)
    assert winnow.ClassificationRequestOutput.from_base(encoded).outputs.probs == classified.outputs.probs

    cross_encoder = make_llm(make_model("bert", "seq", num_labels=1))
    [scored] = cross_encoder.score(PROMPTS[0], PROMPTS[1], use_tqdm=False)
    assert isinstance(scored, winnow.ScoringRequestOutput)
    [encoded] = cross_encoder.encode(PROMPTS[0], pooling_task="classify", use_tqdm=False)
    [probs] = cross_encoder.classify(PROMPTS[0], use_tqdm=False)[0].outputs.probs
    assert winnow.ScoringRequestOutput.from_base(encoded).outputs.score == probs

    embedder = make_llm(make_model("bert", "base", sentence_transformers={"pooling": "mean"}))
    [embedded] = embedder.embed(PROMPTS[0], use_tqdm=False)
    assert isinstance(embedded, winnow.EmbeddingRequestOutput)
    assert isinstance(embedder.score(PROMPTS[0], PROMPTS[1], use_tqdm=False)[0], winnow.ScoringRequestOutput)
