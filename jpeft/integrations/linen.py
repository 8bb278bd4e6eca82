"""PEFT on an unmodified Flax Linen model: `inject` adds leaves to its params, `apply` runs it with them, `merge` folds them.

Layers are found by one abstract pass (`jax.eval_shape` of `model.apply` under `nn.intercept_methods`) that
records each adaptable layer's path, kind and weight shape; no parameter is created inside the user's traced
forward pass. At run time the same interception runs each adapted layer (one holding method leaves, an adapter or
a quantized weight) as the rule jpeft's own models use, `jpeft.nn.dense` on the layer seen as x (..., in) @ W (in,
out) (`jpeft.integrations.layers`), so x W' is one jitted computation with the low-rank paths fused in and a
quantized W dequantized inside its matmul. Layers stacked by `nn.scan` carry their leaves with the same leading
layer axis; `nn.remat` is transparent.

A quantized weight (`quantize`) replaces the layer's param by its leaf group, so the layer's own code cannot run; its
shape in one call is read off an abstract init of the layer alone on that call's input.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import flax.linen as fnn
import jax

from jpeft import leaves, nn, quant
from jpeft import targets as tg
from jpeft import tree
from jpeft.integrations import layers
from jpeft.integrations.layers import ADAPTER, Kind, Site


def _dense_general_axes(m, shape, args, kwargs):
    if m.batch_dims:
        raise ValueError(f"DenseGeneral with batch_dims={m.batch_dims} shares weight axes with the input; not adaptable")
    n_in = len(m.axis) if isinstance(m.axis, tuple) else 1
    return tuple(range(n_in)), tuple(range(n_in, len(shape)))


def _features(m) -> tuple[int, ...]:
    return m.features if isinstance(m.features, tuple) else (m.features,)


KINDS: dict[type, Kind] = {
    fnn.Dense: Kind("kernel", lambda m, s, a, k: ((0,), (1,)), layers.dense_kind_equation(lambda m, n: (n - 1,))),
    fnn.DenseGeneral: Kind("kernel", _dense_general_axes, layers.dense_kind_equation(lambda m, n: layers.sorted_axes(m.axis, n))),
    fnn.Einsum: Kind("kernel", lambda m, s, a, k: layers.einsum_axes(layers.call_equation(m, a, k), len(s)),
                     lambda m, s, a, k, n: layers.call_equation(m, a, k)),
    fnn.Conv: Kind("kernel", layers.conv_axes, lora=layers.conv_lora),
    fnn.Embed: Kind("embedding", lambda m, s, a, k: ((0,), (1,)), lora=layers.embed_lora, readers={"attend": layers.attend_lora}),
}


def register(cls: type, weight_name: str, equation_or_axes: str | Callable[[Any], str] | tuple[int, ...]) -> None:
    """Cover a layer class that is not Flax's own: its `weight_name` param meets the input as in the einsum
    `equation_or_axes` ("input,weight->output"; or a callable reading each instance's, e.g. `lambda m: m.einsum_str`),
    or, given weight axes, contracts them with the input's last axes. Its call must be that one contraction."""
    KINDS[cls] = layers.registered(weight_name, equation_or_axes)


def _kind(module: Any) -> Kind | None:
    return layers.kind_of(KINDS, module)


def _split(variables: Mapping[str, Any]) -> tuple[dict, bool]:
    """(the variables dict, whether the caller passed the params collection alone)."""
    if "params" in variables and isinstance(variables["params"], Mapping):
        return dict(variables), False
    return {"params": dict(variables)}, True


_probing: list[bool] = []  # set while an abstract init reads a quantized layer's weight shape: nothing is adapted then


def _call_shape(m: fnn.Module, kind: Kind, p: Mapping[str, Any], a: tuple, k: dict) -> tuple[int, ...]:
    """The weight's shape in this call: its param's, or, for a quantized weight, an abstract init of the layer alone's."""
    if kind.weight in p:
        return tuple(p[kind.weight].shape)
    _probing.append(True)
    try:
        shapes = jax.eval_shape(lambda: m.clone(parent=None).init(jax.random.key(0), *a, **k))
    finally:
        _probing.pop()
    return tuple(shapes["params"][kind.weight].shape)


@contextlib.contextmanager
def _adapting(lora_dropout: float, on_site: Callable[[Site], None], on_opaque: Callable[[str, str], None] | None = None) -> Iterator[None]:
    """Within: every covered layer's call is reported to `on_site`, and an adapted one runs through the rule; with
    `on_opaque`, modules whose own code uses their params (no layer jpeft covers) are reported by name and reason."""
    active: set[int] = set()  # layers whose adapted call is running: a subclass's super().__call__ is not adapted again

    def adapt(next_fun, a, k, context):
        m, kind = context.module, _kind(context.module)
        if _probing or m.scope is None or id(m) in active:
            return next_fun(*a, **k)
        p = fnn.meta.unbox(dict(m.variables.get("params") or {}))
        if kind is None or context.method_name not in kind.methods:
            out = next_fun(*a, **k)
            own = [n for n, v in p.items() if not isinstance(v, Mapping)]
            if kind is None and own and on_opaque is not None:
                name = ".".join(m.scope.path)
                on_opaque(name, layers.opaque_reason(name, type(m).__name__, own, "jpeft.linen.register"))
            return out
        if kind.weight not in p and not quant.is_quantized(p):  # not initialised yet
            return next_fun(*a, **k)
        path = tuple(m.scope.path)
        try:
            site = layers.make_site(kind, m, path, type(m).__name__, _call_shape(m, kind, p, a, k), a, k)
        except ValueError as e:
            if layers.adapted(p):
                raise ValueError(f"{'.'.join(path)}: {e}") from None
            if on_opaque is not None:
                on_opaque(".".join(path), f"{'.'.join(path)}: {e}")
            return next_fun(*a, **k)
        on_site(site)
        if not layers.adapted(p):
            return next_fun(*a, **k)
        # The key comes from Flax's "dropout" stream, so nn.scan(split_rngs={"dropout": True}) gives each layer its own.
        rng = m.make_rng("dropout") if lora_dropout and m.has_rng("dropout") else None
        active.add(id(m))
        try:
            return layers.call(site, m, p, context.method_name, next_fun, a, k, nn.Ctx(rng=rng, lora_dropout=lora_dropout))
        finally:
            active.discard(id(m))

    with fnn.intercept_methods(adapt):
        yield


def sites(model: fnn.Module, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> list[Site]:
    """Every adaptable layer the model calls on these example inputs, found by one abstract pass."""
    return list(_survey(model, variables, args, kwargs)[0].values())


def _survey(model, variables, args, kwargs) -> tuple[dict[str, Site], dict[str, str]]:
    """({name: site} of adaptable layers, {name: why not} for the other modules holding params: opaque ones, and
    covered layers in a form jpeft cannot adapt, which only a target selecting them makes an error)."""
    found: dict[str, Site] = {}
    unadaptable: dict[str, str] = {}
    full, _ = _split(variables)
    with _adapting(0.0, lambda s: found.setdefault(s.name, s), unadaptable.__setitem__):
        jax.eval_shape(lambda v: model.apply(v, *args, **kwargs), full)
    return found, unadaptable


def _module(variables: Mapping[str, Any], site: Site) -> dict:
    """A layer's params, unboxed (the model's own, when the model is the layer)."""
    return fnn.meta.unbox(dict(tg.get_module(variables["params"], site.name) if site.path else variables["params"]))


def inject(model: fnn.Module, params: Mapping[str, Any], config: Any, key: jax.Array, *example_args: Any, **example_kwargs: Any) -> dict:
    """A new tree with the method's leaves beside each targeted weight, in the layer's own axes (LoRA's lora_a (*lead,
    *in, r), lora_b (*lead, r, *out), lora_scale (*lead); (IA)^3's ia3_out (*lead, *out) or, on feed-forward modules,
    ia3_in (*lead, *in); DoRA's, LoHa's and LoKr's leaves likewise), or an `AdapterConfig`'s adapter after each
    targeted layer's output.

    `params` is the params collection or the whole variables dict (returned in the same form); `*lead` are the
    leading axes `nn.scan` stacks layers on. `target_modules` matches dotted module paths as HF PEFT does.
    """
    variables, bare = _split(params)
    found, unadaptable = _survey(model, variables, example_args, example_kwargs)
    chosen = layers.select(config, list(found), unadaptable)
    flat = tree.flatten(variables["params"])
    for i, name in enumerate(chosen):
        site = found[name]
        p = _module(variables, site)
        if layers.method_leaves(p) or ADAPTER in p:
            raise ValueError(f"{name} already has PEFT leaves: merge or split them off before injecting again")
        layers.check_registered(site, list(p))
        new, residual = layers.new_leaves(site, p, config, name, jax.random.fold_in(key, i))
        boxed = flat.get(_leaf(site, site.weight))
        if residual is not None:
            flat[_leaf(site, site.weight)] = _rebox(boxed, residual)
        names = boxed.names if isinstance(boxed, fnn.Partitioned) else None
        lead = len(layers.lead_of(site, p))
        for leaf, value in tree.flatten(new).items():
            axes = layers.partition_names(site, leaf, names, lead)
            flat[_leaf(site, leaf)] = value if axes is None else boxed.replace(value=value, names=axes)
    new_variables = {**variables, "params": tree.unflatten(flat)}
    return new_variables["params"] if bare else new_variables


def _rebox(boxed: Any, value: jax.Array) -> Any:
    """`value` in the box (and so with the partitioning) of `boxed`, if it had one."""
    return boxed.replace_boxed(value) if isinstance(boxed, fnn.meta.AxisMetadata) else value


def _leaf(site: Site, leaf: str) -> str:
    return "/".join((*site.path, leaf))


def _holder(path: str) -> str | None:
    """The layer a PEFT leaf path belongs to ("layers/q/lora_a" -> "layers/q"; ".../q/adapter/up/kernel" -> ".../q")."""
    parts = path.split("/")
    if ADAPTER in parts[:-1]:
        return "/".join(parts[: parts.index(ADAPTER)])
    return "/".join(parts[:-1]) if leaves.is_peft_leaf(parts[-1]) else None


def apply(model: fnn.Module, variables: Mapping[str, Any], *args: Any, lora_dropout: float = 0.0, **kwargs: Any) -> Any:
    """`model.apply(variables, *args, **kwargs)` with the PEFT leaves, adapters and quantized weights in `variables`
    used by the layers they sit in.

    With `lora_dropout` and a "dropout" rng (`rngs={"dropout": key}`), LoRA's input is dropped as HF PEFT does in
    training; each layer call draws its own key from that stream, as Flax's `nn.Dropout` does, so layers stacked by
    `nn.scan` need `split_rngs={"dropout": True}` to differ. On a whole-model call, a PEFT leaf that no layer read (a
    typo'd path, a layer this call never ran) is an error, not a silent no-op; a `method=` call (an encoder alone, one
    decoding step) runs part of the model by design, so leaves outside that part are expected there.
    """
    used: set = set()
    with _adapting(lora_dropout, lambda s: used.add("/".join(s.path))):
        out = model.apply(variables, *args, **kwargs)
    full, _ = _split(variables)
    holders = {h for p in tree.flatten(full["params"]) if (h := _holder(p)) is not None}
    if holders - used and "method" not in kwargs:
        unread = sorted(h.replace("/", ".") for h in holders - used)
        raise ValueError(f"PEFT leaves that no layer read: {unread}; each must sit beside the weight of a layer this call runs "
                         f"(Flax's Dense, DenseGeneral, Einsum, Conv, Embed, or a class given to jpeft.linen.register)")
    return out


def _held(variables: Mapping[str, Any]) -> dict[str, dict]:
    """{layer path: its method leaves, unboxed} of the tree."""
    out: dict[str, dict] = {}
    for p, v in tree.flatten(variables["params"]).items():
        if (h := _holder(p)) is not None and ADAPTER not in p.split("/"):
            out.setdefault(h, {})[p.rsplit("/", 1)[-1]] = fnn.meta.unbox(v)
        elif h is not None:
            out.setdefault(h, {})[ADAPTER] = True
    return out


def _found(found: Mapping[str, Site], path: str, what: str) -> Site:
    """The site the survey found at `path`, or an error naming the layer."""
    name = path.replace("/", ".")
    if name not in found:
        raise ValueError(f"{what}: PEFT leaves sit at {name}, which is no adaptable layer this model ran on the example "
                         f"inputs given; pass inputs under which every adapted layer runs (adaptable: {sorted(found)})")
    return found[name]


def _fold(flat: dict, variables: Mapping[str, Any], site: Site, held: dict, sign: float, extra: Any = None) -> None:
    """The layer's weight and bias in `flat` with `held` folded in (sign -1: taken back out), keeping their boxes; a
    quantized weight becomes a float one."""
    p = _module(variables, site)
    for name, value in layers.fold(site, p, held, sign, extra).items():
        flat[_leaf(site, name)] = _rebox(flat.get(_leaf(site, name)), value)
    for name in quant.leaves(p):
        del flat[_leaf(site, name)]


def merge(model: fnn.Module, params: Mapping[str, Any], *example_args: Any, **example_kwargs: Any) -> dict:
    """The model's own params with every method's leaves folded into its weight (by the method's own merge) and
    removed; a quantized weight comes back as a float32 one."""
    variables, bare = _split(params)
    held = _held(variables)
    if not held:
        raise ValueError("merge: these params hold no method leaves (LoRA, DoRA, (IA)^3, LoHa, LoKr)")
    found = _survey(model, variables, example_args, example_kwargs)[0]
    flat = {p: v for p, v in tree.flatten(variables["params"]).items() if _holder(p) is None}
    for path, leaves_ in held.items():
        _fold(flat, variables, _found(found, path, "merge"), leaves_, 1.0)
    new = {**variables, "params": tree.unflatten(flat)}
    return new["params"] if bare else new


def dora_norms(model: fnn.Module, params: Mapping[str, Any], *example_args: Any, **example_kwargs: Any) -> dict[str, jax.Array]:
    """{layer path: ||W + s A B|| per output, in the layer's out axes} of every DoRA layer: what `unmerge` needs to undo
    a DoRA merge (the merged weight does not determine it); take it before merging."""
    variables, _ = _split(params)
    found = _survey(model, variables, example_args, example_kwargs)[0]
    out = {}
    for path, held in _held(variables).items():
        if "lora_magnitude" in held:
            site = _found(found, path, "dora_norms")
            out[path] = layers.dora_norms(site, _module(variables, site), held)
    return out


def unmerge(model: fnn.Module, merged: Mapping[str, Any], adapter: Mapping[str, Any], *example_args: Any,
            norms: Mapping[str, jax.Array] | None = None, **example_kwargs: Any) -> dict:
    """The inverse of `merge`: the adapter's leaves (a tree holding them) taken back out of the weights and put beside
    them; DoRA layers need `norms` (`dora_norms` taken before merging)."""
    variables, bare = _split(merged)
    held = _held(_split(adapter)[0])
    found = _survey(model, variables, example_args, example_kwargs)[0]
    flat = tree.flatten(variables["params"])
    for path, leaves_ in held.items():
        if "lora_magnitude" in leaves_ and (norms is None or path not in norms):
            raise ValueError(f"unmerge: {path} is a DoRA layer, whose merge cannot be undone from the merged weight alone; pass "
                             "norms=jpeft.linen.dora_norms(model, params, *example_args) taken before merging")
        _fold(flat, variables, _found(found, path, "unmerge"), leaves_, -1.0, (norms or {}).get(path))
    adapter_flat = {p: v for p, v in tree.flatten(_split(adapter)[0]["params"]).items() if _holder(p) is not None}
    new = {**variables, "params": tree.unflatten({**flat, **adapter_flat})}
    return new["params"] if bare else new


def quantize(model: fnn.Module, params: Mapping[str, Any], fmt: str, *example_args: Any, targets: tg.Targets | None = None,
             double_quant: bool = False, **example_kwargs: Any) -> dict:
    """A tree whose targeted matrix layers (Dense, DenseGeneral, Einsum, registered classes; default every one) hold
    their weight quantized (`jpeft.quant`'s NF4 or int8 group, of the layer's (in, out) matrix, stacked layers each
    on their own); `apply` dequantizes each inside its matmul. The layer's own shape is read back from its input."""
    if fmt not in quant.FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of {list(quant.FORMATS)}")
    variables, bare = _split(params)
    found = {n: s for n, s in _survey(model, variables, example_args, example_kwargs)[0].items()
             if s.rule.matrix and not quant.is_quantized(_module(variables, s))}
    chosen = sorted(found) if targets is None else tg.select(sorted(found), targets, "targets")
    flat = tree.flatten(variables["params"])
    for name in chosen:
        site = found[name]
        if fmt == "nf4" and site.matrix_shape[0] % 64:
            raise ValueError(f"cannot quantize {name} to NF4: its input size {site.matrix_shape[0]} ({site.weight} {site.shape}) is "
                             "not a multiple of 64 (NF4 blocks must not cross rows); leave it out of targets or use int8")
        layers.check_registered(site, list(_module(variables, site)))
        matrix = site.as_matrix(fnn.meta.unbox(flat.pop(_leaf(site, site.weight))))
        flat.update({_leaf(site, k): v for k, v in quant.quantize_matrix(matrix, fmt, double_quant).items()})
    new = {**variables, "params": tree.unflatten(flat)}
    return new["params"] if bare else new
