"""T5 (v1.0, v1.1, FLAN-T5) as pure functions of a nested parameter dict that mirrors Hugging Face names.

Shapes: B batch, S source length, T target length, D d_model, H heads, K d_kv, F d_ff, V vocab.
The tree: `shared/embedding` (V, D), `lm_head/kernel` (D, V) when untied,
`encoder/block/{i}/layer/{0: SelfAttention, 1: DenseReluDense}`,
`decoder/block/{i}/layer/{0: SelfAttention, 1: EncDecAttention, 2: DenseReluDense}`,
each with its `layer_norm/weight`, and `{encoder,decoder}/final_layer_norm/weight`. Block 0 of each
stack holds `SelfAttention/relative_attention_bias/embedding` (buckets, H), shared by all blocks.
A soft prompt, when present, is prepended to the encoder input: a top-level `prompt_embeddings` (N, D) leaf, or the
output of a P-tuning `prompt_encoder` computed in the same pass (`soft_prompt.rows_of`).

Prefix tuning (`jpeft.prefix`), as PEFT does it for SEQ_2_SEQ_LM: only the decoder's self-attention gets prefix keys
and values (PEFT builds cross-attention ones too but replaces that cache by an empty one; the encoder gets none).
The decoder's N prefix slots come before its tokens, so the relative position bias sees them as past positions
0..N-1 and the target tokens at N, N+1, ...
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import nn, quant, tree
from jpeft.models import generation, sampling
from jpeft.formats import hf_io, loading
from jpeft.methods import multi, prefix, prompt, soft_prompt
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import attention
from jpeft.models import ops

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Arch:
    """The hashable subset of a `T5Config` that the model functions need (usable as a jit static arg)."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    num_buckets: int
    max_distance: int
    eps: float
    is_gated_act: bool
    act: str
    scale_decoder_outputs: bool
    dropout_rate: float
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int


def arch(config: Any) -> Arch:
    """Read the architecture from a transformers `T5Config` (or pass an `Arch` through)."""
    if isinstance(config, Arch):
        return config
    eos = config.eos_token_id
    start = getattr(config, "decoder_start_token_id", None)
    return Arch(
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        d_kv=config.d_kv,
        d_ff=config.d_ff,
        num_layers=config.num_layers,
        num_decoder_layers=config.num_decoder_layers,
        num_heads=config.num_heads,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        eps=config.layer_norm_epsilon,
        is_gated_act=config.is_gated_act,
        act=config.dense_act_fn,
        # transformers 5 always ties the embedding and keeps the v1.0 rescale in `scale_decoder_outputs`;
        # older configs said the same with `tie_word_embeddings`.
        scale_decoder_outputs=bool(getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)),
        dropout_rate=config.dropout_rate,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
        eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
        decoder_start_token_id=start if start is not None else (config.pad_token_id or 0),
    )


# ----------------------------------------------------------------------------------------------
# Parameter shapes, initialisation and the Hugging Face name mapping


def param_shapes(config: Any, tie_word_embeddings: bool = True) -> dict[str, tuple[int, ...]]:
    """Flat {path: shape} of the base model's parameters."""
    a = arch(config)
    D, inner = a.d_model, a.num_heads * a.d_kv
    shapes: dict[str, tuple[int, ...]] = {"shared/embedding": (a.vocab_size, D)}
    if not tie_word_embeddings:
        shapes["lm_head/kernel"] = (D, a.vocab_size)
    ff = {"wi_0": (D, a.d_ff), "wi_1": (D, a.d_ff)} if a.is_gated_act else {"wi": (D, a.d_ff)}
    ff["wo"] = (a.d_ff, D)
    attn = {"q": (D, inner), "k": (D, inner), "v": (D, inner), "o": (inner, D)}
    for stack, n_blocks in (("encoder", a.num_layers), ("decoder", a.num_decoder_layers)):
        sublayers = ["SelfAttention", "EncDecAttention", "DenseReluDense"] if stack == "decoder" else ["SelfAttention", "DenseReluDense"]
        for i in range(n_blocks):
            for j, kind in enumerate(sublayers):
                prefix = f"{stack}/block/{i}/layer/{j}"
                shapes[f"{prefix}/layer_norm/weight"] = (D,)
                for name, shape in (ff if kind == "DenseReluDense" else attn).items():
                    shapes[f"{prefix}/{kind}/{name}/kernel"] = shape
        shapes[f"{stack}/block/0/layer/0/SelfAttention/relative_attention_bias/embedding"] = (a.num_buckets, a.num_heads)
        shapes[f"{stack}/final_layer_norm/weight"] = (D,)
    return shapes


