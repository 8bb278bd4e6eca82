"""Preference losses against TRL 1.16 on a tiny random Llama with PEFT LoRA: the loss, the LoRA gradients and the
metrics of DPOTrainer (sigmoid, ipo, hinge, robust; reference = the adapter disabled), CPOTrainer's simpo and
ORPOTrainer, each computed by TRL's own trainer code on the PEFT model's own forward; padded and packed batches."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jpeft
from jpeft import batches, lora, training, tree
from jpeft.training import preference
from jpeft.models import llama
from tests.models.test_llama import make_hf_llama
from tests.methods.test_lora import peft_lora_into_tree

PAD, EOS = 0, 1
TARGETS = ["q_proj", "v_proj", "down_proj"]
# Three pairs: prompts of different lengths; completions of different lengths, all ending in EOS.
PROMPTS = [[2, 10, 11, 12], [2, 20, 21], [2, 30, 31, 32, 33, 34]]
CHOSEN = [[40, 41, 42, EOS], [50, EOS], [60, 61, 62, 63, EOS]]
REJECTED = [[43, EOS], [51, 52, 53, 54, EOS], [64, 65, EOS]]
SETTINGS = {  # kind -> (preference_loss options, the TRL trainer's)
    "sigmoid": (dict(beta=0.3), dict(beta=0.3)),
    "ipo": (dict(beta=0.2), dict(beta=0.2)),
    "hinge": (dict(beta=4.0), dict(beta=4.0)),  # large enough that some pairs sit inside the hinge
    "robust": (dict(beta=0.3, label_smoothing=0.2), dict(beta=0.3, label_smoothing=0.2)),
    "simpo": (dict(beta=2.0, gamma=0.7, label_smoothing=0.1, sft_weight=0.5),
              dict(beta=2.0, simpo_gamma=0.7, label_smoothing=0.1, cpo_alpha=0.5)),
    "orpo": (dict(beta=0.25), dict(beta=0.25)),
}


def tiny_peft_llama(path, targets, seed, **fused_head):
    """(jpeft config, jpeft params with LoRA, PEFT model in train mode): a tiny random Llama with the same random LoRA
    weights on both sides (A and B non-zero, so the policy differs from its reference) and TRL's fused LM head added
    as its trainers add it (`fused_head`: add_fused_lm_head's temperature / outputs)."""
    import peft
    from trl.trainer.utils import add_fused_lm_head

    model = make_hf_llama(path, vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, tie_word_embeddings=False)
    config, params = llama.load_pretrained(path)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    add_fused_lm_head(peft_model.get_base_model(), **fused_head)
    params = lora.inject(params, lora.LoraConfig(r=4, alpha=8, target_modules=targets), jax.random.key(0))
    return config, peft_lora_into_tree(peft_model, params), peft_model.train()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama with PEFT LoRA every loss kind is checked on, and its jpeft twin."""
    config, params, peft_model = tiny_peft_llama(tmp_path_factory.mktemp("llama"), TARGETS, 1,
                                                 outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return SimpleNamespace(config=config, params=params, peft=peft_model)


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m, gather=lambda x: x, gather_for_metrics=lambda x: x)


def _trl_dpo(peft_model, kind, options):
    """(loss, metrics) of TRL DPOTrainer._compute_loss, run on the PEFT model with the adapter off as its reference."""
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=peft_model, ref_model=None, accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), f_divergence_type="reverse_kl", loss_types=[kind], loss_weights=[1.0],
        label_smoothing=options.get("label_smoothing", 0.0), beta=options["beta"], use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    loss = trainer._compute_loss(peft_model, DataCollatorForPreference(pad_token_id=PAD)(examples), return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _trl_pairs(kind, options):
    """(TRL trainer stand-in, batch) for CPO's simpo / ORPO: their tokenize_row's chosen/rejected ids, masks and labels."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    batch = {}
    for side, completions in (("chosen", CHOSEN), ("rejected", REJECTED)):
        seqs = [p + c for p, c in zip(PROMPTS, completions)]
        labels = [[-100] * len(p) + c for p, c in zip(PROMPTS, completions)]
        width = max(map(len, seqs))
        batch[f"{side}_input_ids"] = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        batch[f"{side}_labels"] = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    cls = CPOTrainer if kind == "simpo" else ORPOTrainer
    trainer = cls.__new__(cls)
    trainer.__dict__.update(accelerator=_accelerator(), aux_loss_enabled=False, is_encoder_decoder=False, padding_value=PAD,
                            pad_token_id=PAD, loss_type=kind, alpha=0.0, **{"label_smoothing": 0.0, **options})
    return trainer, batch


def _lora_grads(peft_model) -> dict[str, np.ndarray]:
    """The PEFT model's LoRA gradients by jpeft tree path (transposed to jpeft's layout)."""
    out = {}
    for name, p in peft_model.named_parameters():
        for kind, leaf in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
            if f".{kind}.default.weight" in name:
                module = name.removeprefix("base_model.model.").split(f".{kind}.")[0]
                out[f"{module.replace('.', '/')}/{leaf}"] = p.grad.numpy().T
    return out


def _trl(tiny, kind):
    """TRL's (loss, LoRA gradients, metrics) for `kind` on the three pairs."""
    options = SETTINGS[kind][1]
    tiny.peft.zero_grad()
    if kind in preference.REFERENCE_FREE:
        trainer, batch = _trl_pairs(kind, options)
        loss, metrics = trainer.get_batch_loss_metrics(tiny.peft, batch)
    else:
        loss, metrics = _trl_dpo(tiny.peft, kind, options)
    loss.backward()
    return loss.item(), _lora_grads(tiny.peft), metrics


def _jpeft(tiny, kind, batch, **extra):
    return _jpeft_cases(tiny, {kind: (kind, batch)}, **extra)[kind]


def _jpeft_cases(tiny, cases, **extra):
    """{name: (loss, LoRA gradients by path, metrics)} of `preference_loss` for each name -> (kind, batch), in one compile."""
    trainable, frozen = jpeft.partition(tiny.params, jpeft.trainable_mask(tiny.params))

    def run(t, data):
        out = {}
        for name, (kind, _) in cases.items():
            loss_fn = training.preference_loss(tiny.config, kind, **SETTINGS[kind][0], **extra)
            out[name] = jax.value_and_grad(lambda t: loss_fn.with_metrics(jpeft.combine(t, frozen), data[name], None), has_aux=True)(t)
        return out

    data = {name: {k: jnp.asarray(v) for k, v in batch.items()} for name, (_, batch) in cases.items()}
    results = {}
    for name, ((loss, metrics), grads) in jax.jit(run)(trainable, data).items():
        grads = {p: np.asarray(g) for p, g in tree.flatten(grads).items() if g is not None}
        results[name] = float(loss), grads, {k: float(v) for k, v in metrics.items()}
    return results


CASES = [(kind, "padded") for kind in preference.KINDS] + [("sigmoid", "packed")]  # packing is the same gather for every kind


@pytest.fixture(scope="module")
def ours(tiny):
    """jpeft's results for every case, compiled together (one compile, not seven)."""
    cases = {}
    for kind, layout in CASES:
        batch = batches.preference_batch(PROMPTS, CHOSEN, REJECTED, PAD, EOS, pack=layout == "packed", bucket=8, score_prompt=kind == "orpo")
        if layout == "packed":
            assert batch["input_ids"].shape[0] < 6  # several sequences share a row
        cases[f"{kind}-{layout}"] = (kind, batch)
    return _jpeft_cases(tiny, cases)


@pytest.mark.parametrize("kind,layout", CASES)
def test_loss_gradients_and_metrics_equal_trl(tiny, ours, kind, layout):
    ours, ours_grads, ours_metrics = ours[f"{kind}-{layout}"]
    ref, ref_grads, ref_metrics = _trl(tiny, kind)
    assert abs(ours - ref) < 1e-5, (ours, ref)
    assert sorted(ours_grads) == sorted(ref_grads)
    scale = max(np.abs(g).max() for g in ref_grads.values())
    assert scale > 1e-3  # the loss reaches the adapters
    for path, g in ref_grads.items():
        np.testing.assert_allclose(ours_grads[path], g, atol=1e-5 * max(1.0, scale), err_msg=path)
    shared = {k for k in ours_metrics if not k.startswith("logits/") or kind not in preference.REFERENCE_FREE}
    assert shared - {"nll_loss"} <= set(ref_metrics) | {"nll_loss"}
    for k in shared & set(ref_metrics):
        assert abs(ours_metrics[k] - float(ref_metrics[k])) < 1e-5, (k, ours_metrics[k], ref_metrics[k])
    if kind not in preference.REFERENCE_FREE:
        assert 0 < ours_metrics["rewards/accuracies"] < 1 or abs(ours_metrics["rewards/margins"]) > 1e-3


def test_precomputed_reference_gives_trls_loss(tiny):
    """Reference log-probabilities computed once beforehand (TRL's precompute_ref_log_probs) from the tree with its
    adapter: the base alone scores them, and the loss equals TRL's with its adapter switched off in the step."""
    batch = batches.preference_batch(PROMPTS, CHOSEN, REJECTED, PAD, EOS, bucket=8)
    ref = np.asarray(preference.reference_logps(tiny.config)(tiny.params, {k: jnp.asarray(v) for k, v in batch.items()}))
    stored = batches.preference_batch(PROMPTS, CHOSEN, REJECTED, PAD, EOS, bucket=8, ref_chosen_logps=ref[:3], ref_rejected_logps=ref[3:])
    assert _jpeft(tiny, "sigmoid", stored, precompute_reference=True)[0] == pytest.approx(_trl(tiny, "sigmoid")[0], abs=1e-5)
    with pytest.raises(KeyError, match="ref_logps"):
        _jpeft(tiny, "sigmoid", batch, precompute_reference=True)


def test_one_copy_of_the_base_in_the_compiled_step(tiny):
    """The DPO step's arguments are the adapter, its optimizer state, ONE base and the batch; the loss closes over no
    array (a second base would have to enter one way or the other)."""
    trainable, frozen = jpeft.partition(tiny.params, jpeft.trainable_mask(tiny.params))
    tx = jpeft.optimizer(optax.adam(1e-3), jpeft.trainable_mask(tiny.params))
    opt_state = tx.init(trainable)
    batch = {k: jnp.asarray(v) for k, v in batches.preference_batch(PROMPTS, CHOSEN, REJECTED, PAD, EOS, bucket=8).items()}
    step = training.make_train_step(training.preference_loss(tiny.config, "sigmoid"), tx, with_metrics=True)
    args = (trainable, opt_state, frozen, batch, jax.random.key(0))
    nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))  # noqa: E731
    expected = nbytes(trainable) + nbytes(opt_state) + nbytes(frozen) + nbytes(batch)
    compiled = step.lower(*args).compile()
    assert abs(compiled.memory_analysis().argument_size_in_bytes - expected) <= 64  # the key
    assert not [c for c in jax.make_jaxpr(step)(*args).consts if getattr(c, "size", 0) > 1]
    trainable, opt_state, loss, metrics = compiled(*args)
    assert np.isfinite(float(loss)) and set(metrics) >= {"rewards/chosen", "rewards/margins", "logps/chosen", "logits/chosen"}


