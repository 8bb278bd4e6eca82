"""Layer kinds of third-party Flax models, described only by how their input and weight look as x (..., in) @ W (in, out).

A kind says which weight axes the input contracts (`in_axes`) and which become output (`out_axes`), leading stacked
layer axes aside, and, per call, an einsum equation over the input's own axes ("input,weight->output", explicit
letters) from which everything else follows: which input axes move to the end, how the (..., out) result lays back
out as the layer's output, and where the bias's axes sit. The adapted call then builds the module dict of the rule,
in matrix form (the weight as an (in, out) matrix or its quantized group, the bias as (out,), each method leaf
reshaped by its declared dims), and calls `jpeft.nn.dense`, the layer code jpeft's own models run; bottleneck
adapters follow through `jpeft.nn.adapter`. No method math lives here.

Leaves are stored in the layer's own axes: a leaf dim declared IN spans the weight's contracted axes, OUT its output
axes, None stays (a rank, a factor), and layers stacked by a scan / vmap lead. LoRA's A is (*lead, *in, r), B
(*lead, r, *out); (IA)^3's vectors (*lead, *in) or (*lead, *out); DoRA's magnitude (*lead, *out); LoHa's and LoKr's
factors as their method shapes them. A bottleneck adapter is a subtree `adapter/{down,up}/{kernel,bias}` in matrix
form over the flattened output (down (*lead, out, width)).

Conv and Embed are not matrix products: LoRA on them is PEFT's (a convolution into r channels then 1x1; A[ids] B s,
and the tied head's `attend`), and other methods are refused there by name.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jpeft import leaves, nn, quant
from jpeft import targets as tg
from jpeft.methods import adapters, ia3, lora, weights

Params = dict[str, Any]
ADAPTER = "adapter"  # a bottleneck adapter's subtree beside the weight


@dataclasses.dataclass(frozen=True)
class Kind:
    """How one layer class meets its weight: its axes, and per call the equation the layer computes."""

    weight: str
    axes: Callable[[Any, tuple[int, ...], tuple, dict], tuple[tuple[int, ...], tuple[int, ...]]]  # (module, shape, args, kwargs)
    # (module, weight shape, args, kwargs, input ndim or None) -> "input,weight->output" with explicit letters; given no input ndim,
    # any equation whose weight and output letters are the call's (for the bias's order) or None (output order = out_axes).
    # None for the kinds that are no matrix product (Conv, Embed), whose LoRA is `lora`.
    equation: Callable[[Any, tuple[int, ...], tuple, dict, int | None], str | None] | None = None
    lora: Callable[[Any, Params, tuple, dict, nn.Ctx], jax.Array] | None = None  # (module, p, args, kwargs, ctx): LoRA's update
    # Methods other than __call__ that read the weight (an embedding's `attend`), each with LoRA's update for it.
    readers: dict[str, Callable[[Any, Params, tuple, dict, nn.Ctx], jax.Array]] = dataclasses.field(default_factory=dict)
    # The weight's rank in one call, from the module and the stored rank: what is left over are stacked layer axes
    # (NNX layers built by nnx.vmap, whose stored weight is all Flax NNX shows before a call).
    call_ndim: Callable[[Any, int], int] = lambda module, stored: stored
    bias: bool = True  # whether the layer adds a param named "bias" (out axes in output order) after its product
    registered: bool = False  # a user-registered class: its call is taken to be x W alone (no bias, no other params)

    @property
    def methods(self) -> tuple[str, ...]:
        """The layer's methods that read its weight, and so get the PEFT leaves."""
        return ("__call__", *self.readers)

    @property
    def matrix(self) -> bool:
        """Whether the layer is a matrix product x W (every method applies), not a Conv or an Embed (LoRA only)."""
        return self.equation is not None


