"""PEFT on an unmodified Flax Linen model: `inject` adds leaves to its params, `apply` runs it with them, `merge` folds them.

Layers are found by one abstract pass (`jax.eval_shape` of `model.apply` under `nn.intercept_methods`) that
records each adaptable layer's path, kind and weight shape; no parameter is created inside the user's
traced forward pass. At run time the same interception adds LoRA's update to the layer's own output, so the
frozen path is the model's own code and x W + (x A) B s is one jitted computation (W + AB never formed).
Layers stacked by `nn.scan` carry their leaves with the same leading layer axis; `nn.remat` is transparent.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import flax.linen as fnn
import jax

from jpeft import nn
from jpeft.methods import ia3, lora
from jpeft import targets as tg
from jpeft import tree
from jpeft.integrations import layers
from jpeft.integrations.layers import LEAVES, Kind, Site


def _dense_general_axes(m, shape, args, kwargs):
    if m.batch_dims:
        raise ValueError(f"DenseGeneral with batch_dims={m.batch_dims} shares weight axes with the input; not adaptable by LoRA")
    n_in = len(m.axis) if isinstance(m.axis, tuple) else 1
    return tuple(range(n_in)), tuple(range(n_in, len(shape)))


def _dense_general_delta(site, m, leaves, args, kwargs, ctx):
    x = layers.first_input(args, kwargs)
    return layers.contract_delta(site, leaves, x, layers.sorted_axes(m.axis, x.ndim), ctx)


def _features(m) -> tuple[int, ...]:
    return m.features if isinstance(m.features, tuple) else (m.features,)


KINDS: dict[type, Kind] = {
    fnn.Dense: Kind("kernel", lambda m, s, a, k: ((0,), (1,)),
                    lambda site, m, leaves, a, k, ctx: layers.contract_delta(site, leaves, layers.first_input(a, k), (-1,), ctx),
                    in_positions=lambda m, a, k, xn: (-1,), out_positions=lambda m, s, a, k: (-1,)),
    fnn.DenseGeneral: Kind("kernel", _dense_general_axes, _dense_general_delta,
                           in_positions=lambda m, a, k, xn: layers.sorted_axes(m.axis, xn),
                           out_positions=lambda m, s, a, k: tuple(range(-len(_features(m)), 0))),
    fnn.Einsum: Kind("kernel", lambda m, s, a, k: layers.einsum_axes(layers.call_equation(m, a, k), len(s)),
                     lambda site, m, leaves, a, k, ctx: layers.einsum_delta(site, layers.call_equation(m, a, k), leaves, layers.first_input(a, k), ctx),
                     in_positions=lambda m, a, k, xn: layers.einsum_positions(layers.call_equation(m, a, k), len(m.shape))[0],
                     out_positions=lambda m, s, a, k: layers.einsum_positions(layers.call_equation(m, a, k), len(m.shape))[1]),
    fnn.Conv: Kind("kernel", layers.conv_axes, lambda site, m, leaves, a, k, ctx: layers.conv_delta(
        leaves, layers.first_input(a, k), {g: getattr(m, g) for g in layers.CONV_GEOMETRY}, ctx)),
    fnn.Embed: Kind("embedding", lambda m, s, a, k: ((0,), (1,)),
                    lambda site, m, leaves, a, k, ctx: layers.embed_delta(leaves, layers.first_input(a, k)),
                    readers={"attend": lambda site, m, leaves, a, k, ctx: layers.attend_delta(leaves, layers.first_input(a, k))}),
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


def _survey(model, variables, args, kwargs) -> tuple[list[Site], dict[str, str]]:
    """(adaptable layers, {name: why not} for the other modules holding params: opaque ones, and covered layers
    in a form LoRA cannot adapt, which only a target selecting them makes an error)."""
    found: dict[tuple[str, ...], Site] = {}
    unadaptable: dict[str, str] = {}

    def record(next_fun, a, k, context):
        m, kind = context.module, _kind(context.module)
        if kind is not None and context.method_name in kind.methods and m.has_variable("params", kind.weight):
            path = tuple(m.scope.path)
            shape = tuple(fnn.meta.unbox(m.get_variable("params", kind.weight)).shape)
            try:
                found.setdefault(path, layers.make_site(kind, m, path, type(m).__name__, shape, a, k))
            except ValueError as e:
                unadaptable[".".join(path)] = f"{'.'.join(path)}: {e}"
        out = next_fun(*a, **k)
        own = [n for n, v in (m.variables.get("params") or {}).items() if not isinstance(v, Mapping)] if m.scope else []
        if kind is None and own:
            name = ".".join(m.scope.path)
            unadaptable[name] = layers.opaque_reason(name, type(m).__name__, own, "jpeft.linen.register")
        return out

    full, _ = _split(variables)
    with fnn.intercept_methods(record):
        jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), full)
    return list(found.values()), unadaptable


def inject(model: fnn.Module, params: Mapping[str, Any], config: lora.LoraConfig | ia3.IA3Config, key: jax.Array, *example_args: Any,
           **example_kwargs: Any) -> dict:
    """A new tree with the method's leaves beside each targeted weight: LoRA's lora_a (*lead, *in, r), lora_b
    (*lead, r, *out), lora_scale (*lead), or (IA)^3's ia3_out (*lead, *out) / ia3_in (*lead, *in) on feed-forward modules.

    `params` is the params collection or the whole variables dict (returned in the same form); `*lead` are the
    leading axes `nn.scan` stacks layers on. `target_modules` matches dotted module paths as HF PEFT does.
    """
    layers.check_method(config)
    variables, bare = _split(params)
    adaptable, unadaptable = _survey(model, variables, example_args, example_kwargs)
    layers.refuse(config.target_modules, unadaptable)
    found = {s.name: s for s in adaptable}
    chosen = layers.targeted(list(found), config)
    out = tree.flatten(variables["params"])
    for i, name in enumerate(chosen):
        site = found[name]
        if any(leaf in tg.get_module(variables["params"], site.name) for leaf in LEAVES):
            raise ValueError(f"{name} already has PEFT leaves: merge or split them off before injecting again")
        boxed = out[_leaf(site, site.weight)]
        w = fnn.meta.unbox(boxed)
        leaves, residual = layers.new_leaves(site, w, config, name, jax.random.fold_in(key, i))
        if residual is not None:
            out[_leaf(site, site.weight)] = _rebox(boxed, residual)
        lead = w.ndim - len(site.shape)
        names = boxed.names if isinstance(boxed, fnn.Partitioned) else None
        for leaf, value in leaves.items():
            axes = layers.axis_names(site, leaf, names, lead)
            out[_leaf(site, leaf)] = value if axes is None else boxed.replace(value=value, names=axes)
    new = {**variables, "params": tree.unflatten(out)}
    return new["params"] if bare else new


def _rebox(boxed: Any, value: jax.Array) -> Any:
    """`value` in the box (and so with the partitioning) of `boxed`, if it had one."""
    return boxed.replace_boxed(value) if isinstance(boxed, fnn.meta.AxisMetadata) else value


def _leaf(site: Site, leaf: str) -> str:
    return "/".join((*site.path, leaf))


@contextlib.contextmanager
def _interceptor(lora_dropout: float, used: set) -> Iterator[None]:
    active: set[int] = set()  # layers whose adapted call is running: a subclass's super().__call__ is not adapted again

    def adapt(next_fun, a, k, context):
        m = context.module
        kind = _kind(m)
        present = [n for n in LEAVES if m.has_variable("params", n)] if kind is not None and context.method_name in kind.methods else []
        if not present or id(m) in active:
            return next_fun(*a, **k)
        leaves = {n: fnn.meta.unbox(m.get_variable("params", n)) for n in present}
        shape = tuple(fnn.meta.unbox(m.get_variable("params", kind.weight)).shape)
        site = layers.make_site(kind, m, tuple(m.scope.path), type(m).__name__, shape, a, k)
        used.add(site.path)
        # The key comes from Flax's "dropout" stream, so nn.scan(split_rngs={"dropout": True}) gives each layer its own.
        rng = m.make_rng("dropout") if lora_dropout and m.has_rng("dropout") else None
        active.add(id(m))
        try:
            return layers.adapted_call(site, m, leaves, context.method_name, next_fun, a, k, nn.Ctx(rng=rng, lora_dropout=lora_dropout))
        finally:
            active.discard(id(m))

    with fnn.intercept_methods(adapt):
        yield


def apply(model: fnn.Module, variables: Mapping[str, Any], *args: Any, lora_dropout: float = 0.0, **kwargs: Any) -> Any:
    """`model.apply(variables, *args, **kwargs)` with the LoRA leaves in `variables` used by the layers they sit in.

    With `lora_dropout` and a "dropout" rng (`rngs={"dropout": key}`), LoRA's input is dropped as HF PEFT does in
    training; each layer call draws its own key from that stream, as Flax's `nn.Dropout` does, so layers stacked by
    `nn.scan` need `split_rngs={"dropout": True}` to differ. On a whole-model call, a LoRA leaf that no layer read (a
    typo'd path, a layer this call never ran) is an error, not a silent no-op; a `method=` call (an encoder alone, one
    decoding step) runs part of the model by design, so leaves outside that part are expected there.
    """
    used: set = set()
    with _interceptor(lora_dropout, used):
        out = model.apply(variables, *args, **kwargs)
    full, _ = _split(variables)
    holders = {tuple(p.split("/")[:-1]) for p in tree.flatten(full["params"]) if p.rsplit("/", 1)[-1] in LEAVES}
    if holders - used and "method" not in kwargs:
        unread = sorted(".".join(p) for p in holders - used)
        raise ValueError(f"PEFT leaves that no layer read: {unread}; each must sit beside the weight of a layer this call runs "
                         f"(Flax's Dense, DenseGeneral, Einsum, Conv, Embed, or a class given to jpeft.linen.register)")
    return out


def merge(model: fnn.Module, params: Mapping[str, Any], *example_args: Any, **example_kwargs: Any) -> dict:
    """The model's own params with every PEFT leaf folded into its weight (W + s·AB, or W scaled by IA3) and removed."""
    variables, bare = _split(params)
    flat = tree.flatten(variables["params"])
    base = {p: v for p, v in flat.items() if p.rsplit("/", 1)[-1] not in LEAVES}
    found = {s.path: s for s in sites(model, {**variables, "params": tree.unflatten(base)}, *example_args, **example_kwargs)}
    holders = _holders(flat)
    if not holders:
        raise ValueError("merge: these params hold no LoRA or IA3 leaves")
    for path, leaves in holders.items():
        _fold_into(base, _found(found, path, "merge"), leaves, 1.0)
    new = {**variables, "params": tree.unflatten(base)}
    return new["params"] if bare else new


