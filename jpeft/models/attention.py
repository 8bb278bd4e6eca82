"""Attention kernels shared by the models: masked attention with a hand-written backward for XLA's CPU backend,
causal attention over query blocks, cuDNN / XLA `dot_product_attention` on a GPU, and blockwise flash attention
for long (packed) rows. Which path runs is `jpeft.nn.KERNELS`'s choice, read at trace time."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from jpeft.nn import Ctx, Params, _platform, dropout, gpu_kernels, matmul

CUDNN_ATTENTION: bool = os.environ.get("JPEFT_CUDNN_ATTENTION", "1") != "0"
"""On a CUDA GPU, let `jax.nn.dot_product_attention` use cuDNN's flash attention where it supports the call (False, or
JPEFT_CUDNN_ATTENTION=0: XLA's implementation everywhere)."""

_GPU_DTYPES = (jnp.bfloat16, jnp.float16)  # the dtypes cuDNN's flash attention takes


def attention_bias_from_mask(mask: jax.Array) -> jax.Array:
    """(batch, ..., keys) of 0/1 -> additive float32 bias: 0 where attended, finfo.min where not."""
    return jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, ctx: Ctx, softcap: float | None = None) -> jax.Array:
    """Softmax attention of grouped queries; q (B, KV, G, T, E), k and v (B, KV, S, E) -> (B, KV, G, T, E).

    `mask` broadcasts to the (B, KV, G, T, S) scores: boolean visibility, or a float additive bias
    (T5's position bias), which receives its gradient. Scores and values are batched matmuls over
    (B, KV) with the G query heads of a key/value head stacked as rows, so GQA never copies K or V.
    Softmax runs in float32; the probabilities are cast back to q's dtype for the value product.
    `softcap` (Gemma 2) squashes the scaled scores to softcap * tanh(scores / softcap) before the mask;
    its gradient comes from autodiff rather than the hand-written backward pass. On the GPU path (`KERNELS`) a call
    without softcap or attention dropout goes through `jax.nn.dot_product_attention` (`dot_product_attention`).
    """
    if _plain(ctx, softcap):
        return dot_product_attention(q, k, v, mask, scale) if gpu_kernels() else _attention(q, k, v, mask, scale)
    return _values(dropout(ctx, _attention_probs(q, k, mask, scale, softcap)), v, q.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array | Visibility, scale: float, ctx: Ctx, chunk: int = 128,
                     softcap: float | None = None, block: int | None = None) -> jax.Array:
    """`attention` for T queries at the last T of S key positions under a causal `visible` (no key after its query);
    the S - T keys before them (a prefix, see `prefixed`) are visible to every query.

    `visible` is a boolean mask or a `Visibility`; with the latter, rows of `FLASH_MIN_LEN` queries or more run
    `flash_attention` on the CPU path (unless attention dropout is on) in blocks of `block` (default `FLASH_BLOCK`),
    which never forms the (T, S) mask or scores.

    Queries run in blocks of about `chunk` rows, each against only the keys up to its last row, which
    skips most of the score matrix's masked upper triangle (~40% less attention work at 448 tokens). On the GPU path
    the blocks are left to cuDNN's causal kernel, which skips the masked tiles itself (`dot_product_attention`).
    """
    T, past = q.shape[3], k.shape[2] - q.shape[3]
    if isinstance(visible, Visibility):
        if T >= FLASH_MIN_LEN and not gpu_kernels() and _plain(ctx, None):
            return flash_attention(q, k, v, visible, scale, softcap, block or FLASH_BLOCK, block or FLASH_BLOCK)
        visible = visible.mask(T)
    if gpu_kernels() and _plain(ctx, softcap):
        return dot_product_attention(q, k, v, visible, scale, causal=past == 0)
    n = max(1, round(T / chunk))
    if n == 1:
        return attention(q, k, v, visible, scale, ctx, softcap)
    bounds = [T * c // n for c in range(n + 1)]
    return jnp.concatenate([
        attention(q[..., lo:hi, :], k[:, :, :past + hi], v[:, :, :past + hi], visible[..., lo:hi, :past + hi], scale, ctx, softcap)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ], axis=3)


def _plain(ctx: Ctx, softcap: float | None) -> bool:
    """Whether an attention call is plain softmax attention: no soft-cap, no attention dropout."""
    return softcap is None and (ctx.deterministic or ctx.dropout_rate == 0.0)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, causal: bool = False) -> jax.Array:
    """`attention` (no softcap, no dropout) through `jax.nn.dot_product_attention`: q (B, KV, G, T, E) -> (B, KV, G, T, E).

    Query head kv * G + g shares key/value head kv, jax's grouped-query layout as well as jpeft's. cuDNN's flash
    attention (`_cudnn_applies`) serves boolean masks; a float bias (T5's position bias, whose gradient must flow)
    and everything else go to XLA's implementation. `causal` says that the mask also hides every key after its
    query's index with S = T (no prefix keys), so cuDNN may skip those tiles.
    """
    B, KV, G, T, E = q.shape
    S = k.shape[2]
    heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  (B, KV, S, E) <-> (B, S, KV, E)
    query = q.transpose(0, 3, 1, 2, 4).reshape(B, T, KV * G, E)
    mb, mk, mg, mt, ms = mask.shape
    m = mask[:, 0, 0, None] if mk == mg == 1 else jnp.broadcast_to(mask, (mb, KV, G, mt, ms)).reshape(mb, KV * G, mt, ms)
    boolean = m.dtype == jnp.bool_
    cudnn = boolean and _cudnn_applies(q.dtype, E, T, S)
    out = jax.nn.dot_product_attention(query, heads(k), heads(v), bias=None if boolean else m.astype(jnp.float32),
                                       mask=m if boolean else None, scale=scale, is_causal=causal and cudnn,
                                       implementation="cudnn" if cudnn else "xla")
    return out.reshape(B, T, KV, G, E).transpose(0, 2, 3, 1, 4)


