"""Gemma 2 and Gemma 3 text decoders as pure functions of a nested parameter dict.

Shapes: B batch, T tokens, S key slots, D hidden, H query heads, KV key/value heads, E head_dim, F intermediate,
V vocab, N soft-prompt tokens.

The tree mirrors Hugging Face names as `jpeft.models.llama` does: `model/embed_tokens/embedding` (V, D),
`model/layers/{i}/self_attn/{q,k,v,o}_proj/kernel`, `model/layers/{i}/mlp/{gate,up,down}_proj/kernel`, and the
norms `model/layers/{i}/{input,post_attention,pre_feedforward,post_feedforward}_layernorm/weight`,
`model/layers/{i}/self_attn/{q,k}_norm/weight` (Gemma 3) and `model/norm/weight`. The LM head is tied unless the
tree has `lm_head/kernel`. Every norm scales by (1 + weight), so a fresh norm weight is zero.

What differs from Llama: token embeddings are multiplied by sqrt(D); each sub-layer's output is normed again
before the residual sum; the MLP is GeGLU (tanh GELU); queries are scaled by `query_pre_attn_scalar`**-0.5;
Gemma 3 normalises each query and key head (QK-norm); Gemma 2 soft-caps attention scores and final logits
(cap * tanh(x / cap)); layers alternate sliding-window and global attention (`layer_types`), and in Gemma 3
each kind has its own rotary base. Positions, soft prompts (prepended unscaled, as PEFT feeds them past the
embedding layer), bottleneck adapters (on each sub-layer's post-normed output), packing, generation and the
checkpoint I/O are those of `jpeft.models.causal_lm`, shared with Llama.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import nn
from jpeft.formats.hf_io import CheckpointError
from jpeft.models.family import Family
from jpeft.models import causal_lm, sampling
from jpeft.models.causal_lm import left_align, positions_from_mask, visibility  # noqa: F401  (part of this module's API)

Params = dict[str, Any]

MODEL_TYPES = ("gemma2", "gemma3_text", "gemma3")  # gemma3: the multimodal config, of which the text decoder is used
CAUSAL_LM = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclasses.dataclass(frozen=True)
class Arch:
    """The hashable subset of a Gemma 2 / Gemma 3 text config that the model functions need (a jit static arg)."""

    model_type: str  # "gemma2" or "gemma3_text"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    act: str
    ropes: tuple[tuple[tuple[str, Any], ...], ...]  # per layer: sorted items of its rope parameters
    windows: tuple[int | None, ...]  # per layer: sliding-window size, None for global attention
    query_scale: float  # query_pre_attn_scalar ** -0.5
    attn_softcap: float | None
    final_softcap: float | None
    qk_norm: bool
    attention_bias: bool
    attention_dropout: float
    tie_word_embeddings: bool
    pad_token_id: int
    eos_token_ids: tuple[int, ...]


def _text_config(config: Any) -> Any:
    """The text decoder's config: a multimodal Gemma 3 config's `text_config`, anything else as given."""
    return config.text_config if getattr(config, "model_type", None) == "gemma3" else config


def _ropes(config: Any, model_type: str) -> tuple[tuple[tuple[str, Any], ...], ...]:
    rope = dict(config.rope_parameters or {})
    by_type = rope if model_type == "gemma3_text" else {t: rope for t in set(config.layer_types)}  # Gemma 2: one rope for all
    return tuple(tuple(sorted(causal_lm.check_rope(by_type[t]).items())) for t in config.layer_types)


def arch(config: Any) -> Arch:
    """Read the architecture from a transformers Gemma2Config / Gemma3TextConfig / Gemma3Config (or pass an `Arch` through)."""
    if isinstance(config, Arch):
        return config
    config = _text_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type not in CAUSAL_LM:
        raise ValueError(f"unsupported model_type {model_type!r}; jpeft.models.gemma handles {list(MODEL_TYPES)}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True (an encoder-style Gemma) is not supported: jpeft's Gemma is causal")
    kinds = set(config.layer_types) - {"sliding_attention", "full_attention"}
    if kinds:
        raise ValueError(f"unsupported layer_types {sorted(kinds)}; jpeft implements sliding_attention and full_attention")
    eos = causal_lm.eos_ids(config)
    heads = config.num_attention_heads
    return Arch(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=config.num_key_value_heads or heads,
        head_dim=config.head_dim or config.hidden_size // heads,
        eps=float(config.rms_norm_eps),
        act=config.hidden_activation,
        ropes=_ropes(config, model_type),
        windows=tuple(config.sliding_window if t == "sliding_attention" else None for t in config.layer_types),
        query_scale=float(config.query_pre_attn_scalar) ** -0.5,
        # Gemma 3 configs carry attn_logit_softcapping too, but transformers' Gemma 3 attention never applies it.
        attn_softcap=config.attn_logit_softcapping if model_type == "gemma2" else None,
        final_softcap=config.final_logit_softcapping,
        qk_norm=model_type == "gemma3_text",
        attention_bias=bool(config.attention_bias),
        attention_dropout=float(config.attention_dropout or 0.0),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0),
        eos_token_ids=eos,
    )


# ----------------------------------------------------------------------------------------------
# Parameter shapes, initialisation and the Hugging Face name mapping


def param_shapes(config: Any, tie_word_embeddings: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Flat {path: shape} of the base model's parameters (tied head unless the config or caller says otherwise)."""
    a = arch(config)
    tied = a.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    D, F, E = a.hidden_size, a.intermediate_size, a.head_dim
    shapes = causal_lm.outer_shapes(a, tied)
    mlp = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    for i in range(a.num_layers):
        prefix = f"model/layers/{i}"
        for name in NORMS:
            shapes[f"{prefix}/{name}/weight"] = (D,)
        if a.qk_norm:
            shapes[f"{prefix}/self_attn/q_norm/weight"] = (E,)
            shapes[f"{prefix}/self_attn/k_norm/weight"] = (E,)
        shapes.update(causal_lm.attention_shapes(a, prefix, a.attention_bias, a.attention_bias))
        for name, shape in mlp.items():
            shapes[f"{prefix}/mlp/{name}/kernel"] = shape
    return shapes