@dataclasses.dataclass(frozen=True)
class Site:
    """One weight a method can adapt: where it is and how its axes meet the input (per call, without stacked axes)."""

    path: tuple[str, ...]  # module path in the params tree
    kind: str
    weight: str  # the weight's leaf name ("kernel", "embedding", "w", ...)
    shape: tuple[int, ...]  # the weight as the layer sees it in one call
    in_axes: tuple[int, ...]
    out_axes: tuple[int, ...]
    rule: Kind = dataclasses.field(compare=False, repr=False)
    out_order: tuple[int, ...] = ()  # the out axes (indices into out_axes) in the order the layer's output and bias hold them

    @property
    def name(self) -> str:
        return ".".join(self.path)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.out_axes)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return math.prod(self.in_shape), math.prod(self.out_shape)

    def as_matrix(self, w: jax.Array) -> jax.Array:
        """The weight (*lead, *shape) as (*lead, in, out): a reshape where the axes are in order, one transpose otherwise."""
        lead = w.ndim - len(self.shape)
        perm = tuple(range(lead)) + tuple(lead + a for a in self.in_axes + self.out_axes)
        if perm != tuple(range(w.ndim)):
            w = w.transpose(perm)
        return w.reshape(*w.shape[:lead], *self.matrix_shape)

    def from_matrix(self, m: jax.Array) -> jax.Array:
        """The inverse of `as_matrix`: (*lead, in, out) back to the weight's own layout."""
        lead = m.shape[:-2]
        m = m.reshape(*lead, *self.in_shape, *self.out_shape)
        order = self.in_axes + self.out_axes
        inverse = tuple(order.index(a) for a in range(len(order)))
        return m.transpose(tuple(range(len(lead))) + tuple(len(lead) + i for i in inverse))

    def bias_matrix(self, bias: jax.Array) -> jax.Array:
        """The bias (*lead, out axes in output order) as (*lead, out)."""
        lead = bias.ndim - len(self.out_axes)
        where = [self.out_order.index(i) for i in range(len(self.out_axes))]  # each out axis's place in the bias
        return bias.transpose(*range(lead), *(lead + j for j in where)).reshape(*bias.shape[:lead], -1)

    def bias_layer(self, m: jax.Array) -> jax.Array:
        """The inverse of `bias_matrix`."""
        lead = m.shape[:-1]
        m = m.reshape(*lead, *self.out_shape)
        return m.transpose(*range(len(lead)), *(len(lead) + i for i in self.out_order))


# ----------------------------------------------------------------------------------------------
# Equations: every matrix kind's call, written as one einsum


def parse_einsum(equation: str, kernel_ndim: int | None = None) -> tuple[str, str, str]:
    """(input, weight, output) subscripts of a two-operand einsum whose second operand is the weight."""
    lhs, _, out = equation.replace(" ", "").partition("->")
    operands = lhs.split(",")
    if len(operands) != 2 or not out or "." in equation:
        raise ValueError(f"einsum {equation!r}: jpeft adapts 'input,weight->output' equations with explicit output and no ellipsis")
    if kernel_ndim is not None and len(operands[1]) != kernel_ndim:
        raise ValueError(f"einsum {equation!r}: its weight operand {operands[1]!r} has {len(operands[1])} axes, but the weight has {kernel_ndim}")
    return operands[0], operands[1], out


def einsum_axes(equation: str, kernel_ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in_axes, out_axes) of the weight in an einsum; an axis shared by input, weight and output is refused."""
    x, w, out = parse_einsum(equation, kernel_ndim)
    shared = [c for c in w if c in x and c in out]
    stray = [c for c in w if c not in x and c not in out]
    if shared or stray:
        raise ValueError(f"einsum {equation!r}: weight axes {shared + stray} are neither only contracted nor only output; "
                         "jpeft needs weight axes that are one or the other")
    return tuple(i for i, c in enumerate(w) if c in x), tuple(i for i, c in enumerate(w) if c not in x)


def dense_equation(x_ndim: int, x_axes: tuple[int, ...], n_out: int) -> str:
    """The einsum of a Dense-like call: the input's `x_axes` (in the weight's order) contracted with the weight's
    leading axes, its other axes kept in order, the weight's `n_out` trailing axes appended."""
    letters = string.ascii_letters[: x_ndim + n_out]
    x = letters[:x_ndim]
    outs = letters[x_ndim:]
    kept = "".join(c for i, c in enumerate(x) if i not in x_axes)
    return f"{x},{''.join(x[a] for a in x_axes)}{outs}->{kept}{outs}"


