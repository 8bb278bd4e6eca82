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


def _adapted_and_merged_give(model, q, want, *args):
    """The model with its PEFT leaves, and the unmodified model on merge's params, both compute `want`."""
    _close(linen.apply(model, {"params": q}, *args), want)
    _close(model.apply({"params": linen.merge(model, q, *args)}, *args), want)


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


# 2. (IA)^3's ia3_out scales the layer's whole output, so its merge scales the bias too (as HF PEFT's does).


def test_linen_ia3_merge_scales_the_bias_in_the_output_order():
    x = _random((2, 3, 4), 0)
    normal = fnn.initializers.normal(1.0)
    model = _One(lambda name: fnn.Einsum((2, 4, 5), "bsd,hdk->bskh", bias_init=normal, name=name))  # bias (k, h)
    params = model.init(jax.random.key(1), x)["params"]
    q = linen.inject(model, params, jpeft.IA3Config(target_modules=["l"], feedforward_modules=[]), jax.random.key(2), x)
    q["l"]["ia3_out"] = 1 + _random((2, 5), 4)  # (h, k): the kernel's out axes
    l = q["l"]["ia3_out"]
    by_hand = {"l": {"kernel": params["l"]["kernel"] * l[:, None, :], "bias": params["l"]["bias"] * l.T}}
    want = model.apply({"params": by_hand}, x)
    _close(linen.apply(model, {"params": q}, x), want)
    merged = linen.merge(model, q, x)
    _close(model.apply({"params": merged}, x), want)
    back = linen.unmerge(model, merged, {"l": {"ia3_out": l}}, x)
    _close(back["l"]["bias"], params["l"]["bias"])


def test_nnx_ia3_merge_scales_the_bias_and_unmerge_restores_it():
    x = _random((3, 8), 0)
    model = _Holder(nnx.Linear(8, 4, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0)))
    kernel, bias = model.l.kernel[...], model.l.bias[...]
    jnnx.inject(model, jpeft.IA3Config(target_modules=["l"], feedforward_modules=[]), jax.random.key(2))
    model.l.ia3_out[...] = jnp.array([0.5, 2.0, 1.5, -1.0])
    want = (x @ kernel + bias) * model.l.ia3_out[...]  # HF PEFT's (IA)^3 on a Linear
    _close(model(x), want)
    adapter = jnnx.merge(model)
    _close(model(x), want)
    jnnx.unmerge(model, adapter)
    _close(model.l.bias[...], bias)


# 3. A Linen subclass of a covered layer whose __call__ calls super().__call__ gets LoRA's update once.


class _MyDense(fnn.Dense):
    @fnn.compact
    def __call__(self, x):
        return super().__call__(x)


def test_linen_subclass_calling_super_gets_the_update_once():
    x = _random((2, 6), 0)
    model, params, q = _linen_lora(lambda name: _MyDense(4, name=name), x)
    want = x @ (params["l"]["kernel"] + q["l"]["lora_a"] @ q["l"]["lora_b"]) + params["l"]["bias"]
    _adapted_and_merged_give(model, q, want, x)


class _EncDec(fnn.Module):
    def setup(self):
        self.enc, self.dec = fnn.Dense(6), fnn.Dense(6)

    def encode(self, x):
        return self.enc(x)

    def __call__(self, x):
        return self.dec(self.encode(x))


def test_linen_method_call_runs_part_of_the_model_with_its_leaves():
    """`method=` runs the encoder alone: the decoder's leaves go unread by design; a whole call still checks them."""
    x = _random((2, 6), 0)
    model = _EncDec()
    params = model.init(jax.random.key(1), x)["params"]
    q = linen.inject(model, params, jpeft.LoraConfig(r=2, alpha=2, target_modules=["enc", "dec"]), jax.random.key(2), x)
    q["enc"]["lora_b"] = _random(q["enc"]["lora_b"].shape, 3)
    e = q["enc"]
    _close(linen.apply(model, {"params": q}, x, method=_EncDec.encode), x @ (e["kernel"] + e["lora_a"] @ e["lora_b"]) + e["bias"])
    stray = {**q, "extra": {"lora_a": q["dec"]["lora_a"]}}
    with pytest.raises(ValueError, match="PEFT leaves that no layer read: \\['extra'\\]"):
        linen.apply(model, {"params": stray}, x)


