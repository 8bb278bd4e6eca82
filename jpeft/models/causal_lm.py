"""What the decoder-only models (`llama`, `gemma`, `moe`) share: positions, masks, rotary embeddings, the attention and
gated-MLP blocks, soft prompts, the forward pass, the KV-cached generation loop and the checkpoint plumbing.

Shapes: B batch, T tokens, S key slots (sequence or cache length), D hidden, KV key/value heads, G queries per
key/value head, E head_dim, V vocab, N soft-prompt tokens.

A model family (`jpeft.models.family.Family`, a value each of `llama`, `gemma` and `moe` declares once and passes
down) plugs into the shared forward pass, loss and generation loop by providing, for its resolved `Arch` `a` (which
has `num_layers`, `num_kv_heads`, `head_dim`, `attention_dropout`, `pad_token_id` and `eos_token_ids`):

- `embed(a, params, input_ids, attention_mask, dtype) -> (x (B, N+T, D), mask (B, N+T))`
- `decoder(a, params, x, positions, key_mask, ctx, cache, index, segment_ids) -> (h (B, T, D), cache)`
- `lm_head(a, params, h, ctx) -> float32 logits (..., V)`

and, for loading, `arch`, `config_from_dict`, `param_shapes`, `causal_lm` (model_type -> transformers class) and, where
a checkpoint stores experts apart, `stack_experts` / `per_expert`. A decoder may also set `ctx.aux_loss`,
a term `training.causal_lm_loss` adds to its loss (the mixture of experts' router balance).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import nn, quant, tree
from jpeft import targets as tg
from jpeft.models import generation, sampling
from jpeft.formats import gguf_io, hf_io, loading
from jpeft.methods import multi, prefix, prompt, soft_prompt
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import registry
from jpeft.models import attention
from jpeft.models import ops
from jpeft.models.family import Family

Params = dict[str, Any]
ROPE_TYPES = ("default", "linear", "llama3")


def eos_ids(config: Any) -> tuple[int, ...]:
    """A config's EOS id(s) as a tuple (empty when it has none)."""
    eos = config.eos_token_id
    return tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))


def check_rope(rope: dict) -> dict:
    """A transformers `rope_parameters` dict that jpeft can compute, with its defaults filled in."""
    rope = dict(rope)
    rope.setdefault("rope_type", "default")
    if rope["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope['rope_type']!r}; jpeft implements {list(ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor {rope['partial_rotary_factor']}; jpeft rotates whole heads")
    return rope


def rope_parameters(config: Any) -> dict:
    """A Llama-style config's `rope_parameters`, checked, with `rope_theta` read from the config where they lack it."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope:  # configs built outside transformers 5's standardisation
        rope["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return check_rope(rope)


# ----------------------------------------------------------------------------------------------
# Positions, masks and rotary embeddings


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """(B, T) 0/1 -> (B, T) int32 positions: count of earlier real tokens, 0 on padding (transformers' generate)."""
    mask = mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)


def visibility(key_mask: jax.Array, query_index: jax.Array, window: int | None, segment_ids: jax.Array | None = None) -> jax.Array:
    """(B, 1, 1, T, S) bool: key j is visible to the query at sequence index i iff real, j <= i and i - j < window.

    The window counts real slots only (padding between a prefix-tuning prefix and a left-padded prompt takes no
    room in it), so a row's attention never depends on its padding. With `segment_ids` (B, T = S) of a packed
    batch, a key must also lie in the query's segment.
    """
    key_index = jnp.arange(key_mask.shape[-1])
    visible = key_mask.astype(bool)[:, None, :] & (key_index[None, None, :] <= query_index[None, :, None])
    if window is not None:
        key_pos = positions_from_mask(key_mask > 0)  # (B, S): real slots before each slot (segment ids are > 0)
        query_pos = key_pos[:, query_index]  # (B, T)
        visible = visible & (key_pos[:, None, :] > query_pos[:, :, None] - window)
    if segment_ids is not None:
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return visible[:, None, None]


def layer_visibility(key_mask: jax.Array, query_index: jax.Array, window: int | None, segment_ids: jax.Array | None = None,
                     cache: list | None = None) -> jax.Array | attention.Visibility:
    """What a decoder's attention layers see: `visibility`'s mask with a cache, for rows shorter than `attention.FLASH_MIN_LEN`
    and on the GPU path; otherwise (no cache, or one the queries fill: they are the last T of the S key slots) the same
    visibility as an O(S) `attention.Visibility`, which `attention.causal_attention` runs blockwise, so long rows never hold a (T, S)
    mask."""
    # With a cache the queries may sit anywhere among its slots; a packed prefill's fill every slot, as without one.
    fills_cache = cache is not None and len(query_index) == key_mask.shape[-1]
    if (cache is not None and not fills_cache) or len(query_index) < attention.FLASH_MIN_LEN or nn.gpu_kernels():
        return visibility(key_mask, query_index, window, segment_ids)
    return attention.Visibility(key_mask.astype(bool), positions_from_mask(key_mask > 0),
                         None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32),
                         None if window is None else jnp.int32(window))