def dense_kind_equation(x_axes: Callable[[Any, int], tuple[int, ...]]) -> Callable:
    """A Dense-like kind's `equation`: the input axes `x_axes(module, ndim)` against the weight's leading axes."""
    return lambda m, s, a, k, n: None if n is None else dense_equation(n, x_axes(m, n), len(s) - len(x_axes(m, n)))


def sorted_axes(axes: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The input axes a DenseGeneral / LinearGeneral contracts, in its kernel's order: Flax sorts them."""
    return tuple(sorted(a % ndim for a in (axes if isinstance(axes, tuple) else (axes,))))


def out_order(site_in_out: tuple[tuple[int, ...], tuple[int, ...]], equation: str | None) -> tuple[int, ...]:
    """The out axes (indices into out_axes) in the order the equation's output holds them (identity without one)."""
    n_out = len(site_in_out[1])
    if equation is None:
        return tuple(range(n_out))
    _, w, out = parse_einsum(equation)
    letters = [w[a] for a in site_in_out[1]]
    return tuple(sorted(range(n_out), key=lambda i: out.index(letters[i])))


def _layout(site: Site, equation: str, x: jax.Array) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...] | None]:
    """(input axes meeting in_axes in order, kept input axes, the permutation laying (*kept, *out) out as the output),
    or an error naming the layer where the equation does not fit this call."""
    xs, w, out = parse_einsum(equation, len(site.shape))
    if len(xs) != x.ndim or any(x.shape[xs.index(w[a])] != site.shape[a] for a in site.in_axes):
        raise ValueError(f"{site.name or site.kind}: equation {equation!r} does not fit this call: input {tuple(x.shape)}, "
                         f"{site.weight} {site.shape}")
    x_axes = tuple(xs.index(w[a]) for a in site.in_axes)
    kept = tuple(i for i in range(x.ndim) if i not in x_axes)
    have = "".join(xs[i] for i in kept) + "".join(w[a] for a in site.out_axes)
    if sorted(have) != sorted(out):
        raise ValueError(f"{site.name or site.kind}: equation {equation!r} sums input axes away or broadcasts; jpeft adapts "
                         "layers whose output is the input's other axes and the weight's output axes")
    perm = tuple(have.index(c) for c in out)
    return x_axes, kept, None if perm == tuple(range(len(perm))) else perm


def make_site(kind: Kind, module: Any, path: tuple[str, ...], kind_name: str, shape: tuple[int, ...], args: tuple, kwargs: dict) -> Site:
    """The site of one call of a layer of this kind, whose weight has the per-call `shape`."""
    in_axes, out_axes = kind.axes(module, shape, args, kwargs)
    equation = kind.equation(module, shape, args, kwargs, None) if kind.matrix else None
    return Site(path, kind_name, kind.weight, shape, in_axes, out_axes, kind, out_order((in_axes, out_axes), equation))


def call_equation(module: Any, args: tuple, kwargs: dict) -> str:
    """An Einsum call's equation: the one given at call time (positionally or as einsum_str), else the module's own."""
    return args[1] if len(args) > 1 else kwargs.get("einsum_str") or module.einsum_str


def first_input(args: tuple, kwargs: dict) -> jax.Array:
    """A layer call's input: its first argument, positional or by keyword."""
    return args[0] if args else next(iter(kwargs.values()))


# ----------------------------------------------------------------------------------------------
# Conv and Embed: LoRA as HF PEFT puts it on them


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


CONV_GEOMETRY = ("kernel_size", "strides", "padding", "input_dilation", "kernel_dilation")


