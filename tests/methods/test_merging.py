"""Adapter arithmetic against HF PEFT's `add_weighted_adapter`: every combination type on a tiny Llama with
randomised adapters of different alphas (and ranks, where the combination allows), the merged adapter's delta W
per module and the model's logits compared with PEFT's, its stored A/B and saved file for linear/cat/svd, and the
result saved, merged and stacked like any adapter; two combinations on a tiny T5."""

from __future__ import annotations

import contextlib
import json

import jax
import numpy as np
import peft
import pytest
import torch
from packaging.version import Version
from safetensors.numpy import load_file

import jpeft
from jpeft import lora, merging, multi, tree
from jpeft.models import llama
from tests.conftest import jpeft_logits, torch_logits
from tests.models.test_llama import batch, make_hf_llama

PEFT_PREFIX = "base_model.model."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Same-rank adapters (the linear-like combinations need equal ranks) with different alphas and modules (rsLoRA too),
# and a mixed-rank set (rank_pattern included) for cat and the svd combinations.
SAME_RANK = {
    "s1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "s2": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj"]),
    "s3": dict(r=4, lora_alpha=3, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True),
}
MIXED_RANK = {
    "m1": dict(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"v_proj": 6}),
    "m2": dict(r=3, lora_alpha=5, target_modules=["q_proj", "gate_proj"], use_rslora=True),
}
WEIGHTS = {"s1": 0.7, "s2": -0.4, "s3": 1.3, "m1": 0.6, "m2": -1.1}
KEY = jax.random.key(11)


def _randomise(peft_model, names, seed):
    """Trained-size A and B (a fresh B is zero, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            for name in names:
                if hasattr(module, "lora_A") and name in module.lora_A:
                    for w in (module.lora_A[name].weight, module.lora_B[name].weight):
                        w.copy_(torch.randn(w.shape, generator=gen) * 0.3)


def _peft_model(base, adapter_sets, task_type):
    from peft import LoraConfig, get_peft_model

    configs = {n: LoraConfig(task_type=task_type, lora_dropout=0.0, **kw) for s in adapter_sets for n, kw in s.items()}
    names = list(configs)
    model = get_peft_model(base, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, configs[name])
    _randomise(model, names, seed=3)
    return model.eval()


def _jpeft_adapters(peft_model, params, names, tmp_path):
    """Each PEFT adapter, through its saved file, as a jpeft adapter tree."""
    peft_model.save_pretrained(tmp_path / "src", selected_adapters=names)
    out = {}
    for name in names:
        path = tmp_path / "src" / name if name != "default" else tmp_path / "src"
        out[name] = jpeft.split_adapter(jpeft.load_adapter(path, params))[1]
    return out


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from types import SimpleNamespace

    path = tmp_path_factory.mktemp("llama")
    model = make_hf_llama(path, "llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config, params = llama.load_pretrained(path)
    peft_model = _peft_model(model, [SAME_RANK, MIXED_RANK], "CAUSAL_LM")
    adapters = _jpeft_adapters(peft_model, params, [*SAME_RANK, *MIXED_RANK], tmp_path_factory.mktemp("adapters"))
    ids, mask = batch(np.random.default_rng(0), 3, 9)
    return SimpleNamespace(path=path, config=config, params=params, peft=peft_model, adapters=adapters, ids=ids, mask=mask)


def _llama_logits(m, adapter):
    return np.asarray(llama.forward(m.config, jpeft.attach(m.params, adapter), m.ids, m.mask))


def _peft_llama_logits(m, name):
    m.peft.set_adapter(name)
    with torch.no_grad():
        return m.peft(input_ids=torch.tensor(m.ids), attention_mask=torch.tensor(m.mask)).logits.numpy()


@contextlib.contextmanager
def _jpeft_masks(monkeypatch, peft_model, names, density):
    """Make PEFT's torch.bernoulli return jpeft's DARE masks: the module in progress is recorded by wrapping PEFT's two
    per-module helpers; within a module PEFT prunes the present adapters' A's then their B's (or their deltas)."""
    from peft.tuners.lora import model as lora_model
    from peft.utils import merge_utils

    module_names = {id(m): n[len(PEFT_PREFIX):] for n, m in peft_model.named_modules()}
    state = {}

    def wrap(original, parts):
        def run(self, combination_type, adapters, weights, *args, **kwargs):
            target = next(a for a in args if hasattr(a, "lora_A"))
            present = [i for i, n in enumerate(names) if n in target.lora_A]
            assert not state.get("queue"), f"PEFT drew fewer masks than expected in {state['module']}"
            state.update(module=module_names[id(target)], queue=[(p, i) for p in parts for i in present])
            return original(self, combination_type, adapters, weights, *args, **kwargs)
        return run

    def bernoulli(probs):
        part, index = state["queue"].pop(0)
        mask = np.asarray(merging.dare_mask(merging.mask_key(KEY, state["module"], part, index), density, probs.shape[::-1])).T
        assert torch.all(probs == torch.tensor(density, dtype=probs.dtype))
        return torch.from_numpy(np.ascontiguousarray(mask)).to(probs.dtype)

    cls = lora_model.LoraModel
    monkeypatch.setattr(cls, "_generalized_task_arithmetic_weighted_adapter",
                        wrap(cls._generalized_task_arithmetic_weighted_adapter, ("lora_a", "lora_b")))
    monkeypatch.setattr(cls, "_svd_generalized_task_arithmetic_weighted_adapter",
                        wrap(cls._svd_generalized_task_arithmetic_weighted_adapter, ("delta",)))
    monkeypatch.setattr(merge_utils.torch, "bernoulli", bernoulli)
    yield
    assert not state.get("queue"), "PEFT drew fewer masks than expected"