def test_bad_pairs_and_settings_are_named(tiny):
    with pytest.raises(ValueError, match="pair 1 has an empty chosen completion"):
        batches.preference_batch(PROMPTS, [[5], [], [6]], REJECTED, PAD, EOS)
    with pytest.raises(ValueError, match="pair 2 has an empty rejected completion"):
        batches.preference_batch(PROMPTS, CHOSEN, [[5], [6], []], PAD, EOS)
    with pytest.raises(ValueError, match="pair 2: its prompt of 6 tokens leaves no room"):
        batches.preference_batch(PROMPTS, CHOSEN, REJECTED, PAD, EOS, max_length=6)
    with pytest.raises(ValueError, match="3 prompts, 2 chosen"):
        batches.preference_batch(PROMPTS, CHOSEN[:2], REJECTED, PAD, EOS)
    with pytest.raises(ValueError, match="unknown preference loss 'dpo'"):
        training.preference_loss(tiny.config, "dpo")
    with pytest.raises(ValueError, match="label_smoothing=0.5"):
        training.preference_loss(tiny.config, "robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta=0"):
        training.preference_loss(tiny.config, "sigmoid", beta=0)
    with pytest.raises(KeyError, match="score_prompt=True"):
        _jpeft(tiny, "orpo", batches.preference_batch(PROMPTS, CHOSEN, REJECTED, PAD, EOS, bucket=8))
