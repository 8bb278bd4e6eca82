"""Preference tuning: DPO and its family (IPO, hinge, robust), SimPO and ORPO, as TRL 1.16 computes them.

A PEFT model carries its own reference: the same frozen base with the PEFT leaves removed (`split_adapter`), as
TRL with PEFT switches the adapter off. The reference log-probabilities are computed in the same jitted step from
the same base arrays (never a second copy), or once per dataset beforehand (`precompute_reference`, TRL's
`precompute_ref_log_probs`). Batches come from `jpeft.batches.preference_batch`: 2E sequences, the E chosen first.

Shapes: E pairs, S = 2E sequences, T target slots per sequence, D hidden.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jpeft import nn
from jpeft.models import family
from jpeft.training import losses
from jpeft.training.batches import IGNORE
from jpeft.training.split import split_adapter

KINDS = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")  # scored by the policy alone: no reference pass


def _decoder(config: Any, fn: str) -> tuple[Any, Any]:
    """(model family, resolved Arch) of a decoder-only config; an encoder-decoder one is refused by name."""
    losses._check_family(config, fn, encoder_decoder=False)
    model = family.of(config)
    return model, model.arch(config)


def token_logps(model: Any, a: Any, params: Mapping[str, Any], batch: Mapping[str, jax.Array], ctx: nn.Ctx,
                temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(log-probability of each target token (S, T), each target position's mean logit (S, T)); 0 on padding."""
    hidden = losses.target_hidden(model, a, params, batch, ctx)  # (S, T, D)
    head = lambda h, i: model.lm_head(a, params, h, ctx.part(i))  # noqa: E731  (a LoRA'd head drops per chunk)
    logp, mean = losses.head_token_logps(head, hidden.reshape(-1, hidden.shape[-1]), batch["targets"].reshape(-1), temperature)
    return logp.reshape(batch["targets"].shape), mean.reshape(batch["targets"].shape)


def completion_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
    """(S, T) bool: the target slots that hold completion tokens (not padding, not a scored prompt)."""
    real = batch["targets"] != IGNORE
    if "completion_start" not in batch:
        return real
    return real & (jnp.arange(real.shape[1])[None, :] >= batch["completion_start"][:, None])


def reference_logps(config: Any, dtype: Any = jnp.float32) -> Callable[[Mapping[str, Any], Mapping[str, jax.Array]], jax.Array]:
    """A jitted `(params, batch) -> (S,)` summed completion log-probabilities under the base alone (PEFT leaves removed).

    For `precompute_reference`: run it once over the dataset with the untrained tree, and pass its chosen (first E)
    and rejected (last E) halves to `preference_batch(ref_chosen_logps=..., ref_rejected_logps=...)`.
    """
    model, a = _decoder(config, "reference_logps")
    return jax.jit(lambda params, batch: _reference(model, a, params, batch, dtype))


def _reference(model, a, params, batch, dtype) -> jax.Array:
    base, _ = split_adapter(params)  # the same arrays, without the adapter: no copy of the base is made
    logp, _ = token_logps(model, a, base, batch, nn.Ctx(dtype=dtype))
    return jnp.sum(jnp.where(completion_mask(batch), logp, 0.0), axis=1)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x < 0, branching at -ln 2 as TRL's `log1mexp` does."""
    return jnp.where(x < -math.log(2), jnp.log1p(-jnp.exp(x)), jnp.log(-jnp.expm1(x)))


def check_settings(kind: str, beta: float, label_smoothing: float = 0.0) -> None:
    """Refuse, naming it, a loss kind or setting `preference_loss` cannot run."""
    if kind not in KINDS:
        raise ValueError(f"unknown preference loss {kind!r}; choose one of {', '.join(KINDS)}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta!r} must be a positive number")
    limit = 0.5 if kind == "robust" else 1.0
    if not 0 <= label_smoothing < limit:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, {limit}) for {kind!r}")


