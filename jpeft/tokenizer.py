"""Tokenizers for HF directories, hub ids, known short names and GGUF files, chat template included."""

from __future__ import annotations

import os
from pathlib import Path

from jpeft import hf_io
from jpeft.hf_io import CheckpointError
from jpeft.models import registry


def load_tokenizer(name_or_path: str | os.PathLike):
    """A transformers fast tokenizer; for a `.gguf` file it is rebuilt from the file's vocabulary and template."""
    from transformers import AutoTokenizer

    path = registry.resolve(name_or_path)
    if str(path).endswith(".gguf"):
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist (expected a .gguf file)")
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model_dir = hf_io.resolve_model_dir(path)
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir} holds no tokenizer transformers can load ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
