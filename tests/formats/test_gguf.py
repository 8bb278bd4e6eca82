"""GGUF export (`jpeft.gguf`): llama.cpp LoRA adapters and merged models, read back through the `gguf` package, jpeft's
own loaders and transformers' GGUF loader (which undoes llama.cpp's q/k permutation independently of jpeft)."""

from __future__ import annotations

import importlib.util
import re

import jax
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

import jpeft
from jpeft import gguf_io, tree
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import llama
from tests.formats.test_gguf_io import permute, tiny_hf

TOLERANCE = {"f32": 0.0, "f16": 2e-3, "bf16": 1.6e-2, "q8_0": 1.6e-2}  # relative to the largest |value|


def _lora(params, seed=0, **cfg):
    """LoRA on every projection, with randomized (trained-size) B."""
    cfg = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], **cfg}
    params = jpeft.lora.inject(params, jpeft.LoraConfig(**cfg), jax.random.key(seed))
    flat = tree.flatten(params)
    for i, path in enumerate(p for p in sorted(flat) if p.endswith("/lora_b")):
        flat[path] = jax.random.normal(jax.random.key(100 + i), flat[path].shape) * 0.2
    return tree.unflatten(flat)


@pytest.fixture(scope="module")
def tiny():
    """(config, base params, LoRA params, HF state dict) of a tiny random Llama with an untied head."""
    config, state = tiny_hf("llama")
    base = llama.params_from_state_dict(config, state)
    return config, base, _lora(base), state


def _fields(path) -> dict:
    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}, {t.name: t for t in reader.tensors}


def _ids():
    ids = np.random.default_rng(1).integers(3, 96, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_adapter_file_is_llama_cpps_format(tiny, tmp_path):
    """Metadata, names and shapes as convert_lora_to_gguf.py writes them; lora_b of q/k are PEFT's lora_B with the rows
    permuted as llama.cpp permutes the base (checked against PEFT's own adapter file and an independent permute)."""
    from safetensors.numpy import load_file

    config, _, params, _ = tiny
    jpeft.gguf.save_lora(tmp_path / "a.gguf", params, config)
    fields, tensors = _fields(tmp_path / "a.gguf")
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert GGUFReader(str(tmp_path / "a.gguf")).fields["adapter.lora.alpha"].types[0].name == "FLOAT32"
    assert fields["adapter.lora.alpha"] == 8.0
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
             "up_proj": "ffn_up", "down_proj": "ffn_down"}
    assert set(tensors) == {f"blk.{i}.{s}.weight.lora_{ab}" for i in range(2) for s in short.values() for ab in "ab"}

    jpeft.save_adapter(tmp_path / "peft", params, config=jpeft.LoraConfig(r=4, alpha=8.0, target_modules=list(short)))
    peft = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for i in range(2):
        for hf, g in short.items():
            module = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            A = peft[f"base_model.model.model.layers.{i}.{module}.{hf}.lora_A.weight"]
            B = peft[f"base_model.model.model.layers.{i}.{module}.{hf}.lora_B.weight"]
            a, b = (tensors[f"blk.{i}.{g}.weight.lora_{x}"] for x in "ab")
            assert a.data.shape == A.shape and b.data.shape == B.shape  # numpy (r, in) and (out, r)
            np.testing.assert_array_equal(a.data, A)
            np.testing.assert_array_equal(b.data, permute(B, heads[hf]) if hf in heads else B)
    assert not np.array_equal(tensors["blk.0.attn_q.weight.lora_b"].data, peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_adapter_round_trips(tiny, tmp_path, dtype):
    """`load_adapter` puts the file back onto the base: f32 exactly, the others within their rounding."""
    config, base, params, _ = tiny
    file = tmp_path / f"a-{dtype}.gguf"
    jpeft.gguf.save_lora(file, params, config, dtype=dtype)
    types = {t.tensor_type for t in GGUFReader(str(file)).tensors}
    assert types == {"f32": {Q.F32}, "f16": {Q.F16}, "bf16": {Q.BF16}, "q8_0": {Q.Q8_0, Q.F16}}[dtype]  # r=4 rows: F16
    loaded = tree.flatten(jpeft.gguf.load_adapter(file, base))
    want = tree.flatten(params)
    assert sorted(loaded) == sorted(want)
    for path, value in want.items():
        got = np.asarray(loaded[path])
        assert np.abs(got - np.asarray(value)).max() <= TOLERANCE[dtype] * np.abs(np.asarray(value)).max(), path
    ids, mask = _ids()
    np.testing.assert_allclose(llama.forward(config, tree.unflatten(loaded), ids, mask), llama.forward(config, params, ids, mask),
                               atol={"f32": 1e-5, "f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2}[dtype])


def test_adapter_without_head_counts_needs_the_config(tiny, tmp_path):
    """llama.cpp's converter records no head counts: `load_adapter` then needs the base's config to undo q/k's permutation."""
    import gguf

    config, base, params, _ = tiny
    jpeft.gguf.save_lora(tmp_path / "a.gguf", params, config)
    reader = GGUFReader(str(tmp_path / "a.gguf"))
    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    for key, field in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture", "llama.attention.")):
            writer.add_key_value(key, field.contents(), field.types[0])
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match="records no llama.attention.head_count"):
        jpeft.gguf.load_adapter(tmp_path / "bare.gguf", base)
    for path, value in tree.flatten(jpeft.gguf.load_adapter(tmp_path / "bare.gguf", base, config)).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(tree.flatten(params)[path]), err_msg=path)


@pytest.mark.parametrize("cfg", [dict(use_rslora=True), dict(rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3.0}),
                                 dict(use_rslora=True, rank_pattern={"down_proj": 8})], ids=["rslora", "patterns", "rslora-ranks"])
