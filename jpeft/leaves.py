"""What each PEFT method declares, in one place: the leaves it adds and their roles; for the methods that sit beside a
weight, how they change the layer's output and its merged weight.

`nn.dense` applies the declared methods, `split` reads which leaves train, `sharding` how they shard, `peft_format`
their HF PEFT names, and the Flax integrations how each leaf's dims lay out against a layer's weight. Nobody else keeps
a list of leaf names: a method is one module that builds its declaration and calls `declare`.

A weight is seen as the matrix product x (..., in) @ W (in, out). Each leaf says, dim by dim, whether that dim spans
the weight's input ("in"), its output ("out"), or neither (None: a rank, a Kronecker factor, stacked adapters), so a
leaf can be checked against any weight, sharded like it, and laid out along a Flax layer's own axes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

Params = Mapping[str, Any]
IN, OUT = "in", "out"


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One tensor a method adds beside a weight (or at the top of the tree)."""

    name: str
    dims: tuple[str | None, ...]  # per dim: IN / OUT (spans the weight's input / output), or None
    trainable: bool = True  # False: a constant of the method (a scale), neither trained nor counted
    peft: str | None = None  # HF PEFT's tensor name beside the module ("lora_A.weight"), 2-D ones in PyTorch's layout


@dataclasses.dataclass(frozen=True)
class Method:
    """A method beside a weight: its leaves, and the pieces `nn.dense` and merging call when one of its `markers` is
    present.

    The layer computes, over the methods present in declaration order,
        x -> scale_input(x) -> product(x) (each method wrapping the product of those before it, the first one
        wrapping the frozen x @ W) -> + bias -> scale_output(y)
    and merging folds the same into W: `merge` for each method in order (additive ones, then scalings), `merge_bias`
    where the method scales the bias. `unmerge` inverts `merge` (given `extra`, what the merged weight cannot tell,
    such as DoRA's norms).
    """

    name: str
    label: str  # how messages name it ("LoRA", "(IA)^3")
    peft_type: str  # HF PEFT's peft_type ("LORA", "IA3", "LOHA", "LOKR")
    leaves: tuple[Leaf, ...]
    markers: tuple[str, ...]  # leaves any of which puts the method on a module
    config: type  # the method's config class (LoraConfig, ...)
    init: Callable[[Any, str, Params, Any], Params]  # (config, module name, module, key) -> its leaves (a `kernel`: PiSSA's residual)
    scale_input: Callable[[Params, Any, Any], Any] | None = None  # (p, x, ctx) -> x
    product: Callable[[Params, Any, Callable, Any], Any] | None = None  # (p, x, inner, ctx) -> x W'
    scale_output: Callable[[Params, Any, Any], Any] | None = None  # (p, y, ctx) -> y
    merge: Callable[[Params, Any], Any] | None = None  # (p, W (in, out) float32) -> W'
    unmerge: Callable[[Params, Any, Any], Any] | None = None  # (p, W', extra) -> W
    merge_bias: Callable[[Params, Any, float], Any] | None = None  # (p, bias, sign) -> bias (sign -1: undo)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(leaf.name for leaf in self.leaves)


@dataclasses.dataclass(frozen=True)
class Module:
    """A method that adds whole parameters of its own rather than leaves beside a weight: a subtree under a module
    (bottleneck adapters), or top-level leaves and subtrees (soft prompts, P-tuning's encoder, prefix tuning)."""

    name: str
    subtrees: tuple[str, ...] = ()  # names of subtrees every leaf of which is the method's
    top_level: tuple[str, ...] = ()  # leaves or subtrees at the top of the tree
    constants: tuple[str, ...] = ()  # leaves in its subtrees that are settings, not parameters


METHODS: list[Method] = []
MODULES: list[Module] = []


def declare(method: Method | Module) -> Method | Module:
    """Register a method's declaration (its module does this once, on import)."""
    (METHODS if isinstance(method, Method) else MODULES).append(method)
    return method


def for_config(config: Any) -> Method:
    """The method beside a weight that `config` configures; an error naming the configs that have one."""
    for m in METHODS:
        if isinstance(config, m.config):
            return m
    raise ValueError(f"{type(config).__name__} configures no method beside a weight; expected one of "
                     f"{[m.config.__name__ for m in METHODS]}")


def leaf(name: str) -> Leaf | None:
    """The declaration of a leaf beside a weight, by name (None for any other name)."""
    return next((lf for m in METHODS for lf in m.leaves if lf.name == name), None)


def present(p: Params) -> list[Method]:
    """The methods beside the weight of module `p`, in declaration order."""
    return [m for m in METHODS if any(k in p for k in m.markers)]


def method_of(name: str) -> Method:
    """The method a leaf beside a weight belongs to."""
    return next(m for m in METHODS if name in m.names)


def is_peft_leaf(name: str) -> bool:
    """Whether a leaf name beside a weight is a method's."""
    return leaf(name) is not None


def is_adapter_path(path: str) -> bool:
    """Whether a leaf of the tree (by its '/' path) belongs to a PEFT method rather than to the base model."""
    parts = path.split("/")
    return (is_peft_leaf(parts[-1]) or any(s in parts[:-1] for m in MODULES for s in m.subtrees)
            or any(parts[0] == t for m in MODULES for t in m.top_level))


def trains(path: str) -> bool:
    """Whether a PEFT leaf trains: every method leaf but the constants."""
    parts = path.split("/")
    if (lf := leaf(parts[-1])) is not None:
        return lf.trainable
    return is_adapter_path(path) and not any(parts[-1] in m.constants for m in MODULES)


def is_constant(path: str) -> bool:
    """Whether a PEFT leaf is a setting of its method (a scale, an encoder's dropout rate): not trained, not counted."""
    parts = path.split("/")
    lf = leaf(parts[-1])
    return (lf is not None and not lf.trainable) or (is_adapter_path(path) and any(parts[-1] in m.constants for m in MODULES))


def fits(name: str, shape: tuple[int, ...], weight: tuple[int, int]) -> bool:
    """Whether a leaf of this shape fits an (in, out) weight: its IN / OUT dims (counted from the end, so stacked
    adapters' leading axis is allowed) have the weight's sizes."""
    lf = leaf(name)
    if lf is None:
        return True
    if len(shape) < len(lf.dims):
        return False
    sizes = {IN: weight[0], OUT: weight[1]}
    return all(d is None or shape[len(shape) - len(lf.dims) + i] == sizes[d] for i, d in enumerate(lf.dims))
