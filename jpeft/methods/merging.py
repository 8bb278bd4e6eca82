"""Adapter arithmetic: several LoRA adapters combined into one, as HF PEFT's `LoraModel.add_weighted_adapter` does.

`merge_adapters([a, b], [0.7, 0.3], "ties", density=0.5)` takes adapter trees (as `jpeft.split_adapter` returns
them) and returns an ordinary LoRA adapter tree: attach it, save it, merge it or stack it like any other.
The combinations, their names and their results are PEFT 0.22's:

- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` combine the A's and the B's separately,
  adapter i weighted by sqrt(|w_i s_i|) (its sign on A only); all adapters need the same rank.
- `cat` concatenates A_i w_i s_i and B_i along the rank, zero-padded to the sum of the adapters' ranks: exact.
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` combine the full deltas
  s_i A_i B_i and keep the top `svd_rank` singular triplets (B = U S, A = V^T), optionally clamped at the
  `svd_clamp` quantile.

The merged adapter's scale is 1, since each adapter's own scale is folded into the combined A and B. (PEFT before 0.22
kept the first adapter's use_rslora, which made the merged scale sqrt(r) where that adapter used rsLoRA; 0.22 fixed
it, and jpeft follows.) A single adapter is always combined `linear`, as in PEFT.
DARE drops entries at random: PEFT draws with torch.bernoulli, jpeft with `jax.random.bernoulli` from `key`,
one mask per (module, part, adapter) given by `dare_mask(mask_key(key, module, part, i), density, shape)`.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jpeft import tree
from jpeft.methods import lora

LINEAR_LIKE = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = (*LINEAR_LIKE, "cat", *SVD)
SIGN_METHODS = ("total", "frequency")
PARTS = ("lora_a", "lora_b", "delta")  # what DARE prunes: the A's and B's (linear-like) or the deltas (svd)


# ----------------------------------------------------------------------------------------------
# PEFT's merge_utils on stacked task tensors (n, ...)


def dare_mask(key: jax.Array, density: float, shape: tuple[int, ...]) -> jax.Array:
    """DARE's keep-mask: 1 with probability `density`, else 0 (float32, like torch.bernoulli's)."""
    return jax.random.bernoulli(key, density, shape).astype(jnp.float32)


def mask_key(key: jax.Array, module: str, part: str, index: int) -> jax.Array:
    """The key of DARE's mask for adapter `index`'s `part` ("lora_a", "lora_b" or "delta") of a dotted module."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, zlib.crc32(module.encode())), PARTS.index(part)), index)


def magnitude_based_pruning(tensor: jax.Array, density: float) -> jax.Array:
    """Keep the int(density * size) entries largest in magnitude, zero the rest."""
    k = int(density * tensor.size)
    flat = tensor.reshape(-1)
    keep = jnp.zeros(flat.shape, tensor.dtype).at[jax.lax.top_k(jnp.abs(flat), k)[1]].set(1)
    return tensor * keep.reshape(tensor.shape)


def random_pruning(tensor: jax.Array, density: float, mask: jax.Array) -> jax.Array:
    """DARE: the entries `mask` keeps, rescaled by 1/density to preserve the expectation."""
    return tensor * mask.astype(tensor.dtype) / density


def calculate_majority_sign_mask(stacked: jax.Array, method: str = "total") -> jax.Array:
    """Where each task tensor's sign agrees with the elected sign (of the sum, or of the sign count; ties -> +)."""
    sign = jnp.sign(stacked)
    magnitude = stacked.sum(axis=0) if method == "total" else sign.sum(axis=0)
    return sign == jnp.where(magnitude >= 0, 1, -1)


def disjoint_merge(stacked: jax.Array, majority: jax.Array) -> jax.Array:
    """The mean of the agreeing entries (sum over agreeing / their count, at least 1)."""
    return (stacked * majority).sum(axis=0) / jnp.maximum(majority.sum(axis=0), 1.0)


