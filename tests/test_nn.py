import jax.numpy as jnp
import numpy as np

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
