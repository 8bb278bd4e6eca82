"""Adapter files in HF PEFT's format: jpeft -> PEFT and PEFT -> jpeft round trips, merged export, bad input."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open

import jpeft
from jpeft import ia3, lora, peft_format, prompt, split, tree
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import t5
from tests.conftest import jpeft_logits, torch_logits

TARGETS = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
RANK_PATTERN = {"encoder.block.1.layer.0.SelfAttention.q": 2, "EncDecAttention.v": 6}
ALPHA_PATTERN = {"wo": 3.0}


def _randomize(params, key, scale=0.1, only=("lora_a", "lora_b", "ia3_in", "ia3_out", "prompt_embeddings")):
    """Non-trivial adapter values (LoRA B starts at zero, IA3 at one), so a wrong layout would show."""
    flat = tree.flatten(params)
    for i, (p, v) in enumerate(sorted(flat.items())):
        if p.rsplit("/", 1)[-1] in only:
            noise = jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype)
            flat[p] = v + scale * noise if not p.endswith("prompt_embeddings") else noise
    return tree.unflatten(flat)


def _peft_loads(flan, path):
    return peft.PeftModel.from_pretrained(flan.torch(), str(path)).eval()


def _randomize_torch(model, key="lora_"):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.copy_((1 if key == "ia3_l" else 0) + 0.1 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------------------------
# jpeft -> PEFT -> jpeft


@pytest.mark.parametrize("with_config", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_jpeft_to_peft(flan, tmp_path, rslora, with_config):
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, use_rslora=rslora)
    params = _randomize(lora.inject(flan.params, cfg, jax.random.key(0)), jax.random.key(1))
    jpeft.save_adapter(tmp_path / "a", params, cfg if with_config else None, base_model_name_or_path=str(flan.path))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - jpeft_logits(flan, flan.params)).max() > 1e-2
    theirs = torch_logits(_peft_loads(flan, tmp_path / "a"), flan.ids, flan.mask, flan.dec)
    assert np.abs(ours - theirs).max() < 1e-4

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "np") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.encoder.block.1.layer.0.SelfAttention.q.lora_A.weight")
    assert a.shape == (2, 32)  # PyTorch layout (r, in) with the rank pattern applied
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert len(keys) == 2 * len(lora.target_names(flan.params, cfg))  # the adapter only

    back = jpeft.load_adapter(tmp_path / "a", flan.params)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert np.abs(jpeft_logits(flan, back) - ours).max() < 1e-5
    scales = lambda t: {p: v for p, v in tree.flatten(t).items() if p.endswith("lora_scale")}  # noqa: E731
    assert scales(back) == scales(params)  # bit for bit, rsLoRA's alpha / sqrt(r) too, with or without the config


def test_reconstructed_config_is_peft_like(flan, tmp_path):
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=["q", "v"], rank_pattern={"EncDecAttention.v": 6}, alpha_pattern={"q": 3.0})
    params = lora.inject(flan.params, cfg, jax.random.key(0))
    jpeft.save_adapter(tmp_path / "a", params)
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "SEQ_2_SEQ_LM"
    assert saved["r"] == 4 and saved["target_modules"] == ["q", "v"]
    assert set(saved["rank_pattern"].values()) == {6} and all("EncDecAttention.v" in k for k in saved["rank_pattern"])
    # alpha comes back from lora_scale * r; q's alpha 3 is the exception either way round
    q_alphas = {saved["alpha_pattern"].get(n, saved["lora_alpha"]) for n in lora.target_names(flan.params, cfg) if n.endswith(".q")}
    assert q_alphas == {3}

    only_encoder_q = lora.inject(flan.params, lora.LoraConfig(target_modules=r"encoder\..*\.q"), jax.random.key(0))
    jpeft.save_adapter(tmp_path / "b", only_encoder_q)
    targets = json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) == 2 and all(t.startswith("encoder.") for t in targets)  # "q" alone would also take the decoder's


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_peft_to_jpeft(flan, tmp_path, rslora):
    common = dict(target_modules=TARGETS, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, use_rslora=rslora)
    ref = _randomize_torch(peft.get_peft_model(flan.torch(), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, **common)))
    ref.save_pretrained(tmp_path / "peft")
    params = jpeft.load_adapter(tmp_path / "peft", flan.params)
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - torch_logits(ref.eval(), flan.ids, flan.mask, flan.dec)).max() < 1e-4
    assert np.abs(ours - jpeft_logits(flan, flan.params)).max() > 1e-2
    # and back out again: PEFT reads jpeft's copy of its own adapter
    jpeft.save_adapter(tmp_path / "again", params)
    assert np.abs(torch_logits(_peft_loads(flan, tmp_path / "again"), flan.ids, flan.mask, flan.dec) - ours).max() < 1e-4


def test_ia3_round_trips(flan, tmp_path):
    ref = _randomize_torch(peft.get_peft_model(flan.torch(), peft.IA3Config(task_type="SEQ_2_SEQ_LM")), "ia3_l")
    ref.save_pretrained(tmp_path / "peft")
    params = jpeft.load_adapter(tmp_path / "peft", flan.params)
    assert "ia3_in" in params["encoder"]["block"]["0"]["layer"]["1"]["DenseReluDense"]["wo"]
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - torch_logits(ref.eval(), flan.ids, flan.mask, flan.dec)).max() < 1e-4

    mine = _randomize(ia3.inject(flan.params, ia3.IA3Config()), jax.random.key(2), scale=0.3)
    for cfg in (ia3.IA3Config(), None):
        jpeft.save_adapter(tmp_path / "ours", mine, cfg)
        saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
        assert saved["feedforward_modules"] == ["wo"] and sorted(saved["target_modules"]) == ["k", "v", "wo"]
        want = jpeft_logits(flan, mine)
        assert np.abs(torch_logits(_peft_loads(flan, tmp_path / "ours"), flan.ids, flan.mask, flan.dec) - want).max() < 1e-4
        assert np.abs(jpeft_logits(flan, jpeft.load_adapter(tmp_path / "ours", flan.params)) - want).max() < 1e-5


def test_prompt_tuning_round_trips(flan, tmp_path):
    n = 5
    ref = peft.get_peft_model(flan.torch(), peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=n))
    torch.manual_seed(0)
    with torch.no_grad():
        ref.prompt_encoder["default"].embedding.weight.normal_()
    ref.save_pretrained(tmp_path / "peft")
    params = jpeft.load_adapter(tmp_path / "peft", flan.params)
    assert params["prompt_embeddings"].shape == (n, flan.config.d_model)
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - torch_logits(ref.eval(), flan.ids, flan.mask, flan.dec)).max() < 1e-4

    mine = _randomize(prompt.inject(flan.params, prompt.PromptTuningConfig(num_virtual_tokens=3), jax.random.key(0)), jax.random.key(3))
    jpeft.save_adapter(tmp_path / "ours", mine, prompt.PromptTuningConfig(num_virtual_tokens=3))
    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "np") as f:
        assert f.get_tensor("prompt_embeddings").shape == (6, flan.config.d_model)  # 2N rows, as PEFT writes for seq2seq
    want = jpeft_logits(flan, mine)
    assert np.abs(torch_logits(_peft_loads(flan, tmp_path / "ours"), flan.ids, flan.mask, flan.dec) - want).max() < 1e-4
    np.testing.assert_array_equal(jpeft.load_adapter(tmp_path / "ours", flan.params)["prompt_embeddings"], mine["prompt_embeddings"])


def test_causal_lm_trees_are_named_generically(tmp_path):
    """A Llama-shaped tree gets CAUSAL_LM, one block of prompt rows and `model.layers...` tensor names."""
    base = {"model": {"embed_tokens": {"embedding": jnp.ones((10, 8))},
                      "layers": {"0": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}}}}
    params = lora.inject(base, lora.LoraConfig(r=2, target_modules=["q_proj"]), jax.random.key(0))
    jpeft.save_adapter(tmp_path / "l", params)
    assert json.loads((tmp_path / "l" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    with safe_open(str(tmp_path / "l" / "adapter_model.safetensors"), "np") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()
    back = jpeft.load_adapter(tmp_path / "l", base)
    np.testing.assert_array_equal(back["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"], params["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"])

    soft = prompt.inject(base, prompt.PromptTuningConfig(num_virtual_tokens=3), jax.random.key(0))
    jpeft.save_adapter(tmp_path / "p", soft)
    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), "np") as f:
        assert f.get_tensor("prompt_embeddings").shape == (3, 8)


def test_llama_round_trips_with_peft(tmp_path):
    """The same code serves a causal LM: `model.layers...` names, CAUSAL_LM, one block of prompt rows."""
    from jpeft.models import llama
    from tests.models.test_llama import make_hf_llama

    make_hf_llama(tmp_path / "base")
    config, base = llama.load_pretrained(tmp_path / "base")
    ids = np.random.default_rng(3).integers(3, 96, size=(2, 7))
    mask = np.ones_like(ids)

    def theirs(path):
        from transformers import LlamaForCausalLM

        model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager"), str(path)).eval()
        with torch.no_grad():
            return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()

    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=seven, rank_pattern={"down_proj": 2}, use_rslora=True)
    params = _randomize(lora.inject(base, cfg, jax.random.key(0)), jax.random.key(1))
    jpeft.save_adapter(tmp_path / "lora", params, cfg)
    ours = np.asarray(llama.forward(config, params, ids, mask))
    assert np.abs(ours - np.asarray(llama.forward(config, base, ids, mask))).max() > 1e-2
    assert np.abs(theirs(tmp_path / "lora") - ours).max() < 1e-4
    back = jpeft.load_adapter(tmp_path / "lora", base)
    assert np.abs(np.asarray(llama.forward(config, back, ids, mask)) - ours).max() < 1e-5

    # PEFT -> jpeft: an adapter PEFT itself wrote (all seven projections, a rank_pattern entry).
    from transformers import LlamaForCausalLM

    torch.manual_seed(4)
    ref = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager"),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=seven, rank_pattern={"up_proj": 2}))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    ref.save_pretrained(tmp_path / "peft_lora")
    loaded = jpeft.load_adapter(tmp_path / "peft_lora", base)
    with torch.no_grad():
        expected = ref.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(np.asarray(llama.forward(config, loaded, ids, mask)) - expected).max() < 1e-4

    # Merged export: a plain transformers checkpoint with the adapter folded in.
    llama.save_pretrained(tmp_path / "merged", config, lora.merge(params))
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        exported = merged(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(exported - ours).max() < 1e-4

    soft = _randomize(prompt.inject(base, prompt.PromptTuningConfig(num_virtual_tokens=3), jax.random.key(0)), jax.random.key(2))
    jpeft.save_adapter(tmp_path / "prompt", soft)
    saved = json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())
    assert saved["task_type"] == "CAUSAL_LM" and saved["num_transformer_submodules"] == 1
    full = np.asarray(llama.forward(config, soft, ids, mask, prompt_logits=True))
    assert np.abs(theirs(tmp_path / "prompt") - full).max() < 1e-4
    np.testing.assert_array_equal(jpeft.load_adapter(tmp_path / "prompt", base)["prompt_embeddings"], soft["prompt_embeddings"])


def test_peft_lora_files_with_saved_base_layers_and_layer_choices(tmp_path):
    """PEFT saves an adapted lm_head's frozen weight beside its LoRA (checked against the base, then skipped), and
    `layers_to_transform` files name only the layers they adapt; options that change inference are refused."""
    from safetensors.numpy import load_file, save_file
    from transformers import LlamaForCausalLM

    from jpeft.models import llama
    from tests.models.test_llama import make_hf_llama

    make_hf_llama(tmp_path / "base", num_hidden_layers=3, tie_word_embeddings=False)
    config, base = llama.load_pretrained(tmp_path / "base")
    ids, mask = np.random.default_rng(3).integers(3, 96, size=(2, 7)), np.ones((2, 7), np.int64)
    cases = {"lm_head": dict(target_modules=["q_proj", "lm_head"]),
             "layers": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2], layers_pattern="layers")}
    for name, kwargs in cases.items():
        ref = _randomize_torch(peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager"),
                                                   peft.LoraConfig(r=2, lora_alpha=4, **kwargs))).eval()
        ref.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        loaded = jpeft.load_adapter(tmp_path / name, base)
        assert np.abs(np.asarray(llama.forward(config, loaded, ids, mask)) - expected).max() < 1e-4
    assert "lora_a" not in loaded["model"]["layers"]["1"]["self_attn"]["q_proj"]

    weights = tmp_path / "lm_head" / "adapter_model.safetensors"
    state = load_file(weights)
    assert "base_model.model.lm_head.base_layer.weight" in state
    state["base_model.model.lm_head.base_layer.weight"][0, 0] += 1.0  # trained on a changed head: not this base
    save_file(state, weights)
    with pytest.raises(CheckpointError, match="its copy of lm_head's frozen weight .* differs from the given base's"):
        jpeft.load_adapter(tmp_path / "lm_head", base)

    cfg_file = tmp_path / "layers" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "alora_invocation_tokens": [5, 6]}))
    with pytest.raises(CheckpointError, match=r"LoRA option alora_invocation_tokens=\[5, 6\] is not supported"):
        jpeft.load_adapter(tmp_path / "layers", base)


def test_ia3_config_rebuilt_with_full_names_loads_in_peft(tmp_path):
    """When one layer's down_proj is feed-forward and another's is not, no short names describe the tree: the rebuilt
    config names every module in full in both lists, which PEFT's subset check accepts."""
    from transformers import LlamaForCausalLM

    from jpeft.models import llama
    from tests.models.test_llama import make_hf_llama

    make_hf_llama(tmp_path / "base")
    config, base = llama.load_pretrained(tmp_path / "base")
    cfg = ia3.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=r".*layers\.0\.mlp\.down_proj")
    params = _randomize(ia3.inject(base, cfg), jax.random.key(0))
    jpeft.save_adapter(tmp_path / "ia3", params)
    saved = json.loads((tmp_path / "ia3" / "adapter_config.json").read_text())
    assert saved["feedforward_modules"] == ["model.layers.0.mlp.down_proj"] and "model.layers.1.mlp.down_proj" in saved["target_modules"]
    ref = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager"),
                                         str(tmp_path / "ia3")).eval()
    ids, mask = np.random.default_rng(3).integers(3, 96, size=(2, 7)), np.ones((2, 7), np.int64)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    assert np.abs(np.asarray(llama.forward(config, params, ids, mask)) - expected).max() < 1e-4