def combine_tensors(method: str, tensors: Sequence[jax.Array], weights: jax.Array, density: float | None = None,
                    majority_sign_method: str = "total", masks: Sequence[jax.Array] | None = None) -> jax.Array:
    """PEFT's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune (`method` "linear" = task_arithmetic).

    `masks` are DARE's keep-masks, one per tensor; density >= 1 prunes nothing, as in PEFT.
    """
    if method in ("ties", "magnitude_prune") and density < 1:
        tensors = [magnitude_based_pruning(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties") and density < 1:
        tensors = [random_pruning(t, density, m) for t, m in zip(tensors, masks)]
    stacked = jnp.stack(tensors)
    weighted = stacked * weights.reshape((-1,) + (1,) * (stacked.ndim - 1))
    if method in ("ties", "dare_ties"):
        return disjoint_merge(weighted, calculate_majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# Adapter trees


def _lora_modules(adapter: Mapping[str, Any], index: int) -> dict[str, dict[str, jax.Array]]:
    """{dotted module: {lora_a, lora_b, lora_scale}} of one adapter; an error for anything that is not plain 2-D LoRA."""
    modules: dict[str, dict[str, jax.Array]] = {}
    for path, value in tree.flatten(adapter).items():
        module, _, leaf = path.rpartition("/")
        name = module.replace("/", ".")
        if leaf not in lora.LEAVES:
            raise ValueError(f"merge_adapters combines LoRA adapters only; adapter {index} holds {leaf!r} at {name or 'the top level'} "
                             "(IA3, prompt tuning and bottleneck adapters have no weighted combination in PEFT)")
        modules.setdefault(name, {})[leaf] = value
    for name, leaves in modules.items():
        if set(leaves) != set(lora.LEAVES) or jnp.ndim(leaves["lora_a"]) != 2 or jnp.ndim(leaves["lora_scale"]) != 0:
            shapes = {k: tuple(jnp.shape(v)) for k, v in leaves.items()}
            raise ValueError(f"merge_adapters: adapter {index}'s {name} needs lora_a (in, r), lora_b (r, out) and lora_scale (); "
                             f"it has {shapes} (stacked or Flax-layer LoRA leaves cannot be combined)")
    if not modules:
        raise ValueError(f"merge_adapters: adapter {index} holds no LoRA weights")
    return modules


def _check_args(n: int, weights, combination, density, majority_sign_method, svd_rank, svd_clamp, key) -> None:
    if n == 0:
        raise ValueError("merge_adapters needs at least one adapter")
    if len(weights) != n:
        raise ValueError(f"merge_adapters: {len(weights)} weights for {n} adapters; give one weight per adapter")
    if combination not in COMBINATIONS:
        raise ValueError(f"unknown combination {combination!r}; choose one of {list(COMBINATIONS)}")
    needs_density = combination not in ("linear", "cat", "svd")
    if density is None and needs_density:
        raise ValueError(f"combination {combination!r} needs density, the fraction of entries kept, in (0, 1]")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {density}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {list(SIGN_METHODS)}, got {majority_sign_method!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"svd_rank must be a positive int, got {svd_rank!r}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ValueError(f"svd_clamp is a quantile in [0, 1], got {svd_clamp}")
    if combination.startswith("dare") and key is None:
        raise ValueError(f"combination {combination!r} prunes at random: pass key=jax.random.key(...)")


def _check_shapes(name: str, present: Sequence[tuple[int, Mapping[str, jax.Array]]], same_rank: bool) -> None:
    shapes = {i: (m["lora_a"].shape[0], m["lora_b"].shape[1]) for i, m in present}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"merge_adapters: the adapters disagree on {name}'s (in, out) sizes {shapes}: they were trained on different bases")
    ranks = {i: m["lora_a"].shape[1] for i, m in present}
    if same_rank and len(set(ranks.values())) > 1:
        raise ValueError(f"merge_adapters: {name} has ranks {ranks} (adapter: rank); the linear-like combinations "
                         f"{list(LINEAR_LIKE)} need equal ranks: use 'cat' or an svd combination")


def _linear_like(method, name, present, weights, density, majority_sign_method, key):
    """PEFT's _generalized_task_arithmetic_weighted_adapter: sqrt(|w s|) on A (with the sign) and on B."""
    scaled = jnp.stack([weights[i] * m["lora_scale"] for i, m in present]).astype(jnp.float32)
    root = jnp.sqrt(jnp.abs(scaled))
    part_weights = {"lora_a": root * jnp.where(scaled >= 0, 1.0, -1.0), "lora_b": root}
    out = {}
    for part, w in part_weights.items():
        tensors = [m[part].astype(jnp.float32) for _, m in present]
        masks = None if key is None else [dare_mask(mask_key(key, name, part, i), density, t.shape) for (i, _), t in zip(present, tensors)]
        out[part] = combine_tensors(method, tensors, w, density, majority_sign_method, masks)
    return out["lora_a"], out["lora_b"]


def _cat(present, weights, rank):
    """A_i w_i s_i and B_i concatenated along the rank, zero-padded to `rank` (PEFT's new adapter's r)."""
    a = jnp.concatenate([m["lora_a"].astype(jnp.float32) * weights[i] * m["lora_scale"] for i, m in present], axis=1)
    b = jnp.concatenate([m["lora_b"].astype(jnp.float32) for _, m in present], axis=0)
    pad = rank - a.shape[1]
    return jnp.pad(a, ((0, 0), (0, pad))), jnp.pad(b, ((0, pad), (0, 0)))


def _svd(combination, name, present, weights, rank, density, majority_sign_method, clamp, full_matrices, key):
    """PEFT's _svd_generalized_task_arithmetic_weighted_adapter: combine the deltas, keep the top `rank` triplets."""
    method = "linear" if combination == "svd" else combination[: -len("_svd")]
    deltas = [m["lora_scale"] * (m["lora_a"].astype(jnp.float32) @ m["lora_b"].astype(jnp.float32)) for _, m in present]
    masks = None if key is None else [dare_mask(mask_key(key, name, "delta", i), density, d.shape) for (i, _), d in zip(present, deltas)]
    w = jnp.asarray([weights[i] for i, _ in present], jnp.float32)
    delta = combine_tensors(method, deltas, w, density, majority_sign_method, masks)
    if rank > min(delta.shape):
        raise ValueError(f"merge_adapters: svd rank {rank} exceeds {name}'s min(in, out) = {min(delta.shape)}; pass a smaller svd_rank")
    # PEFT factors the (out, in) torch weight; the same matrix here keeps its singular vectors' signs.
    u, s, vh = jnp.linalg.svd(delta.T, full_matrices=full_matrices)
    u, vh = u[:, :rank] * s[:rank], vh[:rank]
    if clamp is not None:
        hi = jnp.quantile(jnp.concatenate([u.reshape(-1), vh.reshape(-1)]), clamp)
        u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    return vh.T, u.T


def merge_adapters(
    adapters: Sequence[Mapping[str, Any]],
    weights: Sequence[float],
    combination: str = "svd",
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    key: jax.Array | None = None,
) -> dict:
    """One LoRA adapter tree combining `adapters` with `weights`, as PEFT's `add_weighted_adapter(combination_type=...)`."""
    _check_args(len(adapters), weights, combination, density, majority_sign_method, svd_rank, svd_clamp, key)
    per_adapter = [_lora_modules(a, i) for i, a in enumerate(adapters)]
    combination = "linear" if len(adapters) == 1 else combination
    # PEFT sizes the new adapter from each adapter's largest rank (r or its rank_pattern's).
    ranks = [max(m["lora_a"].shape[1] for m in mods.values()) for mods in per_adapter]
    linear_like = combination in LINEAR_LIKE
    if linear_like and len(set(ranks)) > 1:
        raise ValueError(f"merge_adapters: the adapters have ranks {ranks}; {combination!r} needs equal ranks: use 'cat' or an svd combination")
    rank = sum(ranks) if combination == "cat" else svd_rank or max(ranks)
    key = key if combination.startswith("dare") else None
    flat = {}
    scale = jnp.asarray(1.0, jnp.float32)  # each adapter's scale is folded into the combined A and B
    for name in sorted({m for mods in per_adapter for m in mods}):
        present = [(i, mods[name]) for i, mods in enumerate(per_adapter) if name in mods]
        _check_shapes(name, present, linear_like)
        dtype = jnp.result_type(*(m[k] for _, m in present for k in ("lora_a", "lora_b")))
        if linear_like:
            a, b = _linear_like(combination, name, present, weights, density, majority_sign_method, key)
        elif combination == "cat":
            a, b = _cat(present, weights, rank)
        else:
            a, b = _svd(combination, name, present, weights, rank, density, majority_sign_method, svd_clamp, svd_full_matrices, key)
        path = name.replace(".", "/")
        flat.update({f"{path}/lora_a": a.astype(dtype), f"{path}/lora_b": b.astype(dtype), f"{path}/lora_scale": scale})
    return tree.unflatten(flat)
