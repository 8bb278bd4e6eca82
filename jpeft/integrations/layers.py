"""Layer kinds of third-party Flax models, described by how their weight meets the input.

A kind says which weight axes are contracted with the input (`in_axes`) and which become output
(`out_axes`), so a LoRA pair is A (*in, r), B (r, *out) for any layout, and its update is computed by
`lora.delta` (the rule jpeft's own models use) on the input flattened to (..., in). Only the
arrangement of axes differs between kinds; the math is the one rule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jpeft import nn
from jpeft.methods import lora
from jpeft import targets as tg

Leaves = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Site:
    """One weight a method can adapt: where it is and how its axes meet the input (per call, without scan axes)."""

    path: tuple[str, ...]  # module path in the params tree
    kind: str
    weight: str  # the weight's leaf name ("kernel", "embedding", "w", ...)
    shape: tuple[int, ...]  # the weight as the layer sees it in one call
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    rule: Kind | None = dataclasses.field(default=None, compare=False, repr=False)  # the layer kind's rule
    # Where out_axes sit in the layer's output, in out_axes' order (the layout of its bias, too); None where the
    # kind has no (IA)^3.
    out_positions: tuple[int, ...] | None = None

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.out_axes)

    def as_matrix(self, w: jax.Array) -> jax.Array:
        """The weight (*lead, *shape) as (*lead, in, out)."""
        lead = w.ndim - len(self.shape)
        perm = tuple(range(lead)) + tuple(lead + a for a in self.in_axes + self.out_axes)
        return w.transpose(perm).reshape(*w.shape[:lead], math.prod(self.in_shape), math.prod(self.out_shape))

    def from_matrix(self, m: jax.Array) -> jax.Array:
        """The inverse of `as_matrix`: (*lead, in, out) back to the weight's own layout."""
        lead = m.shape[:-2]
        m = m.reshape(*lead, *self.in_shape, *self.out_shape)
        order = self.in_axes + self.out_axes
        inverse = tuple(order.index(a) for a in range(len(order)))
        return m.transpose(tuple(range(len(lead))) + tuple(len(lead) + i for i in inverse))


def _flat(leaves: Leaves, site: Site) -> Leaves:
    """A, B as the (in, r), (r, out) matrices `lora.delta` reads."""
    r = leaves["lora_b"].shape[0]
    return {**leaves, "lora_a": leaves["lora_a"].reshape(-1, r), "lora_b": leaves["lora_b"].reshape(r, -1)}


