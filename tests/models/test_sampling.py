"""Sampling: the logits processors against transformers' on random logits, and the decoding loop's draws checked
against the processed distribution of a teacher-forced forward pass (Llama with per-row adapters, T5)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.models import llama, t5
from jpeft.models.sampling import Sampling, process, sample_search, seen_tokens
from tests.models.test_llama import _with_lora

V = 64


def _transformers(settings: Sampling):
    """transformers' processors for `settings`, in the order its generate builds them."""
    from transformers import generation as g

    out = []
    if settings.repetition_penalty != 1.0:
        out.append(g.RepetitionPenaltyLogitsProcessor(float(settings.repetition_penalty)))
    if settings.temperature != 1.0:
        out.append(g.TemperatureLogitsWarper(float(settings.temperature)))
    if settings.top_k:
        out.append(g.TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        out.append(g.TopPLogitsWarper(float(settings.top_p)))
    if settings.min_p is not None:
        out.append(g.MinPLogitsWarper(float(settings.min_p)))
    return g.LogitsProcessorList(out)


SETTINGS = {
    "temperature": Sampling(temperature=0.6, top_k=0),
    "top_k": Sampling(top_k=7),
    "top_k_over_vocab": Sampling(top_k=V + 5),
    "top_p": Sampling(top_k=0, top_p=0.8),
    "min_p": Sampling(top_k=0, min_p=0.1),
    "repetition_penalty": Sampling(top_k=0, repetition_penalty=1.7),
    "all": Sampling(temperature=1.4, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.3),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_processed_logits_equal_transformers(name):
    settings = SETTINGS[name]
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(6, V)) * 3).astype(np.float32)
    logits[0, :5] = logits[0, 5]  # ties at the top-k boundary are kept, as transformers keeps them
    history = rng.integers(0, V, size=(6, 9))
    ref = _transformers(settings)(torch.tensor(history), torch.tensor(logits)).numpy()
    ours = np.asarray(process(jnp.asarray(logits), seen_tokens(jnp.asarray(history), jnp.ones((6, 9)), V), settings))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    assert kept.sum(axis=1).min() >= 1 and (name in ("temperature", "repetition_penalty", "top_k_over_vocab") or (~kept).any())
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=0.0), "temperature=0.0"), (dict(top_p=0.0), "top_p=0.0"), (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"), (dict(min_p=2.0), "min_p=2.0"), (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
    (dict(temperature=float("nan")), "temperature=nan"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _seen_so_far(tokens, mask, start, steps, vocab=V):
    """(steps, R, V): what the repetition penalty remembers at each draw t, the tokens of columns < start + t."""
    cut = jnp.arange(tokens.shape[1])[None, :] < (start + jnp.arange(steps))[:, None]
    return jax.vmap(lambda c: seen_tokens(tokens, mask * c[None], vocab))(cut)


def _picked_logps(logits, seen, tokens, settings):
    """log_softmax(process(logits, seen)) at `tokens`, for logits (T, R, V) / seen (T, R, V) / tokens (R, T)."""
    T, R, _ = logits.shape
    scores = jax.jit(process, static_argnums=2)(logits.reshape(T * R, -1), seen.reshape(T * R, -1), settings)
    return np.asarray(jax.nn.log_softmax(scores)).reshape(T, R, -1)[np.arange(T)[:, None], np.arange(R)[None], tokens.T].T


def test_the_loop_draws_from_the_processed_distribution_and_stops_at_eos():
    """A toy model whose logits depend on the token: the sampled tokens' log-probabilities are the processed ones,
    a key fixes the draw, rows pad after EOS, and top_k=1 is greedy."""
    table = jax.random.normal(jax.random.key(1), (V, V)) * 2

    def step(tokens, i, cache):
        return table[tokens], cache

    first = table[jnp.array([3, 4, 5])]
    settings = Sampling(temperature=0.8, top_k=10, repetition_penalty=1.5)
    run = jax.jit(lambda key, s=settings: sample_search(step, first, (), jnp.int32(12), 16, jnp.int32(7), 0, key=key, settings=s),
                  static_argnums=1)
    out, logps = map(np.asarray, run(jax.random.key(0)))
    again, _ = run(jax.random.key(0))
    other, _ = run(jax.random.key(1))
    np.testing.assert_array_equal(out, np.asarray(again))
    assert (out != np.asarray(other)).any()
    seen = _seen_so_far(jnp.asarray(out[:, :12]), jnp.ones((3, 12), jnp.int32), 0, 12)  # the toy has no prompt
    prev = np.concatenate([[[3], [4], [5]], out[:, :11]], axis=1)
    want = _picked_logps(table[prev.T], seen, out[:, :12], settings)
    done = np.cumsum(np.cumsum(out[:, :12] == 7, axis=1), axis=1) > 1
    np.testing.assert_allclose(logps[:, :12][~done], want[~done], atol=1e-5)
    assert (out[:, :12][done] == 0).all() and (logps[:, :12][done] == 0).all() and done.any()
    greedy, _ = map(np.asarray, run(jax.random.key(3), Sampling(top_k=1)))  # top-k 1 is greedy decoding
    argmax = np.asarray(table).argmax(axis=1)
    np.testing.assert_array_equal(greedy[:, 0], argmax[[3, 4, 5]])
    for i in range(1, 12):
        done = (greedy[:, :i] == 7).any(axis=1)
        np.testing.assert_array_equal(greedy[:, i], np.where(done, 0, argmax[greedy[:, i - 1]]))


@pytest.fixture(scope="module", params=["llama", "gemma"])
def decoder(request):
    """(module, config, base params, params with two stacked LoRA adapters) of a tiny random Llama or Gemma 3."""
    import transformers

    from jpeft.models import gemma

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, initializer_range=0.3, pad_token_id=0, eos_token_id=1)
    if request.param == "llama":
        module, config = llama, transformers.LlamaConfig(**common)
    else:
        module, config = gemma, transformers.Gemma3TextConfig(head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                                              layer_types=["sliding_attention", "full_attention"], **common)
    params = module.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(2)
    stacked = _with_lora(params, rng.normal(size=(2, 32, 2)) * 0.5, rng.normal(size=(2, 2, 32)) * 0.5, np.array([2.0, 0.5]))
    return module, config, params, stacked


def test_decoders_sample_with_per_row_adapters_from_the_teacher_forced_distribution(decoder):
    """Every sampled token's log-probability equals the processed distribution of a full forward pass over prompt +
    tokens so far, under that row's adapter; two samples per prompt differ; the key fixes them."""
    module, config, _, stacked = decoder
    rng = np.random.default_rng(3)
    ids = rng.integers(3, V, size=(2, 6))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    settings = Sampling(temperature=0.7, top_k=12, top_p=0.95, repetition_penalty=1.3)
    kwargs = dict(max_new_tokens=6, sample=settings, key=jax.random.key(5), num_return_sequences=2, adapter_ids=np.array([1, 0]),
                  eos_token_id=-1)
    out, logps = map(np.asarray, module.generate(config, stacked, ids, mask, return_logprobs=True, **kwargs))
    np.testing.assert_array_equal(out, np.asarray(module.generate(config, stacked, ids, mask, **kwargs)))
    assert out.shape == (4, 6) and (out[0] != out[1]).any()
    rows = np.repeat(np.arange(2), 2)
    full_ids = np.concatenate([ids[rows], out], axis=1)
    full_mask = np.concatenate([mask[rows], np.ones_like(out)], axis=1)
    forward = jax.jit(module.forward, static_argnums=0)
    logits = forward(module.arch(config), stacked, full_ids, full_mask, adapter_ids=jnp.asarray([1, 1, 0, 0]))
    seen = _seen_so_far(jnp.asarray(full_ids), jnp.asarray(full_mask), 6, 6)
    np.testing.assert_allclose(logps, _picked_logps(logits[:, 5:11].transpose(1, 0, 2), seen, out, settings), atol=2e-4)


def test_t5_samples_from_the_teacher_forced_distribution():
    from transformers import T5Config

    config = T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, initializer_factor=4.0)
    params = t5.init_params(config, jax.random.key(0))
    ids, mask = np.random.default_rng(4).integers(2, V, size=(3, 7)), np.ones((3, 7), np.int32)
    mask[2, 5:] = 0
    settings = Sampling(temperature=1.3, top_k=0, min_p=0.05, repetition_penalty=1.2)
    out, logps = map(np.asarray, t5.generate(config, params, ids, mask, max_new_tokens=5, sample=settings, key=jax.random.key(0),
                                             return_logprobs=True, eos_token_id=-1))
    dec = np.concatenate([np.zeros((3, 1), np.int64), out], axis=1)  # the start token, then the samples
    logits = jax.jit(t5.forward, static_argnums=0)(t5.arch(config), params, ids, mask, dec)
    seen = _seen_so_far(jnp.asarray(dec), jnp.ones(dec.shape, jnp.int32), 1, 5)
    np.testing.assert_allclose(logps, _picked_logps(logits[:, :5].transpose(1, 0, 2), seen, out, settings), atol=2e-4)
    assert len({tuple(row) for row in out}) > 1


def test_bad_requests_are_named():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    params = llama.init_params(config, jax.random.key(0))
    for kwargs, message in [(dict(sample=Sampling()), "needs a random key"), (dict(key=jax.random.key(0)), "are for sampling"),
                            (dict(num_return_sequences=2), "are for sampling"),
                            (dict(sample=Sampling(), key=jax.random.key(0), num_beams=2), "num_beams=2"),
                            (dict(sample=Sampling(), key=jax.random.key(0), prompt_lookup=2), "prompt_lookup=2"),
                            (dict(sample=Sampling(), key=jax.random.key(0), num_return_sequences=0), "num_return_sequences=0")]:
        with pytest.raises(ValueError, match=message):
            llama.generate(config, params, np.array([[5, 6, 7]]), max_new_tokens=4, **kwargs)