def init_params(config: Any, key: jax.Array, tie_word_embeddings: bool | None = None, dtype: Any = jnp.float32) -> Params:
    """Random parameters with T5's initialisation scales (for benchmarks and from-scratch runs)."""
    a = arch(config)
    tied = a.scale_decoder_outputs if tie_word_embeddings is None else tie_word_embeddings
    flat = {}
    shapes = param_shapes(a, tie_word_embeddings=tied)
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        if path.endswith("weight"):
            flat[path] = jnp.ones(shape, dtype)
        else:
            fan_in = shape[0] if path.endswith("kernel") else 1
            std = fan_in**-0.5 if path.endswith("kernel") else 1.0
            flat[path] = (jax.random.normal(jax.random.fold_in(key, i), shape) * std).astype(dtype)
    return tree.unflatten(flat)


_SKIPPED_HF_KEYS = (
    "encoder.embed_tokens.weight",  # copies of shared.weight
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",  # unused, transformers drops it too
)


def _hf_to_path(name: str) -> tuple[str, bool]:
    """PyTorch state-dict name -> (tree path, whether the tensor is a transposed Linear weight)."""
    parts = name.split(".")
    if parts[-1] != "weight":
        raise KeyError(name)
    module = "/".join(parts[:-1])
    if parts[-2] in ("shared", "relative_attention_bias"):
        return f"{module}/embedding", False
    if parts[-2] in ("layer_norm", "final_layer_norm"):
        return f"{module}/weight", False
    return f"{module}/kernel", True


def _path_to_hf(path: str) -> tuple[str, bool]:
    module, leaf = path.rsplit("/", 1)
    return module.replace("/", ".") + ".weight", leaf == "kernel"


def params_from_state_dict(config: Any, state: dict[str, np.ndarray], dtype: Any = jnp.float32, source: str = "checkpoint",
                           quantize: str | None = None, mesh: Any = None) -> Params:
    """Convert a transformers T5 state dict to a jpeft tree, checking every name and shape first."""
    return params_from_tensors(config, hf_io.in_memory(state), dtype, source, quantize, mesh)


def params_from_tensors(config: Any, tensors: dict[str, hf_io.Tensor], dtype: Any = jnp.float32, source: str = "checkpoint",
                        quantize: str | None = None, mesh: Any = None) -> Params:
    """`params_from_state_dict` for tensors read one at a time (`jpeft.formats.loading.build`): a streaming load."""
    flat: dict[str, hf_io.Tensor] = {}
    unexpected = []
    for name, value in tensors.items():
        if name in _SKIPPED_HF_KEYS:
            continue
        try:
            path, transpose = _hf_to_path(name)
        except KeyError:
            unexpected.append(name)
            continue
        flat[path] = hf_io.transposed(value) if transpose else value
    lm_head, shared = flat.get("lm_head/kernel"), flat.get("shared/embedding")
    if lm_head is not None and shared is not None and lm_head.shape[::-1] == shared.shape and np.array_equal(lm_head.read().T, shared.read()):
        del flat["lm_head/kernel"]  # a tied checkpoint that stored both copies
    expected = param_shapes(config, tie_word_embeddings="lm_head/kernel" not in flat)
    return loading.build(flat, expected, _path_to_hf, source, "a T5", dtype, unexpected, quantize=quantize, mesh=mesh)


