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
import pytest
import torch

from jpeft import nn, training, tree
from jpeft.formats import peft_format
from jpeft.formats.hf_io import CheckpointError
from jpeft.methods import ia3, lora
from jpeft.training import split
from jpeft.training.batches import causal_lm_batch
from jpeft.models import moe
from jpeft.models.sampling import Sampling
from tests.conftest import FAST_COMPILE

TOL = 1e-4
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# 2 layers, 4 experts, top-2, hidden 32, and each family's own twist: Qwen3-MoE's renormalised top-k (and, in a
# variant, dense layers: mlp_only_layers, decoder_sparse_step), Mixtral's sliding window (shorter than the sequences),
# OLMoE's clip_qkv and raw top-k weights. name -> (model_type, config).
QWEN = dict(intermediate_size=40, moe_intermediate_size=12, num_experts=4, head_dim=8)
FAMILIES = {
    "qwen3_moe": ("qwen3_moe", dict(QWEN, norm_topk_prob=True)),
    "qwen3_moe_dense_layers": ("qwen3_moe", dict(QWEN, num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2)),
    "mixtral": ("mixtral", dict(intermediate_size=12, num_local_experts=4, sliding_window=5)),
    "olmoe": ("olmoe", dict(intermediate_size=12, num_experts=4, clip_qkv=0.8, norm_topk_prob=False)),
}


def hf_classes(model_type: str):
    import transformers

    return {"qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
            "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
            "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM)}[model_type]


def make_hf_moe(path: Path, name: str):
    """Save a random transformers MoE causal LM of `FAMILIES[name]` to `path`; return it reloaded, in eval mode."""
    model_type, overrides = FAMILIES[name]
    config_cls, model_cls = hf_classes(model_type)
    kwargs = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, initializer_range=0.15, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=1,
                  bos_token_id=2, router_aux_loss_coef=0.05)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = model_cls._from_config(config_cls(**kwargs), attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model_cls.from_pretrained(path, attn_implementation="eager").eval()


_BUILT: dict[str, tuple] = {}


def built(name: str, tmp_path_factory) -> tuple:
    """(saved directory, torch model, jpeft config, jpeft params) of a family's tiny model, built once per module."""
    if name not in _BUILT:
        path = tmp_path_factory.mktemp(name)
        model = make_hf_moe(path, name)
        _BUILT[name] = (path, model, *moe.load_pretrained(path))
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_moe(request, tmp_path_factory):
    return built(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return built("qwen3_moe", tmp_path_factory)


_forward = jax.jit(moe.forward, static_argnums=0)
_router_outputs = jax.jit(moe.router_outputs, static_argnums=0)


def base_logits(config, params, ids, mask) -> np.ndarray:
    """Logits of a tree without PEFT leaves, from the one compiled `router_outputs` per base structure; padding zeroed."""
    return np.asarray(_router_outputs(moe.arch(config), params, ids, mask)[0]) * mask[..., None]


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
    logits, router, aux = _router_outputs(moe.arch(config), params, ids, mask)
    np.testing.assert_allclose(np.asarray(logits) * mask[..., None], out.logits.numpy() * mask[..., None], atol=TOL, rtol=0)
    want = np.stack([r.numpy() for r in out.router_logits])
    assert router.shape == want.shape == (sum(moe.arch(config).sparse), ids.size, 4)
    np.testing.assert_allclose(np.asarray(router) * mask.reshape(1, -1, 1), want * mask.reshape(1, -1, 1), atol=TOL, rtol=0)
    np.testing.assert_allclose(float(aux), float(out.aux_loss), atol=TOL, rtol=0)
    # Every expert has tokens here; `test_grouped_dense_matches_ragged_dot_with_empty_experts` and the decoding steps
    # below (3 tokens, 6 choices) cover experts that get none.
    assert all(chosen == {0, 1, 2, 3} for chosen in chosen_experts(want, 2, mask))


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe"])  # Mixtral's cached attention is Mistral's, checked in test_llama
def test_greedy_generation_matches_transformers(name, tmp_path_factory):
    _, model, config, params = built(name, tmp_path_factory)
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


@pytest.fixture(scope="module")
def lora_grad(qwen, peft_adapter):
    """(value_and_grad over the LoRA leaves of causal_lm_loss with the router's aux loss, under remat, compiled once; the
    loss; trainable, frozen; the batch: every real token of `right_padded()` after the first a target, packed in shared rows)."""
    import copy

    config = copy.deepcopy(qwen[2])
    config.output_router_logits = True
    loss = training.causal_lm_loss(config, remat=True)  # all layers routed: remat scans them, the routing sums in the carry
    trainable, frozen = split.partition(peft_adapter[2], split.trainable_mask(peft_adapter[2]))
    ids, mask = right_padded()
    batch = causal_lm_batch([r[:1] for r in ids], [r[1:n] for r, n in zip(ids, mask.sum(1))], pad_id=0, pack=True)
    assert batch["segment_ids"].shape[0] < len(ids)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
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
    assert np.abs(ours - base_logits(config, params, ids, mask)).max() > 0.1  # the adapter matters

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
    merged = jax.jit(lora.merge)(adapted)
    np.testing.assert_allclose(base_logits(config, merged, ids, mask), ours, atol=TOL, rtol=0)
    back = tree.flatten(jax.jit(lora.unmerge)(merged, split.split_adapter(adapted)[1]))
    for p, v in tree.flatten(adapted).items():
        np.testing.assert_allclose(np.asarray(back[p]), np.asarray(v), atol=1e-5, rtol=0, err_msg=p)


def test_expert_lora_gradients_and_aux_loss_match_pytorch(qwen, peft_adapter, lora_grad, tmp_path):
    """Under remat, on packed rows: against PEFT's `labels=` loss (router aux loss included) on the unpacked batch."""
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
    np.testing.assert_allclose(float(loss), float(out.loss.detach()), atol=TOL, rtol=0)
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
    assert jaxpr.count("ragged_dot_general") >= 2 * 3  # (gate_up, down) x (W, A, B), in the layers' scan body


# ----------------------------------------------------------------------------------------------
# Checkpoints, expert parallelism, packing and remat


def test_checkpoints_round_trip_through_transformers_in_both_layouts(qwen, tmp_path):
    from safetensors.numpy import save_file

    path, _, config, params = qwen
    adapted = randomize_lora(lora.inject(params, lora.LoraConfig(r=2, target_modules=(), target_parameters=EXPERTS), jax.random.key(2)))
    merged = jax.jit(lora.merge)(adapted)
    moe.save_pretrained(tmp_path / "merged", config, merged)  # experts apart, as transformers saves them
    saved = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())["weight_map"] if (
        tmp_path / "merged" / "model.safetensors.index.json").exists() else None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "np") as f:
        names = set(f.keys()) if saved is None else set(saved)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in names and not any(n.endswith("gate_up_proj") for n in names)
    theirs = hf_classes("qwen3_moe")[1].from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    ids, mask = right_padded()
    np.testing.assert_allclose(peft_logits(theirs, ids, mask), base_logits(config, merged, ids, mask), atol=TOL, rtol=0)
    # transformers 5's own (stacked) names read as well.
    (tmp_path / "stacked").mkdir()
    save_file({k: v.numpy() for k, v in theirs.state_dict().items()}, tmp_path / "stacked" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "stacked" / "config.json").write_text((tmp_path / "merged" / "config.json").read_text())
    assert "model.layers.1.mlp.experts.gate_up_proj" in theirs.state_dict()
    _, reread = moe.load_pretrained(tmp_path / "stacked")
    for p, v in tree.flatten(merged).items():
        np.testing.assert_allclose(np.asarray(tree.flatten(reread)[p]), np.asarray(v), atol=1e-6, rtol=0, err_msg=p)


