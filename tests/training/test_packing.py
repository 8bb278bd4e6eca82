"""Packing: rows hold several sequences, and each is computed exactly as if it had a row of its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import LlamaConfig, MistralConfig

from jpeft import lora, nn, packing, prompt, training
from jpeft.models import llama
from jpeft.models import attention
from jpeft.models import ops


def test_first_fit_places_every_sequence_once_within_capacity():
    lengths = [5, 3, 8, 2, 7, 1, 4]
    rows = packing.first_fit(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 3  # 30 tokens in rows of 10: first-fit decreasing finds the tight packing here
    assert rows == packing.first_fit(lengths, 10)
    with pytest.raises(ValueError, match="does not fit rows of 6"):
        packing.first_fit(lengths, 6)


def test_pack_layout_and_segment_positions():
    seqs = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    out = packing.pack(seqs, 6, pad_id=0)
    flat_ids, flat_seg = out["input_ids"].reshape(-1), out["segment_ids"].reshape(-1)
    for e, s in enumerate(seqs):
        start = out["start"][e]
        assert flat_ids[start:start + len(s)].tolist() == s
        assert len(set(flat_seg[start:start + len(s)].tolist())) == 1 and flat_seg[start] > 0
    assert int((out["segment_ids"] > 0).sum()) == 9 and out["input_ids"].shape == (2, 6)
    positions = np.asarray(ops.segment_positions(jnp.asarray(out["segment_ids"])))
    for e, s in enumerate(seqs):
        start = out["start"][e]
        assert positions.reshape(-1)[start:start + len(s)].tolist() == list(range(len(s)))
    with pytest.raises(ValueError, match="more than row_len"):
        packing.pack(seqs, 6, 0, rows=[[0, 2], [1]])


def _batch(seqs, n_targets, row_len, pack):
    packed = packing.pack(seqs, row_len, 0, rows=None if pack else [[i] for i in range(len(seqs))])
    targets = np.full((len(seqs), 4), -100, np.int32)
    for e, (s, n) in enumerate(zip(seqs, n_targets)):
        targets[e, :n] = s[len(s) - n:]
    batch = {"input_ids": packed["input_ids"], "targets": targets,
             "target_index": packed["start"] + np.array([len(s) - n for s, n in zip(seqs, n_targets)], np.int32)}
    key = "segment_ids" if pack else "attention_mask"
    batch[key] = packed["segment_ids"] if pack else (packed["segment_ids"] > 0).astype(np.int32)
    return batch


@pytest.mark.parametrize("config_cls,window", [(LlamaConfig, None), (MistralConfig, 4)])
def test_packed_loss_and_gradients_equal_one_row_per_sequence(config_cls, window):
    extra = {"sliding_window": window} if window else {}
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, pad_token_id=0, eos_token_id=1, **extra)
    params = lora.inject(llama.init_params(config, jax.random.key(0)), lora.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
                         jax.random.key(1))
    params = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 and x.shape[0] == 2 else x, params)  # nonzero lora_b
    rng = np.random.default_rng(0)
    lengths, n_targets = [9, 4, 6, 7, 3], [3, 2, 4, 1, 2]
    seqs = [rng.integers(2, 64, n).tolist() for n in lengths]
    unpacked, packed = _batch(seqs, n_targets, 10, pack=False), _batch(seqs, n_targets, 16, pack=True)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    # The reference: transformers-matched logits of each sequence alone.
    expected = []
    forward = jax.jit(lambda params, ids: llama.forward(config, params, ids, jnp.ones_like(ids)))
    for s, n in zip(seqs, n_targets):
        logp = jax.nn.log_softmax(forward(params, np.array([s], np.int32))[0], axis=-1)
        expected += [logp[t - 1, s[t]] for t in range(len(s) - n, len(s))]
    expected = -float(np.mean(expected))
    for remat in (False, True):
        loss = training.causal_lm_loss(config, remat=remat)
        values = [jax.jit(jax.value_and_grad(loss))(params, b, None) for b in (unpacked, packed)]
        for value, _ in values:
            assert float(value) == pytest.approx(expected, abs=1e-5)
        for g_unpacked, g_packed in zip(jax.tree.leaves(values[0][1]), jax.tree.leaves(values[1][1])):
            np.testing.assert_allclose(g_packed, g_unpacked, atol=1e-5)


def test_soft_prompt_refuses_packed_rows():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, pad_token_id=0)
    params = prompt.inject(llama.init_params(config, jax.random.key(0)), prompt.PromptTuningConfig(num_virtual_tokens=2), jax.random.key(1))
    batch = _batch([[3, 4, 5], [6, 7]], [1, 1], 8, pack=True)
    with pytest.raises(ValueError, match="cannot train on packed rows"):
        training.causal_lm_loss(config)(params, batch, None)


def test_row_length_trades_rows_for_length():
    lengths = [147, 156, 223, 240, 250, 282, 353, 445]  # the first 8 DialogSum dialogues, SmolLM2-tokenized
    assert packing.row_length(lengths, 64, attention_tokens=1e9) == 576  # 4 rows of 576 beat 6 of 448
    assert packing.row_length(lengths, 64, attention_tokens=1.0) == 448  # attention-bound: shortest rows
    assert packing.row_length([64], 64) == 64


def test_causal_attention_in_query_blocks_equals_one_block():
    B, KV, G, T, E = 2, 2, 3, 37, 8
    ks = jax.random.split(jax.random.key(0), 4)
    q, w = jax.random.normal(ks[0], (B, KV, G, T, E)), jax.random.normal(ks[3], (B, KV, G, T, E))
    k, v = jax.random.normal(ks[1], (B, KV, T, E)), jax.random.normal(ks[2], (B, KV, T, E))
    segments = jnp.asarray(np.repeat([[1, 2, 3, 0]], [10, 15, 9, 3], axis=1).repeat(B, axis=0))
    visible = llama.visibility(segments > 0, jnp.arange(T), None, segments)
    ctx = nn.Ctx()
    loss = lambda chunk: lambda q, k, v: jnp.sum(attention.causal_attention(q, k, v, visible, 0.3, ctx, chunk) * w)  # noqa: E731
    one, blocks = (jax.value_and_grad(loss(c), argnums=(0, 1, 2))(q, k, v) for c in (T, 8))
    np.testing.assert_allclose(blocks[0], one[0], rtol=1e-6)
    for a, b in zip(blocks[1], one[1]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_round_up():
    assert [packing.round_up(n, 64) for n in (1, 63, 64, 65, 128)] == [64, 64, 64, 128, 128]
