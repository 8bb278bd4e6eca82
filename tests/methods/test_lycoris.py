"""LoHa and LoKr against HF PEFT on the tiny T5, Llama and Gemma 3: logits both ways through PEFT adapter files,
the same leaves and zeros as PEFT's initialisation, merge, gradients (only the method's leaves, equal to
PyTorch's), an NF4 base, sharding specs, and the refusals."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import loha, lokr, nn, quant, sharding, split, tree
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import gemma, llama, t5
from tests.conftest import jpeft_logits, torch_logits

T5_TARGETS = ["q", "v", "o", "wi_0", "wo"]
# (jpeft module, jpeft config, PEFT config, PEFT's tensor prefix). T5 here: d_model 32, q/v 32 -> 24, wi_0 32 -> 48,
# wo 48 -> 32; LoKr factors 32 = 4 x 8, 24 = 4 x 6, 48 = 6 x 8. r=4 keeps W2 whole except on wo (rank 1: W2 as
# a pair); decompose_both at r=1 splits W1 too, with factor 4 (48 = 4 x 12) and an alpha pattern.
CASES = {
    "loha": (loha, dict(r=4, alpha=8, rank_pattern={"wo": 2}, alpha_pattern={"q": 3}), peft.LoHaConfig, "hada_"),
    "lokr": (lokr, dict(r=4, alpha=8, rank_pattern={"wo": 1}), peft.LoKrConfig, "lokr_"),
    "lokr_decompose_both": (lokr, dict(r=1, alpha=2, decompose_both=True, decompose_factor=4, alpha_pattern={"wi_0": 5}),
                            peft.LoKrConfig, "lokr_"),
}


def _configs(case: str, targets):
    module, fields, peft_cls, prefix = CASES[case]
    cfg = (loha.LoHaConfig if module is loha else lokr.LoKrConfig)(target_modules=tuple(targets), **fields)
    return module, cfg, peft_cls(target_modules=list(targets), **fields), prefix


def randomize(params, key, std=0.3):
    """Every LoHa / LoKr factor drawn N(0, std^2), so no factor is PEFT's zero and a wrong layout shows."""
    flat = tree.flatten(params)
    for i, p in enumerate(sorted(flat)):
        if p.rsplit("/", 1)[-1] in loha.TRAINABLE + lokr.TRAINABLE:
            flat[p] = std * jax.random.normal(jax.random.fold_in(key, i), flat[p].shape, flat[p].dtype)
    return tree.unflatten(flat)


def randomize_torch(model, prefix, std=0.3):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if prefix in name:
                p.normal_(0, std)
    return model


def _structure(params):
    return {p: tuple(v.shape) for p, v in tree.flatten(params).items() if split.is_adapter_path(p)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_t5_matches_peft_both_ways(flan, tmp_path, case):
    module, cfg, peft_cfg, prefix = _configs(case, T5_TARGETS)
    injected = module.inject(flan.params, cfg, jax.random.key(0))
    # An untrained adapter is the identity, exactly.
    np.testing.assert_array_equal(jpeft_logits(flan, injected), jpeft_logits(flan, flan.params))

    # jpeft -> PEFT
    params = randomize(injected, jax.random.key(1))
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - jpeft_logits(flan, flan.params)).max() > 1e-2
    jpeft.save_adapter(tmp_path / "ours", params, cfg)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["peft_type"] == peft_cfg.peft_type.value and written["r"] == cfg.r and written["alpha"] == cfg.alpha
    theirs = torch_logits(peft.PeftModel.from_pretrained(flan.torch(), str(tmp_path / "ours")).eval(), flan.ids, flan.mask, flan.dec)
    assert np.abs(ours - theirs).max() < 1e-4

    # PEFT -> jpeft: the adapter PEFT builds has exactly the leaves and shapes jpeft's inject builds.
    ref = randomize_torch(peft.get_peft_model(flan.torch(), peft_cfg), prefix)
    ref.save_pretrained(tmp_path / "peft")
    loaded = jpeft.load_adapter(tmp_path / "peft", flan.params)
    assert _structure(loaded) == _structure(injected)
    expected = torch_logits(ref.eval(), flan.ids, flan.mask, flan.dec)
    got = jpeft_logits(flan, loaded)
    assert np.abs(got - expected).max() < 1e-4

    # merge folds the update into the kernels; unmerge takes it back out.
    merged = module.merge(loaded)
    assert not any(split.is_adapter_path(p) for p in tree.flatten(merged))
    assert np.abs(jpeft_logits(flan, merged) - got).max() < 1e-4
    _, adapter = split.split_adapter(loaded)
    restored = tree.flatten(module.unmerge(merged, adapter))
    for p, v in tree.flatten(loaded).items():
        np.testing.assert_allclose(restored[p], v, atol=1e-6, err_msg=p)


