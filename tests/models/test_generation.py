import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import generation

V, PAD = 7, 0


def next_token_model(tokens, i, cache):
    """A toy model whose next token is (token + 1) % V."""
    return jax.nn.one_hot((tokens + 1) % V, V), cache


def greedy_from(start: jax.Array, max_new: int, eos: int) -> np.ndarray:
    """`next_token_model`'s greedy continuation of `start` (R,) through greedy_search, (R, max_new)."""
    first = jax.nn.one_hot((start + 1) % V, V)
    return np.asarray(generation.greedy_search(next_token_model, first, (), jnp.int32(max_new), 16, jnp.int32(eos), PAD))[:, :max_new]


def greedy(max_new: int, eos: int) -> np.ndarray:
    first = jax.nn.one_hot(jnp.array([1, 2]), V)  # row r starts at token r + 1
    return np.asarray(generation.greedy_search(next_token_model, first, (), jnp.int32(max_new), 8, jnp.int32(eos), PAD))


def test_greedy_follows_the_argmax_and_pads_after_eos():
    np.testing.assert_array_equal(greedy(5, eos=-1)[:, :5], [[1, 2, 3, 4, 5], [2, 3, 4, 5, 6]])
    out = greedy(5, eos=3)[:, :5]
    np.testing.assert_array_equal(out, [[1, 2, 3, PAD, PAD], [2, 3, PAD, PAD, PAD]])


@pytest.mark.parametrize("max_new", [1, 2, 5])
def test_greedy_steps_the_model_once_per_token_after_the_first(max_new):
    calls = []

    def step(tokens, i, cache):
        jax.debug.callback(lambda i: calls.append(int(i)), i)
        return next_token_model(tokens, i, cache)

    first = jax.nn.one_hot(jnp.array([1, 2]), V)
    generation.greedy_search(step, first, (), jnp.int32(max_new), 8, jnp.int32(-1), PAD).block_until_ready()
    assert calls == list(range(max_new - 1))  # step i feeds the i-th generated token; the last one is never fed


def test_beam_search_steps_the_model_once_per_token_after_the_first():
    calls = []

    def step(tokens, i, cache):
        jax.debug.callback(lambda i: calls.append(int(i)), i)
        return jnp.log(jax.nn.one_hot((tokens + 1) % V, V) * 0.9 + 0.1 / V), cache

    first = jnp.log(jnp.full((4, V), 1.0 / V))  # 2 rows x 2 beams
    out = generation.beam_search(step, first, jnp.zeros((4, 1)), jnp.int32(4), 8, jnp.int32(-1), PAD, num_beams=2)
    assert out.shape == (2, 8) and calls == [0, 1, 2]


def test_bucket_rounds_up_to_powers_of_two_or_one_and_a_half_times_them():
    assert [generation.bucket(n) for n in (1, 8, 9, 64, 65)] == [8, 8, 16, 64, 128]
    assert [generation.bucket(n, fine=True) for n in (9, 12, 13, 64, 65)] == [12, 12, 16, 64, 96]


def test_bucket_steps_split_each_doubling():
    assert [generation.bucket(n, steps=4) for n in (8, 9, 257, 284, 321, 449, 512)] == [8, 10, 320, 320, 384, 512, 512]


def test_draft_copies_the_tokens_after_the_earliest_matching_ngram():
    #              padding   prompt ...........   generated
    context = jnp.array([[0, 0, 5, 6, 7, 8, 5, 6, 9, 5, 6],    # tail (5, 6): earliest match at 2 -> 7, 8, 5
                         [0, 3, 4, 3, 9, 9, 9, 9, 9, 9, 3]])   # no bigram (9, 3) before; unigram 3 at 1 -> 4, 3, 9
    valid = jnp.array([[0, 0] + [1] * 9, [0] + [1] * 10], bool)
    drafts, found = generation.draft(context, valid, jnp.array([11, 11]), 3)
    np.testing.assert_array_equal(drafts, [[7, 8, 5], [4, 3, 9]])
    assert found.tolist() == [True, True]
    _, found = generation.draft(context[:, :4], valid[:, :4], jnp.array([4, 4]), 3)
    assert found.tolist() == [False, True]  # (5, 6) / 6 occur only at the end; the padding's 0 never matches


def test_lookup_search_equals_greedy_in_fewer_passes():
    """A model that counts (token + 1) % V: once a cycle is in the text, every draft is right."""
    calls = []

    def verify(tokens, positions, index, key_mask, cache):
        jax.debug.callback(lambda i: calls.append(int(i)), index)
        return jax.nn.one_hot((tokens + 1) % V, V), cache

    prompt = jnp.array([[0, 1, 2, 3, 4, 5, 6, 0], [3, 4, 5, 6, 0, 1, 2, 3]])
    mask = jnp.ones_like(prompt).at[0, 0].set(0)
    first = jax.nn.one_hot((prompt[:, -1] + 1) % V, V)
    for eos in (-1, 3):
        out = generation.lookup_search(verify, first, (), prompt, mask, jnp.ones((2, 64), jnp.int32), jnp.array([7, 8]), 8,
                                       jnp.int32(12), 16, jnp.int32(eos), PAD, num_draft=4)
        want = greedy_from(prompt[:, -1], 12, eos)
        np.testing.assert_array_equal(out[:, :12], want)
    assert len(calls) <= 2 * 3  # 11 tokens after the first, 5 per pass: 3 passes per call, not 11


