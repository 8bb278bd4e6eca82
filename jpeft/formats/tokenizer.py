"""Tokenizers for HF directories, hub ids, known short names and GGUF files, chat template included."""

from __future__ import annotations

import os
from pathlib import Path

from jpeft.formats import gguf_io, hf_io
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import registry

_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def load_tokenizer(name_or_path: str | os.PathLike):
    """A transformers fast tokenizer; for a `.gguf` file it is rebuilt from the file's vocabulary and template."""
    from transformers import AutoTokenizer

    path = registry.resolve(name_or_path)
    if str(path).endswith(".gguf"):
        return _gguf_tokenizer(path)
    model_dir = hf_io.resolve_model_dir(path)
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir} holds no tokenizer transformers can load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer `AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds, read through jpeft's GGUF reader.

    transformers' own GGUF reader imports torch, which jpeft does not need at run time; the metadata read here
    (and shared with the model's loading through `gguf_io.open_reader`) goes to transformers' converter and
    the tokenizer class `AutoTokenizer` picks for the model type.
    """
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    reader = gguf_io.open_reader(path)
    source = str(path)

    def fields(renames: dict) -> dict:
        return {name: gguf_io.metadata(reader, f"tokenizer.{key}", source=source) for key, name in renames.items() if f"tokenizer.{key}" in reader.fields}

    tokenizer, tokenizer_config = fields(GGUF_TOKENIZER_MAPPING["tokenizer"]), fields(GGUF_TOKENIZER_MAPPING["tokenizer_config"])
    if "tokens" not in tokenizer:
        raise CheckpointError(f"{source}: GGUF metadata holds no tokenizer (tokenizer.ggml.tokens); pass a tokenizer directory or hub id")
    if tokenizer.get("tokenizer_type") == "llama":  # llama.cpp's default for sentencepiece files that do not say
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = gguf_io.metadata(reader, f"tokenizer.ggml.{key}", None, source)
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(gguf_io.metadata(reader, "general.architecture", source=source), tokenizer)
    model_type = gguf_io.config_from_reader(reader, source).model_type
    cls = tokenizer_class_from_name(TOKENIZER_MAPPING_NAMES.get(model_type) or "TokenizersBackend")
    # name_or_path as AutoTokenizer sets it: the file's directory, where transformers looks for a config.json
    return cls(tokenizer_object=backend, name_or_path=str(Path(path).parent), **tokenizer_config, **extra)
