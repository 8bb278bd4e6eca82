"""Mixture-of-experts decoders (Qwen3-MoE, Mixtral, OLMoE) as pure functions of a nested parameter dict.

Shapes: B batch, T tokens, N = B * T routed tokens, D hidden, X experts, K experts per token, F an expert's hidden
size, R = N * K routed rows, H query heads, KV key/value heads, E head_dim, V vocab.

The tree mirrors transformers 5's names, as `jpeft.models.llama` does, with each routed-experts parameter a module of
its own so that PEFT leaves sit beside it: `model/layers/{i}/mlp/gate/kernel` (D, X) the router (`mlp.gate.weight`),
`model/layers/{i}/mlp/experts/gate_up_proj/kernel` (X, D, 2F) and `.../experts/down_proj/kernel` (X, F, D)
(`mlp.experts.gate_up_proj` (X, 2F, D) and `mlp.experts.down_proj` (X, D, F), each expert's matrix transposed).
Qwen3-MoE's dense layers (`mlp_only_layers`, `decoder_sparse_step`) hold Llama's `mlp/{gate,up,down}_proj`.
Attention, norms, rotary positions, soft prompts, prefixes, bottleneck adapters, packing, the KV-cached generation
loop and the checkpoint plumbing are `jpeft.models.causal_lm`'s, shared with Llama and Gemma.

Routing, as transformers computes it: router logits x W_gate (N, X), softmax in float32, the top K probabilities
(renormalised to sum to one when `norm_topk_prob`, always for Mixtral) weight the chosen experts' outputs
down(act(gate(x)) * up(x)). The N * K (token, expert) pairs are sorted by expert and run as two grouped matmuls
(`jpeft.nn.grouped_dense`): every expert sees only its own rows, never a dense pass over all experts.
What differs between the families: Qwen3-MoE normalises each query and key head (QK-norm) and may keep some layers
dense; OLMoE normalises the whole query and key projections and may clip q, k, v (`clip_qkv`); Mixtral has neither,
always renormalises the top K, and jitters the router's input while training (`router_jitter_noise`).

The router's load-balancing loss (transformers' `load_balancing_loss_func`, Switch Transformer's): with
`output_router_logits=True` in the config, `jpeft.training.causal_lm_loss` adds `router_aux_loss_coef` times it, as
the transformers models add it to their loss; `router_outputs` returns the loss and each layer's router logits.

Checkpoints: transformers 5 writes (and the hub holds) each expert's Linear weights apart
(`mlp.experts.{x}.{gate,up,down}_proj.weight`; Mixtral's `block_sparse_moe.experts.{x}.w{1,3,2}.weight`) and stacks
them when it loads. `load_pretrained` reads that layout or the stacked one; `save_pretrained` writes the per-expert
one. GGUF files are not read for these models.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import nn
from jpeft import targets as tg
from jpeft.formats.hf_io import CheckpointError
from jpeft.models.family import Family
from jpeft.methods import prefix
from jpeft.models import causal_lm, ops, registry

Params = dict[str, Any]

MODEL_TYPES = ("qwen3_moe", "mixtral", "olmoe")
CAUSAL_LM = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM"}
# A hub checkpoint's per-expert Linear names for gate, up, down: Qwen3-MoE / OLMoE's, and Mixtral's (under `block_sparse_moe`).
_PER_EXPERT = {"mlp": ("gate_proj", "up_proj", "down_proj"), "block_sparse_moe": ("w1", "w3", "w2")}


@dataclasses.dataclass(frozen=True)
class Arch:
    """The hashable subset of a Qwen3-MoE / Mixtral / OLMoE config that the model functions need (a jit static arg)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP's hidden size (Qwen3-MoE's mlp_only_layers)
    expert_size: int  # each expert's hidden size F
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    act: str
    rope: tuple[tuple[str, Any], ...]  # sorted items of transformers' `rope_parameters`
    windows: tuple[int | None, ...]  # per layer: sliding-window size, None for full attention
    sparse: tuple[bool, ...]  # per layer: routed experts (True) or a dense MLP
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    qk_norm: str | None  # "head" (Qwen3-MoE: each head), "projection" (OLMoE: all heads at once), or None
    clip_qkv: float | None
    attention_bias: bool
    router_jitter: float
    aux_loss_coef: float  # router_aux_loss_coef with output_router_logits, else 0 (transformers adds the term only then)
    attention_dropout: float
    tie_word_embeddings: bool
    pad_token_id: int
    eos_token_ids: tuple[int, ...]


