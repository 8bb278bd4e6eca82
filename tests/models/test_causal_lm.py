"""What the decoder-only models share (jpeft/models/causal_lm.py): the attention's blockwise path for long rows, and
generation's packed prefill."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers

from jpeft import lora, multi, nn, split, training
from jpeft.models import causal_lm, family
from jpeft.models import attention
from tests.training.test_packing import _batch as packing_batch

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             pad_token_id=0, eos_token_id=1)
CONFIGS = {  # GQA with a sliding window; Gemma 2's score soft-cap with windowed and global layers (scanned as one stack under remat)
    "mistral_window": lambda: transformers.MistralConfig(sliding_window=24, **SMALL),
    "gemma2_softcap": lambda: transformers.Gemma2Config(head_dim=8, query_pre_attn_scalar=12, sliding_window=24, attn_logit_softcapping=2.0,
                                                         layer_types=["sliding_attention", "full_attention", "sliding_attention"], **SMALL),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_blockwise_attention_gives_the_dense_loss_and_lora_gradients(name, monkeypatch):
    config = CONFIGS[name]()
    model = family.of(config).module
    params = lora.inject(model.init_params(config, jax.random.key(0)), lora.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
                         jax.random.key(1))
    params = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 and x.shape[0] == 2 else x, params)  # nonzero lora_b
    rng = np.random.default_rng(0)
    lengths = [37, 21, 30, 40]  # one row of 134 slots: four segments and padding, in blocks of 16
    seqs = [rng.integers(2, 64, n).tolist() for n in lengths]
    batch = packing_batch(seqs, [4, 3, 4, 2], 134, pack=True)
    monkeypatch.setattr(attention, "FLASH_BLOCK", 16)
    calls, blockwise = [], attention.flash_attention
    monkeypatch.setattr(attention, "flash_attention", lambda *args: calls.append(args[3]) or blockwise(*args))
    for remat in (False, True):
        results = []
        for min_len in (10**9, 0):  # dense query blocks, then blockwise
            monkeypatch.setattr(attention, "FLASH_MIN_LEN", min_len)
            results.append(jax.jit(jax.value_and_grad(training.causal_lm_loss(config, remat=remat)))(params, batch, None))
        (dense, dense_grads), (flash, flash_grads) = results
        assert calls and all(isinstance(v, attention.Visibility) for v in calls)  # the second run took the blockwise path
        calls.clear()
        np.testing.assert_allclose(flash, dense, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(flash_grads), jax.tree.leaves(dense_grads)):
            np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("min_len", [10**9, 0], ids=["dense", "blockwise"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_prefill_fills_the_cache_the_padded_prefill_does(name, min_len, monkeypatch):
    import jax.numpy as jnp

    from jpeft import generation

    config = CONFIGS[name]()
    model = family.of(config)  # what the shared decoder is handed
    params = lora.inject(model.module.init_params(config, jax.random.key(0)), lora.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]),
                         jax.random.key(1))
    params = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 and x.shape[0] == 2 else x, params)  # nonzero lora_b
    rng = np.random.default_rng(1)
    lengths, P, cache_len = [37, 21, 30, 40], 40, 48  # windows of 24: the longer rows' early keys fall out of them
    mask = np.array([[0] * (P - n) + [1] * n for n in lengths], np.int32)
    ids = np.where(mask > 0, rng.integers(2, 64, mask.shape), 0).astype(np.int32)
    monkeypatch.setattr(attention, "FLASH_MIN_LEN", min_len)
    monkeypatch.setattr(attention, "PREFILL_BLOCK", 16)
    a, ctx = model.arch(config), nn.Ctx()
    packed_len = generation.bucket(sum(lengths), steps=8)
    assert packed_len < mask.size
    logits, cache = jax.jit(lambda p, i, m: causal_lm._packed_prefill(model, a, p, i, m, ctx, packed_len, cache_len))(params, ids, mask)

    def padded(params, ids, mask):
        x, m = model.embed(a, params, ids, mask, jnp.float32)
        shape = (len(lengths), a.num_kv_heads, cache_len, a.head_dim)
        cache = [(jnp.zeros(shape), jnp.zeros(shape)) for _ in range(a.num_layers)]
        key_mask = jnp.pad(m, ((0, 0), (0, cache_len - P)), constant_values=1)
        h, cache = model.decoder(a, params, x, causal_lm.positions_from_mask(m), key_mask, ctx, cache, 0)
        return model.lm_head(a, params, h[:, -1], ctx), cache

    want_logits, want_cache = jax.jit(padded)(params, ids, mask)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5)
    real = np.pad(mask, ((0, 0), (0, cache_len - P))).astype(bool)  # the slots the key mask lets decoding see
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache)):
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got).transpose(0, 2, 1, 3)[real], np.asarray(want).transpose(0, 2, 1, 3)[real], atol=1e-5)


def test_generate_packs_ragged_prompts_only(monkeypatch):
    config = CONFIGS["mistral_window"]()
    model = family.of(config).module
    params = model.init_params(config, jax.random.key(0))
    calls, packed = [], causal_lm._packed_prefill
    monkeypatch.setattr(causal_lm, "_packed_prefill", lambda *args: calls.append(args[6]) or packed(*args))
    ragged = np.array([[0, 0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9, 10]], np.int32)
    ragged_out = model.generate(config, params, ragged, (ragged > 0).astype(np.int32), max_new_tokens=4)
    assert calls == [13]  # 13 real tokens in 13 slots, not 2 x 8
    model.generate(config, params, ragged[1:], np.ones((1, 8), np.int32), max_new_tokens=4)  # nothing to save
    adapter = split.split_adapter(lora.inject(params, lora.LoraConfig(r=2, target_modules=["q_proj"]), jax.random.key(1)))[1]
    stacked = split.attach(params, multi.stack_lora([adapter]))
    model.generate(config, stacked, ragged, (ragged > 0).astype(np.int32), max_new_tokens=4, adapter_ids=np.zeros(2, np.int32))
    assert calls == [13]  # per-row adapters keep the rows apart
    # Row by row (no padding, nothing packed) the tokens are the same.
    for row, out in zip(ragged, np.asarray(ragged_out)):
        real = row[row > 0][None]
        np.testing.assert_array_equal(model.generate(config, params, real, np.ones_like(real), max_new_tokens=4)[0], out)