def conv_lora(m: Any, p: Params, args: tuple, kwargs: dict, ctx: nn.Ctx) -> jax.Array:
    """conv(x, A) B s: A a convolution of the layer's own geometry into r channels, B a 1x1 projection (as HF PEFT)."""
    import flax.linen as fnn

    x = nn.dropout(ctx, first_input(args, kwargs), ctx.lora_dropout)
    r = p["lora_b"].shape[0]
    geometry = {g: getattr(m, g) for g in CONV_GEOMETRY}
    h = fnn.Conv(r, use_bias=False, **geometry).apply({"params": {"kernel": p["lora_a"].astype(x.dtype)}}, x)
    return nn.matmul(h, p["lora_b"].astype(h.dtype)) * p["lora_scale"].astype(h.dtype)


def embed_lora(m: Any, p: Params, args: tuple, kwargs: dict, ctx: nn.Ctx) -> jax.Array:
    """A[ids] B s: HF PEFT's LoRA on an embedding (no dropout on ids)."""
    return nn.matmul(p["lora_a"][first_input(args, kwargs)], p["lora_b"]) * p["lora_scale"]


def attend_lora(m: Any, p: Params, args: tuple, kwargs: dict, ctx: nn.Ctx) -> jax.Array:
    """query (s AB)^T = s (query B^T) A^T: LoRA's update to an embedding read as a tied output head (`attend`), so
    the head sees the table merge gives, E + s·AB."""
    query = first_input(args, kwargs)
    h = nn.matmul(query, p["lora_b"].astype(query.dtype).T)
    return nn.matmul(h, p["lora_a"].astype(h.dtype).T) * p["lora_scale"].astype(h.dtype)


# ----------------------------------------------------------------------------------------------
# Registration


def registered(weight: str, equation_or_axes: str | Callable[[Any], str] | tuple[int, ...], weight_ndim: int | None = None) -> Kind:
    """The kind of a user-registered layer: its weight meets the input as in an einsum equation ("input,weight->output",
    fixed or read off each instance by a callable, as tunix's `lambda m: m.einsum_str`), or contracts the given weight
    axes with the input's last axes, in order. With the axes form, `weight_ndim` is the weight's rank in one call
    (stored dims beyond it are stacked layers); without it, the stored weight is taken as one call's."""
    if isinstance(equation_or_axes, str) or callable(equation_or_axes):
        read = equation_or_axes if callable(equation_or_axes) else (lambda m, eq=equation_or_axes: eq)  # module -> equation

        def axes(m, shape, a, k):
            own = _own_equations(m)
            eq = read(m)
            if not callable(equation_or_axes) and own and eq.replace(" ", "") not in own:
                raise ValueError(f"its class is registered with the fixed equation {eq!r}, but this instance (its {weight} "
                                 f"{shape}) carries its own {sorted(own)}; register a callable reading it, e.g. lambda m: m.einsum_str")
            try:
                return einsum_axes(eq, len(shape))
            except ValueError as e:
                raise ValueError(f"the registered equation does not fit its {weight} {shape}: {e}") from None

        return Kind(weight, axes, lambda m, s, a, k, n: read(m), bias=False, registered=True,
                    call_ndim=lambda m, stored: len(parse_einsum(read(m))[1]))
    given = tuple(equation_or_axes)

    def axes(m, shape, a, k):
        contracted = tuple(i % len(shape) for i in given)
        return contracted, tuple(i for i in range(len(shape)) if i not in contracted)

    def equation(m, shape, a, k, x_ndim):  # the input's last axes meet `given`; the output is (..., *weight out axes)
        if x_ndim is None:
            return None
        n = len(shape)
        x = string.ascii_letters[:x_ndim]
        w = list(string.ascii_letters[x_ndim: x_ndim + n])
        for j, axis in enumerate(given):
            w[axis % n] = x[x_ndim - len(given) + j]
        outs = "".join(c for c in w if c not in x)
        return f"{x},{''.join(w)}->{x[: x_ndim - len(given)]}{outs}"

    return Kind(weight, axes, equation, bias=False, registered=True, call_ndim=lambda m, stored: weight_ndim or stored)