def inv_freq(rope: Mapping[str, Any], head_dim: int) -> np.ndarray:
    """(E/2,) float32 rotary inverse frequencies, with linear or Llama-3 scaling applied as transformers does."""
    E = head_dim
    freq = 1.0 / (np.float32(rope["rope_theta"]) ** (np.arange(0, E, 2, dtype=np.float32) / np.float32(E)))
    if rope["rope_type"] == "linear":
        freq = freq / rope["factor"]
    elif rope["rope_type"] == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > old_len / low, freq / factor, freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        freq = np.where(medium, smoothed, scaled)
    return freq.astype(np.float32)


def rotary(rope: Mapping[str, Any], head_dim: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, T, E) float32 for integer positions (B, T)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq(rope, head_dim))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (B, T, heads, E) by cos/sin (B, T, E) in the half-split layout transformers uses."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


# ----------------------------------------------------------------------------------------------
# Blocks


def self_attention(p: Params, h: jax.Array, cos: jax.Array, sin: jax.Array, visible: jax.Array, a: Any, ctx: nn.Ctx,
                   cache=None, index=0, *, scale: float, softcap: float | None = None,
                   qk_norm: Callable[[jax.Array, jax.Array], jax.Array] | None = None, clip: float | None = None):
    """Grouped-query self-attention; with `cache` (k, v of (B, KV, S, E)) writes this call's keys at `index`.

    `qk_norm(weight, x)`, when given, normalises each query and key head (`q_norm` / `k_norm`) before rotary; `clip`
    clamps queries, keys and values to [-clip, clip] after that (OLMoE's `clip_qkv`).
    """
    B, T, _ = h.shape
    KV, G, E = a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_dim
    cos, sin = cos.astype(ctx.dtype), sin.astype(ctx.dtype)
    # Query heads h = kv * G + g share key/value head kv (transformers' repeat_kv layout).
    q = nn.dense(p["q_proj"], h, ctx).reshape(B, T, KV * G, E)
    k = nn.dense(p["k_proj"], h, ctx).reshape(B, T, KV, E)
    if qk_norm is not None:
        q, k = qk_norm(p["q_norm"]["weight"], q), qk_norm(p["k_norm"]["weight"], k)
    v = nn.dense(p["v_proj"], h, ctx).reshape(B, T, KV, E)
    if clip is not None:
        q, k, v = (jnp.clip(t, -clip, clip) for t in (q, k, v))
    q = apply_rotary(q, cos, sin).reshape(B, T, KV, G, E)
    k = apply_rotary(k, cos, sin)
    # Under remat, q, k and v are kept: recomputing their projections cost ~8% of a SmolLM2 step, keeping them 0.27 GB.
    q, k, v = nn.keep(q.transpose(0, 2, 3, 1, 4)), nn.keep(k.transpose(0, 2, 1, 3)), nn.keep(v.transpose(0, 2, 1, 3))  # heads first
    if cache is not None:  # generation wrote any prefix into the cache's first slots
        k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=2)
        cache = (k, v)
    else:
        k, v = attention.prefixed(p, k, v)  # (B, KV, N+T, E) under prefix tuning
    if cache is None or isinstance(index, int):  # no cache, or a prefill at a static slot: keys end at the queries' slots
        end = index + T if cache is not None else k.shape[2]
        seen = visible if isinstance(visible, attention.Visibility) else visible[..., :end]
        out = attention.causal_attention(q, k[:, :, :end].astype(ctx.dtype), v[:, :, :end].astype(ctx.dtype), seen, scale, ctx,
                                  softcap=softcap, block=None if cache is None else attention.PREFILL_BLOCK)  # (B, KV, G, T, E)
    else:  # a decoding step: the whole cache, causality hiding the slots not yet written
        out = attention.attention(q, k.astype(ctx.dtype), v.astype(ctx.dtype), visible, scale, ctx, softcap=softcap)
    return nn.dense(p["o_proj"], out.transpose(0, 3, 1, 2, 4).reshape(B, T, KV * G * E), ctx), cache