def test_scales_llama_cpp_cannot_name_are_folded(tiny, tmp_path, cfg):
    """llama.cpp scales a pair by alpha / r (one alpha per file): rsLoRA and rank / alpha patterns are written so that
    alpha / r times the stored B A is each module's PEFT update, and read back to the same update."""
    config, base, _, _ = tiny
    params = _lora(base, **cfg)
    jpeft.gguf.save_lora(tmp_path / "a.gguf", params, config)
    fields, tensors = _fields(tmp_path / "a.gguf")
    flat = tree.flatten(params)
    for path in (p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a")):
        name = gguf_io.gguf_name(path.replace("/", ".") + ".weight")
        a, b = tensors[f"{name}.lora_a"].data, tensors[f"{name}.lora_b"].data
        heads = gguf_io.rotary_heads(path.replace("/", ".") + ".weight", "llama", 4, 2)
        b = gguf_io.unpermute_rotary(b, heads) if heads else b
        want = np.asarray(flat[f"{path}/lora_scale"] * flat[f"{path}/lora_a"] @ flat[f"{path}/lora_b"])
        np.testing.assert_allclose(np.float32(fields["adapter.lora.alpha"]) / a.shape[0] * (b @ a).T, want, rtol=1e-5, atol=1e-7, err_msg=name)
    merged_back = jpeft.lora.merge(jpeft.gguf.load_adapter(tmp_path / "a.gguf", base))
    for path, value in tree.flatten(jpeft.lora.merge(params)).items():
        np.testing.assert_allclose(np.asarray(tree.flatten(merged_back)[path]), np.asarray(value), atol=1e-6, err_msg=path)


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("llama", True), ("qwen2", True)])
def test_merged_f32_runs_in_transformers_as_in_jpeft(tmp_path, model_type, tie):
    """The merged f32 GGUF read by transformers' GGUF loader (its own un-permutation) gives jpeft's merged logits, and
    jpeft's loader gives back exactly the merged weights; a tied model has no output.weight."""
    from transformers import AutoModelForCausalLM

    config, state = tiny_hf(model_type, tie)
    params = _lora(llama.params_from_state_dict(config, state))
    merged = jpeft.lora.merge(params)
    jpeft.gguf.save(tmp_path / "m.gguf", config, params, dtype="f32")
    fields, tensors = _fields(tmp_path / "m.gguf")
    assert ("output.weight" in tensors) == (not tie) and fields["general.architecture"] == model_type
    assert fields[f"{model_type}.block_count"] == 2 and fields["tokenizer.ggml.eos_token_id"] == 1

    cfg, back = llama.load_pretrained(tmp_path / "m.gguf")
    assert cfg.tie_word_embeddings == tie
    want = tree.flatten(merged)
    assert sorted(tree.flatten(back)) == sorted(want)
    for path, value in tree.flatten(back).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]), err_msg=path)

    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", attn_implementation="eager").eval()
    ids, mask = _ids()
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(llama.forward(config, merged, ids, mask))
    assert np.abs(theirs - ours)[mask.astype(bool)].max() < 1e-4


