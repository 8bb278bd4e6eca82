import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import nn


def test_matmul_is_plain_matmul_in_float32():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 5, 16)).astype(np.float32), rng.normal(size=(16, 7)).astype(np.float32)
    out = nn.matmul(jnp.asarray(x), jnp.asarray(w))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, jnp.asarray(x) @ jnp.asarray(w))


def test_matmul_accumulates_bf16_in_float32():
    # 1024 products of 1 x (1 + 2^-7): exact in float32 (1032, a bf16 value too); a bf16 running sum
    # would round at every step past 256, where bf16's spacing is 2.
    x = jnp.ones((2, 1024), jnp.bfloat16)
    w = jnp.full((1024, 3), 1 + 2**-7, jnp.bfloat16)
    out = nn.matmul(x, w)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), 1032.0)


def test_dropout_drops_the_rounded_rate_and_keeps_the_mean():
    ctx = nn.Ctx(rng=jax.random.key(0), dropout_rate=0.05)
    x = jnp.ones((1001, 999))  # an odd element count: the last word's second draw goes unused
    y = np.asarray(nn.dropout(ctx, x))
    drop = 3277 / 65536  # 0.05 rounded to a multiple of 2^-16
    dropped = (y == 0).mean()
    assert abs(dropped - drop) < 5 * np.sqrt(drop * (1 - drop) / y.size)
    np.testing.assert_array_equal(np.unique(y), [0.0, np.float32(65536 / (65536 - 3277))])  # survivors rescaled exactly
    assert abs(y.mean() - 1.0) < 5 * np.sqrt(drop / (1 - drop) / y.size)


def test_dropout_masks_follow_the_key():
    x = jnp.ones((64, 33))
    a, b, c = (nn.dropout(nn.Ctx(rng=jax.random.key(k), dropout_rate=0.5), x) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()
    kept = np.asarray(a).reshape(-1) != 0
    assert 0.4 < 1 - kept.mean() < 0.6
    # Elements 2i and 2i+1 come from the two halves of one word: independent halves agree about half the time
    # (a half stuck, or one half used twice, would make them agree always or follow each other).
    assert 0.4 < (kept[0:-1:2] == kept[1::2]).mean() < 0.6
    np.testing.assert_array_equal(nn.dropout(nn.Ctx(dropout_rate=0.5), x), x)  # no key: deterministic
    np.testing.assert_array_equal(nn.dropout(nn.Ctx(rng=jax.random.key(0)), x), x)  # rate 0


def test_dropout_rejects_a_rate_outside_zero_to_one():
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        nn.dropout(nn.Ctx(rng=jax.random.key(0)), jnp.ones(3), rate=1.0)
    with pytest.raises(ValueError, match="rounds to 1"):
        nn.dropout(nn.Ctx(rng=jax.random.key(0)), jnp.ones(3), rate=1 - 2**-18)