def gated_mlp(p: Params, h: jax.Array, act: str, ctx: nn.Ctx) -> jax.Array:
    """down(act(gate(h)) * up(h)): SwiGLU for Llama, GeGLU for Gemma."""
    # The two (B, T, F) projections are half a layer's matmul work: under remat they are kept, not recomputed.
    gate = ops.activation(act)(nn.keep(nn.dense(p["gate_proj"], h, ctx)))
    return nn.dense(p["down_proj"], gate * nn.keep(nn.dense(p["up_proj"], h, ctx)), ctx)


def embed(params: Params, input_ids: jax.Array, attention_mask: jax.Array, dtype: Any, scale: float | None = None,
          ctx: nn.Ctx | None = None) -> tuple[jax.Array, jax.Array]:
    """Token embeddings (times `scale`, in `dtype`) with any soft prompt (`soft_prompt.rows_of`) prepended: (B, N+T, D) and the (B, N+T) mask."""
    x = nn.lookup(params["model"]["embed_tokens"]["embedding"], input_ids).astype(dtype)
    if scale is not None:  # a float32 scale rounded to the compute dtype, as transformers rounds it to the weights' dtype
        x = x * jnp.asarray(np.float32(scale)).astype(dtype)
    soft = soft_prompt.rows_of(params, ctx)
    if soft is not None:  # prepended as given: PEFT feeds its soft prompt unscaled, past the embedding layer
        soft = soft.astype(dtype)
        B = input_ids.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(soft[None], (B, *soft.shape)), x], axis=1)
        attention_mask = jnp.concatenate([jnp.ones((B, soft.shape[0]), jnp.int32), jnp.asarray(attention_mask, jnp.int32)], axis=1)
    return x, attention_mask