@pytest.mark.parametrize("dtype", ["f16", "bf16", "q8_0"])
def test_merged_stored_types_round_trip(tiny, tmp_path, dtype):
    config, _, params, _ = tiny
    jpeft.gguf.save(tmp_path / "m.gguf", config, params, dtype=dtype)
    _, tensors = _fields(tmp_path / "m.gguf")
    want_type = {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    assert tensors["blk.0.attn_q.weight"].tensor_type == want_type and tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    _, back = llama.load_pretrained(tmp_path / "m.gguf")
    for path, value in tree.flatten(jpeft.lora.merge(params)).items():
        value = np.asarray(value)
        assert np.abs(np.asarray(tree.flatten(back)[path]) - value).max() <= TOLERANCE[dtype] * np.abs(value).max(), path


GEMMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, query_pre_attn_scalar=16, sliding_window=4, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _gemma_params(config, dtype=np.float32):
    """Gemma params with random norms and weights large enough that attention scores (scale, window) matter."""
    from jpeft.models import gemma

    flat = tree.flatten(gemma.init_params(config, jax.random.key(0), dtype=dtype))
    return tree.unflatten({p: (v + 0.1 * jax.random.normal(jax.random.key(i), v.shape) if p.endswith("norm/weight") else v * 20 if v.ndim == 2 else v).astype(v.dtype)
                           for i, (p, v) in enumerate(flat.items())})


def _read_back_logits(path, config, params):
    """(logits of the saved model, logits of the model jpeft reads back from `path`) on ids longer than the window."""
    from jpeft.models import family

    model = family.of(config).module
    config_back, back = model.load_pretrained(path)
    ids = np.random.default_rng(1).integers(3, 96, size=(1, 12))
    mask = np.ones_like(ids)
    return np.asarray(model.forward(config, params, ids, mask)), np.asarray(model.forward(config_back, back, ids, mask))


def test_gemma3_merged_and_adapter_round_trip(tmp_path):
    """Gemma 3: no q/k permutation, norms stored as 1 + w (the reader subtracts it); the file runs as the saved model."""
    import transformers

    from jpeft.models import gemma

    config = transformers.Gemma3TextConfig(**GEMMA)
    base = _gemma_params(config)
    flat = tree.flatten(base)
    params = _lora(base)
    jpeft.gguf.save(tmp_path / "g.gguf", config, params, dtype="f32")
    jpeft.gguf.save_lora(tmp_path / "a.gguf", params, config)
    fields, tensors = _fields(tmp_path / "g.gguf")
    assert fields["general.architecture"] == "gemma3"
    np.testing.assert_array_equal(tensors["blk.0.attn_norm.weight"].data, np.asarray(flat["model/layers/0/input_layernorm/weight"]) + 1)
    _, adapter = _fields(tmp_path / "a.gguf")
    np.testing.assert_array_equal(adapter["blk.0.attn_q.weight.lora_b"].data, np.asarray(tree.flatten(params)["model/layers/0/self_attn/q_proj/lora_b"]).T)
    _, back = gemma.load_pretrained(tmp_path / "g.gguf")
    for path, value in tree.flatten(jpeft.lora.merge(params)).items():
        np.testing.assert_allclose(np.asarray(tree.flatten(back)[path]), np.asarray(value), atol=1e-6, err_msg=path)
    for path, value in tree.flatten(jpeft.gguf.load_adapter(tmp_path / "a.gguf", base)).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(tree.flatten(params)[path]), err_msg=path)
    saved, read = _read_back_logits(tmp_path / "g.gguf", config, jpeft.lora.merge(params))
    np.testing.assert_allclose(read, saved, atol=1e-4)


