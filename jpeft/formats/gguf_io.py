"""GGUF files (llama.cpp's format) as a transformers config plus a dequantised float32 state dict, in numpy, and the
format's names and rotary permutation both ways (`jpeft.gguf` writes with the same tables).

Mirrors transformers' own GGUF loader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`): the same config
keys, the same tensor renaming, and the same undoing of llama.cpp's q/k row permutation for the `llama`
architecture (llama.cpp interleaves the two rotary halves of each head; transformers keeps them split).
Gemma 2 / 3 files store every norm weight as 1 + w (llama.cpp's converter adds the one), so it is subtracted,
and their q/k rows are not permuted.
Whatever jpeft cannot represent exactly (other architectures, quantisation types without a dequantiser,
rope-frequency tensors) is refused with an error naming it, never approximated.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.formats.hf_io import CheckpointError, Tensor
from jpeft.quant.layout import GGUF_TYPES

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma2", "gemma3")
GEMMA = ("gemma2", "gemma3")
# transformers model_type -> GGUF architecture, as llama.cpp's convert_hf_to_gguf.py maps them (Mistral is `llama`)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
# The MLP activation llama.cpp's graph uses per architecture (not read from the file; jpeft's names for it)
ACTIVATIONS = {"llama": ("silu", "swish"), "qwen2": ("silu", "swish"), "gemma2": ("gelu_pytorch_tanh", "gelu_new"),
               "gemma3": ("gelu_pytorch_tanh", "gelu_new")}
GEMMA3_LOCAL_ROPE = {"rope_type": "default", "rope_theta": 10000.0}  # Gemma 3's sliding layers in llama.cpp

GLOBAL_TENSORS = {  # GGUF name -> transformers name
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GEMMA_LAYER_TENSORS = {  # Gemma norms its sub-layers' inputs and outputs; ffn_norm is the pre-MLP one
    **LAYER_TENSORS,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_MISSING = object()


def open_reader(path: str | os.PathLike):
    """A `gguf.GGUFReader` (memory-mapped), with clear errors for missing or non-GGUF files.

    The last file opened stays open: parsing the metadata of a large vocabulary is slow (~6 s for Gemma 3's
    262k tokens), and loading a model reads it for the config, the weights and the hub id in turn.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory (expected a .gguf file)")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (expected a .gguf file)")
    stat = path.stat()
    # mtime alone can repeat (cp -p, rsync -t, unzip, coarse clocks); a replaced file has a new inode and ctime
    return _reader(str(path.resolve()), (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns))


def close_reader() -> None:
    """Drop the GGUF file `open_reader` keeps open: its parsed metadata and mapped pages (~130 MB for SmolLM2)."""
    _reader.cache_clear()


@functools.lru_cache(maxsize=1)
def _reader(path: str, version: tuple[int, ...]):  # version: the stat fields that make a rewritten file parse afresh
    from gguf import GGUFReader

    class PlainReader(GGUFReader):
        """gguf's reader on a plain-ndarray view of its memory map: each slice of an `np.memmap` runs memmap's
        `__array_finalize__`, and parsing a large vocabulary takes millions of slices (Gemma 3: 14 s -> 6 s)."""

        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray)

    try:
        return PlainReader(path, "r")
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None


def metadata(reader, key: str, default: Any = _MISSING, source: str = "GGUF file") -> Any:
    """One metadata value (scalar, string or list); `default` when absent, else an error naming the key."""
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise CheckpointError(f"{source}: GGUF metadata lacks {key}")
        return default
    try:
        return field.contents()  # decoded only now, after the reader's own checks
    except (UnicodeDecodeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{source} is not a readable GGUF file: metadata {key} is corrupt ({type(e).__name__})") from None


def _architecture(reader, source: str) -> str:
    arch = metadata(reader, "general.architecture", source=source)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{source}: GGUF architecture {arch!r} is not supported; jpeft reads {list(SUPPORTED_ARCHITECTURES)}")
    return arch


def _rope_parameters(get, reader, arch: str, source: str) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(get(f"{arch}.rope.freq_base", 10000.0))}
    scaling = get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(get(f"{arch}.rope.scaling.factor")))
    elif scaling != "none":
        raise CheckpointError(f"{source}: rope scaling {scaling!r} in GGUF metadata is not supported (only 'linear')")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointError(f"{source}: tensor rope_freqs.weight (llama.cpp's Llama-3.1-style rope scaling) is not supported")
    return rope