def _own_equations(module: Any) -> set[str]:
    """The two-operand einsum equations an instance holds in its own string attributes (tunix's `einsum_str`)."""
    found = set()
    for v in vars(module).values():
        if isinstance(v, str) and "->" in v and v.count(",") == 1:
            found.add(v.replace(" ", ""))
    return found


def kind_of(kinds: dict[type, Kind], module: Any) -> Kind | None:
    """The kind registered for the module's class or its nearest base class."""
    return next((kinds[c] for c in type(module).__mro__ if c in kinds), None)


def opaque_reason(name: str, cls: str, params: list[str], register: str) -> str:
    """Why a module whose weights its own code uses (not through a layer jpeft can see) cannot be targeted."""
    return (f"target_modules matches {name} ({cls}), whose params {params} are used inside its own code, where jpeft cannot "
            f"add a method's update. If its call is one contraction of its input with one weight, {register}({cls}, '<param>', "
            "'<input>,<weight>-><output>') covers it; otherwise target the Flax layers inside it, or wrap its weights in them")


def refuse(targets: tg.Targets, unadaptable: dict[str, str]) -> None:
    """Raise the reason of the first unadaptable module a target selects; ones no target selects are left alone."""
    hits = sorted(n for n in unadaptable if n and tg.matches(targets, n))
    if hits:
        raise ValueError(unadaptable[hits[0]])


def select(config: Any, found: list[str], unadaptable: dict[str, str]) -> list[str]:
    """The adaptable layers the config's target_modules select (modules_to_save excluded); an unadaptable one is an error."""
    targets = config.target_modules
    if targets is None:
        raise ValueError(f"{type(config).__name__}.target_modules must name the layers on a Flax model (for adapters: the "
                         "attention output and the feed-forward output projections for Houlsby, the latter alone for Pfeiffer)")
    refuse(targets, unadaptable)
    if isinstance(config, ia3.IA3Config):  # (IA)^3 also checks its feed-forward names
        return ia3.choose(found, config)
    return tg.select(found, targets, "target_modules", getattr(config, "modules_to_save", ()) or ())


def check_registered(site: Site, params: list[str]) -> None:
    """A registered class's call is taken to be x W alone; other params it holds would be dropped, so it is refused."""
    extra = sorted(n for n in params if n != site.weight and not leaves.is_peft_leaf(n) and n != ADAPTER and not quant.is_quantized_leaf(n))
    if site.rule.registered and extra:
        raise ValueError(f"{site.name}: a registered {site.kind} holds params {extra} besides its weight {site.weight!r}; jpeft runs "
                         "an adapted registered layer as the one contraction its registration describes, which would drop them")


# ----------------------------------------------------------------------------------------------
# Leaves in the layer's axes and in matrix form


def _expanded_ndim(site: Site, leaf: leaves.Leaf) -> int:
    return sum(len(site.in_axes) if d == leaves.IN else len(site.out_axes) if d == leaves.OUT else 1 for d in leaf.dims)


def leaf_matrix(site: Site, name: str, v: jax.Array) -> jax.Array:
    """A method leaf in the layer's axes (*lead, ...) as the matrix-form leaf `nn.dense` reads (*lead, ...)."""
    leaf = leaves.leaf(name)
    lead = v.ndim - _expanded_ndim(site, leaf)
    sizes, i = [], lead
    for d in leaf.dims:
        n = len(site.in_axes) if d == leaves.IN else len(site.out_axes) if d == leaves.OUT else 1
        sizes.append(math.prod(v.shape[i: i + n]))
        i += n
    return v.reshape(*v.shape[:lead], *sizes)


def leaf_layer(site: Site, name: str, m: jax.Array) -> jax.Array:
    """The inverse of `leaf_matrix`: a matrix-form leaf laid out along the layer's axes."""
    leaf = leaves.leaf(name)
    lead = m.ndim - len(leaf.dims)
    sizes = []
    for j, d in enumerate(leaf.dims):
        sizes += site.in_shape if d == leaves.IN else site.out_shape if d == leaves.OUT else (m.shape[lead + j],)
    return m.reshape(*m.shape[:lead], *sizes)