def lm_head(params: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """Hidden states (..., D) -> float32 logits (..., V), through the tied embedding when there is no `lm_head`."""
    if "lm_head" in params:
        logits = nn.dense(params["lm_head"], x, ctx)
    else:
        logits = nn.matmul(x.astype(ctx.dtype), params["model"]["embed_tokens"]["embedding"].astype(ctx.dtype).T)
    return logits.astype(jnp.float32)


def run_layers(layer: Callable, a: Any, params: Params, x: jax.Array, tables: list[tuple[jax.Array, jax.Array, jax.Array]],
               kind_of: list[int], ctx: nn.Ctx, cache: list | None = None, index: jax.Array | int = 0):
    """x through every decoder layer -> (x, updated cache or None).

    `layer(p, x, cos, sin, visible, a, ctx, cache, index) -> (x, cache)` is the model's layer; layer i uses
    `tables[kind_of[i]]` = (visible, cos, sin), one per distinct (window, rope) of the model. Without a cache the
    layers go through `nn.run_layers`; when kinds differ, each layer's kind travels with its parameters, so layers of
    different windows still scan as one stack under remat (the kind is then traced and picks its row of the tables).
    Under prefix tuning without a cache, each layer's prefix keys and values travel with its attention's parameters.
    """
    layers = [params["model"]["layers"][str(i)] for i in range(a.num_layers)]
    if cache is None and prefix.LEAF in params:
        layers = [{**p, "self_attn": {**p["self_attn"], "prefix": kv}} for p, kv in zip(layers, prefix.layer_prefixes(params, a))]
    if cache is not None:
        new_cache = []
        for p, k, c in zip(layers, kind_of, cache):
            visible, cos, sin = tables[k]
            x, c = layer(p, x, cos, sin, visible, a, ctx, c, index)
            new_cache.append(c)
        return x, new_cache
    if len(tables) == 1:
        visible, cos, sin = tables[0]
        return nn.run_layers(lambda p, x, c: layer(p, x, cos, sin, visible, a, c)[0], x, layers, ctx), None
    stacked = jax.tree.map(lambda *t: jnp.stack(t), *[(_windowed(visible), cos, sin) for visible, cos, sin in tables])

    def one(p, x, c):
        visible, cos, sin = jax.tree.map(lambda t: t[p["kind"]], stacked)
        return layer(p["layer"], x, cos, sin, visible, a, c)[0]

    return nn.run_layers(one, x, [{"layer": p, "kind": np.int32(k)} for p, k in zip(layers, kind_of)], ctx), None


def _windowed(visible: jax.Array | attention.Visibility) -> jax.Array | attention.Visibility:
    """A `attention.Visibility` without a window given one no row reaches past (> its S slots), so the kinds of a model's
    layers, windowed or not, stack as one pytree."""
    if not isinstance(visible, attention.Visibility) or visible.window is not None:
        return visible
    return dataclasses.replace(visible, window=jnp.int32(visible.real.shape[1] + 1))


# ----------------------------------------------------------------------------------------------
# Forward pass and generation


# Compiled as a whole even when called outside a jitted step: run op by op, a forward pass compiles each of its
# hundreds of primitives separately (inside a step this jit is simply inlined).
@functools.partial(jax.jit, static_argnames=("family", "a", "dtype", "lora_dropout", "remat", "prompt_logits"))
def forward(family: Family, a: Any, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *, dtype: Any = jnp.float32,
            dropout_rng: jax.Array | None = None, lora_dropout: float = 0.0, adapter_ids: jax.Array | None = None,
            remat: bool = False, prompt_logits: bool = False) -> jax.Array:
    """Causal-LM logits (B, T, V) of `family` (see the models' `forward`); (B, N+T, V) with `prompt_logits`."""
    ctx = nn.Ctx(dtype=dtype, rng=dropout_rng, dropout_rate=a.attention_dropout, lora_dropout=lora_dropout, adapter_ids=adapter_ids, remat=remat)
    x, mask = family.embed(a, params, input_ids, attention_mask, dtype, ctx)
    n = prefix.num_tokens(params)
    key_mask = jnp.pad(mask, ((0, 0), (n, 0)), constant_values=1)  # the N prefix slots precede the tokens
    h, _ = family.decoder(a, params, x, positions_from_mask(key_mask)[:, n:], key_mask, ctx, index=n)
    if not prompt_logits:
        h = h[:, h.shape[1] - input_ids.shape[1]:]
    return family.lm_head(a, params, h, ctx)


@functools.partial(jax.jit, static_argnames=("family", "a", "max_len", "cache_len", "num_beams", "dtype", "length_penalty", "early_stopping",
                                             "prompt_lookup", "packed_len", "sample", "copies"))
def _generate(family, a, params, input_ids, attention_mask, max_new_tokens, eos_token_id, adapter_ids, key, *, max_len, cache_len, num_beams, dtype,
              length_penalty, early_stopping, prompt_lookup, packed_len, sample, copies):
    ctx = nn.Ctx(dtype=dtype, adapter_ids=adapter_ids)
    x, mask = family.embed(a, params, input_ids, attention_mask, dtype)  # (R, P, D): soft prompt, left padding, prompt
    if soft_prompt.present(params):  # padding first, so a sliding window spans real slots only, as without padding
        order = jnp.argsort(mask, axis=1, stable=True)
        x, mask = jnp.take_along_axis(x, order[..., None], axis=1), jnp.take_along_axis(mask, order, axis=1)
    R, P = mask.shape
    n = prefix.num_tokens(params)  # prefix tuning: N slots before the prompt's, as PEFT's DynamicCache holds them
    mask = jnp.pad(mask, ((0, 0), (n, 0)), constant_values=1)
    positions = positions_from_mask(mask)[:, n:]
    # Slots past the prompt hold generated tokens (all but the last, which is never fed back); causality
    # hides the ones not yet written.
    key_mask = jnp.pad(mask, ((0, 0), (0, cache_len - n - P)), constant_values=1)
    if packed_len:  # the padded x above is then unused (XLA drops it); only mask and positions carry on
        logits, cache = _packed_prefill(family, a, params, input_ids, attention_mask, ctx, packed_len, cache_len)
    else:
        shape = (R, a.num_kv_heads, cache_len, a.head_dim)
        cache = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(a.num_layers)]
        if n:
            cache = prefix.write_cache(params, a, cache)
        h, cache = family.decoder(a, params, x, positions, key_mask, ctx, cache, n)
        logits = family.lm_head(a, params, h[:, -1], ctx)  # the prompt's other positions predict nothing decoding needs
    last = positions[:, -1]  # prompts are left-aligned, so the last slot is each row's last real token
    seen = None
    if sample is not None and sample.repetition_penalty != 1.0:
        seen = sampling.seen_tokens(input_ids, attention_mask, logits.shape[-1])
    if copies > 1:  # each row's prefill, computed once, becomes its beams' or samples' (transformers prefills every copy)
        logits, cache, key_mask, last, seen = jax.tree.map(lambda t: jnp.repeat(t, copies, axis=0), (logits, cache, key_mask, last, seen))
        if adapter_ids is not None:
            ctx.adapter_ids = jnp.repeat(adapter_ids, copies, axis=0)

    def run(tokens, positions, index, key_mask, cache):  # tokens (R, T) at cache slots index.., rotary positions (R, T)
        x, _ = family.embed(a, {"model": params["model"]}, tokens, jnp.ones(tokens.shape, jnp.int32), dtype)  # no soft prompt again
        h, cache = family.decoder(a, params, x, positions, key_mask, ctx, cache, index)
        return family.lm_head(a, params, h, ctx), cache

    def step(tokens, i, cache):  # the i-th generated token sits at slot N + P + i, position last + 1 + i
        logits, cache = run(tokens[:, None], (last + 1 + i)[:, None], n + P + i, key_mask, cache)
        return logits[:, 0], cache

    if sample is not None:
        return sampling.sample_search(step, logits, cache, max_new_tokens, max_len, eos_token_id, a.pad_token_id, key=key, settings=sample, seen=seen)
    if prompt_lookup:
        return generation.lookup_search(run, logits, cache, input_ids, attention_mask, key_mask, last + 1, n + P, max_new_tokens, max_len,
                                        eos_token_id, a.pad_token_id, num_draft=prompt_lookup)
    if num_beams == 1:
        return generation.greedy_search(step, logits, cache, max_new_tokens, max_len, eos_token_id, a.pad_token_id)
    return generation.beam_search(
        step, logits, cache, max_new_tokens, max_len, eos_token_id, a.pad_token_id,
        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
    )


