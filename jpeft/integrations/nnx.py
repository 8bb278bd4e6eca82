"""PEFT on an unmodified Flax NNX model, in place: LoRA leaves become `nnx.LoRAParam` attributes of the layers they adapt.

`inject` gives each targeted layer `lora_a` / `lora_b` (`nnx.LoRAParam`, so `nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)` and `nnx.DiffState(0, nnx.LoRAParam)` train exactly them) and `lora_scale` (a `LoRAScale`
variable, never trained), and switches the layer to a subclass whose call adds LoRA's update to its own
output, computed by the rule every jpeft model uses. Everything else stays `nnx.Param`; layers built by
`nnx.vmap` carry leaves with the same leading axes, so `nnx.scan` / `nnx.remat` slice them with the weight.
`nnx.to_pure_dict(nnx.state(model))` is then a plain jpeft tree.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jpeft import nn, tree
from jpeft.methods import ia3, lora
from jpeft.integrations import layers
from jpeft.integrations.layers import LEAVES, Kind, Site


class LoRAScale(nnx.Variable):
    """LoRA's fixed alpha / r (or alpha / sqrt(r)): a variable beside A and B that no optimizer updates."""


def _linear_general_axes(m, shape, a, k):
    if m.batch_axis:
        raise ValueError(f"LinearGeneral with batch_axis={dict(m.batch_axis)} shares weight axes with the input; not adaptable by LoRA")
    n_in = len(m.in_features)
    return tuple(range(n_in)), tuple(range(n_in, len(shape)))


def _einsum_axes(m, shape, a, k):
    eq = layers.call_equation(m, a, k)
    axes = layers.einsum_axes(eq, len(shape))
    if eq != m.einsum_str and axes != layers.einsum_axes(m.einsum_str, len(shape)):
        # The leaves (and merge) follow the module's own equation; this call would read the kernel's axes otherwise.
        raise ValueError(f"nnx.Einsum called with einsum_str={eq!r}, which contracts other kernel axes than its own "
                         f"{m.einsum_str!r} that jpeft laid LoRA's leaves out by; build the layer with the equation it is called with")
    return axes


def _x(a, k):
    return layers.first_input(a, k)


KINDS: dict[type, Kind] = {
    nnx.Linear: Kind("kernel", lambda m, s, a, k: ((0,), (1,)),
                     lambda site, m, leaves, a, k, ctx: layers.contract_delta(site, leaves, _x(a, k), (-1,), ctx),
                     call_ndim=lambda m, n: 2, in_positions=lambda m, a, k, xn: (-1,), out_positions=lambda m, s, a, k: (-1,)),
    nnx.LinearGeneral: Kind("kernel", _linear_general_axes,
                            lambda site, m, leaves, a, k, ctx: layers.contract_delta(
                                site, leaves, _x(a, k), layers.sorted_axes(m.axis, _x(a, k).ndim), ctx),
                            call_ndim=lambda m, n: len(m.batch_axis) + len(m.in_features) + len(m.out_features),
                            in_positions=lambda m, a, k, xn: layers.sorted_axes(m.axis, xn),
                            out_positions=lambda m, s, a, k: tuple(range(-len(m.out_features), 0))),
    nnx.Einsum: Kind("kernel", _einsum_axes,
                     lambda site, m, leaves, a, k, ctx: layers.einsum_delta(site, layers.call_equation(m, a, k), leaves, _x(a, k), ctx),
                     call_ndim=lambda m, n: len(m.kernel_shape),
                     in_positions=lambda m, a, k, xn: layers.einsum_positions(layers.call_equation(m, a, k), len(m.kernel_shape))[0],
                     out_positions=lambda m, s, a, k: layers.einsum_positions(layers.call_equation(m, a, k), len(m.kernel_shape))[1]),
    nnx.Conv: Kind("kernel", layers.conv_axes,
                   lambda site, m, leaves, a, k, ctx: layers.conv_delta(leaves, _x(a, k), {g: getattr(m, g) for g in layers.CONV_GEOMETRY}, ctx),
                   call_ndim=lambda m, n: len(m.kernel_size) + 2),
    nnx.Embed: Kind("embedding", lambda m, s, a, k: ((0,), (1,)),
                    lambda site, m, leaves, a, k, ctx: layers.embed_delta(leaves, _x(a, k)), call_ndim=lambda m, n: 2,
                    readers={"attend": lambda site, m, leaves, a, k, ctx: layers.attend_delta(leaves, _x(a, k))}),
}


