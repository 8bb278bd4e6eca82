"""GRPO: the loss and LoRA gradients against TRL 1.16's GRPOTrainer._compute_loss for each loss_type on fixed rollouts
(a tiny random Llama with PEFT LoRA, the reference taken with the adapter disabled), the advantages, a reward that
prefers one token raising its probability, one copy of the base in the step, and clear errors for bad rewards."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jpeft
from jpeft import lora, training, tree
from jpeft.models import llama
from jpeft.models.sampling import Sampling
from jpeft.training import grpo
from tests.training.test_preference import _accelerator, _lora_grads, tiny_peft_llama

TARGETS = ["q_proj", "v_proj"]
TEMPERATURE = 0.8
G = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with PEFT LoRA (TRL's fused head at the rollout temperature), the same weights in jpeft, and a
    fixed rollout: 2 prompts (one left-padded) x 2 completions (two stopped early)."""
    config, params, peft_model = tiny_peft_llama(tmp_path_factory.mktemp("llama"), TARGETS, 2, temperature=TEMPERATURE,
                                                 outputs=("log_probs", "entropy"))
    rng = np.random.default_rng(0)
    prompt_ids = np.repeat(rng.integers(3, 96, size=(2, 5)), G, axis=0)
    prompt_mask = np.ones_like(prompt_ids)
    prompt_ids[2:, :2], prompt_mask[2:, :2] = 0, 0
    completions = rng.integers(3, 96, size=(4, 6))
    completion_mask = (np.arange(6)[None] < np.array([[6], [3], [6], [1]])).astype(np.int64)
    return SimpleNamespace(config=config, params=params, peft=peft_model, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                           completions=completions, completion_mask=completion_mask, rewards=np.array([1.0, 0.2, -0.5, 0.7], np.float32))


def _trl_advantages(rewards):
    """TRL GRPOTrainer's group-scaled advantages (from _generate_and_score_completions)."""
    from trl.trainer.utils import nanstd

    r = torch.tensor(rewards)
    mean = r.view(-1, G).nanmean(dim=1).repeat_interleave(G)
    std = nanstd(r.view(-1, G), dim=1).repeat_interleave(G)
    return ((r - mean) / (std + 1e-4)).numpy()


def _trl_trainer(tiny, loss_type, beta):
    from trl import GRPOTrainer

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    accelerator = SimpleNamespace(**vars(_accelerator()), num_processes=1, is_main_process=True, autocast=contextlib.nullcontext,
                                  reduce=lambda x, reduction: x)
    trainer.__dict__.update(
        model=tiny.peft, accelerator=accelerator, aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1, max_completion_length=8,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1))
    return trainer


def _trl_logps(trainer, tiny, adapter: bool):
    from trl.trainer.utils import use_adapter

    ids = torch.tensor(np.concatenate([tiny.prompt_ids, tiny.completions], axis=1))
    mask = torch.tensor(np.concatenate([tiny.prompt_mask, tiny.completion_mask], axis=1))
    with torch.no_grad(), (contextlib.nullcontext() if adapter else use_adapter(tiny.peft, None)):
        return trainer._get_per_token_logps_and_entropies(tiny.peft, ids, mask, tiny.completions.shape[1])[0]


BETA = 0.05


