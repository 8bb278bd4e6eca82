"""Llama-family parity with transformers: logits under right and left padding, generation, soft prompts,
save/load round trips, bad checkpoints, and the real SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft.formats.hf_io import CheckpointError
from jpeft.models import llama
from tests.conftest import SMOLLM, damage_file, needs_smollm, rewrite_safetensors

# Tiny configurations: grouped-query and multi-head attention, tied and untied heads, several rope_theta
# values, Llama-3 rope scaling whose wavelengths span all three of its regimes, Qwen2's q/k/v bias,
# Llama's attention_bias + mlp_bias, and a Mistral sliding window shorter than the test sequences.
# Head dim 8, theta 100: wavelengths 6.3, 20, 63, 199 against low/high cut-offs 32 and 8.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CONFIGS = {
    "gqa_tied": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "mha_untied_biased": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                        attention_bias=True, mlp_bias=True)),
    "llama3_rope_mqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                                      rope_parameters=LLAMA3_ROPE)),
    "qwen2_qkv_bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mistral_window": ("mistral", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=12, sliding_window=4,
                                       tie_word_embeddings=False)),
}


def make_hf_llama(path, model_type: str = "llama", seed: int = 0, **overrides):
    """Save a random transformers causal LM of the given family to `path`; return it reloaded, in eval mode."""
    import transformers

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}
    config_cls, model_cls = classes[model_type]
    kwargs = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, max_position_embeddings=64,
                  num_attention_heads=4, num_key_value_heads=2,
                  initializer_range=0.15, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls._from_config(config_cls(**kwargs), attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms and biases, so a misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(path)
    return model_cls.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_llama(request, tmp_path_factory):
    """(saved directory, torch model, jpeft config, jpeft params) per tiny configuration, built once per module."""
    model_type, overrides = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    model = make_hf_llama(path, model_type, **overrides)
    if overrides.get("tie_word_embeddings") is False:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    config, params = llama.load_pretrained(path)
    return path, model, config, params


def batch(rng: np.random.Generator, rows: int, length: int, vocab: int = 96, side: str = "right"):
    """Random ids (avoiding pad/eos/bos) of varying length, padded on `side`, and the 0/1 mask."""
    lengths = rng.integers(2, length + 1, size=rows)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    if side == "left":
        mask = mask[:, ::-1].copy()
    return rng.integers(3, vocab, size=(rows, length)) * mask, mask


def torch_logits(model, ids, mask, position_ids=None):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=None if position_ids is None else torch.tensor(np.asarray(position_ids)))
    return out.logits.numpy()


_forward = jax.jit(llama.forward, static_argnums=0, static_argnames=("dtype", "prompt_logits"))


def test_logits_match_transformers_right_and_left_padded(hf_llama):
    _, model, config, params = hf_llama
    a = llama.arch(config)
    rng = np.random.default_rng(0)
    for side in ("right", "left"):
        ids, mask = batch(rng, 4, 11, side=side)
        # transformers' forward numbers slots 0..T-1; its generate (and jpeft) count real tokens only.
        # The two agree under right padding; under left padding pass transformers generate's positions.
        positions = llama.positions_from_mask(mask) if side == "left" else None
        ref = torch_logits(model, ids, mask, positions)
        ours = np.asarray(_forward(a, params, ids, mask))
        diff = np.abs(ours - ref)[mask.astype(bool)].max()
        assert diff < 1e-4, (side, diff)
    # A left-padded row scores exactly like the same tokens unpadded.
    row = ids[1][mask[1].astype(bool)][None]
    alone = np.asarray(_forward(a, params, row, np.ones_like(row)))
    np.testing.assert_allclose(ours[1][mask[1].astype(bool)], alone[0], atol=1e-5)


def test_bf16_compute_stays_close(hf_llama):
    _, model, config, params = hf_llama
    ids, mask = batch(np.random.default_rng(1), 2, 9)
    ref = torch_logits(model, ids, mask)
    ours = np.asarray(llama.forward(config, params, ids, mask, dtype=jnp.bfloat16))
    assert ours.dtype == np.float32 and params["model"]["embed_tokens"]["embedding"].dtype == jnp.float32
    assert np.abs(ours - ref)[mask.astype(bool)].max() < 0.1 * np.abs(ref).max()


def _trim(seq, eos):
    """The sequence up to and including its first EOS (any of `eos` when a list)."""
    seq = list(seq)
    stops = [i for i, t in enumerate(seq) if t in np.atleast_1d(eos)]
    return seq[: stops[0] + 1] if stops else seq


def _compare_generation(model, config, params, ids, mask, max_new, eos, num_beams=1, module=llama):
    """jpeft's `module.generate` against transformers' generate: the same tokens up to each row's first EOS."""
    with torch.no_grad():
        ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new,
                             do_sample=False, num_beams=num_beams, eos_token_id=eos, pad_token_id=0,
                             length_penalty=1.0, early_stopping=False).numpy()[:, ids.shape[1]:]
    ours = np.asarray(module.generate(config, params, ids, mask, max_new_tokens=max_new, num_beams=num_beams, eos_token_id=eos))
    assert ours.shape == (ids.shape[0], max_new)
    for r, o in zip(ref, ours):
        assert _trim(o, eos) == _trim(r, eos)
    return ours


