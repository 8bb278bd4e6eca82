"""The trainable/frozen split: masks, equinox-style partition/combine, an optimizer that only keeps state for
trainable leaves, and swapping task adapters on one base."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from jpeft import leaves, quant
from jpeft.methods import selective as sel
from jpeft import targets as tg
from jpeft import tree

is_adapter_path = leaves.is_adapter_path  # whether a leaf belongs to a PEFT method (each method declares its leaves)


def trainable_mask(params: Mapping[str, Any], modules_to_save: Sequence[str] = (), selective: sel.SelectiveConfig | None = None) -> dict:
    """A tree of bools: True on PEFT leaves (not constants like lora_scale), inside `modules_to_save`, and on `selective`'s choice.

    Quantized weights never train: choosing one (by modules_to_save or selective) is an error naming it; so is a
    modules_to_save name that names no module.
    """
    if modules_to_save:  # each name must name a module: a typo would train nothing extra, silently
        tg.select(tg.module_paths(params), list(modules_to_save), "modules_to_save")
    chosen = set(sel.selected_paths(params, selective)) if selective is not None else set()
    flat = tree.flatten(params)
    mask = {}
    for path in flat:
        parts = path.split("/")
        mask[path] = (
            leaves.trains(path)
            or (bool(modules_to_save) and tg.within(modules_to_save, ".".join(parts[:-1])))
            or path in chosen
        )
    quant.check_frozen(mask)
    return tree.unflatten(mask)


MASTER_DTYPE = jnp.float32  # what every trainable leaf is kept in, whatever the base is stored in


def partition(params: Mapping[str, Any], mask: Mapping[str, Any]) -> tuple[dict, dict]:
    """(trainable, frozen): two trees of the same structure with None where the other one holds the leaf.

    Trainable leaves come back as float32 master copies where they were 16-bit floats (LoRA on a bf16 base, or a bf16
    base under full fine-tuning), so that their gradients, optimizer state and updates are float32 too, as HF PEFT's
    `autocast_adapter_dtype` keeps adapters; frozen leaves stay as stored (bf16, quantized).
    """
    trainable = jax.tree.map(lambda p, m: master(p) if m else None, params, mask)
    frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
    return trainable, frozen


def master(x: Any) -> Any:
    """A 16-bit float array (or ShapeDtypeStruct) as a float32 copy; anything else as is."""
    if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and jnp.dtype(x.dtype).itemsize < 4):
        return x
    return jax.ShapeDtypeStruct(x.shape, MASTER_DTYPE) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(MASTER_DTYPE)


def combine(*trees: Mapping[str, Any]) -> dict:
    """Inverse of `partition`: the first non-None leaf at each position."""
    def pick(*leaves):
        return next((leaf for leaf in leaves if leaf is not None), None)

    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None)


def optimizer(tx: optax.GradientTransformation, mask: Mapping[str, Any]) -> optax.GradientTransformation:
    """`tx` on trainable leaves, zero updates and no state on frozen ones (optax.masked alone freezes nothing)."""
    quant.check_frozen(mask)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def split_adapter(params: Mapping[str, Any]) -> tuple[dict, dict]:
    """(base, adapter): the base model's leaves and the PEFT leaves, as two plain trees sharing arrays."""
    flat = tree.flatten(params)
    base = {p: v for p, v in flat.items() if not is_adapter_path(p)}
    adapter = {p: v for p, v in flat.items() if is_adapter_path(p)}
    return tree.unflatten(base), tree.unflatten(adapter)


def attach(base: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict:
    """Put an adapter on a base (no copies); an error if the adapter's modules or shapes do not fit the base."""
    flat_base, flat_adapter = tree.flatten(base), tree.flatten(adapter)
    shapes = quant.float_shapes(base)  # a quantized weight counts as a kernel of its logical shape
    clash = [p for p in flat_adapter if p in flat_base]
    if clash:
        raise ValueError(f"attach: the base already has {clash[:3]}; split its adapter off first")
    subtrees = [f"/{s}/" for m in leaves.MODULES for s in m.subtrees]  # e.g. a bottleneck adapter under its module
    for path, value in flat_adapter.items():
        sub = next((s for s in subtrees if s in path), None)
        module = path.split(sub)[0] if sub else path.rsplit("/", 1)[0]
        kernel = shapes.get(f"{module}/kernel")
        leaf = path.rsplit("/", 1)[-1]
        if any(path.split("/", 1)[0] in m.top_level for m in leaves.MODULES):  # top level, beside no kernel
            continue
        if kernel is None and sub is None:
            raise ValueError(f"attach: adapter leaf {path} has no base kernel at {module}/kernel")
        if kernel is not None and not leaves.fits(leaf, value.shape, kernel):
            raise ValueError(f"attach: {path} has shape {value.shape}, which does not fit the base kernel {kernel}")
    return tree.unflatten({**flat_base, **flat_adapter})


def count_params(params: Mapping[str, Any], mask: Mapping[str, Any] | None = None, verbose: bool = True) -> tuple[int, int]:
    """(trainable, all) parameter counts, printed in HF PEFT's `print_trainable_parameters` format.

    The scales (lora_scale, loha_scale, lokr_scale) and P-tuning's encoder_dropout are constants, not parameters, and
    are not counted (as in HF PEFT). A quantized weight counts as the float weight it stands for (bitsandbytes' Params4bit counts its packed bytes instead; jpeft's counts do not
    change when the base is quantized).
    """
    mask = trainable_mask(params) if mask is None else mask
    flat_mask = tree.flatten(mask)
    counted = {p: math.prod(s) for p, s in quant.float_shapes(params).items() if not leaves.is_constant(p)}
    all_params = sum(counted.values())
    trainable = sum(n for p, n in counted.items() if flat_mask.get(p, False))
    if verbose:
        print(f"trainable params: {trainable:,d} || all params: {all_params:,d} || trainable%: {100 * trainable / all_params:.4f}")
    return trainable, all_params
