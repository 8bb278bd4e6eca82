"""What the decoder-only models share (jpeft/models/causal_lm.py): the attention's blockwise path for long rows."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers

from jpeft import lora, nn, training
from jpeft.models import causal_lm
from tests.test_packing import _batch as packing_batch

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
    model = causal_lm.model_for(config)
    params = lora.inject(model.init_params(config, jax.random.key(0)), lora.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
                         jax.random.key(1))
    params = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 and x.shape[0] == 2 else x, params)  # nonzero lora_b
    rng = np.random.default_rng(0)
    lengths = [37, 21, 30, 40]  # one row of 134 slots: four segments and padding, in blocks of 16
    seqs = [rng.integers(2, 64, n).tolist() for n in lengths]
    batch = packing_batch(seqs, [4, 3, 4, 2], 134, pack=True)
    monkeypatch.setattr(nn, "FLASH_BLOCK", 16)
    calls, blockwise = [], nn.flash_attention
    monkeypatch.setattr(nn, "flash_attention", lambda *args: calls.append(args[3]) or blockwise(*args))
    for remat in (False, True):
        results = []
        for min_len in (10**9, 0):  # dense query blocks, then blockwise
            monkeypatch.setattr(nn, "FLASH_MIN_LEN", min_len)
            results.append(jax.jit(jax.value_and_grad(training.causal_lm_loss(config, remat=remat)))(params, batch, None))
        (dense, dense_grads), (flash, flash_grads) = results
        assert calls and all(isinstance(v, nn.Visibility) for v in calls)  # the second run took the blockwise path
        calls.clear()
        np.testing.assert_allclose(flash, dense, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(flash_grads), jax.tree.leaves(dense_grads)):
            np.testing.assert_allclose(a, b, atol=1e-5)