def state_dict_from_params(params: Params) -> dict[str, np.ndarray]:
    """jpeft tree -> transformers state dict (PyTorch layout). Refuses trees that still hold PEFT leaves."""
    quant.require_float(params, "a transformers checkpoint")
    out = {}
    for path, value in tree.flatten(params).items():
        leaf = path.rsplit("/", 1)[1]
        if leaf not in ("kernel", "embedding", "weight"):
            raise ValueError(f"{path} is not a base-model weight: merge or split off PEFT leaves before saving")
        name, transpose = _path_to_hf(path)
        value = np.asarray(jax.device_get(value), dtype=np.float32) if value.dtype != jnp.bfloat16 else np.asarray(value)
        out[name] = value.T if transpose else value
    return out


def load_config(path_or_hub_id: str | os.PathLike):
    """The `T5Config` of a checkpoint directory or hub id."""
    from transformers import T5Config

    model_dir = hf_io.resolve_model_dir(path_or_hub_id)
    raw = hf_io.read_config_json(model_dir)
    if raw.get("model_type") not in (None, "t5", "mt5", "umt5"):
        raise CheckpointError(f"{model_dir / 'config.json'} describes a {raw.get('model_type')!r} model, not T5")
    return T5Config.from_dict(raw)


def load_pretrained(path_or_hub_id: str | os.PathLike, dtype: Any = jnp.float32, allow_pickle: bool = False, quantize: str | None = None,
                    mesh: Any = None):
    """(config, params) from a local HF directory or hub id: config.json + (sharded) safetensors, streamed tensor by
    tensor; `quantize` ("nf4" / "int8") and `mesh` as in `llama.load_pretrained`."""
    model_dir = hf_io.resolve_model_dir(path_or_hub_id)
    config = load_config(model_dir)
    tensors = hf_io.tensors(model_dir, allow_pickle=allow_pickle)
    return config, params_from_tensors(config, tensors, dtype, str(model_dir), quantize, mesh)


def save_pretrained(out_dir: str | os.PathLike, config: Any, params: Params) -> None:
    """Write a standard HF directory (config.json + model.safetensors) atomically."""
    state = state_dict_from_params(params)
    cfg = config.to_dict()
    cfg["tie_word_embeddings"] = "lm_head.weight" not in state
    cfg["scale_decoder_outputs"] = arch(config).scale_decoder_outputs
    cfg.setdefault("architectures", ["T5ForConditionalGeneration"])
    with hf_io.atomic_dir(out_dir) as tmp:
        hf_io.write_safetensors(tmp / hf_io.SAFETENSORS, state)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# The network


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
    """Mesh-TensorFlow's bucketing of (key - query) offsets, exactly as transformers computes it."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (
        jnp.log(jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


def position_bias(a: Arch, table: jax.Array, query_pos: jax.Array, key_len: int, bidirectional: bool) -> jax.Array:
    """(1, H, Tq, Tk) float32 bias from the (buckets, H) table for the given query positions."""
    rel = jnp.arange(key_len)[None, :] - query_pos[:, None]
    buckets = relative_position_bucket(rel, bidirectional, a.num_buckets, a.max_distance)
    return jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]


def _heads(x: jax.Array, a: Arch) -> jax.Array:
    """(B, T, H*K) -> heads-first (B, H, T, K), so attention's products are plain batched matmuls."""
    return x.reshape(*x.shape[:-1], a.num_heads, a.d_kv).swapaxes(-3, -2)


def _merge_heads(x: jax.Array) -> jax.Array:
    """(B, H, T, K) -> (B, T, H*K)."""
    x = x.swapaxes(-3, -2)
    return x.reshape(*x.shape[:-2], -1)


