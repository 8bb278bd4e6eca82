"""GGUF export for llama.cpp: a LoRA adapter file (`save_lora`) and a merged full model (`save`), and reading the
adapter back (`load_adapter(path, params)`); the merged model loads through the model loaders (`llama.load_pretrained(x.gguf)`).

The adapter is the file llama.cpp's `convert_lora_to_gguf.py` writes and `src/llama-adapter.cpp` reads:
`general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32) and, per targeted weight
`<base tensor>` (e.g. `blk.0.attn_q.weight`), `<base tensor>.lora_a` of numpy shape (r, in) and `.lora_b` of
(out, r), PEFT's lora_A / lora_B. llama.cpp scales each pair by alpha / r with r read from the pair, so one file-wide
alpha expresses PEFT's alpha / r, rank patterns and rsLoRA (alpha sqrt(r) / r) whenever scale * r is the same for
every module; where it is not (alpha patterns, rsLoRA with rank patterns), lora_b of the other modules is multiplied
by their scale * r / alpha, which is exact up to one float32 rounding (`load_adapter` then reads back the same
product with scale alpha / r). For the `llama` architecture the rows of q/k's lora_b take the rotary permutation
the base weights get (`gguf_io.permute_rotary`). The file also records `<arch>.attention.head_count(_kv)` (llama.cpp
ignores keys it does not know), so `load_adapter` can undo that permutation without the base's config.

`base` (of `save_lora`) names the model the adapter was trained on: its transformers config, as
`load_pretrained` returns it, or a path that holds one (a `.gguf` file, an HF directory, a hub id or a packaged
name); the GGUF architecture, tensor names and head counts come from it.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from jpeft import quant, tree
from jpeft.formats import gguf_io, hf_io
from jpeft.methods import lora
from jpeft.models import family
from jpeft.training import split
from jpeft import targets as tg
from jpeft.formats.hf_io import CheckpointError

DTYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_HEADS = ("attention.head_count", "attention.head_count_kv")  # recorded in adapters for `load_adapter`


# ----------------------------------------------------------------------------------------------
# What the file is of: the base's config and its GGUF architecture


def _config(base: Any) -> Any:
    """A transformers config from a config or a path / hub id / packaged name of the base model."""
    if hasattr(base, "model_type"):
        return base
    from jpeft.models import registry

    path = registry.resolve(base)
    if str(path).endswith(".gguf"):
        return gguf_io.load_config(path)
    raw = hf_io.read_config_json(hf_io.resolve_model_dir(path))
    return family.of(raw.get("model_type", "llama")).config_from_dict(raw, str(path))


def _text(config: Any) -> Any:
    return config.text_config if getattr(config, "model_type", None) == "gemma3" else config


def architecture(config: Any) -> str:
    """The GGUF architecture (`general.architecture`) llama.cpp gives a model of this config."""
    model_type = getattr(config, "model_type", None)
    if model_type not in gguf_io.ARCHITECTURES:
        raise ValueError(f"a {model_type!r} model has no llama.cpp GGUF export in jpeft; it writes the decoder-only "
                         f"families {sorted(gguf_io.ARCHITECTURES)} (T5 is not a llama.cpp target)")
    return gguf_io.ARCHITECTURES[model_type]


def _heads(config: Any) -> tuple[int, int]:
    c = _text(config)
    return c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads


# ----------------------------------------------------------------------------------------------
# What a GGUF can express: llama.cpp derives some settings from the architecture instead of reading them, and a
# config with other values would run in llama.cpp (and come back through jpeft's reader) as another model.

_KEEP = "keep this model in jpeft / transformers (jpeft.save_adapter, or the merged weights as safetensors) instead"


def check_expressible(config: Any) -> str:
    """The GGUF architecture of `config`, after refusing (ValueError) what llama.cpp would run differently."""
    arch = architecture(config)
    c = _text(config)
    shape = family.of(c).arch(c)
    if shape.act not in gguf_io.ACTIVATIONS[arch]:
        raise ValueError(f"llama.cpp's {arch} models use the {gguf_io.ACTIVATIONS[arch][0]} activation and a GGUF cannot "
                         f"record another, but this config's activation is {shape.act!r}; {_KEEP}")
    if arch == "qwen2" and shape.head_dim != c.hidden_size // shape.num_heads:
        raise ValueError(f"llama.cpp's qwen2 models have head_dim = hidden_size / num_attention_heads "
                         f"({c.hidden_size // shape.num_heads}), but this config has head_dim={shape.head_dim}; {_KEEP}")
    if arch in gguf_io.GEMMA:
        _check_gemma(c, arch, shape)
    else:
        _check_windows(c, shape.windows)
    return arch


def _check_windows(c: Any, windows: tuple[int | None, ...]) -> None:
    """llama.cpp's llama and qwen2 graphs have no sliding window: a window shorter than the context changes the model.

    Mistral only warns: llama.cpp's own converter drops Mistral's window too (Mistral 7B v0.1's 4096 of 32768
    positions, and MistralConfig's default), so refusing would block the export users expect, and the model is the
    same up to the window's length. Elsewhere (Qwen2's opt-in use_sliding_window) the window is refused.
    """
    window = min((w for w in windows if w is not None), default=None)
    if window is None or window >= c.max_position_embeddings:
        return
    message = (f"llama.cpp runs this {c.model_type} model with full attention, but its config has a sliding window of "
               f"{window} positions (of max_position_embeddings={c.max_position_embeddings})")
    if c.model_type == "mistral":
        warnings.warn(f"{message}: the GGUF gives the same outputs only for the first {window} tokens of a sequence, as "
                      "llama.cpp's own converter does (keep prompts and generations within the window)", stacklevel=3)
        return
    raise ValueError(f"{message}, which a GGUF cannot record; {_KEEP}")


def _check_gemma(c: Any, arch: str, shape: Any) -> None:
    """Gemma's query scale, layer pattern and (Gemma 3) final soft cap and local rotary base must be those llama.cpp derives."""
    from jpeft.models import causal_lm

    want = gguf_io.gemma_derived(arch, c.num_hidden_layers, c.hidden_size, shape.num_heads, shape.head_dim)
    local = dict(c.rope_parameters or {}).get("sliding_attention", gguf_io.GEMMA3_LOCAL_ROPE)
    have = {key: getattr(c, key, None) for key in want} | {"local_rope": local}
    for key, value in want.items():
        same = causal_lm.check_rope(have[key]) == causal_lm.check_rope(value) if key == "local_rope" else have[key] == value
        if not same:
            raise ValueError(f"llama.cpp derives {key}={value!r} for this {arch} model instead of reading it from the GGUF, "
                             f"but the config has {key}={have[key]!r}: the file would run as another model; train with "
                             f"{key}={value!r} to serve the model with llama.cpp, or {_KEEP}")


