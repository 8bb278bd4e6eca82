"""PEFT on an unmodified Flax NNX model, in place: a method's leaves become attributes of the layers they adapt.

`inject` gives each targeted layer its method's leaves (LoRA's `lora_a` / `lora_b`, DoRA's magnitude, (IA)^3's
vectors, LoHa's and LoKr's factors; a bottleneck adapter's `adapter` subtree) as `nnx.LoRAParam`, so `nnx.Optimizer(
model, tx, wrt=nnx.LoRAParam)` and `nnx.DiffState(0, nnx.LoRAParam)` train exactly them, and a method's constants
(its scale) as `LoRAScale`, a variable no optimizer updates. The layer's class becomes a subclass whose call runs the
rule jpeft's own models use (`jpeft.nn.dense` on the layer seen as a matrix product, `jpeft.integrations.layers`).
Everything else stays `nnx.Param`; layers built by `nnx.vmap` carry leaves with the same leading axes, so `nnx.scan`
/ `nnx.remat` slice them with the weight. `nnx.to_pure_dict(nnx.state(model))` is then a plain jpeft tree.

`quantize` replaces a layer's weight by its quantized leaf group (`QuantizedWeight` variables, never trained) and keeps
the weight's shape in one call on the layer (`jpeft_weight_shape`), so the group's (in, out) matrix reads back in the
layer's own axes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jpeft import leaves, nn, quant, tree
from jpeft import targets as tg
from jpeft.integrations import layers
from jpeft.integrations.layers import ADAPTER, Kind, Site


class LoRAScale(nnx.Variable):
    """A method's fixed constant beside its trained leaves (LoRA's alpha / r, LoHa's and LoKr's scales): no optimizer updates it."""


class QuantizedWeight(nnx.Variable):
    """A leaf of a quantized weight's group (codes, block scales): frozen, dequantized inside the layer's matmul."""


SHAPE = "jpeft_weight_shape"  # a quantized layer's attribute: its weight's shape in one call


def _linear_general_axes(m, shape, a, k):
    if m.batch_axis:
        raise ValueError(f"LinearGeneral with batch_axis={dict(m.batch_axis)} shares weight axes with the input; not adaptable")
    n_in = len(m.in_features)
    return tuple(range(n_in)), tuple(range(n_in, len(shape)))


def _einsum_axes(m, shape, a, k):
    eq = layers.call_equation(m, a, k)
    axes = layers.einsum_axes(eq, len(shape))
    if eq != m.einsum_str and axes != layers.einsum_axes(m.einsum_str, len(shape)):
        # The leaves (and merge) follow the module's own equation; this call would read the kernel's axes otherwise.
        raise ValueError(f"nnx.Einsum called with einsum_str={eq!r}, which contracts other kernel axes than its own "
                         f"{m.einsum_str!r} that jpeft laid the leaves out by; build the layer with the equation it is called with")
    return axes


KINDS: dict[type, Kind] = {
    nnx.Linear: Kind("kernel", lambda m, s, a, k: ((0,), (1,)), layers.dense_kind_equation(lambda m, n: (n - 1,)),
                     call_ndim=lambda m, n: 2),
    nnx.LinearGeneral: Kind("kernel", _linear_general_axes, layers.dense_kind_equation(lambda m, n: layers.sorted_axes(m.axis, n)),
                            call_ndim=lambda m, n: len(m.batch_axis) + len(m.in_features) + len(m.out_features)),
    nnx.Einsum: Kind("kernel", _einsum_axes, lambda m, s, a, k, n: layers.call_equation(m, a, k), call_ndim=lambda m, n: len(m.kernel_shape)),
    nnx.Conv: Kind("kernel", layers.conv_axes, lora=layers.conv_lora, call_ndim=lambda m, n: len(m.kernel_size) + 2),
    nnx.Embed: Kind("embedding", lambda m, s, a, k: ((0,), (1,)), lora=layers.embed_lora, call_ndim=lambda m, n: 2,
                    readers={"attend": layers.attend_lora}),
}


def register(cls: type, weight_name: str, equation_or_axes: str | Callable[[Any], str] | tuple[int, ...], weight_ndim: int | None = None) -> None:
    """Cover an NNX layer class that is not Flax's own (see `jpeft.linen.register`; the equation may be a callable
    reading each instance's, as tunix's `lambda m: m.einsum_str`); with the axes form on layers stacked by `nnx.vmap`,
    `weight_ndim` gives the weight's rank in one call (the equation form implies it)."""
    KINDS[cls] = layers.registered(weight_name, equation_or_axes, weight_ndim)


