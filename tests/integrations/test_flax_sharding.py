"""LoRA leaves take their weight's partitioning, so a Linen or NNX model runs unchanged on the 8-device
("data", "fsdp", "model") mesh and gives the one-device loss (worker: flax_sharding_worker.py, 8 simulated CPUs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("flax_sharding") / "result.json"
    proc = subprocess.run([sys.executable, "-m", "tests.integrations.flax_sharding_worker", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_linen_leaves_take_the_weights_partitioning_and_the_mesh_gives_the_same_loss(result):
    r = result["linen"]
    assert result["devices"] == 8
    assert abs(r["mesh"] - r["one"]) <= 1e-6 and r["grad_diff"] <= 1e-6
    specs = r["specs"]  # A: the contracted axes' names; B: the output axes'; the rank whole; the scan axis kept
    assert specs["layers/query/kernel"] == "P(None, 'fsdp', 'model', None)"
    assert specs["layers/query/lora_a"] == "P(None, 'fsdp', None)" and specs["layers/query/lora_b"] == "P(None, None, 'model', None)"
    assert specs["layers/out/lora_a"] == "P(None, 'model', None, None)" and specs["layers/out/lora_b"] == "P(None, None, 'fsdp')"
    assert specs["embed/lora_a"] == "P('model', None)" and specs["embed/lora_b"] == "P(None, 'fsdp')"
    assert r["placed"] == "P(None, 'fsdp', None)"  # and the arrays really are laid out that way


def test_nnx_leaves_take_the_weights_partitioning_and_the_mesh_gives_the_same_loss(result):
    r = result["nnx"]
    assert abs(r["mesh"] - r["one"]) <= 1e-6
    assert r["a_spec"] == "P('fsdp', None)" and r["b_spec"] == "P(None, 'model')" and r["placed"] == "P(None, 'fsdp')"
