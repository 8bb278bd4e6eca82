"""PEFT on an unmodified Flax NNX model, in place: LoRA leaves become `nnx.LoRAParam` attributes of the layers they adapt.

`inject` gives each targeted layer `lora_a` / `lora_b` (`nnx.LoRAParam`, so `nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)` and `nnx.DiffState(0, nnx.LoRAParam)` train exactly them) and `lora_scale` (a `LoRAScale`
variable, never trained), and switches the layer to a subclass whose call adds LoRA's update to its own
output, computed by the rule every jpeft model uses. Everything else stays `nnx.Param`; layers built by
`nnx.vmap` carry leaves with the same leading axes, so `nnx.scan` / `nnx.remat` slice them with the weight.
`nnx.to_pure_dict(nnx.state(model))` is then a plain jpeft tree.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jpeft import lora, nn, tree
from jpeft import targets as tg
from jpeft.integrations import layers
from jpeft.integrations.layers import Kind, Site

LORA_LEAVES = ("lora_a", "lora_b", "lora_scale")


class LoRAScale(nnx.Variable):
    """LoRA's fixed alpha / r (or alpha / sqrt(r)): a variable beside A and B that no optimizer updates."""


def _linear_general_axes(m, shape, a, k):
    if m.batch_axis:
        raise ValueError(f"LinearGeneral with batch_axis={dict(m.batch_axis)} shares weight axes with the input; not adaptable by LoRA")
    n_in = len(m.in_features)
    return tuple(range(n_in)), tuple(range(n_in, len(shape)))


def _conv_axes(m, shape, a, k):
    if m.feature_group_count != 1:
        raise ValueError(f"a grouped Conv (feature_group_count={m.feature_group_count}) is not adaptable by LoRA")
    return tuple(range(len(shape) - 1)), (len(shape) - 1,)


def _x(a, k):
    return layers.first_input(a, k)


KINDS: dict[type, Kind] = {
    nnx.Linear: Kind("kernel", lambda m, s, a, k: ((0,), (1,)),
                     lambda site, m, leaves, a, k, ctx: layers.contract_delta(site, leaves, _x(a, k), (-1,), ctx),
                     call_ndim=lambda m, n: 2),
    nnx.LinearGeneral: Kind("kernel", _linear_general_axes,
                            lambda site, m, leaves, a, k, ctx: layers.contract_delta(site, leaves, _x(a, k), m.axis, ctx),
                            call_ndim=lambda m, n: len(m.batch_axis) + len(m.in_features) + len(m.out_features)),
    nnx.Einsum: Kind("kernel", lambda m, s, a, k: layers.einsum_axes(m.einsum_str, len(s)),
                     lambda site, m, leaves, a, k, ctx: layers.einsum_delta(site, k.get("einsum_str") or m.einsum_str, leaves, _x(a, k), ctx),
                     call_ndim=lambda m, n: len(m.kernel_shape)),
    nnx.Conv: Kind("kernel", _conv_axes,
                   lambda site, m, leaves, a, k, ctx: layers.conv_delta(leaves, _x(a, k), {g: getattr(m, g) for g in layers.CONV_GEOMETRY}, ctx),
                   call_ndim=lambda m, n: len(m.kernel_size) + 2),
    nnx.Embed: Kind("embedding", lambda m, s, a, k: ((0,), (1,)),
                    lambda site, m, leaves, a, k, ctx: layers.embed_delta(leaves, _x(a, k)), call_ndim=lambda m, n: 2),
}


def register(cls: type, weight_name: str, equation_or_axes: str | tuple[int, ...]) -> None:
    """Cover an NNX layer class that is not Flax's own (see `jpeft.linen.register`)."""
    KINDS[cls] = layers.registered(weight_name, equation_or_axes)


_ADAPTED: dict[type, type] = {}


def _adapted(cls: type) -> type:
    """`cls` with LoRA's update added to the output of its call (one subclass per class, made once)."""
    if cls not in _ADAPTED:
        def __call__(self, *args, **kwargs):
            y = cls.__call__(self, *args, **kwargs)
            site = _site(self, ())
            leaves = {n: getattr(self, n)[...] for n in LORA_LEAVES}
            return y + layers.kind_of(KINDS, self).delta(site, self, leaves, args, kwargs, nn.Ctx()).astype(y.dtype)

        _ADAPTED[cls] = type(f"LoRA{cls.__name__}", (cls,), {"__call__": __call__, "__module__": __name__})
    return _ADAPTED[cls]


def _site(module: Any, path: tuple) -> Site:
    """The weight of `module` as one call sees it (stacked leading axes dropped)."""
    kind = layers.kind_of(KINDS, module)
    stored = getattr(module, kind.weight)[...].shape
    shape = tuple(stored[len(stored) - kind.call_ndim(module, len(stored)):])
    in_axes, out_axes = kind.axes(module, shape, (), {})
    return Site(tuple(map(str, path)), _base_class(module).__name__, kind.weight, shape, in_axes, out_axes)


def _base_class(module: Any) -> type:
    cls = type(module)
    return cls.__mro__[1] if cls in _ADAPTED.values() else cls


def sites(model: nnx.Module) -> Iterator[tuple[Site, nnx.Module]]:
    """(site, layer) for every adaptable layer in the model."""
    for path, node in nnx.iter_graph(model):
        kind = layers.kind_of(KINDS, node) if isinstance(node, nnx.Module) else None
        if kind is not None and hasattr(node, kind.weight):
            yield _site(node, path), node