_ADAPTED: dict[type, type] = {}


def _adapted(cls: type, kind: Kind) -> type:
    """`cls` whose methods reading the weight run the rule on what the layer holds (one subclass per class, made once)."""
    if cls not in _ADAPTED:
        methods = {name: _adapted_method(cls, name) for name in kind.methods}
        _ADAPTED[cls] = type(f"Adapted{cls.__name__}", (cls,), {**methods, "__module__": __name__})
    return _ADAPTED[cls]


def _adapted_method(cls: type, name: str) -> Any:
    def method(self, *args, **kwargs):
        kind = layers.kind_of(KINDS, self)
        p = _params(self, kind)
        site = _site(self, kind, (), args, kwargs)
        return layers.call(site, self, p, name, functools.partial(getattr(cls, name), self), args, kwargs, nn.Ctx())

    return method


def _base_class(module: Any) -> type:
    cls = type(module)
    return cls.__mro__[1] if cls in _ADAPTED.values() else cls


def _site(module: Any, kind: Kind, path: tuple, args: tuple = (), kwargs: dict | None = None) -> Site:
    """The weight of `module` as one call (with these arguments, if given) sees it, stacked leading axes dropped."""
    if hasattr(module, SHAPE):
        shape = getattr(module, SHAPE)
    else:
        stored = getattr(module, kind.weight)[...].shape
        shape = tuple(stored[len(stored) - kind.call_ndim(module, len(stored)):])
    return layers.make_site(kind, module, tuple(map(str, path)), _base_class(module).__name__, tuple(shape), args, kwargs or {})


def _params(layer: nnx.Module, kind: Kind) -> dict:
    """What the layer holds for the rule, by name: its weight (or quantized group), bias, method leaves and adapter."""
    p = {n: v[...] for n, v in vars(layer).items() if isinstance(v, nnx.Variable) and (
        n == kind.weight or leaves.is_peft_leaf(n) or quant.is_quantized_leaf(n) or (n == "bias" and kind.bias))}
    if ADAPTER in vars(layer):
        p[ADAPTER] = nnx.to_pure_dict(nnx.state(getattr(layer, ADAPTER)))
    return p


def _own_params(layer: nnx.Module) -> list[str]:
    return [n for n, v in vars(layer).items() if isinstance(v, nnx.Param)]


def sites(model: nnx.Module) -> list[tuple[Site, nnx.Module]]:
    """(site, layer) for every adaptable layer in the model."""
    return list(_survey(model)[0].values())


def _survey(model: nnx.Module) -> tuple[dict[str, tuple[Site, nnx.Module]], dict[str, str]]:
    """({name: (site, layer)} of adaptable layers, {name: why not} for the other modules holding params: opaque ones,
    and covered layers in a form jpeft cannot adapt, which only a target selecting them makes an error)."""
    found: dict[str, tuple[Site, nnx.Module]] = {}
    unadaptable: dict[str, str] = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        name, kind = ".".join(map(str, path)), layers.kind_of(KINDS, node)
        if kind is None:
            if params := _own_params(node):
                unadaptable[name] = layers.opaque_reason(name, type(node).__name__, params, "jpeft.nnx.register")
        elif hasattr(node, kind.weight) or hasattr(node, SHAPE):
            try:
                found[name] = (_site(node, kind, path), node)
            except ValueError as e:
                unadaptable[name] = f"{name}: {e}"
    return found, unadaptable


