"""Bottleneck adapters: placement (Houlsby vs Pfeiffer), identity at init, effect once trained."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import adapters, tree
from tests.conftest import jpeft_logits


@pytest.mark.parametrize("kind, count", [("houlsby", 2 * 2 + 3 * 3), ("pfeiffer", 2 + 3)])
def test_placement_and_identity(flan, kind, count):
    params = adapters.inject(flan.params, adapters.AdapterConfig(kind=kind, reduction_factor=8), jax.random.key(0))
    downs = [p for p in tree.flatten(params) if p.endswith("adapter/down/kernel")]
    assert len(downs) == count  # encoder 2 blocks x (self, ff); decoder 3 blocks x (self, cross, ff)
    assert all(tree.flatten(params)[p].shape == (32, 4) for p in downs)
    np.testing.assert_array_equal(jpeft_logits(flan, params), jpeft_logits(flan, flan.params))


def test_adapter_output_is_h_plus_bottleneck(flan):
    from jpeft import nn

    params = adapters.inject(flan.params, adapters.AdapterConfig(kind="pfeiffer", reduction_factor=8), jax.random.key(0))
    p = params["encoder"]["block"]["0"]["layer"]["1"]["DenseReluDense"]["adapter"]
    p = {**p, "up": {"kernel": jnp.ones_like(p["up"]["kernel"]), "bias": jnp.full_like(p["up"]["bias"], 0.5)}}
    h = jax.random.normal(jax.random.key(1), (2, 3, 32))
    down = jax.nn.relu(h @ p["down"]["kernel"] + p["down"]["bias"])
    np.testing.assert_allclose(nn.adapter(p, h, nn.Ctx()), h + down @ p["up"]["kernel"] + 0.5, rtol=1e-6, atol=1e-6)


def test_errors(flan):
    with pytest.raises(ValueError, match="unknown adapter kind"):
        adapters.AdapterConfig(kind="lora")
    once = adapters.inject(flan.params, adapters.AdapterConfig(), jax.random.key(0))
    with pytest.raises(ValueError, match="already has an adapter"):
        adapters.inject(once, adapters.AdapterConfig(), jax.random.key(0))