def config_from_reader(reader, source: str = "GGUF file"):
    """A transformers `LlamaConfig` / `Qwen2Config` / `Gemma2Config` / `Gemma3TextConfig` from GGUF metadata,
    as transformers' GGUF loader builds it."""
    import transformers

    if metadata(reader, "general.type", None, source) == "adapter":
        raise CheckpointError(f"{source} is a LoRA adapter, not a model: load the base model, then put the adapter on "
                              "it with jpeft.gguf.load_adapter(path, params)")
    arch = _architecture(reader, source)

    def get(key: str, default: Any = _MISSING) -> Any:
        return metadata(reader, key, default, source)

    hidden, heads = int(get(f"{arch}.embedding_length")), int(get(f"{arch}.attention.head_count"))
    kv_heads = get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise CheckpointError(f"{source}: per-layer {arch}.attention.head_count_kv is not supported")
    head_dim = int(get(f"{arch}.attention.key_length", hidden // heads))
    rotary_dim = int(get(f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise CheckpointError(f"{source}: partial rotary embeddings ({arch}.rope.dimension_count={rotary_dim}, head dim {head_dim}) are not supported")
    vocab = get(f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    if vocab is None:
        raise CheckpointError(f"{source}: metadata gives no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")
    kwargs = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(get(f"{arch}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        max_position_embeddings=int(get(f"{arch}.context_length", 2048)),
        rms_norm_eps=float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=_rope_parameters(get, reader, arch, source),
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
        bos_token_id=get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=get("tokenizer.ggml.padding_token_id", None),
    )
    if arch in GEMMA:
        return _gemma_config(get, arch, head_dim, kwargs)
    if arch == "qwen2":
        if head_dim != hidden // heads:
            raise CheckpointError(f"{source}: a Qwen2 head dim of {head_dim} (not hidden/heads) is not supported")
        return transformers.Qwen2Config(**kwargs)
    # llama.cpp's llama graph adds whichever biases the file holds; transformers' config has one flag for each kind
    biases = {t.name.split(".")[2] for t in reader.tensors if t.name.startswith("blk.") and t.name.endswith(".bias")}
    return transformers.LlamaConfig(head_dim=head_dim, attention_bias="attn_q" in biases, mlp_bias="ffn_up" in biases, **kwargs)


def gemma_derived(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> dict[str, Any]:
    """The Gemma config values llama.cpp derives from the shape instead of reading them from the file (the reader
    sets them, `jpeft.gguf.save` requires them): the query scale (hidden/heads for the 27B models, llama.cpp's
    test is the layer count), the layer pattern and, for Gemma 3, no final soft cap and local rotary base 10000."""
    import transformers

    is_27b = layers == (46 if arch == "gemma2" else 62)
    cls = transformers.Gemma2Config if arch == "gemma2" else transformers.Gemma3TextConfig
    derived = dict(query_pre_attn_scalar=hidden // heads if is_27b else head_dim,
                   layer_types=cls(num_hidden_layers=layers).layer_types)
    if arch == "gemma3":
        derived.update(final_logit_softcapping=None, local_rope=dict(GEMMA3_LOCAL_ROPE))
    return derived


def _gemma_config(get, arch: str, head_dim: int, kwargs: dict):
    """Gemma 2 / 3 configs: the file's metadata plus what llama.cpp derives (`gemma_derived`), as transformers'
    loader also takes them for the smaller models."""
    import transformers

    derived = gemma_derived(arch, kwargs["num_hidden_layers"], kwargs["hidden_size"], kwargs["num_attention_heads"], head_dim)
    local = derived.pop("local_rope", None)
    common = dict(head_dim=head_dim, sliding_window=int(get(f"{arch}.attention.sliding_window")), **derived)
    full = kwargs.pop("rope_parameters")
    if arch == "gemma2":
        return transformers.Gemma2Config(**kwargs, **common, rope_parameters=full,
                                         attn_logit_softcapping=float(get("gemma2.attn_logit_softcapping", 50.0)),
                                         final_logit_softcapping=float(get("gemma2.final_logit_softcapping", 30.0)))
    # The rope metadata (base, linear scaling of the 4B+ models) is the global layers'.
    return transformers.Gemma3TextConfig(**kwargs, **common, rope_parameters={"full_attention": full, "sliding_attention": local})


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """GGUF tensor name -> transformers state-dict name (for GGUF architecture `arch`), or None when it has no counterpart."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    layer_tensors = GEMMA_LAYER_TENSORS if arch in GEMMA else LAYER_TENSORS
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match[2] in layer_tensors:
        return f"model.layers.{match[1]}.{layer_tensors[match[2]]}.{match[3]}"
    return None


def gguf_name(hf: str, arch: str = "llama") -> str | None:
    """transformers state-dict name -> GGUF tensor name (for GGUF architecture `arch`); None when it has none."""
    for g, name in GLOBAL_TENSORS.items():
        if name == hf:
            return g
    layer_tensors = GEMMA_LAYER_TENSORS if arch in GEMMA else LAYER_TENSORS
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    short = {v: k for k, v in layer_tensors.items()}.get(match[2]) if match else None
    return None if short is None else f"blk.{match[1]}.{short}.{match[3]}"


def dequantize(tensor, source: str = "GGUF file") -> np.ndarray:
    """A reader tensor as float32 in PyTorch layout (GGUF lists dims innermost first)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    qtype = Q(tensor.tensor_type)
    if qtype in (Q.I8, Q.I16, Q.I32, Q.I64):
        raise CheckpointError(f"{source}: tensor {tensor.name} has integer type {qtype.name}, not a weight type jpeft can load")
    if qtype.name.lower() in GGUF_TYPES and len(tensor.shape) == 2:  # rows (out, row_bytes): jpeft's JAX dequantizer
        values = _dequantizer(qtype.name.lower())(np.asarray(tensor.data))
    else:
        try:
            values = tensor.data.astype(np.float32) if qtype == Q.F64 else quants.dequantize(tensor.data, qtype)
        except NotImplementedError:
            raise CheckpointError(f"{source}: tensor {tensor.name} uses GGML type {qtype.name}, which jpeft cannot dequantise") from None
    return np.asarray(values, dtype=np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


@functools.cache
def _dequantizer(qtype: str):
    """The jitted JAX dequantizer of GGML type `qtype`: bitwise `gguf.quants.dequantize`, many times faster than its numpy."""
    import jax

    from jpeft.quant import ggml

    return jax.jit(ggml.DEQUANTIZE[qtype])


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (per head: interleaved rotary pairs -> two halves)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter `permute` of q/k rows (per head: two rotary halves -> interleaved pairs); inverse of `unpermute_rotary`."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rotary_heads(hf: str, arch: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads llama.cpp permutes the rows of tensor `hf` over (q/k weights and biases of the `llama`
    architecture), else None."""
    if arch != "llama":
        return None
    return n_heads if ".self_attn.q_proj." in hf else n_kv_heads if ".self_attn.k_proj." in hf else None


def _float_tensors(path: str | os.PathLike, reader, tensors: list, config, source: str) -> dict[str, Tensor]:
    """`tensors` (the reader's) by transformers name, each read, dequantised to float32 and un-permuted when asked."""
    arch = metadata(reader, "general.architecture", source=source)
    found, unknown = {}, []
    for tensor in tensors:
        name = hf_name(tensor.name, arch)
        if name is None:
            unknown.append(tensor.name)
            continue
        heads = rotary_heads(name, arch, config.num_attention_heads, config.num_key_value_heads)
        gemma_norm = heads is None and arch in GEMMA and name.endswith("norm.weight")
        found[name] = Tensor(tuple(int(d) for d in reversed(tensor.shape)),
                             functools.partial(_read_float, path, tensor, heads, gemma_norm, source))
    if unknown:
        raise CheckpointError(f"{source} holds tensors jpeft cannot map to a {arch} model: {sorted(unknown)[:8]}")
    return found


def _read_float(path: str | os.PathLike, tensor, heads: int | None, gemma_norm: bool, source: str) -> np.ndarray:
    value = dequantize(tensor._replace(data=_read_bytes(path, tensor)), source)
    if heads:
        return unpermute_rotary(value, heads)
    return value - 1 if gemma_norm else value


def _read_bytes(path: str | os.PathLike, tensor) -> np.ndarray:
    """A reader tensor's data read from `path` with a plain positioned read, in the shape and dtype of its
    memory-mapped view (whose pages, once touched, would stay resident beside the tree being built)."""
    view = tensor.data
    return np.fromfile(path, dtype=view.dtype, count=view.size, offset=tensor.data_offset).reshape(view.shape)


# Where llama.cpp's converter records the model a GGUF was made from, most specific first.
SOURCE_KEYS = ("general.source.repo_url", "general.source.url", "general.repo_url", "general.url")
_HUB_URL = re.compile(r"^https?://(?:www\.)?(?:huggingface\.co|hf\.co)/([\w.-]+/[\w.-]+?)(?:\.git)?/?$")


def hub_id(path: str | os.PathLike) -> str | None:
    """The Hugging Face repo id ("org/name") a GGUF file names as its source, or None when it names none."""
    reader = open_reader(path)
    for key in SOURCE_KEYS:
        match = _HUB_URL.match(str(metadata(reader, key, "")))
        if match:
            return match.group(1)
    return None


def load_config(path: str | os.PathLike):
    """The transformers config described by a GGUF file's metadata."""
    return config_from_reader(open_reader(path), source=str(path))


def read(path: str | os.PathLike) -> tuple[Any, dict[str, np.ndarray]]:
    """(transformers config, float32 state dict with transformers names) from a GGUF file."""
    config, found, _ = tensors(path)
    return config, {name: t.read() for name, t in found.items()}


def _packable(tensor, name: str | None) -> bool:
    """A 2-D Linear weight of a type jpeft.quant reads; the embedding table is gathered, so it stays float."""
    from gguf import GGMLQuantizationType as Q

    return (name is not None and name != GLOBAL_TENSORS["token_embd.weight"] and len(tensor.shape) == 2
            and Q(tensor.tensor_type).name.lower() in GGUF_TYPES)


def read_packed(path: str | os.PathLike) -> tuple[Any, dict[str, np.ndarray], dict[str, tuple[str, np.ndarray]]]:
    """(config, float32 state dict of the other tensors, {name: (GGML type "q4_k", rows (out, row_bytes) uint8)}); see `tensors`."""
    config, found, packed = tensors(path, packed=True)
    return config, {name: t.read() for name, t in found.items()}, {name: (qtype, t.read()) for name, (qtype, t) in packed.items()}


def tensors(path: str | os.PathLike, packed: bool = False) -> tuple[Any, dict[str, Tensor], dict[str, tuple[str, Tensor]]]:
    """(config, {transformers name: float32 tensor}, {name: (GGML type, packed rows)}), each tensor read only when asked.

    With `packed`, Linear weights of the types in `jpeft.quant.GGUF_TYPES` keep the file's blocks, one row of bytes
    (out, row_bytes) uint8 per output feature. Blocks run along the input dim, so llama's q/k row un-permutation moves
    whole byte rows and stays exact. Every other tensor (norms, F32/F16/BF16 weights, the embedding table, types
    without a JAX dequantizer) is read as float, as without `packed`.
    """
    from gguf import GGMLQuantizationType as Q

    source = str(path)
    reader = open_reader(path)
    config = config_from_reader(reader, source=source)
    arch = metadata(reader, "general.architecture", source=source)
    rows, rest = {}, []
    for tensor in reader.tensors:
        name = hf_name(tensor.name, arch)
        if not (packed and _packable(tensor, name)):
            rest.append(tensor)
            continue
        heads = rotary_heads(name, arch, config.num_attention_heads, config.num_key_value_heads)
        rows[name] = (Q(tensor.tensor_type).name.lower(), Tensor(tuple(tensor.data.shape), functools.partial(_read_rows, path, tensor, heads)))
    return config, _float_tensors(path, reader, rest, config, source), rows


def _read_rows(path: str | os.PathLike, tensor, heads: int | None) -> np.ndarray:
    rows = _read_bytes(path, tensor)  # (out, row_bytes), PyTorch's row order
    return unpermute_rotary(rows, heads) if heads else rows