def partition_names(site: Site, name: str, weight_names: tuple | None, lead: int) -> tuple | None:
    """A leaf's partition names from its weight's (*lead, *shape) ones: IN dims the contracted axes' names, OUT dims the
    output axes', other dims whole (None), stacked layer axes kept; an adapter's leaves keep only the stacked axes'."""
    if weight_names is None:
        return None
    stack = tuple(weight_names[:lead])
    leaf = leaves.leaf(name)
    if leaf is None:  # an adapter's kernel (out, width) / (width, out) or bias
        return None
    names = {leaves.IN: tuple(weight_names[lead + a] for a in site.in_axes), leaves.OUT: tuple(weight_names[lead + a] for a in site.out_axes)}
    return stack + tuple(n for d in leaf.dims for n in names.get(d, (None,)))


def check_leaves(site: Site, p: Params, lead: tuple[int, ...] = ()) -> None:
    """Refuse, naming the layer, PEFT leaves that do not fit its weight (stacked on `lead` axes) or come without the
    leaves their method needs beside them."""
    for m in leaves.present(p):
        if any(n not in p for n in m.together):
            raise ValueError(f"{site.name}: {m.label} needs {', '.join(m.together[:-1])} and {m.together[-1]} together; this layer "
                             f"has only {[n for n in m.together if n in p]}")
    wrong = []
    for name, v in p.items():
        if not leaves.is_peft_leaf(name):
            continue
        leaf = leaves.leaf(name)
        want: list = list(lead)
        for d in leaf.dims:  # a free dim (a rank, a factor) as the leaf has it
            want += site.in_shape if d == leaves.IN else site.out_shape if d == leaves.OUT else [v.shape[min(len(want), v.ndim - 1)]]
        if tuple(v.shape) != tuple(want):
            wrong.append(f"{name} {tuple(v.shape)} (needs {tuple(want)})")
    if wrong:
        # A scale unsliced inside a layer stack is NNX's StateAxes slicing only nnx.Param (the method's own are LoRAParams).
        scales = [n for n in p if leaves.is_constant(n) and leaves.is_peft_leaf(n) and p[n].ndim > len(lead)]
        hint = (f"; a stacked {scales[0]} reached one layer's call: slice jpeft.nnx.LoRAScale with the params in nnx.scan / "
                "nnx.vmap (e.g. nnx.StateAxes({(nnx.Param, LoRAScale): 0, ...: None}))" if scales else "")
        raise ValueError(f"{site.name or site.kind}: PEFT leaves do not fit its {site.weight} {(*lead, *site.shape)}: {', '.join(wrong)}{hint}")


def method_leaves(p: Params) -> Params:
    """The method leaves beside a weight, by name."""
    return {n: v for n, v in p.items() if leaves.is_peft_leaf(n)}


def _matrix_module(site: Site, p: Params) -> Params:
    """The rule's module dict for one call: the weight as an (in, out) matrix or its quantized group, the bias as (out,),
    the method leaves in matrix form."""
    out = {n: leaf_matrix(site, n, v) for n, v in method_leaves(p).items()}
    if quant.is_quantized(p):
        group = quant.leaves(p)
        if quant.weight_shape(group) != site.matrix_shape:
            raise ValueError(f"{site.name}: its quantized weight is {quant.weight_shape(group)} as (in, out), but the layer reads "
                             f"its {site.weight} {site.shape} as {site.matrix_shape}: quantize a weight of this layout through its "
                             "layer (jpeft.linen.quantize / jpeft.nnx.quantize), not as a plain (in, out) kernel")
        out.update(group)
    else:
        out["kernel"] = site.as_matrix(p[site.weight])
    if site.rule.bias and p.get("bias") is not None:
        out["bias"] = site.bias_matrix(p["bias"])
    return out


