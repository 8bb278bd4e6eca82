"""Frozen weights that stay quantized (QLoRA): a dense module's `kernel` replaced by a quantized leaf group.

The group sits in the same plain dict as the module's other leaves (`bias`, `lora_a`, ...). Its codes leaf names
the format, so the format is known statically from the tree's keys. Codes are stored in PyTorch's (out, in) row
layout, as bitsandbytes and GGUF store them:

| format | leaves | weight (out, in) |
| --- | --- | --- |
| NF4 (bitsandbytes `quantize_4bit(w, 64, quant_type="nf4")`) | `kernel_nf4` (out, in/2) uint8, two codes a byte, high nibble first; `kernel_absmax` (out, in/64) float32 | `NF4[code] * absmax` of its 64-value block |
| NF4, double-quantized (`compress_statistics=True`) | `kernel_nf4`; `kernel_absmax_q` (out, in/64) uint8; `kernel_absmax_scale` (ceil(out*in/64/256),) float32; `kernel_absmax_offset` () float32 | as NF4, with absmax = `DYNAMIC_MAP[absmax_q] * scale` of its 256-block + offset |
| int8, per output row | `kernel_int8` (out, in) int8; `kernel_absmax` (out,) float32 | `q * absmax / 127` |
| GGUF blocks as in the file | `kernel_q4_0`, `kernel_q4_1`, `kernel_q5_0`, `kernel_q8_0`, `kernel_q4_k` or `kernel_q6_k`: (out, row_bytes) uint8 | `gguf.quants.dequantize` of each row |

Routed experts' weights (X, in, out) (`jpeft.models.moe`) quantize expert by expert: every leaf of their group leads
with the expert axis X (double quantization's scale and offset too, one set per expert), so expert x's group is each
leaf's row x. NF4 needs `in` to be a multiple of 64 (blocks then never cross rows). `jpeft.nn.dense` dequantizes the group inside
the jitted matmul, layer by layer, and again in the backward pass (never keeping the float weight from forward to
backward), so no float copy of the base exists. Quantized leaves are never trainable. Embedding tables stay float
(they are gathered, and a tied LM head reads them); `quantize` leaves the untied LM head float by default too.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import targets as tg
from jpeft import tree
from jpeft.quant import bnb, ggml
from jpeft.quant.layout import (ABSMAX, ABSMAX_CODES, ABSMAX_OFFSET, ABSMAX_SCALE, CODES, GGUF_TYPES, INT8, KERNEL, LEAVES,
                                NF4, ROW_LEAVES, format_of, has_weight, is_quantized, is_quantized_leaf, weight_dtype,
                                weight_shape)

FORMATS = ("nf4", "int8")  # what `quantize` produces; GGUF blocks come from `llama.load_pretrained(..., quantized=True)`

__all__ = [
    "FORMATS", "GGUF_TYPES", "LEAVES", "ROW_LEAVES", "check_frozen", "dequantize", "float_shapes", "format_of", "gguf_key", "gguf_leaves",
    "has_weight", "is_quantized", "is_quantized_leaf", "leaves", "quantize", "quantize_matrix", "quantize_weight", "quantized_modules", "require_float", "select", "unpack", "weight",
    "weight_dtype", "weight_shape",
]


def leaves(module: Mapping[str, Any]) -> dict[str, Any]:
    """The module's quantized leaf group (codes and scales), by leaf name."""
    return {k: v for k, v in module.items() if k in LEAVES}


def unpack(fmt: str, group: Mapping[str, jax.Array]) -> jax.Array:
    """The (out, in) float32 weight of a quantized leaf group of format `fmt` (traceable)."""
    if fmt in ("nf4", "nf4-dq"):
        absmax = group[ABSMAX] if fmt == "nf4" else bnb.dequantize_absmax(group[ABSMAX_CODES], group[ABSMAX_SCALE], group[ABSMAX_OFFSET])
        return bnb.dequantize_nf4(group[NF4], absmax)
    if fmt == "int8":
        return bnb.dequantize_int8(group[INT8], group[ABSMAX])
    return ggml.DEQUANTIZE[fmt](group[f"kernel_{fmt}"])


