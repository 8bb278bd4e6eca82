"""What LoHa and LoKr share (HF PEFT's `LycorisConfig`): the config's common fields and the Kaiming-uniform init."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax

from jpeft import nn
from jpeft import targets as tg


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


def kaiming(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """torch's kaiming_uniform_(a=sqrt(5)) on PEFT's tensor, which is this (in-first) leaf transposed:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with PEFT's fan_in (its columns) our rows."""
    return nn.torch_uniform(key, shape, shape[0], dtype)