@pytest.mark.parametrize("cls,change,setting", [
    ("Gemma3TextConfig", dict(query_pre_attn_scalar=256), "query_pre_attn_scalar=16"),
    ("Gemma2Config", dict(query_pre_attn_scalar=256), "query_pre_attn_scalar=16"),
    ("Gemma2Config", dict(layer_types=["full_attention"] * 2), "layer_types"),
    ("Gemma3TextConfig", dict(final_logit_softcapping=5.0), "final_logit_softcapping=None"),
    ("Gemma3TextConfig", dict(layer_types=["full_attention"] * 2), "layer_types"),
    ("Gemma3TextConfig", dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500.0},
                                               "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}), "local_rope"),
], ids=["gemma3-query-scale", "gemma2-query-scale", "gemma2-layer-types", "gemma3-final-softcap", "gemma3-layer-types", "gemma3-local-rope"])
def test_gemma_settings_llama_cpp_derives_must_match(tmp_path, cls, change, setting):
    """llama.cpp derives these from the shape: another value would make the file (and jpeft's reading of it) another
    model, so `save` and `save_lora` refuse it; with the derived value the file runs as the saved model."""
    import transformers

    config = getattr(transformers, cls)(**{**GEMMA, **change})
    params = _gemma_params(config)
    with pytest.raises(ValueError, match=f"llama.cpp derives {re.escape(setting)}"):
        jpeft.gguf.save(tmp_path / "g.gguf", config, params, dtype="f32")
    with pytest.raises(ValueError, match=f"llama.cpp derives {re.escape(setting)}"):
        jpeft.gguf.save_lora(tmp_path / "a.gguf", _lora(params), config)
    assert list(tmp_path.iterdir()) == []
    derived = getattr(transformers, cls)(**GEMMA)
    jpeft.gguf.save(tmp_path / "g.gguf", derived, params, dtype="f32")
    saved, read = _read_back_logits(tmp_path / "g.gguf", derived, params)
    np.testing.assert_allclose(read, saved, atol=1e-4)


def test_gemma_bf16_norms_gain_the_one_in_float32(tmp_path):
    """1 + w is added in float32: bf16 norm weights come back from an f32 file within float32's rounding of 1 + w
    (in bf16 the sum loses w's low bits: errors up to 4e-3)."""
    import transformers

    config = transformers.Gemma3TextConfig(**GEMMA)
    params = tree.unflatten({p: (0.01 * jax.random.normal(jax.random.key(i), v.shape)).astype(v.dtype) if p.endswith("norm/weight") else v
                             for i, (p, v) in enumerate(tree.flatten(_gemma_params(config, jax.numpy.bfloat16)).items())})
    jpeft.gguf.save(tmp_path / "g.gguf", config, params, dtype="f32")
    _, back = jpeft.models.gemma.load_pretrained(tmp_path / "g.gguf")
    for path, value in tree.flatten(params).items():
        np.testing.assert_allclose(np.asarray(tree.flatten(back)[path]), np.asarray(value, np.float32), rtol=0, atol=1e-7, err_msg=path)


LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, pad_token_id=0, eos_token_id=1, bos_token_id=2)


