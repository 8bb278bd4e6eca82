"""The trainable split: masks, partition/combine, optimizer state, adapter swapping, parameter counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest

import jpeft
from jpeft import adapters, ia3, lora, prompt, tree
from tests.conftest import jpeft_logits


def _float_state_size(state) -> int:
    return sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))


def test_mask_partition_combine(flan):
    params = lora.inject(flan.params, lora.LoraConfig(r=2, target_modules=["q", "v"], modules_to_save=["lm_head"]), jax.random.key(0))
    mask = jpeft.trainable_mask(params, modules_to_save=["lm_head"])
    on = sorted(p for p, m in tree.flatten(mask).items() if m)
    assert "lm_head/kernel" in on and all(p.endswith(("lora_a", "lora_b")) for p in on if p != "lm_head/kernel")
    assert not any(p.endswith("lora_scale") for p in on)
    trainable, frozen = jpeft.partition(params, mask)
    assert len(jax.tree.leaves(trainable)) == len(on)
    assert len(jax.tree.leaves(trainable)) + len(jax.tree.leaves(frozen)) == len(jax.tree.leaves(params))
    back = jpeft.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert all(a is b for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))


def test_optimizer_keeps_state_only_for_trainable_leaves(flan):
    params = lora.inject(flan.params, lora.LoraConfig(r=2, target_modules=["q", "v"]), jax.random.key(0))
    mask = jpeft.trainable_mask(params)
    n_trainable, _ = jpeft.count_params(params, mask, verbose=False)
    tx = jpeft.optimizer(optax.adamw(1e-3), mask)
    state = tx.init(params)
    assert _float_state_size(state) == 2 * n_trainable
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    for path, u in tree.flatten(updates).items():
        assert bool(jnp.any(u != 0)) == tree.flatten(mask)[path], path


def test_count_params_prints_like_peft(flan, capsys):
    ref = peft.get_peft_model(flan.torch(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "wo"]))
    ref.print_trainable_parameters()
    expected = capsys.readouterr().out.strip()
    params = lora.inject(flan.params, lora.LoraConfig(r=4, alpha=8, target_modules=["q", "v", "wo"]), jax.random.key(0))
    jpeft.count_params(params)
    assert capsys.readouterr().out.strip() == expected


def test_split_attach_swaps_adapters_on_one_base(flan):
    a = lora.inject(flan.params, lora.LoraConfig(r=2, target_modules=["q"], init="gaussian"), jax.random.key(1))
    a = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 and x.shape[0] == 2 else x, a)  # make lora_b non-zero
    b = ia3.inject(flan.params, ia3.IA3Config())
    b = jax.tree.map(lambda x: x * 1.5 if x.ndim == 1 and x.shape == (24,) else x, b)
    base, adapter_a = jpeft.split_adapter(a)
    _, adapter_b = jpeft.split_adapter(b)
    assert jax.tree.structure(base) == jax.tree.structure(flan.params)
    assert all(x is y for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(flan.params)))  # no copies
    np.testing.assert_array_equal(jpeft_logits(flan, jpeft.attach(base, adapter_a)), jpeft_logits(flan, a))
    np.testing.assert_array_equal(jpeft_logits(flan, jpeft.attach(base, adapter_b)), jpeft_logits(flan, b))


def test_attach_rejects_an_adapter_for_another_base(flan):
    _, adapter = jpeft.split_adapter(lora.inject(flan.params, lora.LoraConfig(r=2, target_modules=["q"]), jax.random.key(0)))
    wrong = jax.tree.map(lambda x: jnp.zeros((x.shape[0] + 1, *x.shape[1:])) if x.ndim == 2 else x, adapter)
    with pytest.raises(ValueError, match="does not fit the base kernel"):
        jpeft.attach(flan.params, wrong)
    with pytest.raises(ValueError, match="has no base kernel"):
        jpeft.attach({"shared": flan.params["shared"]}, adapter)


def test_every_method_leaves_a_trainable_mask(flan):
    key = jax.random.key(0)
    for params in (
        lora.inject(flan.params, lora.LoraConfig(target_modules=["q"]), key),
        prompt.inject(flan.params, prompt.PromptTuningConfig(num_virtual_tokens=3), key),
        ia3.inject(flan.params, ia3.IA3Config()),
        adapters.inject(flan.params, adapters.AdapterConfig(), key),
    ):
        trainable, _ = jpeft.count_params(params, verbose=False)
        _, adapter = jpeft.split_adapter(params)
        assert 0 < trainable <= sum(x.size for x in jax.tree.leaves(adapter))


def test_tree_paths_take_integer_keys_as_digits():
    """An NNX state's list indices are ints: paths spell them as digits, and go back as strings."""
    from jpeft import tree

    flat = tree.flatten({"blocks": {0: {"kernel": 1}, 1: {"kernel": 2}}})
    assert flat == {"blocks/0/kernel": 1, "blocks/1/kernel": 2}
    assert tree.unflatten(flat) == {"blocks": {"0": {"kernel": 1}, "1": {"kernel": 2}}}
