"""Mixture-of-experts parity with transformers and HF PEFT: Qwen3-MoE, Mixtral and OLMoE logits, router logits, the
load-balancing loss and greedy generation; LoRA on the routed experts, the attention and the router against PEFT's
`target_parameters` (adapter files both ways, gradients, merge); the compiled step's grouped matmul; checkpoints in
both layouts; expert parallelism on 8 fake devices; bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jpeft import ia3, lora, nn, peft_format, split, training, tree
from jpeft.batches import causal_lm_batch
from jpeft.hf_io import CheckpointError
from jpeft.models import moe
from tests.conftest import FAST_COMPILE

TOL = 1e-4
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# 2 layers, 4 experts, top-2, hidden 32; each family's own twist: Qwen3-MoE's dense first layer (mlp_only_layers) and
# renormalised top-k, Mixtral's sliding window (shorter than the sequences), OLMoE's clip_qkv and raw top-k weights.
FAMILIES = {
    "qwen3_moe": dict(intermediate_size=40, moe_intermediate_size=12, num_experts=4, head_dim=8, norm_topk_prob=True,
                      mlp_only_layers=[0], num_hidden_layers=3),
    "mixtral": dict(intermediate_size=12, num_local_experts=4, sliding_window=5),
    "olmoe": dict(intermediate_size=12, num_experts=4, clip_qkv=0.8, norm_topk_prob=False),
}


def hf_classes(model_type: str):
    import transformers

    return {"qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
            "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
            "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM)}[model_type]


def make_hf_moe(path: Path, model_type: str, **overrides):
    """Save a random transformers MoE causal LM to `path`; return it reloaded, in eval mode."""
    config_cls, model_cls = hf_classes(model_type)
    kwargs = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, initializer_range=0.15, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2, router_aux_loss_coef=0.05)
    kwargs.update(FAMILIES[model_type], **overrides)
    torch.manual_seed(0)
    model = model_cls._from_config(config_cls(**kwargs), attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model_cls.from_pretrained(path, attn_implementation="eager").eval()


_BUILT: dict[str, tuple] = {}


def built(model_type: str, tmp_path_factory) -> tuple:
    """(saved directory, torch model, jpeft config, jpeft params) of a family's tiny model, built once per module."""
    if model_type not in _BUILT:
        path = tmp_path_factory.mktemp(model_type)
        model = make_hf_moe(path, model_type)
        _BUILT[model_type] = (path, model, *moe.load_pretrained(path))
    return _BUILT[model_type]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_moe(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return built("qwen3_moe", tmp_path_factory)


_forward = jax.jit(moe.forward, static_argnums=0)
_router_logits = jax.jit(moe.router_logits, static_argnums=0)


def right_padded(rows: int = 3, length: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 96, size=(rows, length))
    mask = np.ones_like(ids)
    mask[1, length - 6:] = 0
    mask[2, length // 2:] = 0
    return ids, mask


def chosen_experts(router_logits: np.ndarray, k: int, mask: np.ndarray) -> list[set[int]]:
    """Per routed layer, the experts that some real token chose."""
    top = np.argsort(-router_logits, axis=-1)[..., :k]  # (layers, N, k)
    return [set(top[layer][mask.reshape(-1) > 0].reshape(-1).tolist()) for layer in range(top.shape[0])]


def randomize_lora(params: dict, seed: int = 1, scale: float = 0.3) -> dict:
    """Nonzero LoRA B leaves (A is already random), so that the adapter changes the output."""
    rng = np.random.default_rng(seed)
    flat = tree.flatten(params)
    return tree.unflatten({p: jnp.asarray(rng.normal(size=v.shape) * scale, v.dtype) if p.endswith("lora_b") else v
                           for p, v in flat.items()})


# ----------------------------------------------------------------------------------------------
# The base models


def test_logits_router_logits_and_aux_loss_match_transformers(hf_moe):
    _, model, config, params = hf_moe
    ids, mask = right_padded()
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(mask), output_router_logits=True)
    a = moe.arch(config)
    logits = np.asarray(_forward(a, params, ids, mask))
    np.testing.assert_allclose(logits * mask[..., None], out.logits.numpy() * mask[..., None], atol=TOL, rtol=0)
    router, aux = _router_logits(a, params, ids, mask)
    want = np.stack([r.numpy() for r in out.router_logits])
    assert router.shape == want.shape == (sum(moe.arch(config).sparse), ids.size, 4)
    np.testing.assert_allclose(np.asarray(router) * mask.reshape(1, -1, 1), want * mask.reshape(1, -1, 1), atol=TOL, rtol=0)
    np.testing.assert_allclose(float(aux), float(out.aux_loss), atol=TOL, rtol=0)
    assert all(chosen == {0, 1, 2, 3} for chosen in chosen_experts(want, 2, mask))  # every expert has tokens here
    # One token routes to 2 of the 4 experts: the others get no rows at all.
    one = np.array([[7]])
    with torch.no_grad():
        want_one = model(torch.tensor(one)).logits.numpy()
    np.testing.assert_allclose(_forward(a, params, one, np.ones_like(one)), want_one, atol=TOL, rtol=0)


def test_greedy_generation_matches_transformers(hf_moe):
    _, model, config, params = hf_moe
    ids, mask = right_padded(length=10, seed=3)
    with torch.no_grad():
        want = model.generate(torch.tensor(ids[:, ::-1].copy()), attention_mask=torch.tensor(mask[:, ::-1].copy()), max_new_tokens=8,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:].numpy()
    got = moe.generate(config, params, ids[:, ::-1], mask[:, ::-1], max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------------------------
# LoRA on the routed experts, the attention and the router, against HF PEFT


def fresh(path: Path, model_type: str = "qwen3_moe"):
    """The saved transformers model, reloaded (PEFT wraps a model in place)."""
    return hf_classes(model_type)[1].from_pretrained(path, attn_implementation="eager").eval()


def peft_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy() * mask[..., None]


TARGET_MODULES = ["q_proj", "v_proj", "gate"]  # attention, and the router (PEFT wraps its weight as a ParamWrapper)


@pytest.fixture(scope="module")
def peft_adapter(qwen, tmp_path_factory):
    """(PEFT model, its adapter directory, the adapter loaded by jpeft): LoRA on the experts, attention and router,
    random A and B (init_lora_weights=False), written by PEFT."""
    import peft

    path, _, _, params = qwen
    theirs = peft.get_peft_model(fresh(path), peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGET_MODULES, target_parameters=EXPERTS,
                                                              init_lora_weights=False))
    out = tmp_path_factory.mktemp("peft_adapter")
    theirs.save_pretrained(out)
    return theirs, out, peft_format.load_adapter(out, params)


def loss_batch(ids: np.ndarray, mask: np.ndarray) -> dict:
    """Every real token after the first is a target: the tokens transformers' `labels=ids` scores."""
    return {k: jnp.asarray(v) for k, v in causal_lm_batch([r[:1] for r in ids], [r[1:n] for r, n in zip(ids, mask.sum(1))], pad_id=0).items()}


@pytest.fixture(scope="module")
def lora_grad(qwen, peft_adapter):
    """(value_and_grad of causal_lm_loss with the router's aux loss over the LoRA leaves, compiled once; the loss;
    trainable, frozen, batch)."""
    import copy

    config = copy.deepcopy(qwen[2])
    config.output_router_logits = True
    loss = training.causal_lm_loss(config)
    trainable, frozen = split.partition(peft_adapter[2], split.trainable_mask(peft_adapter[2]))
    batch = loss_batch(*right_padded())
    compiled = jax.jit(jax.value_and_grad(lambda t, f, b: loss(split.combine(t, f), b, None))).lower(trainable, frozen, batch).compile()
    return compiled, loss, trainable, frozen, batch


def test_lora_on_experts_attention_and_router_matches_peft_both_ways(qwen, peft_adapter, lora_grad, tmp_path):
    import peft

    path, _, config, params = qwen
    a = moe.arch(config)
    ids, mask = right_padded()
    cfg = lora.LoraConfig(r=2, alpha=4, target_modules=TARGET_MODULES, target_parameters=EXPERTS)
    adapted = randomize_lora(lora.inject(params, cfg, jax.random.key(0)))
    assert adapted["model"]["layers"]["1"]["mlp"]["experts"]["gate_up_proj"]["lora_a"].shape == (4, 32, 2)  # (X, in, r)
    ours = np.asarray(_forward(a, adapted, ids, mask)) * mask[..., None]
    assert np.abs(ours - np.asarray(_forward(a, params, ids, mask)) * mask[..., None]).max() > 0.1  # the adapter matters

    # jpeft writes, PEFT reads: PEFT's ParamWrapper layout and names, nested wrappers included.
    peft_format.save_adapter(tmp_path / "ours", adapted, cfg)
    np.testing.assert_allclose(peft_logits(peft.PeftModel.from_pretrained(fresh(path), tmp_path / "ours"), ids, mask), ours, atol=TOL, rtol=0)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["target_parameters"] == EXPERTS and sorted(saved["target_modules"]) == sorted(TARGET_MODULES)

    # PEFT writes, jpeft reads, trains a step, writes (config rebuilt from the leaves); PEFT reads that back.
    theirs, _, loaded = peft_adapter
    before = np.asarray(_forward(a, loaded, ids, mask)) * mask[..., None]
    np.testing.assert_allclose(before, peft_logits(theirs, ids, mask), atol=TOL, rtol=0)
    compiled, _, trainable, frozen, batch = lora_grad
    _, grads = compiled(trainable, frozen, batch)
    trained = split.combine(jax.tree.map(lambda t, g: t - 0.5 * g, trainable, grads), frozen)
    peft_format.save_adapter(tmp_path / "trained", trained)
    want = np.asarray(_forward(a, trained, ids, mask)) * mask[..., None]
    assert np.abs(want - before).max() > 1e-3  # the step moved it
    np.testing.assert_allclose(peft_logits(peft.PeftModel.from_pretrained(fresh(path), tmp_path / "trained"), ids, mask), want, atol=TOL, rtol=0)

    # Merging folds each expert's scale A_x B_x into its matrix; unmerging takes it out again.
    merged = lora.merge(adapted)
    np.testing.assert_allclose(np.asarray(_forward(a, merged, ids, mask)) * mask[..., None], ours, atol=TOL, rtol=0)
    back = tree.flatten(lora.unmerge(merged, split.split_adapter(adapted)[1]))
    for p, v in tree.flatten(adapted).items():
        np.testing.assert_allclose(np.asarray(back[p]), np.asarray(v), atol=1e-5, rtol=0, err_msg=p)


def test_expert_lora_gradients_and_aux_loss_match_pytorch(qwen, peft_adapter, lora_grad, tmp_path):
    from safetensors.torch import save_file

    theirs, adapter_dir, _ = peft_adapter
    compiled, _, trainable, frozen, batch = lora_grad
    ids, mask = right_padded()
    theirs.zero_grad()
    out = theirs(torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(np.where(mask > 0, ids, -100)),
                 output_router_logits=True)
    out.loss.backward()
    assert float(out.aux_loss.detach()) > 1.0  # the router term is in the loss: 0.05 x ~2
    loss, grads = compiled(trainable, frozen, batch)
    np.testing.assert_allclose(float(loss), float(out.loss), atol=TOL, rtol=0)
    # PyTorch's gradients in PEFT's layout, read into jpeft's by the adapter loader (whose layout the logits test checks).
    torch_grads = {n.replace(".default", ""): p.grad.contiguous() for n, p in theirs.named_parameters() if p.requires_grad}
    (tmp_path / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    save_file(torch_grads, tmp_path / "adapter_model.safetensors")
    want = tree.flatten(split.split_adapter(peft_format.load_adapter(tmp_path, qwen[3]))[1])
    got = {p: v for p, v in tree.flatten(grads).items() if v is not None}
    assert sorted(got) == sorted(p for p in want if not p.endswith("lora_scale"))
    assert any("experts/down_proj/lora_b" in p for p in got)
    for p, g in got.items():
        np.testing.assert_allclose(np.asarray(g), np.asarray(want[p]), atol=1e-5, rtol=1e-4, err_msg=p)


def test_compiled_step_runs_grouped_products_and_no_frozen_expert_gradient(lora_grad, monkeypatch):
    import re

    compiled, loss, trainable, frozen, batch = lora_grad
    hlo = compiled.as_text()
    X, D, F = 4, 32, 12
    # The experts' products come in tiles of one expert's rows (a loop over tiles), never as one product over every
    # expert: each dot that yields gate_up's width 2F is a (tile, 2F) block or a rank-r (r, 2F) term of LoRA's gradient.
    widths = re.findall(rf"= f32\[(\d+),{2 * F}\]\S* dot\(", hlo)
    assert widths and all(int(rows) <= 128 for rows in widths), widths
    assert not re.search(rf"= f32\[{X},\d+,{2 * F}\]\S* dot\(", hlo)
    assert hlo.count(" while(") >= 4  # two grouped products per routed layer, each a loop over tiles
    # No gradient is formed for a frozen expert weight: nothing accumulates into an (X, in, out) array, as LoRA's
    # (X, in, r) gradients do.
    assert re.search(rf"f32\[{X},{D},2\]\S* dynamic-update-slice\(", hlo)
    for shape in (f"{X},{D},{2 * F}", f"{X},{F},{D}"):
        assert not re.search(rf"f32\[{shape}\]\S* (dynamic-update-slice|add|broadcast)\(", hlo), shape
    # On a GPU the same products are XLA's grouped matmul, jax.lax.ragged_dot.
    monkeypatch.setattr(nn, "KERNELS", "gpu")
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: loss(split.combine(t, frozen), batch, None)))(trainable))
    assert jaxpr.count("ragged_dot_general") >= 2 * 3 * 2  # 2 routed layers x (W, A, B) x (forward, backward)