def _jax_svd(monkeypatch):
    """Make PEFT factor with jax's SVD, whose singular pairs may carry other signs than torch's LAPACK gives."""
    import jax.numpy as jnp

    def svd(x, full_matrices=True, driver=None):
        return tuple(torch.from_numpy(np.array(t)) for t in jnp.linalg.svd(jnp.asarray(x.numpy()), full_matrices=full_matrices))

    monkeypatch.setattr(torch.linalg, "svd", svd)


def _peft_merge(m, monkeypatch, names, combination, new_name, **kwargs):
    if kwargs.get("svd_clamp") is not None:
        _jax_svd(monkeypatch)
    masks = _jpeft_masks(monkeypatch, m.peft, names, kwargs.get("density")) if combination.startswith("dare") else contextlib.nullcontext()
    with masks:
        m.peft.add_weighted_adapter(names, [WEIGHTS[n] for n in names], new_name, combination_type=combination, **kwargs)
    monkeypatch.undo()


def _peft_merged_scale(chosen, names, combination):
    """PEFT's scale on the merged adapter, over jpeft's (1): PEFT before 0.22 kept the first adapter's use_rslora, so
    its merged delta was sqrt(r) times the combination (a bug 0.22 fixed; jpeft follows 0.22)."""
    if Version(peft.__version__) >= Version("0.22") or not chosen[names[0]].get("use_rslora"):
        return 1.0
    ranks = [max([chosen[n]["r"], *chosen[n].get("rank_pattern", {}).values()]) for n in names]
    rank = sum(ranks) if combination == "cat" else max(ranks)
    return float(rank) ** 0.5


