"""Layer primitives shared by the models: every PEFT method plugs in here.

A layer's parameters are a plain dict. A dense layer is `{"kernel": (in, out)}`, and PEFT methods
add leaves beside the kernel that `dense` picks up when present:

- `lora_a` (in, r), `lora_b` (r, out), `lora_scale` ()  ->  x W + (dropout(x) A) B * scale
- `lora_magnitude` (out,) beside them (DoRA)             ->  m / ||W + scale A B|| * (x W + (x A) B * scale)
- `ia3_in` (in,)                                        ->  (x * l) W          (feed-forward modules)
- `ia3_out` (out,)                                      ->  (x W) * l
- `bias` (out,)                                         ->  x W + b
- LoHa `loha_w1_b`, `loha_w2_b` (in, r), `loha_w1_a`, `loha_w2_a` (r, out), `loha_scale` ()
                                  ->  x W + x ((B1 A1) * (B2 A2)) * scale   (elementwise product of two rank-r products)
- LoKr `lokr_w1` (c, a) or `lokr_w1_b` (c, r) `lokr_w1_a` (r, a); `lokr_w2` (d, b) or `lokr_w2_b` (d, r) `lokr_w2_a`
  (r, b); `lokr_scale` ()         ->  x W + x kron(W1, W2) * scale          (in = c d, out = a b)

Each LoHa / LoKr leaf is HF PEFT's tensor of the same name (`hada_*`, `lokr_*`) transposed to jpeft's (in, out)
orientation, so `*_b` meets the input first, as PEFT's `x @ (w_a @ w_b).T` does.

so the low-rank path is fused into the same jitted computation as the frozen matmul and
`W + BA` is never materialised during training; nor is LoKr's Kronecker product, nor LoHa's update while its
rank-r^2 factors are the smaller form (see `loha_delta`). DoRA's per-output norm ||W + sAB|| (treated as a constant,
as HF PEFT and the DoRA paper do) is expanded as ||W_j||^2 + 2s (W^T A)_j . B_j + s^2 B_j^T (A^T A) B_j, which
costs O(in out r) and no (in, out) temporary beyond W itself; PEFT forms W + sBA every step. The DoRA product runs
through `dora_product`, whose backward pass scales W and B by m/n instead of the (tokens, out) gradient; m's
gradient needs z = x W + (x A) B s, which remat stores (one (tokens, out) array per DoRA module) rather than
recompute x W for it (the recomputation was most of DoRA's 1.25x over LoRA on the SmolLM2 shape).

The frozen weight may instead be a quantized leaf group in PyTorch's (out, in) row layout (`jpeft.quant`):
`kernel_nf4` + `kernel_absmax` (NF4, or `kernel_absmax_q/_scale/_offset` when double-quantized), `kernel_int8`
+ `kernel_absmax`, or GGUF blocks `kernel_q4_0`, `kernel_q4_1`, `kernel_q5_0`, `kernel_q8_0`, `kernel_q4_k`,
`kernel_q6_k`. `dense` dequantizes it inside the matmul and again in the backward pass, so neither the
forward-to-backward residuals nor remat ever hold a float copy of it; the PEFT leaves apply unchanged.

Kernels by backend (`KERNELS`, read at trace time): the hand-tuned paths here (attention's custom backward and
query blocks, `matmul`'s float32 accumulation, `low_rank`'s backward) answer XLA's CPU backend. On a GPU the
attention goes through `jax.nn.dot_product_attention` instead (cuDNN flash attention where it applies), and the
matmuls and the low-rank update are plain products left to XLA's GPU compiler and autodiff. Long rows
(`FLASH_MIN_LEN` tokens on) train on the CPU path through `flash_attention`, blockwise, which holds no (T, S) array.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jpeft import quant, tree

Params = dict[str, Any]

KERNELS: str = os.environ.get("JPEFT_KERNELS", "auto")
"""Which code paths the ops trace: "auto" (the GPU path when `jax.default_backend()`, or the device of a
`jax.default_device` scope, is a GPU), "gpu" (the GPU path on any backend: how CPU tests check its numerics), or
"cpu" (the CPU-tuned paths on any backend). Read when a function is traced: set it before the first call of a jitted
function (or through the JPEFT_KERNELS environment variable)."""

CUDNN_ATTENTION: bool = os.environ.get("JPEFT_CUDNN_ATTENTION", "1") != "0"
"""On a CUDA GPU, let `jax.nn.dot_product_attention` use cuDNN's flash attention where it supports the call (False, or
JPEFT_CUDNN_ATTENTION=0: XLA's implementation everywhere)."""

_GPU_DTYPES = (jnp.bfloat16, jnp.float16)  # the dtypes cuDNN's flash attention takes


def _platform() -> str:
    """The platform computations are traced for: a `jax.default_device` scope's, else the default backend's."""
    device = getattr(jax.config, "jax_default_device", None)
    if isinstance(device, str):
        return device
    return device.platform if device is not None else jax.default_backend()


def gpu_kernels() -> bool:
    """Whether the ops trace their GPU path (see `KERNELS`)."""
    if KERNELS not in ("auto", "gpu", "cpu"):
        raise ValueError(f"jpeft.nn.KERNELS (or JPEFT_KERNELS) must be 'auto', 'gpu' or 'cpu', got {KERNELS!r}")
    return KERNELS == "gpu" or (KERNELS == "auto" and _platform() in ("gpu", "cuda", "rocm"))


