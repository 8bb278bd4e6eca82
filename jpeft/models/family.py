"""A decoder-only model family as a value: what the shared decoder (`jpeft.models.causal_lm`) needs from `llama`,
`gemma` or `moe`, and the one lookup from a config or model_type to its family.

Each family module declares its `FAMILY = Family(...)` once and passes it down to `causal_lm`; nothing calls back
into a module. This module imports none of them: `of` imports them by name when asked.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any, Callable, Mapping

MODULES = ("jpeft.models.llama", "jpeft.models.gemma", "jpeft.models.moe")  # each declares its FAMILY


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static argument of the jitted generation loop
class Family:
    """A decoder-only family: its model types and the functions the shared forward pass, loss, generation loop and
    checkpoint plumbing call (see `jpeft.models.causal_lm`'s docstring for their signatures)."""

    name: str  # "llama", "gemma" or "moe": the module jpeft.models.<name> holds its public functions
    causal_lm: Mapping[str, str]  # model_type -> transformers class written to a saved config.json
    model_types: tuple[str, ...]  # every model_type it reads (may include wrappers such as gemma3, absent from causal_lm)
    arch: Callable[[Any], Any]  # a transformers config (or resolved Arch) -> the resolved, hashable Arch
    param_shapes: Callable[..., dict[str, tuple[int, ...]]]  # (config, tie_word_embeddings=None) -> {tree path: shape}
    config_from_dict: Callable[..., Any]  # (config.json dict, source) -> transformers config
    embed: Callable[..., Any]
    decoder: Callable[..., Any]
    lm_head: Callable[..., Any]
    stack_experts: Callable[..., dict] | None = None  # (config, state, source): per-expert checkpoint tensors -> stacks
    per_expert: Callable[..., dict] | None = None  # (config, state): the inverse, for what transformers saves

    @property
    def module(self) -> ModuleType:
        """jpeft.models.<name>: the family's public functions (`forward`, `generate`, `init_params`, `load_pretrained`, ...)."""
        return importlib.import_module(f"jpeft.models.{self.name}")


def of(config_or_model_type: Any) -> Family:
    """The family of a decoder-only transformers config, resolved Arch or model_type string (a config without a
    model_type reads as Llama, as `llama.arch` does); ValueError naming the supported types otherwise."""
    model_type = config_or_model_type if isinstance(config_or_model_type, str) else getattr(config_or_model_type, "model_type", "llama")
    families = [importlib.import_module(name).FAMILY for name in MODULES]  # imported here, so no module imports another's
    for family in families:
        if model_type in family.model_types:
            return family
    raise ValueError(f"model_type {model_type!r} is not a decoder-only model jpeft implements "
                     f"({[t for family in families for t in family.model_types]})")
