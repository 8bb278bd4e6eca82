"""DoRA (`LoraConfig(use_dora=True)`): parity with HF PEFT's DoraLinearLayer on T5, Llama and Gemma 3 (logits and
gradients), PEFT files both ways, merge/unmerge, the weight-norm expansion, LoRA dropout, and clear refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import lora, multi, nn, quant, sharding, split, tree
from jpeft.formats.hf_io import CheckpointError
from tests.conftest import jpeft_logits, torch_logits

T5_TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
CAUSAL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEAF = {"lora_A": "lora_a", "lora_B": "lora_b", "lora_magnitude_vector": "lora_magnitude"}


def _randomize_peft(model, seed: int = 1):
    """Trained-size A, B and magnitude (not the init: B = 0 and m = ||W|| would hide a wrong norm or layout)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
            elif "lora_" in name:
                p.normal_(0, 0.1)
    return model


def _peft_into_tree(peft_model, params):
    """A jpeft tree with DoRA leaves holding the PEFT model's A, B and magnitude (PyTorch layout transposed)."""
    flat = tree.flatten(params)
    seen = set()
    for name, value in peft_model.named_parameters():
        for kind, leaf in LEAF.items():
            if f".{kind}.default.weight" in name:
                module = name.removeprefix("base_model.model.").split(f".{kind}.")[0]
                path = f"{module.replace('.', '/')}/{leaf}"
                v = value.detach().numpy()
                assert flat[path].shape == v.T.shape, path
                flat[path] = jnp.asarray(v.T)
                seen.add(path)
    assert seen == {p for p in flat if p.rsplit("/", 1)[-1] in LEAF.values()}
    return tree.unflatten(flat)


def _torch_grads(peft_model, leaf_names=LEAF):
    """{jpeft path: gradient in jpeft's layout} of the PEFT model's DoRA parameters after a backward pass."""
    out = {}
    for name, p in peft_model.named_parameters():
        for kind, leaf in leaf_names.items():
            if f".{kind}.default.weight" in name:
                module = name.removeprefix("base_model.model.").split(f".{kind}.")[0]
                out[f"{module.replace('.', '/')}/{leaf}"] = p.grad.numpy().T
    return out


def _check_grads(grads, expected):
    """Gradients only on DoRA's three trainable leaves, each non-zero, each equal to PyTorch's."""
    flat = {p: np.asarray(g) for p, g in tree.flatten(grads).items() if g is not None}
    assert {p.rsplit("/", 1)[-1] for p in flat} == {"lora_a", "lora_b", "lora_magnitude"}
    assert set(flat) == set(expected)
    for path, g in flat.items():
        assert np.abs(g).max() > 1e-6, path
        # Relative to the leaf's largest gradient: these sum over every logit, and reach ~100 on T5.
        assert np.abs(g - expected[path]).max() <= 1e-4 * max(1.0, np.abs(expected[path]).max()), path


# ---- the rule itself


def _module(rng, d_in=6, d_out=5, r=3, bias=True):
    p = {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32),
         "lora_a": jnp.asarray(rng.normal(size=(d_in, r)) * 0.3, jnp.float32),
         "lora_b": jnp.asarray(rng.normal(size=(r, d_out)) * 0.3, jnp.float32),
         "lora_scale": jnp.float32(1.5), "lora_magnitude": jnp.asarray(rng.uniform(0.5, 2.0, d_out), jnp.float32)}
    if bias:
        p["bias"] = jnp.asarray(rng.normal(size=d_out), jnp.float32)
    return p


def test_expanded_norm_equals_the_formed_one():
    rng = np.random.default_rng(0)
    p = _module(rng, 64, 48, 8)
    formed = np.linalg.norm(np.asarray(p["kernel"], np.float64) + 1.5 * np.asarray(p["lora_a"], np.float64) @ np.asarray(p["lora_b"], np.float64), axis=0)
    np.testing.assert_allclose(lora.dora_weight_norm(p), formed, rtol=1e-6)
    # B large enough that sAB is the bigger part of W + sAB: the expansion still holds to float32 precision.
    big = {**p, "lora_b": p["lora_b"] * 30}
    formed = np.linalg.norm(np.asarray(p["kernel"], np.float64) + 45 * np.asarray(p["lora_a"], np.float64) @ np.asarray(p["lora_b"], np.float64), axis=0)
    np.testing.assert_allclose(lora.dora_weight_norm(big), formed, rtol=1e-5)