# 4. An embedding also read as a tied output head (`attend`) sees E + s·AB there too, as merge gives.


class _Tied(fnn.Module):
    @fnn.compact
    def __call__(self, ids):
        e = fnn.Embed(20, 8, name="embed")
        return e.attend(fnn.Dense(8, name="mid")(e(ids)))


def test_linen_tied_embedding_head_equals_the_merged_table():
    ids = jnp.array([[1, 2, 3], [4, 5, 19]])
    model = _Tied()
    params = model.init(jax.random.key(0), ids)["params"]
    q = linen.inject(model, params, jpeft.LoraConfig(r=2, alpha=4, target_modules=["embed"]), jax.random.key(1), ids)
    q["embed"]["lora_b"] = _random(q["embed"]["lora_b"].shape, 2)
    e = q["embed"]
    by_hand = {**params, "embed": {"embedding": e["embedding"] + e["lora_scale"] * e["lora_a"] @ e["lora_b"]}}
    want = model.apply({"params": by_hand}, ids)
    _adapted_and_merged_give(model, q, want, ids)


def test_nnx_tied_embedding_head_equals_the_merged_table():
    class Tied(nnx.Module):
        def __init__(self):
            self.embed, self.mid = nnx.Embed(20, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 8, rngs=nnx.Rngs(1))

        def __call__(self, ids):
            return self.embed.attend(self.mid(self.embed(ids)))

    ids = jnp.array([[1, 2, 3], [4, 5, 19]])
    model = jnnx.inject(Tied(), jpeft.LoraConfig(r=2, alpha=4, target_modules=["embed"]), jax.random.key(1))
    e = model.embed
    e.lora_b[...] = _random(e.lora_b[...].shape, 2)
    table = e.embedding[...] + e.lora_scale[...] * e.lora_a[...] @ e.lora_b[...]
    want = model.mid(table[ids]) @ table.T  # the tied head on the merged table, by hand
    _close(model(ids), want)
    jnnx.merge(model)
    _close(model(ids), want)


# 6. LoRA dropout under nn.scan draws each layer's mask from Flax's "dropout" stream, which the scan splits.


def test_linen_lora_dropout_differs_between_scanned_layers():
    layers, d = 4, 64

    class Layer(fnn.Module):
        @fnn.compact
        def __call__(self, x, _):  # output: LoRA's update alone (zero kernel)
            return x, fnn.Dense(d, use_bias=False, kernel_init=fnn.initializers.zeros, name="d")(x)

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            stack = fnn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True}, length=layers)
            return stack(name="layers")(x, None)[1]

    x = jnp.ones((1, d))
    model = Net()
    q = linen.inject(model, model.init(jax.random.key(0), x)["params"], jpeft.LoraConfig(r=d, alpha=d, target_modules=["d"]),
                     jax.random.key(1), x)
    eye = jnp.broadcast_to(jnp.eye(d), (layers, d, d))
    q["layers"]["d"]["lora_a"], q["layers"]["d"]["lora_b"] = eye, eye  # A = B = I, s = 1: the update is dropout(x)
    y = linen.apply(model, {"params": q}, x, lora_dropout=0.5, rngs={"dropout": jax.random.key(7)})
    masks = np.asarray(y[:, 0] != 0)
    assert 0.2 < masks.mean() < 0.8
    assert all(not (masks[i] == masks[0]).all() for i in range(1, layers))
    np.testing.assert_array_equal(linen.apply(model, {"params": q}, x, lora_dropout=0.5), jnp.ones((layers, 1, d)))  # no rng: none


# 5, 7. Layers LoRA cannot adapt (masked or grouped Conv, batch_dims DenseGeneral, batched or ellipsis Einsum) are
# refused by name when a target selects them, and left alone when only other layers are targeted.