# ----------------------------------------------------------------------------------------------
# Merged export


def test_merged_export_loads_in_transformers(flan, tmp_path):
    from transformers import T5ForConditionalGeneration

    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=TARGETS, rank_pattern=RANK_PATTERN)
    params = _randomize(lora.inject(flan.params, cfg, jax.random.key(0)), jax.random.key(1))
    t5.save_pretrained(tmp_path / "merged", flan.config, lora.merge(params))
    assert not any(p.suffix in (".bin", ".pt") for p in (tmp_path / "merged").iterdir())
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - jpeft_logits(flan, flan.params)).max() > 1e-2
    assert np.abs(torch_logits(model, flan.ids, flan.mask, flan.dec) - ours).max() < 1e-4


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing half-written


@pytest.fixture
def saved(flan, tmp_path):
    params = lora.inject(flan.params, lora.LoraConfig(r=4, target_modules=["q", "v"]), jax.random.key(0))
    jpeft.save_adapter(tmp_path / "a", params, base_model_name_or_path="tiny-flan")
    return tmp_path / "a"


def test_corrupt_and_truncated_files(flan, saved):
    weights = saved / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        jpeft.load_adapter(saved, flan.params)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        jpeft.load_adapter(saved, flan.params)
    (saved / "adapter_config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        jpeft.load_adapter(saved, flan.params)
    with pytest.raises(CheckpointError, match="is missing"):
        jpeft.load_adapter(saved.parent / "nowhere", flan.params)


def test_unknown_peft_type(flan, saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "BOFT"}))
    with pytest.raises(CheckpointError, match="peft_type 'BOFT'"):
        jpeft.load_adapter(saved, flan.params)
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(CheckpointError, match="lora_bias"):
        jpeft.load_adapter(saved, flan.params)