def _torch_linear(p, dropout=0.0):
    """PEFT's DoRA on a one-Linear torch model holding the same weights as the jpeft module p."""
    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(*p["kernel"].shape, bias="bias" in p)

        def forward(self, x):
            return self.lin(x)

    r = p["lora_a"].shape[1]
    model = peft.get_peft_model(One(), peft.LoraConfig(r=r, lora_alpha=1.5 * r, target_modules=["lin"], use_dora=True, lora_dropout=dropout))
    lin = model.base_model.model.lin
    with torch.no_grad():
        lin.base_layer.weight.copy_(torch.tensor(np.asarray(p["kernel"]).T))
        if "bias" in p:
            lin.base_layer.bias.copy_(torch.tensor(np.asarray(p["bias"])))
        lin.lora_A["default"].weight.copy_(torch.tensor(np.asarray(p["lora_a"]).T))
        lin.lora_B["default"].weight.copy_(torch.tensor(np.asarray(p["lora_b"]).T))
        lin.lora_magnitude_vector["default"].weight.copy_(torch.tensor(np.asarray(p["lora_magnitude"])))
    return model, lin


@pytest.mark.parametrize("bias", [True, False])
def test_dense_matches_peft_linear_with_and_without_lora_dropout(bias):
    """With dropout PEFT feeds the dropped input to the DoRA term and recomputes its frozen product (its training
    branch); PEFT's dropout module is swapped for jpeft's mask so both draw the same one."""
    rng = np.random.default_rng(1)
    p = _module(rng, bias=bias)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    model, lin = _torch_linear(p, dropout=0.5)
    with torch.no_grad():
        expected = model.eval()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(nn.dense(p, jnp.asarray(x), nn.Ctx()), expected, atol=1e-5)

    ctx = nn.Ctx(rng=jax.random.key(3), lora_dropout=0.5)
    mask_ctx = nn.Ctx(rng=jax.random.key(3), lora_dropout=0.5)
    dropped = np.asarray(nn.dropout(mask_ctx, jnp.asarray(x), 0.5))
    assert (dropped == 0).any() and (dropped != 0).any()
    lin.lora_dropout["default"] = type("Fixed", (torch.nn.Module,), {"forward": lambda self, t: torch.tensor(dropped)})()
    with torch.no_grad():
        expected = model.train()(torch.tensor(x)).numpy()
    ours = nn.dense(p, jnp.asarray(x), ctx)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert np.abs(np.asarray(ours) - np.asarray(nn.dense(p, jnp.asarray(x), nn.Ctx()))).max() > 1e-2


def test_norm_is_a_constant_to_autodiff():
    """The gradient wrt A and B is PEFT's (norm detached), not the one through ||W + sAB||."""
    rng = np.random.default_rng(2)
    p = _module(rng)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    w = rng.normal(size=(4, 5)).astype(np.float32)
    model, lin = _torch_linear(p)
    (model.eval()(torch.tensor(x)) * torch.tensor(w)).sum().backward()
    expected = {"lora_a": lin.lora_A["default"].weight.grad.numpy().T, "lora_b": lin.lora_B["default"].weight.grad.numpy().T,
                "lora_magnitude": lin.lora_magnitude_vector["default"].weight.grad.numpy()}
    trainable, frozen = split.partition(p, split.trainable_mask(p))
    grads = jax.grad(lambda t: jnp.sum(nn.dense(split.combine(t, frozen), jnp.asarray(x), nn.Ctx()) * w))(trainable)
    for leaf, g in expected.items():
        np.testing.assert_allclose(grads[leaf], g, atol=1e-5, err_msg=leaf)

    def attached(t):  # the same output with the norm left in the graph: a different gradient, so the check above can fail
        q = split.combine(t, frozen)
        n = jnp.linalg.norm(q["kernel"] + q["lora_scale"] * q["lora_a"] @ q["lora_b"], axis=0)
        y = x @ q["kernel"] + (x @ q["lora_a"]) @ q["lora_b"] * q["lora_scale"]
        return jnp.sum((q["lora_magnitude"] / n * y + q["bias"]) * w)

    assert np.abs(np.asarray(jax.grad(attached)(trainable)["lora_a"]) - expected["lora_a"]).max() > 1e-3