SHARDED = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np, optax
    from jpeft import training, tree
    from jpeft.methods import lora
    from jpeft.training import sharding, split
    from jpeft.training.batches import causal_lm_batch
    from jpeft.models import moe
    a = moe.Arch(model_type="mixtral", vocab_size=64, hidden_size=32, intermediate_size=16, expert_size=16, num_layers=1, num_heads=4,
                 num_kv_heads=2, head_dim=8, eps=1e-5, act="silu", rope=(("rope_theta", 1e4), ("rope_type", "default")), windows=(None,),
                 sparse=(True,), num_experts=4, top_k=2, norm_topk_prob=True, qk_norm=None, clip_qkv=None, attention_bias=False,
                 router_jitter=0.0, aux_loss_coef=0.02, attention_dropout=0.0, tie_word_embeddings=False, pad_token_id=0, eos_token_ids=(1,))
    params = lora.inject(moe.init_params(a, jax.random.key(0)), lora.LoraConfig(r=2, target_modules=["q_proj"],
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), jax.random.key(1))
    params = tree.unflatten({p: v + 0.1 if p.endswith("lora_b") else v for p, v in tree.flatten(params).items()})
    rows = np.random.default_rng(0).integers(3, 64, (8, 24))
    batch = causal_lm_batch([r[:8] for r in rows], [r[8:] for r in rows], pad_id=0)
    mask = split.trainable_mask(params)
    tx = split.optimizer(optax.adam(1e-2), mask)
    loss = training.causal_lm_loss(a)
    out = {}
    for name, mesh in (("one", "1,1,1"), ("experts", "2,1,4")):
        t, f = split.partition(params, mask)
        placed = sharding.setup(sharding.mesh_from_string("data=%s,fsdp=%s,model=%s" % tuple(mesh.split(","))), loss, tx, t, f, tx.init(t), batch)
        t, s, losses = placed.trainable, placed.opt_state, []
        for _ in range(2):
            t, s, l = placed.step(t, s, placed.frozen, placed.batch, None)
            losses.append(float(l))
        kernel = tree.flatten(placed.frozen)["model/layers/0/mlp/experts/gate_up_proj/kernel"]
        lora_a = tree.flatten(t)["model/layers/0/mlp/experts/down_proj/lora_a"]
        out[name] = dict(losses=losses, params=[np.asarray(v).tolist() for v in jax.tree.leaves(sharding.gather(t))],
                         kernel_spec=str(kernel.sharding.spec), kernel_shard=list(kernel.addressable_shards[0].data.shape),
                         lora_spec=str(lora_a.sharding.spec))
    print("RESULT " + json.dumps(out))
