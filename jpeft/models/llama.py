"""Llama-family decoders (Llama 2/3, SmolLM, Mistral, Qwen2) as pure functions of a nested parameter dict.

Shapes: B batch, T tokens, S key slots (sequence or cache length), D hidden, H query heads, KV key/value
heads, G = H // KV queries per key/value head, E head_dim, F intermediate, V vocab, N soft-prompt tokens.

The tree mirrors Hugging Face names: `model/embed_tokens/embedding` (V, D), `lm_head/kernel` (D, V) when
untied, `model/layers/{i}/self_attn/{q,k,v,o}_proj/kernel` (+ `bias` for Qwen2 / `attention_bias`),
`model/layers/{i}/mlp/{gate,up,down}_proj/kernel`, `model/layers/{i}/{input,post_attention}_layernorm/weight`
and `model/norm/weight`. Bottleneck adapters, when present, sit at `model/layers/{i}/{self_attn,mlp}/adapter`
and act on that sub-layer's output before the residual sum.

Positions: rotary positions come from the attention mask's cumulative sum (0 on padding), as transformers'
`generate` computes them, so a left-padded row gives the same logits as the unpadded sequence. For
right-padded batches this equals transformers' `forward` (which numbers slots 0..T-1 whatever the mask).

Soft prompts: a top-level `prompt_embeddings` (N, D) leaf is prepended to every row's input embeddings with
the mask extended by N ones, as PEFT's `PeftModelForCausalLM` does for prompt tuning (before any left
padding). PEFT drops `position_ids` and numbers all N + T slots, which agrees with the cumulative-sum rule on
right-padded batches (training) but not on left-padded ones, where jpeft keeps positions padding-independent.
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

from jpeft import generation, gguf_io, hf_io, nn, tree
from jpeft.hf_io import CheckpointError
from jpeft.models import registry

Params = dict[str, Any]

MODEL_TYPES = ("llama", "mistral", "qwen2")
_CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class Arch:
    """The hashable subset of a Llama/Mistral/Qwen2 config that the model functions need (a jit static arg)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    act: str
    rope: tuple[tuple[str, Any], ...]  # sorted items of transformers' `rope_parameters`
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    windows: tuple[int | None, ...]  # per layer: sliding-window size, None for full attention
    attention_dropout: float
    tie_word_embeddings: bool
    pad_token_id: int
    eos_token_ids: tuple[int, ...]


def _config_class(model_type: str):
    import transformers

    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}
    return classes[model_type]


