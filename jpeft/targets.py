"""Choosing modules by name, with HF PEFT's rules, on dotted module paths ("encoder.block.0.layer.0.SelfAttention.q")."""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping, Sequence

from jpeft import tree
from jpeft.quant import layout

Targets = str | Sequence[str]


def dense_modules(params: Mapping[str, Any]) -> list[str]:
    """Dotted paths of every module that holds a weight, a `kernel` or a quantized one (the candidates for LoRA and IA3)."""
    weights = (layout.KERNEL, *layout.CODES)
    return [module.replace("/", ".") for module, _, leaf in (path.rpartition("/") for path in tree.flatten(params)) if leaf in weights]


def module_paths(params: Mapping[str, Any]) -> list[str]:
    """Dotted paths of every module, leaf-holding or not ("model", "model.layers", "model.layers.0", ...)."""
    return sorted({".".join(parts[:k]) for parts in (p.split("/") for p in tree.flatten(params)) for k in range(1, len(parts))})


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


def select(candidates: Iterable[str], targets: Targets, what: str, modules_to_save: Sequence[str] = ()) -> list[str]:
    """The candidates that match, less those inside `modules_to_save` (HF PEFT trains these whole, with no adapter).

    As HF PEFT, a regex string must match some module; unlike HF PEFT, which drops a list entry that matches
    nothing, so must every entry of a list (a typo in one of several names is an error, not a smaller run).
    """
    candidates = list(candidates)
    saved = [c for c in candidates if modules_to_save and within(modules_to_save, c)]
    candidates = [c for c in candidates if c not in saved]
    chosen = [c for c in candidates if matches(targets, c)]
    entries = [targets] if isinstance(targets, str) else list(targets)
    missing = [t for t in entries if not any(matches(t if isinstance(targets, str) else [t], c) for c in candidates)]
    if missing:
        raise ValueError(_no_match(what, targets, missing, candidates, saved))
    return chosen


def _no_match(what: str, targets: Targets, missing: list[str], candidates: list[str], saved: list[str]) -> str:
    """Which entries match nothing, the name each was probably meant to be, and the names there are."""
    short = sorted({name for name in (c.rsplit(".", 1)[-1] for c in candidates) if not name.isdigit()})  # no layer indices
    if isinstance(targets, str) or len(missing) == len(targets):
        parts = [f"{what}={targets if isinstance(targets, str) else list(targets)!r} matches no module."]
    else:
        parts = [f"{what}={list(targets)!r}: {', '.join(map(repr, missing))} {'matches' if len(missing) == 1 else 'match'} no module."]
    for t in [] if isinstance(targets, str) else missing:
        if any(matches([t], s) for s in saved):
            parts.append(f"{t!r} names only modules in modules_to_save, which train whole and take no adapter.")
        elif close := difflib.get_close_matches(t.rsplit(".", 1)[-1], short, n=1):
            parts.append(f"{t!r}: did you mean {close[0]!r}?")
    parts.append(f"Module names in this model: {short} (e.g. {candidates[0] if candidates else 'none'!r}); use a name, a dotted "
                 "suffix, or a regex string.")
    return " ".join(parts)


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
