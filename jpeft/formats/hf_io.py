"""Reading and writing Hugging Face checkpoint directories: safetensors only, atomic writes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping, NamedTuple

import numpy as np

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, corrupt or does not fit the model."""


def resolve_model_dir(path_or_hub_id: str | os.PathLike, allow_patterns: tuple[str, ...] = ("*.json", "*.safetensors", "*.model", "*.txt")) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (or taken from the local cache)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CheckpointError(f"{name!r} is not a model directory (expected a folder with config.json and model.safetensors)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=list(allow_patterns)))
    except Exception as e:  # network errors, unknown repos, offline mode
        raise CheckpointError(
            f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "If this machine is offline, download the model elsewhere and pass its local directory "
            "(config.json + model.safetensors) instead."
        ) from None


def read_config_json(model_dir: Path) -> dict:
    """config.json as a dict, with a clear error when missing or malformed."""
    file = model_dir / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: a model directory needs config.json beside its weights")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
        return files
    single = model_dir / SAFETENSORS
    if single.is_file():
        return [single]
    return []


class Tensor(NamedTuple):
    """A checkpoint tensor not read yet: its shape and a function that reads it as a numpy array of that shape."""

    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


def transposed(t: Tensor) -> Tensor:
    """`t` read as a kernel: a PyTorch Linear weight (*experts, out, in) as (*experts, in, out); a view, no copy. A
    misnamed 1-D tensor passes through, for the name and shape checks to report."""
    if len(t.shape) < 2:
        return t
    return Tensor((*t.shape[:-2], t.shape[-1], t.shape[-2]), lambda: np.swapaxes(t.read(), -1, -2))


def in_memory(state: Mapping[str, np.ndarray]) -> dict[str, Tensor]:
    """A state dict already in memory, as `Tensor`s (so one conversion serves loaded and streamed checkpoints)."""
    return {name: Tensor(tuple(np.shape(v)), lambda v=v: v) for name, v in state.items()}


def tensors(model_dir: Path, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Every tensor of a checkpoint directory, by PyTorch name, read only when asked (`Tensor.read`)."""
    files = _safetensors_files(model_dir)
    if not files:
        pickles = [model_dir / n for n in PICKLE_FILES if (model_dir / n).is_file()]
        if pickles and allow_pickle:
            return in_memory(_read_pickle(pickles[0]))
        if pickles:
            raise CheckpointError(
                f"{model_dir} holds only {pickles[0].name}, a pickle, which jpeft does not load by default "
                "(unpickling can run arbitrary code). Convert it once with transformers: "
                "`AutoModel...from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`, "
                "or pass allow_pickle=True if you trust the file."
            )
        raise CheckpointError(f"{model_dir} has no {SAFETENSORS} or {SAFETENSORS_INDEX}")
    found: dict[str, Tensor] = {}
    for file in files:
        found.update(safetensors_tensors(file))
    return found


def safetensors_tensors(file: Path) -> dict[str, Tensor]:
    """The tensors of one safetensors file, each read with a plain positioned read when asked.

    safetensors checks the file (header, offsets, sizes); the bytes are then read without its memory map, whose
    pages stay resident once touched and would count a whole shard (5 GB for an 8B model) on top of the tree.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            names = set(f.keys())
        with open(file, "rb") as raw:
            (size,) = struct.unpack("<Q", raw.read(8))
            header = json.loads(raw.read(size))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    data_start = 8 + size
    found = {}
    for name in names:
        entry = header[name]
        dtype = _dtype(entry["dtype"], file, name)
        begin, end = entry["data_offsets"]
        found[name] = Tensor(tuple(entry["shape"]), functools.partial(_read_at, file, dtype, tuple(entry["shape"]), data_start + begin,
                                                                      (end - begin) // dtype.itemsize))
    return found


def _dtype(code: str, file: Path, name: str) -> np.dtype:
    import ml_dtypes

    known = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
             "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
    if code not in known:
        raise CheckpointError(f"{file}: tensor {name} has dtype {code}, which jpeft does not read")
    return np.dtype(known[code])  # little-endian, as the format and every machine jpeft runs on


def _read_at(file: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int, count: int) -> np.ndarray:
    return np.fromfile(file, dtype=dtype, count=count, offset=offset).reshape(shape)


def _read_pickle(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {file} needs torch installed; convert it to safetensors instead") from None
    if file.name.endswith(".index.json"):
        shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        tensors = {}
        for shard in shards:
            tensors.update(torch.load(file.parent / shard, map_location="cpu", weights_only=True))
    else:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in tensors.items()}


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Write into a temporary sibling directory; it replaces `target` only when the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(directory: Path) -> None:
    """The modes a plain mkdir / open would give (mkdtemp and some writers make owner-only files)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_safetensors(file: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Save numpy tensors (contiguous, PyTorch layout) to one safetensors file."""
    from safetensors.numpy import save_file

    # ascontiguousarray makes 0-d arrays 1-d; the reshape keeps a scalar a scalar.
    save_file({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in tensors.items()}, str(file), metadata=metadata or {"format": "pt"})