@dataclasses.dataclass
class Ctx:
    """Per-call settings threaded through a forward pass: compute dtype and dropout randomness.

    `rng=None` means deterministic (no dropout anywhere). Keys are drawn in call order, which is
    fixed by the model's code, so a traced forward pass always uses the same key for the same site.
    """

    dtype: Any = jnp.float32
    rng: jax.Array | None = None
    dropout_rate: float = 0.0
    lora_dropout: float = 0.0
    adapter_ids: jax.Array | None = None  # (batch,) row -> adapter index for stacked LoRA leaves
    remat: bool = False  # recompute each layer's activations in the backward pass instead of storing them
    _count: int = 0

    @property
    def deterministic(self) -> bool:
        return self.rng is None

    def next_key(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self.rng, self._count)

    def part(self, i) -> "Ctx":
        """The context for part i of a repeated computation (a chunk of rows): its own key stream, drawn from this one."""
        return self if self.rng is None else dataclasses.replace(self, rng=jax.random.fold_in(self.next_key(), i), _count=0)


_ROWS: list[Any] = []  # while a sharded train step traces: how activations split along their leading (row) axis


@contextlib.contextmanager
def rows_sharded(sharding: Any) -> Iterator[None]:
    """Within: every layer's input and output keep `sharding` (the batch's: rows over the data axes), so fully sharded
    data parallelism gathers each layer's weights rather than the activations. Left to itself, GSPMD split the
    activations along the hidden dim that the weights' FSDP spec splits, whole batch on every device (Llama, fsdp=8:
    7.7x the activations a device needs)."""
    _ROWS.append(sharding)
    try:
        yield
    finally:
        _ROWS.pop()


def keep_rows_sharded(x: jax.Array) -> jax.Array:
    """x constrained to the row sharding of `rows_sharded`, or as is outside one."""
    return jax.lax.with_sharding_constraint(x, _ROWS[-1]) if _ROWS else x


def run_layers(layer: Callable[[Params, jax.Array, Ctx], jax.Array], x: jax.Array, layers: list[Params], ctx: Ctx) -> jax.Array:
    """x through `layer(params_i, x, ctx_i)` for each layer in order.

    With `ctx.remat`, layers of identical parameter shapes run as one `lax.scan` over the layer index with
    the body rematerialised: the backward pass recomputes one layer at a time, so the stored activations
    shrink from every intermediate of every layer to each layer's input and the values tagged with `keep`,
    and one body compiles instead of N. Otherwise (or when layers differ,
    e.g. under a LoRA rank_pattern) a plain loop runs. Layers holding quantized weights scan even without
    remat: in an unrolled loop XLA's CPU scheduler dequantized every layer's weights up front and kept them
    until the backward pass; in a scan, one layer's dequantized weights exist at a time.
    """
    signature = lambda p: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), p)  # noqa: E731
    quantized = any(quant.is_quantized_leaf(path) for path in tree.flatten(layers[0])) if layers else False
    x = keep_rows_sharded(x)
    if not (ctx.remat or quantized) or any(signature(p) != signature(layers[0]) for p in layers[1:]):
        for i, p in enumerate(layers):
            x = keep_rows_sharded(layer(p, x, _layer_ctx(ctx, i)))
        return x

    def body(x, i):
        # Layer i's parameters picked by a switch rather than sliced from a stack: stacking copied every layer's
        # frozen weights into one temporary per step (SmolLM2: 424 MB of the step's 1.98 GB).
        p = jax.lax.switch(i, [lambda p=p: p for p in layers])
        return keep_rows_sharded(layer(p, x, _layer_ctx(ctx, i))), None

    if ctx.remat:  # inside scan, CSE cannot undo the recomputation; values tagged by `keep` are stored, not recomputed
        body = jax.checkpoint(body, prevent_cse=False, policy=jax.checkpoint_policies.save_only_these_names(_KEPT))
    return jax.lax.scan(body, x, jnp.arange(len(layers)))[0]


_KEPT = "kept"  # the checkpoint name `keep` tags


def keep(x: jax.Array) -> jax.Array:
    """Tag an activation to be stored rather than recomputed under `remat` (worth it for costly, mid-sized values)."""
    return checkpoint_name(x, _KEPT)


def _layer_ctx(ctx: Ctx, i) -> Ctx:
    """The context for layer i: its own dropout key stream (the same whether the layers loop or scan)."""
    return dataclasses.replace(ctx, rng=None if ctx.rng is None else jax.random.fold_in(ctx.rng, i), _count=0)


_DRAWS = 2**16  # values of one 16-bit draw


def dropout(ctx: Ctx, x: jax.Array, rate: float | None = None) -> jax.Array:
    """Inverted dropout; identity when deterministic or the rate is zero.

    Each element compares a 16-bit draw, two per 32-bit word, with the rate rounded to a multiple of
    2^-16 (0.05 -> 3277/65536 = 0.0500031), and survivors are scaled by the inverse of the rounded keep
    rate, so the expectation is exact. Drawing bits is the cost of dropout on CPU (`_random_words`).
    """
    rate = ctx.dropout_rate if rate is None else rate
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if ctx.deterministic or rate == 0.0:
        return x
    drop = round(rate * _DRAWS)
    if drop == _DRAWS:
        raise ValueError(f"dropout rate {rate} rounds to 1 at the 2^-16 resolution of the draws; use a rate below {1 - 1 / _DRAWS}")
    n = math.prod(x.shape)
    words = _random_words(ctx.next_key(), (n + 1) // 2)
    draws = jnp.stack([words & (_DRAWS - 1), words >> 16], axis=-1).reshape(-1)[:n].reshape(x.shape)
    return jnp.where(draws >= drop, x * (_DRAWS / (_DRAWS - drop)), 0).astype(x.dtype)


def _random_words(key: jax.Array, n: int) -> jax.Array:
    """n uint32 words from XLA's own threefry (`RngBitGenerator`) keyed by `key`'s data.

    `jax.random.bits` builds threefry out of HLO integer ops; XLA's generator computes the same kind of stream
    5-6x faster on CPU (4M words: 9 vs 53 ms). A SmolLM2 step with LoRA dropout 0.05 on all seven projections
    draws ~350M 16-bit values: dropout cost 32% of that step with `jax.random.bits`, 19% with this.
    """
    data = jax.random.key_data(key).reshape(-1)
    seed = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])[:4]  # the generator takes a 4-word key
    return jax.lax.rng_bit_generator(seed, (n,), jnp.uint32, algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)[1]


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x @ w accumulated in float32, returned in the operands' dtype.

    XLA's CPU backend has bf16 dot kernels only for a float32 result (twice the float32 rate here): for
    bf16 x bf16 -> bf16 it converts both operands to float32 first, and bf16 ran no faster than float32.
    For float32 operands, and on a GPU (whose bf16 kernels accumulate in float32 anyway), this is plain x @ w.
    """
    if gpu_kernels():
        return jnp.matmul(x, w)
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))


def _einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`matmul`'s precision and dtype for an einsum of two operands."""
    if gpu_kernels():
        return jnp.einsum(spec, x, w)
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))


