"""LoRA (with rsLoRA, rank/alpha patterns, PiSSA init) and DoRA: a layer's forward, merge and delta side by side.

`inject` adds `lora_a` (in, r), `lora_b` (r, out) and `lora_scale` () beside each targeted weight; the layer (`nn.dense`)
then computes x W + (dropout(x) A) B * scale, so training never materialises W + BA, and `merge` folds it in for export.
DoRA (`use_dora=True`) adds `lora_magnitude` (out,), initialised to ||W + scale A B|| per output as HF PEFT's
`lora_magnitude_vector`: the layer computes m / ||W + s A B|| * (x W + (x A) B s), the norm a constant to autodiff
(as HF PEFT and the DoRA paper treat it), and merging scales each output column of W + s A B by m / norm.

The norm is expanded as ||W_j||^2 + 2s (W^T A)_j . B_j + s^2 B_j^T (A^T A) B_j, which costs O(in out r) and no (in, out)
temporary beyond W itself (PEFT forms W + sBA every step). The DoRA product's backward pass scales W and B by m/n
instead of the (tokens, out) gradient; m's gradient needs z = x W + (x A) B s, which remat stores rather than
recomputes (the recomputation was most of DoRA's 1.25x over LoRA on the SmolLM2 shape).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from jpeft import leaves, nn, quant
from jpeft.methods import weights
from jpeft import targets as tg
from jpeft import tree

LEAVES = ("lora_a", "lora_b", "lora_scale")
MAGNITUDE = "lora_magnitude"  # DoRA's trainable per-output magnitude (PEFT's lora_magnitude_vector)
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """HF PEFT's LoraConfig, for the parts that shape the parameters."""

    r: int = 8
    alpha: float = 8.0
    target_modules: tg.Targets = ("q", "v")
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "default"  # "default" (A Kaiming-uniform, B zero), "gaussian", or "pissa"
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    modules_to_save: Sequence[str] = ()
    use_dora: bool = False

    def __post_init__(self):
        if self.r <= 0 or any(r <= 0 for r in self.rank_pattern.values()):
            raise ValueError(f"LoRA rank must be positive, got r={self.r}, rank_pattern={dict(self.rank_pattern)}")
        if self.alpha <= 0 or any(a <= 0 for a in self.alpha_pattern.values()):
            raise ValueError(f"LoRA alpha must be positive, got alpha={self.alpha}, alpha_pattern={dict(self.alpha_pattern)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in ("default", "gaussian", "pissa"):
            raise ValueError(f"unknown LoRA init {self.init!r}; choose 'default', 'gaussian' or 'pissa'")

    def rank_and_scale(self, name: str) -> tuple[int, float]:
        """(r, scale) of one module, after rank_pattern/alpha_pattern, as HF PEFT computes them."""
        rkey = tg.pattern_key(self.rank_pattern, name)
        akey = tg.pattern_key(self.alpha_pattern, name)
        r = self.rank_pattern[rkey] if rkey is not None else self.r
        alpha = self.alpha_pattern[akey] if akey is not None else self.alpha
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


def target_names(params: Mapping[str, Any], cfg: LoraConfig) -> list[str]:
    """Dotted names of the modules `cfg` targets (modules_to_save are excluded, as in HF PEFT)."""
    return weights.target_names(params, cfg.target_modules, cfg.modules_to_save)


def _init_pair(key, kernel, r, init):
    d_in, d_out = kernel.shape  # kernel: an array or a ShapeDtypeStruct
    if init == "default":  # torch's kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        a = nn.torch_uniform(key, (d_in, r), d_in)
    else:
        a = jax.random.normal(key, (d_in, r), jnp.float32) / r
    return a.astype(kernel.dtype), jnp.zeros((r, d_out), kernel.dtype)


def _pissa(kernel, r, scale):
    """PiSSA: A, B from the top-r singular triplets; the residual W - scale*AB stays frozen."""
    u, s, vt = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(s[:r] / scale)
    a, b = u[:, :r] * root, root[:, None] * vt[:r]
    return a, b, kernel.astype(jnp.float32) - scale * a @ b


def _new_leaves(cfg: LoraConfig, name: str, module: Params, key: jax.Array) -> Params:
    """One module's LoRA leaves (and PiSSA's residual `kernel`), as HF PEFT initialises them."""
    r, scale = cfg.rank_and_scale(name)
    out = {"lora_scale": jnp.asarray(scale, jnp.float32)}
    if cfg.init == "pissa":
        if quant.is_quantized(module):
            raise ValueError(f"PiSSA rewrites the base weight of {name}, which is quantized: inject PiSSA on the float base, then quantize")
        kernel = module["kernel"]
        a, b, residual = _pissa(kernel, r, scale)
        out.update(lora_a=a.astype(kernel.dtype), lora_b=b.astype(kernel.dtype), kernel=residual.astype(kernel.dtype))
    else:  # the weight's logical (in, out) shape and float dtype, whether it is a kernel or quantized
        weight = jax.ShapeDtypeStruct(quant.weight_shape(module), quant.weight_dtype(module))
        out["lora_a"], out["lora_b"] = _init_pair(key, weight, r, cfg.init)
    if cfg.use_dora:
        out[MAGNITUDE] = dora_weight_norm({**module, **out}).astype(quant.weight_dtype(module))
    return out


def inject(params: Mapping[str, Any], cfg: LoraConfig, key: jax.Array) -> dict:
    """A new tree with lora_a (in, r), lora_b (r, out) and lora_scale () beside each targeted kernel, and with
    `use_dora` DoRA's lora_magnitude (out,) = ||W + scale A B|| per output (HF PEFT's init)."""
    return weights.inject(params, target_names(params, cfg), functools.partial(_new_leaves, cfg), key)


def _delta(module: Mapping[str, Any]) -> jax.Array:
    a, b = module["lora_a"].astype(jnp.float32), module["lora_b"].astype(jnp.float32)
    if a.ndim == 3:
        raise ValueError("cannot merge stacked (multi-adapter) LoRA leaves; select one adapter first")
    return module["lora_scale"] * (a @ b)


def dora_norms(params: Mapping[str, Any]) -> dict[str, jax.Array]:
    """{module path: ||W + scale A B|| (out,)} of every DoRA module: what `unmerge` needs to undo a DoRA merge.

    PEFT caches the same norms in the module when it merges; the merged weight alone does not determine them.
    """
    flat = tree.flatten(params)
    modules = [p[: -len(f"/{MAGNITUDE}")] for p in flat if p.endswith(f"/{MAGNITUDE}")]
    flat = tree.flatten(quant.dequantize(params, [m.replace("/", ".") for m in modules])) if modules else flat
    # Formed, not expanded as nn.dora_weight_norm: PEFT's merge forms W + sBA too, and this runs once.
    return {m: jnp.linalg.norm(flat[f"{m}/kernel"].astype(jnp.float32) + _delta({leaf: flat[f"{m}/{leaf}"] for leaf in LEAVES}), axis=0)
            for m in modules}


def merge(params: Mapping[str, Any]) -> dict:
    """W + scale * A @ B accumulated in float32 (DoRA: each output column rescaled to its magnitude), LoRA leaves
    removed: a plain tree of the base's structure. A quantized W is dequantized first, so its merged module holds a
    float32 `kernel` (for export)."""
    return weights.merge(params, METHOD)


def unmerge(merged: Mapping[str, Any], adapter: Mapping[str, Any], norms: Mapping[str, jax.Array] | None = None) -> dict:
    """The inverse of `merge`: subtract scale * A @ B and put the adapter's LoRA leaves back.

    A DoRA module's merged weight is (m / n) (W + scale A B) with n = ||W + scale A B||, which W' and the adapter do
    not determine, so DoRA needs `norms`: `dora_norms(params)` taken before merging (PEFT caches them the same way).
    """
    for path in (p.rsplit("/", 1)[0] for p in tree.flatten(adapter) if p.endswith(f"/{MAGNITUDE}")):
        if norms is None or path not in norms:
            raise ValueError(f"unmerge: {path} is a DoRA module, whose merge cannot be undone from the merged weight alone; "
                             "pass norms=jpeft.lora.dora_norms(params) computed before merging")
    return weights.unmerge(merged, adapter, METHOD, norms)


# ----------------------------------------------------------------------------------------------
# The layer: forward, DoRA, and the weight merge adds


def delta(p: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """The low-rank update (nn.dropout(x) A) B * scale of a LoRA module (stacked adapters chosen by ctx.adapter_ids)."""
    return _undropped_delta(p, nn.dropout(ctx, x, ctx.lora_dropout), ctx)


def _undropped_delta(p: Params, h: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """(h A) B * scale for an input h that LoRA dropout has already been applied to."""
    a, b = p["lora_a"].astype(ctx.dtype), p["lora_b"].astype(ctx.dtype)
    scale = p["lora_scale"]
    if a.ndim == 3:
        # Stacked adapters (n, in, r): each batch row gathers its own A, B and scale.
        ids = ctx.adapter_ids
        if ids is None:
            raise ValueError(f"stacked LoRA leaves ({a.shape[0]} adapters) need adapter_ids (batch,) choosing each row's adapter")
        # Out-of-range ids would clamp or wrap to another adapter; under jit they cannot raise, so they give NaN.
        valid = (ids >= 0) & (ids < a.shape[0])
        a, b, scale = a[ids], b[ids], jnp.where(valid, scale[ids], jnp.nan)
        lead = (slice(None),) + (None,) * (h.ndim - 2)
        # (h A) B in two contractions, the order of the single-adapter path, so a row's result matches it.
        hr = nn.einsum("b...i,bir->b...r", h, a)
        return nn.einsum("b...r,bro->b...o", hr, b) * scale[lead + (None,)].astype(ctx.dtype)
    lead = h.shape[:-1]
    out = low_rank(h.reshape(-1, h.shape[-1]), a, b, scale.astype(ctx.dtype))
    return out.reshape(*lead, out.shape[-1])


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """(x a) b * scale for x (N, in): autodiff's backward on a GPU, `_low_rank`'s hand-written one for the CPU."""
    if nn.gpu_kernels():
        return nn.matmul(nn.matmul(x, a), b) * scale
    return _low_rank(x, a, b, scale)


@jax.custom_vjp
def _low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """(x a) b * scale for x (N, in), with a backward pass that never transposes an (N, out) array.

    Autodiff contracts over the N rows for the gradients of `a` and `b`, and XLA's CPU layout choice
    was to transpose the incoming (N, out) gradient for that (a strided copy that cost more than the
    frozen matmul itself). Here the two N-contractions take the small (N, r) operand transposed instead.
    """
    return nn.matmul(nn.matmul(x, a), b) * scale


def _low_rank_fwd(x, a, b, scale):
    h = nn.keep(nn.matmul(x, a))  # (N, r): under remat, storing it costs ~1 MB a layer and saves a skinny, slow matmul
    return nn.matmul(h, b) * scale, (x, h, a, b, scale)


def _low_rank_bwd(res, g):
    x, h, a, b, scale = res
    g_h = nn.matmul(g, b.T * scale)  # (N, r)
    # Explicit (r, N) transposes for the two N-contractions. Without the barrier XLA folds them into
    # transposed-operand dots: no large copy either way, but ~2% more CPU time on the SmolLM2 step.
    g_hT, hT = jax.lax.optimization_barrier((g_h.T, h.T))  # (r, N) each
    ht_g = nn.matmul(hT, g)  # (r, out)
    g_a = nn.matmul(g_hT, x).T  # (in, r)
    return nn.matmul(g_h, a.T), g_a, ht_g * scale, jnp.sum(ht_g * b).astype(scale.dtype)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def dora(p: Params, x: jax.Array, ctx: nn.Ctx) -> jax.Array:
    """HF PEFT's DoRA output (bias excluded): (m / ||W + sAB||) (x W + (x A) B s), the norm a constant to autodiff.

    With LoRA dropout active PEFT feeds the dropped input to the whole DoRA term, so the frozen product is
    recomputed on it: x W + (m/n - 1) (x' W) + (m/n) (x' A) B s, x' = nn.dropout(x), as here.
    """
    if p["lora_a"].ndim == 3:
        raise ValueError("DoRA (lora_magnitude) cannot run stacked adapters: each row would need its own weight norm; attach one adapter at a time")
    norm = jax.lax.stop_gradient(dora_weight_norm(p))  # a constant to autodiff, as in PEFT (DoRA paper, section 4.3)
    # (out,): stored under remat, so the backward pass does not recompute the norm's O(in out r) products.
    mag_norm_scale = nn.keep((p["lora_magnitude"].astype(jnp.float32) / norm).astype(ctx.dtype))
    h = nn.dropout(ctx, x, ctx.lora_dropout)
    if h is not x:  # m/n's gradient needs x' W: stored under remat rather than recomputed (a frozen matmul)
        return (nn.frozen_product(p, x, ctx) + (mag_norm_scale - 1) * nn.keep(nn.frozen_product(p, h, ctx))
                + mag_norm_scale * _undropped_delta(p, h, ctx))
    # No dropout: PEFT's y + (m/n - 1) y + (m/n) delta, in one product.
    fmt, frozen = nn.frozen_weight(p, ctx.dtype)
    a, b, scale = p["lora_a"].astype(ctx.dtype), p["lora_b"].astype(ctx.dtype), p["lora_scale"].astype(ctx.dtype)
    out = dora_product(fmt, x.reshape(-1, x.shape[-1]), frozen, a, b, scale, mag_norm_scale)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def dora_product(fmt: str | None, x: jax.Array, frozen: jax.Array | Params, a: jax.Array, b: jax.Array, scale: jax.Array,
                 mag_norm_scale: jax.Array) -> jax.Array:
    """(m/n) (x W + (x a) b scale) for x (N, in), W the kernel (fmt None) or a quantized group of format `fmt`.

    Autodiff would pass the frozen matmul's and the low-rank path's backward g (m/n), one more (N, out)
    pass; here m/n scales the (in, out) W and the (r, out) b instead. The sum z = x W + (x a) b scale is
    the residual m/n's gradient needs: tagged by `keep`, so remat stores it instead of recomputing x W.
    """
    return _dora_product_fwd(fmt, x, frozen, a, b, scale, mag_norm_scale)[0]


def _dora_product_fwd(fmt, x, frozen, a, b, scale, mag_norm_scale):
    h = nn.keep(nn.matmul(x, a))  # (N, r), as in `low_rank`
    y = nn.matmul(x, frozen) if fmt is None else nn.quantized_matmul(fmt, x, frozen)
    z = nn.keep(y + nn.matmul(h, b) * scale)
    return mag_norm_scale * z, (x, frozen, h, a, b, scale, mag_norm_scale, z)


def _dora_product_bwd(fmt, res, g):
    x, frozen, h, a, b, scale, mag_norm_scale, z = res
    col = mag_norm_scale * scale  # (out,)
    g_h = nn.matmul(g, (b * col).T)  # (N, r)
    g_hT, hT = jax.lax.optimization_barrier((g_h.T, h.T))  # (r, N) each, as in `low_rank`
    ht_g = nn.matmul(hT, g)  # (r, out)
    if fmt is None:
        g_x, g_frozen = nn.matmul(g, (frozen * mag_norm_scale).T), nn.matmul(x.T, g * mag_norm_scale)  # XLA drops g_frozen when W is frozen
    else:
        group, g = jax.lax.optimization_barrier((frozen, g))  # W dequantized once g exists, as in `quantized_matmul`
        g_x, g_frozen = nn.matmul(g, quant.unpack(fmt, group).astype(g.dtype) * mag_norm_scale[:, None]), None
    g_x = g_x + nn.matmul(g_h, a.T)
    g_scale = jnp.sum(ht_g * b * mag_norm_scale).astype(scale.dtype)
    return g_x, g_frozen, nn.matmul(g_hT, x).T, ht_g * col, g_scale, jnp.sum(g * z, axis=0)


dora_product.defvjp(_dora_product_fwd, _dora_product_bwd)


def dora_weight_norm(p: Params) -> jax.Array:
    """||W + s A B|| over the input dim, per output (out,), float32, without forming W + sAB (see module docstring)."""
    hi = jax.lax.Precision.HIGHEST
    a, b = p["lora_a"].astype(jnp.float32), p["lora_b"].astype(jnp.float32)
    s = p["lora_scale"].astype(jnp.float32)
    fmt = quant.format_of(p)
    if fmt is None:
        w = p["kernel"].astype(jnp.float32)  # (in, out)
        squares, wa = jnp.sum(w * w, axis=0), jnp.matmul(a.T, w, precision=hi)  # (out,), (r, out)
    else:
        w = quant.unpack(fmt, quant.leaves(p))  # (out, in), dequantized here as in the matmul
        squares, wa = jnp.sum(w * w, axis=1), jnp.matmul(w, a, precision=hi).T
    gram_b = jnp.matmul(jnp.matmul(a.T, a, precision=hi), b, precision=hi)  # (r, out)
    total = squares + 2 * s * jnp.sum(wa * b, axis=0) + s * s * jnp.sum(gram_b * b, axis=0)
    return jnp.sqrt(jnp.maximum(total, 0.0))


def _product(p: Params, x: jax.Array, inner: Any, ctx: nn.Ctx) -> jax.Array:
    """x W' of a LoRA (or DoRA) module, given the product of x with the weight it adapts."""
    return dora(p, x, ctx) if MAGNITUDE in p else inner(x) + delta(p, x, ctx)


def _merged(p: Params, w: jax.Array) -> jax.Array:
    """W + s A B, or DoRA's (m / ||W + s A B||) (W + s A B) per output column (float32)."""
    merged = w + _delta(p)
    if MAGNITUDE in p:
        merged = merged * (p[MAGNITUDE].astype(jnp.float32) / jnp.linalg.norm(merged, axis=0))
    return merged


def _unmerged(p: Params, w: jax.Array, norm: jax.Array | None) -> jax.Array:
    """W from W' = `_merged(p, W)`; DoRA needs ||W + s A B|| (`norm`), which W' does not determine."""
    if MAGNITUDE in p:
        w = w * (norm.astype(jnp.float32) / p[MAGNITUDE].astype(jnp.float32))
    return w - _delta(p)


METHOD = leaves.declare(leaves.Method(
    name="lora", label="LoRA", peft_type="LORA", markers=("lora_a",), config=LoraConfig, init=_new_leaves,
    leaves=(leaves.Leaf("lora_a", (leaves.IN, None), peft="lora_A.weight"),
            leaves.Leaf("lora_b", (None, leaves.OUT), peft="lora_B.weight"),
            leaves.Leaf("lora_scale", (), trainable=False),
            leaves.Leaf(MAGNITUDE, (leaves.OUT,), peft="lora_magnitude_vector")),
    product=_product, merge=_merged, unmerge=_unmerged))
