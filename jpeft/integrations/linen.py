"""PEFT on an unmodified Flax Linen model: `inject` adds leaves to its params, `apply` runs it with them, `merge` folds them.

Layers are found by one abstract pass (`jax.eval_shape` of `model.apply` under `nn.intercept_methods`) that
records each adaptable layer's path, kind and weight shape; no parameter is created inside the user's
traced forward pass. At run time the same interception adds LoRA's update to the layer's own output, so the
frozen path is the model's own code and x W + (x A) B s is one jitted computation (W + AB never formed).
Layers stacked by `nn.scan` carry their leaves with the same leading layer axis; `nn.remat` is transparent.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Mapping

import flax.linen as fnn
import jax
import jax.numpy as jnp

from jpeft import lora, nn
from jpeft import targets as tg
from jpeft import tree
from jpeft.integrations import layers
from jpeft.integrations.layers import Kind, Site

LORA_LEAVES = ("lora_a", "lora_b", "lora_scale")


def _dense_general_axes(m, shape, args, kwargs):
    if m.batch_dims:
        raise ValueError(f"{m.name}: DenseGeneral with batch_dims={m.batch_dims} shares weight axes with the input; not adaptable by LoRA")
    n_in = len(m.axis) if isinstance(m.axis, tuple) else 1
    return tuple(range(n_in)), tuple(range(n_in, len(shape)))


def _dense_general_delta(site, m, leaves, args, kwargs, ctx):
    axis = m.axis if isinstance(m.axis, tuple) else (m.axis,)
    return layers.contract_delta(site, leaves, layers.first_input(args, kwargs), axis, ctx)


def _einsum_equation(m, kwargs) -> str:
    return kwargs.get("einsum_str") or m.einsum_str


def _conv_axes(m, shape, args, kwargs):
    if m.feature_group_count != 1:
        raise ValueError(f"{m.name}: a grouped Conv (feature_group_count={m.feature_group_count}) is not adaptable by LoRA")
    return tuple(range(len(shape) - 1)), (len(shape) - 1,)


KINDS: dict[type, Kind] = {
    fnn.Dense: Kind("kernel", lambda m, s, a, k: ((0,), (1,)),
                    lambda site, m, leaves, a, k, ctx: layers.contract_delta(site, leaves, layers.first_input(a, k), (-1,), ctx)),
    fnn.DenseGeneral: Kind("kernel", _dense_general_axes, _dense_general_delta),
    fnn.Einsum: Kind("kernel", lambda m, s, a, k: layers.einsum_axes(_einsum_equation(m, k), len(s)),
                     lambda site, m, leaves, a, k, ctx: layers.einsum_delta(site, _einsum_equation(m, k), leaves, layers.first_input(a, k), ctx)),
    fnn.Conv: Kind("kernel", _conv_axes, lambda site, m, leaves, a, k, ctx: layers.conv_delta(
        leaves, layers.first_input(a, k), {g: getattr(m, g) for g in layers.CONV_GEOMETRY}, ctx)),
    fnn.Embed: Kind("embedding", lambda m, s, a, k: ((0,), (1,)),
                    lambda site, m, leaves, a, k, ctx: layers.embed_delta(leaves, layers.first_input(a, k))),
}


def register(cls: type, weight_name: str, equation_or_axes: str | tuple[int, ...]) -> None:
    """Cover a layer class that is not Flax's own: its `weight_name` param meets the input as in the einsum
    `equation_or_axes` ("input,weight->output"), or, given weight axes, contracts them with the input's last axes."""
    KINDS[cls] = layers.registered(weight_name, equation_or_axes)


def _kind(module: Any) -> Kind | None:
    return layers.kind_of(KINDS, module)


def _split(variables: Mapping[str, Any]) -> tuple[dict, bool]:
    """(the variables dict, whether the caller passed the params collection alone)."""
    if "params" in variables and isinstance(variables["params"], Mapping):
        return dict(variables), False
    return {"params": dict(variables)}, True


