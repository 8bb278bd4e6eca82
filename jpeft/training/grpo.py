"""GRPO with a PEFT model: sampled rollouts (G completions per prompt), rewards, group-normalised advantages and
TRL 1.16's clipped objective with a KL term to the reference, the same base with the PEFT leaves removed.

A rollout batch (`rollout`) holds each prompt G times, left-padded, followed by its sampled completion; the old
policy's and the reference's per-token log-probabilities are taken once per rollout (`score`), then `grpo_loss`
trains on it for several optimizer steps (TRL's `num_iterations`) through `training.make_train_step`.

Shapes: R = prompts x G rows, P prompt slots, C completion slots.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import nn
from jpeft.models import generation, sampling
from jpeft.training import losses, preference
from jpeft.training.batches import IGNORE
from jpeft.training.split import split_adapter

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALES = ("group", "batch", "none")


def advantages(rewards: np.ndarray, group: int, scale: str = "group") -> np.ndarray:
    """TRL's advantages: each reward minus its group's mean, divided by the (unbiased) std + 1e-4 of its group
    (`scale="group"`), of the whole batch (`"batch"`), or not at all (`"none"`, Dr. GRPO's advice)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: choose one of {', '.join(SCALES)}")
    rewards = np.asarray(rewards, np.float32)
    if rewards.ndim != 1 or rewards.size % group:
        raise ValueError(f"{rewards.size} rewards do not split into groups of {group}")
    grouped = rewards.reshape(-1, group)
    centred = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "none":
        return centred
    std = np.repeat(grouped.std(axis=1, ddof=1), group) if scale == "group" else np.full_like(rewards, rewards.std(ddof=1))
    return (centred / (std + np.float32(1e-4))).astype(np.float32)


def check_rewards(values: Any, count: int, group: int = 1, source: str = "the reward function") -> np.ndarray:
    """The rewards as float32 (count,), or an error naming the row (prompt and sample) that is not a finite number."""
    try:
        rewards = np.asarray(values, np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source} must return one number per completion; got {type(values).__name__} ({e})") from None
    if rewards.shape != (count,):
        raise ValueError(f"{source} returned {rewards.size} rewards for {count} completions: one number per completion, in order")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{source} returned {rewards[row]} for completion {row} (prompt {row // group}, sample {row % group}): "
                         "rewards must be finite numbers")
    return rewards.astype(np.float32)


def text_rewards(fn: Callable[..., Sequence[float]], prompts: Sequence[str], completions: Sequence[str], group: int,
                 **columns: Sequence[Any]) -> np.ndarray:
    """`fn(prompts, completions, **columns)` over decoded texts (TRL's reward-function signature; each list has one entry
    per completion, a prompt's repeated G times), checked by `check_rewards`."""
    return check_rewards(fn(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()}), len(completions), group)


def token_rewards(fn: Callable[[Mapping[str, jax.Array]], jax.Array], batch: Mapping[str, Any], group: int) -> np.ndarray:
    """A jitted `fn(batch) -> (R,)` over a rollout batch's tokens (`targets` holds each completion, -100 after it), checked."""
    return check_rewards(jax.jit(fn)({k: jnp.asarray(v) for k, v in batch.items()}), batch["targets"].shape[0], group)


def rollout(module: Any, config: Any, params: Mapping[str, Any], prompts: Sequence[Sequence[int]], *, group: int, max_new_tokens: int,
            sample: sampling.Sampling, key: jax.Array, max_prompt_len: int | None = None, eos_token_id: int | list[int] | None = None,
            dtype: Any = jnp.float32) -> dict[str, np.ndarray]:
    """G sampled completions per prompt with `module.generate` (jitted, KV-cached) -> a batch for `grpo_loss` (without
    advantages): `input_ids` / `attention_mask` (R, P + C) of the left-padded prompt and its completion, `targets` (R, C) of
    the completion tokens up to and including the first EOS (-100 after it), `target_index` (R,)."""
    a = module.arch(config)
    for i, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"prompt {i} is empty: each prompt needs at least one token (BOS)")
        if max_prompt_len is not None and len(p) > max_prompt_len:
            raise ValueError(f"prompt {i} has {len(p)} tokens, more than the budget of {max_prompt_len}: cut it or raise the budget")
    width = generation.bucket(max(map(len, prompts)))
    ids = np.full((len(prompts), width), a.pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = np.asarray(module.generate(config, params, ids, mask, max_new_tokens=max_new_tokens, sample=sample, key=key,
                                     num_return_sequences=group, eos_token_id=eos_token_id, dtype=dtype))
    eos = a.eos_token_ids if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
    is_eos = np.isin(out, eos)
    keep = np.cumsum(is_eos, axis=1) - is_eos == 0  # up to and including the first EOS (TRL's completion_mask)
    return completion_batch(np.repeat(ids, group, axis=0), np.repeat(mask, group, axis=0), out, keep)


def completion_batch(prompt_ids: np.ndarray, prompt_mask: np.ndarray, completions: np.ndarray, completion_mask: np.ndarray) -> dict[str, np.ndarray]:
    """`training.target_hidden`'s layout for left-padded prompts (R, P) followed by completions (R, C)."""
    R, P = prompt_ids.shape
    C = completions.shape[1]
    return {"input_ids": np.concatenate([prompt_ids, completions], axis=1).astype(np.int32),
            "attention_mask": np.concatenate([prompt_mask, completion_mask], axis=1).astype(np.int32),
            "targets": np.where(completion_mask > 0, completions, IGNORE).astype(np.int32),
            "target_index": (np.arange(R) * (P + C) + P).astype(np.int32)}


def score(config: Any, temperature: float = 1.0, dtype: Any = jnp.float32, old: bool = True, reference: bool = True) -> Callable:
    """A jitted `(params, batch) -> {"old_logps", "ref_logps"}` (each (R, C)): the policy's per-token log-probabilities
    at rollout time (needed when it trains on the rollout more than once) and the reference's (the PEFT leaves removed,
    needed when beta > 0), both of logits / temperature as TRL computes them."""
    model, a = preference._decoder(config, "grpo.score")

    def run(params, batch):
        out = {}
        if old:
            out["old_logps"] = preference.token_logps(model, a, params, batch, nn.Ctx(dtype=dtype), temperature)[0]
        if reference:
            out["ref_logps"] = preference.token_logps(model, a, split_adapter(params)[0], batch, nn.Ctx(dtype=dtype), temperature)[0]
        return out

    return jax.jit(run)


def check_settings(beta: float, epsilon: float, epsilon_high: float | None, loss_type: str, temperature: float) -> None:
    """Refuse, naming it, a GRPO setting `grpo_loss` cannot run."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    for name, value in (("beta", beta), ("epsilon", epsilon), ("epsilon_high", epsilon if epsilon_high is None else epsilon_high)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be positive (the rollout's sampling temperature)")


def grpo_loss(config: Any, beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None, loss_type: str = "dapo", *,
              temperature: float = 1.0, max_completion_length: int | None = None, dtype: Any = jnp.float32, lora_dropout: float = 0.0,
              remat: bool = False) -> Callable:
    """TRL GRPOTrainer's `_compute_loss` as `loss(params, batch, rng) -> scalar` (with `.with_metrics`), for `make_train_step`.

    Per completion token: -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * KL, ratio =
    pi / pi_old and KL = exp(ref - logp) - (ref - logp) - 1; averaged per sequence then over sequences (`grpo`), over
    the batch's completion tokens (`dapo`, or `batch["num_items"]` of the whole generation batch), or divided by rows x
    `max_completion_length` (`dr_grpo`; default: the batch's completion width). The batch is a `rollout` batch with
    `advantages` (R,), and `old_logps` / `ref_logps` (R, C) from `score`: without `old_logps` the policy is its own old
    policy (one step per rollout, TRL's shortcut); with beta > 0 and no `ref_logps` the reference is computed in the step.
    Metrics: kl, clip_ratio/low_mean, clip_ratio/high_mean, clip_ratio/region_mean (TRL's).
    """
    check_settings(beta, epsilon, epsilon_high, loss_type, temperature)
    low, high = epsilon, epsilon if epsilon_high is None else epsilon_high
    model, a = preference._decoder(config, "grpo_loss")

    def with_metrics(params, batch, rng):
        missing = [k for k in ("input_ids", "targets", "target_index", "advantages") if k not in batch]
        if missing:
            raise KeyError(f"grpo_loss needs batch keys {missing} (got {sorted(batch)}): build the batch with jpeft.training.grpo.rollout "
                           "and add advantages=grpo.advantages(rewards, group)")
        ctx = nn.Ctx(dtype=dtype, rng=rng, dropout_rate=a.attention_dropout, lora_dropout=lora_dropout, remat=remat)
        logp, _ = preference.token_logps(model, a, params, batch, ctx, temperature)  # (R, C)
        mask = (batch["targets"] != IGNORE).astype(jnp.float32)
        adv = batch["advantages"][:, None]
        old = batch["old_logps"] if "old_logps" in batch else jax.lax.stop_gradient(logp)
        ratio = jnp.exp(logp - old)
        per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - low, 1 + high) * adv)
        metrics = {}
        if beta:
            if "ref_logps" in batch:
                ref = batch["ref_logps"]
            else:
                ref = preference.token_logps(model, a, split_adapter(params)[0], batch, nn.Ctx(dtype=dtype), temperature)[0]
            diff = jax.lax.stop_gradient(ref) - logp
            kl = jnp.exp(diff) - diff - 1
            per_token = per_token + beta * kl
            metrics["kl"] = jnp.sum(kl * mask) / jnp.maximum(mask.sum(), 1)
        masked = per_token * mask
        if loss_type == "grpo":
            loss = jnp.mean(masked.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1))
        elif loss_type == "dapo":
            loss = masked.sum() / jnp.maximum(batch.get("num_items", mask.sum()), 1)
        else:
            loss = masked.sum() / (mask.shape[0] * (max_completion_length or mask.shape[1]))
        low_clip, high_clip = (ratio < 1 - low) & (adv < 0), (ratio > 1 + high) & (adv > 0)
        for name, clipped in (("low", low_clip), ("high", high_clip), ("region", low_clip | high_clip)):
            metrics[f"clip_ratio/{name}_mean"] = jnp.sum(clipped * mask) / jnp.maximum(mask.sum(), 1)
        return loss, jax.lax.stop_gradient(metrics)

    def loss(params, batch, rng):
        return with_metrics(params, batch, rng)[0]

    loss.with_metrics = with_metrics
    return loss