@pytest.mark.parametrize("cls,change,message", [
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=0), "sliding window of 4 positions"),
    ("LlamaConfig", dict(hidden_act="gelu"), "activation is 'gelu'"),
    ("Qwen2Config", dict(head_dim=32), "head_dim=32"),
], ids=["qwen2-window", "llama-gelu", "qwen2-head-dim"])
def test_settings_llama_cpp_ignores_are_refused(tmp_path, cls, change, message):
    """A window, activation or Qwen2 head dim llama.cpp's graph does not have is refused, by `save` and `save_lora`."""
    import transformers

    config = getattr(transformers, cls)(**LLAMA, **change)
    params = llama.init_params(config, jax.random.key(0))
    with pytest.raises(ValueError, match=message):
        jpeft.gguf.save(tmp_path / "m.gguf", config, params)
    with pytest.raises(ValueError, match=message):
        jpeft.gguf.save_lora(tmp_path / "a.gguf", _lora(params), config)


def test_mistral_window_warns_and_holds_within_it(tmp_path):
    """Mistral's window is dropped, as llama.cpp's converter drops it, with a warning; the file is the saved model for
    the first `window` positions only. Without a window (or one as long as the context) nothing is said."""
    import warnings

    import transformers

    config = transformers.MistralConfig(**LLAMA, sliding_window=4)
    params = jax.tree.map(lambda x: x * 10 if x.ndim == 2 else x, llama.init_params(config, jax.random.key(0)))
    with pytest.warns(UserWarning, match="same outputs only for the first 4 tokens"):
        jpeft.gguf.save(tmp_path / "m.gguf", config, params, dtype="f32")
    saved, read = _read_back_logits(tmp_path / "m.gguf", config, params)
    np.testing.assert_allclose(read[:, :4], saved[:, :4], atol=1e-4)
    assert np.abs(read - saved).max() > 0.1  # why the warning is needed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jpeft.gguf.save(tmp_path / "m.gguf", transformers.MistralConfig(**LLAMA, sliding_window=128), params, dtype="f32")
        jpeft.gguf.save(tmp_path / "m.gguf", transformers.MistralConfig(**LLAMA, sliding_window=None), params, dtype="f32")


def test_tokenizer_keys_are_copied_from_the_source_gguf(tiny, tmp_path):
    import gguf

    config, _, params, _ = tiny
    tokens = [f"t{i}" for i in range(config.vocab_size)]
    src = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "llama")
    src.add_tokenizer_model("gpt2")
    src.add_token_list(tokens)
    src.add_token_types([1] * len(tokens))
    src.add_token_merges(["t 1", "t 2"])
    src.add_eos_token_id(1)
    src.add_chat_template("{{ x }}")
    src.write_header_to_file(), src.write_kv_data_to_file(), src.write_tensors_to_file(), src.close()
    jpeft.gguf.save(tmp_path / "m.gguf", config, params, dtype="f16", tokenizer_source=tmp_path / "tok.gguf")
    fields, _ = _fields(tmp_path / "m.gguf")
    want, _ = _fields(tmp_path / "tok.gguf")
    assert {k: v for k, v in fields.items() if k.startswith("tokenizer.")} == {k: v for k, v in want.items() if k.startswith("tokenizer.")}
    assert fields["tokenizer.ggml.tokens"] == tokens


