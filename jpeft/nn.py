"""The rule: how a layer applies its frozen weight and every PEFT leaf beside it, and the primitives under it.

A dense layer's parameters are a plain dict, `{"kernel": (in, out)}` (or a quantized group standing for it) with an
optional `bias` (out,), and each PEFT method adds leaves beside the weight (`jpeft.leaves` lists what each declares).
`dense` applies whichever methods are present, in the order their declarations give:

    x -> input scalings ((IA)^3 on feed-forward modules) -> x W' (the frozen product, wrapped by each additive
    method: LoRA (x A) B s, DoRA's rescaling, LoHa, LoKr) -> + bias -> output scalings ((IA)^3)

so every low-rank path is fused into the same jitted computation as the frozen matmul and W + BA is never formed
in training. The same `dense` serves jpeft's own models and, through `jpeft.integrations`, any Flax layer seen as a
matrix product.

The frozen weight may be a quantized group in PyTorch's (out, in) row layout (`jpeft.quant`): NF4 (`kernel_nf4` +
`kernel_absmax`, double-quantized or not), int8, or GGUF blocks. `quantized_matmul` dequantizes it inside the matmul
and again in the backward pass, so neither the residuals nor remat ever hold a float copy of it.

Kernels by backend (`KERNELS`, read at trace time): the hand-tuned paths (attention's custom backward and query
blocks in `jpeft.models.attention`, `matmul`'s float32 accumulation, LoRA's hand-written backward) answer XLA's CPU
backend; on a GPU, attention goes through `jax.nn.dot_product_attention` (cuDNN flash attention where it applies) and
the products are plain ones left to XLA's GPU compiler and autodiff.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from jpeft import leaves, quant, tree

Params = dict[str, Any]

KERNELS: str = os.environ.get("JPEFT_KERNELS", "auto")
"""Which code paths the ops trace: "auto" (the GPU path when `jax.default_backend()`, or the device of a
`jax.default_device` scope, is a GPU), "gpu" (the GPU path on any backend: how CPU tests check its numerics), or
"cpu" (the CPU-tuned paths on any backend). Read when a function is traced: set it before the first call of a jitted
function (or through the JPEFT_KERNELS environment variable)."""




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


BATCH_AXES = ("data", "fsdp")  # the mesh axes a batch's rows are split over (`jpeft.training.sharding`)


def rows_split() -> bool:
    """Whether this trace runs under a mesh that splits a batch's rows over BATCH_AXES (`jpeft.training.sharding`'s
    step sets that abstract mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and set(BATCH_AXES) <= set(mesh.axis_names)


def keep_rows_sharded(x: jax.Array) -> jax.Array:
    """x (rows, ...) kept split by rows over BATCH_AXES, as the batch is, within a sharded step; as is elsewhere.

    So fully sharded data parallelism gathers each layer's weights rather than the activations: left to itself, GSPMD
    split the activations along the hidden dim that the weights' FSDP spec splits, whole batch on every device (Llama,
    fsdp=8: 7.7x the activations a device needs).
    """
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES)) if rows_split() else x


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids]: rows of an embedding table (V, D) at ids (rows, ...), split by rows as ids are within a sharded step.

    The table's D is gathered first (its vocabulary dim stays as sharded): left to itself XLA's partitioner gathers
    along the vocabulary, lays the looked-up rows out along D as FSDP splits the table, and cannot re-split them by rows
    (`keep_rows_sharded`) without replicating them ("Involuntary full rematerialization").
    """
    if not rows_split():
        return table[ids]
    return keep_rows_sharded(jax.lax.with_sharding_constraint(table, P(P.UNCONSTRAINED, None))[ids])


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


def einsum(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`matmul`'s precision and dtype for an einsum of two operands."""
    if gpu_kernels():
        return jnp.einsum(spec, x, w)
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(jnp.result_type(x, w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def quantized_matmul(fmt: str, x: jax.Array, group: Params) -> jax.Array:
    """x (..., in) @ W for a quantized leaf group of format `fmt`, W dequantized here; codes get no gradient."""
    # W depends only on the codes, so XLA is free to dequantize every layer up front and hold them all (its CPU
    # scheduler did, in an unrolled loop of layers); the barrier ties W to x where XLA keeps barriers.
    group, x = jax.lax.optimization_barrier((group, x))
    return einsum("...i,oi->...o", x, quant.unpack(fmt, group).astype(x.dtype))


def _quantized_matmul_fwd(fmt, x, group):
    return quantized_matmul(fmt, x, group), group  # the codes, not W: W would be a float copy of the layer held for backward


def _quantized_matmul_bwd(fmt, group, g):
    # W again, from the codes, once g exists. The barriers only order work where XLA keeps them (its CPU pipeline
    # drops them before scheduling); what bounds memory is that `run_layers` scans quantized layers, so each
    # dequantization lives in its own layer's loop body, forward or backward, and no two layers' W coexist.
    group, g = jax.lax.optimization_barrier((group, g))
    return matmul(g, quant.unpack(fmt, group).astype(g.dtype)), None


quantized_matmul.defvjp(_quantized_matmul_fwd, _quantized_matmul_bwd)


def torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: Any = jnp.float32) -> jax.Array:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's nn.Linear init and kaiming_uniform_(a=sqrt(5)), as PEFT draws them."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def frozen_weight(p: Params, dtype: Any) -> tuple[str | None, jax.Array | Params]:
    """(format, weight): the module's float kernel (in, out) in `dtype` (format None), or its quantized group."""
    fmt = quant.format_of(p)
    return (None, p["kernel"].astype(dtype)) if fmt is None else (fmt, quant.leaves(p))


def frozen_product(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    """x @ W for the module's kernel or quantized group, no bias."""
    fmt, w = frozen_weight(p, ctx.dtype)
    return matmul(x, w) if fmt is None else quantized_matmul(fmt, x, w)


def dense(p: Params, x: jax.Array, ctx: Ctx) -> jax.Array:
    """x @ W (+ bias) with every PEFT method present beside the weight applied (see the module docstring)."""
    x = x.astype(ctx.dtype)
    methods = leaves.present(p)
    for m in methods:
        if m.scale_input is not None:
            x = m.scale_input(p, x, ctx)
    product = functools.partial(frozen_product, p, ctx=ctx)
    for m in methods:
        if m.product is not None:
            product = functools.partial(m.product, p, inner=product, ctx=ctx)
    y = product(x)
    if "bias" in p:
        y = y + p["bias"].astype(ctx.dtype)
    for m in methods:
        if m.scale_output is not None:
            y = m.scale_output(p, y, ctx)
    return y


def adapter(p: Params | None, h: jax.Array, ctx: Ctx) -> jax.Array:
    """Bottleneck adapter on a sub-layer's output: h + up(act(down(h))); identity when absent."""
    if p is None:
        return h
    return h + dense(p["up"], jax.nn.relu(dense(p["down"], h, ctx)), ctx)
