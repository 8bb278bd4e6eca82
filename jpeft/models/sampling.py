"""Sampling: transformers' logits processors as small pure functions, and a decoding loop that samples from them.

Each processor maps float32 logits (R, V) to logits (R, V) with removed tokens at -inf, exactly as its transformers
namesake (`TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`,
`RepetitionPenaltyLogitsProcessor`); `process` chains them in the order transformers' `generate` does, and
`sample_search` draws each token from the result (`jax.random.categorical`, the same distribution as
`torch.multinomial` over the softmax).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jpeft.models import generation

FILTERED = -jnp.inf  # transformers' filter_value


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What to sample from: transformers' `do_sample=True` settings (hashable, so a jitted loop compiles once per setting).

    `top_k=0`, `top_p=1.0`, `min_p=None` and `repetition_penalty=1.0` switch a processor off. The defaults are
    transformers' `GenerationConfig` ones (top_k 50); TRL's GRPO samples with top_k=0.
    """

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        bad = []
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            bad.append(f"temperature={self.temperature!r} must be a positive number (for greedy decoding pass no sampling)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad.append(f"top_k={self.top_k!r} must be a whole number >= 0 (0: off)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad.append(f"top_p={self.top_p!r} must be in (0, 1] (1: off)")
        if self.min_p is not None and not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            bad.append(f"min_p={self.min_p!r} must be in [0, 1] or None (off)")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            bad.append(f"repetition_penalty={self.repetition_penalty!r} must be a positive number (1: off)")
        if bad:
            raise ValueError("bad sampling settings: " + "; ".join(bad))


def check_request(sample: Sampling | None, key, num_beams: int, num_return_sequences: int, return_logprobs: bool,
                  prompt_lookup: int = 0) -> None:
    """Refuse, naming it, a `generate` request whose sampling options contradict each other."""
    if not isinstance(num_return_sequences, int) or num_return_sequences < 1:
        raise ValueError(f"num_return_sequences={num_return_sequences!r} must be a whole number >= 1")
    if sample is None:
        if key is not None or num_return_sequences > 1 or return_logprobs:
            raise ValueError("key, num_return_sequences > 1 and return_logprobs are for sampling: pass sample=jpeft.sampling.Sampling(...) "
                             "(greedy and beam search return one deterministic sequence per row)")
        return
    if not isinstance(sample, Sampling):
        raise TypeError(f"sample must be a jpeft.sampling.Sampling, not {type(sample).__name__}")
    if key is None:
        raise ValueError("sampling needs a random key: pass key=jax.random.key(seed) (the same key gives the same tokens)")
    if num_beams > 1 or prompt_lookup:
        raise ValueError(f"sampling draws one token per step from each row: it does not combine with num_beams={num_beams} or "
                         f"prompt_lookup={prompt_lookup}; pass num_beams=1 and prompt_lookup=0")


def temperature(logits: jax.Array, t: float) -> jax.Array:
    """`TemperatureLogitsWarper`: logits / t."""
    return logits / t


def top_k(logits: jax.Array, k: int, min_tokens_to_keep: int = 1) -> jax.Array:
    """`TopKLogitsWarper`: tokens below the k-th largest logit (ties with it kept) -> -inf."""
    k = min(max(k, min_tokens_to_keep), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, FILTERED, logits)


def top_p(logits: jax.Array, p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """`TopPLogitsWarper`: keep the most likely tokens whose probabilities sum to at least p -> others -inf.

    As transformers: sorted ascending, a token goes when the cumulative probability up to and including it is
    <= 1 - p; the `min_tokens_to_keep` most likely always stay.
    """
    order = jnp.argsort(logits, axis=-1)  # ascending
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted = drop_sorted.at[..., logits.shape[-1] - min_tokens_to_keep:].set(False)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, FILTERED, logits)


def min_p(logits: jax.Array, p: float, min_tokens_to_keep: int = 1) -> jax.Array:
    """`MinPLogitsWarper`: tokens less likely than p x the top token's probability -> -inf (the top ones kept)."""
    probs = jax.nn.softmax(logits, axis=-1)
    drop = probs < p * jnp.max(probs, axis=-1, keepdims=True)
    top = jax.lax.top_k(probs, min(min_tokens_to_keep, logits.shape[-1]))[1]
    drop = drop.at[jnp.arange(logits.shape[0])[:, None], top].set(False)
    return jnp.where(drop, FILTERED, logits)


def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """`RepetitionPenaltyLogitsProcessor`: each token already in the row (`seen` (R, V) bool) has its logit divided
    by `penalty` if positive, multiplied if negative."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def process(logits: jax.Array, seen: jax.Array | None, s: Sampling) -> jax.Array:
    """The processors `s` turns on, in transformers' order: repetition penalty, temperature, top-k, top-p, min-p."""
    logits = logits.astype(jnp.float32)
    if s.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, seen, s.repetition_penalty)
    if s.temperature != 1.0:
        logits = temperature(logits, s.temperature)
    if s.top_k:
        logits = top_k(logits, s.top_k)
    if s.top_p < 1.0:
        logits = top_p(logits, s.top_p)
    if s.min_p is not None:
        logits = min_p(logits, s.min_p)
    return logits


