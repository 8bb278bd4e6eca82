"""llama.cpp's GGML block formats, dequantized in JAX with the arithmetic of `gguf.quants.dequantize`.

A weight is its GGUF bytes as they are in the file: (out, row_bytes) uint8, each row `in / block` blocks of
`type_size` bytes running along the input dim. Each function maps those rows to the (out, in) float32 weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

QK_K = 256  # values per K-quant super-block


def _f16(b: jax.Array) -> jax.Array:
    """(..., 2) little-endian bytes -> (...,) float16 values as float32."""
    u16 = b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(u16, jnp.float16).astype(jnp.float32)


def _nibbles(qs: jax.Array) -> jax.Array:
    """(..., n) bytes -> (..., 2n): all low nibbles, then all high nibbles (GGML's order within a block)."""
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _blocks(rows: jax.Array, type_size: int) -> jax.Array:
    out, row_bytes = rows.shape
    return rows.reshape(out, row_bytes // type_size, type_size)


def q4_0(rows: jax.Array) -> jax.Array:
    """Q4_0: f16 d, 16 bytes of 4-bit q; w = d * (q - 8)."""
    b = _blocks(rows, 18)
    q = _nibbles(b[..., 2:]).astype(jnp.int8) - 8
    return (_f16(b[..., :2])[..., None] * q.astype(jnp.float32)).reshape(rows.shape[0], -1)


def q4_1(rows: jax.Array) -> jax.Array:
    """Q4_1: f16 d, f16 m, 16 bytes of 4-bit q; w = d * q + m."""
    b = _blocks(rows, 20)
    q = _nibbles(b[..., 4:]).astype(jnp.float32)
    return (_f16(b[..., :2])[..., None] * q + _f16(b[..., 2:4])[..., None]).reshape(rows.shape[0], -1)


def q5_0(rows: jax.Array) -> jax.Array:
    """Q5_0: f16 d, 32 high bits (little-endian uint32), 16 bytes of low nibbles; w = d * (q - 16)."""
    b = _blocks(rows, 22)
    qh = b[..., 2:6].astype(jnp.uint32)
    qh = qh[..., 0] | (qh[..., 1] << 8) | (qh[..., 2] << 16) | (qh[..., 3] << 24)
    high = ((qh[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1).astype(jnp.uint8)
    q = (_nibbles(b[..., 6:]) | (high << 4)).astype(jnp.int8) - 16
    return (_f16(b[..., :2])[..., None] * q.astype(jnp.float32)).reshape(rows.shape[0], -1)


def q8_0(rows: jax.Array) -> jax.Array:
    """Q8_0: f16 d, 32 int8 q; w = q * d."""
    b = _blocks(rows, 34)
    q = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
    return (q * _f16(b[..., :2])[..., None]).reshape(rows.shape[0], -1)


def _k_scales(s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Q4_K's 12 scale bytes -> (8 six-bit scales, 8 six-bit mins) per super-block."""
    d, m, m_d = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def q4_k(rows: jax.Array) -> jax.Array:
    """Q4_K: f16 d, f16 dmin, 12 bytes of scales/mins, 128 bytes of 4-bit q in 8 sub-blocks of 32; w = d*sc*q - dmin*m."""
    b = _blocks(rows, 144)
    sc, mn = _k_scales(b[..., 4:16])
    d = (_f16(b[..., 0:2])[..., None] * sc.astype(jnp.float32))[..., None]  # (out, n, 8, 1)
    dm = (_f16(b[..., 2:4])[..., None] * mn.astype(jnp.float32))[..., None]
    qs = b[..., 16:].reshape(*b.shape[:2], 4, 32)  # each 32 bytes hold sub-blocks 2j (low nibbles) and 2j+1 (high)
    q = jnp.stack([qs & 0xF, qs >> 4], axis=-2).reshape(*b.shape[:2], 8, 32).astype(jnp.float32)
    return (d * q - dm).reshape(rows.shape[0], -1)


def q6_k(rows: jax.Array) -> jax.Array:
    """Q6_K: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, f16 d; w = d * scale * (q - 32)."""
    b = _blocks(rows, 210)
    lead = b.shape[:2]
    ql, qh, scales = b[..., :128], b[..., 128:192], b[..., 192:208]
    d = _f16(b[..., 208:210])[..., None] * jax.lax.bitcast_convert_type(scales, jnp.int8).astype(jnp.float32)  # (out, n, 16)
    low = jnp.stack([ql.reshape(*lead, 2, 64) & 0xF, ql.reshape(*lead, 2, 64) >> 4], axis=-2).reshape(*lead, 8, 32)
    high = (qh.reshape(*lead, 2, 1, 32) >> jnp.array([0, 2, 4, 6], jnp.uint8)[:, None]) & 0x3  # (out, n, 2, 4, 32)
    q = (low | (high.reshape(*lead, 8, 32) << 4)).astype(jnp.int8) - 32
    q = q.reshape(*lead, 16, 16).astype(jnp.float32)
    return (d[..., None] * q).reshape(rows.shape[0], -1)


DEQUANTIZE = {"q4_0": q4_0, "q4_1": q4_1, "q5_0": q5_0, "q8_0": q8_0, "q4_k": q4_k, "q6_k": q6_k}
