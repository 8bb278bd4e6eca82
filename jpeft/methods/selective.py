"""Selective fine-tuning: choose existing leaves to train (layer norms, position bias, named modules, last blocks)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jpeft import targets as tg
from jpeft import tree

NORMS = ("layer_norm", "final_layer_norm", "input_layernorm", "post_attention_layernorm", "norm",
         "pre_feedforward_layernorm", "post_feedforward_layernorm", "q_norm", "k_norm")  # the last four: Gemma's
BLOCK_LISTS = ("block", "layers")


@dataclasses.dataclass(frozen=True)
class SelectiveConfig:
    """Which existing weights train. `target_modules` uses HF PEFT's matching rules on module names."""

    target_modules: tg.Targets = ()
    layer_norms: bool = False
    relative_attention_bias: bool = False
    last_n_blocks: int | None = None

    def __post_init__(self):
        if self.last_n_blocks is not None and self.last_n_blocks <= 0:
            raise ValueError(f"last_n_blocks must be positive, got {self.last_n_blocks}")


def _block_index(parts: list[str]) -> tuple[str, int] | None:
    """('encoder/block', 3) for a path inside block 3 of the encoder's block list."""
    for i, part in enumerate(parts[:-1]):
        if part in BLOCK_LISTS and parts[i + 1].isdigit():
            return "/".join(parts[: i + 1]), int(parts[i + 1])
    return None


def selected_paths(params: Mapping[str, Any], cfg: SelectiveConfig) -> list[str]:
    """Leaf paths that `cfg` makes trainable; an error if it selects nothing, or if a target_modules entry names no module."""
    flat = tree.flatten(params)
    if cfg.target_modules:
        tg.select(tg.module_paths(params), cfg.target_modules, "target_modules")
    depth: dict[str, int] = {}
    for path in flat:
        found = _block_index(path.split("/"))
        if found:
            depth[found[0]] = max(depth.get(found[0], 0), found[1] + 1)
    chosen = []
    for path in flat:
        parts = path.split("/")
        module = ".".join(parts[:-1])
        block = _block_index(parts)
        if (
            (cfg.target_modules and (tg.matches(cfg.target_modules, module) or tg.within(_as_list(cfg.target_modules), module)))
            or (cfg.layer_norms and parts[-2] in NORMS)
            or (cfg.relative_attention_bias and "relative_attention_bias" in parts)
            or (cfg.last_n_blocks and block is not None and block[1] >= depth[block[0]] - cfg.last_n_blocks)
        ):
            chosen.append(path)
    if not chosen:
        raise ValueError(f"{cfg} selects no parameters; module names in this model: {sorted({p.split('/')[-2] for p in flat})}")
    return chosen


def _as_list(targets: tg.Targets) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)