def weight(module: Mapping[str, Any]) -> jax.Array:
    """The module's (in, out) kernel (routed experts' (X, in, out)): the float leaf itself, or its quantized group
    dequantized to float32."""
    fmt = format_of(module)
    if fmt is None:
        return module[KERNEL]
    group = leaves(module)
    if len(weight_shape(module)) == 3:  # routed experts: one group per expert, stacked
        return jnp.swapaxes(jax.vmap(lambda g: unpack(fmt, g))(group), 1, 2)
    return unpack(fmt, group).T


def gguf_leaves(qtype: str, rows: Any) -> dict[str, Any]:
    """The leaf group of a GGUF weight kept packed: rows (out, row_bytes) uint8 of GGML type `qtype` ("q4_k", ...)."""
    return {gguf_key(qtype): jnp.asarray(rows, jnp.uint8)}


def gguf_key(qtype: str) -> str:
    """The codes leaf name of GGML type `qtype` kept packed ("q4_k" -> "kernel_q4_k"), or an error naming the types jpeft reads."""
    qtype = qtype.lower()
    if qtype not in GGUF_TYPES:
        raise ValueError(f"GGML type {qtype.upper()} cannot stay packed; jpeft dequantizes {sorted(t.upper() for t in GGUF_TYPES)} in JAX")
    return f"kernel_{qtype}"


def quantized_modules(params: Mapping[str, Any]) -> list[str]:
    """Dotted names of the modules whose weight is quantized."""
    return sorted(p.rsplit("/", 1)[0].replace("/", ".") for p in tree.flatten(params) if p.rsplit("/", 1)[-1] in CODES)


def select(params: Mapping[str, Any], fmt: str, targets: tg.Targets | None = None) -> list[str]:
    """The float dense modules `quantize(params, fmt, targets)` would quantize, checked (works on shapes alone).

    Default targets: every 2-D float kernel except the LM head and bottleneck adapters (which train), and routed experts'.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of {list(FORMATS)} (GGUF files load packed with quantized=True)")
    floats = [m for m in tg.dense_modules(params) + tg.expert_modules(params) if not is_quantized(tg.get_module(params, m))]
    if targets is None:
        names = [m for m in floats if not m.startswith("lm_head") and "adapter" not in m.split(".")]
    else:
        names = tg.select(floats, targets, "targets")
    for name in names:
        shape = weight_shape(tg.get_module(params, name))
        if len(shape) != 2 + tg.is_expert(name):  # routed experts' (X, in, out): one group per expert
            raise ValueError(f"cannot quantize {name}: its kernel has shape {shape}, not (in, out); a weight of another rank "
                             "(DenseGeneral, Einsum, layers stacked by a scan) needs its layer's view of it: "
                             "jpeft.linen.quantize(model, params, fmt, *example_args) or jpeft.nnx.quantize(model, fmt)")
        if fmt == "nf4" and shape[-2] % bnb.BLOCK:
            raise ValueError(f"cannot quantize {name} to NF4: its input dim {shape[-2]} is not a multiple of {bnb.BLOCK} "
                             "(NF4 blocks must not cross rows); leave it out of targets or use int8")
    return names


def quantize(params: Mapping[str, Any], fmt: str = "nf4", targets: tg.Targets | None = None, double_quant: bool = False) -> dict:
    """A tree whose chosen dense kernels are replaced by quantized leaf groups (see the module docstring).

    `targets` chooses modules by HF PEFT's rules (a name, a dotted suffix, or a regex string); `double_quant`
    also quantizes NF4's absmax as bitsandbytes' compress_statistics does. Each kernel is quantized where it lives
    (`quantize_weight`); a streaming load (`llama.load_pretrained(path, quantize="nf4")`) quantizes as it reads.
    """
    check_double_quant(fmt, double_quant)
    flat = tree.flatten(params)
    for name in select(params, fmt, targets):
        path = name.replace(".", "/")
        group = quantize_matrix(flat.pop(f"{path}/{KERNEL}"), fmt, double_quant)
        flat.update({f"{path}/{k}": v for k, v in group.items()})
    return tree.unflatten(flat)


def check_double_quant(fmt: str, double_quant: bool) -> None:
    """double_quant applies to NF4's block absmax only."""
    if double_quant and fmt != "nf4":
        raise ValueError(f"double_quant applies to NF4's block absmax, not to {fmt!r}")


