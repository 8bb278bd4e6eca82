"""PEFT on unmodified Flax NNX models, in place (`jpeft.integrations.nnx`): inject, attach, merge, unmerge, register."""

from jpeft.integrations.nnx import LoRAScale, attach, inject, merge, register, sites, unmerge

__all__ = ["LoRAScale", "attach", "inject", "merge", "register", "sites", "unmerge"]
