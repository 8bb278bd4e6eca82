"""LoRA on an unmodified Flax Linen transformer: DenseGeneral heads, Einsum projections, Conv, Embed, layers under
nn.scan + nn.remat. References: the base model itself, and the base model run on weights merged by hand here."""

from __future__ import annotations

import math
import re

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import linen

D, HEADS, HEAD_DIM, VOCAB, LAYERS = 16, 2, 8, 40, 3


class Block(fnn.Module):
    @fnn.compact
    def __call__(self, x, _):
        q = fnn.DenseGeneral((HEADS, HEAD_DIM), name="query")(x)                          # (b, s, h, k)
        k = fnn.DenseGeneral((HEADS, HEAD_DIM), name="key")(x)
        v = fnn.Einsum((HEADS, D, HEAD_DIM), "bsd,hdk->bshk", name="value")(x)          # contracted axis in the middle
        w = jax.nn.softmax(jnp.einsum("bshk,bthk->bhst", q, k) / np.sqrt(HEAD_DIM), axis=-1)
        o = fnn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.einsum("bhst,bthk->bshk", w, v))
        x = x + o
        h = jax.nn.gelu(fnn.Dense(2 * D, name="up")(x))
        return x + fnn.Einsum((2 * D, D), "bsf,fd->bsd", name="down")(h), None