def test_rank_disagreeing_with_config(flan, saved):
    cfg = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(CheckpointError, match=r"rank 8.*need \(8, 32\)"):
        jpeft.load_adapter(saved, flan.params)

    params = lora.inject(flan.params, lora.LoraConfig(r=4, target_modules=["q", "v"]), jax.random.key(0))
    with pytest.raises(ValueError, match="config says rank 2"):
        jpeft.save_adapter(saved.parent / "b", params, lora.LoraConfig(r=2, target_modules=["q", "v"]))
    with pytest.raises(ValueError, match="disagree with the config's target_modules"):
        jpeft.save_adapter(saved.parent / "b", params, lora.LoraConfig(r=4, target_modules=["q"]))
    assert not (saved.parent / "b").exists() and not list(saved.parent.glob(".b*"))


def test_adapter_for_another_base(flan, saved, tmp_path):
    from tests.conftest import T5_CONFIGS, make_hf_t5

    make_hf_t5(tmp_path / "other", **T5_CONFIGS["v1_0"])
    _, other = t5.load_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"trained on base 'tiny-flan' \(fingerprint \w+\), but the given base has fingerprint"):
        jpeft.load_adapter(saved, other)
    # A PEFT-written file carries no fingerprint: the shape checks name the module and both shapes instead.
    ref = peft.get_peft_model(flan.torch(), peft.LoraConfig(r=4, target_modules=["q"]))
    ref.save_pretrained(tmp_path / "peft")
    named = re.escape(f"(adapter for '{flan.path}')")
    with pytest.raises(CheckpointError, match=named + r".*(which the given base does not have|base kernel \(in=32, out=32\))"):
        jpeft.load_adapter(tmp_path / "peft", other)
    with pytest.raises(CheckpointError, match="split its adapter off first"):
        jpeft.load_adapter(saved, jpeft.load_adapter(saved, flan.params))