def _packed_prefill(family, a, params, input_ids, attention_mask, ctx, packed_len, cache_len):
    """The prefill of left-padded prompts (R, P) run as one packed row of `packed_len` slots -> (last logits (R, V),
    per-row cache as the padded prefill writes it), so no product is spent on padding.

    The rows' real tokens go back to back (a segment each, positions from 0), the decoder fills a one-row cache of
    the packed keys and values, and each row's slots are then gathered into its own cache rows, left-padded as before
    (the padding slots hold other rows' keys, which the key mask hides).
    """
    R, P = input_ids.shape
    lengths = attention_mask.sum(axis=1)
    ends = jnp.cumsum(lengths)  # (R,): one past each row's last packed slot
    slot = jnp.arange(packed_len)
    row = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), R - 1)
    offset = slot - (ends - lengths)[row]  # position within the row
    real = slot < ends[-1]
    ids = jnp.where(real, input_ids[row, P - lengths[row] + offset], a.pad_token_id)[None]
    x, key_mask = family.embed(a, params, ids, real[None].astype(jnp.int32), ctx.dtype)
    shape = (1, a.num_kv_heads, packed_len, a.head_dim)
    cache = [(jnp.zeros(shape, ctx.dtype), jnp.zeros(shape, ctx.dtype)) for _ in range(a.num_layers)]
    segments = jnp.where(real, row + 1, 0)[None].astype(jnp.int32)
    h, cache = family.decoder(a, params, x, jnp.where(real, offset, 0)[None], key_mask, ctx, cache, 0, segments)
    logits = family.lm_head(a, params, h[0, ends - 1], ctx)
    # Row r's padded slot s holds packed slot ends[r] - P + s (clipped where s is padding).
    source = jnp.clip(ends[:, None] - P + jnp.arange(P)[None, :], 0, packed_len - 1)  # (R, P)
    rows = lambda c: jnp.pad(c[0][:, source].transpose(1, 0, 2, 3), ((0, 0), (0, 0), (0, cache_len - P), (0, 0)))  # noqa: E731
    return logits, [(rows(k), rows(v)) for k, v in cache]


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's padding to the left (keeping token order), so every prompt ends in the last column."""
    order = np.argsort(attention_mask, axis=1, kind="stable")
    return np.take_along_axis(input_ids, order, axis=1), np.take_along_axis(attention_mask, order, axis=1)


