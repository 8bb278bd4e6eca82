"""`load_tokenizer` on a GGUF file equals transformers' `AutoTokenizer(gguf_file=...)`, and loads, with the model,
in a process where torch cannot be imported (jpeft's own install has none)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest

from jpeft.formats.hf_io import CheckpointError
from jpeft.formats.tokenizer import load_tokenizer
from tests.conftest import SMOLLM, needs_smollm

TEXTS = ["hello world, there!", " hello  world", "<bos>hello<eos>", "<|im_start|>hello<|im_end|>", ""]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def toy_gguf(path: Path, arch: str, model: str) -> Path:
    """A GGUF holding only metadata: a tiny `arch` model's shape and a toy `model` ('gpt2' or 'llama') vocabulary."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(16), w.add_feed_forward_length(32)
    w.add_head_count(2), w.add_head_count_kv(1), w.add_layer_norm_rms_eps(1e-6)
    if arch.startswith("gemma"):
        w.add_key_length(8), w.add_value_length(8), w.add_sliding_window(8)
    words = ["hello", "world", "there", "the", "he", "ll", "lo", "wor", "ld"]
    if model == "llama":  # sentencepiece: merges recovered from the scores
        pieces = sorted(set("".join(words)) | {"▁", ",", "!"}) + ["▁" + x for x in words] + words
        tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + list(dict.fromkeys(pieces))
        w.add_tokenizer_model("llama"), w.add_token_list(tokens)
        w.add_token_scores([0.0] * 4 + [-float(i) for i in range(len(tokens) - 4)])
        w.add_token_types([3, 3, 3, 2] + [1] * (len(tokens) - 4))
        w.add_pad_token_id(0), w.add_eos_token_id(1), w.add_bos_token_id(2), w.add_unk_token_id(3)
    else:  # byte-level BPE with merges and a chat template, as SmolLM2 and Qwen2 files carry
        byte = gguf.vocab.bytes_to_unicode()
        space = byte[ord(" ")]
        merges = ["h e", "l l", "he ll", "hell o", f"{space} w", "o r", f"{space}w or", "l d", f"{space}wor ld"]
        tokens = [byte[b] for b in range(256)] + [m.replace(" ", "") for m in merges] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("smollm" if arch == "llama" else "qwen2"), w.add_token_list(tokens)
        w.add_token_types([1] * (len(tokens) - 3) + [3] * 3), w.add_token_merges(merges)
        w.add_bos_token_id(len(tokens) - 2), w.add_eos_token_id(len(tokens) - 1), w.add_pad_token_id(len(tokens) - 1)
        w.add_chat_template(CHAT)
    w.add_vocab_size(len(tokens))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def assert_same_tokenizer(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    for name in ["bos_token", "eos_token", "pad_token", "unk_token", "chat_template", "add_bos_token", "add_eos_token", "name_or_path"]:
        assert getattr(ours, name) == getattr(theirs, name), name
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == theirs.decode(theirs(text).input_ids)


@pytest.mark.parametrize("arch,model", [("llama", "gpt2"), ("qwen2", "gpt2"), ("llama", "llama"), ("gemma2", "llama"), ("gemma3", "llama")])
def test_gguf_tokenizer_is_transformers_own(tmp_path, arch, model):
    from transformers import AutoTokenizer

    path = toy_gguf(tmp_path / "toy.gguf", arch, model)
    assert_same_tokenizer(load_tokenizer(path), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name))


@needs_smollm
def test_real_smollm2_tokenizer_is_transformers_own():
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(SMOLLM), AutoTokenizer.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name)
    assert_same_tokenizer(ours, theirs)
    dialogue = [{"role": "user", "content": "#Person1#: Hi, Mr. Smith. I'm Doctor Hawkins. Why are you here today?"}]
    assert ours.apply_chat_template(dialogue, add_generation_prompt=True) == theirs.apply_chat_template(dialogue, add_generation_prompt=True)


def test_a_gguf_without_a_vocabulary_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match=r"bare\.gguf.*no tokenizer"):
        load_tokenizer(tmp_path / "bare.gguf")


def test_model_and_tokenizer_load_without_torch(tmp_path):
    """A GGUF model with its tokenizer loads, tokenizes and runs where torch is not importable, and the CLI's modules
    import there (the whole `finetune` of README's example runs so too, by hand: ~1 min); logits equal this process's."""
    import jpeft
    from jpeft.models import llama
    from tests.formats.test_gguf_io import tiny_hf

    config, _ = tiny_hf("llama")
    toy = toy_gguf(tmp_path / "toy.gguf", "llama", "gpt2")
    tokens = len(gguf.GGUFReader(str(toy)).fields["tokenizer.ggml.tokens"].data)
    config = type(config).from_dict({**config.to_dict(), "vocab_size": tokens})  # an embedding row for every token
    jpeft.gguf.save(tmp_path / "m.gguf", config, llama.init_params(config, jax.random.key(0)), dtype="f32", tokenizer_source=toy)
    ids = load_tokenizer(tmp_path / "m.gguf")("hello world, there!", return_tensors="np").input_ids
    want = np.asarray(llama.forward(*llama.load_pretrained(tmp_path / "m.gguf"), ids, np.ones_like(ids)))
    script = textwrap.dedent(f"""
        import sys
        from benchmarks import torchless
        torchless.hide()
        import numpy as np
        from jpeft.models import llama
        from jpeft.formats.tokenizer import load_tokenizer
        ids = load_tokenizer({str(tmp_path / "m.gguf")!r})("hello world, there!", return_tensors="np").input_ids
        logits = llama.forward(*llama.load_pretrained({str(tmp_path / "m.gguf")!r}), ids, np.ones_like(ids))
        import jpeft, train.summarize  # the training, evaluation (rouge-score, scipy) and adapter-file code
        assert "torch" not in sys.modules, "torch was imported"
        np.save({str(tmp_path / "got.npy")!r}, np.asarray(logits))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "got.npy"), want, atol=1e-5)
    assert want.shape == (1, ids.shape[1], config.vocab_size)