def init_params(config: Any, key: jax.Array, tie_word_embeddings: bool | None = None, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0, initializer_range) like transformers; norm weights and biases zero)."""
    std = getattr(_text_config(config), "initializer_range", 0.02)
    return causal_lm.random_params(param_shapes(config, tie_word_embeddings), key, std, dtype, norm=0.0)  # a zero norm scales by 1 + 0


def params_from_state_dict(config: Any, state: dict[str, np.ndarray], dtype: Any = jnp.float32, source: str = "checkpoint") -> Params:
    """Convert a transformers Gemma 2 / Gemma 3 text state dict to a jpeft tree, checking every name and shape first."""
    return causal_lm.params_from_state_dict(FAMILY, config, state, dtype, source)


def state_dict_from_params(config: Any, params: Params) -> dict[str, np.ndarray]:
    """jpeft tree -> transformers state dict (PyTorch layout); refuses leaves the base model does not have."""
    return causal_lm.state_dict_from_params(FAMILY, config, params)


def config_from_dict(raw: dict, source: str = "config"):
    """A transformers Gemma2Config / Gemma3TextConfig for a config dict (a multimodal Gemma 3's `text_config`)."""
    import transformers

    model_type = raw.get("model_type")
    if model_type == "gemma3":
        raw = {**raw.get("text_config", {}), "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    classes = {"gemma2": transformers.Gemma2Config, "gemma3_text": transformers.Gemma3TextConfig}
    if model_type not in classes:
        raise CheckpointError(f"{source} describes a {model_type!r} model; jpeft.models.gemma handles {list(MODEL_TYPES)}")
    return classes[model_type].from_dict(raw)


def load_config(path_or_hub_id: str | os.PathLike):
    """The config of a checkpoint directory, hub id, known name or `.gguf` file."""
    return causal_lm.load_config(FAMILY, path_or_hub_id)


def load_pretrained(path_or_hub_id: str | os.PathLike, dtype: Any = jnp.float32, allow_pickle: bool = False, quantized: bool = False,
                    quantize: str | None = None, mesh: Any = None):
    """(config, params) from an HF directory or hub id (config.json + safetensors), a `.gguf` file or a known name.

    Streamed tensor by tensor (`jpeft.formats.loading`): `quantize="nf4"` or `"int8"` quantizes the projections as they are
    read, `mesh` places each leaf on its shards; `quantized=True` keeps a GGUF file's quantized Linear weights packed
    as `jpeft.quant` leaf groups.
    """
    return causal_lm.load_pretrained(FAMILY, path_or_hub_id, dtype, allow_pickle, quantized, quantize, mesh)


def save_pretrained(out_dir: str | os.PathLike, config: Any, params: Params) -> None:
    """Write a standard HF directory (config.json + model.safetensors) that transformers loads as Gemma*ForCausalLM."""
    causal_lm.save_pretrained(FAMILY, out_dir, _text_config(config), params)


# ----------------------------------------------------------------------------------------------
# The network


def rms_norm(weight: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """Gemma's RMS norm: x / rms(x) * (1 + weight), all in float32 and then cast to x's dtype.

    Llama casts the normalised x to the compute dtype before scaling; Gemma scales first (transformers PR 29402).
    """
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def _softcap(x: jax.Array, cap: float | None) -> jax.Array:
    return x if cap is None else jnp.tanh(x / cap) * cap


def _layer(p: Params, x, cos, sin, visible, a: Arch, ctx: nn.Ctx, cache=None, index=0):
    qk_norm = (lambda w, t: rms_norm(w, t, a.eps)) if a.qk_norm else None
    h = rms_norm(p["input_layernorm"]["weight"], x, a.eps)
    h, cache = causal_lm.self_attention(p["self_attn"], h, cos, sin, visible, a, ctx, cache, index,
                                        scale=a.query_scale, softcap=a.attn_softcap, qk_norm=qk_norm)
    h = rms_norm(p["post_attention_layernorm"]["weight"], h, a.eps)
    x = x + nn.adapter(p["self_attn"].get("adapter"), h, ctx)
    h = rms_norm(p["pre_feedforward_layernorm"]["weight"], x, a.eps)
    h = causal_lm.gated_mlp(p["mlp"], h, a.act, ctx)
    h = rms_norm(p["post_feedforward_layernorm"]["weight"], h, a.eps)
    return x + nn.adapter(p["mlp"].get("adapter"), h, ctx), cache


def embed(config: Any, params: Params, input_ids: jax.Array, attention_mask: jax.Array, dtype: Any,
          ctx: nn.Ctx | None = None) -> tuple[jax.Array, jax.Array]:
    """Token embeddings times sqrt(D) with any soft prompt prepended: (B, N+T, D) and the widened (B, N+T) mask."""
    return causal_lm.embed(params, input_ids, attention_mask, dtype, scale=arch(config).hidden_size**0.5, ctx=ctx)


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
    """Decoder stack -> (final-normed hidden states (B, T, D), updated cache); arguments as `llama.decoder`'s."""
    a, ctx = arch(config), ctx or nn.Ctx()
    query_index = index + jnp.arange(x.shape[1])
    # Each distinct (window, rope) pair of layers gets one (visible, cos, sin); layer i uses the k-th.
    kinds = list(dict.fromkeys(zip(a.windows, a.ropes)))
    tables = [(causal_lm.layer_visibility(key_mask, query_index, w, segment_ids, cache), *causal_lm.rotary(dict(r), a.head_dim, positions))
              for w, r in kinds]
    x, cache = causal_lm.run_layers(_layer, a, params, x, tables, [kinds.index(k) for k in zip(a.windows, a.ropes)], ctx, cache, index)
    return rms_norm(params["model"]["norm"]["weight"], x, a.eps), cache


def lm_head(config: Any, params: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """Hidden states (..., D) -> float32 logits (..., V) through the tied embedding (or `lm_head`), soft-capped (Gemma 2)."""
    return _softcap(causal_lm.lm_head(params, x, ctx), arch(config).final_softcap)


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
    """Causal-LM logits (B, T, V) in float32 for the real input tokens, as `llama.forward` (soft prompt cut off
    unless `prompt_logits`)."""
    return causal_lm.forward(FAMILY, arch(config), params, input_ids, attention_mask, dtype=dtype, dropout_rng=dropout_rng,
                             lora_dropout=lora_dropout, adapter_ids=adapter_ids, remat=remat, prompt_logits=prompt_logits)


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
    prompt_lookup: int = 0,
    sample: sampling.Sampling | None = None,
    key: jax.Array | None = None,
    num_return_sequences: int = 1,
    return_logprobs: bool = False,
):
    """Greedy (num_beams=1), beam search or sampling with a key/value cache, as `llama.generate`; (B, max_new_tokens) ids."""
    return causal_lm.generate(FAMILY, arch(config), params, input_ids, attention_mask, max_new_tokens, num_beams,
                              length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos_token_id,
                              dtype=dtype, adapter_ids=adapter_ids, prompt_lookup=prompt_lookup, sample=sample, key=key,
                              num_return_sequences=num_return_sequences, return_logprobs=return_logprobs)


# What the shared decoder is handed (see jpeft.models.causal_lm); `jpeft.models.family.of` finds it by model_type.
FAMILY = Family("gemma", CAUSAL_LM, MODEL_TYPES, arch, param_shapes, config_from_dict, embed, decoder, lm_head)