def sites(model: fnn.Module, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> list[Site]:
    """Every adaptable layer the model calls on these example inputs, found by one abstract pass."""
    return _survey(model, variables, args, kwargs)[0]


def _survey(model, variables, args, kwargs) -> tuple[list[Site], dict[str, tuple[str, list[str]]]]:
    """(adaptable layers, {path: (class, param names)} of the other modules that hold params of their own)."""
    found: dict[tuple[str, ...], Site] = {}
    opaque: dict[str, tuple[str, list[str]]] = {}

    def record(next_fun, a, k, context):
        m, kind = context.module, _kind(context.module)
        if kind is not None and context.method_name in kind.methods and m.has_variable("params", kind.weight):
            shape = tuple(fnn.meta.unbox(m.get_variable("params", kind.weight)).shape)
            in_axes, out_axes = kind.axes(m, shape, a, k)
            found.setdefault(tuple(m.scope.path), Site(tuple(m.scope.path), type(m).__name__, kind.weight, shape, in_axes, out_axes))
        out = next_fun(*a, **k)
        own = [n for n, v in (m.variables.get("params") or {}).items() if not isinstance(v, Mapping)] if m.scope else []
        if kind is None and own:
            opaque[".".join(m.scope.path)] = (type(m).__name__, own)
        return out

    full, _ = _split(variables)
    with fnn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), full)
    return list(found.values()), opaque


def _module(params: Mapping[str, Any], path: tuple[str, ...]) -> dict:
    node: Any = params
    for part in path:
        node = node[part]
    return node


def inject(model: fnn.Module, params: Mapping[str, Any], config: lora.LoraConfig, key: jax.Array, *example_args: Any,
           **example_kwargs: Any) -> dict:
    """A new tree with lora_a (*lead, *in, r), lora_b (*lead, r, *out), lora_scale (*lead) beside each targeted weight.

    `params` is the params collection or the whole variables dict (returned in the same form); `*lead` are the
    leading axes `nn.scan` stacks layers on. `target_modules` matches dotted module paths as HF PEFT does.
    """
    variables, bare = _split(params)
    adaptable, opaque = _survey(model, variables, example_args, example_kwargs)
    layers.refuse_opaque(config.target_modules, opaque, "jpeft.linen.register")
    found = {s.name: s for s in adaptable}
    chosen = tg.select([n for n in found if not tg.within(config.modules_to_save, n)], config.target_modules, "target_modules")
    out = tree.flatten(variables["params"])
    for i, name in enumerate(chosen):
        site = found[name]
        module = _module(variables["params"], site.path)
        if "lora_a" in module:
            raise ValueError(f"{name} already has LoRA weights: merge or split them off before injecting again")
        boxed = module[site.weight]
        w = fnn.meta.unbox(boxed)
        lead = w.shape[: w.ndim - len(site.shape)]
        r, scale = config.rank_and_scale(name)
        matrix = site.as_matrix(w)
        keys = jax.random.split(jax.random.fold_in(key, i), math.prod(lead)).reshape(lead) if lead else jax.random.fold_in(key, i)
        if config.init == "pissa":
            a, b, residual = _vmap(lambda m: lora._pissa(m, r, scale), len(lead))(matrix)
            out[_leaf(site, site.weight)] = _rebox(boxed, site.from_matrix(residual).astype(w.dtype))
        else:
            a, b = _vmap(lambda k, m: lora._init_pair(k, m, r, config.init), len(lead))(keys, matrix)
        prefix = "/".join(site.path)
        names = layers.lora_axis_names(site, boxed.names if isinstance(boxed, fnn.Partitioned) else None, len(lead))
        values = (a.reshape(*lead, *site.in_shape, r).astype(w.dtype), b.reshape(*lead, r, *site.out_shape).astype(w.dtype),
                  jnp.full(lead, scale, jnp.float32))
        for leaf, value, axes in zip(LORA_LEAVES, values, names):
            out[f"{prefix}/{leaf}"] = value if axes is None else boxed.replace(value=value, names=axes)
    new = {**variables, "params": tree.unflatten(out)}
    return new["params"] if bare else new


def _rebox(boxed: Any, value: jax.Array) -> Any:
    """`value` in the box (and so with the partitioning) of `boxed`, if it had one."""
    return boxed.replace_boxed(value) if isinstance(boxed, fnn.meta.AxisMetadata) else value


def _leaf(site: Site, leaf: str) -> str:
    return "/".join((*site.path, leaf))


def _vmap(fn, depth: int):
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


@contextlib.contextmanager
def _interceptor(ctx: nn.Ctx, used: set) -> Iterator[None]:
    def add_lora(next_fun, a, k, context):
        m = context.module
        kind = _kind(m)
        y = next_fun(*a, **k)
        if kind is None or context.method_name not in kind.methods or not m.has_variable("params", "lora_a"):
            return y
        leaves = {n: fnn.meta.unbox(m.get_variable("params", n)) for n in LORA_LEAVES}
        shape = tuple(fnn.meta.unbox(m.get_variable("params", kind.weight)).shape)
        in_axes, out_axes = kind.axes(m, shape, a, k)
        site = Site(tuple(m.scope.path), type(m).__name__, kind.weight, shape, in_axes, out_axes)
        used.add(site.path)
        return y + kind.delta(site, m, leaves, a, k, ctx).astype(y.dtype)

    with fnn.intercept_methods(add_lora):
        yield