def _cudnn_applies(dtype: Any, head_dim: int, T: int, S: int) -> bool:
    """Whether cuDNN's flash attention takes this call: a CUDA device, bf16/fp16, head dim a multiple of 8 up to
    128 (256 from Hopper on), and even lengths (its backward with a bias needs them; a mask reaches it as a bias)."""
    if not CUDNN_ATTENTION or _platform() != "gpu" or jnp.dtype(dtype) not in _GPU_DTYPES or head_dim % 8 or T % 2 or S % 2:
        return False
    capability = getattr(jax.devices("gpu")[0], "compute_capability", None)  # absent on non-CUDA GPUs
    if capability is None:
        return False
    return head_dim <= (256 if tuple(int(c) for c in capability.split(".")) >= (9, 0) else 128)


def prefixed(p: Params, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An attention's keys and values (B, KV, S, E) with its prefix-tuning keys and values in front, (B, KV, N+S, E).

    `p["prefix"]` holds `key` and `value` (KV, N, E), shared by all rows (`jpeft.prefix.layer_prefixes`); without
    it k and v are returned as they are.
    """
    if "prefix" not in p:
        return k, v
    B = k.shape[0]
    front = lambda x, like: jnp.broadcast_to(x[None], (B, *x.shape)).astype(like.dtype)  # noqa: E731
    return (jnp.concatenate([front(p["prefix"]["key"], k), k], axis=2),
            jnp.concatenate([front(p["prefix"]["value"], v), v], axis=2))


def _attention_probs(q, k, mask, scale, softcap=None):
    # An einsum, not q @ swapaxes(k): inside a decoding loop XLA materialised that transpose of every cached key block.
    scores = jnp.einsum("bkgte,bkse->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if mask.dtype == jnp.bool_:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    else:
        scores = scores + mask
    return jax.nn.softmax(scores, axis=-1)  # (B, KV, G, T, S) float32


def _values(probs, v, dtype):
    B, KV, G, T, S = probs.shape
    probs = _unfused(probs.astype(dtype))
    return matmul(probs.reshape(B, KV, G * T, S), v).reshape(B, KV, G, T, -1)


def _unfused(x: jax.Array) -> jax.Array:
    """x unchanged, but opaque to XLA's CPU backend, which otherwise fuses softmax work into the adjacent
    attention matmul and runs the pair markedly slower than apart (a full-precision `reduce_precision`
    is a no-op its matmul fusions do not take in)."""
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
    return _values(_attention_probs(q, k, mask, scale), v, q.dtype)


def _attention_fwd(q, k, v, mask, scale):
    probs = _attention_probs(q, k, mask, scale)
    out = _values(probs, v, q.dtype)
    return out, (q, k, v, mask, probs, out)


def _attention_bwd(scale, res, g):
    """The softmax-attention gradient with every (rows, S) operand used untransposed.

    Autodiff's dK = dS^T Q and dV = P^T dO made XLA's CPU backend copy the (B, KV, G*T, S) score
    gradient and probabilities transposed; here the small (rows, E) operand is transposed instead.
    """
    q, k, v, mask, probs, out = res
    B, KV, G, T, E = q.shape
    rows = lambda x: x.reshape(B, KV, G * T, x.shape[-1])  # noqa: E731
    g_probs = _unfused(jnp.einsum("bkgte,bkse->bkgts", g, v, preferred_element_type=jnp.float32))
    row_dot = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    g_bias = probs * (g_probs - row_dot)  # softmax backward (float32): the gradient of an additive bias, 0 where masked
    g_scores = (g_bias * scale).astype(q.dtype)
    # The barrier keeps the transposes explicit: in causal attention's query blocks XLA otherwise folds them
    # into dots contracting over rows, which its CPU backend runs on a slower kernel (SmolLM2 step 10.96 ->
    # 10.62 s median); T5's step compiles the same either way.
    gT, qT = jax.lax.optimization_barrier((jnp.swapaxes(rows(g), -1, -2), jnp.swapaxes(rows(q), -1, -2)))  # (B, KV, E, G*T)
    g_q = matmul(rows(g_scores), k).reshape(q.shape)
    g_k = jnp.swapaxes(matmul(qT, rows(g_scores)), -1, -2)
    g_v = jnp.swapaxes(matmul(gT, rows(probs.astype(q.dtype))), -1, -2)
    return g_q, g_k, g_v, None if mask.dtype == jnp.bool_ else _sum_to_shape(g_bias, mask.shape).astype(mask.dtype)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum x over the dimensions a value of `shape` was broadcast along to reach x's shape."""
    lead = tuple(range(x.ndim - len(shape)))
    ones = tuple(len(lead) + i for i, n in enumerate(shape) if n == 1 and x.shape[len(lead) + i] != 1)
    return jnp.sum(x, axis=ones, keepdims=True).sum(axis=lead)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------------------
# Blockwise ("flash") attention for long rows on the CPU path

FLASH_MIN_LEN: int = 1024
"""`causal_attention` runs `flash_attention` (CPU path, no attention dropout) from this many queries on; shorter rows
keep the query-block path, which the benchmarks' 448-576-token steps were tuned on (see benchmarks/README.md,
"Long sequences"). Both are read at trace time."""
FLASH_BLOCK: int = 256
"""`flash_attention`'s query and key block length under `causal_attention`."""
PREFILL_BLOCK: int = 64
"""The block length for a generation prefill (`causal_attention(..., block=)`): a packed prefill's segments are prompts
of a few hundred tokens, and smaller blocks skip more of the other segments (SmolLM2, 8 DialogSum prompts packed into
1792 slots: 2.80 s at 256, 2.60 s at 64, median of 6). Training steps kept 256 (equal within noise at 2048 tokens)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Visibility:
    """Which keys each query of a row sees, in O(S) data: the T queries sit at the last T of the S key slots.

    Key slot j is visible to the query at slot i iff `real[j]`, j <= i, `pos[j] > pos[i] - window` (when a window is
    given; `pos` counts the real slots before each slot) and `segments[i] == segments[j]` (when given: a packed row).
    `mask` forms the (B, 1, 1, T, S) boolean mask, which `flash_attention` never does: it forms one block at a time.
    """

    real: jax.Array  # (B, S) bool
    pos: jax.Array  # (B, S) int32
    segments: jax.Array | None = None  # (B, S) int32
    window: jax.Array | None = None  # () int32

    def block(self, query_slot: Any, rows: int, key_slot: Any, cols: int) -> jax.Array:
        """(B, rows, cols) bool: what the queries at slots query_slot.. see of the keys at key_slot.."""
        at = lambda x, start, n: jax.lax.dynamic_slice_in_dim(x, start, n, axis=1)  # noqa: E731
        qi, kj = query_slot + jnp.arange(rows), key_slot + jnp.arange(cols)
        visible = at(self.real, key_slot, cols)[:, None, :] & (kj[None, None, :] <= qi[None, :, None])
        if self.window is not None:
            visible = visible & (at(self.pos, key_slot, cols)[:, None, :] > at(self.pos, query_slot, rows)[:, :, None] - self.window)
        if self.segments is not None:
            visible = visible & (at(self.segments, query_slot, rows)[:, :, None] == at(self.segments, key_slot, cols)[:, None, :])
        return visible

    def mask(self, T: int) -> jax.Array:
        """(B, 1, 1, T, S) bool mask of the T queries at the last T slots."""
        S = self.real.shape[1]
        return self.block(S - T, T, 0, S)[:, None, None]

    def first_visible(self) -> jax.Array:
        """(B, S) int32: for the query at each slot, the earliest key slot it may see (its segment's start, its window's)."""
        B, S = self.real.shape
        index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        first = jnp.zeros((B, S), jnp.int32)
        if self.segments is not None:
            new = jnp.concatenate([jnp.ones((B, 1), bool), self.segments[:, 1:] != self.segments[:, :-1]], axis=1)
            first = jax.lax.cummax(jnp.where(new, index, 0), axis=1)
        if self.window is not None:  # pos never decreases: the first slot past pos[i] - window
            since = jax.vmap(lambda p: jnp.searchsorted(p, p - self.window, side="right"))(self.pos)
            first = jnp.maximum(first, since.astype(jnp.int32))
        return first

    def padded(self, length: int) -> Visibility:
        """The same visibility over `length` >= S slots, the slots added invisible."""
        extra = ((0, 0), (0, length - self.real.shape[1]))
        pad = lambda x, value: None if x is None else jnp.pad(x, extra, constant_values=value)  # noqa: E731
        return Visibility(pad(self.real, False), jnp.pad(self.pos, extra, mode="edge"), pad(self.segments, -1), self.window)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: Visibility, scale: float, softcap: float | None = None,
                    block_q: int = 256, block_k: int = 256) -> jax.Array:
    """`causal_attention` without ever holding more than one (block_q, block_k) block of scores per head group.

    Queries run in blocks of about `block_q` rows (G * block_q per key/value head; `_even_block`), each against the
    key blocks of about `block_k` it can see: from the block of its rows' earliest visible key
    (`Visibility.first_visible`: segment and window starts, found at run time) to the block of its last row's slot,
    so the causal upper triangle, other segments of a packed row and keys out of every row's window are skipped.
    The softmax runs online in float32 (products in q's dtype, accumulated in float32); the backward pass recomputes each block's probabilities from the
    saved output and per-row log-sum-exp, so it keeps O(T) besides q, k, v. Query heads share key/value heads as in
    `attention` (no copies of K or V); the S - T keys before the queries (a prefix) are visible to all; `softcap` as in
    `attention`. Rows that see no key give 0 (the dense path averages all values there; such rows are padding).
    """
    B, KV, G, T, E = q.shape
    S = k.shape[2]
    block_q, block_k = _even_block(T, block_q), _even_block(S, block_k)
    Tp, Sp = -(-T // block_q) * block_q, -(-S // block_k) * block_k
    past = S - T
    vis = visible.padded(max(Sp, past + Tp))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, Tp - T), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, Sp - S), (0, 0))) for x in (k, v))
    out = _flash(q, k, v, vis, _key_block_ranges(vis, past, T, block_q, block_k), (scale, softcap, past, block_q, block_k))
    return out[:, :, :, :T]


def _even_block(n: int, size: int) -> int:
    """The block length nearest `size` that splits n rows into equal blocks, padding fewer rows than there are blocks
    (576 rows: 2 blocks of 288, not 3 of 256 and 192 rows of padding)."""
    blocks = max(1, round(n / size))
    return -(-n // blocks)


def _key_block_ranges(vis: Visibility, past: int, T: int, block_q: int, block_k: int) -> jax.Array:
    """(query blocks, 2) int32: the first and last key block each query block needs (over the whole batch)."""
    n = -(-T // block_q)
    rows = jnp.minimum(jnp.arange(n * block_q), T - 1)  # rows past T repeat the last row's needs
    first = jnp.min(vis.first_visible()[:, past + rows], axis=0).reshape(n, block_q).min(axis=1) // block_k
    last = (past + jnp.minimum((jnp.arange(n) + 1) * block_q, T) - 1) // block_k
    return jnp.stack([first, jnp.maximum(first, last)], axis=1).astype(jnp.int32)


def _flash_scores(qb, kb, vis, q_slot, k_slot, G, opts):
    """(B, KV, G * block_q, block_k) float32 scores of a block, invisible ones -inf, and tanh(x / softcap) when capped."""
    scale, softcap, _, block_q, block_k = opts
    s = jnp.einsum("bkre,bkse->bkrs", qb, kb, preferred_element_type=jnp.float32) * scale
    capped = None
    if softcap is not None:
        capped = jnp.tanh(s / softcap)
        s = capped * softcap
    seen = vis.block(q_slot, block_q, k_slot, block_k)[:, None, None]  # (B, 1, 1, block_q, block_k)
    B, KV, R, _ = s.shape
    seen = jnp.broadcast_to(seen, (B, 1, G, block_q, block_k)).reshape(B, 1, R, block_k)
    return jnp.where(seen, s, -jnp.inf), capped


def _flash_blocks(x: jax.Array, i: Any, block: int, G: int) -> jax.Array:
    """Query block i of (B, KV, G, Tp, E) as (B, KV, G * block, E) rows."""
    B, KV, _, _, E = x.shape
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=3).reshape(B, KV, G * block, E)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, vis, ranges, opts):
    return _flash_fwd(q, k, v, vis, ranges, opts)[0]


def _flash_fwd(q, k, v, vis, ranges, opts):
    _, _, past, block_q, block_k = opts
    B, KV, G, Tp, E = q.shape

    def query_block(i, lo_hi):
        qb = _flash_blocks(q, i, block_q, G)

        def key_block(j, carry):
            m, l, acc = carry
            kb, vb = (jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k, axis=2) for x in (k, v))
            s, _ = _flash_scores(qb, kb, vis, past + i * block_q, j * block_k, G, opts)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkrs,bkse->bkre", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
            return m_new, l * alpha + p.sum(axis=-1), acc * alpha[..., None] + pv

        R = G * block_q
        init = (jnp.full((B, KV, R), -jnp.inf), jnp.zeros((B, KV, R)), jnp.zeros((B, KV, R, E)))
        m, l, acc = jax.lax.fori_loop(lo_hi[0], lo_hi[1] + 1, key_block, init)
        out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)  # inf: such rows get probability 0
        return out.astype(q.dtype), lse

    n = Tp // block_q
    out, lse = jax.lax.map(lambda a: query_block(*a), (jnp.arange(n), ranges))  # (n, B, KV, G * block_q, ...)
    out = out.reshape(n, B, KV, G, block_q, E).transpose(1, 2, 3, 0, 4, 5).reshape(B, KV, G, Tp, E)
    return out, (q, k, v, vis, ranges, out, lse)


def _flash_bwd(opts, res, g):
    q, k, v, vis, ranges, out, lse = res
    scale, softcap, past, block_q, block_k = opts
    B, KV, G, Tp, E = q.shape
    row_dot = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, KV, G, Tp)

    def query_block(carry, a):
        g_k, g_v = carry
        i, lo_hi, lse_i = a
        qb, gb = _flash_blocks(q, i, block_q, G), _flash_blocks(g, i, block_q, G)
        d = jax.lax.dynamic_slice_in_dim(row_dot, i * block_q, block_q, axis=3).reshape(B, KV, G * block_q)

        def key_block(j, carry):
            g_q, g_k, g_v = carry
            kb, vb = (jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k, axis=2) for x in (k, v))
            s, capped = _flash_scores(qb, kb, vis, past + i * block_q, j * block_k, G, opts)
            p = jnp.exp(s - lse_i[..., None])
            g_p = jnp.einsum("bkre,bkse->bkrs", gb, vb, preferred_element_type=jnp.float32)
            g_s = p * (g_p - d[..., None])
            if softcap is not None:
                g_s = g_s * (1.0 - capped * capped)
            g_s = (g_s * scale).astype(q.dtype)
            g_q = g_q + jnp.einsum("bkrs,bkse->bkre", g_s, kb, preferred_element_type=jnp.float32)
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, jax.lax.dynamic_slice_in_dim(acc, j * block_k, block_k, axis=2) + x, j * block_k, axis=2)
            g_k = add(g_k, jnp.einsum("bkrs,bkre->bkse", g_s, qb, preferred_element_type=jnp.float32))
            g_v = add(g_v, jnp.einsum("bkrs,bkre->bkse", p.astype(v.dtype), gb, preferred_element_type=jnp.float32))
            return g_q, g_k, g_v

        g_q, g_k, g_v = jax.lax.fori_loop(lo_hi[0], lo_hi[1] + 1, key_block, (jnp.zeros(qb.shape, jnp.float32), g_k, g_v))
        return (g_k, g_v), g_q.astype(q.dtype)

    n = Tp // block_q
    zeros = jnp.zeros(k.shape, jnp.float32)
    (g_k, g_v), g_q = jax.lax.scan(query_block, (zeros, zeros), (jnp.arange(n), ranges, lse))
    g_q = g_q.reshape(n, B, KV, G, block_q, E).transpose(1, 2, 3, 0, 4, 5).reshape(q.shape)
    return g_q, g_k.astype(k.dtype), g_v.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
