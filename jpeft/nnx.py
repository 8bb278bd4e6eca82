"""PEFT on unmodified Flax NNX models, in place (`jpeft.integrations.nnx`): inject, attach, merge, unmerge, quantize, register."""

from jpeft.integrations.nnx import LoRAScale, QuantizedWeight, attach, dora_norms, inject, merge, quantize, register, sites, unmerge

__all__ = ["LoRAScale", "QuantizedWeight", "attach", "dora_norms", "inject", "merge", "quantize", "register", "sites", "unmerge"]