def apply(model: fnn.Module, variables: Mapping[str, Any], *args: Any, lora_rng: jax.Array | None = None,
          lora_dropout: float = 0.0, **kwargs: Any) -> Any:
    """`model.apply(variables, *args, **kwargs)` with the LoRA leaves in `variables` used by the layers they sit in.

    `lora_rng` with `lora_dropout` drops LoRA's input as HF PEFT does in training. A LoRA leaf that no layer read
    (a typo'd path, a layer this call never ran) is an error, not a silent no-op.
    """
    ctx = nn.Ctx(rng=lora_rng, lora_dropout=lora_dropout)
    used: set = set()
    with _interceptor(ctx, used):
        out = model.apply(variables, *args, **kwargs)
    full, _ = _split(variables)
    holders = {tuple(p.split("/")[:-1]) for p in tree.flatten(full["params"]) if p.endswith("/lora_a")}
    if holders - used:
        unread = sorted(".".join(p) for p in holders - used)
        raise ValueError(f"LoRA leaves that no layer read: {unread}; each must sit beside the weight of a layer this call runs "
                         f"(Flax's Dense, DenseGeneral, Einsum, Conv, Embed, or a class given to jpeft.linen.register)")
    return out


def merge(model: fnn.Module, params: Mapping[str, Any], *example_args: Any, **example_kwargs: Any) -> dict:
    """The model's own params with W + s·AB folded into each adapted weight and the LoRA leaves removed."""
    variables, bare = _split(params)
    flat = tree.flatten(variables["params"])
    base = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] not in LORA_LEAVES}
    found = {s.path: s for s in sites(model, {**variables, "params": tree.unflatten(base)}, *example_args, **example_kwargs)}
    holders = sorted({tuple(p.split("/")[:-1]) for p in flat if p.endswith("/lora_a")})
    if not holders:
        raise ValueError("merge: these params hold no LoRA leaves")
    for path in holders:
        site = found[path]
        prefix = "/".join(path)
        a, b, s = (fnn.meta.unbox(flat[f"{prefix}/{leaf}"]) for leaf in LORA_LEAVES)
        boxed = base[_leaf(site, site.weight)]
        w = fnn.meta.unbox(boxed)
        base[_leaf(site, site.weight)] = _rebox(boxed, (w.astype(jnp.float32) + site.from_matrix(_delta_matrix(a, b, s, site))).astype(w.dtype))
    new = {**variables, "params": tree.unflatten(base)}
    return new["params"] if bare else new


def _delta_matrix(a: jax.Array, b: jax.Array, scale: jax.Array, site: Site) -> jax.Array:
    """s·AB as (*lead, in, out) in float32."""
    r = b.shape[scale.ndim]
    a2 = a.astype(jnp.float32).reshape(*scale.shape, -1, r)
    b2 = b.astype(jnp.float32).reshape(*scale.shape, r, -1)
    return scale[..., None, None] * (a2 @ b2)


def unmerge(model: fnn.Module, merged: Mapping[str, Any], adapter: Mapping[str, Any], *example_args: Any, **example_kwargs: Any) -> dict:
    """The inverse of `merge`: W = merged - s·AB, with the adapter's leaves (a tree holding them) put back."""
    variables, bare = _split(merged)
    flat = tree.flatten(variables["params"])
    leaves = {p: v for p, v in tree.flatten(_split(adapter)[0]["params"]).items() if p.rsplit("/", 1)[-1] in LORA_LEAVES}
    found = {s.path: s for s in sites(model, variables, *example_args, **example_kwargs)}
    for path in sorted({tuple(p.split("/")[:-1]) for p in leaves if p.endswith("/lora_a")}):
        site, prefix = found[path], "/".join(path)
        boxed = flat[_leaf(site, site.weight)]
        w = fnn.meta.unbox(boxed)
        delta = site.from_matrix(_delta_matrix(*(fnn.meta.unbox(leaves[f"{prefix}/{leaf}"]) for leaf in LORA_LEAVES), site))
        flat[_leaf(site, site.weight)] = _rebox(boxed, (w.astype(jnp.float32) - delta).astype(w.dtype))
    new = {**variables, "params": tree.unflatten({**flat, **leaves})}
    return new["params"] if bare else new
