import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import nn
from jpeft.models import attention


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


def _visibility(B, past, T, segments=None, window=None, left_pad=0):
    """A Visibility over past + T slots: `past` prefix slots, then `left_pad` padding slots in row 1, then tokens."""
    real = np.ones((B, past + T), bool)
    real[1, past:past + left_pad] = False
    pos = np.where(real, np.cumsum(real, axis=1) - 1, 0)
    seg = None if segments is None else jnp.asarray(np.broadcast_to(segments, (B, T)), jnp.int32)
    if seg is not None:
        real[:, past:] &= np.asarray(seg) > 0
        pos = np.where(real, np.cumsum(real, axis=1) - 1, 0)
    return attention.Visibility(jnp.asarray(real), jnp.asarray(pos, jnp.int32), seg, None if window is None else jnp.int32(window))


FLASH_CASES = {  # B=2, T=37 queries (ragged against blocks of 8): packing, padding, windows, prefix keys, GQA, softcap
    "packed_padded": dict(KV=2, G=3, past=0, segments=np.repeat([1, 2, 3, 0], [10, 15, 9, 3])),
    "packed_window": dict(KV=1, G=4, past=0, segments=np.repeat([1, 2, 0], [20, 14, 3]), window=6),
    "prefix_left_padded_window": dict(KV=2, G=1, past=5, left_pad=4, window=9),
    "softcap": dict(KV=2, G=2, past=0, left_pad=3, softcap=2.0),
}


@pytest.mark.parametrize("case", sorted(FLASH_CASES))
def test_flash_attention_equals_dense_attention_and_its_gradients(case):
    spec = dict(FLASH_CASES[case])
    KV, G, past, softcap = spec.pop("KV"), spec.pop("G"), spec.pop("past"), spec.pop("softcap", None)
    B, T, E = 2, 37, 8
    visible = _visibility(B, past, T, **spec)
    ks = jax.random.split(jax.random.key(0), 4)
    q, w = jax.random.normal(ks[0], (B, KV, G, T, E)), jax.random.normal(ks[3], (B, KV, G, T, E))
    k, v = jax.random.normal(ks[1], (B, KV, past + T, E)), jax.random.normal(ks[2], (B, KV, past + T, E))
    mask = visible.mask(T)
    # Rows that see no key (padding) are 0 blockwise and an average of every value densely: neither reaches a loss.
    w = w * mask.any(axis=-1)[..., None]
    dense = lambda q, k, v: jnp.sum(attention.attention(q, k, v, mask, 0.3, nn.Ctx(), softcap) * w)  # noqa: E731
    flash = lambda q, k, v: jnp.sum(attention.flash_attention(q, k, v, visible, 0.3, softcap, 8, 8) * w)  # noqa: E731
    (expected, expected_grads), (value, grads) = (jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v) for f in (dense, flash))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    for a, b in zip(grads, expected_grads):
        np.testing.assert_allclose(a, b, atol=1e-5)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), (q, k, v))  # bf16 products, float32 softmax
    np.testing.assert_allclose(float(flash(*half)), float(expected), rtol=2e-2)


def test_flash_attention_memory_grows_linearly_with_length():
    # The gradient's XLA temporaries at 2048 and 4096 keys: a (T, S) float32 residual alone would take 64 MB at 4096.
    def temp_bytes(T):
        q = jax.ShapeDtypeStruct((1, 1, 2, T, 16), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, 1, T, 16), jnp.float32)
        visible = attention.Visibility(jnp.ones((1, T), bool), jnp.arange(T, dtype=jnp.int32)[None], jnp.ones((1, T), jnp.int32))
        grad = jax.grad(lambda q, k, v: jnp.sum(attention.flash_attention(q, k, v, visible, 0.25)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2048), temp_bytes(4096)
    assert large < 4096**2 * 4 / 8
    assert large / small < 2.6