def test_dora_product_gradients_equal_autodiff_of_the_plain_product():
    """`lora.dora_product`'s hand-written backward (m/n folded into W and b) against autodiff of (m/n) (x W + (x a) b s),
    every argument, W as a float kernel and as an int8 group (its gradient there: none, as `quantized_matmul`'s)."""
    rng = np.random.default_rng(6)
    p = _module(rng, 64, 32, 4, bias=False)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((5, 64), (5, 32)))
    args = (x, p["kernel"], p["lora_a"], p["lora_b"], p["lora_scale"], p["lora_magnitude"])
    plain = lambda x, k, a, b, s, mns: mns * (x @ k + (x @ a) @ b * s)  # noqa: E731
    expected = jax.grad(lambda *a: jnp.sum(plain(*a) * w), argnums=tuple(range(6)))(*args)
    got = jax.grad(lambda *a: jnp.sum(lora.dora_product(None, *a) * w), argnums=tuple(range(6)))(*args)
    for name, g, e in zip(("x", "kernel", "a", "b", "scale", "m/n"), got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)

    group = quant.leaves(quant.quantize({"m": {"kernel": p["kernel"]}}, "int8")["m"])
    dequantized = quant.unpack("int8", group).T
    rest = (args[0],) + args[2:]
    expected = jax.grad(lambda x, *a: jnp.sum(plain(x, dequantized, *a) * w), argnums=tuple(range(5)))(*rest)
    got = jax.grad(lambda x, *a: jnp.sum(lora.dora_product("int8", x, group, *a) * w), argnums=tuple(range(5)))(*rest)
    for name, g, e in zip(("x", "a", "b", "scale", "m/n"), got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=f"int8 {name}")


def test_quantized_kernel_norm_uses_the_dequantized_weight():
    rng = np.random.default_rng(4)
    p = _module(rng, 64, 32, 4, bias=False)
    q = quant.quantize({"m": {"kernel": p["kernel"]}}, "int8")["m"]
    float_p = {**p, "kernel": quant.weight(q)}
    q = {**q, **{k: v for k, v in p.items() if k != "kernel"}}
    np.testing.assert_allclose(lora.dora_weight_norm(q), lora.dora_weight_norm(float_p), rtol=1e-6)
    x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)
    np.testing.assert_allclose(nn.dense(q, x, nn.Ctx()), nn.dense(float_p, x, nn.Ctx()), atol=1e-4)
    g = jax.grad(lambda m: jnp.sum(nn.dense({**q, "lora_magnitude": m}, x, nn.Ctx())))(q["lora_magnitude"])
    assert np.abs(np.asarray(g)).min() > 0


# ---- T5


def test_t5_logits_and_gradients_match_peft(flan):
    ref = _randomize_peft(peft.get_peft_model(flan.torch(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=T5_TARGETS, use_dora=True)))
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=T5_TARGETS, use_dora=True)
    params = _peft_into_tree(ref, lora.inject(flan.params, cfg, jax.random.key(0)))
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - torch_logits(ref.eval(), flan.ids, flan.mask, flan.dec)).max() < 1e-4
    plain = {p: v for p, v in tree.flatten(params).items() if not p.endswith("/lora_magnitude")}
    assert np.abs(ours - jpeft_logits(flan, tree.unflatten(plain))).max() > 1e-2  # the magnitude really matters

    weights = np.random.default_rng(5).normal(size=ours.shape).astype(np.float32)
    out = ref.eval()(input_ids=torch.tensor(flan.ids), attention_mask=torch.tensor(flan.mask), decoder_input_ids=torch.tensor(flan.dec))
    (out.logits * torch.tensor(weights)).sum().backward()
    trainable, frozen = split.partition(params, split.trainable_mask(params))
    from jpeft.models import t5

    def loss(t):
        return jnp.sum(t5.forward(flan.config, split.combine(t, frozen), flan.ids, flan.mask, flan.dec) * weights)

    _check_grads(jax.jit(jax.grad(loss))(trainable), _torch_grads(ref))


def test_inject_initialises_the_magnitude_to_the_weight_norm(flan):
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=["q", "wo"], use_dora=True)
    params = lora.inject(flan.params, cfg, jax.random.key(0))
    ref = peft.get_peft_model(flan.torch(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "wo"], use_dora=True))
    expected = {p: g for p, g in ((n.removeprefix("base_model.model.").split(".lora_magnitude_vector.")[0].replace(".", "/") + "/lora_magnitude",
                                   v.detach().numpy()) for n, v in ref.named_parameters() if "lora_magnitude_vector" in n)}
    flat = tree.flatten(params)
    assert expected and set(expected) == {p for p in flat if p.endswith("/lora_magnitude")}
    for path, m in expected.items():
        np.testing.assert_allclose(flat[path], m, rtol=1e-5)
    np.testing.assert_allclose(jpeft_logits(flan, params), jpeft_logits(flan, flan.params), atol=1e-5)  # identity at init
    trainable, total = split.count_params(params, verbose=False)
    ref_trainable = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    assert trainable == ref_trainable


