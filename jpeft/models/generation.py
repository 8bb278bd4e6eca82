"""Model-agnostic decoding loops (greedy, beam search and prompt-lookup greedy) that run entirely on device.

A model supplies `step(tokens (R,), i, cache) -> (logits (R, V), cache)`, where `tokens` are the
i-th generated tokens (0-based) and the logits are for the next ones, plus the logits for the first
generated token (from the decoder start token or the prompt). Cache leaves have the row dimension first so beams can be reordered.
Prompt lookup (`lookup_search`) instead takes a `Verify` that runs the model on several tokens per row at once.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Step = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
NEG = -1.0e9  # transformers' "impossible" score, kept identical so ties break the same way


def check_request(input_ids: np.ndarray, attention_mask: np.ndarray, vocab_size: int, max_new_tokens: int, num_beams: int,
                  early_stopping: Any, adapter_ids: Any, adapters: int | None) -> None:
    """Refuse, naming it, what a decoding loop would otherwise run as something else: indices clamp and wrap on
    device, so an out-of-range token or adapter id, or an empty prompt row, would silently borrow another's."""
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must both be (batch, length); "
                         "wrap a single prompt as [ids]")
    empty = np.flatnonzero(attention_mask.sum(axis=1) == 0)
    if empty.size:
        raise ValueError(f"prompt rows {empty.tolist()[:5]} have no real token (attention_mask all zero); drop them or give each a token")
    bad = np.unique(input_ids[(attention_mask > 0) & ((input_ids < 0) | (input_ids >= vocab_size))])
    if bad.size:
        raise ValueError(f"token ids {bad.tolist()[:5]} are outside the model's vocabulary [0, {vocab_size})")
    if int(max_new_tokens) < 1 or int(num_beams) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and num_beams={num_beams} must both be at least 1")
    if not isinstance(early_stopping, (bool, np.bool_)):
        raise ValueError(f"early_stopping={early_stopping!r}: jpeft's beam search stops as transformers' True or False do "
                         "(transformers' 'never' heuristic is not implemented)")
    if adapter_ids is None:
        return
    ids = np.asarray(adapter_ids)
    if adapters is None:
        raise ValueError("adapter_ids picks a stacked adapter per row, but these params hold none: stack them with jpeft.multi.stack_lora")
    if ids.shape != (input_ids.shape[0],) or ((ids < 0) | (ids >= adapters)).any():
        raise ValueError(f"adapter_ids {ids.tolist()} must give each of the {input_ids.shape[0]} rows an adapter in [0, {adapters})")