@pytest.fixture(scope="module")
def rollout(tiny):
    """TRL's inputs for the fixed rollout (old log-probabilities drifted so ratios fall on both sides of the clip range,
    the reference with the adapter disabled), and jpeft's results for every loss_type compiled together."""
    trainer = _trl_trainer(tiny, "dapo", BETA)
    advantages = grpo.advantages(tiny.rewards, G)
    old = _trl_logps(trainer, tiny, adapter=True) + torch.tensor(np.random.default_rng(1).normal(0, 0.3, tiny.completions.shape), dtype=torch.float32)
    ref = _trl_logps(trainer, tiny, adapter=False)
    inputs = {"prompt_ids": torch.tensor(tiny.prompt_ids), "prompt_mask": torch.tensor(tiny.prompt_mask),
              "completion_ids": torch.tensor(tiny.completions), "completion_mask": torch.tensor(tiny.completion_mask),
              "advantages": torch.tensor(advantages), "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(tiny.completion_mask.sum()))}

    batch = grpo.completion_batch(tiny.prompt_ids, tiny.prompt_mask, tiny.completions, tiny.completion_mask)
    scored = grpo.score(tiny.config, TEMPERATURE)(tiny.params, batch)
    batch.update(advantages=advantages, old_logps=old.numpy(), ref_logps=np.asarray(scored["ref_logps"]))
    trainable, frozen = jpeft.partition(tiny.params, jpeft.trainable_mask(tiny.params))

    def run(t, b):
        out = {}
        for loss_type in grpo.LOSS_TYPES:
            loss_fn = grpo.grpo_loss(tiny.config, BETA, 0.2, 0.28, loss_type, temperature=TEMPERATURE, max_completion_length=8)
            out[loss_type] = jax.value_and_grad(lambda t: loss_fn.with_metrics(jpeft.combine(t, frozen), b, None), has_aux=True)(t)
        return out

    ours = jax.jit(run)(trainable, {k: jnp.asarray(v) for k, v in batch.items()})
    return SimpleNamespace(inputs=inputs, advantages=advantages, ref=ref, ref_ours=np.asarray(scored["ref_logps"]), ours=ours)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_loss_and_gradients_equal_trl(tiny, rollout, loss_type):
    np.testing.assert_allclose(rollout.advantages, _trl_advantages(tiny.rewards), rtol=1e-5)
    real = tiny.completion_mask > 0
    np.testing.assert_allclose(rollout.ref_ours[real], rollout.ref.numpy()[real], atol=1e-5)  # the adapter-off reference
    trainer = _trl_trainer(tiny, loss_type, BETA)
    tiny.peft.zero_grad()
    want = trainer._compute_loss(tiny.peft, rollout.inputs)
    want.backward()
    (loss, metrics), grads = rollout.ours[loss_type]
    assert abs(float(loss) - want.item()) < 1e-5, (float(loss), want.item())
    ours = {p: np.asarray(g) for p, g in tree.flatten(grads).items() if g is not None}
    ref_grads = _lora_grads(tiny.peft)
    scale = max(np.abs(g).max() for g in ref_grads.values())
    assert sorted(ours) == sorted(ref_grads) and scale > 1e-4
    for path, g in ref_grads.items():
        np.testing.assert_allclose(ours[path], g, atol=1e-5 * max(1.0, scale), err_msg=path)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    for k in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert abs(float(metrics[k]) - logged[k]) < 1e-5, k
    assert 0 < logged["clip_ratio/region_mean"] < 1


def test_a_reward_for_one_token_raises_its_probability():
    """Rewarding the share of a token in each completion: a few GRPO steps (two optimizer steps per rollout, KL to the
    adapter-off base) lift its probability well above the untrained model's. The step holds one copy of the base."""
    from transformers import LlamaConfig

    V, favourite = 32, 7
    config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, pad_token_id=0, eos_token_id=1)
    adapted = lora.LoraConfig(r=4, alpha=8, target_modules=[*TARGETS, "lm_head"])
    params = lora.inject(llama.init_params(config, jax.random.key(0)), adapted, jax.random.key(1))
    prompts = [[2, 5, 9, 11], [2, 13, 4], [2, 20, 21, 22, 23], [2, 3]]
    mask = jpeft.trainable_mask(params)
    trainable, frozen = jpeft.partition(params, mask)
    tx = jpeft.optimizer(optax.adam(0.05), mask)
    opt_state = tx.init(trainable)
    loss_fn = grpo.grpo_loss(config, beta=0.01, loss_type="dapo")
    step = training.make_train_step(loss_fn, tx, with_metrics=True)
    score = grpo.score(config)
    share = lambda b: jnp.mean(b["targets"] == favourite, axis=1)  # noqa: E731

    def favourite_share(params, key):
        batch = grpo.rollout(llama, config, params, prompts, group=8, max_new_tokens=4, sample=Sampling(top_k=0), key=key, eos_token_id=-1)
        return batch, grpo.token_rewards(share, batch, 8)

    before = favourite_share(params, jax.random.key(100))[1].mean()
    compiled = None
    for i in range(6):
        batch, rewards = favourite_share(jpeft.combine(trainable, frozen), jax.random.key(i))
        batch = {**batch, "advantages": grpo.advantages(rewards, 8)}
        batch = {k: jnp.asarray(v) for k, v in {**batch, **score(jpeft.combine(trainable, frozen), batch)}.items()}
        if compiled is None:
            args = (trainable, opt_state, frozen, batch, jax.random.key(0))
            compiled = training.compile_step(step, *args)
            nbytes = sum(x.nbytes for x in jax.tree.leaves(args[:4]))
            assert abs(compiled.memory_analysis().argument_size_in_bytes - nbytes) <= 64  # one base, the adapter, its state, the batch
        for _ in range(2):  # TRL's num_iterations: the old log-probabilities make the second step off-policy
            trainable, opt_state, loss, metrics = compiled(trainable, opt_state, frozen, batch, jax.random.key(0))
            assert np.isfinite(float(loss)) and float(metrics["kl"]) >= 0
    after = favourite_share(jpeft.combine(trainable, frozen), jax.random.key(100))[1].mean()
    assert before < 0.1 and after > 0.3, (before, after)  # 1 / 32 by chance


def test_bad_rollouts_and_rewards_are_named(tiny):
    with pytest.raises(ValueError, match="returned 3 rewards for 4 completions"):
        grpo.check_rewards([1.0, 2.0, 3.0], 4, G)
    with pytest.raises(ValueError, match=r"returned nan for completion 3 \(prompt 1, sample 1\)"):
        grpo.text_rewards(lambda p, c: [0.0, 1.0, 2.0, float("nan")], ["a"] * 4, ["b"] * 4, G)
    with pytest.raises(ValueError, match="must return one number per completion"):
        grpo.check_rewards(["good"] * 4, 4, G)
    sample = Sampling(top_k=0)
    with pytest.raises(ValueError, match="prompt 1 has 6 tokens, more than the budget of 5"):
        grpo.rollout(llama, tiny.config, tiny.params, [[2, 3], [2, 3, 4, 5, 6, 7]], group=G, max_new_tokens=4, sample=sample,
                     key=jax.random.key(0), max_prompt_len=5)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        grpo.rollout(llama, tiny.config, tiny.params, [[]], group=G, max_new_tokens=4, sample=sample, key=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'"):
        grpo.grpo_loss(tiny.config, loss_type="ppo")
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        grpo.advantages(np.zeros(4), 3)
