"""What every method beside a weight shares: adding its leaves to the targeted modules, and folding them into the
weight and back out. Each method supplies only its own pieces (`jpeft.leaves.Method`); the loops live here once.

A module is a dict holding a weight (`kernel` (in, out), or a quantized group standing for it), maybe a `bias`, and
the leaves methods put beside it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jpeft import leaves, quant, tree
from jpeft import targets as tg

Params = dict[str, Any]


def target_names(params: Mapping[str, Any], targets: tg.Targets, modules_to_save=()) -> list[str]:
    """Dotted names of the weight-holding modules `targets` selects (modules_to_save excluded, as in HF PEFT)."""
    return tg.select(tg.dense_modules(params), targets, "target_modules", modules_to_save)


def inject(params: Mapping[str, Any], names: list[str], make: Callable[[str, Params, jax.Array], Params], key: jax.Array) -> dict:
    """A new tree with `make(name, module, key_i)`'s leaves beside each named module's weight (a `kernel` among them
    replaces the weight, as PiSSA's residual does); a module that already holds PEFT leaves is refused."""
    updates = {}
    for i, name in enumerate(names):
        module = tg.get_module(params, name)
        held = sorted(k for k in module if leaves.is_peft_leaf(k))
        if held:
            raise ValueError(f"{name} already has PEFT leaves {held}: merge or split them off before injecting again")
        updates[name] = make(name, module, jax.random.fold_in(key, i))
    return tg.replace_modules(params, updates)


def fold(p: Params, w: jax.Array, extra: Any = None) -> jax.Array:
    """The (in, out) float32 weight with the methods present in `p` folded in: additive ones first, then scalings,
    as the layer applies them (x l_in) (W + dW) l_out."""
    for m in sorted(leaves.present(p), key=lambda m: m.product is None):
        w = m.merge(p, w)
    return w


def unfold(p: Params, w: jax.Array, extra: Any = None) -> jax.Array:
    """The inverse of `fold`; `extra` is what the merged weight cannot tell (DoRA's norm ||W + s A B||)."""
    for m in sorted(leaves.present(p), key=lambda m: m.product is None, reverse=True):
        w = m.unmerge(p, w, extra)
    return w


def fold_bias(p: Params, bias: jax.Array, sign: float = 1.0) -> jax.Array:
    """The bias as merging leaves it: scaled by the methods that scale the layer's output (sign -1 undoes it)."""
    for m in leaves.present(p):
        if m.merge_bias is not None:
            bias = m.merge_bias(p, bias, sign)
    return bias


def modules_with(params: Mapping[str, Any], method: leaves.Method) -> list[str]:
    """'/' paths of the modules holding `method`'s leaves."""
    return sorted({p.rsplit("/", 1)[0] for p in tree.flatten(params) if p.rsplit("/", 1)[-1] in method.markers})


def merge(params: Mapping[str, Any], method: leaves.Method) -> dict:
    """Every `method` module's leaves folded into its weight (float32 math) and removed: a plain tree of the base's
    structure. A quantized weight is dequantized first, so its merged module holds a float32 `kernel` (for export)."""
    modules = modules_with(params, method)
    if not modules:
        raise ValueError(f"merge: this parameter tree holds no {method.label} weights (no {' or '.join(method.markers)} leaves)")
    flat = tree.flatten(quant.dequantize(params, [m.replace("/", ".") for m in modules]))
    for path in modules:
        p = {name: flat.pop(f"{path}/{name}") for name in method.names if f"{path}/{name}" in flat}
        kernel = flat[f"{path}/kernel"]
        flat[f"{path}/kernel"] = fold(p, kernel.astype(jnp.float32)).astype(kernel.dtype)
        if f"{path}/bias" in flat:
            flat[f"{path}/bias"] = fold_bias(p, flat[f"{path}/bias"])
    return tree.unflatten(flat)


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any], method: leaves.Method,
            extra: Mapping[str, Any] | None = None) -> dict:
    """The inverse of `merge`: each module's leaves in `adapter` taken back out of its weight and put beside it;
    `extra` maps a module path to what the merged weight cannot tell (DoRA's norms)."""
    flat, held = tree.flatten(merged), tree.flatten(adapter)
    modules = modules_with(adapter, method)
    if not modules:
        raise ValueError(f"unmerge: the adapter holds no {method.label} weights (no {' or '.join(method.markers)} leaves)")
    for path in modules:
        p = {name: held[f"{path}/{name}"] for name in method.names if f"{path}/{name}" in held}
        kernel = flat[f"{path}/kernel"]
        flat[f"{path}/kernel"] = unfold(p, kernel.astype(jnp.float32), (extra or {}).get(path)).astype(kernel.dtype)
        if f"{path}/bias" in flat:
            flat[f"{path}/bias"] = fold_bias(p, flat[f"{path}/bias"], -1.0)
        flat.update({f"{path}/{name}": v for name, v in p.items()})
    return tree.unflatten(flat)