def quantize_weight(w: Any, fmt: str, double_quant: bool = False) -> dict[str, jax.Array]:
    """One float weight in PyTorch's (out, in) layout -> its quantized leaf group, computed where `w` lives (jitted)."""
    if fmt == "int8":
        return dict(zip((INT8, ABSMAX), bnb.quantize_int8(w)))
    codes, absmax = bnb.quantize_nf4(w)
    if not double_quant:
        return {NF4: codes, ABSMAX: absmax}
    return {NF4: codes, **{k: jnp.asarray(v) for k, v in zip((ABSMAX_CODES, ABSMAX_SCALE, ABSMAX_OFFSET), bnb.quantize_absmax(absmax))}}


def quantize_matrix(w: Any, fmt: str = "nf4", double_quant: bool = False) -> dict[str, jax.Array]:
    """The quantized leaf group of an (in, out) weight, or of a stack (*lead, in, out) of them (each slice on its own,
    as layers stacked by a scan or routed experts are read)."""
    w = jnp.asarray(w)
    if w.ndim > 2:
        groups = [quantize_matrix(m, fmt, double_quant) for m in w.reshape(-1, *w.shape[-2:])]
        return {k: jnp.stack([g[k] for g in groups]).reshape(*w.shape[:-2], *groups[0][k].shape) for k in groups[0]}
    return quantize_weight(w.T, fmt, double_quant)


def dequantize(params: Mapping[str, Any], modules: Sequence[str] | None = None) -> dict:
    """A tree with float32 `kernel`s in place of the quantized groups (of `modules`, dotted names; default all)."""
    flat = tree.flatten(params)
    for name in quantized_modules(params) if modules is None else modules:
        module = tg.get_module(params, name)
        if not is_quantized(module):
            continue
        path = name.replace(".", "/")
        for k in leaves(module):
            del flat[f"{path}/{k}"]
        flat[f"{path}/{KERNEL}"] = jax.jit(weight)(module)
    return tree.unflatten(flat)


def float_shapes(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """{leaf path: shape} of the tree as `dequantize` would give it (a quantized group counts as its kernel)."""
    shapes = {p: tuple(np.shape(v)) for p, v in tree.flatten(params).items() if not is_quantized_leaf(p)}
    for name in quantized_modules(params):
        shapes[f"{name.replace('.', '/')}/{KERNEL}"] = weight_shape(tg.get_module(params, name))
    return shapes


def require_float(params: Mapping[str, Any], what: str) -> None:
    """An error naming the quantized modules when `what` (e.g. writing a checkpoint) needs float weights."""
    names = quantized_modules(params)
    if names:
        raise ValueError(f"{what} needs float weights, but {names[:4]}{' ...' if len(names) > 4 else ''} are quantized: "
                         "pass jpeft.quant.dequantize(params) (after lora.merge, if you want the adapter folded in)")


def check_frozen(mask: Mapping[str, Any]) -> None:
    """An error naming the quantized leaves a trainable mask marks True (codes never train: dequantize first)."""
    bad = sorted(p for p, m in tree.flatten(mask).items() if m and is_quantized_leaf(p))
    if bad:
        raise ValueError(f"quantized weights cannot be trained: {bad[:4]}{' ...' if len(bad) > 4 else ''} would be; train LoRA/IA3 "
                         "beside them, or quant.dequantize(params) first to fine-tune those weights in float")
