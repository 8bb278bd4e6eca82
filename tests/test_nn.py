"""Layer primitives: attention in blocks of batch rows is the one-block computation, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import nn


def _grads(q, k, v, mask):
    """Gradients of a weighted sum of attention outputs for q, k, v and (when float) the mask."""
    w = jax.random.normal(jax.random.key(9), q.shape)
    argnums = (0, 1, 2, 3) if mask.dtype != jnp.bool_ else (0, 1, 2)
    loss = lambda q, k, v, m: jnp.sum(nn.attention(q, k, v, m, 0.125, nn.Ctx()) * w)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=argnums))(q, k, v, mask)


@pytest.mark.parametrize("mask_kind", ["bias_shared", "bias_per_row", "bool_per_row"])
def test_attention_in_row_blocks_matches_one_block(monkeypatch, mask_kind):
    B, KV, G, T, S, E = 6, 2, 3, 5, 7, 8
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, KV, G, T, E))
    k, v = jax.random.normal(keys[1], (B, KV, S, E)), jax.random.normal(keys[2], (B, KV, S, E))
    mask = {
        "bias_shared": jax.random.normal(keys[3], (1, KV, G, T, S)),  # T5's position bias, shared by the rows
        "bias_per_row": jax.random.normal(keys[3], (B, 1, 1, T, S)),
        "bool_per_row": jax.random.bernoulli(keys[3], 0.7, (B, 1, 1, T, S)).at[..., 0].set(True),
    }[mask_kind]
    whole = _grads(q, k, v, mask)
    row_bytes = 4 * KV * G * T * S
    monkeypatch.setattr(nn, "_BLOCK_BYTES", 2 * row_bytes)  # blocks of 2 rows: 3 blocks
    assert nn._rows_per_block(B, row_bytes) == 2
    blocked = _grads(q, k, v, mask)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(blocked)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_rows_per_block_is_a_divisor_that_fits():
    block = nn._BLOCK_BYTES
    assert nn._rows_per_block(8, block // 3) == 2  # 3 would fit but does not divide 8
    assert nn._rows_per_block(8, block * 4) == 1  # a row larger than a block still runs, alone
    assert nn._rows_per_block(8, 1) == 8