def _attend(p: Params, q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """T5 attention: no 1/sqrt(d) scaling; `bias` carries position bias and masks. q, k, v: (B, H, T, K).

    Queries, keys and values stay heads-first: with the (B, T, H, K) layout XLA CPU transposed every
    cached key and value block inside the decoding loop, which cost more than the matmuls themselves.
    `attention.attention` sees each head as its own key/value group of one query head.
    """
    out = attention.attention(q[:, :, None], k, v, bias[..., None, :, :], 1.0, ctx)[:, :, 0]
    return nn.dense(p["o"], _merge_heads(out), ctx)


def _kv(p: Params, x: jax.Array, a: Arch, ctx: nn.Ctx) -> tuple[jax.Array, jax.Array]:
    """Keys and values (B, H, T, K) of x for one attention module."""
    return _heads(nn.dense(p["k"], x, ctx), a), _heads(nn.dense(p["v"], x, ctx), a)


def _feed_forward(p: Params, x: jax.Array, a: Arch, ctx: nn.Ctx) -> jax.Array:
    act = ops.activation(a.act)
    if a.is_gated_act:
        h = act(nn.dense(p["wi_0"], x, ctx)) * nn.dense(p["wi_1"], x, ctx)
    else:
        h = act(nn.dense(p["wi"], x, ctx))
    return nn.dense(p["wo"], nn.dropout(ctx, h), ctx)


def _residual(module: Params, x: jax.Array, h: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """x + dropout(adapter(h)): a module's output rejoins the stream, through its bottleneck adapter if any."""
    return x + nn.dropout(ctx, nn.adapter(module.get("adapter"), h, ctx))


def _self_attention_layer(p, x, bias, a, ctx, cache=None, pos=None):
    """Pre-norm self-attention; with `cache` (k, v of (B, H, Tmax, K)) writes this step's keys at `pos`."""
    h = ops.rms_norm(p["layer_norm"]["weight"], x, a.eps, ctx.dtype)
    q, k, v = (_heads(nn.dense(p["SelfAttention"][n], h, ctx), a) for n in ("q", "k", "v"))
    if cache is not None:  # generation wrote any prefix into the cache's first slots
        k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), pos, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), pos, axis=2)
        cache = (k, v)
    else:
        k, v = attention.prefixed(p["SelfAttention"], k, v)  # (B, H, N+T, K) under prefix tuning
    return _residual(p["SelfAttention"], x, _attend(p["SelfAttention"], q, k, v, bias, ctx), ctx), cache


def _cross_attention_layer(p, x, kv, bias, a, ctx):
    h = ops.rms_norm(p["layer_norm"]["weight"], x, a.eps, ctx.dtype)
    q = _heads(nn.dense(p["EncDecAttention"]["q"], h, ctx), a)
    return _residual(p["EncDecAttention"], x, _attend(p["EncDecAttention"], q, kv[0], kv[1], bias, ctx), ctx)


def _ff_layer(p, x, a, ctx):
    h = ops.rms_norm(p["layer_norm"]["weight"], x, a.eps, ctx.dtype)
    return _residual(p["DenseReluDense"], x, _feed_forward(p["DenseReluDense"], h, a, ctx), ctx)


def embed_source(params: Params, input_ids: jax.Array, attention_mask: jax.Array, dtype: Any, ctx: nn.Ctx | None = None) -> tuple[jax.Array, jax.Array]:
    """Token embeddings with any soft prompt (`soft_prompt.rows_of`) prepended: (B, N+S, D) and the widened (B, N+S) mask."""
    x = nn.lookup(params["shared"]["embedding"], input_ids).astype(dtype)
    soft = soft_prompt.rows_of(params, ctx)
    if soft is not None:
        soft = soft.astype(dtype)
        B = input_ids.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(soft[None], (B, *soft.shape)), x], axis=1)
        attention_mask = jnp.concatenate([jnp.ones((B, soft.shape[0]), jnp.int32), jnp.asarray(attention_mask, jnp.int32)], axis=1)
    return x, attention_mask


def encode(config: Any, params: Params, input_ids: jax.Array, attention_mask: jax.Array, ctx: nn.Ctx | None = None) -> tuple[jax.Array, jax.Array]:
    """Encoder stack -> hidden states (B, S', D) and the mask over them (S' includes soft-prompt tokens)."""
    a, ctx = arch(config), ctx or nn.Ctx()
    p = params["encoder"]
    x, mask = embed_source(params, input_ids, attention_mask, ctx.dtype, ctx)
    S = x.shape[1]
    table = p["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"]["embedding"]
    bias = position_bias(a, table, jnp.arange(S), S, bidirectional=True) + attention.attention_bias_from_mask(mask)[:, None, None, :]
    x = nn.dropout(ctx, x)

    def block(p, x, c):
        x, _ = _self_attention_layer(p["layer"]["0"], x, bias, a, c)
        return _ff_layer(p["layer"]["1"], x, a, c)

    x = nn.run_layers(block, x, _blocks(p, a.num_layers), ctx)
    x = ops.rms_norm(p["final_layer_norm"]["weight"], x, a.eps, ctx.dtype)
    return nn.dropout(ctx, x), mask