def after_eos(out: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """(R, T) bool: the positions after each row's first EOS (any of `eos_ids`), which transformers pads."""
    return jnp.cumsum(jnp.cumsum(jnp.isin(out, jnp.asarray(eos_ids)), axis=1), axis=1) > 1


def generate(family: Family, a: Any, params: Params, input_ids, attention_mask=None, max_new_tokens: int = 64, num_beams: int = 1, *,
             length_penalty: float = 1.0, early_stopping: bool = False, eos_token_id: int | list[int] | None = None,
             dtype: Any = jnp.float32, adapter_ids=None, prompt_lookup: int = 0, sample: sampling.Sampling | None = None,
             key: jax.Array | None = None, num_return_sequences: int = 1, return_logprobs: bool = False):
    """Greedy, beam search or sampling with `family` (see the models' `generate`); (B * num_return_sequences,
    max_new_tokens) ids, pad after EOS, and with `return_logprobs` their log-probabilities beside them."""
    eos = a.eos_token_ids if eos_token_id is None else tuple(int(e) for e in np.atleast_1d(eos_token_id))
    if num_beams > 1 and len(eos) > 1:
        raise ValueError(f"beam search stops on one EOS id, but {list(eos)} were given: pass eos_token_id=<one id>")
    if prompt_lookup < 0 or (prompt_lookup and num_beams > 1):
        raise ValueError(f"prompt_lookup={prompt_lookup} with num_beams={num_beams}: prompt lookup drafts tokens for greedy decoding; "
                         "pass a draft count >= 1 with num_beams=1, or prompt_lookup=0")
    sampling.check_request(sample, key, num_beams, num_return_sequences, return_logprobs, prompt_lookup)
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    generation.check_request(input_ids, attention_mask, prompt.embedding_table(params).shape[0], max_new_tokens, num_beams,
                             early_stopping, adapter_ids, multi.num_stacked(params))
    input_ids, attention_mask = left_align(input_ids, attention_mask)
    S = input_ids.shape[1]
    # Eighth-octave buckets (284 -> 288): the prefill computes every padded column; a power of two (512) nearly doubled it.
    extra = generation.bucket(S, steps=8) - S
    input_ids = np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=a.pad_token_id)
    attention_mask = np.pad(attention_mask, ((0, 0), (extra, 0)))
    n_virtual = soft_prompt.num_tokens(params) + prefix.num_tokens(params)
    # Ragged prompts prefill as one packed row when that saves slots: soft prompts, prefixes and per-row adapters
    # need the rows apart.
    packed_len = generation.bucket(int(attention_mask.sum()), steps=8)
    if n_virtual or adapter_ids is not None or packed_len >= input_ids.size:
        packed_len = 0
    generated_slots = (max_new_tokens - 1) * (prompt_lookup + 1)  # each lookup pass takes prompt_lookup + 1 slots, kept or not
    out = _generate(
        family, a, params, jnp.asarray(input_ids), jnp.asarray(attention_mask), jnp.int32(max_new_tokens),
        jnp.int32(eos[0] if eos else -1),  # -1: no EOS, always generate max_new_tokens
        None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32), key,
        max_len=generation.bucket(max_new_tokens), cache_len=generation.bucket(n_virtual + input_ids.shape[1] + generated_slots, fine=True),
        num_beams=num_beams, dtype=dtype, length_penalty=float(length_penalty), early_stopping=bool(early_stopping),
        prompt_lookup=int(prompt_lookup), packed_len=packed_len, sample=sample, copies=max(num_beams, num_return_sequences),
    )
    ids, logps = out if sample is not None else (out, jnp.zeros(out.shape))
    ids, logps = ids[:, :max_new_tokens], logps[:, :max_new_tokens]
    if len(eos) > 1:  # the loop ends early on the first EOS id only; rows that stopped at another are padded here
        after = after_eos(ids, eos)
        ids, logps = jnp.where(after, a.pad_token_id, ids), jnp.where(after, 0.0, logps)
    return (ids, logps) if return_logprobs else ids


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints


def outer_shapes(a: Any, tied: bool) -> dict[str, tuple[int, ...]]:
    """The embedding, final norm and (untied) LM head of a decoder's {path: shape}."""
    shapes = {"model/embed_tokens/embedding": (a.vocab_size, a.hidden_size), "model/norm/weight": (a.hidden_size,)}
    if not tied:
        shapes["lm_head/kernel"] = (a.hidden_size, a.vocab_size)
    return shapes


def attention_shapes(a: Any, prefix: str, qkv_bias: bool, o_bias: bool) -> dict[str, tuple[int, ...]]:
    """One layer's q/k/v/o projections (and their biases) under `prefix` ("model/layers/i")."""
    D, q_out, kv_out = a.hidden_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    shapes = {}
    for name, shape in {"q_proj": (D, q_out), "k_proj": (D, kv_out), "v_proj": (D, kv_out), "o_proj": (q_out, D)}.items():
        shapes[f"{prefix}/self_attn/{name}/kernel"] = shape
        if o_bias if name == "o_proj" else qkv_bias:
            shapes[f"{prefix}/self_attn/{name}/bias"] = shape[1:]
    return shapes


def random_params(shapes: Mapping[str, tuple[int, ...]], key: jax.Array, std: float, dtype: Any, norm: float = 1.0) -> Params:
    """A tree of `shapes` ({path: shape}): normal(0, std) weights as transformers initialises them, norm weights `norm`, biases zero."""
    flat = {}
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        if path.endswith("weight"):
            flat[path] = jnp.full(shape, norm, dtype)
        elif path.endswith("bias"):
            flat[path] = jnp.zeros(shape, dtype)
        else:
            flat[path] = (jax.random.normal(jax.random.fold_in(key, i), shape) * std).astype(dtype)
    return tree.unflatten(flat)


