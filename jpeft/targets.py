"""Choosing modules by name, with HF PEFT's rules, on dotted module paths ("encoder.block.0.layer.0.SelfAttention.q")."""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from jpeft import tree
from jpeft.quant import layout

Targets = str | Sequence[str]


def dense_modules(params: Mapping[str, Any]) -> list[str]:
    """Dotted paths of every module that holds a weight, a `kernel` or a quantized one (the candidates for LoRA and IA3)."""
    weights = (layout.KERNEL, *layout.CODES)
    return [module.replace("/", ".") for module, _, leaf in (path.rpartition("/") for path in tree.flatten(params)) if leaf in weights]


def matches(targets: Targets, name: str) -> bool:
    """HF PEFT's `check_target_module_exists`: a string is a full regex; a list entry is a name or a dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{t}") for t in targets)


def pattern_key(pattern_keys: Iterable[str], name: str) -> str | None:
    """HF PEFT's `get_pattern_key`: the first rank/alpha pattern that matches the end of `name`."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def within(modules: Iterable[str], name: str) -> bool:
    """HF PEFT's `modules_to_save` rule: `name` is one of the modules or lies inside one."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules)


def select(candidates: Iterable[str], targets: Targets, what: str) -> list[str]:
    """The candidates that match; an error listing the names that exist when none does."""
    candidates = list(candidates)
    chosen = [c for c in candidates if matches(targets, c)]
    if not chosen:
        short = sorted({c.rsplit(".", 1)[-1] for c in candidates})
        raise ValueError(
            f"{what}={targets!r} matches no module. Module names in this model: {short} "
            f"(e.g. {candidates[0] if candidates else 'none'!r}); use a name, a dotted suffix, or a regex string."
        )
    return chosen


def get_module(params: Mapping[str, Any], dotted: str) -> dict:
    """The nested dict at a dotted module path."""
    node: Any = params
    for part in dotted.split("."):
        node = node[part]
    return node


def replace_modules(params: Mapping[str, Any], updates: Mapping[str, Mapping[str, Any]]) -> dict:
    """A new tree where each dotted module path gets extra leaves; untouched subtrees are shared, not copied."""
    out = dict(params)
    for dotted, leaves in updates.items():
        parts = dotted.split(".")
        node = out
        for part in parts:
            node[part] = dict(node[part])
            node = node[part]
        node.update(leaves)
    return out