def arch(config: Any) -> Arch:
    """Read the architecture from a transformers Qwen3MoeConfig / MixtralConfig / OlmoeConfig (or pass an `Arch` through)."""
    if isinstance(config, Arch):
        return config
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; jpeft.models.moe handles {list(MODEL_TYPES)}")
    L, heads = config.num_hidden_layers, config.num_attention_heads
    experts = int(config.num_experts or 0)
    if model_type == "qwen3_moe":
        step, dense = config.decoder_sparse_step, set(config.mlp_only_layers or ())
        sparse = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(L))
    else:
        sparse = (True,) * L
    if any(sparse) and not 0 < config.num_experts_per_tok <= experts:
        raise ValueError(f"num_experts_per_tok={config.num_experts_per_tok} must lie in 1..num_experts={experts}")
    eos = causal_lm.eos_ids(config)
    window = None if model_type == "olmoe" else getattr(config, "sliding_window", None)
    return Arch(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        expert_size=config.moe_intermediate_size if model_type == "qwen3_moe" else config.intermediate_size,
        num_layers=L,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        eps=float(config.rms_norm_eps),
        act=config.hidden_act,
        rope=tuple(sorted(causal_lm.rope_parameters(config).items())),
        windows=(window,) * L,
        sparse=sparse,
        num_experts=experts,
        top_k=int(config.num_experts_per_tok),
        norm_topk_prob=model_type == "mixtral" or bool(config.norm_topk_prob),
        qk_norm={"qwen3_moe": "head", "olmoe": "projection"}.get(model_type),
        clip_qkv=getattr(config, "clip_qkv", None),
        attention_bias=model_type != "mixtral" and bool(config.attention_bias),
        router_jitter=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
        aux_loss_coef=float(config.router_aux_loss_coef) if config.output_router_logits else 0.0,
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
    D, X, F = a.hidden_size, a.num_experts, a.expert_size
    q_out = a.num_heads * a.head_dim
    shapes = causal_lm.outer_shapes(a, tied)
    norms = {"head": (a.head_dim, a.head_dim), "projection": (q_out, (a.hidden_size // a.num_heads) * a.num_kv_heads)}.get(a.qk_norm)
    experts = {"gate/kernel": (D, X), "experts/gate_up_proj/kernel": (X, D, 2 * F), "experts/down_proj/kernel": (X, F, D)}
    dense = {"gate_proj/kernel": (D, a.intermediate_size), "up_proj/kernel": (D, a.intermediate_size),
             "down_proj/kernel": (a.intermediate_size, D)}
    for i in range(a.num_layers):
        prefix = f"model/layers/{i}"
        shapes[f"{prefix}/input_layernorm/weight"] = (D,)
        shapes[f"{prefix}/post_attention_layernorm/weight"] = (D,)
        shapes.update(causal_lm.attention_shapes(a, prefix, a.attention_bias, a.attention_bias))
        if norms:
            shapes[f"{prefix}/self_attn/q_norm/weight"], shapes[f"{prefix}/self_attn/k_norm/weight"] = (norms[0],), (norms[1],)
        for name, shape in (experts if a.sparse[i] else dense).items():
            shapes[f"{prefix}/mlp/{name}"] = shape
    return shapes


def init_params(config: Any, key: jax.Array, tie_word_embeddings: bool | None = None, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal(0, initializer_range) like transformers; norms one, biases zero)."""
    return causal_lm.random_params(param_shapes(config, tie_word_embeddings), key, getattr(config, "initializer_range", 0.02), dtype)


def stack_experts(config: Any, state: dict[str, np.ndarray], source: str = "checkpoint") -> dict[str, np.ndarray]:
    """A state dict with each layer's per-expert Linear weights (the hub's layout, see the module docstring) stacked as
    transformers 5 holds them, Mixtral's `block_sparse_moe` renamed `mlp`; a stacked state dict passes through."""
    a = arch(config)
    pattern = re.compile(r"^(model\.layers\.\d+)\.(mlp|block_sparse_moe)\.(experts\.(\d+)\.(\w+)\.weight|gate\.weight)$")
    out, found = {}, {}
    for name, value in state.items():
        m = pattern.match(name)
        if m is None:
            out[name] = value
        elif m.group(4) is None:  # the router
            out[f"{m.group(1)}.mlp.gate.weight"] = value
        elif m.group(5) in _PER_EXPERT[m.group(2)]:
            found.setdefault((m.group(1), m.group(2)), {})[(int(m.group(4)), _PER_EXPERT[m.group(2)].index(m.group(5)))] = value
        else:
            out[name] = value  # reported as unexpected by the name check
    for (layer, block), tensors in sorted(found.items()):
        have = sorted({x for x, _ in tensors})
        if have != list(range(a.num_experts)) or len(tensors) != 3 * a.num_experts:
            names = _PER_EXPERT[block]
            missing = sorted(f"{layer}.{block}.experts.{x}.{names[j]}.weight" for x in range(a.num_experts) for j in range(3)
                             if (x, j) not in tensors)
            raise CheckpointError(f"{source} holds {len(have)} experts (numbered {have[0]}..{have[-1]}) at {layer}.{block}, but the "
                                  f"config says num_experts={a.num_experts}" + (f"; missing {missing[:3]}" if missing else ""))
        gate, up, down = ([tensors[(x, j)] for x in range(a.num_experts)] for j in range(3))
        out[f"{layer}.mlp.experts.gate_up_proj"] = np.concatenate([np.stack(gate), np.stack(up)], axis=1)  # (X, 2F, D)
        out[f"{layer}.mlp.experts.down_proj"] = np.stack(down)  # (X, D, F)
    return out


def per_expert(config: Any, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of `stack_experts`: stacked experts written apart, under Mixtral's names for Mixtral (what transformers saves)."""
    a = arch(config)
    block = "block_sparse_moe" if a.model_type == "mixtral" else "mlp"
    out = {}
    for name, value in state.items():
        layer, _, rest = name.partition(".mlp.")
        if rest == "gate.weight":
            out[f"{layer}.{block}.gate.weight"] = value
        elif rest in (f"experts.{w}" for w in tg.EXPERT_PARAMETERS):
            if rest == "experts.gate_up_proj":
                parts = dict(zip(_PER_EXPERT[block][:2], np.split(value, 2, axis=1)))
            else:
                parts = {_PER_EXPERT[block][2]: value}
            out.update({f"{layer}.{block}.experts.{x}.{n}.weight": np.ascontiguousarray(w[x]) for n, w in parts.items()
                        for x in range(a.num_experts)})
        else:
            out[name] = value
    return out


def params_from_state_dict(config: Any, state: dict[str, np.ndarray], dtype: Any = jnp.float32, source: str = "checkpoint") -> Params:
    """Convert a transformers Qwen3-MoE / Mixtral / OLMoE state dict (per-expert or stacked) to a jpeft tree, checking
    every name, shape and expert count first."""
    return causal_lm.params_from_state_dict(FAMILY, config, state, dtype, source)


def state_dict_from_params(config: Any, params: Params) -> dict[str, np.ndarray]:
    """jpeft tree -> transformers state dict in the layout transformers saves (experts apart); refuses non-base leaves."""
    return causal_lm.state_dict_from_params(FAMILY, config, params)


def config_from_dict(raw: dict, source: str = "config"):
    """A transformers Qwen3MoeConfig / MixtralConfig / OlmoeConfig for a config dict."""
    import transformers

    classes = {"qwen3_moe": transformers.Qwen3MoeConfig, "mixtral": transformers.MixtralConfig, "olmoe": transformers.OlmoeConfig}
    model_type = raw.get("model_type")
    if model_type not in classes:
        raise CheckpointError(f"{source} describes a {model_type!r} model; jpeft.models.moe handles {list(MODEL_TYPES)}")
    return classes[model_type].from_dict(raw)


def load_config(path_or_hub_id: str | os.PathLike):
    """The config of a checkpoint directory or hub id."""
    return causal_lm.load_config(FAMILY, _not_gguf(path_or_hub_id))


def load_pretrained(path_or_hub_id: str | os.PathLike, dtype: Any = jnp.float32, allow_pickle: bool = False):
    """(config, params) from an HF directory or hub id (config.json + safetensors, experts apart or stacked)."""
    return causal_lm.load_pretrained(FAMILY, _not_gguf(path_or_hub_id), dtype, allow_pickle)


def _not_gguf(path_or_hub_id: str | os.PathLike) -> str | os.PathLike:
    path = registry.resolve(path_or_hub_id)
    if str(path).endswith(".gguf"):
        raise CheckpointError(f"{path}: jpeft reads mixture-of-experts models from safetensors directories; GGUF's expert "
                              "tensors (ffn_*_exps) are not read yet: convert the model with transformers")
    return path


def save_pretrained(out_dir: str | os.PathLike, config: Any, params: Params) -> None:
    """Write a standard HF directory (config.json + model.safetensors, experts apart as transformers saves them) atomically."""
    causal_lm.save_pretrained(FAMILY, out_dir, config, params)


# ----------------------------------------------------------------------------------------------
# Routing


def _routing(a: Arch, mask: jax.Array, keep_logits: bool) -> dict[str, jax.Array]:
    """The routing statistics carried through the layers: token mask (N,), per-expert sums of the load-balancing loss,
    and with `keep_logits` each routed layer's logits (layers, N, X) and the index of the next one."""
    X = a.num_experts
    routing = {"mask": mask.reshape(-1).astype(jnp.float32), "chosen": jnp.zeros((X,), jnp.float32), "probs": jnp.zeros((X,), jnp.float32)}
    if keep_logits:
        routing.update(logits=jnp.zeros((sum(a.sparse), mask.size, X), jnp.float32), layer=jnp.int32(0))
    return routing


def _route(p: Params, x: jax.Array, a: Arch, ctx: nn.Ctx, routing: dict) -> tuple[jax.Array, jax.Array, dict]:
    """Router logits for x (N, D) -> (top-K weights (N, K) in the compute dtype, their experts (N, K), updated routing)."""
    logits = nn.dense(p, x, ctx)  # (N, X), in the compute dtype as transformers' F.linear
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, a.top_k)
    if a.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    mask = routing["mask"]
    routing = {**routing, "chosen": routing["chosen"] + jnp.zeros(a.num_experts).at[experts].add(mask[:, None]),
               "probs": routing["probs"] + jnp.sum(jax.nn.softmax(logits, axis=-1).astype(jnp.float32) * mask[:, None], axis=0)}
    if "logits" in routing:
        layer = routing["layer"]
        routing.update(logits=jax.lax.dynamic_update_index_in_dim(routing["logits"], logits.astype(jnp.float32), layer, 0), layer=layer + 1)
    return weights.astype(ctx.dtype), experts, routing


def load_balancing_loss(a: Arch, routing: dict) -> jax.Array:
    """transformers' `load_balancing_loss_func` from the carried sums: X * sum_x (routed share of x) * (mean router probability
    of x), both over every routed layer's real tokens; the share counts K choices per token, so it sums to K."""
    rows = jnp.maximum(routing["mask"].sum() * sum(a.sparse), 1.0)
    return a.num_experts * jnp.sum((routing["chosen"] / rows) * (routing["probs"] / rows))


def _experts(p: Params, h: jax.Array, a: Arch, ctx: nn.Ctx, routing: dict) -> tuple[jax.Array, dict]:
    """The sparse MLP: h (B, T, D) -> (sum over each token's K experts of weight * down(act(gate) * up), routing)."""
    B, T, D = h.shape
    x = h.reshape(B * T, D)
    if a.router_jitter and not ctx.deterministic:  # Mixtral: training-time noise on what the router and the experts see
        x = x * jax.random.uniform(ctx.next_key(), x.shape, x.dtype, 1.0 - a.router_jitter, 1.0 + a.router_jitter)
    weights, experts, routing = _route(p["gate"], x, a, ctx, routing)
    flat = experts.reshape(-1)  # (R,): row n K + k sends token n to its k-th expert
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.zeros((a.num_experts,), jnp.int32).at[flat].add(1)
    rows = x[order // a.top_k]  # (R, D), grouped by expert
    gate, up = jnp.split(nn.keep(nn.grouped_dense(p["experts"]["gate_up_proj"], rows, sizes, ctx)), 2, axis=-1)
    out = nn.grouped_dense(p["experts"]["down_proj"], ops.activation(a.act)(gate) * up, sizes, ctx)
    out = out * weights.reshape(-1)[order][:, None]
    y = jnp.zeros_like(out).at[order].set(out, unique_indices=True).reshape(B * T, a.top_k, D).sum(axis=1)
    return y.reshape(B, T, D), routing


# ----------------------------------------------------------------------------------------------
# The network


def _qk_norm(a: Arch, ctx: nn.Ctx):
    if a.qk_norm == "head":
        return lambda w, t: ops.rms_norm(w, t, a.eps, ctx.dtype)
    if a.qk_norm == "projection":  # over all heads of a token at once: (B, T, heads, E) normed as (B, T, heads * E)
        return lambda w, t: ops.rms_norm(w, t.reshape(*t.shape[:2], -1), a.eps, ctx.dtype).reshape(t.shape)
    return None


def _layer(p: Params, carry, cos, sin, visible, a: Arch, ctx: nn.Ctx, cache=None, index=0):
    x, routing = carry
    h = ops.rms_norm(p["input_layernorm"]["weight"], x, a.eps, ctx.dtype)
    h, cache = causal_lm.self_attention(p["self_attn"], h, cos, sin, visible, a, ctx, cache, index, scale=a.head_dim**-0.5,
                                        qk_norm=_qk_norm(a, ctx), clip=a.clip_qkv)
    x = x + nn.adapter(p["self_attn"].get("adapter"), h, ctx)
    h = ops.rms_norm(p["post_attention_layernorm"]["weight"], x, a.eps, ctx.dtype)
    if "experts" in p["mlp"]:
        h, routing = _experts(p["mlp"], h, a, ctx, routing)
    else:
        h = causal_lm.gated_mlp(p["mlp"], h, a.act, ctx)
    return (x + nn.adapter(p["mlp"].get("adapter"), h, ctx), routing), cache


def embed(config: Any, params: Params, input_ids: jax.Array, attention_mask: jax.Array, dtype: Any,
          ctx: nn.Ctx | None = None) -> tuple[jax.Array, jax.Array]:
    """Token embeddings with any soft prompt prepended: (B, N+T, D) and the widened (B, N+T) mask."""
    return causal_lm.embed(params, input_ids, attention_mask, dtype, ctx=ctx)


def _decode(a: Arch, params: Params, x, positions, key_mask, ctx: nn.Ctx, cache, index, segment_ids, keep_logits: bool = False):
    """The decoder stack -> (final-normed hidden states, cache, routing statistics of the tokens)."""
    cos, sin = causal_lm.rotary(dict(a.rope), a.head_dim, positions)
    query_index = index + jnp.arange(x.shape[1])
    windows = list(dict.fromkeys(a.windows))  # one (visible, cos, sin) per distinct window
    tables = [(causal_lm.layer_visibility(key_mask, query_index, w, segment_ids, cache), cos, sin) for w in windows]
    # A token counts in the load-balancing loss where it is real (its key slot is set); decoding steps count every token.
    mask = jnp.ones(x.shape[:2]) if cache is not None else key_mask[:, key_mask.shape[1] - x.shape[1]:] > 0
    (x, routing), cache = causal_lm.run_layers(_layer, a, params, (x, _routing(a, mask, keep_logits)), tables,
                                               [windows.index(w) for w in a.windows], ctx, cache, index)
    return ops.rms_norm(params["model"]["norm"]["weight"], x, a.eps, ctx.dtype), cache, routing


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
    """Decoder stack -> (final-normed hidden states (B, T, D), updated cache); arguments as `llama.decoder`'s.

    Without a cache and with a nonzero `aux_loss_coef` (the config's `output_router_logits`), sets `ctx.aux_loss` to
    `router_aux_loss_coef` times the load-balancing loss, which `jpeft.training.causal_lm_loss` adds to its loss.
    """
    a, ctx = arch(config), ctx or nn.Ctx()
    h, cache, routing = _decode(a, params, x, positions, key_mask, ctx, cache, index, segment_ids)
    if a.aux_loss_coef and cache is None:
        ctx.aux_loss = a.aux_loss_coef * load_balancing_loss(a, routing)
    return h, cache


def lm_head(config: Any, params: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """Hidden states (..., D) -> float32 logits (..., V), through the tied embedding when there is no `lm_head`."""
    return causal_lm.lm_head(params, x, ctx)


def forward(config: Any, params: Params, input_ids: jax.Array, attention_mask: jax.Array, **options) -> jax.Array:
    """Causal-LM logits (B, T, V) in float32 for the real input tokens: `llama.forward`'s keyword options (`dtype`,
    `dropout_rng`, `lora_dropout`, `adapter_ids`, `remat`, `prompt_logits`), through the same `causal_lm.forward`."""
    return causal_lm.forward(FAMILY, arch(config), params, input_ids, attention_mask, **options)


def router_outputs(config: Any, params: Params, input_ids: jax.Array, attention_mask: jax.Array, *,
                   dtype: Any = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits (B, T, V), router logits (layers, B * T, X) of each routed layer in order, the load-balancing loss before
    its coefficient): transformers' `logits`, `router_logits` and `aux_loss` with `output_router_logits=True` (the
    loss over the real tokens of `attention_mask`)."""
    a = arch(config)
    ctx = nn.Ctx(dtype=dtype)
    x, mask = embed(a, params, input_ids, attention_mask, dtype, ctx)  # a soft prompt's tokens are routed too
    n = prefix.num_tokens(params)
    key_mask = jnp.pad(mask, ((0, 0), (n, 0)), constant_values=1)  # as `causal_lm.forward`: a prefix's slots come first
    h, _, routing = _decode(a, params, x, causal_lm.positions_from_mask(key_mask)[:, n:], key_mask, ctx, None, n, None, keep_logits=True)
    logits = lm_head(a, params, h[:, h.shape[1] - input_ids.shape[1]:], ctx)
    return logits, routing["logits"], load_balancing_loss(a, routing)


def generate(config: Any, params: Params, input_ids, attention_mask=None, max_new_tokens: int = 64, num_beams: int = 1, **options):
    """Greedy, beam search or sampling with a key/value cache: `llama.generate`'s arguments and keyword options
    (`sample=jpeft.models.sampling.Sampling(...)`, `key`, `num_return_sequences`, `return_logprobs`, `prompt_lookup`, ...)."""
    return causal_lm.generate(FAMILY, arch(config), params, input_ids, attention_mask, max_new_tokens, num_beams, **options)


# What the shared decoder is handed (see jpeft.models.causal_lm); `jpeft.models.family.of` finds it by model_type.
FAMILY = Family("moe", CAUSAL_LM, MODEL_TYPES, arch, param_shapes, config_from_dict, embed, decoder, lm_head,
                stack_experts=stack_experts, per_expert=per_expert)
