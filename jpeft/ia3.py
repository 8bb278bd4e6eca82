"""(IA)^3: learned vectors that rescale activations, placed beside the kernels they act on.

Feed-forward modules scale their input (`ia3_in`, shape (in,)); the others scale their output
(`ia3_out`, shape (out,)). Initialised to ones, so an untrained IA3 model equals the base.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from jpeft import quant
from jpeft import targets as tg
from jpeft import tree

LEAVES = ("ia3_in", "ia3_out")


@dataclasses.dataclass(frozen=True)
class IA3Config:
    """HF PEFT's IA3Config; the defaults are its T5 defaults (k, v and the feed-forward wo)."""

    target_modules: tg.Targets = ("k", "v", "wo")
    feedforward_modules: tg.Targets = ("wo",)
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # HF PEFT's check: with both given as name lists, a feed-forward name that is no target (a typo) is an error,
        # not a layer silently given ia3_out.
        if not isinstance(self.target_modules, str) and not isinstance(self.feedforward_modules, str):
            stray = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if stray:
                raise ValueError(f"feedforward_modules should be a subset of target_modules (as in HF PEFT); {stray} are not "
                                 f"in target_modules={list(self.target_modules)}")


def target_names(params: Mapping[str, Any], cfg: IA3Config) -> list[str]:
    """Dotted names of the dense modules `cfg` targets (modules_to_save are excluded, as in HF PEFT)."""
    return choose(tg.dense_modules(params), cfg)


def choose(candidates: list[str], cfg: IA3Config) -> list[str]:
    """The candidates `cfg` targets, checked as `targets.select` does; so is each feed-forward name, against them."""
    chosen = tg.select(candidates, cfg.target_modules, "target_modules", cfg.modules_to_save)
    if cfg.feedforward_modules:
        tg.select(chosen, cfg.feedforward_modules, "feedforward_modules")
    return chosen


def inject(params: Mapping[str, Any], cfg: IA3Config, key: Any = None) -> dict:
    """A new tree with ones-initialised scaling vectors beside each targeted kernel."""
    updates = {}
    for name in target_names(params, cfg):
        module = tg.get_module(params, name)
        if any(leaf in module for leaf in LEAVES):
            raise ValueError(f"{name} already has IA3 vectors")
        (d_in, d_out), dtype = quant.weight_shape(module), quant.weight_dtype(module)
        if tg.matches(cfg.feedforward_modules, name):
            updates[name] = {"ia3_in": jnp.ones((d_in,), dtype)}
        else:
            updates[name] = {"ia3_out": jnp.ones((d_out,), dtype)}
    return tg.replace_modules(params, updates)


def merge(params: Mapping[str, Any]) -> dict:
    """Fold the vectors into the kernels (W * l per row or column) and drop them; a quantized W becomes a float32 kernel."""
    modules = sorted({p.rsplit("/", 1)[0].replace("/", ".") for p in tree.flatten(params) if p.rsplit("/", 1)[-1] in LEAVES})
    flat = tree.flatten(quant.dequantize(params, modules))
    found = False
    for path in [p for p in flat if p.rsplit("/", 1)[-1] in LEAVES]:
        module, leaf = path.rsplit("/", 1)
        vec, kernel = flat.pop(path).astype(jnp.float32), flat[f"{module}/kernel"]
        scaled = kernel.astype(jnp.float32) * (vec[:, None] if leaf == "ia3_in" else vec[None, :])
        flat[f"{module}/kernel"] = scaled.astype(kernel.dtype)
        found = True
    if not found:
        raise ValueError("merge: this parameter tree holds no IA3 vectors")
    return tree.unflatten(flat)