def sorted_axes(axes: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The input axes a DenseGeneral / LinearGeneral contracts, in its kernel's order: Flax sorts them."""
    return tuple(sorted(a % ndim for a in (axes if isinstance(axes, tuple) else (axes,))))


def contract_delta(site: Site, leaves: Leaves, x: jax.Array, x_axes: tuple[int, ...], ctx: nn.Ctx) -> jax.Array:
    """LoRA's update for an input whose `x_axes` (in order) meet the weight's `in_axes`: (..., *out), the
    input's other axes first, in order."""
    x_axes = tuple(a % x.ndim for a in x_axes)
    xt = jnp.moveaxis(x, x_axes, tuple(range(x.ndim - len(x_axes), x.ndim)))
    xt = xt.reshape(*xt.shape[: x.ndim - len(x_axes)], -1)
    y = lora.delta(_flat(leaves, site), xt, ctx)
    return y.reshape(*y.shape[:-1], *site.out_shape)


def parse_einsum(equation: str, kernel_ndim: int) -> tuple[str, str, str]:
    """(input, weight, output) subscripts of a two-operand einsum whose second operand is the weight."""
    lhs, _, out = equation.replace(" ", "").partition("->")
    operands = lhs.split(",")
    if len(operands) != 2 or not out or "." in equation or len(operands[1]) != kernel_ndim:
        raise ValueError(f"einsum {equation!r}: jpeft adapts 'input,weight->output' equations with explicit output and no ellipsis")
    return operands[0], operands[1], out


def einsum_axes(equation: str, kernel_ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_axes, out_axes) of the weight in an einsum; an axis shared by input, weight and output is refused."""
    x, w, out = parse_einsum(equation, kernel_ndim)
    shared = [c for c in w if c in x and c in out]
    stray = [c for c in w if c not in x and c not in out]
    if shared or stray:
        raise ValueError(f"einsum {equation!r}: weight axes {shared + stray} are neither only contracted nor only output; "
                         "LoRA needs weight axes that are one or the other")
    return tuple(i for i, c in enumerate(w) if c in x), tuple(i for i, c in enumerate(w) if c not in x)


def einsum_delta(site: Site, equation: str, leaves: Leaves, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """LoRA's update laid out as the einsum's output."""
    xs, w, out = parse_einsum(equation, len(site.shape))
    contracted = [w[a] for a in site.in_axes]
    kept = [c for c in xs if c not in contracted]
    y = contract_delta(site, leaves, x, tuple(xs.index(c) for c in contracted), ctx)  # (*kept, *weight out axes)
    return jnp.einsum(f"{''.join(kept)}{''.join(w[a] for a in site.out_axes)}->{out}", y)


def conv_delta(leaves: Leaves, x: jax.Array, geometry: dict[str, Any], ctx: nn.Ctx) -> jax.Array:
    """conv(x, A) B s: A a convolution of the layer's own geometry into r channels, B a 1x1 projection (as HF PEFT)."""
    import flax.linen as fnn

    r = leaves["lora_b"].shape[0]
    x = nn.dropout(ctx, x, ctx.lora_dropout)
    h = fnn.Conv(r, use_bias=False, **geometry).apply({"params": {"kernel": leaves["lora_a"].astype(x.dtype)}}, x)
    return nn.matmul(h, leaves["lora_b"].astype(h.dtype)) * leaves["lora_scale"].astype(h.dtype)


CONV_GEOMETRY = ("kernel_size", "strides", "padding", "input_dilation", "kernel_dilation")


def embed_delta(leaves: Leaves, ids: jax.Array) -> jax.Array:
    """A[ids] B s: HF PEFT's LoRA on an embedding (no dropout on ids)."""
    return nn.matmul(leaves["lora_a"][ids], leaves["lora_b"]) * leaves["lora_scale"]


def attend_delta(leaves: Leaves, query: jax.Array) -> jax.Array:
    """query (s AB)^T = s (query B^T) A^T: LoRA's update to an embedding read as a tied output head (`attend`), so
    the head sees the table merge gives, E + s·AB."""
    h = nn.matmul(query, leaves["lora_b"].astype(query.dtype).T)
    return nn.matmul(h, leaves["lora_a"].astype(h.dtype).T) * leaves["lora_scale"].astype(h.dtype)


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one layer class meets its weight: its axes for a call, and LoRA's update for that call."""

    weight: str
    axes: Callable[[Any, tuple[int, ...], tuple, dict], tuple[tuple[int, ...], tuple[int, ...]]]  # (module, shape, args, kwargs)
    delta: Callable[[Site, Any, Leaves, tuple, dict, nn.Ctx], jax.Array]  # (site, module, leaves, args, kwargs, ctx)
    # Methods other than __call__ that read the weight (an embedding's `attend`), each with its LoRA update as `delta`.
    readers: dict[str, Callable[[Site, Any, Leaves, tuple, dict, nn.Ctx], jax.Array]] = dataclasses.field(default_factory=dict)
    # The weight's rank in one call, from the module and the stored rank: what is left over are stacked layer
    # axes (NNX layers built by nnx.vmap, whose stored weight is all Flax NNX shows before a call).
    call_ndim: Callable[[Any, int], int] = lambda module, stored: stored
    # For (IA)^3's vectors: the input axes meeting in_axes (module, args, kwargs, input ndim), and the output axes
    # holding out_axes (module, weight shape in one call, args, kwargs), in those orders; None where HF PEFT has no IA3 for the layer
    # (convolutions' spatial axes, embeddings).
    in_positions: Callable[[Any, tuple, dict, int], tuple[int, ...]] | None = None
    out_positions: Callable[[Any, tuple[int, ...], tuple, dict], tuple[int, ...]] | None = None

    @property
    def methods(self) -> tuple[str, ...]:
        """The layer's methods that read its weight, and so get the PEFT leaves."""
        return ("__call__", *self.readers)


def make_site(kind: Kind, module: Any, path: tuple[str, ...], kind_name: str, shape: tuple[int, ...], args: tuple, kwargs: dict) -> Site:
    """The site of one call of a layer of this kind, whose weight has the per-call `shape`."""
    in_axes, out_axes = kind.axes(module, shape, args, kwargs)
    out_positions = kind.out_positions(module, shape, args, kwargs) if kind.out_positions else None
    return Site(path, kind_name, kind.weight, shape, in_axes, out_axes, kind, out_positions)


def conv_axes(m: Any, shape: tuple[int, ...], args: tuple, kwargs: dict) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A Conv's kernel (*window, in, out): all but the last axis meet the input; grouped or masked kernels are refused."""
    if m.feature_group_count != 1:
        raise ValueError(f"a grouped Conv (feature_group_count={m.feature_group_count}, e.g. depthwise) is not adaptable by "
                         "LoRA: its kernel does not map every input channel to every output channel")
    if getattr(m, "mask", None) is not None:
        # Merge would mask W + s·AB, while a low-rank A (*window, in, r) cannot carry an arbitrary (*window, in, out) mask.
        raise ValueError("a Conv with a kernel mask is not adaptable by LoRA: the merged weight would be masked, but LoRA's "
                         "update cannot be; target other layers, or drop the mask")
    return tuple(range(len(shape) - 1)), (len(shape) - 1,)


def call_equation(module: Any, args: tuple, kwargs: dict) -> str:
    """An Einsum call's equation: the one given at call time (positionally or as einsum_str), else the module's own."""
    return args[1] if len(args) > 1 else kwargs.get("einsum_str") or module.einsum_str


def first_input(args: tuple, kwargs: dict) -> jax.Array:
    """A layer call's input: its first argument, positional or by keyword."""
    return args[0] if args else next(iter(kwargs.values()))


def registered(weight: str, equation_or_axes: str | tuple[int, ...], weight_ndim: int | None = None) -> Kind:
    """The kind of a user-registered layer: its weight meets the input as in an einsum equation
    ("input,weight->output"), or contracts the given weight axes with the input's last axes, in order. With the axes
    form, `weight_ndim` is the weight's rank in one call (stored dims beyond it are stacked layers); without it, the
    stored weight is taken as one call's."""
    if isinstance(equation_or_axes, str):
        eq = equation_or_axes
        weight_ndim = len(eq.replace(" ", "").split("->")[0].split(",")[1])
        return Kind(weight, lambda m, shape, a, k: einsum_axes(eq, len(shape)),
                    lambda site, m, leaves, a, k, ctx: einsum_delta(site, eq, leaves, first_input(a, k), ctx),
                    call_ndim=lambda m, stored: weight_ndim,
                    in_positions=lambda m, a, k, xn: einsum_positions(eq, weight_ndim)[0],
                    out_positions=lambda m, s, a, k: einsum_positions(eq, weight_ndim)[1])
    given = tuple(equation_or_axes)

    def axes(m, shape, a, k):
        contracted = tuple(i % len(shape) for i in given)
        return contracted, tuple(i for i in range(len(shape)) if i not in contracted)

    # The update, like the layer's output, is (..., *weight out axes): (IA)^3 meets the same trailing axes.
    return Kind(weight, axes, lambda site, m, leaves, a, k, ctx: contract_delta(
        site, leaves, first_input(a, k), tuple(range(-len(given), 0)), ctx), call_ndim=lambda m, stored: weight_ndim or stored,
        in_positions=lambda m, a, k, xn: tuple(range(-len(given), 0)), out_positions=lambda m, s, a, k: tuple(range(len(given) - len(s), 0)))


def kind_of(kinds: dict[type, Kind], module: Any) -> Kind | None:
    """The kind registered for the module's class or its nearest base class."""
    return next((kinds[c] for c in type(module).__mro__ if c in kinds), None)


def opaque_reason(name: str, cls: str, params: list[str], register: str) -> str:
    """Why a module whose weights its own code uses (not through a layer jpeft can see) cannot be targeted."""
    return (f"target_modules matches {name} ({cls}), whose params {params} are used inside its own code, where jpeft cannot "
            f"add LoRA's update. If its call is one contraction of its input with one weight, {register}({cls}, '<param>', "
            "'<input>,<weight>-><output>') covers it; otherwise target the Flax layers inside it, or wrap its weights in them")


def refuse(targets: tg.Targets, unadaptable: dict[str, str]) -> None:
    """Raise the reason of the first unadaptable module a target selects; ones no target selects are left alone."""
    hits = sorted(n for n in unadaptable if n and tg.matches(targets, n))
    if hits:
        raise ValueError(unadaptable[hits[0]])


def einsum_positions(equation: str, weight_ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Where an einsum's contracted weight axes sit in its input, and its output weight axes in its output."""
    x, w, out = parse_einsum(equation, weight_ndim)
    in_axes, out_axes = einsum_axes(equation, weight_ndim)
    return tuple(x.index(w[a]) for a in in_axes), tuple(out.index(w[a]) for a in out_axes)


def _along(vector: jax.Array, axes: tuple[int, ...], ndim: int) -> jax.Array:
    """A (*dims) vector whose dims lie along `axes` of an ndim array, shaped to broadcast against it."""
    axes = tuple(a % ndim for a in axes)
    order = sorted(range(len(axes)), key=lambda i: axes[i])
    shape = [1] * ndim
    for i in order:
        shape[axes[i]] = vector.shape[i]
    return vector.transpose(order).reshape(shape)


def check_leaves(site: Site, leaves: Leaves, lead: tuple[int, ...] = ()) -> None:
    """Refuse, naming the layer, PEFT leaves that do not fit its weight (stacked on `lead` axes): LoRA's A (*in, r),
    B (r, *out) and scale (), (IA)^3's (*in) or (*out)."""
    lora_leaves = [n for n in ("lora_a", "lora_b", "lora_scale") if n in leaves]
    if lora_leaves and len(lora_leaves) != 3:
        raise ValueError(f"{site.name}: LoRA needs lora_a, lora_b and lora_scale together; this layer has only {lora_leaves}")
    r = leaves["lora_a"].shape[-1] if lora_leaves else None
    want = {"lora_a": (*lead, *site.in_shape, r), "lora_b": (*lead, r, *site.out_shape), "lora_scale": lead,
            "ia3_in": (*lead, *site.in_shape), "ia3_out": (*lead, *site.out_shape)}
    wrong = [f"{n} {tuple(v.shape)} (needs {want[n]})" for n, v in leaves.items() if tuple(v.shape) != want[n]]
    if wrong:
        # A scale unsliced inside a layer stack is NNX's StateAxes slicing only nnx.Param (A and B are LoRAParams).
        hint = ("; a stacked lora_scale reached one layer's call: slice jpeft.nnx.LoRAScale with the params in nnx.scan / "
                "nnx.vmap (e.g. nnx.StateAxes({(nnx.Param, LoRAScale): 0, ...: None}))"
                if "lora_scale" in leaves and leaves["lora_scale"].ndim > len(lead) else "")
        raise ValueError(f"{site.name or site.kind}: PEFT leaves do not fit its {site.weight} {(*lead, *site.shape)}: {', '.join(wrong)}{hint}")


def adapted_call(site: Site, module: Any, leaves: Leaves, method: str, call: Callable, args: tuple, kwargs: dict, ctx: nn.Ctx) -> jax.Array:
    """One call of an adapted layer's `method`: (IA)^3 scales its input or output, LoRA adds (x A) B s to its own output."""
    check_leaves(site, leaves)
    kind = site.rule
    if method != "__call__":  # another reader of the weight (an embedding's attend): LoRA only, as no IA3 covers it
        y = call(*args, **kwargs)
        return y + kind.readers[method](site, module, leaves, args, kwargs, ctx).astype(y.dtype)
    x = first_input(args, kwargs)
    if "ia3_in" in leaves:
        x = x * _along(leaves["ia3_in"], kind.in_positions(module, args, kwargs, x.ndim), x.ndim).astype(x.dtype)
        args, kwargs = ((x, *args[1:]), kwargs) if args else ((), {**kwargs, next(iter(kwargs)): x})
    y = call(*args, **kwargs)
    if "lora_a" in leaves:
        y = y + kind.delta(site, module, leaves, args, kwargs, ctx).astype(y.dtype)
    if "ia3_out" in leaves:
        y = y * _along(leaves["ia3_out"], site.out_positions, y.ndim).astype(y.dtype)
    return y


LEAVES = ("lora_a", "lora_b", "lora_scale", "ia3_in", "ia3_out")


def check_method(config: Any) -> None:
    """Flax models take LoRA and (IA)^3; other methods (LoHa, LoKr) are refused by name."""
    from jpeft.methods import ia3, lora

    if not isinstance(config, (lora.LoraConfig, ia3.IA3Config)):
        raise ValueError(f"{type(config).__name__} is not supported on Flax models (jpeft.linen / jpeft.nnx take LoraConfig or "
                         "IA3Config); use it on jpeft's own models (T5, Llama, Gemma), whose dense layers apply it")


def targeted(names: list[str], config: Any) -> list[str]:
    """The module names `config` targets, each entry checked (`targets.select`; (IA)^3 also checks its feed-forward names)."""
    from jpeft.methods import ia3

    if isinstance(config, ia3.IA3Config):
        return ia3.choose(names, config)
    return tg.select(names, config.target_modules, "target_modules", config.modules_to_save)


def new_leaves(site: Site, w: jax.Array, config: Any, name: str, key: jax.Array) -> tuple[Leaves, jax.Array | None]:
    """A method's leaves for one weight w (*lead, *shape), stacked axes first, and PiSSA's residual weight (else None)."""
    from jpeft.methods import ia3, lora

    lead = w.shape[: w.ndim - len(site.shape)]
    if w.shape[len(lead):] != site.shape:
        raise ValueError(f"{name}: its stored {site.weight} {w.shape} does not end with the {site.shape} one call sees; jpeft "
                         "needs layers stacked (nn.scan / nn.vmap / nnx.vmap) on leading axes, e.g. variable_axes={'params': 0}")
    if isinstance(config, ia3.IA3Config):
        if site.out_positions is None:
            raise ValueError(f"{name}: HF PEFT has no (IA)^3 for a {site.kind} layer; target its dense or einsum layers")
        if tg.matches(config.feedforward_modules, name):
            return {"ia3_in": jnp.ones((*lead, *site.in_shape), w.dtype)}, None
        return {"ia3_out": jnp.ones((*lead, *site.out_shape), w.dtype)}, None
    if config.use_dora:
        # The weight norm could use as_matrix, but PEFT's DoRA result also needs each layer's output without its
        # bias, which a Flax layer's own call does not expose; refused rather than guessed per layer kind.
        raise ValueError(f"{name}: DoRA (use_dora=True) is not supported on Flax Linen / NNX layers; it works on jpeft's own "
                         "T5, Llama and Gemma models. Use plain LoRA here (use_dora=False)")
    r, scale = config.rank_and_scale(name)
    matrix = site.as_matrix(w)
    residual = None
    if config.init == "pissa":
        if r > min(matrix.shape[-2:]):
            raise ValueError(f"{name}: PiSSA's rank {r} exceeds min(in, out) = {min(matrix.shape[-2:])} of its weight "
                             f"{site.shape}, which has no more singular vectors; use a smaller r (or rank_pattern)")
        a, b, rest = _vmap(lambda m: lora._pissa(m, r, scale), len(lead))(matrix)
        residual = site.from_matrix(rest).astype(w.dtype)
    else:
        keys = jax.random.split(key, math.prod(lead)).reshape(lead) if lead else key
        a, b = _vmap(lambda k, m: lora._init_pair(k, m, r, config.init), len(lead))(keys, matrix)
    return {"lora_a": a.reshape(*lead, *site.in_shape, r).astype(w.dtype), "lora_b": b.reshape(*lead, r, *site.out_shape).astype(w.dtype),
            "lora_scale": jnp.full(lead, scale, jnp.float32)}, residual


def axis_names(site: Site, leaf: str, names: tuple | None, lead: int) -> tuple | None:
    """A leaf's partition names from its weight's (*lead, *shape) names: A the contracted axes', B the output
    axes', the rank whole (None), (IA)^3 vectors their axes', stacked layer axes kept."""
    if names is None:
        return None
    stack, ins, outs = tuple(names[:lead]), tuple(names[lead + a] for a in site.in_axes), tuple(names[lead + a] for a in site.out_axes)
    return {"lora_a": (*stack, *ins, None), "lora_b": (*stack, None, *outs), "lora_scale": stack, "ia3_in": (*stack, *ins),
            "ia3_out": (*stack, *outs)}[leaf]


def _vmap(fn: Callable, depth: int) -> Callable:
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


def fold(site: Site, w: jax.Array, leaves: Leaves, sign: float = 1.0) -> jax.Array:
    """w (*lead, *shape) with the leaves folded in (sign=-1 takes LoRA's update back out; IA3 divides), float32 math."""
    check_leaves(site, leaves, w.shape[: w.ndim - len(site.shape)])
    m = site.as_matrix(w.astype(jnp.float32))
    lead = m.shape[:-2]
    if "lora_a" in leaves:
        r = leaves["lora_b"].shape[len(lead)]
        a = leaves["lora_a"].astype(jnp.float32).reshape(*lead, -1, r)
        b = leaves["lora_b"].astype(jnp.float32).reshape(*lead, r, -1)
        m = m + sign * leaves["lora_scale"][..., None, None] * (a @ b)
    for leaf, where in (("ia3_in", (..., slice(None), None)), ("ia3_out", (..., None, slice(None)))):
        if leaf in leaves:
            v = leaves[leaf].astype(jnp.float32).reshape(*lead, -1)[where]
            m = m * v if sign > 0 else m / v
    return site.from_matrix(m).astype(w.dtype)


def fold_bias(site: Site, bias: jax.Array, leaves: Leaves, sign: float = 1.0) -> jax.Array:
    """The bias (*lead, *out in output order) as HF PEFT's (IA)^3 merge leaves it: scaled by ia3_out (its unmerge
    divides), untouched by ia3_in and LoRA, since the adapted call scales the layer's whole output by ia3_out."""
    if "ia3_out" not in leaves:
        return bias
    v = leaves["ia3_out"].astype(jnp.float32)
    lead = v.ndim - len(site.out_positions)
    order = sorted(range(len(site.out_positions)), key=lambda i: site.out_positions[i])  # out axes in output order
    v = v.transpose(*range(lead), *(lead + i for i in order)).reshape(bias.shape)
    b = bias.astype(jnp.float32)
    return (b * v if sign > 0 else b / v).astype(bias.dtype)


def folds(site: Site) -> tuple[tuple[str, Callable[..., jax.Array]], ...]:
    """(param name, fold) for each param of the layer that merging changes: its weight, and a param named "bias"."""
    return (site.weight, fold), ("bias", fold_bias)