def _blocks(stack: Params, n: int) -> list[Params]:
    """Each block's parameters, without block 0's position-bias table (read once and shared), so blocks stack."""
    blocks = [stack["block"][str(i)] for i in range(n)]
    first = tree.flatten(blocks[0])
    first = {k: v for k, v in first.items() if "relative_attention_bias" not in k}
    return [tree.unflatten(first)] + blocks[1:]


def _with_prefix(block: Params, kv: dict[str, jax.Array]) -> Params:
    """A decoder block whose self-attention carries its prefix keys and values (read by `attention.prefixed`)."""
    layers = block["layer"]
    return {**block, "layer": {**layers, "0": {**layers["0"], "SelfAttention": {**layers["0"]["SelfAttention"], "prefix": kv}}}}


def cross_kv(config: Any, params: Params, encoded: jax.Array, ctx: nn.Ctx | None = None) -> list[tuple[jax.Array, jax.Array]]:
    """Each decoder block's cross-attention keys and values, computed once per source."""
    a, ctx = arch(config), ctx or nn.Ctx()
    blocks = params["decoder"]["block"]
    return [_kv(blocks[str(i)]["layer"]["1"]["EncDecAttention"], encoded, a, ctx) for i in range(a.num_decoder_layers)]


def _lm_head(a: Arch, params: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    if a.scale_decoder_outputs:
        x = x * (a.d_model**-0.5)
    if "lm_head" in params:
        logits = nn.dense(params["lm_head"], x, ctx)
    else:
        logits = nn.matmul(x, params["shared"]["embedding"].astype(ctx.dtype).T)
    return logits.astype(jnp.float32)


def decode(
    config: Any,
    params: Params,
    decoder_input_ids: jax.Array,
    encoder: jax.Array | list,
    encoder_mask: jax.Array,
    decoder_attention_mask: jax.Array | None = None,
    ctx: nn.Ctx | None = None,
    cache: list | None = None,
    pos: jax.Array | int = 0,
) -> tuple[jax.Array, list | None]:
    """Decoder stack + LM head -> (logits (B, T, V) float32, updated cache).

    Without `cache`, `encoder` is the encoder output (B, S, D) and the whole target is processed with a
    causal mask, after the N slots of any prefix. With `cache` (per block a (k, v) pair of (B, H, Tmax, K)),
    `encoder` is `cross_kv`'s per-block keys and values, `decoder_input_ids` holds the tokens at positions
    pos..pos+T-1 (a prefix fills the cache's first N slots), and keys past the last written position are masked.
    """
    a, ctx = arch(config), ctx or nn.Ctx()
    p = params["decoder"]
    x = nn.lookup(params["shared"]["embedding"], decoder_input_ids).astype(ctx.dtype)
    B, T = decoder_input_ids.shape
    n = prefix.num_tokens(params) if cache is None else 0
    query_pos = pos + n + jnp.arange(T)
    key_len = n + T if cache is None else cache[0][0].shape[2]
    key_pos = jnp.arange(key_len)
    table = p["block"]["0"]["layer"]["0"]["SelfAttention"]["relative_attention_bias"]["embedding"]
    self_mask = (key_pos[None, :] <= query_pos[:, None])[None]  # (1, T, Tk)
    if decoder_attention_mask is not None and cache is None:
        self_mask = self_mask & jnp.pad(decoder_attention_mask, ((0, 0), (n, 0)), constant_values=1)[:, None, :].astype(bool)
    self_bias = position_bias(a, table, query_pos, key_len, bidirectional=False) + attention.attention_bias_from_mask(self_mask)[:, None]
    cross_bias = attention.attention_bias_from_mask(encoder_mask)[:, None, None, :]
    x = nn.dropout(ctx, x)

    def block(p, x, c, kv=None, layer_cache=None):
        layers = p["layer"]
        x, layer_cache = _self_attention_layer(layers["0"], x, self_bias, a, c, layer_cache, pos)
        kv = _kv(layers["1"]["EncDecAttention"], encoder, a, c) if kv is None else kv
        x = _cross_attention_layer(layers["1"], x, kv, cross_bias, a, c)
        return _ff_layer(layers["2"], x, a, c), layer_cache

    new_cache = None
    if cache is None:
        blocks = _blocks(p, a.num_decoder_layers)
        if n:
            blocks = [_with_prefix(b, kv) for b, kv in zip(blocks, prefix.layer_prefixes(params, a))]
        x = nn.run_layers(lambda p, x, c: block(p, x, c)[0], x, blocks, ctx)
    else:
        new_cache = []
        for i in range(a.num_decoder_layers):
            x, layer_cache = block(p["block"][str(i)], x, ctx, encoder[i], cache[i])
            new_cache.append(layer_cache)
    x = nn.dropout(ctx, ops.rms_norm(p["final_layer_norm"]["weight"], x, a.eps, ctx.dtype))
    return _lm_head(a, params, x, ctx), new_cache


def forward(
    config: Any,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    decoder_input_ids: jax.Array,
    decoder_attention_mask: jax.Array | None = None,
    *,
    dtype: Any = jnp.float32,
    dropout_rng: jax.Array | None = None,
    lora_dropout: float = 0.0,
    adapter_ids: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """Teacher-forced logits (B, T, V) in float32. Pure; pass `dropout_rng` to train with dropout."""
    return _forward(arch(config), params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, dtype=dtype,
                    dropout_rng=dropout_rng, lora_dropout=lora_dropout, adapter_ids=adapter_ids, remat=remat)


# Compiled as a whole even when called outside a jitted step: run op by op, a forward pass compiles each of its
# hundreds of primitives separately (inside a step this jit is simply inlined).
@functools.partial(jax.jit, static_argnames=("a", "dtype", "lora_dropout", "remat"))
def _forward(a: Arch, params: Params, input_ids: jax.Array, attention_mask: jax.Array, decoder_input_ids: jax.Array,
             decoder_attention_mask: jax.Array | None, *, dtype: Any, dropout_rng: jax.Array | None, lora_dropout: float,
             adapter_ids: jax.Array | None, remat: bool) -> jax.Array:
    ctx = nn.Ctx(dtype=dtype, rng=dropout_rng, dropout_rate=a.dropout_rate, lora_dropout=lora_dropout, adapter_ids=adapter_ids, remat=remat)
    encoded, mask = encode(a, params, input_ids, attention_mask, ctx)
    logits, _ = decode(a, params, decoder_input_ids, encoded, mask, decoder_attention_mask, ctx)
    return logits


def shift_right(labels: jax.Array, config: Any) -> jax.Array:
    """Decoder inputs from labels: start token prepended, -100 replaced by pad (transformers' `_shift_right`)."""
    a = arch(config)
    shifted = jnp.concatenate([jnp.full((labels.shape[0], 1), a.decoder_start_token_id, labels.dtype), labels[:, :-1]], axis=1)
    return jnp.where(shifted == -100, a.pad_token_id, shifted)


# ----------------------------------------------------------------------------------------------
# Generation


@functools.partial(jax.jit, static_argnames=("a", "max_len", "num_beams", "dtype", "length_penalty", "early_stopping", "sample", "copies"))
def _generate(a, params, input_ids, attention_mask, max_new_tokens, eos_token_id, adapter_ids, key, *, max_len, num_beams, dtype, length_penalty,
              early_stopping, sample, copies):
    ctx = nn.Ctx(dtype=dtype, adapter_ids=adapter_ids)
    if copies > 1:  # every row becomes num_beams (or num_return_sequences) rows, as transformers does
        input_ids, attention_mask = (jnp.repeat(t, copies, axis=0) for t in (input_ids, attention_mask))
        if adapter_ids is not None:
            ctx.adapter_ids = jnp.repeat(adapter_ids, copies, axis=0)
    encoded, mask = encode(a, params, input_ids, attention_mask, ctx)
    kv = cross_kv(a, params, encoded, ctx)
    rows, n = input_ids.shape[0], prefix.num_tokens(params)
    cache_shape = (rows, a.num_heads, n + max_len, a.d_kv)  # a prefix takes the first N slots
    cache = [(jnp.zeros(cache_shape, dtype), jnp.zeros(cache_shape, dtype)) for _ in range(a.num_decoder_layers)]
    if n:
        cache = prefix.write_cache(params, a, cache)

    def step(tokens, i, cache):  # the i-th generated token sits at decoder position N + i + 1
        logits, cache = decode(a, params, tokens[:, None], kv, mask, ctx=ctx, cache=cache, pos=n + i + 1)
        return logits[:, 0], cache

    start = jnp.full((rows,), a.decoder_start_token_id, jnp.int32)
    logits, cache = step(start, -1, cache)
    if sample is not None:  # the decoder's tokens so far are the start token: the repetition penalty counts it, as transformers does
        seen = sampling.seen_tokens(start[:, None], jnp.ones((rows, 1)), logits.shape[-1]) if sample.repetition_penalty != 1.0 else None
        return sampling.sample_search(step, logits, cache, max_new_tokens, max_len, eos_token_id, a.pad_token_id, key=key, settings=sample, seen=seen)
    if num_beams == 1:
        return generation.greedy_search(step, logits, cache, max_new_tokens, max_len, eos_token_id, a.pad_token_id)
    return generation.beam_search(
        step, logits, cache, max_new_tokens, max_len, eos_token_id, a.pad_token_id,
        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
    )


def generate(
    config: Any,
    params: Params,
    input_ids,
    attention_mask=None,
    max_new_tokens: int = 64,
    num_beams: int = 1,
    *,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    eos_token_id: int | None = None,
    dtype: Any = jnp.float32,
    adapter_ids=None,
    sample: sampling.Sampling | None = None,
    key: jax.Array | None = None,
    num_return_sequences: int = 1,
    return_logprobs: bool = False,
):
    """Greedy (num_beams=1) or beam search; returns (B, max_new_tokens) generated ids, pad after EOS.

    The source length and the decode length are rounded up to buckets, so a run over many batches
    compiles only a few shapes; the loop itself runs on device (`lax.while_loop`). `sample`, `key`,
    `num_return_sequences` and `return_logprobs` sample instead, as in `llama.generate`.
    """
    a = arch(config)
    sampling.check_request(sample, key, num_beams, num_return_sequences, return_logprobs)
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    generation.check_request(input_ids, attention_mask, prompt.embedding_table(params).shape[0], max_new_tokens, num_beams,
                             early_stopping, adapter_ids, multi.num_stacked(params))
    S = input_ids.shape[1]
    S_bucket = generation.bucket(S)
    input_ids = jnp.pad(input_ids, ((0, 0), (0, S_bucket - S)), constant_values=a.pad_token_id)
    attention_mask = jnp.pad(attention_mask, ((0, 0), (0, S_bucket - S)))
    max_len = generation.bucket(max_new_tokens, fine=True)  # decoder positions 0 (start token) .. max_new_tokens - 1
    eos = a.eos_token_id if eos_token_id is None else eos_token_id
    out = _generate(
        a, params, input_ids, attention_mask, jnp.int32(max_new_tokens), jnp.int32(eos),
        None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32), key,
        max_len=max_len, num_beams=num_beams, dtype=dtype, length_penalty=float(length_penalty), early_stopping=bool(early_stopping),
        sample=sample, copies=max(num_beams, num_return_sequences),
    )
    if sample is None:
        return out[:, :max_new_tokens]
    return (out[0][:, :max_new_tokens], out[1][:, :max_new_tokens]) if return_logprobs else out[0][:, :max_new_tokens]
