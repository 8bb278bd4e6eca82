"""The jitted train step: gradients only for the trainable part of the tree, optimizer state only for it."""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import jax
import optax

from jpeft.training.losses import LossFn
from jpeft.training.split import combine


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, with_metrics: bool = False):
    """A jitted step (trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, loss).

    Only `trainable` is differentiated, so no gradient is formed for frozen weights. The buffers of
    `trainable` and `opt_state` are donated (updated in place): do not reuse the arrays passed in.

    Mixed precision is the loss's `dtype` (the CLI's --bf16): with `dtype=jnp.bfloat16` every weight, frozen or
    trainable, is cast to bf16 where the forward pass uses it, inside this jitted step, while `trainable`, its
    gradients (the casts' transposes return float32) and the optimizer state stay float32 master copies.

    With `with_metrics=True` the step returns (trainable, opt_state, loss, metrics), the metrics (a dict of scalars)
    from `loss_fn.with_metrics(params, batch, rng) -> (loss, metrics)` (as `preference_loss` and `grpo_loss` offer).
    """
    if with_metrics and not hasattr(loss_fn, "with_metrics"):
        raise TypeError("with_metrics=True needs a loss with a .with_metrics(params, batch, rng) -> (loss, metrics) method "
                        "(training.preference_loss, training.grpo.grpo_loss); this one returns the loss alone")
    scored = loss_fn.with_metrics if with_metrics else lambda params, batch, rng: (loss_fn(params, batch, rng), None)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, batch, rng):
        (loss, metrics), grads = jax.value_and_grad(lambda t: scored(combine(t, frozen), batch, rng), has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        new = optax.apply_updates(trainable, updates), opt_state, loss
        return (*new, metrics) if with_metrics else new

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