class Tiny(fnn.Module):
    @fnn.compact
    def __call__(self, ids):
        x = fnn.Embed(VOCAB, D, name="embed")(ids)
        x = fnn.Conv(D, (3,), name="conv")(x)
        stack = fnn.scan(fnn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        x, _ = stack(name="layers")(x, None)
        return fnn.Dense(VOCAB, name="head")(x)


TARGETS = ["query", "value", "out", "up", "down", "conv", "embed"]
# How each target's weight meets LoRA's A (*in, r) and B (r, *out): the merged weight written out by hand.
MERGE = {"query": "dr,rhk->dhk", "value": "dr,rhk->hdk", "out": "hkr,rd->hkd", "up": "dr,rf->df", "down": "fr,rd->fd",
         "conv": "cir,ro->cio", "embed": "vr,rd->vd"}


@pytest.fixture(scope="module")
def setup():
    model, ids = Tiny(), jax.random.randint(jax.random.key(1), (2, 7), 0, VOCAB)
    params = model.init(jax.random.key(0), ids)["params"]
    return model, params, ids


def _random_lora(params, key):
    """Random A and B everywhere (B is zero after inject), so the update is not trivially zero."""
    flat = jpeft.tree.flatten(params)
    for i, path in enumerate(sorted(p for p in flat if p.endswith(("/lora_a", "/lora_b")))):
        flat[path] = 0.1 * jax.random.normal(jax.random.fold_in(key, i), flat[path].shape)
    return jpeft.tree.unflatten(flat)


def _merged_by_hand(params):
    flat = jpeft.tree.flatten(params)
    out = {p: v for p, v in flat.items() if not p.rsplit("/", 1)[-1].startswith("lora_")}
    for name, spec in MERGE.items():
        prefix = f"layers/{name}" if name not in ("conv", "embed") else name
        weight = f"{prefix}/{'embedding' if name == 'embed' else 'kernel'}"
        a, b, s = flat[f"{prefix}/lora_a"], flat[f"{prefix}/lora_b"], flat[f"{prefix}/lora_scale"]
        if prefix.startswith("layers/"):  # stacked by nn.scan: one adapter a layer
            delta = jax.vmap(lambda a, b, s: s * jnp.einsum(spec, a, b))(a, b, s)
        else:
            delta = s * jnp.einsum(spec, a, b)
        out[weight] = flat[weight] + delta
    return jpeft.tree.unflatten(out)


def _inject(setup, **cfg):
    model, params, ids = setup
    config = jpeft.LoraConfig(r=4, alpha=8, target_modules=TARGETS, **cfg)
    return linen.inject(model, params, config, jax.random.key(2), ids)


def test_sites_find_every_layer_kind_with_its_axes(setup):
    model, params, ids = setup
    found = {s.name: s for s in linen.sites(model, params, ids)}
    assert sorted(found) == sorted(["embed", "conv", "head", *(f"layers.{n}" for n in ("query", "key", "value", "out", "up", "down"))])
    assert found["layers.value"].in_axes == (1,) and found["layers.value"].out_axes == (0, 2)
    assert found["layers.out"].in_axes == (0, 1) and found["conv"].in_axes == (0, 1) and found["embed"].kind == "Embed"


def test_leaves_have_the_weight_layout_and_the_scan_axis(setup):
    p = _inject(setup)
    assert p["layers"]["query"]["lora_a"].shape == (LAYERS, D, 4) and p["layers"]["query"]["lora_b"].shape == (LAYERS, 4, HEADS, HEAD_DIM)
    assert p["layers"]["value"]["lora_a"].shape == (LAYERS, D, 4) and p["layers"]["value"]["lora_b"].shape == (LAYERS, 4, HEADS, HEAD_DIM)
    assert p["layers"]["out"]["lora_a"].shape == (LAYERS, HEADS, HEAD_DIM, 4) and p["layers"]["query"]["lora_scale"].shape == (LAYERS,)
    assert p["conv"]["lora_a"].shape == (3, D, 4) and p["embed"]["lora_a"].shape == (VOCAB, 4) and p["embed"]["lora_scale"].shape == ()
    assert "lora_a" not in p["layers"]["key"] and "lora_a" not in p["head"]
    assert float(p["layers"]["up"]["lora_scale"][0]) == 2.0 and not np.any(p["layers"]["up"]["lora_b"])


def test_zero_b_gives_the_base_output_exactly(setup):
    model, params, ids = setup
    np.testing.assert_array_equal(linen.apply(model, {"params": _inject(setup)}, ids), model.apply({"params": params}, ids))


@pytest.mark.parametrize("rslora", [False, True])
def test_random_lora_equals_the_base_model_on_weights_merged_by_hand(setup, rslora):
    model, params, ids = setup
    p = _random_lora(_inject(setup, use_rslora=rslora), jax.random.key(3))
    got = jax.jit(lambda p: linen.apply(model, {"params": p}, ids))(p)
    want = model.apply({"params": _merged_by_hand(p)}, ids)
    assert float(jnp.abs(got - want).max()) <= 1e-5 * max(1.0, float(jnp.abs(want).max()))
    assert float(jnp.abs(got - model.apply({"params": params}, ids)).max()) > 1e-2  # the adapter does change the output


def test_merge_runs_in_the_unmodified_model_and_unmerge_restores(setup):
    model, params, ids = setup
    p = _random_lora(_inject(setup), jax.random.key(4))
    merged = linen.merge(model, p, ids)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    np.testing.assert_allclose(model.apply({"params": merged}, ids), linen.apply(model, {"params": p}, ids), atol=1e-5)
    back = linen.unmerge(model, merged, p, ids)
    for path, value in jpeft.tree.flatten(p).items():
        np.testing.assert_allclose(jpeft.tree.flatten(back)[path], value, atol=1e-5, err_msg=path)


def test_gradients_only_for_lora_leaves_and_none_formed_for_frozen_weights(setup):
    model, params, ids = setup
    p = _random_lora(_inject(setup), jax.random.key(5))
    trainable, frozen = jpeft.partition(p, jpeft.trainable_mask(p))
    assert all(path.rsplit("/", 1)[-1].startswith("lora_") for path in jpeft.tree.flatten(trainable) if jpeft.tree.flatten(trainable)[path] is not None)

    def loss(t):
        return jnp.mean(linen.apply(model, {"params": jpeft.combine(t, frozen)}, ids) ** 2)

    grads = jax.grad(loss)(trainable)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    # A weight's gradient may come out of XLA whole, as its (in, out) matrix, or transposed (per layer inside the scan).
    forms = {site.name: {site.shape, site.shape[::-1], (math.prod(site.in_shape), math.prod(site.out_shape)),
                         (math.prod(site.out_shape), math.prod(site.in_shape))} for site in linen.sites(model, params, ids)}
    formed = lambda fn, arg: sorted(n for n, f in forms.items() if f & _product_shapes(fn, arg))  # noqa: E731
    assert formed(jax.grad(loss), trainable) == [], "the compiled gradient forms a frozen weight's gradient"
    full = lambda q: jnp.mean(linen.apply(model, {"params": q}, ids) ** 2)  # noqa: E731
    assert len(formed(jax.grad(full), p)) >= 7  # control: full fine-tuning does form them


def _product_shapes(fn, arg) -> set[tuple[int, ...]]:
    """Output shapes of every dot and convolution in the optimised HLO of jit(fn)(arg)."""
    hlo = jax.jit(fn).lower(arg).compile().as_text()
    return {tuple(int(d) for d in m.split(",") if d) for m in re.findall(r"= f32\[([\d,]*)\]\{[^}]*\} (?:dot|convolution)\(", hlo)}


def test_unread_leaves_and_unmatched_targets_are_errors(setup):
    model, params, ids = setup
    p = _inject(setup)
    with pytest.raises(ValueError, match=r"PEFT leaves that no layer read: \[.unused.\]"):
        linen.apply(model, {"params": {**p, "unused": {"lora_a": jnp.ones((2, 2))}}}, ids)
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matches no module. Module names in this model: .*'query'"):
        linen.inject(model, params, jpeft.LoraConfig(target_modules=["nope"]), jax.random.key(0), ids)
    for config in (jpeft.LoraConfig(target_modules=["query", "valeu"]), jpeft.IA3Config(target_modules=["query", "valeu"], feedforward_modules=[])):
        with pytest.raises(ValueError, match=r"\['query', 'valeu'\]: 'valeu' matches no module. 'valeu': did you mean 'value'\?"):
            linen.inject(model, params, config, jax.random.key(0), ids)
    with pytest.raises(ValueError, match=r"feedforward_modules=\['dwn'\] matches no module.*did you mean 'down'\?"):
        linen.inject(model, params, jpeft.IA3Config(target_modules=".*(up|down)", feedforward_modules=["dwn"]), jax.random.key(0), ids)


def test_registered_third_party_layer(setup):
    class MyProj(fnn.Module):  # a library's own layer: weight `w`, used through jnp.einsum
        @fnn.compact
        def __call__(self, x):
            w = self.param("w", fnn.initializers.normal(0.2), (HEADS, x.shape[-1], HEAD_DIM))
            return jnp.einsum("bsd,hdk->bshk", x, w)

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return MyProj(name="proj")(x)

    x = jax.random.normal(jax.random.key(0), (2, 5, D))
    params = Net().init(jax.random.key(1), x)["params"]
    config = jpeft.LoraConfig(r=2, alpha=2, target_modules=["proj"])
    with pytest.raises(ValueError, match=r"jpeft.linen.register\(MyProj"):  # not Flax's own: refused until registered
        linen.inject(Net(), params, config, jax.random.key(2), x)
    linen.register(MyProj, "w", "bsd,hdk->bshk")
    p = _random_lora(linen.inject(Net(), params, config, jax.random.key(2), x), jax.random.key(3))
    want = jnp.einsum("bsd,hdk->bshk", x, params["proj"]["w"] + jnp.einsum("dr,rhk->hdk", p["proj"]["lora_a"], p["proj"]["lora_b"]))
    np.testing.assert_allclose(linen.apply(Net(), {"params": p}, x), want, atol=1e-5)


def test_adapter_files_round_trip_with_the_base_fingerprint(setup, tmp_path):
    from jpeft.formats.hf_io import CheckpointError

    model, params, ids = setup
    p = _random_lora(_inject(setup), jax.random.key(6))
    jpeft.save_adapter(tmp_path / "adapter", p, base_model_name_or_path="my-linen-model")
    config = __import__("json").loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["jpeft_layout"] == "tree" and "layers.query" in config["modules"] and config["r"] == 4
    back = jpeft.load_adapter(tmp_path / "adapter", params)
    for path, value in jpeft.tree.flatten(p).items():
        np.testing.assert_array_equal(jpeft.tree.flatten(back)[path], value, err_msg=path)
    np.testing.assert_array_equal(linen.apply(model, {"params": back}, ids), linen.apply(model, {"params": p}, ids))
    other = Tiny().init(jax.random.key(9), jnp.zeros((1, 3), jnp.int32))["params"]
    other["head"] = {"kernel": jnp.zeros((D, VOCAB + 1)), "bias": jnp.zeros(VOCAB + 1)}
    with pytest.raises(CheckpointError, match="was trained on base 'my-linen-model'"):
        jpeft.load_adapter(tmp_path / "adapter", other)


def test_a_module_using_its_weights_in_its_own_code_is_refused_by_name():
    class FeedForward(fnn.Module):  # like the gemma library's: two raw weights and a nonlinearity inside __call__
        @fnn.compact
        def __call__(self, x):
            gate = self.param("gating_einsum", fnn.initializers.normal(), (x.shape[-1], 8))
            down = self.param("linear", fnn.initializers.normal(), (8, x.shape[-1]))
            return jax.nn.gelu(x @ gate) @ down

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return FeedForward(name="ffw")(x)

    x = jnp.ones((2, D))
    params = Net().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"matches ffw \(FeedForward\), whose params \['gating_einsum', 'linear'\] are used inside "
                                         r"its own code.*jpeft.linen.register\(FeedForward"):
        linen.inject(Net(), params, jpeft.LoraConfig(target_modules=["ffw"]), jax.random.key(1), x)


