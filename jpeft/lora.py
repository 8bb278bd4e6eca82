"""LoRA as a pure parameter-tree transform: `inject` adds lora_a/lora_b/lora_scale beside targeted kernels.

The model's dense op (`jpeft.nn.dense`) computes x W + (dropout(x) A) B * scale whenever the
leaves are present, so training never materialises W + BA; `merge` folds them in for export.
DoRA (`use_dora=True`) adds `lora_magnitude` (out,), initialised to ||W + scale A B|| per output as HF PEFT's
`lora_magnitude_vector`; merging it scales each output column of W + scale A B by magnitude / norm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jpeft import nn, quant
from jpeft import targets as tg
from jpeft import tree

LEAVES = ("lora_a", "lora_b", "lora_scale")
MAGNITUDE = "lora_magnitude"  # DoRA's trainable per-output magnitude (PEFT's lora_magnitude_vector)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """HF PEFT's LoraConfig, for the parts that shape the parameters."""

    r: int = 8
    alpha: float = 8.0
    target_modules: tg.Targets = ("q", "v")
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"  # "default" (A Kaiming-uniform, B zero), "gaussian", or "pissa"
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: Sequence[str] = ()
    use_dora: bool = False

    def __post_init__(self):
        if self.r <= 0 or any(r <= 0 for r in self.rank_pattern.values()):
            raise ValueError(f"LoRA rank must be positive, got r={self.r}, rank_pattern={dict(self.rank_pattern)}")
        if self.alpha <= 0 or any(a <= 0 for a in self.alpha_pattern.values()):
            raise ValueError(f"LoRA alpha must be positive, got alpha={self.alpha}, alpha_pattern={dict(self.alpha_pattern)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("default", "gaussian", "pissa"):
            raise ValueError(f"unknown LoRA init {self.init!r}; choose 'default', 'gaussian' or 'pissa'")

    def rank_and_scale(self, name: str) -> tuple[int, float]:
        """(r, scale) of one module, after rank_pattern/alpha_pattern, as HF PEFT computes them."""
        rkey = tg.pattern_key(self.rank_pattern, name)
        akey = tg.pattern_key(self.alpha_pattern, name)
        r = self.rank_pattern[rkey] if rkey is not None else self.r
        alpha = self.alpha_pattern[akey] if akey is not None else self.alpha
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def target_names(params: Mapping[str, Any], cfg: LoraConfig) -> list[str]:
    """Dotted names of the modules `cfg` targets (modules_to_save are excluded, as in HF PEFT)."""
    return tg.select(tg.dense_modules(params), cfg.target_modules, "target_modules", cfg.modules_to_save)


def _init_pair(key, kernel, r, init):
    d_in, d_out = kernel.shape  # kernel: an array or a ShapeDtypeStruct
    if init == "default":  # torch's kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(key, (d_in, r), jnp.float32, -bound, bound)
    else:
        a = jax.random.normal(key, (d_in, r), jnp.float32) / r
    return a.astype(kernel.dtype), jnp.zeros((r, d_out), kernel.dtype)


def _pissa(kernel, r, scale):
    """PiSSA: A, B from the top-r singular triplets; the residual W - scale*AB stays frozen."""
    u, s, vt = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[:r] / scale)
    a, b = u[:, :r] * root, root[:, None] * vt[:r]
    return a, b, kernel.astype(jnp.float32) - scale * a @ b


def inject(params: Mapping[str, Any], cfg: LoraConfig, key: jax.Array) -> dict:
    """A new tree with lora_a (in, r), lora_b (r, out) and lora_scale () beside each targeted kernel, and with
    `use_dora` DoRA's lora_magnitude (out,) = ||W + scale A B|| per output (HF PEFT's init)."""
    updates = {}
    for i, name in enumerate(target_names(params, cfg)):
        module = tg.get_module(params, name)
        if "lora_a" in module:
            raise ValueError(f"{name} already has LoRA weights: merge or split them off before injecting again")
        r, scale = cfg.rank_and_scale(name)
        leaves = {"lora_scale": jnp.asarray(scale, jnp.float32)}
        if cfg.init == "pissa":
            if quant.is_quantized(module):
                raise ValueError(f"PiSSA rewrites the base weight of {name}, which is quantized: inject PiSSA on the float base, then quantize")
            kernel = module["kernel"]
            a, b, residual = _pissa(kernel, r, scale)
            leaves.update(lora_a=a.astype(kernel.dtype), lora_b=b.astype(kernel.dtype), kernel=residual.astype(kernel.dtype))
        else:  # the weight's logical (in, out) shape and float dtype, whether it is a kernel or quantized
            weight = jax.ShapeDtypeStruct(quant.weight_shape(module), quant.weight_dtype(module))
            leaves["lora_a"], leaves["lora_b"] = _init_pair(jax.random.fold_in(key, i), weight, r, cfg.init)
        if cfg.use_dora:
            leaves[MAGNITUDE] = nn.dora_weight_norm({**module, **leaves}).astype(quant.weight_dtype(module))
        updates[name] = leaves
    return tg.replace_modules(params, updates)