def test_tokenizer_from_an_hf_directory(tiny, tmp_path):
    """A byte-level BPE tokenizer.json becomes llama.cpp's gpt2 vocabulary, merges and special ids via the gguf package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    config = tiny[0]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["hello world, hello there"] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"],
                                                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<eos>", "pad_token": "<pad>"}')
    wide = type(config).from_dict({**config.to_dict(), "vocab_size": tok.get_vocab_size() + 4})
    jpeft.gguf.save(tmp_path / "m.gguf", wide, llama.init_params(wide, jax.random.key(3)), dtype="f32", tokenizer_source=tmp_path / "tok")
    fields, _ = _fields(tmp_path / "m.gguf")
    vocab = tok.get_vocab()
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == wide.vocab_size
    assert all(fields["tokenizer.ggml.tokens"][i] == t for t, i in vocab.items())
    assert fields["tokenizer.ggml.eos_token_id"] == vocab["<eos>"] and len(fields["tokenizer.ggml.merges"]) > 0


@pytest.mark.parametrize("name,pre,space_prefix,chat", [
    ("smollm2-135m-instruct", "gpt-2", None, "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"),
    ("gemma3-270m", "default", False, "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"),
])
def test_hf_directory_tokenizer_tokenizes_as_the_directory(tmp_path, name, pre, space_prefix, chat):
    """A packaged model's tokenizer saved as an HF directory and exported: its special tokens are CONTROL, the
    pre-tokenizer / space prefix are llama.cpp's names for the directory's, and jpeft's tokenizer of the GGUF
    tokenizes chat text as transformers' tokenizer of the directory does."""
    import gguf
    import transformers

    from jpeft.models import registry
    from jpeft.formats.tokenizer import load_tokenizer

    if importlib.util.find_spec(registry.PACKAGED[name].package) is None:
        pytest.skip(f"pip package {registry.PACKAGED[name].requirement} is not installed")
    load_tokenizer(name).save_pretrained(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    shape = dict(vocab_size=len(hf) + 3, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    # the model's family picks transformers' tokenizer converter for the GGUF, as it does for llama.cpp's files
    config = transformers.Gemma3TextConfig(**shape, query_pre_attn_scalar=8) if "gemma" in name else transformers.LlamaConfig(**shape)
    params = jpeft.models.family.of(config).module.init_params(config, jax.random.key(0))
    jpeft.gguf.save(tmp_path / "m.gguf", config, params, dtype="f16", tokenizer_source=tmp_path / "tok")
    reader = jpeft.gguf_io.open_reader(tmp_path / "m.gguf")  # cached: load_tokenizer below reuses it (262k tokens parse slowly)
    fields = {key: reader.fields[key].contents() for key in ("tokenizer.ggml.pre", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens")}
    assert fields["tokenizer.ggml.pre"] == pre
    assert reader.fields.get("tokenizer.ggml.add_space_prefix") is None if space_prefix is None else \
        reader.fields["tokenizer.ggml.add_space_prefix"].contents() == space_prefix
    specials = {t.content for t in hf.added_tokens_decoder.values() if t.special}
    types = dict(zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]))
    assert specials and {types[t] for t in specials} == {gguf.TokenType.CONTROL}
    assert fields["tokenizer.ggml.tokens"][-1] == f"[PAD{config.vocab_size - 1}]"
    ours = load_tokenizer(tmp_path / "m.gguf")
    for text in (chat, "Hello world, don't", "naïve café 1234567 + 89"):
        assert ours(text)["input_ids"] == hf(text)["input_ids"], text


def test_unknown_bpe_pre_tokenizer_warns(tiny, tmp_path):
    """A BPE pre-tokenizer llama.cpp has no name jpeft knows for is written as "default", with a warning."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world"], trainers.BpeTrainer(vocab_size=280, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    config = type(tiny[0]).from_dict({**tiny[0].to_dict(), "vocab_size": tok.get_vocab_size()})
    with pytest.warns(UserWarning, match="cannot tell llama.cpp which pre-tokenizer"):
        jpeft.gguf.save(tmp_path / "m.gguf", config, llama.init_params(config, jax.random.key(3)), tokenizer_source=tmp_path / "tok")
    assert _fields(tmp_path / "m.gguf")[0]["tokenizer.ggml.pre"] == "default"


def test_a_gguf_tokenizer_must_fit_the_vocabulary(tiny, tmp_path):
    """A GGUF tokenizer with more tokens than the model's embedding rows is refused; one with fewer is padded."""
    config, _, params, _ = tiny
    small = _toy_tokenizer(tmp_path, config.vocab_size - 2)
    jpeft.gguf.save(tmp_path / "m.gguf", config, params, tokenizer_source=small)
    fields, _ = _fields(tmp_path / "m.gguf")
    assert len(fields["tokenizer.ggml.tokens"]) == len(fields["tokenizer.ggml.token_type"]) == config.vocab_size
    assert fields["tokenizer.ggml.tokens"][-2:] == [f"[PAD{config.vocab_size - 2}]", f"[PAD{config.vocab_size - 1}]"]
    wide = type(config).from_dict({**config.to_dict(), "vocab_size": config.vocab_size - 4})
    with pytest.raises(CheckpointError, match=f"the tokenizer has {config.vocab_size - 2} tokens but the model's vocabulary only {config.vocab_size - 4}"):
        jpeft.gguf.save(tmp_path / "w.gguf", wide, llama.init_params(wide, jax.random.key(0)), tokenizer_source=small)


def test_bad_inputs_are_named(tiny, tmp_path):
    import transformers

    config, base, params, _ = tiny
    ia3 = jpeft.ia3.inject(base, jpeft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match=r"ia3_in.*IA3"):
        jpeft.gguf.save_lora(tmp_path / "x.gguf", ia3, config)
    with pytest.raises(ValueError, match="base-model weight"):
        jpeft.gguf.save(tmp_path / "x.gguf", config, ia3)
    with pytest.raises(ValueError, match="unknown GGUF dtype 'q4_0'"):
        jpeft.gguf.save_lora(tmp_path / "x.gguf", params, config, dtype="q4_0")
    with pytest.raises(ValueError, match="'t5'.*T5 is not a llama.cpp target"):
        jpeft.gguf.save_lora(tmp_path / "x.gguf", params, transformers.T5Config())
    with pytest.raises(ValueError, match="'t5'.*T5 is not a llama.cpp target"):
        jpeft.gguf.save(tmp_path / "x.gguf", transformers.T5Config(), params)
    tied_config, tied_state = tiny_hf("llama", tie=True)
    tied = _lora(llama.params_from_state_dict(tied_config, tied_state))
    tied["lm_head"] = {"lora_a": np.ones((64, 4), np.float32), "lora_b": np.ones((4, 96), np.float32), "lora_scale": np.float32(2.0)}
    with pytest.raises(ValueError, match="tied lm_head"):
        jpeft.gguf.save_lora(tmp_path / "x.gguf", tied, tied_config)
    embedding = dict(params, model={**params["model"], "embed_tokens": {**params["model"]["embed_tokens"], **tied["lm_head"]}})
    with pytest.raises(ValueError, match="model.embed_tokens has no llama.cpp adapter tensor"):
        jpeft.gguf.save_lora(tmp_path / "x.gguf", embedding, config)  # fails while writing: nothing may be left
    assert list(tmp_path.iterdir()) == []
    jpeft.gguf.save(tmp_path / "m.gguf", config, params, dtype="f32")
    with pytest.raises(CheckpointError, match="not a llama.cpp LoRA adapter"):
        jpeft.gguf.load_adapter(tmp_path / "m.gguf", base)


@pytest.mark.parametrize("change,mismatch", [(dict(hidden_size=128, num_hidden_layers=1), "model.layers.0.mlp.down_proj is (in, out) (256, 64), but in the base model that weight is (256, 128)"),
                                             (dict(num_attention_heads=2, num_key_value_heads=1, head_dim=48), "self_attn.k_proj is (in, out) (64, 32), but in the base model that weight is (64, 48)")],
                         ids=["wider", "other-heads"])
def test_save_lora_checks_the_base(tiny, tmp_path, change, mismatch):
    """An adapter whose pairs do not fit `base` is refused, naming the first mismatch in name order, and no directory is left behind."""
    config, _, params, _ = tiny
    wrong = type(config).from_dict({**config.to_dict(), **change})
    with pytest.raises(ValueError, match=re.escape(mismatch)):
        jpeft.gguf.save_lora(tmp_path / "new" / "dir" / "a.gguf", params, wrong)
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_directories(tiny, tmp_path):
    config, _, params, _ = tiny
    llama3 = type(config).from_dict({**config.to_dict(), "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    with pytest.raises(ValueError, match="rope_type 'llama3'"):
        jpeft.gguf.save(tmp_path / "new" / "dir" / "m.gguf", llama3, params)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bias", ["attention_bias", "mlp_bias"])
def test_llama_biases_read_back(tmp_path, bias):
    """jpeft's reader reads the bias tensors its writer (and llama.cpp's llama graph) has: the file runs as the saved model."""
    import transformers

    config = transformers.LlamaConfig(**LLAMA, **{bias: True})
    params = tree.unflatten({p: v + 0.3 * jax.random.normal(jax.random.key(i), v.shape) if p.endswith("/bias") else v
                             for i, (p, v) in enumerate(tree.flatten(llama.init_params(config, jax.random.key(0))).items())})
    jpeft.gguf.save(tmp_path / "m.gguf", config, params, dtype="f32")
    saved, read = _read_back_logits(tmp_path / "m.gguf", config, params)
    np.testing.assert_allclose(read, saved, atol=1e-5)


def test_an_adapter_loaded_as_a_model_is_named(tiny, tmp_path):
    config, _, params, _ = tiny
    jpeft.gguf.save_lora(tmp_path / "a.gguf", params, config)
    with pytest.raises(CheckpointError, match=r"is a LoRA adapter, not a model.*jpeft\.gguf\.load_adapter"):
        llama.load_pretrained(tmp_path / "a.gguf")


def test_an_embedding_lora_pair_is_named(tiny, tmp_path):
    """llama.cpp's converter writes token_embd LoRA pairs; jpeft's models have no LoRA on the embedding: a clear error."""
    import gguf

    config, base, _, _ = tiny
    writer = gguf.GGUFWriter(str(tmp_path / "e.gguf"), "llama")
    writer.add_type("adapter"), writer.add_string("adapter.type", "lora"), writer.add_float32("adapter.lora.alpha", 8.0)
    writer.add_tensor("token_embd.weight.lora_a", np.ones((4, config.vocab_size), np.float32))
    writer.add_tensor("token_embd.weight.lora_b", np.ones((config.hidden_size, 4), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(CheckpointError, match="LoRA pair for model.embed_tokens, which has no dense weight"):
        jpeft.gguf.load_adapter(tmp_path / "e.gguf", base)


@pytest.mark.llama_cpp
def test_llama_cpp_runs_the_files_as_jpeft(tiny, tmp_path):
    """llama.cpp itself (llama-cpp-python): the merged f32 GGUF and base + adapter give jpeft's logits."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp (llama-cpp-python) is not installed")
    from llama_cpp import Llama

    config, base, params, _ = tiny
    jpeft.gguf.save(tmp_path / "base.gguf", config, base, dtype="f32", tokenizer_source=_toy_tokenizer(tmp_path, config.vocab_size))
    jpeft.gguf.save(tmp_path / "merged.gguf", config, params, dtype="f32", tokenizer_source=tmp_path / "base.gguf")
    jpeft.gguf.save_lora(tmp_path / "adapter.gguf", params, config)
    ids = [int(i) for i in np.random.default_rng(2).integers(3, 96, size=12)]
    want = np.asarray(llama.forward(config, jpeft.lora.merge(params), np.array([ids]), np.ones((1, 12), int)))[0]
    for kwargs in (dict(model_path=str(tmp_path / "merged.gguf")), dict(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "adapter.gguf"))):
        model = Llama(**kwargs, n_ctx=32, logits_all=True, verbose=False, n_threads=2, type_k=0, type_v=0)  # f32 KV cache (default f16)
        model.eval(ids)
        got = np.asarray(model.scores[: len(ids)])
        assert np.abs(got - want).max() < 1e-4, (kwargs, np.abs(got - want).max())


def _toy_tokenizer(tmp_path, vocab_size):
    """A GGUF carrying only a toy byte-level vocabulary (one token per byte), for llama.cpp to load the model with."""
    import gguf

    path = tmp_path / "toy_tokenizer.gguf"
    tokens = [gguf.vocab.bytes_to_unicode()[b] for b in range(vocab_size)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab_size)
    w.add_token_merges([f"{tokens[40]} {tokens[41]}"])  # llama.cpp requires the key
    w.add_bos_token_id(2), w.add_eos_token_id(1), w.add_pad_token_id(0)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path
