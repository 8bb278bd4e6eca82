"""Many LoRA adapters on one base: a mixed batch equals each row run alone with its own adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import ia3, lora, multi, tree
from jpeft.models import t5


def _trained(params, cfg, seed):
    """A LoRA adapter with non-zero A and B (fresh B is zero, which would hide mistakes)."""
    p = lora.inject(params, cfg, jax.random.key(seed))
    flat = tree.flatten(p)
    for i, path in enumerate(sorted(flat)):
        if path.endswith(("/lora_a", "/lora_b")):
            flat[path] = 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(seed + 100), i), flat[path].shape)
    return jpeft.split_adapter(tree.unflatten(flat))[1]


@pytest.fixture(scope="module")
def adapters(flan):
    return [
        _trained(flan.params, lora.LoraConfig(r=4, alpha=8, target_modules=["q", "v"], rank_pattern={"EncDecAttention.v": 6}), 0),
        _trained(flan.params, lora.LoraConfig(r=2, alpha=4, target_modules=["q", "k", "wo"], use_rslora=True), 1),
        {},  # rows that should see the plain base
    ]


ROW_ADAPTER = np.array([1, 0, 2])


def test_stacked_shapes_pad_ranks_and_fill_missing_modules(flan, adapters):
    stacked = multi.stack_lora(adapters)
    v = stacked["decoder"]["block"]["0"]["layer"]["1"]["EncDecAttention"]["v"]
    assert v["lora_a"].shape == (3, 32, 6) and v["lora_b"].shape == (3, 6, 24) and v["lora_scale"].shape == (3,)
    k = stacked["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["k"]  # only adapter 1 has k
    assert k["lora_a"].shape == (3, 32, 2) and not np.any(k["lora_a"][0]) and not np.any(k["lora_b"][2]) and float(k["lora_scale"][0]) == 0
    q = stacked["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]  # r=4 and r=2 -> 4, the extra rank all zeros
    assert q["lora_a"].shape == (3, 32, 4) and not np.any(q["lora_a"][1][:, 2:]) and not np.any(q["lora_b"][1][2:])


def test_mixed_batch_equals_each_row_alone(flan, adapters):
    params = jpeft.attach(flan.params, multi.stack_lora(adapters))
    mixed = np.asarray(t5.forward(flan.config, params, flan.ids, flan.mask, flan.dec, adapter_ids=jnp.asarray(ROW_ADAPTER)))
    for row, k in enumerate(ROW_ADAPTER):
        alone = t5.forward(flan.config, jpeft.attach(flan.params, adapters[k]), flan.ids[row:row + 1], flan.mask[row:row + 1], flan.dec[row:row + 1])
        assert np.abs(mixed[row] - np.asarray(alone)[0]).max() <= 1e-5, row
    base = np.asarray(t5.forward(flan.config, flan.params, flan.ids, flan.mask, flan.dec))
    assert np.abs(mixed[0] - base[0]).max() > 1e-2 and np.abs(mixed[1] - base[1]).max() > 1e-2  # the adapters matter


@pytest.mark.parametrize("num_beams", [1, 2])
def test_mixed_batch_generation(flan, adapters, num_beams):
    params = jpeft.attach(flan.params, multi.stack_lora(adapters))
    ids = np.concatenate([flan.ids, flan.ids[:1]])  # the same source under two adapters in one batch
    mask = np.concatenate([flan.mask, flan.mask[:1]])
    which = np.concatenate([ROW_ADAPTER, [0]])
    mixed = np.asarray(t5.generate(flan.config, params, ids, mask, max_new_tokens=6, num_beams=num_beams, adapter_ids=which))
    for row, k in enumerate(which):
        alone = t5.generate(flan.config, jpeft.attach(flan.params, adapters[k]), ids[row:row + 1], mask[row:row + 1],
                            max_new_tokens=6, num_beams=num_beams)
        np.testing.assert_array_equal(mixed[row], np.asarray(alone)[0])
    assert not np.array_equal(mixed[0], mixed[3])  # adapter 1 and adapter 0 on the same source differ


def test_choose_one_adapter_per_call(flan, adapters):
    """Several adapters held in memory on one base; a call picks one with attach (no copies of the base)."""
    logits = [np.asarray(t5.forward(flan.config, jpeft.attach(flan.params, a), flan.ids, flan.mask, flan.dec)) for a in adapters]
    assert np.abs(logits[0] - logits[1]).max() > 1e-2
    np.testing.assert_array_equal(logits[2], np.asarray(t5.forward(flan.config, flan.params, flan.ids, flan.mask, flan.dec)))


def test_errors(flan, adapters, tmp_path):
    with pytest.raises(ValueError, match="LoRA adapters only"):
        multi.stack_lora([adapters[0], jpeft.split_adapter(ia3.inject(flan.params, ia3.IA3Config()))[1]])
    other = jax.tree.map(lambda x: jnp.zeros((x.shape[0] + 1, x.shape[1])) if x.ndim == 2 and x.shape[0] == 32 else x, adapters[0])
    with pytest.raises(ValueError, match="different bases"):
        multi.stack_lora([adapters[0], other])
    with pytest.raises(ValueError, match="no LoRA weights"):
        multi.stack_lora([{}, {}])
    params = jpeft.attach(flan.params, multi.stack_lora(adapters))
    with pytest.raises(ValueError, match="adapter_ids"):
        t5.forward(flan.config, params, flan.ids, flan.mask, flan.dec)
    # Under jit an id out of range cannot raise; its row turns NaN instead of clamping or wrapping to another adapter.
    run = jax.jit(lambda p, ids: t5.forward(flan.config, p, flan.ids, flan.mask, flan.dec, adapter_ids=ids))
    logits = np.asarray(run(params, jnp.asarray([3, -1, 0])))
    assert np.isnan(logits[:2]).all() and np.isfinite(logits[2]).all()
    with pytest.raises(ValueError, match="stacked"):
        jpeft.save_adapter(tmp_path / "x", params)