def seen_tokens(tokens: jax.Array, mask: jax.Array, vocab: int) -> jax.Array:
    """(R, V) bool: which tokens each row of `tokens` (R, L) holds where `mask` is set (the repetition penalty's memory)."""
    rows = jnp.arange(tokens.shape[0])[:, None]
    return jnp.zeros((tokens.shape[0], vocab), bool).at[rows, jnp.where(mask > 0, tokens, vocab)].set(True, mode="drop")


def sample_search(step: generation.Step, logits: jax.Array, cache, max_new_tokens: jax.Array, max_len: int, eos: jax.Array, pad: int, *,
                  key: jax.Array, settings: Sampling, seen: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Sampled decoding -> (ids (R, max_len), their log-probabilities (R, max_len)); rows that emitted EOS are padded.

    The i-th token of every row is drawn with `fold_in(key, i)`, so a key fixes the output. A log-probability is the
    token's under the distribution it was drawn from (after every processor); 0 on padding. `seen` (R, V) holds each
    row's prompt tokens when a repetition penalty is on. As `greedy_search`, the model runs max_new_tokens - 1 times.
    """
    rows, vocab = logits.shape
    if settings.repetition_penalty != 1.0 and seen is None:
        seen = jnp.zeros((rows, vocab), bool)
    track = settings.repetition_penalty != 1.0

    def draw(i, logits, seen, done):
        scores = process(logits, seen, settings)
        token = jax.random.categorical(jax.random.fold_in(key, i), scores, axis=-1).astype(jnp.int32)
        logp = jnp.take_along_axis(jax.nn.log_softmax(scores, axis=-1), token[:, None], axis=-1)[:, 0]
        token = jnp.where(done, pad, token)
        if track:
            seen = seen.at[jnp.arange(rows), token].set(True)
        return token, jnp.where(done, 0.0, logp), seen

    no = jnp.zeros((rows,), bool)
    token, logp, seen = draw(0, logits, seen, no)
    out = jnp.full((rows, max_len), pad, jnp.int32).at[:, 0].set(token)
    logps = jnp.zeros((rows, max_len), jnp.float32).at[:, 0].set(logp)

    def cond(state):
        i, _, done = state[:3]
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, done, out, logps, seen, cache = state  # token: the (i - 1)-th generated token
        logits, cache = step(token, i - 1, cache)
        token, logp, seen = draw(i, logits, seen, done)
        return i + 1, token, done | (token == eos), out.at[:, i].set(token), logps.at[:, i].set(logp), seen, cache

    state = (jnp.int32(1), token, token == eos, out, logps, seen, cache)
    _, _, _, out, logps, _, _ = jax.lax.while_loop(cond, body, state)
    return out, logps