def lora_delta(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    """The low-rank update (dropout(x) A) B * scale of a LoRA module (stacked adapters chosen by ctx.adapter_ids)."""
    return _undropped_delta(p, dropout(ctx, x, ctx.lora_dropout), ctx)


def _undropped_delta(p: Params, h: jax.Array, ctx: Ctx) -> jax.Array:
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
        hr = _einsum("b...i,bir->b...r", h, a)
        return _einsum("b...r,bro->b...o", hr, b) * scale[lead + (None,)].astype(ctx.dtype)
    lead = h.shape[:-1]
    out = low_rank(h.reshape(-1, h.shape[-1]), a, b, scale.astype(ctx.dtype))
    return out.reshape(*lead, out.shape[-1])


def low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """(x a) b * scale for x (N, in): autodiff's backward on a GPU, `_low_rank`'s hand-written one for the CPU."""
    if gpu_kernels():
        return matmul(matmul(x, a), b) * scale
    return _low_rank(x, a, b, scale)


@jax.custom_vjp
def _low_rank(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """(x a) b * scale for x (N, in), with a backward pass that never transposes an (N, out) array.

    Autodiff contracts over the N rows for the gradients of `a` and `b`, and XLA's CPU layout choice
    was to transpose the incoming (N, out) gradient for that (a strided copy that cost more than the
    frozen matmul itself). Here the two N-contractions take the small (N, r) operand transposed instead.
    """
    return matmul(matmul(x, a), b) * scale


def _low_rank_fwd(x, a, b, scale):
    h = keep(matmul(x, a))  # (N, r): under remat, storing it costs ~1 MB a layer and saves a skinny, slow matmul
    return matmul(h, b) * scale, (x, h, a, b, scale)


def _low_rank_bwd(res, g):
    x, h, a, b, scale = res
    g_h = matmul(g, b.T * scale)  # (N, r)
    # Explicit (r, N) transposes for the two N-contractions. Without the barrier XLA folds them into
    # transposed-operand dots: no large copy either way, but ~2% more CPU time on the SmolLM2 step.
    g_hT, hT = jax.lax.optimization_barrier((g_h.T, h.T))  # (r, N) each
    ht_g = matmul(hT, g)  # (r, out)
    g_a = matmul(g_hT, x).T  # (in, r)
    return matmul(g_h, a.T), g_a, ht_g * scale, jnp.sum(ht_g * b).astype(scale.dtype)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


def _hadamard_factors(b1: jax.Array, a1: jax.Array, b2: jax.Array, a2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(in, r1 r2), (r1 r2, out) whose product is (b1 a1) * (b2 a2): the rows' and the columns' Khatri-Rao products."""
    (d_in, r1), (r2, d_out) = b1.shape, a2.shape
    left = (b1[:, :, None] * b2[:, None, :]).reshape(d_in, r1 * r2)
    right = (a1[:, None, :] * a2[None, :, :]).reshape(r1 * r2, d_out)
    return left, right


def loha_weight(p: Params, dtype: Any = jnp.float32) -> jax.Array:
    """LoHa's update as an (in, out) matrix: ((B1 A1) * (B2 A2)) * scale, HF PEFT's `make_weight` transposed."""
    b1, a1, b2, a2 = (p[k].astype(dtype) for k in ("loha_w1_b", "loha_w1_a", "loha_w2_b", "loha_w2_a"))
    return (matmul(b1, a1) * matmul(b2, a2)) * p["loha_scale"].astype(dtype)


def loha_delta(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    """x times LoHa's update, through its rank-r^2 factors when they are smaller than the (in, out) matrix.

    (B1 A1) * (B2 A2) = KR(B1, B2) KR(A1, A2) exactly, so per token the factored form costs r^2 (in + out)
    multiply-adds against in * out for the matrix PEFT builds (r = 8 on 576 x 576: 74k against 332k).
    """
    b1, a1, b2, a2 = (p[k].astype(ctx.dtype) for k in ("loha_w1_b", "loha_w1_a", "loha_w2_b", "loha_w2_a"))
    scale = p["loha_scale"].astype(ctx.dtype)
    (d_in, r1), (r2, d_out) = b1.shape, a2.shape
    if r1 * r2 * (d_in + d_out) >= d_in * d_out:
        return matmul(x, loha_weight(p, ctx.dtype))
    left, right = _hadamard_factors(b1, a1, b2, a2)
    return matmul(matmul(x, left), right) * scale


def _lokr_factor(p: Params, name: str, dtype: Any) -> jax.Array:
    """One Kronecker factor (rows from the input side): stored whole, or as its low-rank pair b @ a."""
    if f"lokr_{name}" in p:
        return p[f"lokr_{name}"].astype(dtype)
    return matmul(p[f"lokr_{name}_b"].astype(dtype), p[f"lokr_{name}_a"].astype(dtype))


def lokr_weight(p: Params, dtype: Any = jnp.float32) -> jax.Array:
    """LoKr's update as an (in, out) matrix: kron(W1, W2) * scale, HF PEFT's `make_kron` transposed."""
    return jnp.kron(_lokr_factor(p, "w1", dtype), _lokr_factor(p, "w2", dtype)) * p["lokr_scale"].astype(dtype)


def lokr_delta(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    """x kron(W1, W2) * scale without the Kronecker product: x as (..., c, d) meets W1 (c, a) and W2 (d, b) in turn.

    Per token that is in * b + c * out (or in * a + d * out, whichever order is cheaper) multiply-adds
    instead of in * out: 576 x 576 factored 24 x 24 costs 28k against 332k.
    """
    w1, w2 = _lokr_factor(p, "w1", ctx.dtype), _lokr_factor(p, "w2", ctx.dtype)
    (c, a), (d, b) = w1.shape, w2.shape
    xs = x.reshape(*x.shape[:-1], c, d)
    if c * d * b + c * b * a <= c * d * a + a * d * b:  # contract the input's fast axis (d) first
        y = _einsum("...kj,ki->...ij", _einsum("...kl,lj->...kj", xs, w2), w1)
    else:
        y = _einsum("...il,lj->...ij", _einsum("...kl,ki->...il", xs, w1), w2)
    return y.reshape(*x.shape[:-1], a * b) * p["lokr_scale"].astype(ctx.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def quantized_matmul(fmt: str, x: jax.Array, group: Params) -> jax.Array:
    """x (..., in) @ W for a quantized leaf group of format `fmt`, W dequantized here; codes get no gradient."""
    # W depends only on the codes, so XLA is free to dequantize every layer up front and hold them all (its CPU
    # scheduler did, in an unrolled loop of layers); the barrier ties W to x where XLA keeps barriers.
    group, x = jax.lax.optimization_barrier((group, x))
    return _einsum("...i,oi->...o", x, quant.unpack(fmt, group).astype(x.dtype))


def _quantized_matmul_fwd(fmt, x, group):
    return quantized_matmul(fmt, x, group), group  # the codes, not W: W would be a float copy of the layer held for backward


def _quantized_matmul_bwd(fmt, group, g):
    # W again, from the codes, once g exists. The barriers only order work where XLA keeps them (its CPU pipeline
    # drops them before scheduling); what bounds memory is that `run_layers` scans quantized layers, so each
    # dequantization lives in its own layer's loop body, forward or backward, and no two layers' W coexist.
    group, g = jax.lax.optimization_barrier((group, g))
    return matmul(g, quant.unpack(fmt, group).astype(g.dtype)), None


quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


def _frozen_matmul(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    """x @ W for the module's kernel or quantized group, no bias."""
    fmt = quant.format_of(p)
    return matmul(x, p["kernel"].astype(ctx.dtype)) if fmt is None else quantized_matmul(fmt, x, quant.leaves(p))


def dense(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    """x @ kernel (or its quantized group, dequantized), plus whichever PEFT leaves sit beside it (see module docstring)."""
    x = x.astype(ctx.dtype)
    if "ia3_in" in p:
        x = x * p["ia3_in"].astype(ctx.dtype)
    if "lora_magnitude" in p:
        y = dora(p, x, ctx)
        if "bias" in p:
            y = y + p["bias"].astype(ctx.dtype)
    else:
        y = _frozen_matmul(p, x, ctx)
        if "bias" in p:
            y = y + p["bias"].astype(ctx.dtype)
        if "lora_a" in p:
            y = y + lora_delta(p, x, ctx)
    if "loha_scale" in p:
        y = y + loha_delta(p, x, ctx)
    if "lokr_scale" in p:
        y = y + lokr_delta(p, x, ctx)
    if "ia3_out" in p:
        y = y * p["ia3_out"].astype(ctx.dtype)
    return y


def dora(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    """HF PEFT's DoRA output (bias excluded): (m / ||W + sAB||) (x W + (x A) B s), the norm a constant to autodiff.

    With LoRA dropout active PEFT feeds the dropped input to the whole DoRA term, so the frozen product is
    recomputed on it: x W + (m/n - 1) (x' W) + (m/n) (x' A) B s, x' = dropout(x), as here.
    """
    if p["lora_a"].ndim == 3:
        raise ValueError("DoRA (lora_magnitude) cannot run stacked adapters: each row would need its own weight norm; attach one adapter at a time")
    norm = jax.lax.stop_gradient(dora_weight_norm(p))  # a constant to autodiff, as in PEFT (DoRA paper, section 4.3)
    # (out,): stored under remat, so the backward pass does not recompute the norm's O(in out r) products.
    mag_norm_scale = keep((p["lora_magnitude"].astype(jnp.float32) / norm).astype(ctx.dtype))
    h = dropout(ctx, x, ctx.lora_dropout)
    if h is not x:  # m/n's gradient needs x' W: stored under remat rather than recomputed (a frozen matmul)
        return (_frozen_matmul(p, x, ctx) + (mag_norm_scale - 1) * keep(_frozen_matmul(p, h, ctx))
                + mag_norm_scale * _undropped_delta(p, h, ctx))
    # No dropout: PEFT's y + (m/n - 1) y + (m/n) delta, in one product.
    fmt = quant.format_of(p)
    frozen = p["kernel"].astype(ctx.dtype) if fmt is None else quant.leaves(p)
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
    h = keep(matmul(x, a))  # (N, r), as in `low_rank`
    y = matmul(x, frozen) if fmt is None else quantized_matmul(fmt, x, frozen)
    z = keep(y + matmul(h, b) * scale)
    return mag_norm_scale * z, (x, frozen, h, a, b, scale, mag_norm_scale, z)


def _dora_product_bwd(fmt, res, g):
    x, frozen, h, a, b, scale, mag_norm_scale, z = res
    col = mag_norm_scale * scale  # (out,)
    g_h = matmul(g, (b * col).T)  # (N, r)
    g_hT, hT = jax.lax.optimization_barrier((g_h.T, h.T))  # (r, N) each, as in `low_rank`
    ht_g = matmul(hT, g)  # (r, out)
    if fmt is None:
        g_x, g_frozen = matmul(g, (frozen * mag_norm_scale).T), matmul(x.T, g * mag_norm_scale)  # XLA drops g_frozen when W is frozen
    else:
        group, g = jax.lax.optimization_barrier((frozen, g))  # W dequantized once g exists, as in `quantized_matmul`
        g_x, g_frozen = matmul(g, quant.unpack(fmt, group).astype(g.dtype) * mag_norm_scale[:, None]), None
    g_x = g_x + matmul(g_h, a.T)
    g_scale = jnp.sum(ht_g * b * mag_norm_scale).astype(scale.dtype)
    return g_x, g_frozen, matmul(g_hT, x).T, ht_g * col, g_scale, jnp.sum(g * z, axis=0)


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


def rms_norm(weight: jax.Array, x: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """RMS norm with the statistics in float32 (T5LayerNorm / LlamaRMSNorm)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(dtype) * x32.astype(dtype)


def gelu_new(x: jax.Array) -> jax.Array:
    """The tanh approximation of GELU (transformers' `gelu_new` / `gelu_pytorch_tanh`)."""
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by its transformers name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; jpeft knows {sorted(ACTIVATIONS)}") from None


def adapter(p: Params | None, h: jax.Array, ctx: Ctx) -> jax.Array:
    """Bottleneck adapter on a sub-layer's output: h + up(act(down(h))); identity when absent."""
    if p is None:
        return h
    return h + dense(p["up"], jax.nn.relu(dense(p["down"], h, ctx)), ctx)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """(B, T) segment ids (0 = padding) -> (B, T) int32 positions counted from each segment's first token."""
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(new, index, 0), axis=1)
    return jnp.where(segment_ids > 0, index - start, 0)


def attention_bias_from_mask(mask: jax.Array) -> jax.Array:
    """(batch, ..., keys) of 0/1 -> additive float32 bias: 0 where attended, finfo.min where not."""
    return jnp.where(mask.astype(bool), 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, ctx: Ctx, softcap: float | None = None) -> jax.Array:
    """Softmax attention of grouped queries; q (B, KV, G, T, E), k and v (B, KV, S, E) -> (B, KV, G, T, E).

    `mask` broadcasts to the (B, KV, G, T, S) scores: boolean visibility, or a float additive bias
    (T5's position bias), which receives its gradient. Scores and values are batched matmuls over
    (B, KV) with the G query heads of a key/value head stacked as rows, so GQA never copies K or V.
    Softmax runs in float32; the probabilities are cast back to q's dtype for the value product.
    `softcap` (Gemma 2) squashes the scaled scores to softcap * tanh(scores / softcap) before the mask;
    its gradient comes from autodiff rather than the hand-written backward pass. On the GPU path (`KERNELS`) a call
    without softcap or attention dropout goes through `jax.nn.dot_product_attention` (`dot_product_attention`).
    """
    if _plain(ctx, softcap):
        return dot_product_attention(q, k, v, mask, scale) if gpu_kernels() else _attention(q, k, v, mask, scale)
    return _values(dropout(ctx, _attention_probs(q, k, mask, scale, softcap)), v, q.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array | Visibility, scale: float, ctx: Ctx, chunk: int = 128,
                     softcap: float | None = None, block: int | None = None) -> jax.Array:
    """`attention` for T queries at the last T of S key positions under a causal `visible` (no key after its query);
    the S - T keys before them (a prefix, see `prefixed`) are visible to every query.

    `visible` is a boolean mask or a `Visibility`; with the latter, rows of `FLASH_MIN_LEN` queries or more run
    `flash_attention` on the CPU path (unless attention dropout is on) in blocks of `block` (default `FLASH_BLOCK`),
    which never forms the (T, S) mask or scores.

    Queries run in blocks of about `chunk` rows, each against only the keys up to its last row, which
    skips most of the score matrix's masked upper triangle (~40% less attention work at 448 tokens). On the GPU path
    the blocks are left to cuDNN's causal kernel, which skips the masked tiles itself (`dot_product_attention`).
    """
    T, past = q.shape[3], k.shape[2] - q.shape[3]
    if isinstance(visible, Visibility):
        if T >= FLASH_MIN_LEN and not gpu_kernels() and _plain(ctx, None):
            return flash_attention(q, k, v, visible, scale, softcap, block or FLASH_BLOCK, block or FLASH_BLOCK)
        visible = visible.mask(T)
    if gpu_kernels() and _plain(ctx, softcap):
        return dot_product_attention(q, k, v, visible, scale, causal=past == 0)
    n = max(1, round(T / chunk))
    if n == 1:
        return attention(q, k, v, visible, scale, ctx, softcap)
    bounds = [T * c // n for c in range(n + 1)]
    return jnp.concatenate([
        attention(q[..., lo:hi, :], k[:, :, :past + hi], v[:, :, :past + hi], visible[..., lo:hi, :past + hi], scale, ctx, softcap)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ], axis=3)


def _plain(ctx: Ctx, softcap: float | None) -> bool:
    """Whether an attention call is plain softmax attention: no soft-cap, no attention dropout."""
    return softcap is None and (ctx.deterministic or ctx.dropout_rate == 0.0)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, causal: bool = False) -> jax.Array:
    """`attention` (no softcap, no dropout) through `jax.nn.dot_product_attention`: q (B, KV, G, T, E) -> (B, KV, G, T, E).

    Query head kv * G + g shares key/value head kv, jax's grouped-query layout as well as jpeft's. cuDNN's flash
    attention (`_cudnn_applies`) serves boolean masks; a float bias (T5's position bias, whose gradient must flow)
    and everything else go to XLA's implementation. `causal` says that the mask also hides every key after its
    query's index with S = T (no prefix keys), so cuDNN may skip those tiles.
    """
    B, KV, G, T, E = q.shape
    S = k.shape[2]
    heads = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  (B, KV, S, E) <-> (B, S, KV, E)
    query = q.transpose(0, 3, 1, 2, 4).reshape(B, T, KV * G, E)
    mb, mk, mg, mt, ms = mask.shape
    m = mask[:, 0, 0, None] if mk == mg == 1 else jnp.broadcast_to(mask, (mb, KV, G, mt, ms)).reshape(mb, KV * G, mt, ms)
    boolean = m.dtype == jnp.bool_
    cudnn = boolean and _cudnn_applies(q.dtype, E, T, S)
    out = jax.nn.dot_product_attention(query, heads(k), heads(v), bias=None if boolean else m.astype(jnp.float32),
                                       mask=m if boolean else None, scale=scale, is_causal=causal and cudnn,
                                       implementation="cudnn" if cudnn else "xla")
    return out.reshape(B, T, KV, G, E).transpose(0, 2, 3, 1, 4)


def _cudnn_applies(dtype: Any, head_dim: int, T: int, S: int) -> bool:
    """Whether cuDNN's flash attention takes this call: a CUDA device, bf16/fp16, head dim a multiple of 8 up to
    128 (256 from Hopper on), and even lengths (its backward with a bias needs them; a mask reaches it as a bias)."""
    if not CUDNN_ATTENTION or _platform() != "gpu" or jnp.dtype(dtype) not in _GPU_DTYPES or head_dim % 8 or T % 2 or S % 2:
        return False
    capability = getattr(jax.devices("gpu")[0], "compute_capability", None)  # absent on non-CUDA GPUs
    if capability is None:
        return False
    return head_dim <= (256 if tuple(int(c) for c in capability.split(".")) >= (9, 0) else 128)


def prefixed(p: Params, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An attention's keys and values (B, KV, S, E) with its prefix-tuning keys and values in front, (B, KV, N+S, E).

    `p["prefix"]` holds `key` and `value` (KV, N, E), shared by all rows (`jpeft.prefix.layer_prefixes`); without
    it k and v are returned as they are.
    """
    if "prefix" not in p:
        return k, v
    B = k.shape[0]
    front = lambda x, like: jnp.broadcast_to(x[None], (B, *x.shape)).astype(like.dtype)  # noqa: E731
    return (jnp.concatenate([front(p["prefix"]["key"], k), k], axis=2),
            jnp.concatenate([front(p["prefix"]["value"], v), v], axis=2))


def _attention_probs(q, k, mask, scale, softcap=None):
    # An einsum, not q @ swapaxes(k): inside a decoding loop XLA materialised that transpose of every cached key block.
    scores = jnp.einsum("bkgte,bkse->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    if mask.dtype == jnp.bool_:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    else:
        scores = scores + mask
    return jax.nn.softmax(scores, axis=-1)  # (B, KV, G, T, S) float32


def _values(probs, v, dtype):
    B, KV, G, T, S = probs.shape
    probs = _unfused(probs.astype(dtype))
    return matmul(probs.reshape(B, KV, G * T, S), v).reshape(B, KV, G, T, -1)


def _unfused(x: jax.Array) -> jax.Array:
    """x unchanged, but opaque to XLA's CPU backend, which otherwise fuses softmax work into the adjacent
    attention matmul and runs the pair markedly slower than apart (a full-precision `reduce_precision`
    is a no-op its matmul fusions do not take in)."""
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
    return _values(_attention_probs(q, k, mask, scale), v, q.dtype)


def _attention_fwd(q, k, v, mask, scale):
    probs = _attention_probs(q, k, mask, scale)
    out = _values(probs, v, q.dtype)
    return out, (q, k, v, mask, probs, out)


def _attention_bwd(scale, res, g):
    """The softmax-attention gradient with every (rows, S) operand used untransposed.

    Autodiff's dK = dS^T Q and dV = P^T dO made XLA's CPU backend copy the (B, KV, G*T, S) score
    gradient and probabilities transposed; here the small (rows, E) operand is transposed instead.
    """
    q, k, v, mask, probs, out = res
    B, KV, G, T, E = q.shape
    rows = lambda x: x.reshape(B, KV, G * T, x.shape[-1])  # noqa: E731
    g_probs = _unfused(jnp.einsum("bkgte,bkse->bkgts", g, v, preferred_element_type=jnp.float32))
    row_dot = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    g_bias = probs * (g_probs - row_dot)  # softmax backward (float32): the gradient of an additive bias, 0 where masked
    g_scores = (g_bias * scale).astype(q.dtype)
    # The barrier keeps the transposes explicit: in causal attention's query blocks XLA otherwise folds them
    # into dots contracting over rows, which its CPU backend runs on a slower kernel (SmolLM2 step 10.96 ->
    # 10.62 s median); T5's step compiles the same either way.
    gT, qT = jax.lax.optimization_barrier((jnp.swapaxes(rows(g), -1, -2), jnp.swapaxes(rows(q), -1, -2)))  # (B, KV, E, G*T)
    g_q = matmul(rows(g_scores), k).reshape(q.shape)
    g_k = jnp.swapaxes(matmul(qT, rows(g_scores)), -1, -2)
    g_v = jnp.swapaxes(matmul(gT, rows(probs.astype(q.dtype))), -1, -2)
    return g_q, g_k, g_v, None if mask.dtype == jnp.bool_ else _sum_to_shape(g_bias, mask.shape).astype(mask.dtype)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum x over the dimensions a value of `shape` was broadcast along to reach x's shape."""
    lead = tuple(range(x.ndim - len(shape)))
    ones = tuple(len(lead) + i for i, n in enumerate(shape) if n == 1 and x.shape[len(lead) + i] != 1)
    return jnp.sum(x, axis=ones, keepdims=True).sum(axis=lead)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------------------------
# Blockwise ("flash") attention for long rows on the CPU path

FLASH_MIN_LEN: int = 1024
"""`causal_attention` runs `flash_attention` (CPU path, no attention dropout) from this many queries on; shorter rows
keep the query-block path, which the benchmarks' 448-576-token steps were tuned on (see benchmarks/README.md,
"Long sequences"). Both are read at trace time."""
FLASH_BLOCK: int = 256
"""`flash_attention`'s query and key block length under `causal_attention`."""
PREFILL_BLOCK: int = 64
"""The block length for a generation prefill (`causal_attention(..., block=)`): a packed prefill's segments are prompts
of a few hundred tokens, and smaller blocks skip more of the other segments (SmolLM2, 8 DialogSum prompts packed into
1792 slots: 2.80 s at 256, 2.60 s at 64, median of 6). Training steps kept 256 (equal within noise at 2048 tokens)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Visibility:
    """Which keys each query of a row sees, in O(S) data: the T queries sit at the last T of the S key slots.

    Key slot j is visible to the query at slot i iff `real[j]`, j <= i, `pos[j] > pos[i] - window` (when a window is
    given; `pos` counts the real slots before each slot) and `segments[i] == segments[j]` (when given: a packed row).
    `mask` forms the (B, 1, 1, T, S) boolean mask, which `flash_attention` never does: it forms one block at a time.
    """

    real: jax.Array  # (B, S) bool
    pos: jax.Array  # (B, S) int32
    segments: jax.Array | None = None  # (B, S) int32
    window: jax.Array | None = None  # () int32

    def block(self, query_slot: Any, rows: int, key_slot: Any, cols: int) -> jax.Array:
        """(B, rows, cols) bool: what the queries at slots query_slot.. see of the keys at key_slot.."""
        at = lambda x, start, n: jax.lax.dynamic_slice_in_dim(x, start, n, axis=1)  # noqa: E731
        qi, kj = query_slot + jnp.arange(rows), key_slot + jnp.arange(cols)
        visible = at(self.real, key_slot, cols)[:, None, :] & (kj[None, None, :] <= qi[None, :, None])
        if self.window is not None:
            visible = visible & (at(self.pos, key_slot, cols)[:, None, :] > at(self.pos, query_slot, rows)[:, :, None] - self.window)
        if self.segments is not None:
            visible = visible & (at(self.segments, query_slot, rows)[:, :, None] == at(self.segments, key_slot, cols)[:, None, :])
        return visible

    def mask(self, T: int) -> jax.Array:
        """(B, 1, 1, T, S) bool mask of the T queries at the last T slots."""
        S = self.real.shape[1]
        return self.block(S - T, T, 0, S)[:, None, None]

    def first_visible(self) -> jax.Array:
        """(B, S) int32: for the query at each slot, the earliest key slot it may see (its segment's start, its window's)."""
        B, S = self.real.shape
        index = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        first = jnp.zeros((B, S), jnp.int32)
        if self.segments is not None:
            new = jnp.concatenate([jnp.ones((B, 1), bool), self.segments[:, 1:] != self.segments[:, :-1]], axis=1)
            first = jax.lax.cummax(jnp.where(new, index, 0), axis=1)
        if self.window is not None:  # pos never decreases: the first slot past pos[i] - window
            since = jax.vmap(lambda p: jnp.searchsorted(p, p - self.window, side="right"))(self.pos)
            first = jnp.maximum(first, since.astype(jnp.int32))
        return first

    def padded(self, length: int) -> Visibility:
        """The same visibility over `length` >= S slots, the slots added invisible."""
        extra = ((0, 0), (0, length - self.real.shape[1]))
        pad = lambda x, value: None if x is None else jnp.pad(x, extra, constant_values=value)  # noqa: E731
        return Visibility(pad(self.real, False), jnp.pad(self.pos, extra, mode="edge"), pad(self.segments, -1), self.window)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, visible: Visibility, scale: float, softcap: float | None = None,
                    block_q: int = 256, block_k: int = 256) -> jax.Array:
    """`causal_attention` without ever holding more than one (block_q, block_k) block of scores per head group.

    Queries run in blocks of about `block_q` rows (G * block_q per key/value head; `_even_block`), each against the
    key blocks of about `block_k` it can see: from the block of its rows' earliest visible key
    (`Visibility.first_visible`: segment and window starts, found at run time) to the block of its last row's slot,
    so the causal upper triangle, other segments of a packed row and keys out of every row's window are skipped.
    The softmax runs online in float32 (products in q's dtype, accumulated in float32); the backward pass recomputes each block's probabilities from the
    saved output and per-row log-sum-exp, so it keeps O(T) besides q, k, v. Query heads share key/value heads as in
    `attention` (no copies of K or V); the S - T keys before the queries (a prefix) are visible to all; `softcap` as in
    `attention`. Rows that see no key give 0 (the dense path averages all values there; such rows are padding).
    """
    B, KV, G, T, E = q.shape
    S = k.shape[2]
    block_q, block_k = _even_block(T, block_q), _even_block(S, block_k)
    Tp, Sp = -(-T // block_q) * block_q, -(-S // block_k) * block_k
    past = S - T
    vis = visible.padded(max(Sp, past + Tp))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, Tp - T), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, Sp - S), (0, 0))) for x in (k, v))
    out = _flash(q, k, v, vis, _key_block_ranges(vis, past, T, block_q, block_k), (scale, softcap, past, block_q, block_k))
    return out[:, :, :, :T]


def _even_block(n: int, size: int) -> int:
    """The block length nearest `size` that splits n rows into equal blocks, padding fewer rows than there are blocks
    (576 rows: 2 blocks of 288, not 3 of 256 and 192 rows of padding)."""
    blocks = max(1, round(n / size))
    return -(-n // blocks)


def _key_block_ranges(vis: Visibility, past: int, T: int, block_q: int, block_k: int) -> jax.Array:
    """(query blocks, 2) int32: the first and last key block each query block needs (over the whole batch)."""
    n = -(-T // block_q)
    rows = jnp.minimum(jnp.arange(n * block_q), T - 1)  # rows past T repeat the last row's needs
    first = jnp.min(vis.first_visible()[:, past + rows], axis=0).reshape(n, block_q).min(axis=1) // block_k
    last = (past + jnp.minimum((jnp.arange(n) + 1) * block_q, T) - 1) // block_k
    return jnp.stack([first, jnp.maximum(first, last)], axis=1).astype(jnp.int32)


def _flash_scores(qb, kb, vis, q_slot, k_slot, G, opts):
    """(B, KV, G * block_q, block_k) float32 scores of a block, invisible ones -inf, and tanh(x / softcap) when capped."""
    scale, softcap, _, block_q, block_k = opts
    s = jnp.einsum("bkre,bkse->bkrs", qb, kb, preferred_element_type=jnp.float32) * scale
    capped = None
    if softcap is not None:
        capped = jnp.tanh(s / softcap)
        s = capped * softcap
    seen = vis.block(q_slot, block_q, k_slot, block_k)[:, None, None]  # (B, 1, 1, block_q, block_k)
    B, KV, R, _ = s.shape
    seen = jnp.broadcast_to(seen, (B, 1, G, block_q, block_k)).reshape(B, 1, R, block_k)
    return jnp.where(seen, s, -jnp.inf), capped


def _flash_blocks(x: jax.Array, i: Any, block: int, G: int) -> jax.Array:
    """Query block i of (B, KV, G, Tp, E) as (B, KV, G * block, E) rows."""
    B, KV, _, _, E = x.shape
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=3).reshape(B, KV, G * block, E)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, vis, ranges, opts):
    return _flash_fwd(q, k, v, vis, ranges, opts)[0]


def _flash_fwd(q, k, v, vis, ranges, opts):
    _, _, past, block_q, block_k = opts
    B, KV, G, Tp, E = q.shape

    def query_block(i, lo_hi):
        qb = _flash_blocks(q, i, block_q, G)

        def key_block(j, carry):
            m, l, acc = carry
            kb, vb = (jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k, axis=2) for x in (k, v))
            s, _ = _flash_scores(qb, kb, vis, past + i * block_q, j * block_k, G, opts)
            m_new = jnp.maximum(m, s.max(axis=-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row that has seen nothing yet
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bkrs,bkse->bkre", p.astype(v.dtype), vb, preferred_element_type=jnp.float32)
            return m_new, l * alpha + p.sum(axis=-1), acc * alpha[..., None] + pv

        R = G * block_q
        init = (jnp.full((B, KV, R), -jnp.inf), jnp.zeros((B, KV, R)), jnp.zeros((B, KV, R, E)))
        m, l, acc = jax.lax.fori_loop(lo_hi[0], lo_hi[1] + 1, key_block, init)
        out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)  # inf: such rows get probability 0
        return out.astype(q.dtype), lse

    n = Tp // block_q
    out, lse = jax.lax.map(lambda a: query_block(*a), (jnp.arange(n), ranges))  # (n, B, KV, G * block_q, ...)
    out = out.reshape(n, B, KV, G, block_q, E).transpose(1, 2, 3, 0, 4, 5).reshape(B, KV, G, Tp, E)
    return out, (q, k, v, vis, ranges, out, lse)


def _flash_bwd(opts, res, g):
    q, k, v, vis, ranges, out, lse = res
    scale, softcap, past, block_q, block_k = opts
    B, KV, G, Tp, E = q.shape
    row_dot = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # (B, KV, G, Tp)

    def query_block(carry, a):
        g_k, g_v = carry
        i, lo_hi, lse_i = a
        qb, gb = _flash_blocks(q, i, block_q, G), _flash_blocks(g, i, block_q, G)
        d = jax.lax.dynamic_slice_in_dim(row_dot, i * block_q, block_q, axis=3).reshape(B, KV, G * block_q)

        def key_block(j, carry):
            g_q, g_k, g_v = carry
            kb, vb = (jax.lax.dynamic_slice_in_dim(x, j * block_k, block_k, axis=2) for x in (k, v))
            s, capped = _flash_scores(qb, kb, vis, past + i * block_q, j * block_k, G, opts)
            p = jnp.exp(s - lse_i[..., None])
            g_p = jnp.einsum("bkre,bkse->bkrs", gb, vb, preferred_element_type=jnp.float32)
            g_s = p * (g_p - d[..., None])
            if softcap is not None:
                g_s = g_s * (1.0 - capped * capped)
            g_s = (g_s * scale).astype(q.dtype)
            g_q = g_q + jnp.einsum("bkrs,bkse->bkre", g_s, kb, preferred_element_type=jnp.float32)
            add = lambda acc, x: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                acc, jax.lax.dynamic_slice_in_dim(acc, j * block_k, block_k, axis=2) + x, j * block_k, axis=2)
            g_k = add(g_k, jnp.einsum("bkrs,bkre->bkse", g_s, qb, preferred_element_type=jnp.float32))
            g_v = add(g_v, jnp.einsum("bkrs,bkre->bkse", p.astype(v.dtype), gb, preferred_element_type=jnp.float32))
            return g_q, g_k, g_v

        g_q, g_k, g_v = jax.lax.fori_loop(lo_hi[0], lo_hi[1] + 1, key_block, (jnp.zeros(qb.shape, jnp.float32), g_k, g_v))
        return (g_k, g_v), g_q.astype(q.dtype)

    n = Tp // block_q
    zeros = jnp.zeros(k.shape, jnp.float32)
    (g_k, g_v), g_q = jax.lax.scan(query_block, (zeros, zeros), (jnp.arange(n), ranges, lse))
    g_q = g_q.reshape(n, B, KV, G, block_q, E).transpose(1, 2, 3, 0, 4, 5).reshape(q.shape)
    return g_q, g_k.astype(k.dtype), g_v.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