def inject(model: nnx.Module, config: Any, key: jax.Array) -> nnx.Module:
    """Add the method to the targeted layers of `model`, in place (and return it): its leaves in the layer's own axes,
    as each method initialises them (`jpeft.linen.inject` lists the shapes), or an `AdapterConfig`'s adapter after each
    targeted layer's output."""
    if getattr(config, "dropout", 0.0):
        raise ValueError(f"jpeft.nnx applies no LoRA dropout (LoraConfig.dropout={config.dropout}); set dropout=0.0, or train "
                         "with dropout through jpeft.linen.apply(lora_dropout=...) or jpeft's own models")
    found, unadaptable = _survey(model)
    for i, name in enumerate(layers.select(config, list(found), unadaptable)):
        site, layer = found[name]
        p = _params(layer, site.rule)
        if layers.method_leaves(p) or ADAPTER in p:
            raise ValueError(f"{name} already has PEFT leaves: merge them before injecting again")
        layers.check_registered(site, _own_params(layer))
        new, residual = layers.new_leaves(site, p, config, name, jax.random.fold_in(key, i))
        if residual is not None:
            getattr(layer, site.weight)[...] = residual
        _set_leaves(layer, site, new)
    return model


def _set_leaves(layer: nnx.Module, site: Site, held: dict) -> None:
    """The leaves as variables of the layer (the trainable ones `nnx.LoRAParam`), with the weight's partition names."""
    weight = getattr(layer, site.weight, None)
    names = weight.get_metadata().get("out_sharding") if isinstance(weight, nnx.Variable) else None
    lead = layers.lead_of(site, _params(layer, site.rule))
    layers.check_leaves(site, {n: jnp.asarray(v) for n, v in held.items() if n != ADAPTER}, lead)
    for leaf, value in held.items():
        if leaf == ADAPTER:  # {down, up} x {kernel, bias}, each trained
            setattr(layer, leaf, nnx.Dict({part: nnx.Dict({k: nnx.LoRAParam(v) for k, v in sub.items()}) for part, sub in value.items()}))
            continue
        variable = nnx.LoRAParam(value) if leaves.leaf(leaf).trainable else LoRAScale(jnp.asarray(value))
        axes = layers.partition_names(site, leaf, names, len(lead))
        if axes is not None:  # for nnx.get_partition_spec
            variable.set_metadata("out_sharding", axes)
        setattr(layer, leaf, variable)
    layer.__class__ = _adapted(_base_class(layer), site.rule)


def _take(layer: nnx.Module, p: dict) -> dict:
    """Remove the layer's method leaves and adapter; returns them by name (the adapter as a plain subtree)."""
    held = {n: v for n, v in p.items() if leaves.is_peft_leaf(n) or n == ADAPTER}
    for n in held:
        delattr(layer, n)
    return held


def _write(layer: nnx.Module, site: Site, new: dict) -> None:
    """Set the layer's weight and bias in place; a quantized weight's group gives way to a float `nnx.Param`."""
    for n in [n for n in vars(layer) if quant.is_quantized_leaf(n)]:
        delattr(layer, n)
    if hasattr(layer, SHAPE):
        delattr(layer, SHAPE)
    for name, value in new.items():
        if isinstance(getattr(layer, name, None), nnx.Variable):
            getattr(layer, name)[...] = value
        else:
            setattr(layer, name, nnx.Param(value))


def merge(model: nnx.Module) -> dict:
    """Fold every layer's method leaves into its weight in place (a quantized weight becomes a float one) and restore
    its class; returns the removed adapter as a tree of leaves by module path (what `unmerge` and `attach` take, and
    `jpeft.save_adapter` can write with the base)."""
    removed: dict = {}
    for site, layer in list(sites(model)):
        p = _params(layer, site.rule)
        if not (layers.method_leaves(p) or ADAPTER in p):
            continue
        _write(layer, site, layers.fold(site, p, layers.method_leaves(p) | ({ADAPTER: True} if ADAPTER in p else {}), 1.0))
        removed.update({f"{'/'.join(site.path)}/{n}": v for n, v in tree.flatten(_take(layer, p)).items()})
        layer.__class__ = _base_class(layer)
    if not removed:
        raise ValueError("merge: this model holds no method leaves (LoRA, DoRA, (IA)^3, LoHa, LoKr)")
    return tree.unflatten(removed)


def dora_norms(model: nnx.Module) -> dict[str, jax.Array]:
    """{layer path: ||W + s A B|| per output, in the layer's out axes} of every DoRA layer: what `unmerge` needs to
    undo a DoRA merge (the merged weight does not determine it); take it before merging."""
    out = {}
    for site, layer in sites(model):
        p = _params(layer, site.rule)
        if "lora_magnitude" in p:
            out["/".join(site.path)] = layers.dora_norms(site, p, layers.method_leaves(p))
    return out


