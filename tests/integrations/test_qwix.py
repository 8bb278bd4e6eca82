"""jpeft beside qwix (0.1.8, a test reference only): the same LoRA gives the same outputs and gradients on models both
support, and the models qwix fails on run in jpeft."""

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

qwix = pytest.importorskip("qwix")

D, H, K, R, ALPHA = 16, 2, 8, 4, 8.0
X = jax.random.normal(jax.random.key(0), (2, 5, D))


class LinenNet(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        x = fnn.Conv(D, (3,), name="conv")(x)
        h = fnn.DenseGeneral((H, K), name="heads")(x)
        x = x + fnn.DenseGeneral(D, axis=(-2, -1), name="merge")(jax.nn.gelu(h))
        return fnn.Dense(D, name="proj")(jax.nn.gelu(x))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(D, D, (3,), rngs=rngs)
        self.heads = nnx.LinearGeneral(D, (H, K), rngs=rngs)
        self.merge = nnx.LinearGeneral((H, K), D, axis=(-2, -1), rngs=rngs)
        self.proj = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        x = self.conv(x)
        x = x + self.merge(jax.nn.gelu(self.heads(x)))
        return self.proj(jax.nn.gelu(x))


NAMES = ("conv", "heads", "merge", "proj")


def _random(shape, i):
    return 0.2 * jax.random.normal(jax.random.fold_in(jax.random.key(7), i), shape)


def _set_random_lora(jpeft_leaves: dict) -> None:
    for i, name in enumerate(NAMES):
        for j, leaf in enumerate(("lora_a", "lora_b")):
            jpeft_leaves[name][leaf] = _random(jpeft_leaves[name][leaf].shape, 2 * i + j)


def _compare(jpeft_leaves, qwix_leaves, tol=1e-5):
    """Every jpeft A/B against qwix's kernel_lora_a/b (qwix flattens a DenseGeneral's axes; jpeft keeps the weight's)."""
    for name in NAMES:
        for leaf in ("lora_a", "lora_b"):
            theirs = qwix_leaves[name][f"kernel_{leaf}"]
            np.testing.assert_allclose(np.asarray(jpeft_leaves[name][leaf]).reshape(theirs.shape), theirs, atol=tol, err_msg=f"{name}.{leaf}")


def test_linen_outputs_and_gradients_match_qwix():
    model = LinenNet()
    params = model.init(jax.random.key(1), X)["params"]
    ours = linen.inject(model, params, jpeft.LoraConfig(r=R, alpha=ALPHA, target_modules=list(NAMES)), jax.random.key(2), X)
    _set_random_lora(ours)
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=".*", rank=R, alpha=ALPHA))
    theirs = jax.tree.map(lambda x: x, qmodel.init(jax.random.key(3), X)["params"])
    for name in NAMES:  # the same base and the same A, B on both sides
        theirs[name]["kernel"] = params[name]["kernel"]
        theirs[name]["bias"] = params[name]["bias"]
        for leaf in ("lora_a", "lora_b"):
            theirs[name][f"kernel_{leaf}"] = ours[name][leaf].reshape(theirs[name][f"kernel_{leaf}"].shape)

    def our_loss(p):
        return jnp.mean(linen.apply(model, {"params": p}, X) ** 2)

    def their_loss(p):
        return jnp.mean(qmodel.apply({"params": p}, X) ** 2)

    np.testing.assert_allclose(linen.apply(model, {"params": ours}, X), qmodel.apply({"params": theirs}, X), atol=1e-5)
    assert abs(float(our_loss(ours)) - float(their_loss(theirs))) <= 1e-6
    _compare(jax.grad(our_loss)(ours), jax.grad(their_loss)(theirs))


def test_nnx_outputs_and_gradients_match_qwix():
    ours = jnnx.inject(NnxNet(nnx.Rngs(0)), jpeft.LoraConfig(r=R, alpha=ALPHA, target_modules=list(NAMES)), jax.random.key(2))
    theirs = qwix.apply_lora_to_model(NnxNet(nnx.Rngs(0)), qwix.LoraProvider(module_path=".*", rank=R, alpha=ALPHA), X, rngs=nnx.Rngs(1))
    for i, name in enumerate(NAMES):
        mine, other = getattr(ours, name), getattr(theirs, name)
        for j, leaf in enumerate(("lora_a", "lora_b")):
            value = _random(getattr(mine, leaf)[...].shape, 2 * i + j)
            getattr(mine, leaf)[...] = value
            getattr(other, f"kernel_{leaf}")[...] = value.reshape(getattr(other, f"kernel_{leaf}")[...].shape)

    def loss(m):
        return jnp.mean(m(X) ** 2)

    np.testing.assert_allclose(ours(X), theirs(X), atol=1e-5)
    grads = (nnx.to_pure_dict(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)) for m in (ours, theirs))
    _compare(*grads)