def register(cls: type, weight_name: str, equation_or_axes: str | tuple[int, ...], weight_ndim: int | None = None) -> None:
    """Cover an NNX layer class that is not Flax's own (see `jpeft.linen.register`); with the axes form on layers
    stacked by `nnx.vmap`, `weight_ndim` gives the weight's rank in one call (the equation form implies it)."""
    KINDS[cls] = layers.registered(weight_name, equation_or_axes, weight_ndim)


_ADAPTED: dict[type, type] = {}


def _adapted(cls: type, kind: Kind) -> type:
    """`cls` whose methods reading the weight apply the PEFT leaves it holds (one subclass per class, made once)."""
    if cls not in _ADAPTED:
        methods = {name: _adapted_method(cls, name) for name in kind.methods}
        _ADAPTED[cls] = type(f"Adapted{cls.__name__}", (cls,), {**methods, "__module__": __name__})
    return _ADAPTED[cls]


def _adapted_method(cls: type, name: str) -> Any:
    def method(self, *args, **kwargs):
        site = _site(self, (), args, kwargs)
        return layers.adapted_call(site, self, _leaves_of(self), name, functools.partial(getattr(cls, name), self), args, kwargs, nn.Ctx())

    return method


def _site(module: Any, path: tuple, args: tuple = (), kwargs: dict | None = None) -> Site:
    """The weight of `module` as one call (with these arguments, if given) sees it, stacked leading axes dropped."""
    kind = layers.kind_of(KINDS, module)
    stored = getattr(module, kind.weight)[...].shape
    shape = tuple(stored[len(stored) - kind.call_ndim(module, len(stored)):])
    return layers.make_site(kind, module, tuple(map(str, path)), _base_class(module).__name__, shape, args, kwargs or {})


def _base_class(module: Any) -> type:
    cls = type(module)
    return cls.__mro__[1] if cls in _ADAPTED.values() else cls


def _leaves_of(layer: nnx.Module) -> dict:
    return {n: getattr(layer, n)[...] for n in LEAVES if hasattr(layer, n)}


def sites(model: nnx.Module) -> list[tuple[Site, nnx.Module]]:
    """(site, layer) for every adaptable layer in the model."""
    return list(_survey(model)[0].values())


def _survey(model: nnx.Module) -> tuple[dict[str, tuple[Site, nnx.Module]], dict[str, str]]:
    """({name: (site, layer)} of adaptable layers, {name: why not} for the other modules holding params: opaque ones,
    and covered layers in a form LoRA cannot adapt, which only a target selecting them makes an error)."""
    found: dict[str, tuple[Site, nnx.Module]] = {}
    unadaptable: dict[str, str] = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        name, kind = ".".join(map(str, path)), layers.kind_of(KINDS, node)
        if kind is None:
            if params := [n for n, v in vars(node).items() if isinstance(v, nnx.Param)]:
                unadaptable[name] = layers.opaque_reason(name, type(node).__name__, params, "jpeft.nnx.register")
        elif hasattr(node, kind.weight):
            try:
                found[name] = (_site(node, path), node)
            except ValueError as e:
                unadaptable[name] = f"{name}: {e}"
    return found, unadaptable


def inject(model: nnx.Module, config: lora.LoraConfig | ia3.IA3Config, key: jax.Array) -> nnx.Module:
    """Add the method to the targeted layers of `model`, in place (and return it): LoRA's A (Kaiming-uniform) and B
    (zero) as `nnx.LoRAParam` with a `LoRAScale`, or (IA)^3's ones-initialised vectors as `nnx.LoRAParam`."""
    layers.check_method(config)
    if getattr(config, "dropout", 0.0):
        raise ValueError(f"jpeft.nnx applies no LoRA dropout (LoraConfig.dropout={config.dropout}); set dropout=0.0, or train "
                         "with dropout through jpeft.linen.apply(lora_dropout=...) or jpeft's own models")
    found, unadaptable = _survey(model)
    layers.refuse(config.target_modules, unadaptable)
    chosen = layers.targeted(list(found), config)
    for i, name in enumerate(chosen):
        site, layer = found[name]
        if _leaves_of(layer):
            raise ValueError(f"{name} already has PEFT leaves: merge them before injecting again")
        weight = getattr(layer, site.weight)
        leaves, residual = layers.new_leaves(site, weight[...], config, name, jax.random.fold_in(key, i))
        if residual is not None:
            weight[...] = residual
        _set_leaves(layer, site, leaves)
    return model


