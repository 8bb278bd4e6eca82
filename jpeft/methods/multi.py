"""Many LoRA adapters on one base: stack them so each row of a batch runs its own adapter in one call.

`stack_lora([a, b, c])` turns adapter trees (as `jpeft.split_adapter` returns them) into stacked
leaves `lora_a` (n, in, r_max), `lora_b` (n, r_max, out), `lora_scale` (n,); attach them to the base
and pass `adapter_ids` (batch,) to `t5.forward` / `t5.generate`, and `jpeft.nn.dense` gathers each
row's A, B and scale. Zero padding is exact: a rank-r adapter padded to r_max adds zero columns to A
and zero rows to B, and a module an adapter does not touch gets all zeros (its row sees the base).
To run one adapter for a whole call, keep the unstacked trees and `jpeft.attach(base, adapters[i])`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from jpeft import tree
from jpeft.methods import lora


def _modules(adapter: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    flat = tree.flatten(adapter)
    dora = sorted(p for p in flat if p.endswith(f"/{lora.MAGNITUDE}"))
    if dora:
        raise ValueError(f"stack_lora cannot stack DoRA adapters ({dora[0]}, ...): each row would need its own weight norm "
                         "||W + sBA|| and magnitude; run a DoRA adapter alone (jpeft.attach) or merge it (jpeft.lora.merge)")
    other = sorted(p for p in flat if p.rsplit("/", 1)[-1] not in lora.LEAVES)
    if other:
        raise ValueError(f"stack_lora stacks LoRA adapters only; this adapter also holds {other[:3]}")
    modules: dict[str, dict[str, Any]] = {}
    for path, value in flat.items():
        module, leaf = path.rsplit("/", 1)
        modules.setdefault(module, {})[leaf] = value
    for module, leaves in modules.items():
        if set(leaves) != set(lora.LEAVES) or leaves["lora_a"].ndim != 2:
            raise ValueError(f"stack_lora: {module} needs lora_a (in, r), lora_b (r, out) and lora_scale (); it has "
                             f"{ {k: tuple(v.shape) for k, v in leaves.items()} }")
    return modules


def stack_lora(adapters: Sequence[Mapping[str, Any]]) -> dict:
    """One adapter tree whose LoRA leaves stack `adapters` (index i = adapters[i]); ranks padded with zeros, missing modules zero."""
    per_adapter = [_modules(a) for a in adapters]
    names = sorted({m for mods in per_adapter for m in mods})
    if not names:
        raise ValueError("stack_lora: the adapters hold no LoRA weights")
    flat = {}
    for module in names:
        present = [mods[module] for mods in per_adapter if module in mods]
        (d_in, _), (_, d_out) = present[0]["lora_a"].shape, present[0]["lora_b"].shape
        if any(p["lora_a"].shape[0] != d_in or p["lora_b"].shape[1] != d_out for p in present):
            raise ValueError(f"stack_lora: the adapters disagree on {module}'s input/output sizes: they were trained on different bases")
        r = max(p["lora_a"].shape[1] for p in present)
        dtype = jnp.result_type(*(p[k] for p in present for k in ("lora_a", "lora_b")))
        a, b, scale = [], [], []
        for mods in per_adapter:
            # A module this adapter does not touch gets a zero delta, so its rows see the base there.
            zero = {"lora_a": jnp.zeros((d_in, r), dtype), "lora_b": jnp.zeros((r, d_out), dtype), "lora_scale": 0.0}
            leaves = mods.get(module, zero)
            pad = r - leaves["lora_a"].shape[1]
            a.append(jnp.pad(leaves["lora_a"].astype(dtype), ((0, 0), (0, pad))))
            b.append(jnp.pad(leaves["lora_b"].astype(dtype), ((0, pad), (0, 0))))
            scale.append(jnp.asarray(leaves["lora_scale"], jnp.float32))
        flat.update({f"{module}/lora_a": jnp.stack(a), f"{module}/lora_b": jnp.stack(b), f"{module}/lora_scale": jnp.stack(scale)})
    return tree.unflatten(flat)


def num_stacked(params: Mapping[str, Any]) -> int | None:
    """How many adapters `stack_lora` stacked into `params` (the length of a stacked `lora_scale`); None if none are."""
    sizes = {v.shape[0] for p, v in tree.flatten(params).items() if p.endswith("/lora_scale") and jnp.ndim(v) == 1}
    return max(sizes) if sizes else None