# ----------------------------------------------------------------------------------------------
# Tensors: dtypes and atomic writing


def _check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; choose one of {list(DTYPES)}")
    return dtype


def encode(value: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, GGML type) of a float array stored as `dtype`; Q8_0 needs rows of a multiple of 32 and falls back to
    F16 otherwise, as llama.cpp's converter does."""
    import gguf

    Q = gguf.GGMLQuantizationType
    value = np.ascontiguousarray(value, dtype=np.float32)
    if dtype == "f32" or value.ndim == 1:  # llama.cpp keeps 1-D tensors (norms, biases) in F32
        return value, Q.F32
    if dtype == "q8_0" and value.shape[-1] % 32 == 0:
        return gguf.quants.quantize(value, Q.Q8_0), Q.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(value, Q.BF16), Q.BF16
    return value.astype(np.float16), Q.F16


@contextlib.contextmanager
def _writer(path: str | os.PathLike, arch: str) -> Iterator[Any]:
    """A `gguf.GGUFWriter` onto a temporary file beside `path`, moved into place only when the block completes."""
    import gguf

    path = Path(path)
    created = [d for d in path.parents if not d.exists()]  # innermost first: removed again if writing fails
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
        created = []
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
        for directory in created:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                directory.rmdir()


def _add(writer, name: str, value: np.ndarray, dtype: str) -> None:
    data, qtype = encode(value, dtype)
    writer.add_tensor(name, data, raw_dtype=qtype)