@pytest.mark.parametrize("case", ["loha", "lokr_decompose_both"])
def test_gradients_match_pytorch_on_the_method_leaves_only(flan, case):
    module, cfg, peft_cfg, prefix = _configs(case, T5_TARGETS)
    ref = randomize_torch(peft.get_peft_model(flan.torch(), peft_cfg), prefix).eval()  # eval: no dropout either side
    state = {n.removeprefix("base_model.model.").replace(".default", ""): p for n, p in ref.named_parameters() if prefix in n}
    flat = tree.flatten(module.inject(flan.params, cfg, jax.random.key(0)))
    for name, p in state.items():
        m, leaf = name.rsplit(".", 1)
        flat[f"{m.replace('.', '/')}/{leaf.replace('hada_', 'loha_')}"] = jnp.asarray(p.detach().numpy().T)
    params = tree.unflatten(flat)
    weights = np.random.default_rng(3).standard_normal(jpeft_logits(flan, params).shape).astype(np.float32) / 100

    out = ref(input_ids=torch.tensor(flan.ids), attention_mask=torch.tensor(flan.mask), decoder_input_ids=torch.tensor(flan.dec))
    (out.logits * torch.tensor(weights)).sum().backward()

    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    loss = lambda t: jnp.sum(t5.forward(flan.config, jpeft.combine(t, frozen), flan.ids, flan.mask, flan.dec) * weights)  # noqa: E731
    grads = {p: g for p, g in tree.flatten(jax.grad(loss)(trainable)).items() if g is not None}
    assert {p.rsplit("/", 1)[-1] for p in grads} == {leaf for leaf in module.TRAINABLE if any(p.endswith(f"/{leaf}") for p in flat)}
    assert len(grads) == len(state)
    for name, p in state.items():
        m, leaf = name.rsplit(".", 1)
        g = np.asarray(grads[f"{m.replace('.', '/')}/{leaf.replace('hada_', 'loha_')}"])
        assert np.abs(g).max() > 1e-3, name
        np.testing.assert_allclose(g, p.grad.numpy().T, atol=1e-4, rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_init_zeros_and_counts_match_peft(flan, case):
    """The same factor starts at zero, the others within PEFT's Kaiming bound, and the trainable count is PEFT's."""
    module, cfg, peft_cfg, prefix = _configs(case, T5_TARGETS)
    ref = peft.get_peft_model(flan.torch(), peft_cfg)
    params = module.inject(flan.params, cfg, jax.random.key(0))
    flat = tree.flatten(params)
    for name, p in ref.named_parameters():
        if prefix not in name:
            continue
        m, leaf = name.removeprefix("base_model.model.").replace(".default", "").rsplit(".", 1)
        ours = np.asarray(flat[f"{m.replace('.', '/')}/{leaf.replace('hada_', 'loha_')}"])
        assert ours.shape == p.shape[::-1]
        assert (not ours.any()) == (not p.detach().numpy().any()), name
        assert np.abs(ours).max() <= 1 / np.sqrt(p.shape[1]), name  # kaiming_uniform_(a=sqrt(5)) on (rows, fan_in)
    assert jpeft.count_params(params, verbose=False) == ref.get_nb_trainable_parameters()


def test_lokr_init_variants_match_peft(flan):
    for init in (False, "lycoris"):
        cfg = lokr.LoKrConfig(r=1, decompose_both=True, target_modules=("q", "wo"), init_weights=init)
        ref = peft.get_peft_model(flan.torch(), peft.LoKrConfig(r=1, decompose_both=True, target_modules=["q", "wo"], init_weights=init))
        flat = tree.flatten(lokr.inject(flan.params, cfg, jax.random.key(0)))
        zeros = {n.removeprefix("base_model.model.").replace(".default", "") for n, p in ref.named_parameters()
                 if "lokr_" in n and not p.detach().numpy().any()}
        assert zeros == {p.replace("/", ".") for p, v in flat.items() if "lokr_w" in p and not np.asarray(v).any()}
        assert bool(zeros) == (init == "lycoris")


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_nf4_base_matches_its_dequantized_twin(method):
    """On an NF4-quantized Llama the loss and the method's gradients equal those on the dequantized float base."""
    from tests.quant.test_quant import _loss_and_grads, _tiny_llama

    config, params = _tiny_llama(hidden=64, inter=128)
    module = {"loha": loha, "lokr": lokr}[method]
    cfg = (loha.LoHaConfig if method == "loha" else lokr.LoKrConfig)(r=2, target_modules=("q_proj", "down_proj"))
    qparams = randomize(module.inject(quant.quantize(params, "nf4"), cfg, jax.random.key(1)), jax.random.key(2), std=0.1)
    assert quant.quantized_modules(qparams)
    (loss_q, grads_q), (loss_f, grads_f) = (_loss_and_grads(config, p, remat=True) for p in (qparams, quant.dequantize(qparams)))
    np.testing.assert_allclose(loss_q, loss_f, rtol=1e-5)
    gq, gf = ({p: v for p, v in tree.flatten(g).items() if v is not None} for g in (grads_q, grads_f))
    assert sorted(gq) == sorted(gf) and {p.rsplit("/", 1)[-1] for p in gq} <= set(module.TRAINABLE)
    for p in gq:
        np.testing.assert_allclose(gq[p], gf[p], rtol=1e-4, atol=1e-6, err_msg=p)
    merged = module.merge(qparams)  # the quantized weights dequantized, the update folded in
    assert not quant.quantized_modules({"m": merged["model"]["layers"]["0"]["self_attn"]["q_proj"]})


# ---- Llama and Gemma 3


def _causal_round_trip(tmp_path, path, model_cls, forward, config, base, case, targets):
    from tests.models.test_llama import batch
    from tests.models.test_llama import torch_logits as causal_logits

    module, cfg, peft_cfg, prefix = _configs(case, targets)
    ids, mask = batch(np.random.default_rng(3), 2, 9)
    real = mask > 0
    params = randomize(module.inject(base, cfg, jax.random.key(0)), jax.random.key(1), std=0.2)
    ours = np.asarray(forward(config, params, ids, mask))
    assert np.abs(ours - np.asarray(forward(config, base, ids, mask)))[real].max() > 1e-2
    jpeft.save_adapter(tmp_path / "ours", params, cfg)
    theirs = causal_logits(peft.PeftModel.from_pretrained(model_cls.from_pretrained(path, attn_implementation="eager"),
                                                          str(tmp_path / "ours")).eval(), ids, mask)
    assert np.abs(ours - theirs)[real].max() < 1e-4

    ref = randomize_torch(peft.get_peft_model(model_cls.from_pretrained(path, attn_implementation="eager"), peft_cfg), prefix, std=0.2)
    ref.save_pretrained(tmp_path / "peft")
    loaded = jpeft.load_adapter(tmp_path / "peft", base)
    got = np.asarray(forward(config, loaded, ids, mask))
    assert np.abs(got - causal_logits(ref.eval(), ids, mask))[real].max() < 1e-4
    assert np.abs(np.asarray(forward(config, module.merge(loaded), ids, mask)) - got)[real].max() < 1e-4


SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tests.models.test_llama import make_hf_llama

    path = tmp_path_factory.mktemp("llama_lycoris")
    make_hf_llama(path, "llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return path, *llama.load_pretrained(path)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    from tests.models.test_gemma import CONFIGS, make_hf_gemma

    path = tmp_path_factory.mktemp("gemma3_lycoris")
    make_hf_gemma(path, CONFIGS["gemma3_local_rope"][0], **CONFIGS["gemma3_local_rope"][1])
    return path, *gemma.load_pretrained(path)


@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_llama_matches_peft_both_ways(tiny_llama, tmp_path, case):
    from transformers import LlamaForCausalLM

    path, config, base = tiny_llama
    _causal_round_trip(tmp_path, path, LlamaForCausalLM, llama.forward, config, base, case, SEVEN)


@pytest.mark.parametrize("case", ["loha", "lokr_decompose_both"])
def test_gemma3_matches_peft_both_ways(tiny_gemma3, tmp_path, case):
    from transformers import Gemma3ForCausalLM

    path, config, base = tiny_gemma3
    _causal_round_trip(tmp_path, path, Gemma3ForCausalLM, gemma.forward, config, base, case, SEVEN)


# ---- Rule, sharding, refusals


def test_fused_updates_equal_the_update_matrix():
    """LoKr's factor-by-factor product and LoHa's rank-r^2 form equal x @ ΔW (PEFT's materialised form), both
    contraction orders and both LoHa branches exercised."""
    key, ctx = jax.random.key(0), nn.Ctx()
    x = jax.random.normal(key, (2, 3, 48))
    draw = lambda shapes: {leaf: jax.random.normal(jax.random.fold_in(key, i), s) for i, (leaf, s) in enumerate(shapes.items())}  # noqa: E731
    for d_out, cfg in ((40, lokr.LoKrConfig(r=1, decompose_both=True)), (7, lokr.LoKrConfig(r=8)), (36, lokr.LoKrConfig(r=2, decompose_factor=4))):
        p = {**draw(lokr.shapes(48, d_out, cfg.r, cfg)), "lokr_scale": jnp.asarray(0.7)}
        np.testing.assert_allclose(lokr.delta(p, x, ctx), x @ lokr.weight(p), atol=1e-4, rtol=1e-5)
    for r in (2, 8):  # 2: factored (4 * 88 < 1920); 8: materialised
        p = {**draw(loha.shapes(48, 40, r)), "loha_scale": jnp.asarray(0.7)}
        np.testing.assert_allclose(loha.delta(p, x, ctx), x @ loha.weight(p), atol=1e-4, rtol=1e-5)


def test_sharding_loha_follows_the_kernel_lokr_replicates():
    params = {"self_attn": {"q_proj": {"kernel": jnp.zeros((32, 64))}}}
    sizes = {"data": 1, "fsdp": 2, "model": 2}
    ha = tree.flatten(sharding.param_specs(loha.inject(params, loha.LoHaConfig(r=2, target_modules=("q_proj",)), jax.random.key(0)), sizes))
    assert ha["self_attn/q_proj/loha_w1_b"] == sharding.P("fsdp", None) and ha["self_attn/q_proj/loha_w2_a"] == sharding.P(None, "model")
    kr = tree.flatten(sharding.param_specs(lokr.inject(params, lokr.LoKrConfig(r=1, target_modules=("q_proj",)), jax.random.key(0)), sizes))
    assert {p: s for p, s in kr.items() if "lokr" in p} == {p: sharding.P() for p in kr if "lokr" in p} and len(kr) == 5


def test_refusals(flan, tmp_path):
    with pytest.raises(ValueError, match="rank_dropout=0.1 is not implemented"):
        lokr.LoKrConfig(rank_dropout=0.1)
    with pytest.raises(ValueError, match="module_dropout"):
        loha.LoHaConfig(module_dropout=0.5)
    with pytest.raises(ValueError, match="init_weights='lycoris'"):
        loha.LoHaConfig(init_weights="lycoris")
    cfg = lokr.LoKrConfig(r=2, target_modules=("q",))
    params = lokr.inject(flan.params, cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="already has PEFT leaves"):
        lokr.inject(params, cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="needs its LoKrConfig"):
        jpeft.save_adapter(tmp_path / "a", params)
    with pytest.raises(ValueError, match=r"config \(rank 2\) gives"):
        jpeft.save_adapter(tmp_path / "a", params, lokr.LoKrConfig(r=2, target_modules=("q",), decompose_both=True, decompose_factor=2))
    with pytest.raises(ValueError, match="no LoKr weights"):
        lokr.merge(flan.params)
    # An adapter file whose tensors do not fit the config it names is refused, naming the module.
    jpeft.save_adapter(tmp_path / "ok", params, cfg)
    cfg_file = tmp_path / "ok" / "adapter_config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"decompose_factor": -1', '"decompose_factor": 2'))
    with pytest.raises(CheckpointError, match=r"SelfAttention\.q has"):
        jpeft.load_adapter(tmp_path / "ok", flan.params)


def test_flax_models_refuse_loha_and_lokr():
    import flax.linen as fnn

    from jpeft import linen

    model = fnn.Dense(8)
    variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
    for cfg in (loha.LoHaConfig(target_modules=".*"), lokr.LoKrConfig(target_modules=".*")):
        with pytest.raises(ValueError, match=f"{type(cfg).__name__} is not supported on Flax models"):
            linen.inject(model, variables, cfg, jax.random.key(1), jnp.ones((1, 4)))
