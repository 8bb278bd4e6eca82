"""The streaming load (`jpeft.formats.loading`, behind every `load_pretrained`): tensor by tensor, bit for bit what reading the
whole file first gives (safetensors shards, GGUF, quantized as read or packed), with a resident peak of the tree plus
about one tensor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from benchmarks.scale import write_checkpoint
from jpeft import quant, tree
from jpeft.formats import gguf, gguf_io
from jpeft.models import causal_lm, llama, t5

ROOT = Path(__file__).resolve().parents[2]
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=2)


def _whole(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a sharded checkpoint read at once by safetensors itself (the reference the stream must equal)."""
    from safetensors.numpy import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    return {k: v for f in sorted(set(index["weight_map"].values())) for k, v in load_file(directory / f).items()}


def _assert_same(got: dict, want: dict) -> None:
    got, want = tree.flatten(got), tree.flatten(want)
    assert sorted(got) == sorted(want)
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama in 6 bf16 safetensors shards (every projection's input dim a multiple of NF4's 64)."""
    path = tmp_path_factory.mktemp("llama")
    write_checkpoint(transformers.LlamaConfig(**LLAMA), path, "bfloat16", shard_bytes=40_000)
    assert len(list(path.glob("*.safetensors"))) == 6
    return path


@pytest.mark.parametrize("dtype, fmt", [(jnp.float32, None), (jnp.bfloat16, None), (jnp.bfloat16, "nf4"), (jnp.float32, "int8")])
def test_sharded_safetensors_stream_equals_the_whole_file(llama_dir, dtype, fmt):
    config, params = llama.load_pretrained(llama_dir, dtype=dtype, quantize=fmt)
    want = llama.params_from_state_dict(config, _whole(llama_dir), dtype=dtype)
    _assert_same(params, want if fmt is None else quant.quantize(want, fmt))
    if fmt:
        assert len(quant.quantized_modules(params)) == 14  # seven projections a layer; the LM head stays float


def test_t5_stream_equals_the_whole_file(tmp_path):
    config = transformers.T5Config(vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=1, num_heads=4,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
    params = t5.init_params(config, jax.random.key(0))
    t5.save_pretrained(tmp_path / "t5", config, params)
    config, streamed = t5.load_pretrained(tmp_path / "t5", quantize="int8")
    _assert_same(streamed, quant.quantize(params, "int8"))


@pytest.fixture(scope="module")
def gguf_file(llama_dir, tmp_path_factory) -> Path:
    config, params = llama.load_pretrained(llama_dir)
    file = tmp_path_factory.mktemp("gguf") / "m.gguf"
    gguf.save(file, config, params, dtype="q8_0")
    return file


@pytest.mark.parametrize("packed, fmt", [(True, None), (False, None), (False, "nf4")])
def test_gguf_stream_equals_the_whole_file(gguf_file, packed, fmt):
    config, params = llama.load_pretrained(gguf_file, quantized=packed, quantize=fmt)
    if packed:
        config, state, rows = gguf_io.read_packed(gguf_file)
        want = causal_lm.params_from_state_dict(llama.FAMILY, config, state, packed=rows)
        assert len(quant.quantized_modules(params)) == 15  # every projection and the untied LM head keep their Q8_0 blocks
    else:
        want = llama.params_from_state_dict(config, gguf_io.read(gguf_file)[1])
        want = want if fmt is None else quant.quantize(want, fmt)
    _assert_same(params, want)


def test_gguf_bytes_are_read_as_mapped(gguf_file):
    """The plain positioned read gives each tensor's bytes exactly as gguf's memory-mapped reader sees them."""
    reader = gguf_io.open_reader(gguf_file)
    for tensor in reader.tensors:
        read = gguf_io._read_bytes(gguf_file, tensor)
        assert read.dtype == tensor.data.dtype and read.shape == tensor.data.shape
        np.testing.assert_array_equal(read, np.asarray(tensor.data))


PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import jax, jax.numpy as jnp
from jpeft.models import llama

def status(key):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))

jnp.zeros(1).block_until_ready()
llama.load_config(sys.argv[1])  # transformers' config classes: a fixed ~0.3 GB of imports, whatever the checkpoint's size
Path("/proc/self/clear_refs").write_text("5")  # restart the peak count (VmHWM) here
before = status("VmRSS")
config, params = llama.load_pretrained(sys.argv[1], dtype=jnp.float32)
jax.block_until_ready(params)
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS"),
                  "tree": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


def test_streaming_load_peak_is_the_tree_plus_about_one_tensor(tmp_path):
    """A 202 MB float32 checkpoint (3 layers of width 1024, vocabulary 8192, untied) loads, in a fresh process, with its
    resident peak above the starting point (imports done) under 1.15x the checkpoint (reading every file first took 2x)."""
    config = transformers.LlamaConfig(**{**LLAMA, "vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 2816,
                                         "num_hidden_layers": 3, "num_attention_heads": 16, "num_key_value_heads": 4})
    weights = write_checkpoint(config, tmp_path / "m", "float32", shard_bytes=64 << 20)
    assert 200e6 < weights < 210e6
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["tree"] == weights
    assert (r["peak"] - r["before"]) / weights < 1.15, r