def inject(model: nnx.Module, config: lora.LoraConfig, key: jax.Array) -> nnx.Module:
    """Add LoRA to the targeted layers of `model`, in place (and return it): A Kaiming-uniform, B zero, as HF PEFT."""
    opaque = {".".join(map(str, path)): (type(node).__name__, params) for path, node in nnx.iter_graph(model)
              if isinstance(node, nnx.Module) and layers.kind_of(KINDS, node) is None
              and (params := [n for n, v in vars(node).items() if isinstance(v, nnx.Param)])}
    layers.refuse_opaque(config.target_modules, opaque, "jpeft.nnx.register")
    found = {site.name: (site, layer) for site, layer in sites(model)}
    chosen = tg.select([n for n in found if not tg.within(config.modules_to_save, n)], config.target_modules, "target_modules")
    for i, name in enumerate(chosen):
        site, layer = found[name]
        if hasattr(layer, "lora_a"):
            raise ValueError(f"{name} already has LoRA weights: merge them before injecting again")
        weight = getattr(layer, site.weight)
        w = weight[...]
        lead = w.shape[: w.ndim - len(site.shape)]
        r, scale = config.rank_and_scale(name)
        matrix = site.as_matrix(w)
        k = jax.random.fold_in(key, i)
        if config.init == "pissa":
            a, b, residual = _vmap(lambda m: lora._pissa(m, r, scale), len(lead))(matrix)
            weight[...] = site.from_matrix(residual).astype(w.dtype)
        else:
            keys = jax.random.split(k, math.prod(lead)).reshape(lead) if lead else k
            a, b = _vmap(lambda kk, m: lora._init_pair(kk, m, r, config.init), len(lead))(keys, matrix)
        values = (a.reshape(*lead, *site.in_shape, r).astype(w.dtype), b.reshape(*lead, r, *site.out_shape).astype(w.dtype),
                  jnp.full(lead, scale, jnp.float32))
        names = layers.lora_axis_names(site, weight.get_metadata().get("out_sharding"), len(lead))
        for leaf, value, kind, axes in zip(LORA_LEAVES, values, (nnx.LoRAParam, nnx.LoRAParam, LoRAScale), names):
            variable = kind(value)
            if axes is not None:  # the weight's partitioning, for nnx.get_partition_spec
                variable.set_metadata("out_sharding", axes)
            setattr(layer, leaf, variable)
        layer.__class__ = _adapted(type(layer))
    return model


def _vmap(fn, depth: int):
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


def _delta(site: Site, layer: nnx.Module) -> jax.Array:
    a, b, s = (getattr(layer, n)[...] for n in LORA_LEAVES)
    r = b.shape[s.ndim]
    m = s[..., None, None] * (a.astype(jnp.float32).reshape(*s.shape, -1, r) @ b.astype(jnp.float32).reshape(*s.shape, r, -1))
    return site.from_matrix(m)


def merge(model: nnx.Module) -> dict:
    """Fold W + s·AB into every adapted layer in place and restore its class; returns the removed adapter as a tree
    of LoRA leaves by module path (what `unmerge` and `attach` take, and `jpeft.save_adapter` can write with the base)."""
    removed: dict = {}
    for site, layer in list(sites(model)):
        if not hasattr(layer, "lora_a"):
            continue
        weight = getattr(layer, site.weight)
        weight[...] = (weight[...].astype(jnp.float32) + _delta(site, layer)).astype(weight[...].dtype)
        removed.update({f"{'/'.join(site.path)}/{n}": getattr(layer, n)[...] for n in LORA_LEAVES})
        for n in LORA_LEAVES:
            delattr(layer, n)
        layer.__class__ = _base_class(layer)
    if not removed:
        raise ValueError("merge: this model holds no LoRA layers")
    return tree.unflatten(removed)


def attach(model: nnx.Module, adapter: dict) -> nnx.Module:
    """Give the layers the LoRA leaves found in `adapter` (a tree by module path, e.g. from `jpeft.load_adapter` on
    `nnx.to_pure_dict(nnx.state(model))`), in place."""
    found = {site.path: (site, layer) for site, layer in sites(model)}
    flat = tree.flatten(adapter)
    paths = sorted({tuple(p.split("/")[:-1]) for p in flat if p.endswith("/lora_a")})
    missing = [".".join(p) for p in paths if p not in found]
    if missing:
        raise ValueError(f"the adapter names layers this model does not have: {missing}")
    for path in paths:
        site, layer = found[path]
        if hasattr(layer, "lora_a"):
            raise ValueError(f"{site.name} already has LoRA weights: merge them first")
        prefix = "/".join(path)
        layer.lora_a, layer.lora_b = nnx.LoRAParam(flat[f"{prefix}/lora_a"]), nnx.LoRAParam(flat[f"{prefix}/lora_b"])
        layer.lora_scale = LoRAScale(jnp.asarray(flat[f"{prefix}/lora_scale"], jnp.float32))
        layer.__class__ = _adapted(type(layer))
    return model


def unmerge(model: nnx.Module, adapter: dict) -> nnx.Module:
    """The inverse of `merge`: put the adapter back and subtract s·AB from each weight (in place)."""
    attach(model, adapter)
    adapted = {tuple(p.split("/")[:-1]) for p in tree.flatten(adapter) if p.endswith("/lora_a")}
    for site, layer in sites(model):
        if site.path in adapted:
            weight = getattr(layer, site.weight)
            weight[...] = (weight[...].astype(jnp.float32) - _delta(site, layer)).astype(weight[...].dtype)
    return model
