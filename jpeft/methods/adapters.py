"""Bottleneck adapters (Houlsby 2019, Pfeiffer 2020): h + up(relu(down(h))) on a module's output.

Leaves live at `<module>/adapter/{down,up}/{kernel,bias}`; the up-projection starts at zero so an
untrained adapter is the identity. Houlsby places one after every attention module and after the
feed-forward block; Pfeiffer only after the feed-forward block.

On a Flax model (`jpeft.linen`, `jpeft.nnx`), whose blocks jpeft cannot name, `target_modules` chooses the layers an
adapter follows (Houlsby: the attention output projection and the feed-forward output; Pfeiffer: the latter alone),
and each adapter sits at `<layer>/adapter` on that layer's output.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jpeft import leaves, nn, quant
from jpeft import targets as tg

ATTENTION = ("SelfAttention", "EncDecAttention", "self_attn")
FEED_FORWARD = ("DenseReluDense", "mlp")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """`kind` "houlsby" or "pfeiffer"; bottleneck width = d_model // reduction_factor."""

    kind: str = "houlsby"
    reduction_factor: int = 16
    target_modules: tg.Targets | None = None  # Flax models: the layers whose output an adapter follows

    def __post_init__(self):
        if self.kind not in ("houlsby", "pfeiffer"):
            raise ValueError(f"unknown adapter kind {self.kind!r}; choose 'houlsby' or 'pfeiffer'")
        if self.reduction_factor <= 0:
            raise ValueError(f"reduction_factor must be positive, got {self.reduction_factor}")


def _output_dim(module: Mapping[str, Any]) -> int:
    for name in ("o", "o_proj", "wo", "down_proj"):
        if name in module:
            return quant.weight_shape(module[name])[1]
    raise ValueError(f"cannot find the output projection among {sorted(module)}")


def new_adapter(d: int, cfg: AdapterConfig, key: jax.Array) -> dict:
    """One adapter on a d-wide output: down (d, d // reduction_factor) torch-uniform, up zero (so it starts as the identity)."""
    width = max(1, d // cfg.reduction_factor)
    return {"down": {"kernel": nn.torch_uniform(key, (d, width), d), "bias": jnp.zeros((width,))},
            "up": {"kernel": jnp.zeros((width, d)), "bias": jnp.zeros((d,))}}


def inject(params: Mapping[str, Any], cfg: AdapterConfig, key: jax.Array) -> dict:
    """A new tree with a bottleneck adapter after each chosen module."""
    if cfg.target_modules is not None:
        raise ValueError("AdapterConfig.target_modules chooses layers on Flax models (jpeft.linen / jpeft.nnx); on jpeft's own "
                         "models the adapters' places follow `kind` (houlsby / pfeiffer): leave target_modules=None")
    kinds = FEED_FORWARD + (ATTENTION if cfg.kind == "houlsby" else ())
    names = sorted({m.replace("/", ".") for m in _modules_named(params, kinds)})
    if not names:
        raise ValueError(f"no {kinds} modules found for adapters")
    updates = {}
    for i, name in enumerate(names):
        module = tg.get_module(params, name)
        if "adapter" in module:
            raise ValueError(f"{name} already has an adapter")
        updates[name] = {"adapter": new_adapter(_output_dim(module), cfg, jax.random.fold_in(key, i))}
    return tg.replace_modules(params, updates)


def _modules_named(params: Mapping[str, Any], kinds: tuple[str, ...], prefix: str = "") -> list[str]:
    found = []
    for k, v in params.items():
        if isinstance(v, Mapping):
            path = f"{prefix}/{k}" if prefix else k
            found += [path] if k in kinds else _modules_named(v, kinds, path)
    return found


METHOD = leaves.declare(leaves.Module("adapters", subtrees=("adapter",)))
