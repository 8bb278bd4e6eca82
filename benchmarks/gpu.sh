#!/usr/bin/env bash
# The GPU check in one run (benchmarks/gpu.py): numerics of jpeft's GPU path against its CPU path and against
# transformers + PEFT, then LoRA train steps (SmolLM2-135M and FLAN-T5-small shapes, fp32 and bf16), greedy generation
# and MFU beside PyTorch on the same GPU. Designed for a lent NVIDIA H200 within ~7 minutes: parts run in order of
# importance, a failing part is recorded and skipped, no part starts after --budget-s, and gpu.json / gpu.md are
# rewritten under $OUT after every part (so a run cut short keeps its figures).
#
# Run from the repository root:   bash benchmarks/gpu.sh            (extra arguments go to benchmarks.gpu, e.g.
#                                                                    --parts numerics,smollm2_step --budget-s 300)
# The real sizes (Llama-3.2-1B and Llama-3-8B shapes, bf16 and NF4, beside PEFT) on their own, in one call:
#                                 TIMEOUT=590 bash benchmarks/gpu.sh --parts info,peak,scale
# Quick check on any CPU:         python -m benchmarks.gpu --cpu-smoke --out /tmp/gpu_smoke
#
# Needs python3 with jax (CUDA plugin), flax, optax, numpy, torch (CUDA), transformers, peft, safetensors. jpeft
# imports without gguf, rouge-score, datasets, qwix and bitsandbytes, and this script uses none of them. Should a
# pure-python wheel ever be missing on the device, put it in .whl/ (ignored via .git/info/exclude) beforehand, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 --platform any -d .whl gguf==0.19.0
# and it is installed here into /tmp/site.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
# jax and torch share the GPU: jax takes half of its memory up front instead of 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi unavailable" > "$OUT/nvidia-smi.txt"
# A hard stop short of the device's 10-minute command limit, so the shell still copies the log.
timeout -k 10 "${TIMEOUT:-500}" "$PY" -u -m benchmarks.gpu --out "$OUT" --budget-s 400 "$@" 2>&1 | tee "$OUT/gpu.log"
status=${PIPESTATUS[0]}
echo "benchmarks.gpu exit status $status; figures in $OUT/gpu.json, $OUT/gpu.md, log in $OUT/gpu.log"
exit "$status"
