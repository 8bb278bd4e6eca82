"""PEFT on unmodified Flax NNX models, in place (`jpeft.integrations.nnx`): inject, merge, unmerge, register."""

from jpeft.integrations.nnx import LoRAScale, inject, merge, register, sites, unmerge

__all__ = ["LoRAScale", "inject", "merge", "register", "sites", "unmerge"]