def _by_module(adapter: dict) -> dict[tuple[str, ...], dict]:
    out: dict[tuple[str, ...], dict] = {}
    for p, v in tree.flatten(adapter).items():
        parts = p.split("/")
        if ADAPTER in parts[:-1]:
            i = parts.index(ADAPTER)
            out.setdefault(tuple(parts[:i]), {}).setdefault(ADAPTER, {})
            tree_ = out[tuple(parts[:i])][ADAPTER]
            tree_.setdefault(parts[i + 1], {})[parts[-1]] = v
        elif leaves.is_peft_leaf(parts[-1]):
            out.setdefault(tuple(parts[:-1]), {})[parts[-1]] = v
    return out


def attach(model: nnx.Module, adapter: dict) -> nnx.Module:
    """Give the layers the PEFT leaves found in `adapter` (a tree by module path, e.g. from `jpeft.load_adapter` on
    `nnx.to_pure_dict(nnx.state(model))`), in place."""
    found = {site.path: (site, layer) for site, layer in sites(model)}
    held = _by_module(adapter)
    missing = [".".join(p) for p in held if p not in found]
    if missing:
        raise ValueError(f"the adapter names layers this model does not have: {missing}")
    for path, new in held.items():
        site, layer = found[path]
        p = _params(layer, site.rule)
        if layers.method_leaves(p) or ADAPTER in p:
            raise ValueError(f"{site.name} already has PEFT leaves: merge them first")
        _set_leaves(layer, site, new)
    return model


def unmerge(model: nnx.Module, adapter: dict, norms: dict[str, jax.Array] | None = None) -> nnx.Module:
    """The inverse of `merge`: take the adapter back out of each weight and put it beside it (in place); DoRA layers
    need `norms` (`dora_norms` taken before merging)."""
    found = {site.path: (site, layer) for site, layer in sites(model)}
    for path, held in _by_module(adapter).items():
        key = "/".join(path)
        if "lora_magnitude" in held and (norms is None or key not in norms):
            raise ValueError(f"unmerge: {key} is a DoRA layer, whose merge cannot be undone from the merged weight alone; pass "
                             "norms=jpeft.nnx.dora_norms(model) taken before merging")
        if path in found:
            site, layer = found[path]
            _write(layer, site, layers.fold(site, _params(layer, site.rule), held, -1.0, (norms or {}).get(key)))
    return attach(model, adapter)


def quantize(model: nnx.Module, fmt: str, targets: tg.Targets | None = None, double_quant: bool = False) -> nnx.Module:
    """Quantize the targeted matrix layers' weights in place (`jpeft.quant`'s NF4 or int8 group of each layer's (in, out)
    matrix; default every Linear, LinearGeneral, Einsum and registered layer): the group becomes `QuantizedWeight`
    variables, the weight's shape in one call the layer's `jpeft_weight_shape`, and the layer dequantizes inside its matmul."""
    if fmt not in quant.FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of {list(quant.FORMATS)}")
    found = {n: (s, layer) for n, (s, layer) in _survey(model)[0].items() if s.rule.matrix and not hasattr(layer, SHAPE)}
    chosen = sorted(found) if targets is None else tg.select(sorted(found), targets, "targets")
    for name in chosen:
        site, layer = found[name]
        if fmt == "nf4" and site.matrix_shape[0] % 64:
            raise ValueError(f"cannot quantize {name} to NF4: its input size {site.matrix_shape[0]} ({site.weight} {site.shape}) is "
                             "not a multiple of 64 (NF4 blocks must not cross rows); leave it out of targets or use int8")
        if layers.method_leaves(_params(layer, site.rule)):
            raise ValueError(f"{name} holds PEFT leaves: quantize the base before injecting a method")
        layers.check_registered(site, _own_params(layer))
        group = quant.quantize_matrix(site.as_matrix(getattr(layer, site.weight)[...]), fmt, double_quant)
        delattr(layer, site.weight)
        for k, v in group.items():
            setattr(layer, k, QuantizedWeight(v))
        setattr(layer, SHAPE, site.shape)
        layer.__class__ = _adapted(_base_class(layer), site.rule)
    return model