def test_merge_equals_unmerged_and_unmerge_restores(flan):
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=T5_TARGETS, use_dora=True)
    params = _randomize(lora.inject(flan.params, cfg, jax.random.key(0)))
    ours = jpeft_logits(flan, params)
    merged = lora.merge(params)
    assert jax.tree.structure(merged) == jax.tree.structure(flan.params)
    assert np.abs(jpeft_logits(flan, merged) - ours).max() < 1e-5
    _, adapter = split.split_adapter(params)
    with pytest.raises(ValueError, match="dora_norms"):
        lora.unmerge(merged, adapter)
    restored = lora.unmerge(merged, adapter, lora.dora_norms(params))
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for path, v in tree.flatten(restored).items():
        np.testing.assert_allclose(v, tree.flatten(params)[path], atol=1e-5, err_msg=path)


def _randomize(params, seed: int = 1):
    """Non-trivial A, B and magnitude (B starts at zero and the magnitude at ||W||)."""
    flat = tree.flatten(params)
    rng = np.random.default_rng(seed)
    for p, v in sorted(flat.items()):
        leaf = p.rsplit("/", 1)[-1]
        if leaf in ("lora_a", "lora_b"):
            flat[p] = v + jnp.asarray(rng.normal(size=v.shape) * 0.1, v.dtype)
        elif leaf == "lora_magnitude":
            flat[p] = v * jnp.asarray(1 + 0.3 * rng.normal(size=v.shape), v.dtype)
    return tree.unflatten(flat)


def test_peft_files_both_ways(flan, tmp_path):
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=T5_TARGETS, use_dora=True)
    params = _randomize(lora.inject(flan.params, cfg, jax.random.key(0)))
    jpeft.save_adapter(tmp_path / "ours", params, cfg)
    ref = peft.PeftModel.from_pretrained(flan.torch(), str(tmp_path / "ours")).eval()
    assert ref.peft_config["default"].use_dora
    assert np.abs(torch_logits(ref, flan.ids, flan.mask, flan.dec) - jpeft_logits(flan, params)).max() < 1e-4
    jpeft.save_adapter(tmp_path / "inferred", params)  # config rebuilt from the leaves says use_dora too
    assert peft.PeftModel.from_pretrained(flan.torch(), str(tmp_path / "inferred")).peft_config["default"].use_dora

    theirs = _randomize_peft(peft.get_peft_model(flan.torch(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "wi_1"], use_dora=True)), 2)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = jpeft.load_adapter(tmp_path / "peft", flan.params)
    assert any(p.endswith("/lora_magnitude") for p in tree.flatten(loaded))
    assert np.abs(jpeft_logits(flan, loaded) - torch_logits(theirs.eval(), flan.ids, flan.mask, flan.dec)).max() < 1e-4


