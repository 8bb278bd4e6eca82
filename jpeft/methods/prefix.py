"""Prefix tuning (P-tuning v2): trained keys and values that every attention layer sees before the real tokens.

The tree gains a top-level `prefix_embeddings` leaf. Without projection it is the prefix itself, (N, L*2*KV*E):
N virtual tokens, L layers, a key and a value of KV key/value heads of E dims each, in HF PEFT's flat layout. With
`prefix_projection` it is (N, KV*E) token embeddings, and a `prefix_mlp` {"0": Linear KV*E -> encoder_hidden_size,
tanh, "2": Linear -> L*2*KV*E} computes the prefix from them, exactly PEFT's `PrefixEncoder` (`transform.0/.2`).

Which attention gets which rows, as PEFT 0.21.2 does (`PeftModel.get_prompt`), for row block r = rows.reshape(N, 2L, KV, E)[:, r]:

- decoder-only models (Llama, Gemma): layer l's self-attention gets keys r = 2l and values r = 2l + 1 (a DynamicCache);
- T5 (SEQ_2_SEQ_LM): PEFT duplicates the 2L blocks to 4L, gives decoder layer l the blocks 4l, 4l+1 (mod 2L) as its
  self-attention keys/values and 4l+2, 4l+3 as cross-attention ones, then replaces the cross-attention cache by an
  empty one. So only the decoder's self-attention sees a prefix; the encoder and cross-attention see none, and with
  an even L half of the rows are never read.

The real tokens then sit after the N prefix slots: their rotary positions (or T5 decoder positions) are offset by N,
every query sees every prefix slot (subject to a sliding window, as in transformers) and the attention mask gains N
ones. The models read the per-layer keys and values from `past_key_values` and put them in front of their own keys
(`jpeft.models.attention.prefixed`); generation writes them into the first N cache slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jpeft import leaves, nn
from jpeft.models import family

LEAF = "prefix_embeddings"
MLP = "prefix_mlp"


@dataclasses.dataclass(frozen=True)
class PrefixTuningConfig:
    """HF PEFT's PrefixTuningConfig: N virtual tokens, optionally reparameterised by a two-layer tanh MLP."""

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # the MLP's hidden width; PEFT's default is token_dim (KV * head_dim)
    init_weights: str | None = None  # None: random; "zero": a zero prefix (last MLP layer zero with projection)

    def __post_init__(self):
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights must be None or 'zero', got {self.init_weights!r}")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ValueError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a model takes its prefix: L layers of KV key/value heads of head_dim E; seq2seq is T5's row order."""

    num_layers: int
    num_heads: int
    head_dim: int
    seq2seq: bool

    @property
    def token_dim(self) -> int:
        """PEFT's token_dim: one layer's key (or value) width."""
        return self.num_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of the flat prefix: a key and a value per layer."""
        return self.num_layers * 2 * self.token_dim


def layout(config: Any) -> Layout:
    """The prefix layout of a T5 or decoder-only model (transformers config or jpeft Arch), as PEFT sizes it."""
    from jpeft.models import t5

    if hasattr(config, "d_kv"):
        a = t5.arch(config)
        if a.num_decoder_layers != a.num_layers:
            raise ValueError(f"PEFT sizes a T5 prefix by the encoder's {a.num_layers} layers, but the decoder has "
                             f"{a.num_decoder_layers}: prefix tuning needs num_decoder_layers == num_layers")
        if a.num_heads * a.d_kv != a.d_model:
            raise ValueError(f"PEFT splits a T5 prefix into heads of d_model / num_heads = {a.d_model / a.num_heads} dims, "
                             f"but this T5's heads have d_kv={a.d_kv}: prefix tuning needs num_heads * d_kv == d_model")
        return Layout(a.num_decoder_layers, a.num_heads, a.d_kv, seq2seq=True)
    a = family.of(config).arch(config)
    return Layout(a.num_layers, a.num_kv_heads, a.head_dim, seq2seq=False)


def inject(params: Mapping[str, Any], cfg: PrefixTuningConfig, key: jax.Array, config: Any) -> dict:
    """A new tree with the trainable prefix leaves, initialised as PEFT's PrefixEncoder (normal(0, 1) embeddings,
    torch.nn.Linear's uniform(+-1/sqrt(fan_in)) MLP)."""
    if LEAF in params:
        raise ValueError("this tree already has prefix_embeddings: split the old adapter off before injecting another")
    lay, n = layout(config), cfg.num_virtual_tokens
    k_emb, k0, k1, k2, k3 = jax.random.split(key, 5)
    zero = cfg.init_weights == "zero"
    if not cfg.prefix_projection:
        table = jnp.zeros((n, lay.width)) if zero else jax.random.normal(k_emb, (n, lay.width))
        return {**params, LEAF: table}
    hidden = cfg.encoder_hidden_size or lay.token_dim

    def linear(kw, kb, d_in, d_out):
        return {"kernel": nn.torch_uniform(kw, (d_in, d_out), d_in), "bias": nn.torch_uniform(kb, (d_out,), d_in)}

    out = linear(k2, k3, hidden, lay.width)
    if zero:
        out = jax.tree.map(jnp.zeros_like, out)
    return {**params, LEAF: jax.random.normal(k_emb, (n, lay.token_dim)), MLP: {"0": linear(k0, k1, lay.token_dim, hidden), "2": out}}