def tiny(family: str):
    """(module, config, params) of a tiny random decoder with a 16-token vocabulary, so greedy text repeats itself."""
    import transformers

    from jpeft.models import gemma, llama

    common = dict(vocab_size=16, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "llama":
        config = transformers.LlamaConfig(num_hidden_layers=2, **common)
        return llama, config, llama.init_params(config, jax.random.key(0))
    config = transformers.Gemma3TextConfig(num_hidden_layers=2, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                           layer_types=["sliding_attention", "full_attention"], **common)
    return gemma, config, gemma.init_params(config, jax.random.key(0))


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_prompt_lookup_equals_greedy_with_rows_ending_at_different_steps(family):
    model, config, params = tiny(family)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 16, (4, 21))
    mask = np.ones_like(ids)
    mask[0, :9] = mask[2, :4] = 0  # left padding of different lengths
    plain = np.asarray(model.generate(config, params, ids, mask, max_new_tokens=24, eos_token_id=-1))
    eos = int(plain[0, 6])  # an EOS that some rows reach early, others late or never
    ends = {int(np.argmax(row == eos)) if eos in row else None for row in plain}
    assert len(ends) > 1
    want = np.asarray(model.generate(config, params, ids, mask, max_new_tokens=24, eos_token_id=eos))
    for n in (1, 4):  # one draft, and drafts that run past the rows' EOS and max_new_tokens
        np.testing.assert_array_equal(model.generate(config, params, ids, mask, max_new_tokens=24, eos_token_id=eos, prompt_lookup=n), want)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_cached_prefill_gives_the_forward_logits_at_the_last_position(family):
    """The prefill writes a longer cache but attends only the prompt's slots (`causal_attention`), as `forward` does."""
    from jpeft import nn
    from jpeft.models import causal_lm

    model, config, params = tiny(family)
    a = model.arch(config)
    ids = np.random.default_rng(1).integers(3, 16, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    want = np.asarray(model.forward(config, params, ids, mask))[:, -1]
    x, _ = model.embed(a, params, ids, mask, jnp.float32)
    key_mask = np.pad(mask, ((0, 0), (0, 20)), constant_values=1)
    cache = [(jnp.zeros((2, a.num_kv_heads, 32, a.head_dim)),) * 2 for _ in range(a.num_layers)]
    h, _ = model.decoder(a, params, x, causal_lm.positions_from_mask(mask), key_mask, nn.Ctx(), cache, 0)
    np.testing.assert_allclose(model.lm_head(a, params, h[:, -1], nn.Ctx()), want, atol=1e-5)


def test_prompt_lookup_refuses_beams():
    model, config, params = tiny("llama")
    with pytest.raises(ValueError, match="prompt_lookup=4 with num_beams=2"):
        model.generate(config, params, np.ones((1, 4), np.int32), num_beams=2, prompt_lookup=4)


def test_generate_refuses_what_it_would_run_as_something_else(flan):
    """On device, indices clamp and wrap: an empty row would take another row's last token, a token or adapter id out of
    range another's embedding or adapter, a short mask would drop the prompt's end. Each is named instead."""
    import jpeft
    from jpeft import lora, multi
    from jpeft.models import t5

    model, config, params = tiny("llama")
    ids, mask = np.full((2, 5), 3), np.ones((2, 5), np.int32)
    adapters = [jpeft.split_adapter(lora.inject(params, lora.LoraConfig(r=2, target_modules=["q_proj"]), jax.random.key(i)))[1]
                for i in range(2)]
    stacked = jpeft.attach(params, multi.stack_lora(adapters))
    cases = [
        (dict(attention_mask=np.array([[1] * 5, [0] * 5])), r"prompt rows \[1\] have no real token"),
        (dict(attention_mask=mask[:, :4]), r"input_ids \(2, 5\) and attention_mask \(2, 4\) must both be"),
        (dict(input_ids=np.array([[3, 16, 4, 5, 6]] * 2)), r"token ids \[16\] are outside the model's vocabulary \[0, 16\)"),
        (dict(max_new_tokens=0), "max_new_tokens=0 and num_beams=1 must both be at least 1"),
        (dict(num_beams=2, early_stopping="never"), "early_stopping='never'"),
        (dict(adapter_ids=[0, 1]), "these params hold none"),
        (dict(params=stacked, adapter_ids=[0, 2]), r"adapter_ids \[0, 2\] must give each of the 2 rows an adapter in \[0, 2\)"),
        (dict(params=stacked, adapter_ids=[-1, 0]), r"an adapter in \[0, 2\)"),
    ]
    for change, message in cases:
        request = dict(input_ids=ids, attention_mask=mask, params=params) | change
        with pytest.raises(ValueError, match=message):
            model.generate(config, request.pop("params"), request.pop("input_ids"), **request)
    assert model.generate(config, stacked, ids, mask, max_new_tokens=2, adapter_ids=[1, 0]).shape == (2, 2)
    with pytest.raises(ValueError, match=r"prompt rows \[0\] have no real token"):
        t5.generate(flan.config, flan.params, flan.ids[:1], np.zeros_like(flan.mask[:1]))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_lookup_equals_greedy_under_soft_prompts_and_prefixes(method):
    """Virtual tokens shift the cache slots (prefix) or the embeddings (soft prompt); the drafts come from real tokens only."""
    import jpeft
    from jpeft import prefix, prompt

    model, config, params = tiny("llama")
    if method == "prompt":
        params = prompt.inject(params, jpeft.PromptTuningConfig(num_virtual_tokens=3), jax.random.key(1))
    else:
        params = prefix.inject(params, jpeft.PrefixTuningConfig(num_virtual_tokens=3), jax.random.key(1), config)
    ids = np.random.default_rng(2).integers(3, 16, (2, 13))
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    want = np.asarray(model.generate(config, params, ids, mask, max_new_tokens=20, eos_token_id=-1))
    np.testing.assert_array_equal(model.generate(config, params, ids, mask, max_new_tokens=20, eos_token_id=-1, prompt_lookup=3), want)
