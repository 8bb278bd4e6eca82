"""Batches built from token ids: the layouts the losses read, checked against full-logit references."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jpeft import batches, lora, training


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig

    from jpeft.models import llama

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    params = lora.inject(llama.init_params(config, jax.random.key(0)), lora.LoraConfig(r=2, target_modules=["q_proj"]), jax.random.key(1))
    return config, params


def _reference_loss(config, params, prompts, targets):
    """Mean negative log-likelihood of each target token, each example run alone through the full forward pass."""
    from jpeft.models import llama

    nll = []
    for p, t in zip(prompts, targets):
        ids = np.array([p + t], np.int32)
        logp = jax.nn.log_softmax(llama.forward(config, params, ids, np.ones_like(ids)), axis=-1)[0]
        nll += [-float(logp[len(p) + k - 1, tok]) for k, tok in enumerate(t)]
    return np.mean(nll)


@pytest.mark.parametrize("pack", [False, True], ids=["rows", "packed"])
def test_causal_lm_batch_gives_the_loss_of_each_example_alone(tiny_llama, pack):
    config, params = tiny_llama
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 64, size=n).tolist() for n in (7, 3, 12, 5)]
    targets = [rng.integers(2, 64, size=n).tolist() for n in (2, 5, 1, 3)]
    batch = batches.causal_lm_batch(prompts, targets, pad_id=0, eos_id=1, max_target=8, pack=pack, row_len=32 if pack else None, bucket=16)
    with_eos = [t + [1] for t in targets]
    assert batch["targets"].shape == (4, 8) and (batch["targets"] == -100).sum() == 4 * 8 - sum(map(len, with_eos))
    # target_index points at each example's first target token in the flattened batch
    np.testing.assert_array_equal(batch["input_ids"].reshape(-1)[batch["target_index"]], [t[0] for t in targets])
    rows = batch["input_ids"].shape[0]
    assert ("segment_ids" in batch) == pack and (rows < len(prompts) if pack else rows == len(prompts))
    got = float(training.causal_lm_loss(config)(params, batch, None))
    assert got == pytest.approx(_reference_loss(config, params, prompts, with_eos), abs=1e-5)


def test_seq2seq_batch_layout():
    b = batches.seq2seq_batch([[5, 6, 7], [8]], [[9], [10, 11]], pad_id=0, eos_id=1, max_target=4, bucket=4)
    np.testing.assert_array_equal(b["input_ids"], [[5, 6, 7, 0], [8, 0, 0, 0]])
    np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(b["labels"], [[9, 1, -100, -100], [10, 11, 1, -100]])


def test_pad_left_and_right():
    np.testing.assert_array_equal(batches.pad([[1, 2], [3]], 0, left=True, bucket=4), [[0, 0, 1, 2], [0, 0, 0, 3]])
    np.testing.assert_array_equal(batches.pad([[1, 2], []], 9, length=3), [[1, 2, 9], [9, 9, 9]])


def test_bad_batches_are_named():
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        batches.causal_lm_batch([[1], [2]], [[3]], pad_id=0)
    with pytest.raises(ValueError, match="empty target"):
        batches.causal_lm_batch([[1]], [[]], pad_id=0)
    with pytest.raises(ValueError, match="does not fit a padded length of 2"):
        batches.seq2seq_batch([[1]], [[3, 4, 5]], pad_id=0, max_target=2)
    with pytest.raises(ValueError, match="no sequences"):
        batches.pad([], 0)


def test_losses_name_the_right_loss_and_the_batch_helper(tiny_llama, flan):
    config, params = tiny_llama
    with pytest.raises(TypeError, match=r"seq2seq_loss is for encoder-decoder .* 'llama' model: use training.causal_lm_loss\(config\)"):
        training.seq2seq_loss(config)
    with pytest.raises(TypeError, match=r"causal_lm_loss is for decoder-only .* 't5' model: use training.seq2seq_loss\(config\)"):
        training.causal_lm_loss(flan.config)
    from jpeft.models import t5

    training.seq2seq_loss(t5.arch(flan.config))  # jpeft's resolved configs are told apart too
    with pytest.raises(TypeError, match="causal_lm_loss is for decoder-only"):
        training.causal_lm_loss(t5.arch(flan.config))
    hf_style = {"input_ids": np.ones((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int32), "labels": np.ones((1, 4), np.int32)}
    with pytest.raises(KeyError, match=r"missing \['targets', 'target_index'\].*jpeft.batches.causal_lm_batch"):
        training.causal_lm_loss(config)(params, hf_style, None)
