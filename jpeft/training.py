"""Losses and the jitted train step: gradients only for the trainable part of the tree."""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from jpeft.batches import IGNORE
from jpeft.split import combine

LossFn = Callable[[Mapping[str, Any], Mapping[str, jax.Array], jax.Array | None], jax.Array]


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of token losses, number of counted tokens); labels equal to -100 are ignored (padding, prompts)."""
    valid = labels != IGNORE
    return _nll_sum(logits.astype(jnp.float32), jnp.where(valid, labels, 0), valid), jnp.sum(valid)


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
    N, D = hidden.shape
    vocab = jax.eval_shape(lambda h: head(h, 0), hidden[:1]).shape[-1]
    rows = max(1, (chunk_bytes or LOGITS_CHUNK_BYTES) // (4 * vocab))
    if N <= rows:
        return token_cross_entropy(head(hidden, 0), labels)
    # Unrolled, not a scan: in a scan XLA hoisted a transposed copy of a tied embedding out of the loop (113 MB).
    chunk = jax.checkpoint(lambda h, y, i: token_cross_entropy(head(h, i), y), static_argnums=2)
    parts = [chunk(hidden[lo:lo + rows], labels[lo:lo + rows], k) for k, lo in enumerate(range(0, N, rows))]
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


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
    from jpeft.models import t5

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
    from jpeft.models import gemma, llama, t5

    if isinstance(config, (t5.Arch, llama.Arch, gemma.Arch)):  # jpeft's own resolved configs
        is_encoder_decoder = isinstance(config, t5.Arch)
    else:
        is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
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


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation):
    """A jitted step (trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, loss).

    Only `trainable` is differentiated, so no gradient is formed for frozen weights. The buffers of
    `trainable` and `opt_state` are donated (updated in place): do not reuse the arrays passed in.

    Mixed precision is the loss's `dtype` (the CLI's --bf16): with `dtype=jnp.bfloat16` every weight, frozen or
    trainable, is cast to bf16 where the forward pass uses it, inside this jitted step, while `trainable`, its
    gradients (the casts' transposes return float32) and the optimizer state stay float32 master copies.
    """

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, batch, rng):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(combine(t, frozen), batch, rng))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def compile_step(step: Any, *args: Any) -> Any:
    """`step` (a jitted function) compiled ahead of time for the shapes and dtypes of `args`.

    XLA's compiler frees ~0.5 GB of scratch memory (SmolLM2's step) that glibc keeps mapped; it is handed
    back to the OS here, before the step's own buffers are allocated, so it does not add to the peak.
    """
    compiled = step.lower(*args).compile()  # arrays or ShapeDtypeStructs: lowering reads only shapes and dtypes
    release_free_heap()
    return compiled


def release_free_heap() -> None:
    """Hand memory glibc keeps mapped after frees (a compile's scratch, a load's host copies) back to the OS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to release this way
        pass


def causal_lm_loss(config: Any, dtype: Any = jnp.float32, lora_dropout: float = 0.0, remat: bool = False) -> LossFn:
    """Mean cross-entropy of a decoder-only LM on the target tokens only.

    The batch holds `input_ids` (R, L) of prompt + target sequences, either one per row with an
    `attention_mask`, or packed several per row with `segment_ids` (`jpeft.packing.pack`); `targets` (E, T)
    of each example's target tokens padded with -100; and `target_index` (E,), where each example's
    first target token sits in the flattened (R * L) batch. Only the E * T positions that predict
    targets go through the LM head, so the (R, L, vocab) logits of the prompts are never formed.
    """
    from jpeft import nn, prefix, prompt
    from jpeft.models import causal_lm

    _check_family(config, "causal_lm_loss", encoder_decoder=False)
    model = causal_lm.model_for(config)  # llama or gemma
    a = model.arch(config)

    def loss(params, batch, rng):
        _check_batch(batch, ("input_ids", "targets", "target_index"), "causal_lm_loss", "causal_lm_batch")
        packed = "segment_ids" in batch
        if packed and prompt.has_soft_prompt(params):
            raise ValueError("a soft prompt is prepended per row, so it cannot train on packed rows: use attention_mask batches")
        if packed and prefix.LEAF in params:
            raise ValueError("a prefix sits before each row's first token, so prefix tuning cannot train on packed rows "
                             "(later sequences would see it from further away): use attention_mask batches")
        ctx = nn.Ctx(dtype=dtype, rng=rng, dropout_rate=a.attention_dropout, lora_dropout=lora_dropout, remat=remat)
        R, L = batch["input_ids"].shape
        x, segments = model.embed(a, params, batch["input_ids"], batch["segment_ids" if packed else "attention_mask"], dtype, ctx)
        # A 0/1 mask is a packing of one segment per row, so one code path serves both layouts; a prefix (N slots
        # before each unpacked row) shifts the positions by N and needs no segments beside the mask.
        n = prefix.num_tokens(params)
        key_mask = jnp.pad(segments, ((0, 0), (n, 0)), constant_values=1)
        hidden, _ = model.decoder(a, params, x, nn.segment_positions(segments) + n, key_mask, ctx, index=n,
                                  segment_ids=None if n else segments)
        hidden = hidden[:, hidden.shape[1] - L:].reshape(R * L, -1)  # soft-prompt positions (first) dropped
        T = batch["targets"].shape[1]
        pos = batch["target_index"][:, None] - 1 + jnp.arange(T)[None, :]  # position t predicts token t + 1
        picked = hidden[jnp.clip(pos, 0, R * L - 1)]
        head = lambda h, i: model.lm_head(a, params, h, ctx.part(i))  # noqa: E731  (a LoRA'd head drops per chunk)
        total, count = head_cross_entropy(head, picked.reshape(-1, picked.shape[-1]), batch["targets"].reshape(-1))
        return total / jnp.maximum(count, 1)

    return loss