def _file_type(dtype: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[dtype]


# ----------------------------------------------------------------------------------------------
# The LoRA adapter


def _lora_modules(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{module path: its lora leaves}, after refusing every PEFT leaf llama.cpp's LoRA cannot hold."""
    flat = tree.flatten(params)
    others = sorted(p for p in flat if split.is_adapter_path(p) and p.rsplit("/", 1)[-1] not in lora.LEAVES)
    if others:
        raise ValueError(f"llama.cpp's LoRA adapters hold lora_a/lora_b pairs only, but the parameters also hold {others[:4]} "
                         "(IA3, prompts, prefixes, DoRA magnitudes, LoHa/LoKr and bottleneck adapters have no llama.cpp form): "
                         "export the merged model with jpeft.gguf.save instead")
    modules = {p[: -len("/lora_a")]: {} for p in flat if p.endswith("/lora_a")}
    if not modules:
        raise ValueError("save_lora: the parameters hold no LoRA weights (no lora_a leaves)")
    for m, leaves in modules.items():
        leaves.update({leaf: np.asarray(jax.device_get(flat[f"{m}/{leaf}"]), np.float32) for leaf in lora.LEAVES})
        if leaves["lora_a"].ndim != 2:
            raise ValueError(f"{m} holds stacked (multi-adapter) LoRA leaves; select one adapter before exporting")
    return modules


def _tensor_name(module: str, arch: str) -> str:
    hf = module.replace("/", ".") + ".weight"
    name = gguf_io.gguf_name(hf, arch)
    if name is None or name == "token_embd.weight":
        raise ValueError(f"LoRA on {module.replace('/', '.')} has no llama.cpp adapter tensor ({arch} adapters target the "
                         "attention and MLP projections and an untied lm_head); drop it from target_modules")
    return name


def _check_base_shapes(modules: Mapping[str, Mapping[str, np.ndarray]], config: Any) -> None:
    """Each pair's (in, out) must be its weight's in `base`: llama.cpp applies the file to that model's GGUF."""
    c = _text(config)
    shapes = family.of(c).param_shapes(c, tie_word_embeddings=False)
    for module, leaves in sorted(modules.items()):  # the first mismatch in the order of the tree's names
        have, want = (leaves["lora_a"].shape[0], leaves["lora_b"].shape[1]), shapes.get(f"{module}/kernel")
        if have != want:
            raise ValueError(f"the LoRA pair of {module.replace('/', '.')} is (in, out) {have}, but in the base model that weight is "
                             f"{want or 'absent'}: pass the config of the model the adapter was trained on as base")


def _file_alpha(modules: Mapping[str, Mapping[str, np.ndarray]]) -> float:
    """The alpha that makes alpha / r each module's scale for as many modules as possible (the most common scale * r)."""
    alphas = [float(np.float32(m["lora_scale"]) * m["lora_a"].shape[1]) for m in modules.values()]
    return max(set(alphas), key=alphas.count)


def save_lora(path: str | os.PathLike, params: Mapping[str, Any], base: Any, dtype: str = "f32") -> None:
    """Write the LoRA leaves of `params` as a llama.cpp adapter GGUF for the model `base` (config or path), atomically."""
    _check_dtype(dtype)
    config = _config(base)
    arch = check_expressible(config)
    n_heads, n_kv = _heads(config)
    modules = _lora_modules(params)
    if "lm_head" in modules and _text(config).tie_word_embeddings:
        raise ValueError("LoRA on a tied lm_head: llama.cpp's output layer is then the token embedding, which an adapter "
                         "cannot change apart from the embedding; drop lm_head from target_modules or export the merged model")
    names = {module: _tensor_name(module, arch) for module in modules}
    _check_base_shapes(modules, config)
    alpha = _file_alpha(modules)
    with _writer(path, arch) as writer:
        writer.add_type("adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        writer.add_file_type(_file_type(dtype))
        writer.add_uint32(f"{arch}.{ADAPTER_HEADS[0]}", n_heads)
        writer.add_uint32(f"{arch}.{ADAPTER_HEADS[1]}", n_kv)
        for module, leaves in modules.items():
            name = names[module]
            r = leaves["lora_a"].shape[1]
            fold = float(np.float32(leaves["lora_scale"])) * r / alpha  # 1 unless this module's scale * r differs
            a, b = leaves["lora_a"].T, leaves["lora_b"].T * np.float32(fold)  # PEFT's (r, in) and (out, r)
            heads = gguf_io.rotary_heads(module.replace("/", ".") + ".", arch, n_heads, n_kv)
            if heads:
                b = gguf_io.permute_rotary(b, heads)
            _add(writer, f"{name}.lora_a", a, dtype)
            _add(writer, f"{name}.lora_b", b, dtype)


def load_adapter(path: str | os.PathLike, params: Mapping[str, Any], config: Any = None) -> dict:
    """Put a llama.cpp LoRA adapter GGUF onto base `params`: lora_a (in, r), lora_b (r, out), lora_scale alpha / r.

    The file comes first, as in `jpeft.load_adapter(path, params)`. `config` (the base's, or a path to it) is needed
    only for a `llama` adapter written without head counts (by llama.cpp's converter), to undo q/k's rotary permutation.
    """
    if isinstance(path, Mapping):
        raise TypeError("jpeft.gguf.load_adapter(path, params): the adapter file comes first, then the base parameters")
    source = str(path)
    reader = gguf_io.open_reader(path)

    def get(key: str, default: Any = None) -> Any:
        return gguf_io.metadata(reader, key, default, source)

    if get("general.type") != "adapter" or get("adapter.type") != "lora":
        raise CheckpointError(f"{source} is not a llama.cpp LoRA adapter (general.type={get('general.type')!r}, "
                              f"adapter.type={get('adapter.type')!r}; want 'adapter' and 'lora')")
    arch = get("general.architecture")
    alpha = float(get("adapter.lora.alpha", 0.0))
    heads = _heads(_config(config)) if config is not None else tuple(get(f"{arch}.{key}") for key in ADAPTER_HEADS)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        stem, _, leaf = tensor.name.rpartition(".")
        hf = gguf_io.hf_name(stem, arch)
        if leaf not in ("lora_a", "lora_b") or hf is None or not hf.endswith(".weight"):
            raise CheckpointError(f"{source}: tensor {tensor.name} is not a LoRA pair jpeft can place on a {arch} model")
        pairs.setdefault(hf, {})[leaf] = gguf_io.dequantize(tensor, source)
    updates = {}
    for hf, pair in sorted(pairs.items()):
        if len(pair) != 2:
            raise CheckpointError(f"{source}: the LoRA pair of {hf} lacks one of lora_a / lora_b")
        b = pair["lora_b"]
        if gguf_io.rotary_heads(hf, arch, 1, 1):  # a q/k pair of `llama`: lora_b's rows are permuted
            if None in heads:
                raise CheckpointError(f"{source} records no {arch}.attention.head_count(_kv): pass the base's config "
                                      "(load_adapter(path, params, config)) to undo q/k's rotary permutation")
            b = gguf_io.unpermute_rotary(b, gguf_io.rotary_heads(hf, arch, *heads))
        module = hf[: -len(".weight")]
        updates[module] = _placed(params, module, pair["lora_a"].T, b.T, alpha, source)
    return tg.replace_modules(params, updates)


def _placed(params, module: str, a: np.ndarray, b: np.ndarray, alpha: float, source: str) -> dict:
    """The lora leaves of one module, checked against its weight's (in, out) and cast to its dtype."""
    import jax.numpy as jnp

    try:
        target = tg.get_module(params, module)
    except KeyError:
        raise CheckpointError(f"{source} holds LoRA weights for {module}, which these parameters do not have") from None
    if not quant.has_weight(target):  # the token embedding: llama.cpp's converter writes its LoRA, jpeft's models have none
        raise CheckpointError(f"{source} holds a LoRA pair for {module}, which has no dense weight; jpeft puts LoRA on "
                              "Linear layers only: drop that pair (or apply the adapter with llama.cpp)")
    shape, dtype = quant.weight_shape(target), quant.weight_dtype(target)
    if (a.shape[0], b.shape[1]) != shape or a.shape[1] != b.shape[0]:
        raise CheckpointError(f"{source}: LoRA pair of {module} has shapes {a.shape} / {b.shape}, not fitting its weight {shape}")
    r = a.shape[1]
    scale = alpha / r if alpha else 1.0  # llama.cpp: no alpha means scale 1
    return {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype), "lora_scale": jnp.asarray(scale, jnp.float32)}


# ----------------------------------------------------------------------------------------------
# The merged model


def _hyperparameters(writer, config: Any, arch: str, dtype: str) -> None:
    """The `<arch>.*` keys llama.cpp reads for this architecture (and jpeft's reader reads back)."""
    import gguf

    c = _text(config)
    heads, kv = _heads(config)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type(_file_type(dtype))
    ropes = dict(c.rope_parameters or {})
    rope = ropes.get("full_attention", ropes)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))))
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} has no GGUF form jpeft writes (only default and linear)")
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch in gguf_io.GEMMA:
        _gemma_hyperparameters(writer, c, arch)