def test_linen_einsum_fails_in_qwix_and_works_in_jpeft():
    class WithEinsum(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Einsum((D, H, K), "bsd,dhk->bshk", name="qkv")(x)

    model = WithEinsum()
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=".*", rank=R, alpha=ALPHA))
    with pytest.raises(Exception, match="SetAttributeFrozenModuleError|frozen"):
        qmodel.init(jax.random.key(0), X)
    params = model.init(jax.random.key(0), X)["params"]
    ours = linen.inject(model, params, jpeft.LoraConfig(r=R, alpha=ALPHA, target_modules=["qkv"]), jax.random.key(1), X)
    ours["qkv"]["lora_b"] = _random(ours["qkv"]["lora_b"].shape, 0)
    delta = jnp.einsum("bsd,dr,rhk->bshk", X, ours["qkv"]["lora_a"], ours["qkv"]["lora_b"]) * ALPHA / R
    np.testing.assert_allclose(linen.apply(model, {"params": ours}, X), model.apply({"params": params}, X) + delta, atol=1e-5)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return x + jax.nn.gelu(self.proj(x))


class _Stacked(nnx.Module):
    """Layers built by nnx.vmap and run by nnx.scan, as MaxText-style decoders do."""

    def __init__(self, rngs):
        self.layers = nnx.split_rngs(splits=3)(nnx.vmap(lambda r: _Block(r), in_axes=(0,), out_axes=0))(rngs)

    def __call__(self, x):
        return nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.layers)


def test_nnx_vmap_scan_fails_in_qwix_and_works_in_jpeft():
    with pytest.raises(IndexError):
        qwix.apply_lora_to_model(_Stacked(nnx.Rngs(0)), qwix.LoraProvider(module_path=".*", rank=R, alpha=ALPHA), X, rngs=nnx.Rngs(1))
    model = jnnx.inject(_Stacked(nnx.Rngs(0)), jpeft.LoraConfig(r=R, alpha=ALPHA, target_modules=["proj"]), jax.random.key(1))
    assert model.layers.proj.lora_a[...].shape == (3, D, R)
    np.testing.assert_array_equal(model(X), _Stacked(nnx.Rngs(0))(X))  # B = 0: the base output exactly


class _RawMatmul(nnx.Module):
    """A weight used by a bare `x @ w` inside __call__."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)) * 0.2)

    def __call__(self, x):
        return x @ self.w[...]


def test_nnx_raw_matmul_fails_in_qwix_under_jit_and_works_in_jpeft_once_registered():
    with pytest.raises(Exception, match="different trace level"):  # qwix creates the leaves inside its jitted pass
        qwix.apply_lora_to_model(_RawMatmul(nnx.Rngs(0)), qwix.LoraProvider(module_path=".*", rank=R, alpha=ALPHA), X, rngs=nnx.Rngs(1))
    jnnx.register(_RawMatmul, "w", (0,))
    model = jnnx.inject(_RawMatmul(nnx.Rngs(0)), jpeft.LoraConfig(r=R, alpha=ALPHA, target_modules=".*"), jax.random.key(1))
    model.lora_b[...] = _random(model.lora_b[...].shape, 0)
    want = X @ (_RawMatmul(nnx.Rngs(0)).w[...] + model.lora_a[...] @ model.lora_b[...] * ALPHA / R)
    np.testing.assert_allclose(nnx.jit(lambda m: m(X))(model), want, atol=1e-5)


def test_linen_embed_gets_lora_in_jpeft_and_none_in_qwix():
    class Embedder(fnn.Module):
        @fnn.compact
        def __call__(self, ids):
            return fnn.Embed(50, D, name="embed")(ids)

    ids = jnp.arange(6).reshape(2, 3)
    qparams = qwix.apply_lora_to_model(Embedder(), qwix.LoraProvider(module_path=".*", rank=R, alpha=ALPHA)).init(jax.random.key(0), ids)
    assert sorted(qparams["params"]["embed"]) == ["embedding"]  # qwix adapts dot_general / einsum / conv, not lookups
    params = Embedder().init(jax.random.key(0), ids)["params"]
    ours = linen.inject(Embedder(), params, jpeft.LoraConfig(r=R, alpha=ALPHA, target_modules=["embed"]), jax.random.key(1), ids)
    assert ours["embed"]["lora_a"].shape == (50, R) and ours["embed"]["lora_b"].shape == (R, D)


def test_what_the_peers_do_not_have():
    """The table's empty cells: no merge or adapter files in qwix's API, and no method but LoRA (its QLoRA is LoRA on a
    weight_qtype); nnx.LoRA has no alpha or dropout."""
    import dataclasses
    import inspect

    assert not [n for n in dir(qwix) if not n.startswith("_") and any(w in n.lower() for w in ("merge", "save", "load", "export"))]
    assert not [n for n in dir(qwix) if any(w in n.lower() for w in ("dora", "loha", "lokr", "ia3", "adapter"))]
    assert "weight_qtype" in {f.name for f in dataclasses.fields(qwix.LoraRule)}
    for cls in (nnx.LoRA, nnx.LoRALinear):
        params = inspect.signature(cls).parameters
        assert "alpha" not in params and "dropout" not in params and not hasattr(cls, "merge")
    lora_names = [n for n in dir(nnx) if "lora" in n.lower()]
    assert not [n for n in lora_names if any(w in n.lower() for w in ("embed", "merge", "save", "load"))]
    assert issubclass(nnx.LoRAParam, nnx.Param)  # so nnx.Optimizer(model, tx) without wrt=nnx.LoRAParam trains the base too
