"""The jitted train step: no gradients for frozen weights, optimizer state only for trainable leaves, loss falls."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import adapters, ia3, lora, prompt, ptuning, selective, training
from jpeft.training.batches import IGNORE


@pytest.fixture(scope="module")
def batch(flan):
    labels = np.array(flan.dec)
    labels[2, 3:] = -100  # padded label positions are ignored
    return {"input_ids": jnp.asarray(flan.ids), "attention_mask": jnp.asarray(flan.mask), "labels": jnp.asarray(labels)}


def _dot_output_shapes(jaxpr) -> list[tuple]:
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            shapes += _dot_output_shapes(sub)
    return shapes


def _weight_gradient_dots(flan, params, mask, batch) -> int:
    trainable, frozen = jpeft.partition(params, mask)
    loss = training.seq2seq_loss(flan.config)
    jaxpr = jax.make_jaxpr(jax.grad(lambda t: loss(jpeft.combine(t, frozen), batch, None)))(trainable).jaxpr
    kernels = {tuple(x.shape) for x in jax.tree.leaves(flan.params) if x.ndim == 2}
    kernels |= {s[::-1] for s in kernels}
    return sum(s in kernels for s in _dot_output_shapes(jaxpr))


def test_lora_step_forms_no_gradient_for_frozen_kernels(flan, batch):
    params = lora.inject(flan.params, lora.LoraConfig(r=4, target_modules=["q", "v"]), jax.random.key(0))
    assert _weight_gradient_dots(flan, params, jpeft.trainable_mask(params), batch) == 0
    full = jax.tree.map(lambda _: True, flan.params)  # control: full fine-tuning does form them
    assert _weight_gradient_dots(flan, flan.params, full, batch) > 10


def test_adam_state_is_twice_the_trainable_count(flan):
    params = lora.inject(flan.params, lora.LoraConfig(r=4, target_modules=["q", "v"]), jax.random.key(0))
    trainable, _ = jpeft.partition(params, jpeft.trainable_mask(params))
    state = optax.adam(1e-3).init(trainable)
    n = sum(x.size for x in jax.tree.leaves(trainable))
    assert sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)) == 2 * n


def test_token_cross_entropy_ignores_padding():
    logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1]]]))
    total, count = training.token_cross_entropy(logits, jnp.array([[0, -100]]))
    assert int(count) == 1 and float(total) == pytest.approx(np.log(2))


def test_token_cross_entropy_value_and_gradient_match_torch():
    import torch

    logits = np.random.default_rng(0).normal(size=(3, 5, 11)).astype(np.float32) * 3
    labels = np.array([[1, 4, -100, 10, 0], [-100, -100, 2, 3, 7], [5, 5, 5, -100, 9]])
    total, count = training.token_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    grad = jax.grad(lambda x: training.token_cross_entropy(x, jnp.asarray(labels))[0] / 11)(jnp.asarray(logits))
    x = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(x.reshape(-1, 11), torch.tensor(labels).reshape(-1), ignore_index=-100, reduction="sum")
    (ref / 11).backward()
    assert int(count) == 11
    np.testing.assert_allclose(float(total), ref.item(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad)[labels == -100] == 0)


METHODS = {
    "lora": lambda p, k: (lora.inject(p, lora.LoraConfig(r=4, alpha=8, target_modules=["q", "v"]), k), {}),
    "prompt": lambda p, k: (prompt.inject(p, prompt.PromptTuningConfig(num_virtual_tokens=4), k), {}),
    "ptuning": lambda p, k: (ptuning.inject(p, ptuning.PromptEncoderConfig(4, "LSTM", 16, encoder_dropout=0.1), k), {}),
    "ia3": lambda p, k: (ia3.inject(p, ia3.IA3Config()), {}),
    "adapter": lambda p, k: (adapters.inject(p, adapters.AdapterConfig(reduction_factor=8), k), {}),
    "selective": lambda p, k: (p, {"selective": selective.SelectiveConfig(layer_norms=True)}),
    "full": lambda p, k: (p, {"modules_to_save": ["encoder", "decoder", "shared", "lm_head"]}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_loss_falls_for_every_method(flan, batch, method):
    params, mask_kwargs = METHODS[method](flan.params, jax.random.key(0))
    mask = jpeft.trainable_mask(params, **mask_kwargs)
    trainable, frozen = jpeft.partition(params, mask)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its input; keep the shared fixture intact
    tx = optax.adam(3e-2 if method in ("ia3", "selective", "prompt") else 1e-2)
    step = training.make_train_step(training.seq2seq_loss(flan.config), tx)
    opt_state = tx.init(trainable)
    losses = []
    for i in range(12):
        trainable, opt_state, loss = step(trainable, opt_state, frozen, batch, None)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def test_remat_scan_gives_the_same_loss_and_gradients(flan, batch):
    params = lora.inject(flan.params, lora.LoraConfig(r=4, target_modules=["q", "v", "wo"]), jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 and x.shape[0] == 4 else x, params)  # non-zero B
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    rng = jax.random.key(5)  # dropout on: the per-layer key streams must agree too

    def loss_and_grad(remat):
        loss = training.seq2seq_loss(flan.config, remat=remat)
        return jax.jit(jax.value_and_grad(lambda t: loss(jpeft.combine(t, frozen), batch, rng)))(trainable)

    (plain, g_plain), (scanned, g_scanned) = loss_and_grad(False), loss_and_grad(True)
    assert abs(float(plain) - float(scanned)) < 1e-5
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_scanned))) < 1e-5


def test_causal_lm_loss_scores_only_targets_and_matches_full_logits(monkeypatch):
    from transformers import LlamaConfig

    from jpeft.models import llama

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    params = lora.inject(llama.init_params(config, jax.random.key(0)), lora.LoraConfig(r=2, target_modules=["q_proj", "down_proj", "lm_head"]),
                         jax.random.key(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 64, size=(2, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    starts = np.array([6, 5], np.int32)
    targets = np.full((2, 4), -100, np.int32)
    targets[0] = ids[0, 6:10]
    targets[1, :3] = ids[1, 5:8]
    batch = {"input_ids": ids, "attention_mask": mask, "target_index": starts + np.array([0, 10], np.int32), "targets": targets}
    logp = jax.nn.log_softmax(llama.forward(config, params, ids, mask), axis=-1)
    expected = -np.mean([logp[0, t - 1, ids[0, t]] for t in range(6, 10)] + [logp[1, t - 1, ids[1, t]] for t in range(5, 8)])
    for remat in (False, True):
        assert float(training.causal_lm_loss(config, remat=remat)(params, batch, None)) == pytest.approx(float(expected), abs=1e-5)
    # The LM head and loss in chunks of 3 of the 8 target positions: the same loss and gradients.
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    grad = lambda: jax.value_and_grad(lambda t: training.causal_lm_loss(config)(jpeft.combine(t, frozen), batch, None))(trainable)  # noqa: E731
    whole = grad()
    monkeypatch.setattr(training.losses, "LOGITS_CHUNK_BYTES", 3 * 64 * 4)
    chunked = grad()
    assert float(chunked[0]) == pytest.approx(float(expected), abs=1e-5)
    for a, b in zip(jax.tree.leaves(whole[1]), jax.tree.leaves(chunked[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(jnp.abs(chunked[1]["lm_head"]["lora_b"]).max()) > 0  # the head's LoRA learns through the chunks


def test_compile_step_matches_the_jitted_step():
    tx = optax.adamw(1e-2)
    step = training.make_train_step(lambda p, b, r: jnp.mean((b["x"] @ p["w"] + p["c"] - b["y"]) ** 2), tx)
    params, frozen = jpeft.partition({"w": jnp.ones((3, 2)), "c": jnp.ones(2)}, {"w": True, "c": False})
    batch = {"x": np.arange(12.0, dtype=np.float32).reshape(4, 3), "y": np.ones((4, 2), np.float32)}
    compiled = training.compile_step(step, params, tx.init(params), frozen, batch, None)
    fresh = lambda: jax.tree.map(jnp.copy, params)  # noqa: E731  (the step donates its inputs)
    want = step(fresh(), tx.init(params), frozen, batch, None)
    got = compiled(fresh(), tx.init(params), frozen, batch, None)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(TypeError):  # an executable is for the shapes it was compiled for
        compiled(fresh(), tx.init(params), frozen, {"x": batch["x"][:2], "y": batch["y"][:2]}, None)


@pytest.mark.parametrize("rows", [7, 64])
def test_head_cross_entropy_in_chunks_equals_the_whole(rows):
    """Chunks of `rows` (ragged last chunk at 7; whole at 64) give the loss, the count and the gradients of
    the hidden states and of the head's weight that the unchunked loss gives."""
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(30, 8)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    labels = jnp.asarray(np.where(rng.random(30) < 0.2, IGNORE, rng.integers(0, 11, 30)), jnp.int32)
    chunks = []

    def loss(h, w, chunk_bytes):
        def head(x, i):
            chunks.append(i)
            return x @ w
        total, count = training.head_cross_entropy(head, h, labels, chunk_bytes=chunk_bytes)
        return total / count

    whole = jax.value_and_grad(lambda h, w: training.token_cross_entropy(h @ w, labels)[0] / jnp.sum(labels != IGNORE), (0, 1))
    chunked = jax.value_and_grad(loss, (0, 1))
    want, got = whole(hidden, weight), chunked(hidden, weight, rows * 11 * 4)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert max(chunks) == (0 if rows >= 30 else 4)  # 30 rows: chunks 0..4 of 7, or one


