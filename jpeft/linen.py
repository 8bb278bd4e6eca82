"""PEFT on unmodified Flax Linen models (`jpeft.integrations.linen`): inject, apply, merge, unmerge, register."""

from jpeft.integrations.linen import apply, inject, merge, register, sites, unmerge

__all__ = ["apply", "inject", "merge", "register", "sites", "unmerge"]