def _rope_parameters(config: Any) -> dict:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope:  # configs built outside transformers 5's standardisation
        rope["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    rope.setdefault("rope_type", "default")
    if rope["rope_type"] not in _ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope['rope_type']!r}; jpeft implements {list(_ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor {rope['partial_rotary_factor']}; jpeft rotates whole heads")
    return rope


def _windows(config: Any, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral":
        return (window,) * num_layers
    if model_type == "qwen2":
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (None,) * num_layers


def arch(config: Any) -> Arch:
    """Read the architecture from a transformers Llama/Mistral/Qwen2 config (or pass an `Arch` through)."""
    if isinstance(config, Arch):
        return config
    model_type = getattr(config, "model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; jpeft.models.llama handles {list(MODEL_TYPES)}")
    eos = config.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    heads = config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    return Arch(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        eps=float(config.rms_norm_eps),
        act=config.hidden_act,
        rope=tuple(sorted(_rope_parameters(config).items())),
        qkv_bias=model_type == "qwen2" or attention_bias,  # Qwen2 always biases q, k, v but never o
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        windows=_windows(config, model_type, config.num_hidden_layers),
        attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0),
        eos_token_ids=eos,
    )


# ----------------------------------------------------------------------------------------------
# Parameter shapes, initialisation and the Hugging Face name mapping


def param_shapes(config: Any, tie_word_embeddings: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Flat {path: shape} of the base model's parameters (tied head unless the config or caller says otherwise)."""
    a = arch(config)
    tied = a.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    D, F, q_out, kv_out = a.hidden_size, a.intermediate_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model/embed_tokens/embedding": (a.vocab_size, D), "model/norm/weight": (D,)}
    if not tied:
        shapes["lm_head/kernel"] = (D, a.vocab_size)
    attn = {"q_proj": (D, q_out), "k_proj": (D, kv_out), "v_proj": (D, kv_out), "o_proj": (q_out, D)}
    mlp = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    for i in range(a.num_layers):
        prefix = f"model/layers/{i}"
        shapes[f"{prefix}/input_layernorm/weight"] = (D,)
        shapes[f"{prefix}/post_attention_layernorm/weight"] = (D,)
        for name, shape in attn.items():
            shapes[f"{prefix}/self_attn/{name}/kernel"] = shape
            if (a.o_bias if name == "o_proj" else a.qkv_bias):
                shapes[f"{prefix}/self_attn/{name}/bias"] = shape[1:]
        for name, shape in mlp.items():
            shapes[f"{prefix}/mlp/{name}/kernel"] = shape
            if a.mlp_bias:
                shapes[f"{prefix}/mlp/{name}/bias"] = shape[1:]
    return shapes


def init_params(config: Any, key: jax.Array, tie_word_embeddings: bool | None = None, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0, initializer_range) like transformers; norms one, biases zero)."""
    std = getattr(config, "initializer_range", 0.02)
    flat = {}
    for i, (path, shape) in enumerate(sorted(param_shapes(config, tie_word_embeddings).items())):
        if path.endswith("weight"):
            flat[path] = jnp.ones(shape, dtype)
        elif path.endswith("bias"):
            flat[path] = jnp.zeros(shape, dtype)
        else:
            flat[path] = (jax.random.normal(jax.random.fold_in(key, i), shape) * std).astype(dtype)
    return tree.unflatten(flat)


def _hf_to_path(name: str) -> tuple[str, bool]:
    """PyTorch state-dict name -> (tree path, whether the tensor is a transposed Linear weight)."""
    parts = name.split(".")
    module, leaf = "/".join(parts[:-1]), parts[-1]
    if name == "model.embed_tokens.weight":
        return "model/embed_tokens/embedding", False
    if leaf == "bias":
        return f"{module}/bias", False
    if leaf == "weight" and parts[-2].endswith("norm"):
        return f"{module}/weight", False
    if leaf == "weight":
        return f"{module}/kernel", True
    raise KeyError(name)


def _path_to_hf(path: str) -> tuple[str, bool]:
    module, leaf = path.rsplit("/", 1)
    return module.replace("/", ".") + (".bias" if leaf == "bias" else ".weight"), leaf == "kernel"


def params_from_state_dict(config: Any, state: dict[str, np.ndarray], dtype: Any = jnp.float32, source: str = "checkpoint") -> Params:
    """Convert a transformers Llama-family state dict to a jpeft tree, checking every name and shape first."""
    a = arch(config)
    flat: dict[str, np.ndarray] = {}
    unexpected = []
    for name, value in state.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints stored; recomputed from the config
            continue
        try:
            path, transpose = _hf_to_path(name)
        except KeyError:
            unexpected.append(name)
            continue
        flat[path] = value.T if transpose else value
    if a.tie_word_embeddings and "lm_head/kernel" in flat:
        if not np.array_equal(flat["lm_head/kernel"].T, flat.get("model/embed_tokens/embedding")):
            raise CheckpointError(f"{source}: the config ties the embeddings but lm_head.weight differs from model.embed_tokens.weight")
        del flat["lm_head/kernel"]  # a tied checkpoint that stored both copies
    expected = param_shapes(a)
    return hf_io.checked_tree(flat, expected, _path_to_hf, source, f"a {a.model_type} model", dtype, unexpected)


def state_dict_from_params(config: Any, params: Params) -> dict[str, np.ndarray]:
    """jpeft tree -> transformers state dict (PyTorch layout); refuses leaves the base model does not have."""
    flat = tree.flatten(params)
    expected = param_shapes(config, tie_word_embeddings="lm_head" not in params)
    extra = sorted(p for p in flat if p not in expected)
    if extra:
        raise ValueError(f"{extra[0]} is not a base-model weight: merge or split off PEFT leaves before saving")
    missing = sorted(p for p in expected if p not in flat)
    if missing:
        raise ValueError(f"the parameters lack base-model weights: {missing[:8]}")
    out = {}
    for path, value in flat.items():
        name, transpose = _path_to_hf(path)
        value = np.asarray(jax.device_get(value), dtype=np.float32) if value.dtype != jnp.bfloat16 else np.asarray(value)
        out[name] = value.T if transpose else value
    return out


def config_from_dict(raw: dict, source: str = "config"):
    """A transformers config of the right class for a Llama/Mistral/Qwen2 config dict."""
    model_type = raw.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source} describes a {model_type!r} model; jpeft.models.llama handles {list(MODEL_TYPES)}")
    return _config_class(model_type).from_dict(raw)


def load_config(path_or_hub_id: str | os.PathLike):
    """The config of a checkpoint directory, hub id, known name or `.gguf` file."""
    path = registry.resolve(path_or_hub_id)
    if str(path).endswith(".gguf"):
        return gguf_io.load_config(path)
    model_dir = hf_io.resolve_model_dir(path)
    return config_from_dict(hf_io.read_config_json(model_dir), source=str(model_dir / "config.json"))


def load_pretrained(path_or_hub_id: str | os.PathLike, dtype: Any = jnp.float32, allow_pickle: bool = False):
    """(config, params) from an HF directory or hub id (config.json + safetensors), a `.gguf` file or a known name."""
    path = registry.resolve(path_or_hub_id)
    if str(path).endswith(".gguf"):
        config, state = gguf_io.read(path)
        return config, params_from_state_dict(config, state, dtype=dtype, source=str(path))
    model_dir = hf_io.resolve_model_dir(path)
    config = load_config(model_dir)
    state = hf_io.read_state_dict(model_dir, allow_pickle=allow_pickle)
    return config, params_from_state_dict(config, state, dtype=dtype, source=str(model_dir))


def save_pretrained(out_dir: str | os.PathLike, config: Any, params: Params) -> None:
    """Write a standard HF directory (config.json + model.safetensors) atomically."""
    state = state_dict_from_params(config, params)
    cfg = config.to_dict()
    cfg["tie_word_embeddings"] = "lm_head.weight" not in state
    cfg.pop("quantization_config", None)  # the weights are written dequantised
    cfg["architectures"] = [_CAUSAL_LM[arch(config).model_type]]
    with hf_io.atomic_dir(out_dir) as tmp:
        hf_io.write_safetensors(tmp / hf_io.SAFETENSORS, state)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")


# ----------------------------------------------------------------------------------------------
# The network


def inv_freq(a: Arch) -> np.ndarray:
    """(E/2,) float32 rotary inverse frequencies, with linear or Llama-3 scaling applied as transformers does."""
    rope = dict(a.rope)
    E = a.head_dim
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


def rotary(a: Arch, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, T, E) float32 for integer positions (B, T)."""
    freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq(a))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate (B, T, heads, E) by cos/sin (B, T, E) in the half-split layout transformers uses."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """(B, T) 0/1 -> (B, T) int32 positions: count of earlier real tokens, 0 on padding (transformers' generate)."""
    mask = mask.astype(jnp.int32)
    return jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)


def visibility(key_mask: jax.Array, query_index: jax.Array, window: int | None, segment_ids: jax.Array | None = None) -> jax.Array:
    """(B, 1, 1, T, S) bool: key j is visible to the query at sequence index i iff real, j <= i and i - j < window.

    With `segment_ids` (B, T = S) of a packed batch, a key must also lie in the query's segment.
    """
    key_index = jnp.arange(key_mask.shape[-1])
    visible = key_mask.astype(bool)[:, None, :] & (key_index[None, None, :] <= query_index[None, :, None])
    if window is not None:
        visible = visible & (key_index[None, None, :] > query_index[None, :, None] - window)
    if segment_ids is not None:
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return visible[:, None, None]


def _attention(p: Params, h: jax.Array, cos: jax.Array, sin: jax.Array, visible: jax.Array, a: Arch, ctx: nn.Ctx, cache=None, index=0):
    """Grouped-query self-attention; with `cache` (k, v of (B, KV, S, E)) writes this call's keys at `index`."""
    B, T, _ = h.shape
    KV, G, E = a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_dim
    cos, sin = cos.astype(ctx.dtype), sin.astype(ctx.dtype)
    # Query heads h = kv * G + g share key/value head kv (transformers' repeat_kv layout).
    q = apply_rotary(nn.dense(p["q_proj"], h, ctx).reshape(B, T, KV * G, E), cos, sin).reshape(B, T, KV, G, E)
    k = apply_rotary(nn.dense(p["k_proj"], h, ctx).reshape(B, T, KV, E), cos, sin)
    v = nn.dense(p["v_proj"], h, ctx).reshape(B, T, KV, E)
    # Under remat, q, k and v are kept: recomputing their projections cost ~8% of a SmolLM2 step, keeping them 0.27 GB.
    q, k, v = nn.keep(q.transpose(0, 2, 3, 1, 4)), nn.keep(k.transpose(0, 2, 1, 3)), nn.keep(v.transpose(0, 2, 1, 3))  # heads first
    if cache is not None:
        k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=2)
        v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=2)
        cache = (k, v)
    attend = nn.attention if cache is not None else nn.causal_attention  # without a cache, keys are the queries' positions
    out = attend(q, k.astype(ctx.dtype), v.astype(ctx.dtype), visible, E**-0.5, ctx)  # (B, KV, G, T, E)
    return nn.dense(p["o_proj"], out.transpose(0, 3, 1, 2, 4).reshape(B, T, KV * G * E), ctx), cache