def _dtype(module: Any, p: Params, site: Site, x: jax.Array) -> Any:
    """The layer's compute dtype as Flax's `promote_dtype` gives it: its `dtype`, else the input's, weight's (a quantized
    weight counts as the float it dequantizes to) and bias's promoted together."""
    if getattr(module, "dtype", None) is not None:
        return module.dtype
    weight = quant.weight_dtype(p) if quant.is_quantized(p) else p[site.weight].dtype
    bias = [p["bias"]] if site.rule.bias and p.get("bias") is not None else []
    return jnp.result_type(x, weight, *bias)


def adapted(p: Params) -> bool:
    """Whether a layer's params hold anything its own call cannot run: method leaves, an adapter, a quantized weight."""
    return bool(method_leaves(p)) or ADAPTER in p or quant.is_quantized(p)


def call(site: Site, module: Any, p: Params, method: str, own: Callable, args: tuple, kwargs: dict, ctx: nn.Ctx) -> Any:
    """One call of an adapted layer's `method`: a matrix kind through `nn.dense` (and `nn.adapter`) in matrix form; a
    Conv or Embed through its own call plus LoRA's update."""
    check_leaves(site, p)
    kind = site.rule
    if method != "__call__":  # another reader of the weight (an embedding's `attend`): LoRA only
        y = own(*args, **kwargs)
        return y + kind.readers[method](module, p, args, kwargs, ctx).astype(y.dtype) if "lora_a" in p else y
    if not kind.matrix:
        others = sorted(m.label for m in leaves.present(p) if m is not lora.METHOD) + (["DoRA"] if lora.MAGNITUDE in p else [])
        if others:
            raise ValueError(f"{site.name}: a {site.kind} layer takes LoRA only, but holds {others} leaves")
        y = own(*args, **kwargs)
        if "lora_a" in p:
            y = y + kind.lora(module, p, args, kwargs, ctx).astype(y.dtype)
        return nn.adapter(p.get(ADAPTER), y, ctx)
    x = first_input(args, kwargs)
    x_axes, kept, perm = _layout(site, kind.equation(module, site.shape, args, kwargs, x.ndim), x)
    xm = jnp.moveaxis(x, x_axes, tuple(range(x.ndim - len(x_axes), x.ndim))) if x_axes != tuple(range(x.ndim - len(x_axes), x.ndim)) else x
    xm = xm.reshape(*(x.shape[i] for i in kept), site.matrix_shape[0])  # (*kept, in)
    ctx = dataclasses.replace(ctx, dtype=_dtype(module, p, site, x))
    y = nn.adapter(p.get(ADAPTER), nn.dense(_matrix_module(site, p), xm, ctx), ctx)  # (*kept, out)
    y = y.reshape(*y.shape[:-1], *site.out_shape)
    return y if perm is None else y.transpose(perm)


# ----------------------------------------------------------------------------------------------
# Inject, merge


def check_method(site: Site, config: Any, name: str) -> None:
    """Conv and Embed take LoRA (not DoRA) and adapters; every method applies to a matrix kind."""
    if site.rule.matrix or isinstance(config, adapters.AdapterConfig):
        return
    if not isinstance(config, lora.LoraConfig) or config.use_dora:
        what = "DoRA" if isinstance(config, lora.LoraConfig) else leaves.for_config(config).label
        raise ValueError(f"{name}: jpeft has no {what} for a {site.kind} layer, which is no matrix product x W; it puts LoRA "
                         f"there (as HF PEFT does). Target its dense or einsum layers for {what}")


def _vmap(fn: Callable, depth: int) -> Callable:
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


def lead_of(site: Site, p: Params) -> tuple[int, ...]:
    """The stacked layer axes of a weight as stored (float or quantized)."""
    if quant.is_quantized(p):
        codes = next(v for k, v in p.items() if k in quant.CODES)
        return tuple(codes.shape[:-2])
    w = p[site.weight]
    lead = w.shape[: w.ndim - len(site.shape)]
    if w.shape[len(lead):] != site.shape:
        raise ValueError(f"{site.name}: its stored {site.weight} {w.shape} does not end with the {site.shape} one call sees; jpeft "
                         "needs layers stacked (nn.scan / nn.vmap / nnx.vmap) on leading axes, e.g. variable_axes={'params': 0}")
    return lead