def _found(found: dict[tuple[str, ...], Site], path: tuple[str, ...], what: str) -> Site:
    """The site the survey found at `path`, or an error naming the layer."""
    if path not in found:
        raise ValueError(f"{what}: PEFT leaves sit at {'.'.join(path)}, which is no adaptable layer this model ran on the example "
                         f"inputs given; pass inputs under which every adapted layer runs (adaptable: {sorted(s.name for s in found.values())})")
    return found[path]


def _fold_into(flat: dict[str, Any], site: Site, leaves: dict[str, jax.Array], sign: float) -> None:
    """Fold the leaves into the layer's params in `flat` (sign -1 takes them back out), keeping their boxes."""
    for name, fold in layers.folds(site):
        if (path := _leaf(site, name)) in flat:
            flat[path] = _rebox(flat[path], fold(site, fnn.meta.unbox(flat[path]), leaves, sign))


def _holders(flat: Mapping[str, Any]) -> dict[tuple[str, ...], dict[str, jax.Array]]:
    """{module path: its PEFT leaves, unboxed}."""
    out: dict[tuple[str, ...], dict[str, jax.Array]] = {}
    for p, v in flat.items():
        *path, leaf = p.split("/")
        if leaf in LEAVES:
            out.setdefault(tuple(path), {})[leaf] = fnn.meta.unbox(v)
    return out


def unmerge(model: fnn.Module, merged: Mapping[str, Any], adapter: Mapping[str, Any], *example_args: Any, **example_kwargs: Any) -> dict:
    """The inverse of `merge`: the adapter's leaves (a tree holding them) taken back out of the weights and put beside them."""
    variables, bare = _split(merged)
    flat = tree.flatten(variables["params"])
    adapter_flat = {p: v for p, v in tree.flatten(_split(adapter)[0]["params"]).items() if p.rsplit("/", 1)[-1] in LEAVES}
    found = {s.path: s for s in sites(model, variables, *example_args, **example_kwargs)}
    for path, leaves in _holders(adapter_flat).items():
        _fold_into(flat, _found(found, path, "unmerge"), leaves, -1.0)
    new = {**variables, "params": tree.unflatten({**flat, **adapter_flat})}
    return new["params"] if bare else new
