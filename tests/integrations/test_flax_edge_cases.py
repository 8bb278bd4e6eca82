"""Less common Flax layer setups, Linen and NNX: each checked against the base model on weights changed by hand here
(W + s·AB, or W and its bias scaled as HF PEFT's (IA)^3 merge does), or against a clear refusal."""

from __future__ import annotations

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft import linen
from jpeft import nnx as jnnx


def _close(got, want, tol=1e-5):
    assert float(jnp.abs(got - want).max()) <= tol * max(1.0, float(jnp.abs(want).max()))


def _random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape)


class _One(fnn.Module):
    """One Linen layer, built by `make`, named "l"."""

    make: callable

    @fnn.compact
    def __call__(self, x):
        return self.make(name="l")(x)


def _linen_lora(make, x, r=2):
    """(model, params, params with random LoRA on "l")."""
    model = _One(make)
    params = model.init(jax.random.key(1), x)["params"]
    q = linen.inject(model, params, jpeft.LoraConfig(r=r, alpha=r, target_modules=["l"]), jax.random.key(2), x)
    q["l"]["lora_b"] = _random(q["l"]["lora_b"].shape, 3)
    return model, params, q


class _Holder(nnx.Module):
    """One NNX layer as attribute "l"."""

    def __init__(self, layer):
        self.l = layer

    def __call__(self, x):
        return self.l(x)


# 1. DenseGeneral / LinearGeneral contract their axes in sorted order, whatever order `axis` is written in.


def test_linen_dense_general_with_unsorted_axis_matches_the_merged_kernel():
    x = _random((2, 5, 6), 0)
    model, params, q = _linen_lora(lambda name: fnn.DenseGeneral(3, axis=(-1, -2), name=name), x)
    by_hand = {"l": {**params["l"], "kernel": params["l"]["kernel"] + jnp.einsum("ijr,rf->ijf", q["l"]["lora_a"], q["l"]["lora_b"])}}
    _close(linen.apply(model, {"params": q}, x), model.apply({"params": by_hand}, x))


def test_ia3_in_on_unsorted_axis_scales_the_kernel_rows_it_meets():
    x = _random((2, 6, 6), 0)  # equal input dims: a wrong axis order would run but scale the wrong rows
    model = _One(lambda name: fnn.DenseGeneral(3, axis=(-1, -2), name=name))
    params = model.init(jax.random.key(1), x)["params"]
    q = linen.inject(model, params, jpeft.IA3Config(target_modules=["l"], feedforward_modules=["l"]), jax.random.key(2), x)
    q["l"]["ia3_in"] = 1 + _random((6, 6), 4)
    by_hand = {"l": {**params["l"], "kernel": params["l"]["kernel"] * q["l"]["ia3_in"][..., None]}}
    _close(linen.apply(model, {"params": q}, x), model.apply({"params": by_hand}, x))


def test_nnx_linear_general_with_unsorted_axis_matches_the_merged_kernel():
    x = _random((2, 5, 6), 0)
    model = _Holder(nnx.LinearGeneral((5, 6), 3, axis=(-1, -2), rngs=nnx.Rngs(0)))
    kernel = model.l.kernel[...]
    jnnx.inject(model, jpeft.LoraConfig(r=2, alpha=2, target_modules=["l"]), jax.random.key(2))
    layer = model.l
    layer.lora_b[...] = _random(layer.lora_b[...].shape, 3)
    got = model(x)
    want = jnp.einsum("bij,ijf->bf", x, kernel + jnp.einsum("ijr,rf->ijf", layer.lora_a[...], layer.lora_b[...])) + layer.bias[...]
    _close(got, want)
