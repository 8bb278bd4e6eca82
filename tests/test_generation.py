import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft import generation

V, PAD = 7, 0


def next_token_model(tokens, i, cache):
    """A toy model whose next token is (token + 1) % V."""
    return jax.nn.one_hot((tokens + 1) % V, V), cache


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