def bucket(n: int, minimum: int = 8, fine: bool = False, steps: int = 1) -> int:
    """Round a length up to a power of two so only a few shapes are ever compiled.

    `fine=True` also allows 1.5 x a power of two (8, 12, 16, 24, 32, 48, 64, 96, ...): twice the shapes,
    but a key/value cache that every decoding step reads whole is at most 1.5x, not 2x, what it needs.
    `steps=k` instead splits each doubling into k equal steps (k=4: 256, 320, 384, 448, 512): a prompt that
    a prefill computes whole pads by at most 1/k of a power of two.
    """
    size = minimum
    while size < n:
        if fine and size * 3 // 2 >= n:
            return size * 3 // 2
        if steps > 1 and size * 2 >= n:
            return size + -(-(n - size) // (size // steps)) * (size // steps) if size >= steps else size * 2
        size *= 2
    return size


def argmax(logits: jax.Array) -> jax.Array:
    """First index of the maximum over the last axis (int32), as `jnp.argmax` for finite logits.

    A max and a min over indices vectorise on CPU; `jnp.argmax`'s (value, index) reduction took
    ~5% of a decoding step over a 32k vocabulary. NaN rows give the last index instead of the NaN's.
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits == top, index, logits.shape[-1] - 1), axis=-1)


def greedy_search(step: Step, logits: jax.Array, cache: Any, max_new_tokens: jax.Array, max_len: int, eos: jax.Array, pad: int) -> jax.Array:
    """Argmax decoding -> (R, max_len) ids; rows that emitted EOS are padded; stops when all rows are done.

    Each iteration steps the model on the last token, then picks the next one: the model runs
    max_new_tokens - 1 times, never for a successor nobody asked for, so the cache needs only
    max_new_tokens - 1 slots past the prompt.
    """
    rows = logits.shape[0]
    token = argmax(logits)
    out = jnp.full((rows, max_len), pad, jnp.int32).at[:, 0].set(token)

    def cond(state):
        i, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, token, done, out, cache = state  # token: the (i - 1)-th generated token
        logits, cache = step(token, i - 1, cache)
        token = jnp.where(done, pad, argmax(logits))
        return i + 1, token, done | (token == eos), out.at[:, i].set(token), cache

    return jax.lax.while_loop(cond, body, (jnp.int32(1), token, token == eos, out, cache))[3]


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x (B, N, ...) indexed along axis 1 by idx (B, M)."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def beam_search(
    step: Step,
    logits: jax.Array,
    cache: Any,
    max_new_tokens: jax.Array,
    max_len: int,
    eos: jax.Array,
    pad: int,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
) -> jax.Array:
    """Beam search with transformers' semantics (its vectorised `_beam_search`, one EOS id) -> (B, max_len).

    `logits` and `cache` have B * num_beams rows (each input row repeated num_beams times).
    Finished hypotheses are scored logprob / length**length_penalty; the loop stops when no running
    beam can beat the worst finished one (transformers' `early_stopping=False` heuristic), when all
    candidates hit EOS or the length limit, or at `max_new_tokens`. As in `greedy_search`, the model runs
    max_new_tokens - 1 times at most.
    """
    R, V = logits.shape
    K = num_beams
    B = R // K
    keep = 2 * K
    top_mask = jnp.arange(keep) < K

    def choose(i, logits, cache, beams):
        """Extend the beams by the i-th generated token, scored from `logits`; reorder the cache to match."""
        run_seq, run_scores, seqs, scores, finished, improvable, _ = beams
        length = (i + 1).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, K, V) + run_scores[..., None]
        top_logp, top_idx = jax.lax.top_k(logp.reshape(B, K * V), keep)
        src_beam, token = top_idx // V, (top_idx % V).astype(jnp.int32)
        top_seq = _gather(run_seq, src_beam).at[:, :, i].set(token)
        hits = (token == eos) | (i + 1 >= max_new_tokens)

        # Beams that continue: the best K candidates that did not stop.
        cont_logp = top_logp + hits * NEG
        nxt = jax.lax.top_k(cont_logp, K)[1]
        run_seq, run_scores, parent = _gather(top_seq, nxt), _gather(cont_logp, nxt), _gather(src_beam, nxt)

        # Finished hypotheses: the best K of the old ones and the top-K candidates that just stopped.
        just_finished = hits & top_mask[None]
        fin_logp = top_logp / length**length_penalty
        fin_logp += (jnp.all(finished, axis=-1, keepdims=True) & early_stopping) * NEG
        fin_logp += (~improvable) * NEG
        fin_logp += (~just_finished) * NEG
        merged = jax.lax.top_k(jnp.concatenate([scores, fin_logp], axis=1), K)[1]
        seqs = _gather(jnp.concatenate([seqs, top_seq], axis=1), merged)
        scores = _gather(jnp.concatenate([scores, fin_logp], axis=1), merged)
        finished = _gather(jnp.concatenate([finished, just_finished], axis=1), merged)

        rows = (jnp.arange(B)[:, None] * K + parent).reshape(-1)
        cache = jax.tree_util.tree_map(lambda c: c[rows], cache)
        best_running = run_scores[:, :1] / length**length_penalty
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
        improvable = improvable & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
        going = jnp.any(improvable) & ~(jnp.all(finished) & early_stopping) & ~jnp.all(hits)
        return cache, (run_seq, run_scores, seqs, scores, finished, improvable, going)

    def body(state):
        i, cache, beams = state
        logits, cache = step(beams[0][:, :, i - 1].reshape(-1), i - 1, cache)
        cache, beams = choose(i, logits, cache, beams)
        return i + 1, cache, beams

    def cond(state):
        i, _, beams = state
        return beams[-1] & (i < max_new_tokens)

    seq0 = jnp.full((B, K, max_len), pad, jnp.int32)
    beams = (
        seq0, jnp.zeros((B, K)).at[:, 1:].set(NEG), seq0, jnp.full((B, K), NEG), jnp.zeros((B, K), bool),
        jnp.ones((B, 1), bool), jnp.bool_(True),
    )
    cache, beams = choose(jnp.int32(0), logits, cache, beams)
    seqs = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, beams))[2][2][:, 0]
    # transformers pads a finished hypothesis after its EOS; make that padding explicit.
    after_eos = jnp.cumsum(jnp.cumsum(seqs == eos, axis=1), axis=1) > 1
    return jnp.where(after_eos, pad, seqs)


# ----------------------------------------------------------------------------------------------
# Prompt-lookup decoding

Verify = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
MAX_NGRAM = 2  # transformers' PromptLookupCandidateGenerator default (max_matching_ngram_size)


def draft(context: jax.Array, valid: jax.Array, end: jax.Array, num_draft: int, max_ngram: int = MAX_NGRAM) -> tuple[jax.Array, jax.Array]:
    """Draft tokens copied from each row's own text -> (drafts (R, num_draft), whether a match was found (R,)).

    `context` (R, L) holds each row's tokens, `valid` (R, L) which of them are real, `end` (R,) one past the
    last. As transformers' prompt lookup: for n = max_ngram .. 1, the earliest n-gram equal to the row's
    last n tokens and followed by at least one token gives the tokens after it. Drafts past `end` are filler:
    acceptance compares every draft with the model's argmax, so a wrong draft costs time, never output.
    """
    R, L = context.shape
    drafts, found = jnp.zeros((R, num_draft), context.dtype), jnp.zeros((R,), bool)
    for n in range(max_ngram, 0, -1):  # longer n-grams first; a shorter one is used only where no longer one matched
        tail = jnp.take_along_axis(context, jnp.clip(end[:, None] - n + jnp.arange(n), 0, L - 1), axis=1)  # (R, n)
        starts = jnp.arange(L - n + 1)
        match = (starts[None] + n < end[:, None]) & (end[:, None] >= n)
        for t in range(n):
            match = match & valid[:, t:t + L - n + 1] & (context[:, t:t + L - n + 1] == tail[:, t:t + 1])
        hit = jnp.any(match, axis=1)
        first = jnp.argmax(match, axis=1)  # the earliest match
        take = jnp.clip(first[:, None] + n + jnp.arange(num_draft), 0, L - 1)
        use = hit & ~found
        drafts = jnp.where(use[:, None], jnp.take_along_axis(context, take, axis=1), drafts)
        found = found | hit
    return drafts, found


def lookup_search(verify: Verify, logits: jax.Array, cache: Any, prompt: jax.Array, prompt_mask: jax.Array, key_mask: jax.Array,
                  position: jax.Array, index: int, max_new_tokens: jax.Array, max_len: int, eos: jax.Array, pad: int, *,
                  num_draft: int) -> jax.Array:
    """Greedy decoding with prompt-lookup drafts -> (R, max_len) ids, identical to `greedy_search`'s.

    `verify(tokens (R, T), positions (R, T), index, key_mask (R, S), cache) -> (logits (R, T, V), cache)` runs the
    model on T tokens written at cache slots index..index+T-1. Each iteration feeds every row its last token and
    `num_draft` drafts (`draft`), keeps the drafts that equal the argmax before them plus the argmax after the
    last kept one, so a row gains 1..num_draft+1 tokens per forward pass. Rows advance at different rates but
    share the write slots: a row's rejected slots leave its `key_mask` (and so its attention and sliding windows),
    and its rotary positions count only kept tokens. The cache needs (max_new_tokens - 1) * (num_draft + 1) slots
    past `index`. `prompt` (R, P) is left-aligned with `prompt_mask`; `position` (R,) is the first generated
    token's rotary position.
    """
    R, P = prompt.shape
    T = num_draft + 1
    width = max_len + T  # room for a whole iteration's tokens past max_len
    cols = jnp.arange(width)
    first = argmax(logits)
    out = jnp.full((R, width), pad, jnp.int32).at[:, 0].set(first)
    done = (first == eos) | (max_new_tokens <= 1)

    def cond(state):
        return ~jnp.all(state[2])

    def body(state):
        c, count, done, out, position, key_mask, cache = state  # count (R,): tokens generated; out[:, count - 1] is unfed
        last = jnp.take_along_axis(out, count[:, None] - 1, axis=1)
        context = jnp.concatenate([prompt, out], axis=1)
        valid = jnp.concatenate([prompt_mask > 0, cols[None] < count[:, None]], axis=1)
        drafts, _ = draft(context, valid, P + count, num_draft)
        tokens = jnp.concatenate([last, drafts], axis=1)
        logits, cache = verify(tokens, position[:, None] + jnp.arange(T), c, key_mask, cache)
        best = argmax(logits)  # (R, T): the greedy successor of each fed token
        kept = jnp.cumprod((drafts == best[:, :-1]).astype(jnp.int32), axis=1).sum(axis=1)  # drafts that agree with the argmax before them
        # The new tokens best[:, :kept + 1] go to out[:, count:], cut at EOS and at max_new_tokens.
        offset = cols[None] - count[:, None]
        new = jnp.take_along_axis(best, jnp.clip(offset, 0, T - 1), axis=1)
        fresh = (offset >= 0) & (offset <= kept[:, None]) & (cols[None] < max_new_tokens) & ~done[:, None]
        seen_eos = jnp.cumsum(fresh & (new == eos), axis=1) - (fresh & (new == eos))  # EOSes written before each column
        fresh = fresh & (seen_eos == 0)
        out = jnp.where(fresh, new, out)
        gained = fresh.sum(axis=1)
        slot = jnp.arange(key_mask.shape[1])[None] - c
        key_mask = jnp.where((slot > kept[:, None]) & (slot < T), 0, key_mask)  # rejected drafts' slots
        done = done | jnp.any(fresh & (new == eos), axis=1) | (count + gained >= max_new_tokens)
        return c + T, count + gained, done, out, position + kept + 1, key_mask, cache

    state = (jnp.int32(index), jnp.ones((R,), jnp.int32), done, out, position, key_mask, cache)
    return jax.lax.while_loop(cond, body, state)[3][:, :max_len]
