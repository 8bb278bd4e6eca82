"""LoRA on an unmodified Flax NNX transformer, in place: LinearGeneral heads, Einsum projections, Conv, Embed, layers
built by nnx.vmap and run by nnx.scan + nnx.remat. References: the same model without LoRA, and with weights merged
by hand here."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jpeft
from jpeft import nnx as jnnx
from tests.integrations.test_linen import _product_shapes

D, HEADS, HEAD_DIM, VOCAB, LAYERS = 16, 2, 8, 40, 3


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
        self.key = nnx.LinearGeneral(D, (HEADS, HEAD_DIM), rngs=rngs)
        self.value = nnx.Einsum("bsd,hdk->bshk", (HEADS, D, HEAD_DIM), rngs=rngs)
        self.out = nnx.LinearGeneral((HEADS, HEAD_DIM), D, axis=(-2, -1), rngs=rngs)
        self.up = nnx.Linear(D, 2 * D, rngs=rngs)
        self.down = nnx.Einsum("bsf,fd->bsd", (2 * D, D), rngs=rngs)

    def __call__(self, x):
        q, k, v = self.query(x), self.key(x), self.value(x)
        w = jax.nn.softmax(jnp.einsum("bshk,bthk->bhst", q, k) / np.sqrt(HEAD_DIM), axis=-1)
        x = x + self.out(jnp.einsum("bhst,bthk->bshk", w, v))
        return x + self.down(jax.nn.gelu(self.up(x)))


class Tiny(nnx.Module):
    def __init__(self, seed: int = 0):
        rngs = nnx.Rngs(seed)
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, (3,), rngs=rngs)

        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stack(rngs):
            return Block(rngs)

        self.layers = stack(rngs)
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, ids):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def run(x, block):
            return block(x)

        return self.head(run(self.conv(self.embed(ids)), self.layers))


TARGETS = ["query", "value", "out", "up", "down", "conv", "embed"]
MERGE = {"query": "dr,rhk->dhk", "value": "dr,rhk->hdk", "out": "hkr,rd->hkd", "up": "dr,rf->df", "down": "fr,rd->fd",
         "conv": "cir,ro->cio", "embed": "vr,rd->vd"}
IDS = jax.random.randint(jax.random.key(1), (2, 7), 0, VOCAB)


def _lora_model(rslora: bool = False, random: bool = True) -> Tiny:
    model = jnnx.inject(Tiny(), jpeft.LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_rslora=rslora), jax.random.key(2))
    if random:  # B is zero after inject: random A and B so the update shows
        for i, (_, var) in enumerate(sorted(nnx.iter_graph(model), key=lambda pv: str(pv[0]))):
            if isinstance(var, nnx.LoRAParam):
                var[...] = 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(3), i), var[...].shape)
    return model


def _layer(model, name):
    return getattr(model.layers, name) if name not in ("conv", "embed") else getattr(model, name)


def _merged_by_hand(lora_model: Tiny) -> Tiny:
    model = Tiny()
    for name, spec in MERGE.items():
        src, dst = _layer(lora_model, name), _layer(model, name)
        a, b, s = src.lora_a[...], src.lora_b[...], src.lora_scale[...]
        fold = (lambda a, b, s: s * jnp.einsum(spec, a, b))
        delta = jax.vmap(fold)(a, b, s) if name not in ("conv", "embed") else fold(a, b, s)
        weight = dst.embedding if name == "embed" else dst.kernel
        weight[...] = weight[...] + delta
    return model


def test_leaves_are_lora_params_with_the_weight_layout_and_the_stack_axis():
    model = _lora_model(random=False)
    q = model.layers.query
    assert isinstance(q.lora_a, nnx.LoRAParam) and isinstance(q.lora_scale, jnnx.LoRAScale) and isinstance(q.kernel, nnx.Param)
    assert q.lora_a[...].shape == (LAYERS, D, 4) and q.lora_b[...].shape == (LAYERS, 4, HEADS, HEAD_DIM) and q.lora_scale[...].shape == (LAYERS,)
    assert model.layers.out.lora_a[...].shape == (LAYERS, HEADS, HEAD_DIM, 4) and model.conv.lora_a[...].shape == (3, D, 4)
    assert not hasattr(model.layers.key, "lora_a") and not hasattr(model.head, "lora_a")
    pure = nnx.to_pure_dict(nnx.state(model))  # a plain jpeft tree: the jpeft tools apply unchanged
    trainable, total = jpeft.count_params(pure, jpeft.trainable_mask(pure), verbose=False)
    lora_sizes = sum(v[...].size for _, v in nnx.iter_graph(model) if isinstance(v, nnx.LoRAParam))
    weights = {p: v for p, v in jpeft.tree.flatten(pure).items() if not p.endswith("/lora_scale")}  # counts leave out the scale
    assert trainable == lora_sizes and total == sum(v.size for v in weights.values())


def test_zero_b_gives_the_base_output_exactly():
    np.testing.assert_array_equal(_lora_model(random=False)(IDS), Tiny()(IDS))


@pytest.mark.parametrize("rslora", [False, True])
def test_random_lora_equals_the_base_model_on_weights_merged_by_hand(rslora):
    model = _lora_model(rslora)
    got = nnx.jit(lambda m: m(IDS))(model)
    want = _merged_by_hand(model)(IDS)
    assert float(jnp.abs(got - want).max()) <= 1e-5 * max(1.0, float(jnp.abs(want).max()))
    assert float(jnp.abs(got - Tiny()(IDS)).max()) > 1e-2


def test_merge_runs_in_the_plain_model_and_unmerge_restores():
    model = _lora_model()
    want, before = model(IDS), nnx.to_pure_dict(nnx.state(model))
    adapter = jnnx.merge(model)
    assert type(model.layers.query) is nnx.LinearGeneral and not hasattr(model.layers.query, "lora_a")
    assert jax.tree.structure(nnx.to_pure_dict(nnx.state(model))) == jax.tree.structure(nnx.to_pure_dict(nnx.state(Tiny())))
    np.testing.assert_allclose(model(IDS), want, atol=1e-5)
    jnnx.unmerge(model, adapter)
    after = nnx.to_pure_dict(nnx.state(model))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_only_lora_params_train_and_no_frozen_gradient_is_formed():
    model = _lora_model()
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    base = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # LoRAParam subclasses Param
    frozen_before = nnx.to_pure_dict(nnx.state(model, base))
    lora_before = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))

    def loss(m):
        return jnp.mean(m(IDS) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert sorted(nnx.to_pure_dict(grads)) == ["conv", "embed", "layers"] and all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    opt.update(model, grads)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, base)))))
    assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lora_before), jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))))

    whole, state = nnx.split(model)
    forms = {s.name: {s.shape, s.shape[::-1], (math.prod(s.in_shape), math.prod(s.out_shape)), (math.prod(s.out_shape), math.prod(s.in_shape))}
             for s, _ in jnnx.sites(model)}

    def formed(wrt) -> list[str]:
        """Layers whose weight gradient (in any of its layouts) the compiled gradient with respect to `wrt` forms."""
        shapes = _product_shapes(lambda st: nnx.grad(loss, argnums=nnx.DiffState(0, wrt))(nnx.merge(whole, st)), state)
        return sorted(n for n, f in forms.items() if f & shapes)

    assert formed(nnx.LoRAParam) == []
    assert len(formed(nnx.Param)) >= 7  # control: full fine-tuning does form them


def test_unmatched_targets_name_the_layers():
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matches no module. Module names in this model: .*'query'"):
        jnnx.inject(Tiny(), jpeft.LoraConfig(target_modules=["nope"]), jax.random.key(0))
    for config in (jpeft.LoraConfig(target_modules=["query", "valeu"]), jpeft.IA3Config(target_modules=["query", "valeu"], feedforward_modules=[])):
        with pytest.raises(ValueError, match=r"\['query', 'valeu'\]: 'valeu' matches no module. 'valeu': did you mean 'value'\?"):
            jnnx.inject(Tiny(), config, jax.random.key(0))


def test_adapter_files_round_trip_into_a_fresh_model(tmp_path):
    model = _lora_model()
    jpeft.save_adapter(tmp_path / "adapter", nnx.to_pure_dict(nnx.state(model)), base_model_name_or_path="my-nnx-model")
    fresh = Tiny()
    loaded = jpeft.load_adapter(tmp_path / "adapter", nnx.to_pure_dict(nnx.state(fresh)))  # the base fingerprint is checked
    jnnx.attach(fresh, loaded)
    assert isinstance(fresh.layers.query.lora_a, nnx.LoRAParam)
    np.testing.assert_array_equal(fresh(IDS), model(IDS))
    with pytest.raises(ValueError, match="already has PEFT leaves"):
        jnnx.attach(fresh, loaded)


def test_a_module_using_its_weights_in_its_own_code_is_refused_by_name():
    class FeedForward(nnx.Module):
        def __init__(self, rngs):
            self.gating = nnx.Param(jax.random.normal(rngs.params(), (D, 8)))
            self.linear = nnx.Param(jax.random.normal(rngs.params(), (8, D)))

        def __call__(self, x):
            return jax.nn.gelu(x @ self.gating[...]) @ self.linear[...]

    class Net(nnx.Module):
        def __init__(self):
            self.ffw = FeedForward(nnx.Rngs(0))

    with pytest.raises(ValueError, match=r"matches ffw \(FeedForward\), whose params \['gating', 'linear'\].*jpeft.nnx.register"):
        jnnx.inject(Net(), jpeft.LoraConfig(target_modules=["ffw"]), jax.random.key(1))


def test_ia3_scales_like_weights_scaled_by_hand_and_merges():
    config = jpeft.IA3Config(target_modules=["query", "out", "up", "down"], feedforward_modules=["down"])
    model = jnnx.inject(Tiny(), config, jax.random.key(0))
    assert isinstance(model.layers.down.ia3_in, nnx.LoRAParam) and model.layers.out.ia3_out[...].shape == (LAYERS, D)
    np.testing.assert_array_equal(model(IDS), Tiny()(IDS))
    for i, (_, var) in enumerate(sorted(nnx.iter_graph(model), key=lambda pv: str(pv[0]))):
        if isinstance(var, nnx.LoRAParam):
            var[...] = 1 + 0.3 * jax.random.normal(jax.random.fold_in(jax.random.key(4), i), var[...].shape)
    by_hand = Tiny()
    for name, spec, leaf in (("query", "dhk,hk->dhk", "ia3_out"), ("out", "hkd,d->hkd", "ia3_out"), ("up", "df,f->df", "ia3_out"),
                             ("down", "fd,f->fd", "ia3_in")):
        kernel = getattr(by_hand.layers, name).kernel
        kernel[...] = jax.vmap(lambda w, v: jnp.einsum(spec, w, v))(kernel[...], getattr(getattr(model.layers, name), leaf)[...])
    want = by_hand(IDS)
    np.testing.assert_allclose(model(IDS), want, atol=1e-5)
    jnnx.merge(model)
    np.testing.assert_allclose(model(IDS), want, atol=1e-5)
