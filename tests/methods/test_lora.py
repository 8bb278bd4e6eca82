"""LoRA: parity with HF PEFT, merge/unmerge, initialisation and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

from jpeft import lora, split, tree
from tests.conftest import jpeft_logits, torch_logits

TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
RANK_PATTERN = {"encoder.block.1.layer.0.SelfAttention.q": 2, "EncDecAttention.v": 6}
ALPHA_PATTERN = {"wo": 3.0}


def peft_lora_into_tree(peft_model, params):
    """Copy a PEFT model's LoRA A/B (PyTorch layout) into a jpeft tree that already has LoRA leaves."""
    flat = tree.flatten(params)
    seen = set()
    for name, value in peft_model.named_parameters():
        for kind, leaf in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
            if f".{kind}.default.weight" in name:
                module = name.removeprefix("base_model.model.").split(f".{kind}.")[0]
                path = f"{module.replace('.', '/')}/{leaf}"
                assert path in flat, f"PEFT adapts {module}, jpeft does not"
                assert flat[path].shape == value.T.shape
                flat[path] = jnp.asarray(value.detach().numpy().T)
                seen.add(path)
    assert seen == {p for p in flat if p.endswith(("/lora_a", "/lora_b"))}, "jpeft adapts modules PEFT does not"
    return tree.unflatten(flat)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft(flan, rslora):
    common = dict(target_modules=TARGETS, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, use_rslora=rslora)
    ref = peft.get_peft_model(flan.torch(), peft.LoraConfig(r=4, lora_alpha=8, **common))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)  # both A and B non-zero, of a trained adapter's size
    params = lora.inject(flan.params, lora.LoraConfig(r=4, alpha=8, **common), jax.random.key(0))
    params = peft_lora_into_tree(ref, params)
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - torch_logits(ref.eval(), flan.ids, flan.mask, flan.dec)).max() < 1e-4
    assert np.abs(ours - jpeft_logits(flan, flan.params)).max() > 1e-2  # the adapter really changes the output

    merged = lora.merge(params)
    assert jax.tree.structure(merged) == jax.tree.structure(flan.params)
    assert np.abs(jpeft_logits(flan, merged) - ours).max() < 1e-5

    base, adapter = split.split_adapter(params)
    restored = lora.unmerge(merged, adapter)
    np.testing.assert_allclose(jpeft_logits(flan, restored), ours, atol=1e-5)


def test_inject_shapes_scales_and_identity(flan):
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)
    params = lora.inject(flan.params, cfg, jax.random.key(0))
    enc_q = params["encoder"]["block"]["1"]["layer"]["0"]["SelfAttention"]["q"]
    assert enc_q["lora_a"].shape == (32, 2) and enc_q["lora_b"].shape == (2, 24) and float(enc_q["lora_scale"]) == 4.0
    wo = params["decoder"]["block"]["0"]["layer"]["2"]["DenseReluDense"]["wo"]
    assert float(wo["lora_scale"]) == pytest.approx(3.0 / 4)
    bound = 1 / np.sqrt(32)
    assert np.abs(enc_q["lora_a"]).max() <= bound and np.abs(enc_q["lora_a"]).max() > 0.5 * bound
    assert not np.any(enc_q["lora_b"])
    np.testing.assert_array_equal(jpeft_logits(flan, params), jpeft_logits(flan, flan.params))
    assert "lora_a" not in flan.params["encoder"]["block"]["1"]["layer"]["0"]["SelfAttention"]["q"]  # input untouched


def test_regex_targets_and_rslora_scale(flan):
    cfg = lora.LoraConfig(r=16, alpha=8, target_modules=r"decoder\..*\.(q|v)", use_rslora=True, init="gaussian")
    names = lora.target_names(flan.params, cfg)
    assert names and all(n.startswith("decoder.") and n.endswith((".q", ".v")) for n in names)
    params = lora.inject(flan.params, cfg, jax.random.key(0))
    q = params["decoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]
    assert float(q["lora_scale"]) == pytest.approx(8 / 4)
    assert np.std(np.asarray(q["lora_a"])) == pytest.approx(1 / 16, rel=0.3)


def test_pissa_starts_equal_to_the_base(flan):
    params = lora.inject(flan.params, lora.LoraConfig(r=4, alpha=4, target_modules=["q", "v"], init="pissa"), jax.random.key(0))
    q = params["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]
    assert np.any(q["lora_b"]) and np.abs(jpeft_logits(flan, params) - jpeft_logits(flan, flan.params)).max() < 1e-4


def test_merge_keeps_dtype_and_accumulates_in_float32(flan):
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), flan.params)
    params = lora.inject(bf16, lora.LoraConfig(r=2, target_modules=["q"]), jax.random.key(0))
    merged = lora.merge(params)
    assert all(v.dtype == jnp.bfloat16 for v in tree.flatten(merged).values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "rank must be positive"),
        (dict(alpha=0), "alpha must be positive"),
        (dict(rank_pattern={"q": -1}), "rank must be positive"),
        (dict(init="nope"), "unknown LoRA init"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lora.LoraConfig(**kwargs)


def test_targets_matching_nothing_lists_the_names(flan):
    with pytest.raises(ValueError, match=r"matches no module.*'q'.*'wi_0'"):
        lora.inject(flan.params, lora.LoraConfig(target_modules=["q_proj"]), jax.random.key(0))


def test_inject_twice_and_merge_without_lora(flan):
    once = lora.inject(flan.params, lora.LoraConfig(target_modules=["q"]), jax.random.key(0))
    with pytest.raises(ValueError, match="already has PEFT leaves"):
        lora.inject(once, lora.LoraConfig(target_modules=["q"]), jax.random.key(1))
    with pytest.raises(ValueError, match="no LoRA"):
        lora.merge(flan.params)
