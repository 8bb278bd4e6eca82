"""Which leaves of a dense module hold its frozen weight, read from the key names alone (so jit sees the format).

A module's weight is either `kernel` (in, out) or one quantized leaf group in PyTorch's (out, in) row layout
(see `jpeft.quant` for the table). Nothing here imports the rest of jpeft, so `jpeft.targets` can use it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

KERNEL = "kernel"
NF4 = "kernel_nf4"
INT8 = "kernel_int8"
ABSMAX = "kernel_absmax"  # NF4: per 64-value block (out, in/64); int8: per output row (out,)
ABSMAX_CODES = "kernel_absmax_q"  # NF4 double quantization: absmax as 8-bit dynamic-map codes (out, in/64)
ABSMAX_SCALE = "kernel_absmax_scale"  # ... their per-256-block absmax (ceil(out*in/64/256),)
ABSMAX_OFFSET = "kernel_absmax_offset"  # ... and the mean subtracted before quantizing them ()

# GGML block types kept packed (those `jpeft.quant.ggml` dequantizes): key suffix -> (values, bytes) per block, the
# format's fixed sizes (gguf's GGML_QUANT_SIZES, spelled out so that importing jpeft does not need the gguf package).
GGUF_TYPES = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q8_0": (32, 34), "q4_k": (256, 144), "q6_k": (256, 210)}
GGUF_KEYS = {f"kernel_{t}": t for t in GGUF_TYPES}

CODES = (NF4, INT8, *GGUF_KEYS)  # exactly one of these marks a quantized weight; its key names the format
LEAVES = frozenset((*CODES, ABSMAX, ABSMAX_CODES, ABSMAX_SCALE, ABSMAX_OFFSET))
ROW_LEAVES = frozenset((*CODES, ABSMAX, ABSMAX_CODES))  # leaves whose first axis is the weight's output rows


def format_of(module: Mapping[str, Any]) -> str | None:
    """"nf4", "nf4-dq" (double-quantized absmax), "int8", a GGML type ("q4_k", ...), or None for a float `kernel`."""
    found = [k for k in CODES if k in module]
    if len(found) > 1 or (found and KERNEL in module):
        raise ValueError(f"a module holds several weights ({sorted(found + [KERNEL] * (KERNEL in module))}); keep exactly one")
    if not found:
        return None
    if found[0] == NF4:
        return "nf4-dq" if ABSMAX_CODES in module else "nf4"
    return "int8" if found[0] == INT8 else GGUF_KEYS[found[0]]


def is_quantized(module: Mapping[str, Any]) -> bool:
    """Whether the module's weight is a quantized leaf group."""
    return format_of(module) is not None


def has_weight(module: Mapping[str, Any]) -> bool:
    """Whether the module holds a dense weight, float or quantized."""
    return KERNEL in module or any(k in module for k in CODES)


def weight_shape(module: Mapping[str, Any]) -> tuple[int, ...]:
    """The logical (in, out) shape of a module's weight, float or quantized; routed experts' (X, in, out)."""
    fmt = format_of(module)
    if fmt is None:
        return tuple(module[KERNEL].shape)
    if fmt in ("nf4", "nf4-dq"):
        *experts, out, half = module[NF4].shape
        return *experts, 2 * half, out
    if fmt == "int8":
        *experts, out, d_in = module[INT8].shape
        return *experts, d_in, out
    block, size = GGUF_TYPES[fmt]
    *experts, out, row_bytes = module[f"kernel_{fmt}"].shape
    return *experts, row_bytes // size * block, out


def weight_dtype(module: Mapping[str, Any]) -> Any:
    """The dtype of a module's float weight; float32 for a quantized one (what it dequantizes to)."""
    return module[KERNEL].dtype if KERNEL in module else np.dtype(np.float32)


def leaf_name(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def is_quantized_leaf(path: str) -> bool:
    """Whether a leaf path ("model/.../q_proj/kernel_nf4") belongs to a quantized weight."""
    return leaf_name(path) in LEAVES
