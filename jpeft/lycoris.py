"""What LoHa and LoKr share (HF PEFT's `LycorisConfig` / `LycorisLayer`): the config's common fields, the
initialisation, and merging an update matrix into the kernel and back out.

Each method's update (in, out) is computed by `jpeft.nn` (`loha_weight`, `lokr_weight`), the same rule
`nn.dense` applies, so a merged tree computes what the unmerged one did.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jpeft import quant, split
from jpeft import targets as tg
from jpeft import tree


@dataclasses.dataclass(frozen=True)
class LycorisConfig:
    """The fields HF PEFT's LoHaConfig and LoKrConfig share that shape the parameters.

    `rank_dropout` and `module_dropout` (training-only randomness in PEFT) are not implemented and must be 0;
    `use_effective_conv2d` concerns convolutions only and is ignored for Linear layers, as in PEFT.
    """

    r: int = 8
    alpha: float = 8.0
    target_modules: tg.Targets = ("q", "v")
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    init_weights: bool | str = True
    use_effective_conv2d: bool = False

    def __post_init__(self):
        name = type(self).__name__
        if self.r <= 0 or any(r <= 0 for r in self.rank_pattern.values()):
            raise ValueError(f"{name}: rank must be positive, got r={self.r}, rank_pattern={dict(self.rank_pattern)}")
        for field in ("rank_dropout", "module_dropout"):
            if getattr(self, field) != 0:
                raise ValueError(f"{name}: {field}={getattr(self, field)} is not implemented by jpeft (HF PEFT applies it in "
                                 f"training only); use {field}=0")
        if self.init_weights not in self._INITS:
            raise ValueError(f"{name}: init_weights={self.init_weights!r} is not one of {self._INITS}")

    _INITS = (True, False)  # a class constant, not a field: no annotation

    def rank_and_scale(self, name: str) -> tuple[int, float]:
        """(r, alpha / r) of one module after rank_pattern / alpha_pattern, as HF PEFT's `_create_and_replace`."""
        rkey, akey = tg.pattern_key(self.rank_pattern, name), tg.pattern_key(self.alpha_pattern, name)
        r = self.rank_pattern[rkey] if rkey is not None else self.r
        alpha = self.alpha_pattern[akey] if akey is not None else self.alpha
        return r, alpha / r


def target_names(params: Mapping[str, Any], cfg: LycorisConfig) -> list[str]:
    """Dotted names of the dense modules `cfg` targets."""
    return tg.select_dense(params, cfg.target_modules, type(cfg).__name__.removesuffix("Config"))


def kaiming(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """torch's kaiming_uniform_(a=sqrt(5)) on PEFT's tensor, which is this (in-first) leaf transposed:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with PEFT's fan_in (its columns) our rows."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def inject(params: Mapping[str, Any], cfg: LycorisConfig, key: jax.Array,
           new_leaves: Callable[[str, tuple[int, int], Any, jax.Array], dict]) -> dict:
    """A new tree with `new_leaves(name, (in, out), dtype, key)` beside each targeted weight (float or quantized)."""
    updates = {}
    for i, name in enumerate(target_names(params, cfg)):
        module = tg.get_module(params, name)
        present = sorted(k for k in module if k in split.ADAPTER_LEAVES)
        if present:
            raise ValueError(f"{name} already has PEFT leaves {present}: merge or split them off before injecting again")
        updates[name] = new_leaves(name, quant.weight_shape(module), quant.weight_dtype(module), jax.random.fold_in(key, i))
    return tg.replace_modules(params, updates)


def _modules(flat: Mapping[str, Any], marker: str) -> list[str]:
    return sorted(p[: -len(marker) - 1] for p in flat if p.endswith(f"/{marker}"))


def merge(params: Mapping[str, Any], marker: str, leaves: tuple[str, ...], weight: Callable[[Mapping[str, Any]], jax.Array],
          method: str) -> dict:
    """W + update (float32 math) for each module holding `marker`, its `leaves` removed; a quantized W is dequantized."""
    modules = _modules(tree.flatten(params), marker)
    if not modules:
        raise ValueError(f"merge: this parameter tree holds no {method} weights (no {marker} leaves)")
    flat = tree.flatten(quant.dequantize(params, [m.replace("/", ".") for m in modules]))
    for path in modules:
        module = {leaf: flat.pop(f"{path}/{leaf}") for leaf in leaves if f"{path}/{leaf}" in flat}
        kernel = flat[f"{path}/kernel"]
        flat[f"{path}/kernel"] = (kernel.astype(jnp.float32) + weight(module)).astype(kernel.dtype)
    return tree.unflatten(flat)


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any], marker: str, leaves: tuple[str, ...],
            weight: Callable[[Mapping[str, Any]], jax.Array], method: str) -> dict:
    """The inverse of `merge`: W - update, and the adapter's leaves put back beside it."""
    flat, extra = tree.flatten(merged), tree.flatten(adapter)
    modules = _modules(extra, marker)
    if not modules:
        raise ValueError(f"unmerge: the adapter holds no {method} weights (no {marker} leaves)")
    for path in modules:
        module = {leaf: extra[f"{path}/{leaf}"] for leaf in leaves if f"{path}/{leaf}" in extra}
        kernel = flat[f"{path}/kernel"]
        flat[f"{path}/kernel"] = (kernel.astype(jnp.float32) - weight(module)).astype(kernel.dtype)
        flat.update({f"{path}/{leaf}": v for leaf, v in module.items()})
    return tree.unflatten(flat)