_UNADAPTABLE = {
    "masked conv": (lambda name: fnn.Conv(4, (3,), mask=jnp.ones((3, 4, 4)).at[0].set(0), name=name), (2, 5, 4), "kernel mask"),
    "depthwise conv": (lambda name: fnn.Conv(4, (3,), feature_group_count=4, name=name), (2, 5, 4), "grouped Conv"),
    "batch_dims": (lambda name: fnn.DenseGeneral(4, batch_dims=(0,), name=name), (2, 5, 4), "batch_dims"),
    "batched einsum": (lambda name: fnn.Einsum((2, 4, 4), "ebd,edf->ebf", name=name), (2, 5, 4), "neither only contracted"),
    "ellipsis einsum": (lambda name: fnn.Einsum((4, 4), "...d,df->...f", name=name), (2, 5, 4), "no ellipsis"),
}


class _TwoLayers(fnn.Module):
    make: callable

    @fnn.compact
    def __call__(self, x):
        return fnn.Dense(3, name="head")(self.make(name="l")(x))


@pytest.mark.parametrize("case", sorted(_UNADAPTABLE))
def test_linen_unadaptable_layer_is_refused_only_when_targeted(case):
    make, shape, reason = _UNADAPTABLE[case]
    x = _random(shape, 0)
    model = _TwoLayers(make)
    params = model.init(jax.random.key(1), x)["params"]
    with pytest.raises(ValueError, match=f"^l: .*{reason}"):
        linen.inject(model, params, jpeft.LoraConfig(r=2, target_modules=["l"]), jax.random.key(2), x)
    q = linen.inject(model, params, jpeft.LoraConfig(r=2, alpha=2, target_modules=["head"]), jax.random.key(2), x)
    q["head"]["lora_b"] = _random(q["head"]["lora_b"].shape, 3)
    by_hand = {**params, "head": {**params["head"], "kernel": params["head"]["kernel"] + q["head"]["lora_a"] @ q["head"]["lora_b"]}}
    want = model.apply({"params": by_hand}, x)
    _adapted_and_merged_give(model, q, want, x)