def _mlp(p: Params, h: jax.Array, a: Arch, ctx: nn.Ctx) -> jax.Array:
    """SwiGLU: down(act(gate(h)) * up(h))."""
    # The two (B, T, F) projections are half a layer's matmul work: under remat they are kept, not recomputed.
    gate = nn.activation(a.act)(nn.keep(nn.dense(p["gate_proj"], h, ctx)))
    return nn.dense(p["down_proj"], gate * nn.keep(nn.dense(p["up_proj"], h, ctx)), ctx)


def _layer(p: Params, x, cos, sin, visible, a: Arch, ctx: nn.Ctx, cache=None, index=0):
    h = nn.rms_norm(p["input_layernorm"]["weight"], x, a.eps, ctx.dtype)
    h, cache = _attention(p["self_attn"], h, cos, sin, visible, a, ctx, cache, index)
    x = x + nn.adapter(p["self_attn"].get("adapter"), h, ctx)
    h = nn.rms_norm(p["post_attention_layernorm"]["weight"], x, a.eps, ctx.dtype)
    h = _mlp(p["mlp"], h, a, ctx)
    return x + nn.adapter(p["mlp"].get("adapter"), h, ctx), cache


def embed(params: Params, input_ids: jax.Array, attention_mask: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Token embeddings with any soft prompt prepended: (B, N+T, D) and the widened (B, N+T) mask."""
    x = params["model"]["embed_tokens"]["embedding"][input_ids].astype(dtype)
    if "prompt_embeddings" in params:
        prompt = params["prompt_embeddings"].astype(dtype)
        B = input_ids.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(prompt[None], (B, *prompt.shape)), x], axis=1)
        attention_mask = jnp.concatenate([jnp.ones((B, prompt.shape[0]), jnp.int32), jnp.asarray(attention_mask, jnp.int32)], axis=1)
    return x, attention_mask


def decoder(
    config: Any,
    params: Params,
    x: jax.Array,
    positions: jax.Array,
    key_mask: jax.Array,
    ctx: nn.Ctx | None = None,
    cache: list | None = None,
    index: jax.Array | int = 0,
    segment_ids: jax.Array | None = None,
):
    """Decoder stack -> (final-normed hidden states (B, T, D), updated cache).

    `x` (B, T, D) holds the inputs at sequence indices index..index+T-1 with rotary `positions` (B, T);
    `key_mask` (B, S) says which key slots hold real tokens. Without `cache`, S = T and the keys are the
    inputs themselves; with `cache` (per layer (k, v) of (B, KV, S, E)) this call's keys are written at `index`.
    `segment_ids` (B, T) of a packed batch (no cache) keep attention inside each segment.
    """
    a, ctx = arch(config), ctx or nn.Ctx()
    cos, sin = rotary(a, positions)
    query_index = index + jnp.arange(x.shape[1])
    masks = {w: visibility(key_mask, query_index, w, segment_ids) for w in set(a.windows)}
    layers = [params["model"]["layers"][str(i)] for i in range(a.num_layers)]
    new_cache = []
    if cache is None and len(masks) == 1:  # no cache and one mask for all layers: scan over stacked layers
        visible = masks[a.windows[0]]
        x = nn.run_layers(lambda p, x, c: _layer(p, x, cos, sin, visible, a, c)[0], x, layers, ctx)
    else:
        for i, p in enumerate(layers):
            x, layer_cache = _layer(p, x, cos, sin, masks[a.windows[i]], a, ctx, None if cache is None else cache[i], index)
            new_cache.append(layer_cache)
    x = nn.rms_norm(params["model"]["norm"]["weight"], x, a.eps, ctx.dtype)
    return x, (new_cache if cache is not None else None)


def lm_head(params: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """Hidden states (..., D) -> float32 logits (..., V), through the tied embedding when there is no `lm_head`."""
    if "lm_head" in params:
        logits = nn.dense(params["lm_head"], x, ctx)
    else:
        logits = nn.matmul(x.astype(ctx.dtype), params["model"]["embed_tokens"]["embedding"].astype(ctx.dtype).T)
    return logits.astype(jnp.float32)


def forward(
    config: Any,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    dtype: Any = jnp.float32,
    dropout_rng: jax.Array | None = None,
    lora_dropout: float = 0.0,
    adapter_ids: jax.Array | None = None,
    remat: bool = False,
    prompt_logits: bool = False,
) -> jax.Array:
    """Causal-LM logits (B, T, V) in float32 for the real input tokens. Pure; `dropout_rng` enables dropout.

    With a soft prompt the N virtual positions are cut off, so `logits[:, t]` predicts `input_ids[:, t+1]`
    exactly as without one and the usual shifted loss applies unchanged. PEFT's loss, which prepends N labels
    of -100 to the full (B, N+T, V) logits, additionally scores `labels[:, 0]` from the last virtual position;
    pass `prompt_logits=True` to get those (B, N+T, V) logits instead.
    """
    a = arch(config)
    ctx = nn.Ctx(dtype=dtype, rng=dropout_rng, dropout_rate=a.attention_dropout, lora_dropout=lora_dropout, adapter_ids=adapter_ids, remat=remat)
    x, mask = embed(params, input_ids, attention_mask, dtype)
    h, _ = decoder(a, params, x, positions_from_mask(mask), mask, ctx)
    if not prompt_logits:
        h = h[:, h.shape[1] - input_ids.shape[1]:]
    return lm_head(params, h, ctx)


# ----------------------------------------------------------------------------------------------
# Generation


@functools.partial(jax.jit, static_argnames=("a", "max_len", "cache_len", "num_beams", "dtype", "length_penalty", "early_stopping"))
def _generate(a, params, input_ids, attention_mask, max_new_tokens, eos_token_id, adapter_ids, *, max_len, cache_len, num_beams, dtype, length_penalty, early_stopping):
    ctx = nn.Ctx(dtype=dtype, adapter_ids=adapter_ids)
    if num_beams > 1:  # every row becomes num_beams rows, as transformers does
        input_ids, attention_mask = (jnp.repeat(t, num_beams, axis=0) for t in (input_ids, attention_mask))
        if adapter_ids is not None:
            ctx.adapter_ids = jnp.repeat(adapter_ids, num_beams, axis=0)
    x, mask = embed(params, input_ids, attention_mask, dtype)  # (R, P, D): soft prompt, left padding, prompt
    R, P = mask.shape
    positions = positions_from_mask(mask)
    # Slots past the prompt hold generated tokens (all but the last, which is never fed back); causality
    # hides the ones not yet written.
    key_mask = jnp.pad(mask, ((0, 0), (0, cache_len - P)), constant_values=1)
    shape = (R, a.num_kv_heads, cache_len, a.head_dim)
    cache = [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(a.num_layers)]
    h, cache = decoder(a, params, x, positions, key_mask, ctx, cache, 0)
    logits = lm_head(params, h[:, -1], ctx)
    last = positions[:, -1]  # prompts are left-aligned, so the last slot is each row's last real token

    def step(tokens, i, cache):  # the i-th generated token sits at slot P + i, position last + 1 + i
        x = params["model"]["embed_tokens"]["embedding"][tokens[:, None]].astype(dtype)
        h, cache = decoder(a, params, x, (last + 1 + i)[:, None], key_mask, ctx, cache, P + i)
        return lm_head(params, h[:, 0], ctx), cache

    if num_beams == 1:
        return generation.greedy_search(step, logits, cache, max_new_tokens, max_len, eos_token_id, a.pad_token_id)
    return generation.beam_search(
        step, logits, cache, max_new_tokens, max_len, eos_token_id, a.pad_token_id,
        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
    )


def left_align(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's padding to the left (keeping token order), so every prompt ends in the last column."""
    order = np.argsort(attention_mask, axis=1, kind="stable")
    return np.take_along_axis(input_ids, order, axis=1), np.take_along_axis(attention_mask, order, axis=1)


def _pad_after_eos(out: jax.Array, eos_ids: tuple[int, ...], pad: int) -> jax.Array:
    """Pad everything after each row's first EOS (any of `eos_ids`), as transformers does."""
    after = jnp.cumsum(jnp.cumsum(jnp.isin(out, jnp.asarray(eos_ids)), axis=1), axis=1) > 1
    return jnp.where(after, pad, out)


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
    eos_token_id: int | list[int] | None = None,
    dtype: Any = jnp.float32,
    adapter_ids=None,
) -> jax.Array:
    """Greedy (num_beams=1) or beam search; returns (B, max_new_tokens) generated ids, pad after EOS.

    Prompts may be left- or right-padded (rows are left-aligned first). The prompt length and the cache
    length are rounded up to buckets, so a run over many batches compiles only a few shapes; the loop runs
    on device with a key/value cache. `eos_token_id` defaults to the config's EOS id(s). With several EOS ids
    (Llama 3 Instruct) greedy rows stop at any of them, though the loop only ends early on the first; beam
    search needs a single id.
    """
    a = arch(config)
    eos_ids = a.eos_token_ids if eos_token_id is None else tuple(int(e) for e in np.atleast_1d(eos_token_id))
    if num_beams > 1 and len(eos_ids) > 1:
        raise ValueError(f"beam search stops on one EOS id, but {list(eos_ids)} were given: pass eos_token_id=<one id>")
    input_ids = np.asarray(input_ids, np.int32)
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    input_ids, attention_mask = left_align(input_ids, attention_mask)
    S = input_ids.shape[1]
    extra = generation.bucket(S) - S
    input_ids = np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=a.pad_token_id)
    attention_mask = np.pad(attention_mask, ((0, 0), (extra, 0)))
    n_prompt = params["prompt_embeddings"].shape[0] if "prompt_embeddings" in params else 0
    out = _generate(
        a, params, jnp.asarray(input_ids), jnp.asarray(attention_mask), jnp.int32(max_new_tokens),
        jnp.int32(eos_ids[0] if eos_ids else -1),  # -1: no EOS, always generate max_new_tokens
        None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32),
        max_len=generation.bucket(max_new_tokens), cache_len=generation.bucket(n_prompt + input_ids.shape[1] + max_new_tokens - 1),
        num_beams=num_beams, dtype=dtype, length_penalty=float(length_penalty), early_stopping=bool(early_stopping),
    )[:, :max_new_tokens]
    return _pad_after_eos(out, eos_ids, a.pad_token_id) if len(eos_ids) > 1 else out