def hf_to_path(name: str) -> tuple[str, bool]:
    """PyTorch state-dict name -> (tree path, whether the tensor is a transposed Linear weight).

    A routed-experts parameter (`mlp.experts.gate_up_proj`, (E, out, in)) is a module of its own in the tree, its
    `kernel` (E, in, out) transposed per expert, so PEFT leaves sit beside it as beside a Linear's.
    """
    parts = name.split(".")
    module, leaf = "/".join(parts[:-1]), parts[-1]
    if tg.is_expert(name):  # transformers 5 stores them as bare parameters of `experts`, stacked on the expert axis
        return f"{name.replace('.', '/')}/kernel", True
    if name == "model.embed_tokens.weight":
        return "model/embed_tokens/embedding", False
    if leaf == "bias":
        return f"{module}/bias", False
    if leaf == "weight" and parts[-2].endswith("norm"):
        return f"{module}/weight", False
    if leaf == "weight":
        return f"{module}/kernel", True
    raise KeyError(name)


def path_to_hf(path: str) -> tuple[str, bool]:
    """Tree path -> (PyTorch state-dict name, whether to transpose)."""
    module, leaf = path.rsplit("/", 1)
    if tg.is_expert(module.replace("/", ".")):
        return module.replace("/", "."), True
    return module.replace("/", ".") + (".bias" if leaf == "bias" else ".weight"), leaf == "kernel"


def transpose(value: np.ndarray) -> np.ndarray:
    """A Linear weight between PyTorch's (out, in) and jpeft's (in, out): the last two axes swapped (experts lead; a
    misnamed 1-D tensor passes through, for the name and shape checks to report)."""
    return np.swapaxes(value, -1, -2) if np.ndim(value) >= 2 else value


def params_from_state_dict(family: Family, config: Any, state: dict[str, np.ndarray], dtype: Any = jnp.float32, source: str = "checkpoint",
                           packed: dict[str, tuple[str, np.ndarray]] | None = None, quantize: str | None = None, mesh: Any = None) -> Params:
    """Convert a transformers state dict of `family` to a jpeft tree, checking every name and shape first (per-expert
    tensors stacked first where the family stores experts apart).

    `packed` ({name: (GGML type, rows)}, from `gguf_io.read_packed`) holds Linear weights kept quantized: each
    becomes its `jpeft.quant` leaf group, checked by the (in, out) shape it stands for. `quantize` and `mesh` as in
    `load_pretrained`.
    """
    if family.stack_experts is not None:
        state = family.stack_experts(config, state, source)
    lazy_packed = {name: (qtype, hf_io.in_memory({name: rows})[name]) for name, (qtype, rows) in (packed or {}).items()}
    return params_from_tensors(family, config, hf_io.in_memory(state), dtype, source, lazy_packed, quantize, mesh)


def params_from_tensors(family: Family, config: Any, tensors: Mapping[str, hf_io.Tensor], dtype: Any = jnp.float32, source: str = "checkpoint",
                        packed: Mapping[str, tuple[str, hf_io.Tensor]] | None = None, quantize: str | None = None, mesh: Any = None) -> Params:
    """`params_from_state_dict` for tensors read one at a time (`jpeft.formats.loading.build`): a streaming load."""
    a = family.arch(config)
    flat: dict[str, hf_io.Tensor] = {}
    unexpected = []
    for name, value in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints stored; recomputed from the config
            continue
        try:
            path, transposed = hf_to_path(name)
        except KeyError:
            unexpected.append(name)
            continue
        flat[path] = hf_io.transposed(value) if transposed else value
    if a.tie_word_embeddings and "lm_head/kernel" in flat:
        embedding = flat.get("model/embed_tokens/embedding")
        if embedding is None or not np.array_equal(flat["lm_head/kernel"].read().T, embedding.read()):
            raise CheckpointError(f"{source}: the config ties the embeddings but lm_head.weight differs from model.embed_tokens.weight")
        del flat["lm_head/kernel"]  # a tied checkpoint that stored both copies
    groups, expected = _packed_leaves(packed or {}, family.param_shapes(a), source)
    return loading.build(flat, expected, path_to_hf, source, f"a {a.model_type} model", dtype, unexpected, groups, quantize, mesh)


def _packed_leaves(packed: Mapping[str, tuple[str, hf_io.Tensor]], expected: dict[str, tuple[int, ...]], source: str) -> tuple[dict, dict]:
    """(the packed weights' quant group leaves, by tree path; the expected shapes of the float tensors left to check)."""
    leaves, expected = {}, dict(expected)
    for name, (qtype, rows) in packed.items():
        path, _ = hf_to_path(name)
        key = quant.gguf_key(qtype)
        if path not in expected:
            raise CheckpointError(f"{source} holds tensor {name}, which this config's model does not have")
        shape = quant.weight_shape({key: jax.ShapeDtypeStruct(rows.shape, jnp.uint8)})
        if shape != expected[path]:
            raise CheckpointError(f"{source}: tensor {name} has shape {shape[::-1]} but the config implies {expected[path][::-1]}")
        del expected[path]
        leaves[f"{path.rsplit('/', 1)[0]}/{key}"] = rows
    return leaves, expected


