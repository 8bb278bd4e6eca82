"""Selective fine-tuning: which existing leaves train."""

from __future__ import annotations

import pytest

import jpeft
from jpeft import selective, tree


def _on(flan, cfg):
    return {p for p, m in tree.flatten(jpeft.trainable_mask(flan.params, selective=cfg)).items() if m}


def test_layer_norms_and_position_bias(flan):
    on = _on(flan, selective.SelectiveConfig(layer_norms=True))
    assert on and all(p.endswith("layer_norm/weight") for p in on)
    assert len(on) == 2 * 2 + 3 * 3 + 2  # every sub-layer norm plus the two final norms
    on = _on(flan, selective.SelectiveConfig(relative_attention_bias=True))
    assert on == {"encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding",
                  "decoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding"}


def test_named_modules_and_last_blocks(flan):
    on = _on(flan, selective.SelectiveConfig(target_modules=["EncDecAttention"]))
    assert on and all("EncDecAttention" in p for p in on) and len(on) == 3 * 4
    on = _on(flan, selective.SelectiveConfig(last_n_blocks=1))
    assert on and all(p.startswith(("encoder/block/1/", "decoder/block/2/")) for p in on)


def test_selecting_nothing_is_an_error(flan):
    with pytest.raises(ValueError, match="selects no parameters"):
        selective.selected_paths({"encoder": {"block": {"0": {"SelfAttention": {"q": {"kernel": 0}}}}}}, selective.SelectiveConfig(layer_norms=True))
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matches no module. Module names in this model: .*'EncDecAttention'"):
        selective.selected_paths(flan.params, selective.SelectiveConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="last_n_blocks must be positive"):
        selective.SelectiveConfig(last_n_blocks=0)