IA3_TARGETS = ["query", "value", "out", "up", "down"]
# IA3 by hand: the weight scaled along the axes a vector sits on (feed-forward `down` scales its input).
IA3_SCALE = {"query": "dhk,hk->dhk", "value": "hdk,hk->hdk", "out": "hkd,d->hkd", "up": "df,f->df", "down": "fd,f->fd"}


def test_ia3_equals_the_base_model_on_weights_scaled_by_hand(setup):
    model, params, ids = setup
    config = jpeft.IA3Config(target_modules=IA3_TARGETS, feedforward_modules=["down"])
    p = linen.inject(model, params, config, jax.random.key(0), ids)
    assert p["layers"]["query"]["ia3_out"].shape == (LAYERS, HEADS, HEAD_DIM) and p["layers"]["down"]["ia3_in"].shape == (LAYERS, 2 * D)
    np.testing.assert_array_equal(linen.apply(model, {"params": p}, ids), model.apply({"params": params}, ids))  # ones: the base
    flat = jpeft.tree.flatten(p)
    for i, path in enumerate(sorted(q for q in flat if "/ia3_" in q)):
        flat[path] = 1 + 0.3 * jax.random.normal(jax.random.fold_in(jax.random.key(8), i), flat[path].shape)
    p = jpeft.tree.unflatten(flat)
    by_hand = jax.tree.map(lambda x: x, params)
    for name, spec in IA3_SCALE.items():
        leaf = "ia3_in" if name == "down" else "ia3_out"
        by_hand["layers"][name] = {**params["layers"][name], "kernel": jax.vmap(lambda w, v: jnp.einsum(spec, w, v))(
            params["layers"][name]["kernel"], p["layers"][name][leaf])}
    want = model.apply({"params": by_hand}, ids)
    np.testing.assert_allclose(linen.apply(model, {"params": p}, ids), want, atol=1e-5)
    np.testing.assert_allclose(model.apply({"params": linen.merge(model, p, ids)}, ids), want, atol=1e-5)
    with pytest.raises(ValueError, match="no \\(IA\\)\\^3 for a Conv layer"):
        linen.inject(model, params, jpeft.IA3Config(target_modules=["conv"], feedforward_modules=[]), jax.random.key(0), ids)