def test_greedy_generation_matches_transformers_left_padded(hf_llama):
    _, model, config, params = hf_llama
    ids, mask = batch(np.random.default_rng(3), 4, 7, side="left")
    out = _compare_generation(model, config, params, ids, mask, 10, eos=1)
    # 8 prompt slots + 8 fed tokens fill the 16-slot cache exactly (the 9th token is never fed back).
    _compare_generation(model, config, params, ids, mask, 9, eos=-1)
    # Early tokens used as EOS exercise stopping and the padding after it.
    stopped = False
    for eos in list(dict.fromkeys(t for t in out[:, :3].ravel().tolist() if t != 0))[:3]:
        again = _compare_generation(model, config, params, ids, mask, 10, eos=eos)
        stopped |= any(eos in row[:-1].tolist() and set(row[row.tolist().index(eos) + 1:].tolist()) == {0} for row in again)
    assert stopped
    # Several EOS ids (Llama 3 Instruct): a row stops at whichever comes first.
    _compare_generation(model, config, params, ids, mask, 10, eos=[1, int(out[0, 2]), int(out[2, 4])])


def test_right_padded_prompts_are_left_aligned_for_generation(hf_llama):
    _, _, config, params = hf_llama
    ids, mask = batch(np.random.default_rng(4), 3, 6, side="right")
    right = np.asarray(llama.generate(config, params, ids, mask, max_new_tokens=5))
    left = np.asarray(llama.generate(config, params, *llama.left_align(ids, mask), max_new_tokens=5))
    np.testing.assert_array_equal(right, left)


@pytest.mark.parametrize("name", ["gqa_tied", "mistral_window"])
def test_beam_search_matches_transformers(name, tmp_path):
    model_type, overrides = CONFIGS[name]
    model = make_hf_llama(tmp_path, model_type, **overrides)
    config, params = llama.load_pretrained(tmp_path)
    ids, mask = batch(np.random.default_rng(5), 3, 6, side="left")
    out = _compare_generation(model, config, params, ids, mask, 8, eos=1, num_beams=3)
    _compare_generation(model, config, params, ids, mask, 8, eos=int(out[0, 1]), num_beams=3)


def test_save_pretrained_round_trip(hf_llama, tmp_path):
    import transformers

    _, model, config, params = hf_llama
    llama.save_pretrained(tmp_path / "out", config, params)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    ids, mask = batch(np.random.default_rng(6), 2, 8)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask), torch_logits(model, ids, mask), atol=1e-5)
    _, again = llama.load_pretrained(tmp_path / "out")
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_init_params_matches_the_checkpoint_layout(hf_llama):
    _, _, config, params = hf_llama
    fresh = llama.init_params(config, jax.random.key(0))
    assert jax.tree_util.tree_map(jnp.shape, fresh) == jax.tree_util.tree_map(jnp.shape, params)