def preference_loss(config: Any, kind: str = "sigmoid", beta: float = 0.1, *, label_smoothing: float = 0.0, gamma: float = 0.5,
                    sft_weight: float = 0.0, precompute_reference: bool = False, dtype: Any = jnp.float32, lora_dropout: float = 0.0,
                    remat: bool = False) -> Callable:
    """A preference loss `loss(params, batch, rng) -> scalar` with `causal_lm_loss`'s contract, for `make_train_step`.

    `kind`: TRL DPOTrainer's `sigmoid` (DPO), `ipo` (per-token averaged, as TRL), `hinge`, `robust` (label-smoothed,
    `label_smoothing`); CPOTrainer's `simpo` (reference-free, length-normalised, margin `gamma`, plus `sft_weight` x the
    chosen completions' cross-entropy, CPO's `cpo_alpha`); ORPOTrainer's `orpo` (reference-free: the chosen sequences'
    cross-entropy, prompt included, minus beta x log sigmoid(log odds ratio); its batches need `score_prompt=True`).
    `params` is the tree with its PEFT leaves; the reference is that tree without them, in this same step, or
    `batch["ref_logps"]` with `precompute_reference=True`. `loss.with_metrics(params, batch, rng) -> (loss, metrics)`
    also returns TRL's metrics (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected, logits/chosen, logits/rejected, and ORPO's / SimPO's nll_loss, log_odds_ratio, log_odds_chosen);
    `make_train_step(loss, tx, with_metrics=True)` carries them out of the jitted step. The logits metrics are the
    mean logit over completion tokens for every kind (DPOTrainer's; CPO and ORPO average over every padded position).
    """
    check_settings(kind, beta, label_smoothing)
    model, a = _decoder(config, "preference_loss")
    needs_reference = kind not in REFERENCE_FREE

    def with_metrics(params, batch, rng):
        losses._check_batch(batch, ("input_ids", "targets", "target_index"), "preference_loss", "preference_batch")
        if kind == "orpo" and "completion_start" not in batch:
            raise KeyError("ORPO's cross-entropy covers the prompt too (as TRL's ORPOTrainer): build the batch with "
                           "jpeft.batches.preference_batch(..., score_prompt=True)")
        if needs_reference and precompute_reference and "ref_logps" not in batch:
            raise KeyError("precompute_reference=True reads batch['ref_logps']: compute them with jpeft.preference.reference_logps and "
                           "pass them to preference_batch(ref_chosen_logps=..., ref_rejected_logps=...)")
        ctx = nn.Ctx(dtype=dtype, rng=rng, dropout_rate=a.attention_dropout, lora_dropout=lora_dropout, remat=remat)
        logp, mean_logit = token_logps(model, a, params, batch, ctx)
        completion = completion_mask(batch)
        count = jnp.maximum(completion.sum(axis=1), 1)
        logps = jnp.sum(jnp.where(completion, logp, 0.0), axis=1)  # (S,)
        E = logps.shape[0] // 2
        metrics = {}
        if needs_reference:
            ref = batch["ref_logps"] if precompute_reference else _reference(model, a, params, batch, dtype)
            ratio = logps - jax.lax.stop_gradient(ref)  # (S,): chosen then rejected log-ratios
            delta = ratio[:E] - ratio[E:]
            per_pair = {
                "sigmoid": lambda: -jax.nn.log_sigmoid(beta * delta),
                "hinge": lambda: jax.nn.relu(1 - beta * delta),
                "ipo": lambda: ((ratio / count)[:E] - (ratio / count)[E:] - 1 / (2 * beta)) ** 2,
                "robust": lambda: (-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)  # unbiased under flipped labels
                                   + label_smoothing * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * label_smoothing),
            }[kind]()
            loss, rewards, shown = jnp.mean(per_pair), beta * ratio, logps
        else:
            average = logps / count  # CPO's and ORPO's length-normalised log-probabilities
            chosen_rows = jnp.arange(logps.shape[0])[:, None] < E
            if kind == "simpo":
                z = beta * (average[:E] - average[E:] - gamma / beta)
                loss = jnp.mean(-jax.nn.log_sigmoid(z) * (1 - label_smoothing) - jax.nn.log_sigmoid(-z) * label_smoothing)
                scored = completion & chosen_rows  # CPO's SFT term: the chosen completions
            else:
                log_odds = (average[:E] - average[E:]) - (_log1mexp(average[:E]) - _log1mexp(average[E:]))
                odds_ratio = jax.nn.log_sigmoid(log_odds)
                loss = -jnp.mean(beta * odds_ratio)
                scored = (batch["targets"] != IGNORE) & chosen_rows  # ORPO's SFT term: the chosen sequences, prompt included
                metrics.update({"log_odds_ratio": jnp.mean(odds_ratio), "log_odds_chosen": jnp.mean(log_odds)})
            nll = -jnp.sum(jnp.where(scored, logp, 0.0)) / jnp.maximum(scored.sum(), 1)
            weight = 1.0 if kind == "orpo" else sft_weight
            loss = loss + weight * nll
            if kind == "orpo" or sft_weight:
                metrics["nll_loss"] = nll
            rewards, shown = beta * average, average
        rewards = jax.lax.stop_gradient(rewards)
        logit_sum = jnp.sum(jnp.where(completion, mean_logit, 0.0), axis=1)
        metrics.update({
            "rewards/chosen": jnp.mean(rewards[:E]), "rewards/rejected": jnp.mean(rewards[E:]),
            "rewards/accuracies": jnp.mean((rewards[:E] > rewards[E:]).astype(jnp.float32)),
            "rewards/margins": jnp.mean(rewards[:E] - rewards[E:]),
            "logps/chosen": jnp.mean(shown[:E]), "logps/rejected": jnp.mean(shown[E:]),
            "logits/chosen": jnp.sum(logit_sum[:E]) / jnp.maximum(completion[:E].sum(), 1),
            "logits/rejected": jnp.sum(logit_sum[E:]) / jnp.maximum(completion[E:].sum(), 1),
        })
        return loss, jax.lax.stop_gradient(metrics)

    def loss(params, batch, rng):
        return with_metrics(params, batch, rng)[0]

    loss.with_metrics = with_metrics
    return loss
