"""Prompt tuning: parity with HF PEFT on T5, initialisations, generation through the prompt, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jpeft import prompt, ptuning, soft_prompt
from jpeft.models import t5
from tests.conftest import SHARED, jpeft_logits, torch_logits


def test_prompt_tuning_matches_peft(flan):
    n = 5
    ref = peft.get_peft_model(flan.torch(), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n))
    table = ref.prompt_encoder["default"].embedding.weight
    assert table.shape[0] == 2 * n  # PEFT keeps 2N rows for seq2seq and feeds the first N to the encoder
    torch.manual_seed(0)
    with torch.no_grad():
        table.normal_()
    params = prompt.inject(flan.params, prompt.PromptTuningConfig(num_virtual_tokens=n), jax.random.key(0))
    assert params["prompt_embeddings"].shape == (n, flan.config.d_model)
    params = {**params, "prompt_embeddings": jnp.asarray(table.detach().numpy()[:n])}
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - torch_logits(ref.eval(), flan.ids, flan.mask, flan.dec)).max() < 1e-4
    assert np.abs(ours - jpeft_logits(flan, flan.params)).max() > 1e-2


def test_generation_uses_the_prompt(flan):
    params = prompt.inject(flan.params, prompt.PromptTuningConfig(num_virtual_tokens=4), jax.random.key(0))
    with_prompt = t5.generate(flan.config, params, flan.ids, flan.mask, max_new_tokens=6)
    # Equivalent reference: the same run with the prompt folded into the embedding table as real tokens.
    V = flan.config.vocab_size
    table = jnp.concatenate([flan.params["shared"]["embedding"], params["prompt_embeddings"]])
    folded = {**flan.params, "shared": {"embedding": table}}
    assert "lm_head" in folded  # untied, so the extra rows can be kept out of the output vocabulary:
    folded["lm_head"] = {"kernel": jnp.pad(folded["lm_head"]["kernel"], ((0, 0), (0, 4))),
                         "bias": jnp.concatenate([jnp.zeros(V), jnp.full(4, -1e9)])}
    ids = np.concatenate([np.tile(np.arange(V, V + 4), (3, 1)), flan.ids], axis=1)
    mask = np.concatenate([np.ones((3, 4), int), flan.mask], axis=1)
    np.testing.assert_array_equal(with_prompt, t5.generate(flan.config, folded, ids, mask, max_new_tokens=6))


def test_vocab_init_samples_embedding_rows(flan):
    params = prompt.inject(flan.params, prompt.PromptTuningConfig(num_virtual_tokens=6, init="vocab"), jax.random.key(3))
    table = np.asarray(flan.params["shared"]["embedding"])
    for row in np.asarray(params["prompt_embeddings"]):
        assert (np.abs(table - row).max(axis=1) == 0).any()


@pytest.mark.skipif(not (SHARED / "tokenizers" / "t5").is_dir(), reason="../shared/tokenizers/t5 not present")
def test_text_init_repeats_the_phrase():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "t5")
    table = jnp.arange(32128 * 4, dtype=jnp.float32).reshape(32128, 4)
    cfg = prompt.PromptTuningConfig(num_virtual_tokens=7, init="text", text="Summarize the dialogue", tokenizer=tok)
    out = prompt.inject({"shared": {"embedding": table}}, cfg, jax.random.key(0))["prompt_embeddings"]
    ids = tok("Summarize the dialogue").input_ids  # HF PEFT keeps the tokenizer's special tokens: ...dialogue </s> Sum
    assert ids[-1] == tok.eos_token_id
    expected = (ids * 7)[:7]
    np.testing.assert_array_equal(out, table[np.asarray(expected)])


def test_errors(flan):
    with pytest.raises(ValueError, match="num_virtual_tokens must be positive"):
        prompt.PromptTuningConfig(num_virtual_tokens=0)
    once = prompt.inject(flan.params, prompt.PromptTuningConfig(num_virtual_tokens=2), jax.random.key(0))
    with pytest.raises(ValueError, match="already has prompt_embeddings"):
        prompt.inject(once, prompt.PromptTuningConfig(num_virtual_tokens=2), jax.random.key(0))


@pytest.fixture(scope="module")
def t5_tokenizer():
    if not (SHARED / "tokenizers" / "t5").is_dir():
        pytest.skip("../shared/tokenizers/t5 not present")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "t5")


def test_nearest_tokens_of_a_text_init_are_its_own_tokens(t5_tokenizer):
    """Each virtual token starts as a token's embedding, so that token is its nearest, at cosine 1; a Gemma-style tree
    (its prompt on the sqrt(D) scale) and a P-tuning encoder's output read back the same way."""
    table = jax.random.normal(jax.random.key(0), (32128, 16))
    cfg = prompt.PromptTuningConfig(num_virtual_tokens=5, init="text", text="Summarize the dialogue", tokenizer=t5_tokenizer)
    expected = ["Sum", "mar", "ize", "the", "dialogue"]  # "▁Sum" etc.: SentencePiece's word marker stripped
    for tree_, scale in (({"shared": {"embedding": table}}, 1.0), ({"model": {"embed_tokens": {"embedding": table}}}, 4.0)):
        out = soft_prompt.nearest_tokens(prompt.inject(tree_, cfg, jax.random.key(1), embed_scale=scale), t5_tokenizer, k=3)
        assert [row[0][0] for row in out] == expected
        assert all(abs(row[0][1] - 1.0) < 1e-6 and row[1][1] < 0.99 for row in out)
        assert all(len(row) == 3 and row[0][1] >= row[1][1] >= row[2][1] for row in out)
    soft = prompt.inject({"shared": {"embedding": table}}, cfg, jax.random.key(1))["prompt_embeddings"]
    encoder = ptuning.init_encoder(jax.random.key(2), ptuning.PromptEncoderConfig(5, "MLP", 8), 16)
    unfolded = {"shared": {"embedding": table}, ptuning.ENCODER: encoder}
    assert soft_prompt.nearest_tokens(unfolded, t5_tokenizer) == soft_prompt.nearest_tokens(ptuning.fold(unfolded), t5_tokenizer)
    text_init = {"shared": {"embedding": table}, "prompt_embeddings": soft}
    assert soft_prompt.nearest_tokens(unfolded, t5_tokenizer) != soft_prompt.nearest_tokens(text_init, t5_tokenizer)


def test_nearest_tokens_order_matches_numpy(flan, t5_tokenizer):
    params = prompt.inject(flan.params, prompt.PromptTuningConfig(num_virtual_tokens=4), jax.random.key(5))
    rows, table = np.asarray(params["prompt_embeddings"], np.float64), np.asarray(flan.params["shared"]["embedding"], np.float64)
    cosine = (rows @ table.T) / np.linalg.norm(rows, axis=1)[:, None] / np.linalg.norm(table, axis=1)[None, :]
    out = soft_prompt.nearest_tokens(params, t5_tokenizer, k=6)
    for row, c in zip(out, cosine):
        top = np.argsort(-c)[:6]
        assert [text for text, _ in row] == [t5_tokenizer.decode([i]).strip() or t5_tokenizer.convert_ids_to_tokens(int(i)) for i in top]
        np.testing.assert_allclose([score for _, score in row], c[top], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="k must be in 1..96"):
        soft_prompt.nearest_tokens(params, t5_tokenizer, k=97)
    with pytest.raises(ValueError, match="no soft prompt"):
        soft_prompt.nearest_tokens(flan.params, t5_tokenizer)
