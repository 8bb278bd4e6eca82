"""Real sizes: checkpoints of Llama-3.2-1B's and Llama-3-8B's shapes (random weights, written here, never committed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SHARD_BYTES = 1 << 30


def write_checkpoint(config: Any, out_dir: Path, dtype: str = "bfloat16", shard_bytes: int = SHARD_BYTES, seed: int = 0) -> int:
    """A random HF checkpoint of `config`'s Llama shape in `out_dir` (config.json, safetensors shards and their index),
    written a shard at a time so that no more than one shard is ever in memory; returns the weights' bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from jpeft.models import causal_lm, llama

    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    shapes = {causal_lm.path_to_hf(p): s for p, s in sorted(llama.param_shapes(llama.arch(config)).items())}
    rng = np.random.default_rng(seed)
    std = getattr(config, "initializer_range", 0.02)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups, current, size = [], [], 0
    for (name, transpose), shape in shapes.items():
        nbytes = math.prod(shape) * np_dtype.itemsize
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape[::-1] if transpose else shape))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                value = 1 + 0.1 * rng.standard_normal(shape, np.float32)
            else:
                value = std * rng.standard_normal(shape, np.float32)
            shard[name] = value.astype(np_dtype)
            weight_map[name] = file
            total += shard[name].nbytes
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        del shard
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out_dir / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": dtype}, default=str))
    return total
