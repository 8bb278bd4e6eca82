"""(IA)^3: parity with HF PEFT's T5 defaults, identity at init, merge."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jpeft import ia3, tree
from tests.conftest import jpeft_logits, torch_logits


def test_ia3_matches_peft(flan):
    ref = peft.get_peft_model(flan.torch(), peft.IA3Config(task_type="SEQ_2_SEQ_LM"))
    params = ia3.inject(flan.params, ia3.IA3Config())
    np.testing.assert_array_equal(jpeft_logits(flan, params), jpeft_logits(flan, flan.params))
    flat = tree.flatten(params)
    torch.manual_seed(0)
    copied = set()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "ia3_l" not in name:
                continue
            p.copy_(1 + 0.3 * torch.randn_like(p))
            module = name.removeprefix("base_model.model.").split(".ia3_l")[0].replace(".", "/")
            leaf = "ia3_in" if p.shape[0] == 1 else "ia3_out"  # PEFT: (1, in) for feed-forward, (out, 1) otherwise
            assert f"{module}/{leaf}" in flat
            flat[f"{module}/{leaf}"] = jnp.asarray(p.numpy().reshape(-1))
            copied.add(f"{module}/{leaf}")
    assert copied == {p for p in flat if p.endswith(("ia3_in", "ia3_out"))}
    assert any("DenseReluDense/wo/ia3_in" in p for p in copied) and any("SelfAttention/k/ia3_out" in p for p in copied)
    params = tree.unflatten(flat)
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - torch_logits(ref.eval(), flan.ids, flan.mask, flan.dec)).max() < 1e-4
    assert np.abs(jpeft_logits(flan, ia3.merge(params)) - ours).max() < 1e-5


def test_inject_twice_fails(flan):
    with pytest.raises(ValueError, match="already has PEFT leaves"):
        ia3.inject(ia3.inject(flan.params, ia3.IA3Config()), ia3.IA3Config())
