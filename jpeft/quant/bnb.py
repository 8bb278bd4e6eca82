"""bitsandbytes' NF4 (QLoRA) and row-wise int8, bit for bit: jitted quantizers and dequantizers.

NF4 (`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")`): the PyTorch-layout (out, in)
weight, flattened row-major, in blocks of 64 values; each block is scaled by the reciprocal of its absmax and
each value takes the index of the NF4 level nearest to it (ties to the lower level); two indices per byte, the
first in the high nibble. Double quantization (`compress_statistics=True`) subtracts the mean absmax and stores
the rest as 8-bit codes of bitsandbytes' dynamic map in blocks of 256, each with its own float32 absmax.
int8 is bitsandbytes' `int8_vectorwise_quant`: per output row, round(w * 127 / absmax).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64  # NF4 values per absmax
ABSMAX_BLOCK = 256  # double quantization: absmax values per second-level absmax

# bitsandbytes' `get_4bit_type("nf4")`: the 16 quantiles of N(0, 1) normalised to [-1, 1], with an exact 0.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635, -0.18477343022823334,
    -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
_NF4_BOUNDS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / np.float32(2)

# bitsandbytes' `create_dynamic_map()` (signed, 8 bits) as little-endian float32, verbatim: it is built with
# torch.linspace, whose float32 rounding NumPy does not reproduce, and codes are only portable with the same map.
DYNAMIC_MAP = np.frombuffer(bytes.fromhex(
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf9a9956bf000053bf66664fbf"
    "cdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf00002fbf66662bbfcdcc27bf343324bf9a9920bf00001dbf"
    "666619bfcdcc15bf343312bf9a990ebf00000bbf666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be"
    "0000cebeccccc6be9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbecdcc60be"
    "666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd6766bebdd7a3b8bd48e1b2bdb81eadbd"
    "2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bd"
    "a3702dbd85eb21bd676616bd48e10abd52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc180416bc"
    "cdcc0cbc819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbbfca9f1ba9defa7ba"
    "ff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8b3ef8ab8348037b80642b2b7ff0502b7941a5ab6"
    "b7a313b500000000b7a31335941a5a36ff0502370642b23734803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a"
    "806a3c3a3ee8593aff65773a9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b"
    "6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c15aee73c52b8fe3c48e10a3d"
    "6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d"
    "0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23dd7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e"
    "9a99353e0000443e6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e6666b83e"
    "9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003fcccc033f6666073f00000b3f9a990e3f"
    "3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f"
    "9a99443f3333483fcdcc4b3f66664f3f0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f"
    "0000773f9a997a3f33337e3f0000803f"), "<f4")


# ----------------------------------------------------------------------------------------------
# Quantizers (jitted: a streaming load quantizes each weight as it is read, on the device it will live on)


def _reciprocal(absmax: jax.Array, numerator: float = 1) -> jax.Array:
    """numerator / absmax, and 0 for an all-zero block (whose values then scale to 0, as bitsandbytes' do). XLA flushes
    subnormals to zero, so bitsandbytes' guard max(absmax, 1e-38) would divide by zero here."""
    return jnp.where(absmax > 0, jnp.float32(numerator) / absmax, jnp.float32(0))


@jax.jit
def quantize_nf4(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(out, in) float weight -> (codes (out, in/2) uint8, absmax (out, in/64) float32); in must be a multiple of 64."""
    out, d_in = w.shape
    if d_in % BLOCK:
        raise ValueError(f"NF4 needs an input dim that is a multiple of {BLOCK}, got {d_in}")
    blocks = jnp.asarray(w, jnp.float32).reshape(-1, BLOCK)
    absmax = jnp.abs(blocks).max(axis=-1)
    scaled = jnp.clip(blocks * _reciprocal(absmax)[:, None], -1, 1)
    # torch.bucketize(right=False); comparing with all 15 bounds is the fastest of jnp's methods here.
    idx = jnp.searchsorted(jnp.asarray(_NF4_BOUNDS), scaled, side="left", method="compare_all").astype(jnp.uint8).reshape(-1, 2)
    packed = (idx[:, 0] << 4) | idx[:, 1]
    return packed.reshape(out, d_in // 2), absmax.reshape(out, d_in // BLOCK)


# Double quantization stays in NumPy on the host: a float64 mean over 1/64 of the weight's values.
def quantize_absmax(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Double quantization of NF4 absmax (any shape): (codes uint8 of its shape, scale (ceil(n/256),), offset ())."""
    flat = np.asarray(absmax, np.float32).reshape(-1)
    offset = np.float32(flat.astype(np.float64).mean())
    shifted = flat - offset
    n = shifted.size
    padded = np.pad(shifted, (0, -n % ABSMAX_BLOCK)).reshape(-1, ABSMAX_BLOCK)
    scale = np.abs(padded).max(axis=-1)
    normed = (padded / scale[:, None]).reshape(-1)[:n]
    # bitsandbytes' CPU kernel: the nearest map value, ties to the lower one.
    left = np.clip(np.searchsorted(DYNAMIC_MAP, normed, side="right") - 1, 0, DYNAMIC_MAP.size - 2)
    right_closer = np.abs(normed - DYNAMIC_MAP[left + 1]) < np.abs(normed - DYNAMIC_MAP[left])
    codes = (left + right_closer).astype(np.uint8)
    return codes.reshape(np.shape(absmax)), scale.astype(np.float32), offset


@jax.jit
def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(out, in) float weight -> (codes (out, in) int8, absmax (out,) float32): round(w * 127 / absmax) per row."""
    w = jnp.asarray(w, jnp.float32)
    absmax = jnp.abs(w).max(axis=-1)
    codes = jnp.round(w * _reciprocal(absmax, 127)[:, None])
    return codes.astype(jnp.int8), absmax


# ----------------------------------------------------------------------------------------------
# Dequantizers (JAX, traced into the matmul that uses the weight)


def dequantize_absmax(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """Double-quantized absmax back to float32, in the codes' shape."""
    flat = jnp.asarray(DYNAMIC_MAP)[codes.reshape(-1)]
    n = flat.size
    flat = jnp.pad(flat, (0, -n % ABSMAX_BLOCK)).reshape(-1, ABSMAX_BLOCK) * scale[:, None]
    return (flat.reshape(-1)[:n] + offset).reshape(codes.shape)


def dequantize_nf4(codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """codes (out, in/2) uint8 and absmax (out, in/64) -> the (out, in) float32 weight."""
    out, half = codes.shape
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(out, half // (BLOCK // 2), BLOCK)
    return (jnp.asarray(NF4_LEVELS)[idx] * absmax[..., None]).reshape(out, 2 * half)


def dequantize_int8(codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """codes (out, in) int8 and absmax (out,) -> the (out, in) float32 weight (w = q * absmax / 127)."""
    return codes.astype(jnp.float32) * (absmax / 127.0)[:, None]