def test_pissa_init_keeps_the_output_and_rank_patterns_apply(setup):
    model, params, ids = setup
    config = jpeft.LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="pissa", rank_pattern={"up": 2})
    p = linen.inject(model, params, config, jax.random.key(2), ids)
    assert p["layers"]["up"]["lora_a"].shape == (LAYERS, D, 2) and float(p["layers"]["up"]["lora_scale"][0]) == 4.0
    assert float(jnp.abs(p["layers"]["query"]["kernel"] - params["layers"]["query"]["kernel"]).max()) > 1e-3  # the residual
    np.testing.assert_allclose(linen.apply(model, {"params": p}, ids), model.apply({"params": params}, ids), atol=1e-4)


def test_lora_dropout_applies_only_with_a_dropout_rng(setup):
    model, params, ids = setup
    p = _random_lora(_inject(setup), jax.random.key(3))
    plain = linen.apply(model, {"params": p}, ids)
    np.testing.assert_array_equal(linen.apply(model, {"params": p}, ids, lora_dropout=0.5), plain)  # no key: no dropout
    a = linen.apply(model, {"params": p}, ids, lora_dropout=0.5, rngs={"dropout": jax.random.key(0)})
    b = linen.apply(model, {"params": p}, ids, lora_dropout=0.5, rngs={"dropout": jax.random.key(0)})
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - plain).max()) > 1e-3


def test_ia3_on_a_registered_einsum_layer():
    class Proj(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return jnp.einsum("bsd,hdk->bshk", x, self.param("w", fnn.initializers.normal(0.2), (HEADS, D, HEAD_DIM)))

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return Proj(name="proj")(x)

    linen.register(Proj, "w", "bsd,hdk->bshk")
    x = jax.random.normal(jax.random.key(0), (2, 5, D))
    params = Net().init(jax.random.key(1), x)["params"]
    p = linen.inject(Net(), params, jpeft.IA3Config(target_modules=["proj"], feedforward_modules=[]), jax.random.key(2), x)
    p["proj"]["ia3_out"] = 1 + 0.3 * jax.random.normal(jax.random.key(3), (HEADS, HEAD_DIM))
    want = jnp.einsum("bsd,hdk->bshk", x, params["proj"]["w"] * p["proj"]["ia3_out"][:, None, :])
    np.testing.assert_allclose(linen.apply(Net(), {"params": p}, x), want, atol=1e-5)