def num_tokens(params: Mapping[str, Any]) -> int:
    """N, the number of prefix slots in front of every attention's keys (0 without a prefix)."""
    return params[LEAF].shape[0] if LEAF in params else 0


def flat(params: Mapping[str, Any]) -> jax.Array:
    """The prefix (N, L*2*KV*E) in float32: the embeddings themselves, or their projection through the MLP."""
    rows = params[LEAF].astype(jnp.float32)
    if MLP not in params:
        return rows
    ctx = nn.Ctx()
    return nn.dense(params[MLP]["2"], jnp.tanh(nn.dense(params[MLP]["0"], rows, ctx)), ctx)


def past_key_values(params: Mapping[str, Any], config: Any) -> list[tuple[jax.Array, jax.Array]]:
    """Per layer, the prefix keys and values (KV, N, E) each, in PEFT's assignment of rows to layers (module docstring)."""
    lay = layout(config)
    rows = flat(params)
    n, L = rows.shape[0], lay.num_layers
    if rows.shape[1] != lay.width:
        raise ValueError(f"the prefix has {rows.shape[1]} columns, but this model needs {L} layers x 2 x {lay.num_heads} heads "
                         f"x {lay.head_dim} dims = {lay.width}: was it made for another model?")
    blocks = rows.reshape(n, 2 * L, lay.num_heads, lay.head_dim).transpose(1, 2, 0, 3)  # (2L, KV, N, E)
    first = [(4 * l) % (2 * L) if lay.seq2seq else 2 * l for l in range(L)]
    return [(blocks[r], blocks[r + 1]) for r in first]


def layer_prefixes(params: Mapping[str, Any], config: Any) -> list[dict[str, jax.Array]]:
    """`past_key_values` as the per-layer `{"key", "value"}` dicts `attention.prefixed` reads beside an attention's weights."""
    return [{"key": k, "value": v} for k, v in past_key_values(params, config)]


def write_cache(params: Mapping[str, Any], config: Any, cache: list[tuple[jax.Array, jax.Array]]) -> list[tuple[jax.Array, jax.Array]]:
    """A key/value cache (per layer (B, KV, S, E) pairs) with the prefix written into its first N slots."""
    def put(slots, prefix):
        return jax.lax.dynamic_update_slice_in_dim(slots, jnp.broadcast_to(prefix[None], (slots.shape[0], *prefix.shape)).astype(slots.dtype), 0, axis=2)

    return [(put(ck, pk), put(cv, pv)) for (ck, cv), (pk, pv) in zip(cache, past_key_values(params, config))]


def fold(params: Mapping[str, Any]) -> dict:
    """The tree with `prefix_mlp` folded away: `prefix_embeddings` becomes the computed (N, L*2*KV*E) prefix.

    This is what PEFT saves (`prompt_embeddings`) and what it loads for inference, with or without projection.
    """
    if LEAF not in params:
        raise ValueError("fold: the tree has no prefix_embeddings")
    out = {k: v for k, v in params.items() if k != MLP}
    out[LEAF] = flat(params).astype(params[LEAF].dtype)
    return out


METHOD = leaves.declare(leaves.Module("prefix", top_level=(LEAF, MLP)))
