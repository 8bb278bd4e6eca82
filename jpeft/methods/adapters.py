"""Bottleneck adapters (Houlsby 2019, Pfeiffer 2020): h + up(relu(down(h))) on a module's output.

Leaves live at `<module>/adapter/{down,up}/{kernel,bias}`; the up-projection starts at zero so an
untrained adapter is the identity. Houlsby places one after every attention module and after the
feed-forward block; Pfeiffer only after the feed-forward block.
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


def inject(params: Mapping[str, Any], cfg: AdapterConfig, key: jax.Array) -> dict:
    """A new tree with a bottleneck adapter after each chosen module."""
    kinds = FEED_FORWARD + (ATTENTION if cfg.kind == "houlsby" else ())
    names = sorted({m.replace("/", ".") for m in _modules_named(params, kinds)})
    if not names:
        raise ValueError(f"no {kinds} modules found for adapters")
    updates = {}
    for i, name in enumerate(names):
        module = tg.get_module(params, name)
        if "adapter" in module:
            raise ValueError(f"{name} already has an adapter")
        d = _output_dim(module)
        width = max(1, d // cfg.reduction_factor)
        down = nn.torch_uniform(jax.random.fold_in(key, i), (d, width), d)
        updates[name] = {"adapter": {
            "down": {"kernel": down, "bias": jnp.zeros((width,))},
            "up": {"kernel": jnp.zeros((width, d)), "bias": jnp.zeros((d,))},
        }}
    return tg.replace_modules(params, updates)


def _modules_named(params: Mapping[str, Any], kinds: tuple[str, ...], prefix: str = "") -> list[str]:
    found = []
    for k, v in params.items():
        if isinstance(v, Mapping):
            path = f"{prefix}/{k}" if prefix else k
            found += [path] if k in kinds else _modules_named(v, kinds, path)
    return found


METHOD = leaves.declare(leaves.Module("adapters", subtrees=("adapter",)))
