"""PEFT on unmodified Flax Linen models (`jpeft.integrations.linen`): inject, apply, merge, unmerge, quantize, register."""

from jpeft.integrations.linen import apply, dora_norms, inject, merge, quantize, register, sites, unmerge

__all__ = ["apply", "dora_norms", "inject", "merge", "quantize", "register", "sites", "unmerge"]