def test_bad_dora_files_and_trees_are_refused(flan, tmp_path):
    import json

    from safetensors.numpy import load_file, save_file

    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=["q"], use_dora=True)
    params = _randomize(lora.inject(flan.params, cfg, jax.random.key(0)))
    with pytest.raises(ValueError, match="use_dora"):
        jpeft.save_adapter(tmp_path / "x", params, lora.LoraConfig(r=4, alpha=8, target_modules=["q"]))
    flat = tree.flatten(params)
    partial = {p: v for p, v in flat.items() if p != sorted(q for q in flat if q.endswith("/lora_magnitude"))[0]}
    with pytest.raises(ValueError, match="DoRA on every module or on none"):
        jpeft.save_adapter(tmp_path / "x", tree.unflatten(partial))

    jpeft.save_adapter(tmp_path / "a", params, cfg)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith(".lora_magnitude_vector"))
    save_file({**state, key: state[key][:-1]}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lora_magnitude_vector has shape"):
        jpeft.load_adapter(tmp_path / "a", flan.params)
    save_file({k: v for k, v in state.items() if k != key}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="needs"):
        jpeft.load_adapter(tmp_path / "a", flan.params)
    save_file(state, weights, metadata={"format": "pt"})
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(CheckpointError, match="use_dora=False"):
        jpeft.load_adapter(tmp_path / "a", flan.params)


def test_stacking_sharding_and_flax_layers(flan):
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=["q", "wo"], use_dora=True)
    params = lora.inject(flan.params, cfg, jax.random.key(0))
    _, adapter = split.split_adapter(params)
    with pytest.raises(ValueError, match="cannot stack DoRA"):
        multi.stack_lora([adapter, adapter])
    specs = tree.flatten(sharding.param_specs(params, {"data": 1, "fsdp": 2, "model": 2}))
    q = "encoder/block/0/layer/0/SelfAttention/q"
    wo = "encoder/block/0/layer/1/DenseReluDense/wo"
    assert specs[f"{q}/lora_magnitude"] == jax.sharding.PartitionSpec("model")
    assert specs[f"{wo}/lora_magnitude"] == jax.sharding.PartitionSpec("fsdp")
    assert split.trainable_mask(params)[q.split("/")[0]]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]["lora_magnitude"]

    import flax.linen as fnn
    from flax import nnx

    import jpeft.linen
    import jpeft.nnx

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            return fnn.Dense(4, name="proj")(x)

    # On Flax layers DoRA runs through the same rule (tests/test_one_rule.py checks its output against merged weights):
    # its magnitude starts as PEFT's, ||W|| per output, and is trained in NNX.
    model, x = Net(), jnp.ones((1, 3))
    variables = model.init(jax.random.key(0), x)
    p = jpeft.linen.inject(model, variables["params"], lora.LoraConfig(r=2, target_modules=["proj"], use_dora=True), jax.random.key(0), x)
    np.testing.assert_allclose(p["proj"]["lora_magnitude"], jnp.linalg.norm(variables["params"]["proj"]["kernel"], axis=0), rtol=1e-6)

    class NnxNet(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(3, 4, rngs=nnx.Rngs(0))

    net = jpeft.nnx.inject(NnxNet(), lora.LoraConfig(r=2, target_modules=["proj"], use_dora=True), jax.random.key(0))
    assert isinstance(net.proj.lora_magnitude, nnx.LoRAParam)


# ---- Llama and Gemma 3


def _causal(name, tmp_path):
    """(torch model, jpeft module, config, params) of a tiny Llama with q/k/v and MLP biases, or a tiny Gemma 3."""
    from jpeft.models import gemma, llama
    from tests.models import test_gemma, test_llama

    if name == "llama":
        model_type, overrides = test_llama.CONFIGS["mha_untied_biased"]
        model = test_llama.make_hf_llama(tmp_path, model_type, **overrides)
        return model, llama, *llama.load_pretrained(tmp_path)
    model_type, overrides = test_gemma.CONFIGS["gemma3_local_rope"]
    model = test_gemma.make_hf_gemma(tmp_path, model_type, **overrides)
    return model, gemma, *gemma.load_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_causal_lm_logits_gradients_and_files_match_peft(name, tmp_path):
    from tests.models.test_llama import batch

    model, module, config, base = _causal(name, tmp_path / "base")
    ref = _randomize_peft(peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=CAUSAL_TARGETS, use_dora=True)))
    params = _peft_into_tree(ref, lora.inject(base, lora.LoraConfig(r=4, alpha=8, target_modules=CAUSAL_TARGETS, use_dora=True), jax.random.key(0)))
    ids, mask = batch(np.random.default_rng(3), 2, 9)
    real = mask.astype(bool)
    ours = np.asarray(module.forward(config, params, ids, mask))
    out = ref.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    assert np.abs(ours - out.logits.detach().numpy())[real].max() < 1e-4

    weights = np.random.default_rng(5).normal(size=ours.shape).astype(np.float32) * real[..., None]
    (out.logits * torch.tensor(weights)).sum().backward()
    trainable, frozen = split.partition(params, split.trainable_mask(params))
    expected = _torch_grads(ref)
    for remat in (False, True):  # under remat DoRA's kept z = x W + (x A) B s and m/n stand in for the recomputation
        grads = jax.grad(lambda t: jnp.sum(module.forward(config, split.combine(t, frozen), ids, mask, remat=remat) * weights))(trainable)
        _check_grads(grads, expected)

    ref.save_pretrained(tmp_path / "peft")  # PEFT -> jpeft
    loaded = jpeft.load_adapter(tmp_path / "peft", base)
    assert np.abs(np.asarray(module.forward(config, loaded, ids, mask)) - ours)[real].max() < 1e-5
    jpeft.save_adapter(tmp_path / "ours", params)  # jpeft -> PEFT
    again = peft.PeftModel.from_pretrained(_causal(name, tmp_path / "fresh")[0], str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert np.abs(again(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy() - ours)[real].max() < 1e-4
    merged = lora.merge(params)
    assert np.abs(np.asarray(module.forward(config, merged, ids, mask)) - ours)[real].max() < 1e-5