def _gemma_hyperparameters(writer, c: Any, arch: str) -> None:
    """Gemma's window and (Gemma 2) soft caps; the rest llama.cpp derives (`check_expressible` has checked it)."""
    writer.add_sliding_window(c.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(c.attn_logit_softcapping)
        writer.add_final_logit_softcapping(c.final_logit_softcapping)


def _tokenizer(writer, source: Any, vocab_size: int) -> None:
    """Tokenizer metadata: every `tokenizer.*` key of a GGUF file, or built from an HF tokenizer directory with the
    gguf package's vocab readers; a vocabulary shorter than the model's is padded as llama.cpp's converter pads it."""
    from jpeft.models import registry

    path = Path(registry.resolve(source))
    if path.suffix != ".gguf":
        return _hf_tokenizer(writer, hf_io.resolve_model_dir(path), vocab_size)
    reader = gguf_io.open_reader(path)
    padding = {}
    if "tokenizer.ggml.tokens" in reader.fields:  # a file without a vocabulary passes on the special-token ids it has
        tokens = gguf_io.metadata(reader, "tokenizer.ggml.tokens", source=str(path))
        _check_vocab_size(len(tokens), vocab_size, path)
        padding = _padding(len(tokens), vocab_size)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents() + padding.get(key, []) if sub else field.contents(), field.types[0], sub_type=sub)