def _set_leaves(layer: nnx.Module, site: Site, leaves: dict) -> None:
    """The leaves as variables of the layer (the trainable ones `nnx.LoRAParam`), with the weight's partition names."""
    weight = getattr(layer, site.weight)
    names, lead = weight.get_metadata().get("out_sharding"), weight[...].ndim - len(site.shape)
    layers.check_leaves(site, {n: jnp.asarray(v) for n, v in leaves.items()}, weight[...].shape[:lead])
    for leaf, value in leaves.items():
        variable = LoRAScale(jnp.asarray(value, jnp.float32)) if leaf == "lora_scale" else nnx.LoRAParam(value)
        axes = layers.axis_names(site, leaf, names, lead)
        if axes is not None:  # for nnx.get_partition_spec
            variable.set_metadata("out_sharding", axes)
        setattr(layer, leaf, variable)
    layer.__class__ = _adapted(type(layer), site.rule)


def merge(model: nnx.Module) -> dict:
    """Fold every layer's PEFT leaves into its weight in place and restore its class; returns the removed adapter as a
    tree of leaves by module path (what `unmerge` and `attach` take, and `jpeft.save_adapter` can write with the base)."""
    removed: dict = {}
    for site, layer in list(sites(model)):
        leaves = _leaves_of(layer)
        if not leaves:
            continue
        _fold_into(layer, site, leaves, 1.0)
        removed.update({f"{'/'.join(site.path)}/{n}": v for n, v in leaves.items()})
        for n in leaves:
            delattr(layer, n)
        layer.__class__ = _base_class(layer)
    if not removed:
        raise ValueError("merge: this model holds no LoRA or IA3 layers")
    return tree.unflatten(removed)


def _fold_into(layer: nnx.Module, site: Site, leaves: dict, sign: float) -> None:
    """Fold the leaves into the layer's variables in place (sign -1 takes them back out)."""
    for name, fold in layers.folds(site):
        if (variable := getattr(layer, name, None)) is not None:
            variable[...] = fold(site, variable[...], leaves, sign)


def _by_module(adapter: dict) -> dict[tuple[str, ...], dict]:
    out: dict[tuple[str, ...], dict] = {}
    for p, v in tree.flatten(adapter).items():
        *path, leaf = p.split("/")
        if leaf in LEAVES:
            out.setdefault(tuple(path), {})[leaf] = v
    return out


def attach(model: nnx.Module, adapter: dict) -> nnx.Module:
    """Give the layers the PEFT leaves found in `adapter` (a tree by module path, e.g. from `jpeft.load_adapter` on
    `nnx.to_pure_dict(nnx.state(model))`), in place."""
    found = {site.path: (site, layer) for site, layer in sites(model)}
    held = _by_module(adapter)
    missing = [".".join(p) for p in held if p not in found]
    if missing:
        raise ValueError(f"the adapter names layers this model does not have: {missing}")
    for path, leaves in held.items():
        site, layer = found[path]
        if _leaves_of(layer):
            raise ValueError(f"{site.name} already has PEFT leaves: merge them first")
        _set_leaves(layer, site, leaves)
    return model


def unmerge(model: nnx.Module, adapter: dict) -> nnx.Module:
    """The inverse of `merge`: take the adapter back out of each weight and put it beside it (in place)."""
    found = {site.path: (site, layer) for site, layer in sites(model)}
    for path, leaves in _by_module(adapter).items():
        if path in found:
            site, layer = found[path]
            _fold_into(layer, site, leaves, -1.0)
    return attach(model, adapter)
