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


# ----------------------------------------------------------------------------------------------
# Resident memory, measured


def status_bytes(key: str) -> int:
    """A /proc/self/status figure in bytes ("VmRSS", "VmHWM")."""
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))


def reset_peak() -> int:
    """Return freed heap to the OS, restart the peak count (VmHWM) and return the resident bytes now."""
    from jpeft import training

    training.release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


def measure_step(p) -> dict[str, int]:
    """Run a plan's compiled step (`jpeft.plan`) on arrays of its shapes in this process and measure resident memory.

    `arguments`: the growth while the step's arguments are created; `step`: the growth of a second (warm) step above the
    resident bytes just before it; `measured` = the two together, what the plan's peak predicts. `cold`: the first step's
    growth above the start, which adds XLA's one-time runtime set-up (thread pools and the like, ~60-70 MB here)."""
    import jax
    import numpy as np

    ones = lambda t: jax.tree.map(lambda x: None if x is None else jax.device_put(np.ones(x.shape, x.dtype)), t)  # noqa: E731
    trainable, opt_state, frozen, batch, rng = p.shapes
    start = reset_peak()
    args = [ones(t) for t in (trainable, opt_state, frozen, batch)]
    arguments = status_bytes("VmRSS") - start
    out = p.step(*args, rng)
    jax.block_until_ready(out)
    cold = status_bytes("VmHWM") - start
    before = reset_peak()
    out = p.step(out[0], out[1], args[2], args[3], rng)
    jax.block_until_ready(out)
    step = status_bytes("VmHWM") - before
    return {"arguments": arguments, "step": step, "measured": arguments + step, "cold": cold}