def _lora_modules(params: Mapping[str, Any]) -> list[str]:
    return [p[: -len("/lora_a")] for p in tree.flatten(params) if p.endswith("/lora_a")]


def _delta(module: Mapping[str, Any]) -> jax.Array:
    a, b = module["lora_a"].astype(jnp.float32), module["lora_b"].astype(jnp.float32)
    if a.ndim == 3:
        raise ValueError("cannot merge stacked (multi-adapter) LoRA leaves; select one adapter first")
    return module["lora_scale"] * (a @ b)


def dora_norms(params: Mapping[str, Any]) -> dict[str, jax.Array]:
    """{module path: ||W + scale A B|| (out,)} of every DoRA module: what `unmerge` needs to undo a DoRA merge.

    PEFT caches the same norms in the module when it merges; the merged weight alone does not determine them.
    """
    flat = tree.flatten(params)
    modules = [p[: -len(f"/{MAGNITUDE}")] for p in flat if p.endswith(f"/{MAGNITUDE}")]
    flat = tree.flatten(quant.dequantize(params, [m.replace("/", ".") for m in modules])) if modules else flat
    # Formed, not expanded as nn.dora_weight_norm: PEFT's merge forms W + sBA too, and this runs once.
    return {m: jnp.linalg.norm(flat[f"{m}/kernel"].astype(jnp.float32) + _delta({leaf: flat[f"{m}/{leaf}"] for leaf in LEAVES}), axis=0)
            for m in modules}


def merge(params: Mapping[str, Any]) -> dict:
    """W + scale * A @ B accumulated in float32, LoRA leaves removed: a plain tree of the base's structure.

    A quantized W is dequantized first, so its merged module holds a float32 `kernel` (for export).
    """
    modules = _lora_modules(params)
    if not modules:
        raise ValueError("merge: this parameter tree holds no LoRA weights (no lora_a leaves)")
    flat = tree.flatten(quant.dequantize(params, [m.replace("/", ".") for m in modules]))
    for path in modules:
        module = {leaf: flat.pop(f"{path}/{leaf}") for leaf in LEAVES}
        magnitude = flat.pop(f"{path}/{MAGNITUDE}", None)
        kernel = flat[f"{path}/kernel"]
        merged = kernel.astype(jnp.float32) + _delta(module)
        if magnitude is not None:  # DoRA: each output column rescaled to its magnitude
            merged = merged * (magnitude.astype(jnp.float32) / jnp.linalg.norm(merged, axis=0))
        flat[f"{path}/kernel"] = merged.astype(kernel.dtype)
    return tree.unflatten(flat)


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any], norms: Mapping[str, jax.Array] | None = None) -> dict:
    """The inverse of `merge`: subtract scale * A @ B and put the adapter's LoRA leaves back.

    A DoRA module's merged weight is (m / n) (W + scale A B) with n = ||W + scale A B||, which W' and the adapter do
    not determine, so DoRA needs `norms`: `dora_norms(params)` taken before merging (PEFT caches them the same way).
    """
    flat, extra = tree.flatten(merged), tree.flatten(adapter)
    modules = _lora_modules(adapter)
    if not modules:
        raise ValueError("unmerge: the adapter holds no LoRA weights")
    for path in modules:
        module = {leaf: extra[f"{path}/{leaf}"] for leaf in LEAVES}
        magnitude = extra.get(f"{path}/{MAGNITUDE}")
        kernel = flat[f"{path}/kernel"]
        w = kernel.astype(jnp.float32)
        if magnitude is not None:
            if norms is None or path not in norms:
                raise ValueError(f"unmerge: {path} is a DoRA module, whose merge cannot be undone from the merged weight alone; "
                                 "pass norms=jpeft.lora.dora_norms(params) computed before merging")
            w = w * (norms[path].astype(jnp.float32) / magnitude.astype(jnp.float32))
            module[MAGNITUDE] = magnitude
        flat[f"{path}/kernel"] = (w - _delta(module)).astype(kernel.dtype)
        flat.update({f"{path}/{leaf}": v for leaf, v in module.items()})
    return tree.unflatten(flat)