def _check_deltas(peft_model, merged, new_name, peft_scale=1.0):
    """The merged adapter covers PEFT's modules and its delta W equals PEFT's get_delta_weight (over `peft_scale`, see
    `_peft_merged_scale`) per module to 1e-5."""
    peft_modules = {n[len(PEFT_PREFIX):]: mod for n, mod in peft_model.named_modules()
                    if hasattr(mod, "lora_A") and new_name in mod.lora_A}
    flat = tree.flatten(merged)
    ours = {p[: -len("/lora_a")].replace("/", "."): p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a")}
    assert sorted(ours) == sorted(peft_modules)
    for name, path in ours.items():
        delta = flat[f"{path}/lora_scale"] * (flat[f"{path}/lora_a"] @ flat[f"{path}/lora_b"])
        ref = peft_modules[name].get_delta_weight(new_name).detach().numpy().T / peft_scale
        assert np.abs(np.asarray(delta) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), name
        assert np.abs(ref).max() > 1e-2, name  # a real delta, not zeros on both sides


CASES = [  # (combination, adapters, kwargs)
    ("linear", SAME_RANK, {}),
    ("linear", {"s3": SAME_RANK["s3"], "s2": SAME_RANK["s2"]}, {}),  # rsLoRA first: PEFT < 0.22 scaled the merge by sqrt(r)
    ("svd", {"m2": MIXED_RANK["m2"]}, {}),  # one adapter: PEFT combines it linear
    ("cat", MIXED_RANK | {"s1": SAME_RANK["s1"]}, {}),
    ("svd", MIXED_RANK | {"s2": SAME_RANK["s2"]}, {}),
    ("svd", MIXED_RANK, dict(svd_rank=2, svd_clamp=0.9, svd_full_matrices=False)),
    ("ties", SAME_RANK, dict(density=0.5)),
    ("ties", SAME_RANK, dict(density=0.3, majority_sign_method="frequency")),
    ("ties_svd", MIXED_RANK | {"s3": SAME_RANK["s3"]}, dict(density=0.6)),
    ("dare_linear", SAME_RANK, dict(density=0.5)),
    ("dare_ties", SAME_RANK, dict(density=0.4, majority_sign_method="frequency")),
    ("dare_linear_svd", MIXED_RANK, dict(density=0.7)),
    ("dare_ties_svd", MIXED_RANK | {"s1": SAME_RANK["s1"]}, dict(density=0.5)),
    ("magnitude_prune", SAME_RANK, dict(density=0.5)),
    ("magnitude_prune_svd", MIXED_RANK, dict(density=0.5)),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_matches_peft_add_weighted_adapter(tiny_llama, monkeypatch, case):
    """Delta W per module to 1e-5 and logits to 1e-4 against PEFT.

    DARE's random masks come from jax.random, which torch.bernoulli cannot reproduce bit for bit, so PEFT's
    torch.bernoulli is patched to return jpeft's masks and the comparison is exact; test_dare_masks_are_bernoulli_density
    checks the masks' distribution. svd_clamp clips at a quantile of U S and V^T's entries, which depends on the sign
    of each singular pair, and jax's LAPACK and torch's pick different signs for the same matrix: there PEFT is patched
    to factor with jax's SVD (svd_rank 2, so every kept pair has a distinct, non-zero singular value and is determined up
    to that sign). Without the clamp, delta W does not depend on the signs and PEFT runs unpatched."""
    m = tiny_llama
    combination, chosen, kwargs = CASES[case]
    names = list(chosen)
    new_name = f"merged_{case}"
    _peft_merge(m, monkeypatch, names, combination, new_name, **kwargs)
    merged = merging.merge_adapters([m.adapters[n] for n in names], [WEIGHTS[n] for n in names], combination, key=KEY,
                                    **kwargs)
    _check_deltas(m.peft, merged, new_name, _peft_merged_scale(chosen, names, combination))
    ours, ref = _llama_logits(m, merged), _peft_llama_logits(m, new_name)
    keep = m.mask.astype(bool)
    assert np.abs(ours - ref)[keep].max() <= 1e-4
    base = np.asarray(llama.forward(m.config, m.params, m.ids, m.mask))
    assert np.abs(ours - base)[keep].max() > 1e-2  # the merged adapter matters


@pytest.mark.parametrize("combination, chosen", [("linear", SAME_RANK), ("cat", MIXED_RANK | {"s2": SAME_RANK["s2"]}),
                                                 ("svd", MIXED_RANK | {"s1": SAME_RANK["s1"]})])
def test_saved_file_equals_peft(tiny_llama, monkeypatch, tmp_path, combination, chosen):
    """The stored A/B, rank and alpha: jpeft.save_adapter's file equals PEFT's save_pretrained of the merged adapter.

    svd: A = V^T and B = U S are unique only up to the sign of each singular pair, and jax's LAPACK and torch's choose
    differently for the same matrix; pairs are compared up to that sign. Where a module's combined delta has rank below
    the adapter's r, the extra pairs' singular values are float noise and their vectors an arbitrary basis in both
    implementations: for them B's column is checked to be ~0 on both sides."""
    m = tiny_llama
    names, new_name = list(chosen), f"saved_{combination}"
    _peft_merge(m, monkeypatch, names, combination, new_name)
    merged = merging.merge_adapters([m.adapters[n] for n in names], [WEIGHTS[n] for n in names], combination)
    m.peft.save_pretrained(tmp_path / "peft", selected_adapters=[new_name])
    jpeft.save_adapter(tmp_path / "ours", jpeft.attach(m.params, merged))
    theirs, ours = load_file(tmp_path / "peft" / new_name / "adapter_model.safetensors"), load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(ours)
    if combination == "svd":
        ours, theirs = _align_svd_signs(ours, theirs)
    for k in theirs:
        np.testing.assert_allclose(ours[k], theirs[k], atol=1e-5, rtol=1e-4, err_msg=k)
    cfg_theirs = json.loads((tmp_path / "peft" / new_name / "adapter_config.json").read_text())
    cfg_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (cfg_ours["r"], cfg_ours["lora_alpha"]) == (cfg_theirs["r"], cfg_theirs["lora_alpha"])
    assert not any(cfg_ours["rank_pattern"].values()) and not cfg_ours["alpha_pattern"]


def _align_svd_signs(ours, theirs):
    """Our A rows / B columns sign-flipped to PEFT's per singular pair; pairs with noise singular values zeroed on both sides."""
    ours, theirs = dict(ours), dict(theirs)
    for name in [k for k in theirs if k.endswith("lora_A.weight")]:
        b_name = name.replace("lora_A", "lora_B")
        a, b, ta, tb = ours[name].copy(), ours[b_name].copy(), theirs[name].copy(), theirs[b_name].copy()
        for k in range(a.shape[0]):
            if np.linalg.norm(tb[:, k]) < 1e-4:  # |B column| is the singular value (A's rows are unit vectors)
                assert np.linalg.norm(b[:, k]) < 1e-4, (name, k)
                a[k] = b[:, k] = ta[k] = tb[:, k] = 0
            elif a[k] @ ta[k] < 0:
                a[k], b[:, k] = -a[k], -b[:, k]
        ours[name], ours[b_name], theirs[name], theirs[b_name] = a, b, ta, tb
    return ours, theirs


@pytest.fixture(scope="module")
def svd_merged(tiny_llama):
    names = list(MIXED_RANK)
    return merging.merge_adapters([tiny_llama.adapters[n] for n in names], [WEIGHTS[n] for n in names], "ties_svd", density=0.5)


def test_merged_adapter_saves_and_loads_in_peft(tiny_llama, svd_merged, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    m = tiny_llama
    jpeft.save_adapter(tmp_path / "merged", jpeft.attach(m.params, svd_merged))
    ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(m.path, attn_implementation="eager"), tmp_path / "merged").eval()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(m.ids), attention_mask=torch.tensor(m.mask)).logits.numpy()
    assert np.abs(_llama_logits(m, svd_merged) - theirs)[m.mask.astype(bool)].max() <= 1e-4


def test_merged_adapter_merges_into_the_base(tiny_llama, svd_merged):
    m = tiny_llama
    folded = np.asarray(llama.forward(m.config, lora.merge(jpeft.attach(m.params, svd_merged)), m.ids, m.mask))
    assert np.abs(folded - _llama_logits(m, svd_merged))[m.mask.astype(bool)].max() <= 1e-5


def test_merged_adapter_stacks_with_others(tiny_llama, svd_merged):
    m = tiny_llama
    both = [svd_merged, m.adapters["s1"]]
    params = jpeft.attach(m.params, multi.stack_lora(both))
    rows = np.array([0, 1, 0])
    mixed = np.asarray(llama.forward(m.config, params, m.ids, m.mask, adapter_ids=rows))
    for row, k in enumerate(rows):
        alone = _llama_logits(m, both[k])[row]
        assert np.abs(mixed[row] - alone)[m.mask[row].astype(bool)].max() <= 1e-5, row


def test_dare_masks_are_bernoulli_density(monkeypatch):
    """DARE equal in distribution to PEFT's torch.bernoulli: the kept fraction is the density within 5 binomial standard
    deviations, kept entries are PEFT's (x * mask) / density to 1 ulp (XLA on CPU divides by a broadcast scalar through
    its reciprocal; torch divides), dropped ones are zero, and masks differ across modules, parts and adapters."""
    from peft.utils.merge_utils import random_pruning

    x = jax.random.normal(jax.random.key(0), (200, 300))
    for density in (0.1, 0.5, 0.9):
        mask = merging.dare_mask(merging.mask_key(KEY, "model.layers.0.self_attn.q_proj", "lora_a", 0), density, x.shape)
        n = mask.size
        assert abs(float(mask.mean()) - density) <= 5 * np.sqrt(density * (1 - density) / n)
        pruned = np.asarray(merging.random_pruning(x, density, mask))
        kept = np.asarray(mask).astype(bool)
        monkeypatch.setattr(torch, "bernoulli", lambda probs, mask=mask: torch.from_numpy(np.array(mask)))
        theirs = random_pruning(torch.from_numpy(np.array(x)), density, rescale=True).numpy()
        np.testing.assert_allclose(pruned, theirs, rtol=1.2e-7, atol=0)
        assert not pruned[~kept].any() and np.all(pruned[kept] != 0)
    masks = [merging.dare_mask(merging.mask_key(KEY, mod, part, i), 0.5, (64,))
             for mod in ("m.q", "m.v") for part in ("lora_a", "lora_b") for i in (0, 1)]
    assert len({np.asarray(mk).tobytes() for mk in masks}) == len(masks)


def test_errors(tiny_llama, flan):
    from jpeft import ia3

    ad = tiny_llama.adapters
    same, mixed = [ad["s1"], ad["s2"]], [ad["m1"], ad["s1"]]
    with pytest.raises(ValueError, match=r"ranks \[6, 4\]; 'linear' needs equal ranks"):
        merging.merge_adapters(mixed, [1.0, 1.0], "linear")
    with pytest.raises(ValueError, match="unknown combination 'average'"):
        merging.merge_adapters(same, [1.0, 1.0], "average")
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            merging.merge_adapters(same, [1.0, 1.0], "ties", density=density)
    with pytest.raises(ValueError, match="'ties' needs density"):
        merging.merge_adapters(same, [1.0, 1.0], "ties")
    with pytest.raises(ValueError, match="3 weights for 2 adapters"):
        merging.merge_adapters(same, [1.0, 1.0, 1.0], "cat")
    with pytest.raises(ValueError, match="pass key="):
        merging.merge_adapters(same, [1.0, 1.0], "dare_linear", density=0.5)
    with pytest.raises(ValueError, match="majority_sign_method"):
        merging.merge_adapters(same, [1.0, 1.0], "ties", density=0.5, majority_sign_method="mean")
    with pytest.raises(ValueError, match="svd rank 40 exceeds model.layers.0.mlp.down_proj's min"):
        merging.merge_adapters(same, [1.0, 1.0], "svd", svd_rank=40)
    # A module whose ranks differ although the adapters' largest ranks agree: named.
    bad = tree.flatten(ad["s2"])
    bad = tree.unflatten({p: (v[:, :2] if p.endswith("k_proj/lora_a") else v[:2] if p.endswith("k_proj/lora_b") else v) for p, v in bad.items()})
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj has ranks"):
        merging.merge_adapters([bad, ad["s2"]], [1.0, 1.0], "linear")
    ia3_adapter = jpeft.split_adapter(ia3.inject(flan.params, ia3.IA3Config()))[1]
    with pytest.raises(ValueError, match="LoRA adapters only; adapter 1 holds 'ia3_"):
        merging.merge_adapters([ad["s1"], ia3_adapter], [1.0, 1.0], "cat")
    t5_lora = jpeft.split_adapter(lora.inject(flan.params, lora.LoraConfig(r=4, target_modules=["q"]), jax.random.key(0)))[1]
    t5_lora = tree.unflatten({p.replace("encoder/block/0/layer/0/SelfAttention/q", "model/layers/0/self_attn/q_proj"): v
                              for p, v in tree.flatten(t5_lora).items()})
    with pytest.raises(ValueError, match=r"disagree on model.layers.0.self_attn.q_proj's \(in, out\) sizes"):
        merging.merge_adapters([ad["s1"], t5_lora], [1.0, 1.0], "cat")


@pytest.mark.parametrize("combination, kwargs", [("ties", dict(density=0.5)), ("svd", {})])
def test_t5(flan, monkeypatch, tmp_path, combination, kwargs):
    """The same arithmetic on an encoder-decoder: nothing in it is specific to a model."""
    from types import SimpleNamespace

    sets = [{"x": dict(r=4, lora_alpha=8, target_modules=["q", "v", "wo"]),
             "y": dict(r=4, lora_alpha=2, target_modules=["q", "k"] if combination == "ties" else ["q", "k", "wi_0"])}]
    if combination == "svd":
        sets[0]["y"]["rank_pattern"] = {"k": 6}
    peft_model = _peft_model(flan.torch(), sets, "SEQ_2_SEQ_LM")
    names = list(sets[0])
    adapters = _jpeft_adapters(peft_model, flan.params, names, tmp_path)
    m = SimpleNamespace(peft=peft_model)
    weights = {"x": 0.8, "y": -0.5}
    peft_model.add_weighted_adapter(names, [weights[n] for n in names], "merged", combination_type=combination, **kwargs)
    merged = merging.merge_adapters([adapters[n] for n in names], [weights[n] for n in names], combination, **kwargs)
    _check_deltas(m.peft, merged, "merged")
    peft_model.set_adapter("merged")
    ours = jpeft_logits(flan, jpeft.attach(flan.params, merged))
    assert np.abs(ours - torch_logits(peft_model, flan.ids, flan.mask, flan.dec)).max() <= 1e-4