def test_sharded_checkpoint_loads(tmp_path):
    model = make_hf_llama(tmp_path / "one", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    config, params = llama.load_pretrained(tmp_path / "sharded")
    ids, mask = batch(np.random.default_rng(7), 2, 6)
    np.testing.assert_allclose(np.asarray(llama.forward(config, params, ids, mask))[mask.astype(bool)],
                               torch_logits(model, ids, mask)[mask.astype(bool)], atol=1e-4)


# ---- PEFT leaves: soft prompts and LoRA go through the same code as HF PEFT's


def test_soft_prompt_matches_peft_prompt_tuning(tmp_path):
    from peft import PromptTuningConfig, get_peft_model

    model = make_hf_llama(tmp_path)
    config, params = llama.load_pretrained(tmp_path)
    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    prompt = np.random.default_rng(8).normal(size=(3, 32)).astype(np.float32)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.tensor(prompt))
    params = {**params, "prompt_embeddings": jnp.asarray(prompt)}
    ids, mask = batch(np.random.default_rng(9), 3, 8)
    labels = np.where(mask > 0, ids, -100)
    with torch.no_grad():
        out = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ref = out.logits.numpy()
    full = np.asarray(llama.forward(config, params, ids, mask, prompt_logits=True))
    assert full.shape == ref.shape
    real = np.asarray(llama.forward(config, params, ids, mask))
    np.testing.assert_array_equal(real, full[:, 3:])
    assert np.abs(real - ref[:, 3:])[mask.astype(bool)].max() < 1e-4
    # PEFT's loss: N ignored labels prepended to the full logits, i.e. labels[:, 0] is scored too.
    padded = np.concatenate([np.full((3, 3), -100), labels], axis=1)
    logp = jax.nn.log_softmax(full[:, :-1])
    target = padded[:, 1:]
    nll = -np.take_along_axis(np.asarray(logp), np.maximum(target, 0)[..., None], axis=-1)[..., 0]
    assert abs(nll[target != -100].mean() - out.loss.item()) < 1e-5
    # Generation with the prompt, against greedy decoding through PEFT's forward on unpadded rows (where PEFT's
    # positions and jpeft's agree). PEFT 0.21's own `generate` disagrees with its forward under transformers 5.
    cur = torch.tensor(ids[:, :4])
    with torch.no_grad():
        for _ in range(6):
            logits = peft_model(input_ids=cur, attention_mask=torch.ones(cur.shape, dtype=torch.long)).logits
            cur = torch.cat([cur, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    ours = np.asarray(llama.generate(config, params, ids[:, :4], None, max_new_tokens=6, eos_token_id=-1))
    np.testing.assert_array_equal(ours, cur[:, 4:].numpy())


def test_lora_leaves_act_like_merged_weights(hf_llama):
    _, _, config, params = hf_llama
    q = params["model"]["layers"]["1"]["self_attn"]["q_proj"]
    rng = np.random.default_rng(10)
    a_, b_ = rng.normal(size=(q["kernel"].shape[0], 2)) * 0.3, rng.normal(size=(2, q["kernel"].shape[1])) * 0.3
    lora = jax.tree_util.tree_map(lambda x: x, params)
    lora["model"]["layers"]["1"]["self_attn"]["q_proj"] = {**q, "lora_a": jnp.asarray(a_, jnp.float32),
                                                           "lora_b": jnp.asarray(b_, jnp.float32), "lora_scale": jnp.float32(2.0)}
    merged = jax.tree_util.tree_map(lambda x: x, params)
    merged["model"]["layers"]["1"]["self_attn"]["q_proj"] = {**q, "kernel": q["kernel"] + jnp.asarray(a_ @ b_ * 2.0, jnp.float32)}
    ids, mask = batch(rng, 2, 6)
    np.testing.assert_allclose(llama.forward(config, lora, ids, mask), llama.forward(config, merged, ids, mask), atol=1e-4)


def _with_lora(params, a_, b_, scale):
    """A copy of `params` with LoRA leaves on every layer's q_proj and v_proj (stacked when a_ is 3-D)."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    for layer in out["model"]["layers"].values():
        for name in ("q_proj", "v_proj"):
            width = layer["self_attn"][name]["kernel"].shape[1]
            layer["self_attn"][name] = {**layer["self_attn"][name], "lora_a": jnp.asarray(a_, jnp.float32),
                                        "lora_b": jnp.asarray(b_[..., :width], jnp.float32), "lora_scale": jnp.asarray(scale, jnp.float32)}
    return out


def test_stacked_lora_rows_match_each_adapter_alone(tmp_path):
    """A mixed-adapter batch: each row's logits and greedy tokens equal its adapter's alone."""
    model_type, overrides = CONFIGS["gqa_tied"]
    make_hf_llama(tmp_path, model_type, **overrides)
    config, params = llama.load_pretrained(tmp_path)
    rng = np.random.default_rng(11)
    a_, b_ = rng.normal(size=(2, 32, 2)) * 0.5, rng.normal(size=(2, 2, 32)) * 0.5
    scales = np.array([2.0, 0.5])
    stacked = _with_lora(params, a_, b_, scales)
    singles = [_with_lora(params, a_[k], b_[k], scales[k]) for k in range(2)]
    ids, mask = batch(rng, 3, 6, side="left")
    adapter_ids = np.array([1, 0, 1])
    logits = np.asarray(llama.forward(config, stacked, ids, mask, adapter_ids=jnp.asarray(adapter_ids)))
    out = np.asarray(llama.generate(config, stacked, ids, mask, max_new_tokens=5, adapter_ids=adapter_ids))
    for row, k in enumerate(adapter_ids):
        single = np.asarray(llama.forward(config, singles[k], ids[row:row + 1], mask[row:row + 1]))
        np.testing.assert_allclose(logits[row][mask[row] > 0], single[0][mask[row] > 0], atol=1e-5)
        alone = np.asarray(llama.generate(config, singles[k], ids[row:row + 1], mask[row:row + 1], max_new_tokens=5))
        np.testing.assert_array_equal(out[row], alone[0])


# ---- bad input: one clear error naming the file or tensor


@pytest.fixture
def saved(tmp_path):
    make_hf_llama(tmp_path / "m", tie_word_embeddings=False)
    return tmp_path / "m"


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        llama.load_pretrained(saved)


def test_other_model_type_is_refused(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="'gpt2'"):
        llama.load_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(saved, damage):
    damage_file(saved / "model.safetensors", damage)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        llama.load_pretrained(saved)


def test_shape_disagreeing_with_config(saved):
    rewrite_safetensors(saved, lambda s: s.update({"model.layers.1.self_attn.k_proj.weight": np.zeros((24, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(24, 32\)"):
        llama.load_pretrained(saved)


def test_missing_and_unexpected_tensors(saved):
    rewrite_safetensors(saved, lambda s: s.pop("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.0\.mlp\.down_proj\.weight"):
        llama.load_pretrained(saved)
    rewrite_safetensors(saved, lambda s: s.update({"model.layers.0.mlp.down_proj.weight": np.zeros((32, 48), np.float32),
                                        "model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        llama.load_pretrained(saved)


def test_save_refuses_peft_leaves_and_leaves_nothing_behind(saved, tmp_path):
    config, params = llama.load_pretrained(saved)
    params["model"]["layers"]["0"]["self_attn"]["q_proj"]["lora_a"] = jnp.zeros((32, 2))
    with pytest.raises(ValueError, match="lora_a"):
        llama.save_pretrained(tmp_path / "out", config, params)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unsupported_rope_type_is_named(saved):
    config = llama.load_config(saved)
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ValueError, match="'yarn'"):
        llama.arch(config)


# ---- the real SmolLM2-135M-Instruct GGUF (Q4_1), compared with transformers reading the same file


@pytest.fixture(scope="module")
def smollm():
    """(jpeft config, jpeft params, transformers model, tokenizer), each loaded once."""
    from transformers import AutoModelForCausalLM

    from jpeft.formats.tokenizer import load_tokenizer

    config, params = llama.load_pretrained("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name).eval()
    return config, params, model, load_tokenizer("smollm2-135m-instruct")


@needs_smollm
def test_smollm2_weights_match_transformers_gguf_loader(smollm):
    _, params, model, _ = smollm
    ours = llama.state_dict_from_params(smollm[0], params)
    theirs = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


@needs_smollm
def test_smollm2_log_likelihoods_match_transformers(smollm):
    config, params, model, tok = smollm
    ids = tok("Once upon a time, there was a little", return_tensors="np").input_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor(ids)).logits[0, :-1], -1).numpy()
    ours = np.asarray(jax.nn.log_softmax(llama.forward(config, params, ids, np.ones_like(ids))[0, :-1]))
    ref_ll = np.take_along_axis(ref, ids[0, 1:, None], axis=-1)[:, 0]
    our_ll = np.take_along_axis(ours, ids[0, 1:, None], axis=-1)[:, 0]
    assert np.abs(our_ll - ref_ll).max() < 1e-3
    assert abs(np.exp(-our_ll.mean()) - 16.52) < 0.05


@needs_smollm
def test_smollm2_chat_greedy_continuation_matches_transformers(smollm):
    config, params, model, tok = smollm
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="np").input_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                             max_new_tokens=24, do_sample=False).numpy()[0, ids.shape[1]:]
    ours = np.asarray(llama.generate(config, params, ids, max_new_tokens=24))[0]
    eos = tok.eos_token_id
    assert _trim(ours, eos) == _trim(ref, eos)
    assert tok.decode(_trim(ours, eos), skip_special_tokens=True).strip() == "The capital of France is Paris."


@needs_smollm
def test_tokenizer_round_trips_through_a_directory(smollm, tmp_path):
    from jpeft.formats.tokenizer import load_tokenizer

    tok = smollm[3]
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    text = "What is the capital of France?"
    assert again(text).input_ids == tok(text).input_ids
    assert again.chat_template == tok.chat_template and again.eos_token == tok.eos_token == "<|im_end|>"


def test_tokenizer_errors_name_the_path(tmp_path):
    from jpeft.formats.tokenizer import load_tokenizer

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="nothing.gguf"):
        load_tokenizer(tmp_path / "nothing.gguf")
