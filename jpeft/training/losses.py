"""Supervised losses: token cross-entropy (chunked over the LM head), the seq2seq and the decoder-only LM losses."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jax.sharding import PartitionSpec as P

from jpeft import nn
from jpeft.methods import prefix, soft_prompt
from jpeft.models import family, ops, t5
from jpeft.training.batches import IGNORE

LossFn = Callable[[Mapping[str, Any], Mapping[str, jax.Array], jax.Array | None], jax.Array]


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens); labels equal to -100 are ignored (padding, prompts)."""
    valid = labels != IGNORE
    return _nll_sum(logits.astype(jnp.float32), jnp.where(valid, labels, 0), valid), jnp.sum(valid)


BATCH_AXES = nn.BATCH_AXES  # the mesh axes a batch's rows are split over (`jpeft.training.sharding`)
LOGITS_CHUNK_BYTES = 128 << 20  # float32 logits of one chunk in `head_cross_entropy`


def head_cross_entropy(head: Callable[[jax.Array, int], jax.Array], hidden: jax.Array, labels: jax.Array,
                       chunk_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """`token_cross_entropy(head(hidden), labels)` for hidden (N, D) and labels (N,), a chunk of rows at a time.

    `head(h, i)` maps chunk i's hidden states to logits. Each chunk's logits are recomputed in the backward
    pass instead of stored, so at most one chunk of (rows, vocab) logits and their gradient exist at once, for
    one more LM-head product. Logits that fit in `chunk_bytes` (default `LOGITS_CHUNK_BYTES`) are computed whole
    (SmolLM2's 512 target positions of a batch of 8: 100 MB); Gemma 3's vocabulary is 5x larger, and a long packed
    row holds many targets.
    """
    parts = _head_chunks(head, hidden, labels, token_cross_entropy, chunk_bytes)
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def head_token_logps(head: Callable[[jax.Array, int], jax.Array], hidden: jax.Array, labels: jax.Array, temperature: float = 1.0,
                     chunk_bytes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """(log-probability of each label (N,), each position's mean logit (N,)) under `head(hidden) / temperature`,
    chunked as `head_cross_entropy`; 0 where the label is -100. The mean logit is TRL's `logits/*` metric."""
    def stats(logits, y):
        logp, mean = _token_logp(logits.astype(jnp.float32) / temperature, jnp.where(y == IGNORE, 0, y))
        return jnp.where(y == IGNORE, 0.0, logp), mean

    parts = _head_chunks(head, hidden, labels, stats, chunk_bytes)
    return jnp.concatenate([p[0] for p in parts]), jnp.concatenate([p[1] for p in parts])


def _head_chunks(head, hidden, labels, fn, chunk_bytes):
    """[fn(head(h, i), y) for each chunk i of rows of hidden (N, D) / labels (N,)], logits recomputed in the backward pass."""
    N, D = hidden.shape
    vocab = jax.eval_shape(lambda h: head(h, 0), hidden[:1]).shape[-1]
    rows = max(1, (chunk_bytes or LOGITS_CHUNK_BYTES) // (4 * vocab))
    if N <= rows:
        return [fn(head(hidden, 0), labels)]
    # Unrolled, not a scan: in a scan XLA hoisted a transposed copy of a tied embedding out of the loop (113 MB).
    chunk = jax.checkpoint(lambda h, y, i: fn(head(h, i), y), static_argnums=2)
    return [chunk(hidden[lo:lo + rows], labels[lo:lo + rows], k) for k, lo in enumerate(range(0, N, rows))]


@jax.custom_vjp
def _token_logp(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log_softmax(logits)[label], mean(logits)) per row, with a one-pass backward (as `_nll_sum`'s)."""
    return _token_logp_fwd(logits, labels)[0]


def _token_logp_fwd(logits, labels):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return (picked - lse, jnp.mean(logits, axis=-1)), (logits, labels, lse)


def _token_logp_bwd(res, g):
    logits, labels, lse = res
    g_logp, g_mean = g
    onehot = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
    return (onehot - jnp.exp(logits - lse[..., None])) * g_logp[..., None] + g_mean[..., None] / logits.shape[-1], None


_token_logp.defvjp(_token_logp_fwd, _token_logp_bwd)


@jax.custom_vjp
def _nll_sum(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    """Sum over valid positions of logsumexp(logits) - logits[label], with a one-pass backward.

    Autodiff of log_softmax + take_along_axis scatters into a zeroed (..., vocab) array and makes two
    more passes over it; the gradient is softmax - onehot, one elementwise pass over the logits.
    """
    return _nll_sum_fwd(logits, labels, valid)[0]


def _nll_sum_fwd(logits, labels, valid):
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), (logits, labels, valid, lse)


def _nll_sum_bwd(res, g):
    logits, labels, valid, lse = res
    onehot = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
    weight = jnp.where(valid, g, 0.0)[..., None]
    return (jnp.exp(logits - lse[..., None]) - onehot) * weight, None, None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd)


def seq2seq_loss(config: Any, dtype: Any = jnp.float32, lora_dropout: float = 0.0, remat: bool = False) -> LossFn:
    """Mean token cross-entropy of a T5 on {input_ids, attention_mask, labels} (decoder inputs shifted from labels).

    `remat` recomputes each layer's activations in the backward pass: far less memory for ~1/3 more compute.
    """

    _check_family(config, "seq2seq_loss", encoder_decoder=True)

    def loss(params, batch, rng):
        _check_batch(batch, ("input_ids", "attention_mask", "labels"), "seq2seq_loss", "seq2seq_batch")
        dec = t5.shift_right(batch["labels"], config)
        logits = t5.forward(config, params, batch["input_ids"], batch["attention_mask"], dec,
                            dtype=dtype, dropout_rng=rng, lora_dropout=lora_dropout, remat=remat)
        total, count = token_cross_entropy(logits, batch["labels"])
        return total / jnp.maximum(count, 1)

    return loss


def _check_family(config: Any, fn: str, encoder_decoder: bool) -> None:
    """A loss built for the wrong kind of model fails here by name, not later on a missing config field."""

    # jpeft's own resolved configs: T5's Arch is the encoder-decoder one; the decoders' have no is_encoder_decoder
    is_encoder_decoder = isinstance(config, t5.Arch) or bool(getattr(config, "is_encoder_decoder", False))
    if is_encoder_decoder != encoder_decoder:
        other = "causal_lm_loss" if encoder_decoder else "seq2seq_loss"
        kind = getattr(config, "model_type", type(config).__name__)
        raise TypeError(f"{fn} is for {'encoder-decoder (T5)' if encoder_decoder else 'decoder-only (Llama, Gemma)'} models; "
                        f"this config is a {kind!r} model: use training.{other}(config)")


def _check_batch(batch: Mapping[str, Any], keys: tuple[str, ...], fn: str, helper: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{fn} needs batch keys {list(keys)}, missing {missing} (got {sorted(batch)}); "
                       f"build the batch with jpeft.batches.{helper}(...)")


def take_rows(flat: jax.Array, index: jax.Array) -> jax.Array:
    """flat[index]: rows of flat (N, D), the whole batch's positions, at index (E, T), which may point into any row.

    On a mesh that splits the batch over BATCH_AXES (`jpeft.training.sharding`'s step sets it) the gather needs every row
    on every device: they are gathered once, explicitly, and the result is split like the batch again. Left to
    itself XLA's partitioner lays the gathered rows out along D and cannot reshape that back, so it replicates and
    repartitions them, forward and backward, with an "Involuntary full rematerialization" warning each time.
    """
    if not nn.rows_split():
        return flat[index]
    return nn.keep_rows_sharded(jax.lax.with_sharding_constraint(flat, P())[index])


def causal_lm_loss(config: Any, dtype: Any = jnp.float32, lora_dropout: float = 0.0, remat: bool = False) -> LossFn:
    """Mean cross-entropy of a decoder-only LM on the target tokens only.

    The batch holds `input_ids` (R, L) of prompt + target sequences, either one per row with an
    `attention_mask`, or packed several per row with `segment_ids` (`jpeft.packing.pack`); `targets` (E, T)
    of each example's target tokens padded with -100; and `target_index` (E,), where each example's
    first target token sits in the flattened (R * L) batch. Only the E * T positions that predict
    targets go through the LM head, so the (R, L, vocab) logits of the prompts are never formed.

    A mixture of experts whose config sets `output_router_logits` adds `router_aux_loss_coef` times the router's
    load-balancing loss over the batch's real tokens, as transformers' MoE models add it to their loss.
    """

    _check_family(config, "causal_lm_loss", encoder_decoder=False)
    model = family.of(config)  # llama, gemma or moe
    a = model.arch(config)

    def loss(params, batch, rng):
        _check_batch(batch, ("input_ids", "targets", "target_index"), "causal_lm_loss", "causal_lm_batch")
        ctx = nn.Ctx(dtype=dtype, rng=rng, dropout_rate=a.attention_dropout, lora_dropout=lora_dropout, remat=remat)
        picked = target_hidden(model, a, params, batch, ctx)
        head = lambda h, i: model.lm_head(a, params, h, ctx.part(i))  # noqa: E731  (a LoRA'd head drops per chunk)
        total, count = head_cross_entropy(head, picked.reshape(-1, picked.shape[-1]), batch["targets"].reshape(-1))
        return total / jnp.maximum(count, 1) + (0.0 if ctx.aux_loss is None else ctx.aux_loss)  # the decoder's own term (MoE)

    return loss


def target_hidden(model: Any, a: Any, params: Mapping[str, Any], batch: Mapping[str, jax.Array], ctx: nn.Ctx) -> jax.Array:
    """Hidden states (E, T, D) of a decoder-only `model` at the positions that predict each example's target tokens.

    `batch` has `causal_lm_batch`'s layout (`input_ids`, `attention_mask` or packed `segment_ids`, `targets` (E, T),
    `target_index` (E,)); the (R, L, vocab) logits are never formed, so a loss puts only these through the LM head.
    """
    packed = "segment_ids" in batch
    if packed and soft_prompt.present(params):
        raise ValueError("a soft prompt is prepended per row, so it cannot train on packed rows: use attention_mask batches")
    if packed and prefix.LEAF in params:
        raise ValueError("a prefix sits before each row's first token, so prefix tuning cannot train on packed rows "
                         "(later sequences would see it from further away): use attention_mask batches")
    R, L = batch["input_ids"].shape
    x, segments = model.embed(a, params, batch["input_ids"], batch["segment_ids" if packed else "attention_mask"], ctx.dtype, ctx)
    # A 0/1 mask is a packing of one segment per row, so one code path serves both layouts; a prefix (N slots
    # before each unpacked row) shifts the positions by N and needs no segments beside the mask.
    n = prefix.num_tokens(params)
    key_mask = jnp.pad(segments, ((0, 0), (n, 0)), constant_values=1)
    hidden, _ = model.decoder(a, params, x, ops.segment_positions(segments) + n, key_mask, ctx, index=n,
                              segment_ids=None if n else segments)
    hidden = hidden[:, hidden.shape[1] - L:].reshape(R * L, -1)  # soft-prompt positions (first) dropped
    T = batch["targets"].shape[1]
    pos = batch["target_index"][:, None] - 1 + jnp.arange(T)[None, :]  # position t predicts token t + 1
    return take_rows(hidden, jnp.clip(pos, 0, R * L - 1))