def test_nnx_depthwise_conv_is_refused_only_when_targeted():
    class Net(nnx.Module):
        def __init__(self):
            self.dw, self.head = nnx.Conv(8, 8, (3,), feature_group_count=8, rngs=nnx.Rngs(0)), nnx.Linear(8, 4, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.head(self.dw(x))

    with pytest.raises(ValueError, match="^dw: a grouped Conv"):
        jnnx.inject(Net(), jpeft.LoraConfig(r=2, target_modules=["dw"]), jax.random.key(1))
    model = jnnx.inject(Net(), jpeft.LoraConfig(r=2, target_modules=["head"]), jax.random.key(1))
    model.head.lora_b[...] = _random(model.head.lora_b[...].shape, 3)
    x = _random((2, 5, 8), 0)
    y = model(x)
    want = model.dw(x) @ (model.head.kernel[...] + model.head.lora_a[...] @ model.head.lora_b[...] * model.head.lora_scale[...])
    _close(y, want + model.head.bias[...])
    jnnx.merge(model)
    _close(model(x), y)


# 9. Einsum's equation given at call time.


def test_linen_einsum_equation_given_positionally_at_call_time():
    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Einsum((4, 6), name="l")(x, "bsd,df->bsf")

    x = _random((2, 5, 4), 0)
    model = Net()
    params = model.init(jax.random.key(1), x)["params"]
    q = linen.inject(model, params, jpeft.LoraConfig(r=2, alpha=2, target_modules=["l"]), jax.random.key(2), x)
    q["l"]["lora_b"] = _random(q["l"]["lora_b"].shape, 3)
    by_hand = {"l": {**params["l"], "kernel": params["l"]["kernel"] + q["l"]["lora_a"] @ q["l"]["lora_b"]}}
    _close(linen.apply(model, {"params": q}, x), model.apply({"params": by_hand}, x))


def test_nnx_einsum_called_with_an_equation_reading_other_axes_is_refused():
    class Net(nnx.Module):
        def __init__(self):
            self.l = nnx.Einsum("bsd,df->bsf", (4, 4), rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.l(x, einsum_str="bsf,df->bsd")  # contracts the kernel's other axis

    model = jnnx.inject(Net(), jpeft.LoraConfig(r=2, target_modules=["l"]), jax.random.key(1))
    with pytest.raises(ValueError, match="einsum_str='bsf,df->bsd', which contracts other kernel axes"):
        model(_random((2, 5, 4), 0))


# 12, 13. Adapter files: LoRA on a 2-D kernel stored (out, in) round-trips; IA3 vectors PEFT's format cannot hold are
# refused at save time, naming the module.


def test_lora_on_an_out_in_kernel_round_trips_through_a_file(tmp_path):
    x = _random((2, 5, 6), 0)
    model, params, q = _linen_lora(lambda name: fnn.Einsum((4, 6), "bsd,kd->bsk", name=name), x)
    jpeft.save_adapter(tmp_path / "a", q, base_model_name_or_path="m")
    loaded = jpeft.load_adapter(tmp_path / "a", params)
    for leaf in ("lora_a", "lora_b", "lora_scale"):
        np.testing.assert_array_equal(loaded["l"][leaf], q["l"][leaf])
    by_hand = {"l": {**params["l"], "kernel": params["l"]["kernel"] + (q["l"]["lora_a"] @ q["l"]["lora_b"]).T}}
    _close(linen.apply(model, {"params": loaded}, x), model.apply({"params": by_hand}, x))


def test_ia3_vectors_peft_cannot_hold_are_refused_at_save_time(tmp_path):
    x = _random((2, 3, 6), 0)
    model = _One(lambda name: fnn.DenseGeneral((2, 3), name=name))
    q = linen.inject(model, model.init(jax.random.key(1), x)["params"], jpeft.IA3Config(target_modules=["l"], feedforward_modules=[]),
                     jax.random.key(2), x)
    with pytest.raises(ValueError, match=r"save_adapter: l has ia3_out \(2, 3\) beside a kernel \(6, 2, 3\)"):
        jpeft.save_adapter(tmp_path / "a", q, base_model_name_or_path="m")


# 16, 17. Settings that would be silently ignored are refused.


def test_nnx_refuses_lora_dropout_it_would_not_apply():
    with pytest.raises(ValueError, match="jpeft.nnx applies no LoRA dropout"):
        jnnx.inject(_Holder(nnx.Linear(4, 4, rngs=nnx.Rngs(0))), jpeft.LoraConfig(r=2, target_modules=["l"], dropout=0.5),
                    jax.random.key(1))


def test_ia3_feedforward_modules_must_be_targets_as_in_hf_peft():
    with pytest.raises(ValueError, match=r"feedforward_modules should be a subset of target_modules.*\['down'\]"):
        jpeft.IA3Config(target_modules=["up_proj", "down_proj"], feedforward_modules=["down"])
    jpeft.IA3Config(target_modules=".*proj", feedforward_modules=["down"])  # a regex target: no name check, as in HF PEFT


# 8, 10, 11, 15. Setups jpeft cannot or does not run end in an error naming the layer and what to do.


def test_nnx_registered_axes_form_on_vmapped_layers_with_weight_ndim():
    layers_, d, f = 3, 4, 4  # a square weight, so layers chain

    class Proj(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (d, f)))

        def __call__(self, x):
            return x @ self.w[...]

    jnnx.register(Proj, "w", (0,), weight_ndim=2)

    class Net(nnx.Module):
        def __init__(self):
            self.proj = nnx.split_rngs(splits=layers_)(nnx.vmap(Proj, in_axes=0, out_axes=0))(nnx.Rngs(0))

        def __call__(self, x):
            return nnx.scan(lambda x, p: (p(x), None), in_axes=(nnx.Carry, 0))(x, self.proj)[0]

    model = jnnx.inject(Net(), jpeft.LoraConfig(r=2, alpha=2, target_modules=["proj"]), jax.random.key(1))
    p = model.proj
    assert p.lora_a[...].shape == (layers_, d, 2) and p.lora_b[...].shape == (layers_, 2, f)
    p.lora_b[...] = _random(p.lora_b[...].shape, 3)
    x, want = _random((2, d), 0), _random((2, d), 0)
    for w in p.w[...] + p.lora_a[...] @ p.lora_b[...]:
        want = want @ w
    _close(model(x), want)


def test_nnx_scale_left_unsliced_by_state_axes_is_named():
    class Net(nnx.Module):
        def __init__(self):
            self.layers = nnx.split_rngs(splits=3)(nnx.vmap(lambda r: nnx.Linear(4, 4, rngs=r), in_axes=0, out_axes=0))(nnx.Rngs(0))

        def __call__(self, x):
            axes = nnx.StateAxes({nnx.Param: 0, ...: None})  # slices A and B (LoRAParams), not LoRAScale
            return nnx.scan(lambda x, l: (l(x), None), in_axes=(nnx.Carry, axes))(x, self.layers)[0]

    model = jnnx.inject(Net(), jpeft.LoraConfig(r=2, target_modules=["layers"]), jax.random.key(1))
    with pytest.raises(ValueError, match=r"lora_scale \(3,\) \(needs \(\)\).*LoRAScale"):
        model(jnp.ones((2, 4)))


def test_linen_scan_with_the_layer_axis_not_leading_is_refused():
    class Layer(fnn.Module):
        @fnn.compact
        def __call__(self, x, _):
            return fnn.Dense(8, name="d")(x), None

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.scan(Layer, variable_axes={"params": 1}, split_rngs={"params": True}, length=3)(name="s")(x, None)[0]

    x, model = jnp.ones((2, 8)), Net()
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"s.d: its stored kernel \(8, 3, 8\) does not end with the \(8, 8\)"):
        linen.inject(model, params, jpeft.LoraConfig(r=2, target_modules=["d"]), jax.random.key(1), x)