def test_bf16_base_trains_float32_masters_as_the_float32_base_does():
    """A base stored in bf16 (`load_pretrained(dtype=jnp.bfloat16)`, the CLI's --dtype bfloat16) computed in bf16: the
    frozen weights stay bf16 while LoRA and the optimizer's state are float32 masters (`partition`); three steps' losses
    and LoRA updates follow the float32 base's within bf16's rounding. (SGD with momentum: its updates are linear in the
    gradients, so they compare the gradients themselves; Adam's sign-like first steps would flip on near-zero ones.)"""
    from transformers import LlamaConfig

    from jpeft.training.batches import causal_lm_batch
    from jpeft.models import llama

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    base = llama.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = causal_lm_batch([rng.integers(2, 128, n).tolist() for n in (9, 5, 12)], [rng.integers(2, 128, n).tolist() for n in (4, 6, 3)],
                            pad_id=0, eos_id=1, pack=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    runs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        params = lora.inject(jax.tree.map(lambda x: x.astype(dtype), base), lora.LoraConfig(r=4, target_modules=targets), jax.random.key(1))
        trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
        start = jax.tree.map(np.asarray, trainable)
        tx = optax.sgd(0.5, momentum=0.9)
        step, state, losses = training.make_train_step(training.causal_lm_loss(config, dtype=dtype), tx), tx.init(trainable), []
        for _ in range(3):
            trainable, state, loss = step(trainable, state, frozen, batch, None)
            losses.append(float(loss))
        moved = np.concatenate([np.ravel(np.asarray(x) - x0) for x, x0 in zip(jax.tree.leaves(trainable), jax.tree.leaves(start))])
        runs[dtype] = trainable, state, frozen, losses, moved
    trainable, state, frozen, losses, moved = runs[jnp.bfloat16]
    assert {x.dtype for x in jax.tree.leaves((trainable, state)) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen) if x.ndim == 2} == {jnp.dtype(jnp.bfloat16)}
    *_, full_losses, full_moved = runs[jnp.float32]
    np.testing.assert_allclose(losses, full_losses, rtol=1e-2)
    assert losses[-1] < losses[0]
    assert np.linalg.norm(moved - full_moved) < 0.05 * np.linalg.norm(full_moved)