""")


def test_experts_split_over_the_model_axis_train_as_on_one_device():
    env = {**os.environ, "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    # Each of the 4 model-axis devices holds one expert of the (X, D, 2F) kernel, and of LoRA's A beside it.
    assert r["experts"]["kernel_spec"] == "P('model', 'fsdp', None)" and r["experts"]["kernel_shard"] == [1, 32, 32]
    assert r["experts"]["lora_spec"] == "P('model', None, None)"
    np.testing.assert_allclose(r["experts"]["losses"], r["one"]["losses"], atol=1e-5, rtol=0)
    for got, want in zip(r["experts"]["params"], r["one"]["params"]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# The grouped matmul alone, and bad input


def test_grouped_dense_matches_ragged_dot_with_empty_experts():
    rng = np.random.default_rng(0)
    X, D, F, r = 5, 16, 24, 3
    p = {"kernel": rng.normal(size=(X, D, F)), "lora_a": rng.normal(size=(X, D, r)), "lora_b": rng.normal(size=(X, r, F)), "lora_scale": 0.7}
    p = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
    x = jnp.asarray(rng.normal(size=(100, D)), jnp.float32)
    sizes = jnp.asarray([30, 0, 45, 0, 20], jnp.int32)  # two experts get no rows; the last 5 rows belong to none

    def want(p, x):
        low = jax.lax.ragged_dot(jax.lax.ragged_dot(x, p["lora_a"], sizes), p["lora_b"], sizes)
        return jax.lax.ragged_dot(x, p["kernel"], sizes) + low * p["lora_scale"]

    loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f(p, x)))  # noqa: E731
    ours = jax.jit(jax.value_and_grad(loss(lambda p, x: nn.grouped_dense(p, x, sizes, nn.Ctx())), (0, 1)))
    (value, grads), (want_value, want_grads) = ours(p, x), jax.jit(jax.value_and_grad(loss(want), (0, 1)))(p, x)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, atol=1e-3, rtol=1e-4)
    assert not np.asarray(grads[1][95:]).any() and not np.asarray(grads[0]["lora_a"])[[1, 3]].any()  # rows and experts unrouted
    with pytest.raises(ValueError, match=r"routed experts take .* \['LoRA', '\(IA\)\^3'\]"):
        nn.grouped_dense({**p, "ia3_out": jnp.ones(F)}, x, sizes, nn.Ctx())


def test_bad_input_is_refused_by_name(qwen, tmp_path):
    path, _, config, params = qwen
    key = jax.random.key(0)
    # A config whose expert count disagrees with the file's.
    (tmp_path / "eight").mkdir()
    (tmp_path / "eight" / "model.safetensors").symlink_to(path / "model.safetensors")
    raw = json.loads((path / "config.json").read_text())
    (tmp_path / "eight" / "config.json").write_text(json.dumps({**raw, "num_local_experts": 8}))  # Qwen3MoeConfig's num_experts
    with pytest.raises(CheckpointError, match=r"holds 4 experts .* model\.layers\.0\.mlp, but the config says num_experts=8"):
        moe.load_pretrained(tmp_path / "eight")
    # target_parameters naming nothing; target_modules reaching only experts; other methods on experts.
    with pytest.raises(ValueError, match=r"target_parameters entries \['mlp.experts.up_proj'\] match no parameter"):
        lora.inject(params, lora.LoraConfig(target_modules=(), target_parameters=["mlp.experts.up_proj"]), key)
    with pytest.raises(ValueError, match=r"choose only routed experts' weights .*LoraConfig\(target_parameters"):
        lora.inject(params, lora.LoraConfig(target_modules=["experts.down_proj"]), key)
    with pytest.raises(ValueError, match=r"\(IA\)\^3 target_modules=\['experts.gate_up_proj'\] choose only routed experts"):
        ia3.inject(params, ia3.IA3Config(target_modules=["experts.gate_up_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"target_parameters does not work with \['use_dora'\]"):
        lora.LoraConfig(target_parameters=EXPERTS, use_dora=True)
    # generate takes llama.generate's sampling options into the shared loop, whose request checks name them (the
    # sampling loop itself is tested on Llama in tests/models/test_sampling.py)
    with pytest.raises(ValueError, match=r"sampling needs a random key"):
        moe.generate(config, params, np.ones((1, 3), np.int32), max_new_tokens=2, sample=Sampling(top_k=1))
    # A PEFT adapter for experts of another count.
    adapted = lora.inject(params, lora.LoraConfig(r=2, target_modules=(), target_parameters=EXPERTS), key)
    peft_format.save_adapter(tmp_path / "adapter", adapted)
    fewer = tree.unflatten({p: v[:2] if p.endswith("experts/down_proj/kernel") else v for p, v in tree.flatten(params).items()})
    with pytest.raises(CheckpointError, match=r"experts.down_proj has lora_A \(8, 12\) .* 2 experts\) need \(4, 12\)"):
        peft_format._lora_in(fewer, "adapter", json.loads((tmp_path / "adapter" / "adapter_config.json").read_text()),
                             peft_format.read_adapter(tmp_path / "adapter")[1])
    with pytest.raises(CheckpointError, match="GGUF"):
        moe.load_pretrained(tmp_path / "model.gguf")


@pytest.mark.parametrize("fmt, double_quant", [("nf4", True), ("int8", False)])
def test_quantized_experts_train_lora_as_their_dequantized_weights(fmt, double_quant, monkeypatch):
    """QLoRA on routed experts: each expert quantized as bitsandbytes quantizes one Linear; the grouped matmul
    dequantizes tile by tile (CPU) or the stack (GPU path) and equals the float weights the codes stand for."""
    from jpeft import quant

    rng = np.random.default_rng(1)
    X, D, F = 3, 64, 32
    base = {"mlp": {"experts": {"gate_up_proj": {"kernel": jnp.asarray(rng.normal(size=(X, D, F)) * 0.1, jnp.float32)}}}}
    q = quant.quantize(base, fmt, double_quant=double_quant)
    group = q["mlp"]["experts"]["gate_up_proj"]
    assert quant.weight_shape(group) == (X, D, F) and all(v.shape[0] == X for v in group.values())
    one = quant.quantize({"m": {"kernel": base["mlp"]["experts"]["gate_up_proj"]["kernel"][1]}}, fmt, double_quant=double_quant)["m"]
    for k, v in one.items():  # expert 1's codes are those of its matrix quantized alone
        np.testing.assert_array_equal(np.asarray(group[k][1]), np.asarray(v))
    adapted = randomize_lora(lora.inject(q, lora.LoraConfig(r=2, target_modules=(), target_parameters=["experts.gate_up_proj"]), jax.random.key(0)))
    module = adapted["mlp"]["experts"]["gate_up_proj"]
    as_float = {**{k: v for k, v in module.items() if k not in quant.LEAVES}, "kernel": quant.weight(group)}
    x, sizes = jnp.asarray(rng.normal(size=(40, D)), jnp.float32), jnp.asarray([10, 0, 30], jnp.int32)
    low_rank = {k: module[k] for k in ("lora_a", "lora_b")}  # what trains; the codes get no gradient
    f = jax.jit(jax.value_and_grad(lambda t, m, x: jnp.sum(jnp.sin(nn.grouped_dense({**m, **t}, x, sizes, nn.Ctx()))), (0, 2)))
    (want, want_g), (got, got_g) = f(low_rank, as_float, x), f(low_rank, module, x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, atol=1e-5)
    merged = lora.merge(adapted)["mlp"]["experts"]["gate_up_proj"]["kernel"]  # dequantized, then W + scale A B per expert
    np.testing.assert_allclose(merged, as_float["kernel"] + module["lora_scale"] * module["lora_a"] @ module["lora_b"], atol=1e-6)
    monkeypatch.setattr(nn, "KERNELS", "gpu")
    np.testing.assert_allclose(jax.jit(lambda m, x: nn.grouped_dense(m, x, sizes, nn.Ctx()))(module, x),
                               jax.jit(lambda m, x: nn.grouped_dense(m, x, sizes, nn.Ctx()))(as_float, x), atol=1e-5)