class _Two(fnn.Module):
    @fnn.compact
    def __call__(self, x, both=True):
        x = fnn.Dense(6, name="a")(x)
        return fnn.Dense(6, name="b")(x) if both else x


def test_unclear_inputs_get_errors_naming_the_layer():
    x, model = jnp.ones((2, 6)), _Two()
    params = model.init(jax.random.key(0), x)["params"]
    q = linen.inject(model, params, jpeft.LoraConfig(r=2, target_modules=["a", "b"]), jax.random.key(1), x)
    with pytest.raises(ValueError, match="merge: PEFT leaves sit at b, which is no adaptable layer this model ran"):
        linen.merge(model, q, x, both=False)
    with pytest.raises(ValueError, match="unmerge: PEFT leaves sit at zz"):
        linen.unmerge(model, params, {"zz": q["a"]}, x)
    with pytest.raises(ValueError, match="a: PiSSA's rank 8 exceeds min"):
        linen.inject(model, params, jpeft.LoraConfig(r=8, init="pissa", target_modules=["a"]), jax.random.key(1), x)
    no_b = {**q, "a": {k: v for k, v in q["a"].items() if k != "lora_b"}}
    with pytest.raises(ValueError, match=r"a: LoRA needs lora_a, lora_b and lora_scale together"):
        linen.apply(model, {"params": no_b}, x)
    with pytest.raises(ValueError, match=r"l: PEFT leaves do not fit its kernel \(6, 6\): lora_a \(5, 2\) \(needs \(6, 2\)\)"):
        jnnx.attach(_Holder(nnx.Linear(6, 6, rngs=nnx.Rngs(0))),
                    {"l": {"lora_a": jnp.ones((5, 2)), "lora_b": jnp.ones((2, 6)), "lora_scale": jnp.ones(())}})


# 18. (IA)^3 on a layer registered by its contracted axes.


class _AxesProj(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        return x @ self.param("w", fnn.initializers.normal(1.0), (x.shape[-1], 4))


linen.register(_AxesProj, "w", (0,))


@pytest.mark.parametrize("leaf", ["ia3_in", "ia3_out"])
def test_ia3_on_a_layer_registered_by_axes_scales_its_weight(leaf):
    x = _random((2, 6), 0)
    model = _One(lambda name: _AxesProj(name=name))
    params = model.init(jax.random.key(1), x)["params"]
    ff = ["l"] if leaf == "ia3_in" else []
    q = linen.inject(model, params, jpeft.IA3Config(target_modules=["l"], feedforward_modules=ff), jax.random.key(2), x)
    v = 1 + _random(q["l"][leaf].shape, 4)
    q["l"][leaf] = v
    scaled = params["l"]["w"] * (v[:, None] if leaf == "ia3_in" else v[None, :])
    _close(linen.apply(model, {"params": q}, x), x @ scaled)