def test_failed_save_leaves_nothing_and_keeps_the_old_adapter(flan, saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    params = _randomize(lora.inject(flan.params, lora.LoraConfig(r=4, target_modules=["q", "v"]), jax.random.key(5)), jax.random.key(6))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(peft_format.hf_io, "write_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        jpeft.save_adapter(saved, params)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_save_rejects_what_peft_cannot_hold(flan, tmp_path):
    both = ia3.inject(lora.inject(flan.params, lora.LoraConfig(target_modules=["q"]), jax.random.key(0)), ia3.IA3Config())
    with pytest.raises(ValueError, match="exactly one of"):
        jpeft.save_adapter(tmp_path / "x", both)
    _, adapter = split.split_adapter(lora.inject(flan.params, lora.LoraConfig(target_modules=["q"]), jax.random.key(0)))
    with pytest.raises(ValueError, match="needs the full tree"):
        jpeft.save_adapter(tmp_path / "x", adapter)
    with pytest.raises(ValueError, match="no adapter"):
        jpeft.save_adapter(tmp_path / "x", flan.params)
    assert not list(tmp_path.iterdir())


def test_load_adapter_takes_the_path_first_like_save_adapter(flan, saved):
    with pytest.raises(TypeError, match=r"load_adapter\(path, params\): the adapter directory comes first"):
        jpeft.load_adapter(flan.params, saved)


def test_saved_files_get_the_usual_permissions(saved):
    """Written through a private temporary directory, but readable as any file the user writes (umask applies)."""
    umask = os.umask(0)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in saved.iterdir()} == {0o666 & ~umask}