def state_dict_from_params(family: Family, config: Any, params: Params) -> dict[str, np.ndarray]:
    """jpeft tree -> transformers state dict (PyTorch layout, experts written apart where the family's checkpoints
    hold them so); refuses leaves the base model does not have."""
    quant.require_float(params, "a transformers checkpoint")
    flat = tree.flatten(params)
    expected = family.param_shapes(config, tie_word_embeddings="lm_head" not in params)
    extra = sorted(p for p in flat if p not in expected)
    if extra:
        raise ValueError(f"{extra[0]} is not a base-model weight: merge or split off PEFT leaves before saving")
    missing = sorted(p for p in expected if p not in flat)
    if missing:
        raise ValueError(f"the parameters lack base-model weights: {missing[:8]}")
    out = {}
    for path, value in flat.items():
        name, transposed = path_to_hf(path)
        value = np.asarray(jax.device_get(value), dtype=np.float32) if value.dtype != jnp.bfloat16 else np.asarray(value)
        out[name] = transpose(value) if transposed else value
    return out if family.per_expert is None else family.per_expert(config, out)


def load_config(family: Family, path_or_hub_id: str | os.PathLike):
    """The config of a checkpoint directory, hub id, known name or `.gguf` file, checked to be of `family`."""
    path = registry.resolve(path_or_hub_id)
    if str(path).endswith(".gguf"):
        return _of_family(family, gguf_io.load_config(path), path)
    model_dir = hf_io.resolve_model_dir(path)
    return family.config_from_dict(hf_io.read_config_json(model_dir), source=str(model_dir / "config.json"))


def _of_family(family: Family, config: Any, source: Any) -> Any:
    if config.model_type not in family.model_types:
        raise CheckpointError(f"{source} holds a {config.model_type!r} model; jpeft.models.{family.name} handles {list(family.model_types)}")
    return config


def load_pretrained(family: Family, path_or_hub_id: str | os.PathLike, dtype: Any = jnp.float32, allow_pickle: bool = False,
                    quantized: bool = False, quantize: str | None = None, mesh: Any = None):
    """(config, params) from an HF directory or hub id (config.json + safetensors), a `.gguf` file or a known name.

    Tensors stream in one at a time (`jpeft.formats.loading`): each is cast to `dtype`, quantized as it is read when
    `quantize` is "nf4" or "int8" (the modules `jpeft.quant.quantize` would pick) and placed on the device, or on its
    shards of `mesh`, before the next is read. `quantized=True` keeps a GGUF file's quantized Linear weights as its
    packed blocks (`jpeft.quant`), never float.
    """
    path = registry.resolve(path_or_hub_id)
    if str(path).endswith(".gguf"):
        config, tensors, packed = gguf_io.tensors(path, packed=quantized)
        _of_family(family, config, path)
        return config, params_from_tensors(family, config, tensors, dtype, str(path), packed, quantize, mesh)
    if quantized:
        raise ValueError(f"quantized=True keeps a GGUF file's blocks packed, but {path} is not a .gguf file: "
                         "pass quantize='nf4' or 'int8' to quantize its weights as they load")
    model_dir = hf_io.resolve_model_dir(path)
    config = load_config(family, model_dir)
    tensors = hf_io.tensors(model_dir, allow_pickle=allow_pickle)
    if family.stack_experts is not None:  # per-expert tensors become one stack per projection, in memory (MoE loads do not stream yet)
        tensors = hf_io.in_memory(family.stack_experts(config, {name: t.read() for name, t in tensors.items()}, str(model_dir)))
    return config, params_from_tensors(family, config, tensors, dtype, str(model_dir), quantize=quantize, mesh=mesh)


def save_pretrained(family: Family, out_dir: str | os.PathLike, config: Any, params: Params) -> None:
    """Write a standard HF directory (config.json + model.safetensors) atomically."""
    state = state_dict_from_params(family, config, params)
    cfg = config.to_dict()
    cfg["tie_word_embeddings"] = "lm_head.weight" not in state
    cfg.pop("quantization_config", None)  # the weights are written dequantised
    cfg["architectures"] = [family.causal_lm[family.arch(config).model_type]]
    with hf_io.atomic_dir(out_dir) as tmp:
        hf_io.write_safetensors(tmp / hf_io.SAFETENSORS, state)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