def new_leaves(site: Site, p: Params, config: Any, name: str, key: jax.Array) -> tuple[Params, jax.Array | None]:
    """A method's leaves for one layer's weight (its params `p`, stacked axes first) in the layer's axes, and the
    weight it leaves in place (PiSSA's residual), else None: the method's own `init` on the matrix form, vmapped over
    stacked layers with one key each."""
    check_method(site, config, name)
    lead = lead_of(site, p)
    if isinstance(config, adapters.AdapterConfig):
        make = lambda k, module: {ADAPTER: adapters.new_adapter(site.matrix_shape[1], config, k)}  # noqa: E731
    else:
        method = leaves.for_config(config)
        make = lambda k, module: method.init(config, name, module, k)  # noqa: E731
    module = quant.leaves(p) if quant.is_quantized(p) else {"kernel": site.as_matrix(p[site.weight])}
    keys = jax.random.split(key, math.prod(lead)).reshape(*lead, *key.shape) if lead else key
    out = _vmap(make, len(lead))(keys, module)
    residual = out.pop("kernel", None)
    out = {n: v if n == ADAPTER else leaf_layer(site, n, v) for n, v in out.items()}
    return out, None if residual is None else site.from_matrix(residual).astype(p[site.weight].dtype)


def float_weight(site: Site, p: Params) -> jax.Array:
    """The layer's weight in its own layout (*lead, *shape): the float leaf, or the quantized group dequantized (float32)."""
    if not quant.is_quantized(p):
        return p[site.weight]
    return site.from_matrix(_vmap(quant.weight, len(lead_of(site, p)))(quant.leaves(p)))


def fold(site: Site, p: Params, held: Params, sign: float = 1.0, extra: jax.Array | None = None) -> Params:
    """{weight, bias}: the layer's weight (dequantized, if quantized) and bias with the method leaves `held` folded in
    (sign -1 takes them back out, given `extra`, what the merged weight cannot tell: DoRA's norms (*lead, *out)), by
    the methods' own `merge` / `unmerge` on the matrix form, float32 math."""
    if ADAPTER in held:
        raise ValueError(f"{site.name}: a bottleneck adapter (relu between its projections) does not fold into the layer's weight; "
                         "keep it beside the layer")
    lead = lead_of(site, p)
    w = float_weight(site, p)
    check_leaves(site, held, lead)
    pm = {n: leaf_matrix(site, n, v) for n, v in held.items()}
    m = site.as_matrix(w.astype(jnp.float32))
    if sign > 0:
        folded = _vmap(weights.fold, len(lead))(pm, m)
    else:
        norms = None if extra is None else extra.reshape(*lead, -1)
        folded = _vmap(weights.unfold, len(lead))(pm, m, norms)
    out = {site.weight: site.from_matrix(folded).astype(w.dtype)}
    if site.rule.bias and p.get("bias") is not None:
        b = site.bias_matrix(p["bias"])
        out["bias"] = site.bias_layer(_vmap(functools.partial(weights.fold_bias, sign=sign), len(lead))(pm, b))
    return out


def dora_norms(site: Site, p: Params, held: Params) -> jax.Array:
    """||W + s A B|| per output (*lead, *out) of a DoRA layer: what `fold(..., sign=-1)` needs to undo its merge."""
    lead = lead_of(site, p)
    pm = {n: leaf_matrix(site, n, v) for n, v in held.items()}
    m = site.as_matrix(float_weight(site, p).astype(jnp.float32))
    norms = _vmap(lambda q, w: lora.dora_weight_norm({**q, "kernel": w}), len(lead))(pm, m)
    return norms.reshape(*lead, *site.out_shape)
