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

Soft prompts: a top-level `prompt_embeddings` (N, D) leaf, or a P-tuning `prompt_encoder`'s output
(`soft_prompt.rows_of`), is prepended to every row's input embeddings with
the mask extended by N ones, as PEFT's `PeftModelForCausalLM` does for prompt tuning (before any left
padding). PEFT drops `position_ids` and numbers all N + T slots, which agrees with the cumulative-sum rule on
right-padded batches (training) but not on left-padded ones, where jpeft keeps positions padding-independent.

Prefix tuning (`jpeft.prefix`): every layer's attention sees its N prefix keys/values before the tokens' own, and the
tokens' positions start at N, as when PEFT passes the prefix as a `DynamicCache` with the mask extended by N ones.
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
from jpeft.models import ops

Params = dict[str, Any]

MODEL_TYPES = ("llama", "mistral", "qwen2")
CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


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
    eos = causal_lm.eos_ids(config)
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
        rope=tuple(sorted(causal_lm.rope_parameters(config).items())),
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
    D, F = a.hidden_size, a.intermediate_size
    shapes = causal_lm.outer_shapes(a, tied)
    mlp = {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    for i in range(a.num_layers):
        prefix = f"model/layers/{i}"
        shapes[f"{prefix}/input_layernorm/weight"] = (D,)
        shapes[f"{prefix}/post_attention_layernorm/weight"] = (D,)
        shapes.update(causal_lm.attention_shapes(a, prefix, a.qkv_bias, a.o_bias))
        for name, shape in mlp.items():
            shapes[f"{prefix}/mlp/{name}/kernel"] = shape
            if a.mlp_bias:
                shapes[f"{prefix}/mlp/{name}/bias"] = shape[1:]
    return shapes


def init_params(config: Any, key: jax.Array, tie_word_embeddings: bool | None = None, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0, initializer_range) like transformers; norms one, biases zero)."""
    return causal_lm.random_params(param_shapes(config, tie_word_embeddings), key, getattr(config, "initializer_range", 0.02), dtype)


def params_from_state_dict(config: Any, state: dict[str, np.ndarray], dtype: Any = jnp.float32, source: str = "checkpoint") -> Params:
    """Convert a transformers Llama-family state dict to a jpeft tree, checking every name and shape first."""
    return causal_lm.params_from_state_dict(FAMILY, config, state, dtype, source)


def state_dict_from_params(config: Any, params: Params) -> dict[str, np.ndarray]:
    """jpeft tree -> transformers state dict (PyTorch layout); refuses leaves the base model does not have."""
    return causal_lm.state_dict_from_params(FAMILY, config, params)


def config_from_dict(raw: dict, source: str = "config"):
    """A transformers config of the right class for a Llama/Mistral/Qwen2 config dict."""
    model_type = raw.get("model_type", "llama")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source} describes a {model_type!r} model; jpeft.models.llama handles {list(MODEL_TYPES)}")
    return _config_class(model_type).from_dict(raw)


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
    """Write a standard HF directory (config.json + model.safetensors) atomically."""
    causal_lm.save_pretrained(FAMILY, out_dir, config, params)


# ----------------------------------------------------------------------------------------------
# The network


def _layer(p: Params, x, cos, sin, visible, a: Arch, ctx: nn.Ctx, cache=None, index=0):
    h = ops.rms_norm(p["input_layernorm"]["weight"], x, a.eps, ctx.dtype)
    h, cache = causal_lm.self_attention(p["self_attn"], h, cos, sin, visible, a, ctx, cache, index, scale=a.head_dim**-0.5)
    x = x + nn.adapter(p["self_attn"].get("adapter"), h, ctx)
    h = ops.rms_norm(p["post_attention_layernorm"]["weight"], x, a.eps, ctx.dtype)
    h = causal_lm.gated_mlp(p["mlp"], h, a.act, ctx)
    return x + nn.adapter(p["mlp"].get("adapter"), h, ctx), cache


def embed(config: Any, params: Params, input_ids: jax.Array, attention_mask: jax.Array, dtype: Any,
          ctx: nn.Ctx | None = None) -> tuple[jax.Array, jax.Array]:
    """Token embeddings with any soft prompt prepended: (B, N+T, D) and the widened (B, N+T) mask."""
    return causal_lm.embed(params, input_ids, attention_mask, dtype, ctx=ctx)


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
    `key_mask` (B, S) says which key slots hold real tokens. Without `cache`, S = index + T: the keys are the
    inputs themselves after `index` prefix-tuning slots (0 without a prefix); with `cache` (per layer (k, v) of
    (B, KV, S, E)) this call's keys are written at `index`.
    `segment_ids` (B, T) of a packed batch (no cache) keep attention inside each segment.
    """
    a, ctx = arch(config), ctx or nn.Ctx()
    cos, sin = causal_lm.rotary(dict(a.rope), a.head_dim, positions)
    query_index = index + jnp.arange(x.shape[1])
    windows = list(dict.fromkeys(a.windows))  # one (visible, cos, sin) per distinct window
    tables = [(causal_lm.layer_visibility(key_mask, query_index, w, segment_ids, cache), cos, sin) for w in windows]
    x, cache = causal_lm.run_layers(_layer, a, params, x, tables, [windows.index(w) for w in a.windows], ctx, cache, index)
    return ops.rms_norm(params["model"]["norm"]["weight"], x, a.eps, ctx.dtype), cache


def lm_head(config: Any, params: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """Hidden states (..., D) -> float32 logits (..., V), through the tied embedding when there is no `lm_head`."""
    return causal_lm.lm_head(params, x, ctx)


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
    """Greedy (num_beams=1) or beam search; returns (B, max_new_tokens) generated ids, pad after EOS.

    Prompts may be left- or right-padded (rows are left-aligned first). The prompt length and the cache
    length are rounded up to buckets, so a run over many batches compiles only a few shapes; the loop runs
    on device with a key/value cache. `eos_token_id` defaults to the config's EOS id(s). With several EOS ids
    (Llama 3 Instruct) greedy rows stop at any of them, though the loop only ends early on the first; beam
    search needs a single id. `prompt_lookup=N` drafts up to N tokens per step from each row's own prompt and
    output (`jpeft.generation.lookup_search`) and verifies them in one pass: greedy's tokens exactly, in fewer
    passes when the output copies the prompt (summaries); `dtype=jnp.bfloat16` computes in bfloat16.

    `sample=jpeft.sampling.Sampling(temperature=..., top_k=..., top_p=..., min_p=..., repetition_penalty=...)` samples
    instead (transformers' `do_sample=True`) with `key` (a `jax.random.key`: the same key, the same tokens), and
    `num_return_sequences` samples per prompt (rows r * n .. r * n + n - 1 are prompt r's); `return_logprobs=True`
    returns (ids, log-probabilities of the sampled tokens under the distribution they were drawn from).
    """
    return causal_lm.generate(FAMILY, arch(config), params, input_ids, attention_mask, max_new_tokens, num_beams,
                              length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos_token_id,
                              dtype=dtype, adapter_ids=adapter_ids, prompt_lookup=prompt_lookup, sample=sample, key=key,
                              num_return_sequences=num_return_sequences, return_logprobs=return_logprobs)


# What the shared decoder is handed (see jpeft.models.causal_lm); `jpeft.models.family.of` finds it by model_type.
FAMILY = Family("llama", CAUSAL_LM, MODEL_TYPES, arch, param_shapes, config_from_dict, embed, decoder, lm_head)