def _check_vocab_size(count: int, vocab_size: int, source: Any) -> None:
    if count > vocab_size:
        raise CheckpointError(f"{source}: the tokenizer has {count} tokens but the model's vocabulary only {vocab_size}; "
                              "pass the tokenizer the model was trained with")


def _padding(count: int, vocab_size: int) -> dict[str, list]:
    """The token list entries of embedding rows past the tokenizer's `count` tokens, named as llama.cpp's converter names them."""
    import gguf

    rows = range(count, vocab_size)
    return {"tokenizer.ggml.tokens": [f"[PAD{i}]" for i in rows], "tokenizer.ggml.scores": [-1000.0 for _ in rows],
            "tokenizer.ggml.token_type": [gguf.TokenType.UNUSED for _ in rows]}


def _hf_tokenizer(writer, directory: Path, vocab_size: int) -> None:
    """llama.cpp's tokenizer keys of an HF tokenizer directory, typed and flagged as llama.cpp's converter does."""
    from gguf import vocab as gv

    for kind in (gv.BpeVocab, gv.LlamaHfVocab, gv.SentencePieceVocab):
        try:
            vocab = kind(directory)
            break
        except (FileNotFoundError, TypeError, ValueError, ImportError):
            continue
    else:
        raise CheckpointError(f"{directory} holds no tokenizer the gguf package reads (tokenizer.json BPE, or tokenizer.model)")
    tokens, scores, kinds = map(list, zip(*vocab.all_tokens()))
    _check_vocab_size(len(tokens), vocab_size, directory)
    for i, kind in _added_token_types(directory).items():  # the gguf package types specials of the base vocab NORMAL
        if i < len(kinds):
            kinds[i] = kind
    padding = _padding(len(tokens), vocab_size)
    tokens += padding["tokenizer.ggml.tokens"]
    scores += padding["tokenizer.ggml.scores"]
    kinds += padding["tokenizer.ggml.token_type"]
    tokenizer_json = _json(directory / "tokenizer.json")
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer_json, directory) if vocab.tokenizer_model == "gpt2" else "default")
    if vocab.tokenizer_model == "llama" and tokenizer_json:
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(kinds)
    gv.SpecialVocab(directory, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _added_token_types(directory: Path) -> dict[int, int]:
    """{id: CONTROL (special) or USER_DEFINED} of the tokens an HF tokenizer adds, as llama.cpp's converter types
    them: llama.cpp (and jpeft's GGUF tokenizer) keep CONTROL tokens such as <|im_start|> whole."""
    import gguf

    added = {str(t["id"]): t for t in _json(directory / "tokenizer.json").get("added_tokens", [])}
    added |= _json(directory / "tokenizer_config.json").get("added_tokens_decoder", {})
    return {int(i): gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED for i, t in added.items()}


def _steps(node: dict | None) -> list[dict]:
    """The steps of a tokenizer.json normalizer / pre-tokenizer, a Sequence flattened."""
    if not node:
        return []
    inner = node.get("normalizers") or node.get("pretokenizers")
    return [step for child in inner for step in _steps(child)] if node["type"] == "Sequence" else [node]


def _adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether a sentencepiece-style tokenizer.json puts "▁" before the text (llama.cpp's add_space_prefix, true when absent)."""
    if any(s["type"] == "Prepend" and s.get("prepend") == "\u2581" for s in _steps(tokenizer_json.get("normalizer"))):
        return True
    for s in _steps(tokenizer_json.get("pre_tokenizer")):
        if s["type"] == "Metaspace":
            return s.get("prepend_scheme", "always" if s.get("add_prefix_space", True) else "never") != "never"
    return False


# Byte-level BPE pre-tokenizers (tokenizer.json steps, ignoring other fields) -> llama.cpp's name for the same split.
# llama.cpp's converter identifies the others by hashing a tokenization against its own table, which jpeft does not copy.
_BPE_PRE = {(("ByteLevel", True),): "gpt-2", (("Digits", True), ("ByteLevel", True)): "smollm"}


def _pre_tokenizer(tokenizer_json: dict, directory: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json; "default" with a warning when unknown."""
    steps = _steps(tokenizer_json.get("pre_tokenizer"))
    key = tuple((s["type"], bool(s.get("individual_digits", s.get("use_regex")))) for s in steps)
    if all(not s.get("add_prefix_space") for s in steps) and key in _BPE_PRE:
        return _BPE_PRE[key]
    warnings.warn(f"{directory}: jpeft cannot tell llama.cpp which pre-tokenizer this BPE tokenizer uses, so llama.cpp "
                  "will split text (digits, contractions, spaces) unlike the HF tokenizer; pass the base model's GGUF, "
                  "as llama.cpp's convert_hf_to_gguf.py writes it, as tokenizer_source instead", stacklevel=4)
    return "default"


def merged_state(config: Any, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The transformers state dict of `params` (in their dtype) with any LoRA merged in (the one merge rule, `jpeft.lora.merge`)."""
    from jpeft.models import causal_lm

    architecture(config)
    if any(p.endswith("/lora_a") for p in tree.flatten(params)):
        params = lora.merge(params)
    return causal_lm.state_dict_from_params(family.of(config), config, quant.dequantize(params))


def save(path: str | os.PathLike, config: Any, params: Mapping[str, Any], dtype: str = "f16", tokenizer_source: Any = None) -> None:
    """Write a full-model GGUF that llama.cpp runs, with any LoRA merged in, atomically.

    2-D weights are stored as `dtype` ("f16", "bf16", "f32" or "q8_0"; Q8_0 falls back to F16 for rows not a multiple
    of 32), norms and biases in F32. Q/k rows are permuted for `llama` and Gemma norms stored as 1 + w, as llama.cpp's
    converter does; a tied model has no output.weight. `tokenizer_source` (a GGUF file, whose `tokenizer.*` keys are
    copied, or an HF tokenizer directory / hub id / packaged name) gives the vocabulary llama.cpp needs to run the
    file; without one only the special-token ids are written (enough for jpeft, not for llama.cpp's tokenizer).
    """
    _check_dtype(dtype)
    arch = check_expressible(config)
    state = merged_state(config, params)
    n_heads, n_kv = _heads(config)
    with _writer(path, arch) as writer:
        writer.add_type("model")
        if dtype == "q8_0":
            writer.add_quantization_version(2)  # gguf.GGML_QUANT_VERSION, which llama.cpp's converter writes for quantized files
        _hyperparameters(writer, config, arch, dtype)
        if tokenizer_source is not None:
            _tokenizer(writer, tokenizer_source, _text(config).vocab_size)
        else:
            c = _text(config)
            eos = c.eos_token_id[0] if isinstance(c.eos_token_id, (list, tuple)) else c.eos_token_id
            for add, value in ((writer.add_bos_token_id, c.bos_token_id), (writer.add_eos_token_id, eos), (writer.add_pad_token_id, c.pad_token_id)):
                if value is not None:
                    add(value)
        for hf, value in state.items():
            name = gguf_io.gguf_name(hf, arch)
            if name is None:
                raise ValueError(f"{hf} has no llama.cpp tensor name in a {arch} GGUF")
            heads = gguf_io.rotary_heads(hf, arch, n_heads, n_kv)
            if heads:
                value = gguf_io.permute_rotary(value, heads)
            elif arch in gguf_io.GEMMA and hf.endswith("norm.weight"):
                value = np.asarray(value, np.float32) + 1  # in float32: 1 + w in bfloat16 would drop w's low bits
            _add(writer, name, value, dtype)
