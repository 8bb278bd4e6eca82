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
    aux_loss: jax.Array | None = None  # a term the model adds to its training loss (a mixture of experts' router balance), set by its decoder
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


# ----------------------------------------------------------------------------------------------
# Routed experts: grouped matmuls


def grouped_dense(p: Params, x: jax.Array, group_sizes: jax.Array, ctx: Ctx) -> jax.Array:
    """`dense` for routed experts: x (R, in), rows sorted by expert, group_sizes (X,) -> (R, out), each expert's rows times
    its own slice of the kernel (X, in, out) (or of a quantized group stacked on X), plus the low-rank update of the
    method beside it, stacked on the expert axis (LoRA's `lora_a` (X, in, r), `lora_b` (X, r, out), `lora_scale` ()):
    x_e W_e + (h_e A_e) B_e * scale for the rows of expert e, h the method's input (LoRA: dropout(x)), its factors from
    the method's declared `grouped`. The update runs as grouped products of rank r: no (X, in, out) update is formed.

    On a GPU or TPU the products are `jax.lax.ragged_dot`, XLA's grouped GEMM. XLA's CPU backend has none: there
    `ragged_dot` lowers to a masked product of every row with every expert's matrix (X times the work), so the CPU
    path runs tiles of one expert's rows through a loop instead (`_tiled_dense`). Rows past sum(group_sizes) give zeros.
    """
    methods = leaves.present(p)
    if len(methods) > 1 or any(m.grouped is None for m in methods) or "bias" in p:
        raise ValueError(f"routed experts take one method with a grouped update ({[m.label for m in leaves.METHODS if m.grouped]}) "
                         f"and no bias, but this expert weight holds {[m.label for m in methods] + ['bias'] * ('bias' in p)}")
    x = x.astype(ctx.dtype)
    fmt, w = frozen_weight(p, ctx.dtype)
    low_rank = methods[0].grouped(p, x, ctx) if methods else None
    if gpu_kernels() or _platform() == "tpu":
        if fmt is not None:  # held as float for the backward pass: the quantized GPU path keeps no less than a float one
            w = jnp.swapaxes(jax.vmap(functools.partial(quant.unpack, fmt))(w), 1, 2).astype(x.dtype)
        y = jax.lax.ragged_dot(x, w, group_sizes)
        if low_rank is None:
            return y
        h, a, b, scale = low_rank
        return y + jax.lax.ragged_dot(jax.lax.ragged_dot(h, a, group_sizes), b, group_sizes) * scale
    return _tiled_dense(fmt, _tile_rows(x.shape[0], group_sizes.shape[0]), x, w, low_rank, group_sizes)


def _tile_rows(rows: int, groups: int) -> int:
    """Rows per tile: a power of two near a quarter of a group's mean rows, 8 to 128. Each group is padded to whole
    tiles (under one tile of waste per group), and a tile of 128 rows makes the loop's cost per step small beside its product."""
    return int(min(128, max(8, 2 ** int(math.log2(max(1, rows // (4 * groups)))))))


def _tile_plan(group_sizes: jax.Array, rows: int, tile: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Where rows go when every group is padded to whole tiles: (group (T,) of each tile, source row (T * tile,) of each
    tiled slot, `rows` for an empty one, tiled slot (rows,) of each row). T = ceil(rows / tile) + G bounds the tiles."""
    G = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    row_end = jnp.cumsum(sizes)
    padded = -(-sizes // tile) * tile
    pad_end = jnp.cumsum(padded)
    T = -(-rows // tile) + G
    slot = jnp.arange(T * tile)
    group = jnp.minimum(jnp.searchsorted(pad_end, slot, side="right", method="compare_all"), G - 1)
    offset = slot - (pad_end - padded)[group]  # past the group's rows (or the last tile's end) the slot is empty
    source = jnp.where(offset < sizes[group], (row_end - sizes)[group] + offset, rows)
    row = jnp.arange(rows)
    row_group = jnp.minimum(jnp.searchsorted(row_end, row, side="right", method="compare_all"), G - 1)
    target = jnp.where(row < row_end[-1], (pad_end - padded)[row_group] + row - (row_end - sizes)[row_group], T * tile)
    return group[::tile], source, target


def _tiles(x: jax.Array, plan) -> jax.Array:
    """x (rows, d) -> (T, tile, d) in the plan's tiles, zero rows where a tile is padding."""
    tile_group, source, _ = plan
    return jnp.take(x, source, axis=0, mode="fill", fill_value=0).reshape(tile_group.shape[0], -1, x.shape[-1])


def _untiled(tiles: jax.Array, plan) -> jax.Array:
    """(T, tile, d) -> (rows, d): each row back from its tiled slot."""
    return jnp.take(tiles.reshape(-1, tiles.shape[-1]), plan[2], axis=0, mode="fill", fill_value=0)


def _at(w: Any, g: jax.Array) -> Any:
    """Group g's slice of a weight (or of every leaf of a quantized group)."""
    return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, g, keepdims=False), w)


def _matrix(fmt: str | None, w_g: Any, dtype: Any) -> jax.Array:
    """A group's weight as (in, out): the kernel slice, or the quantized slice's (out, in) rows dequantized and transposed."""
    return w_g if fmt is None else quant.unpack(fmt, w_g).astype(dtype).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tiled_dense(fmt: str | None, tile: int, x: jax.Array, w: Any, low_rank: tuple | None, group_sizes: jax.Array) -> jax.Array:
    """`grouped_dense` on the CPU: a loop over tiles of one group's rows, each step x_t W_g (+ (h_t A_g) B_g s).

    The backward pass is one more loop, which returns x's gradient and adds each tile's share to A's and B's; W's
    gradient is a loop of its own, dead code that XLA drops when W is frozen. Nothing of W is kept from forward to
    backward (autodiff of the loop would store each step's slice of it); the rank-r products h A are.
    """
    return _tiled_dense_fwd(fmt, tile, x, w, low_rank, group_sizes)[0]


def _tiled_dense_fwd(fmt, tile, x, w, low_rank, group_sizes):
    plan = _tile_plan(group_sizes, x.shape[0], tile)
    h_tiles = None if low_rank is None else _tiles(low_rank[0], plan)

    def body(_, inputs):
        xt, ht, g = inputs
        y = einsum("ti,io->to", xt, _matrix(fmt, _at(w, g), xt.dtype))
        if low_rank is None:
            return None, (y, None)
        _, a, b, scale = low_rank
        hr = einsum("ti,ir->tr", ht, _at(a, g))
        return None, (y + einsum("tr,ro->to", hr, _at(b, g)) * scale, hr)

    y, hr = jax.lax.scan(body, None, (_tiles(x, plan), h_tiles, plan[0]))[1]
    return _untiled(y, plan), (x, w, low_rank, plan, h_tiles, hr)


def _tiled_dense_bwd(fmt, tile, res, g):
    x, w, low_rank, plan, h_tiles, hr = res
    g_tiles = _tiles(g, plan)

    def body(acc, inputs):
        gt, ht, hrt, k = inputs
        g_x = einsum("to,io->ti", gt, _matrix(fmt, _at(w, k), gt.dtype))
        if low_rank is None:
            return acc, (g_x, None)
        _, a, b, scale = low_rank
        g_hr = einsum("to,ro->tr", gt, _at(b, k)) * scale  # (tile, r)
        hr_g = jnp.einsum("tr,to->ro", hrt, gt, preferred_element_type=jnp.float32)  # (r, out)
        g_a, g_b, g_scale = acc
        g_a = _add_at(g_a, k, jnp.einsum("ti,tr->ir", ht, g_hr, preferred_element_type=jnp.float32))
        g_b = _add_at(g_b, k, hr_g * scale)
        return (g_a, g_b, g_scale + jnp.sum(hr_g * _at(b, k))), (g_x, einsum("tr,ir->ti", g_hr, _at(a, k)))

    acc = None if low_rank is None else (jnp.zeros(low_rank[1].shape, jnp.float32), jnp.zeros(low_rank[2].shape, jnp.float32),
                                         jnp.zeros((), jnp.float32))
    acc, (g_x, g_h) = jax.lax.scan(body, acc, (g_tiles, h_tiles, hr, plan[0]))
    g_low_rank = None if low_rank is None else (_untiled(g_h, plan), *(t.astype(v.dtype) for t, v in zip(acc, low_rank[1:])))
    return _untiled(g_x, plan), _weight_grad(fmt, x, w, g_tiles, plan), g_low_rank, None


def _weight_grad(fmt: str | None, x: jax.Array, w: Any, g_tiles: jax.Array, plan) -> Any:
    """W's gradient, each tile's x_t^T g_t added into its group's slice; None for quantized codes, which never train."""
    if fmt is not None:
        return None

    def body(acc, inputs):
        xt, gt, k = inputs
        return _add_at(acc, k, jnp.einsum("ti,to->io", xt, gt, preferred_element_type=jnp.float32)), None

    return jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (_tiles(x, plan), g_tiles, plan[0]))[0].astype(w.dtype)


def _add_at(acc: jax.Array, k: jax.Array, update: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(acc, jax.lax.dynamic_index_in_dim(acc, k, keepdims=False) + update, k, 0)


_tiled_dense.defvjp(_tiled_dense_fwd, _tiled_dense_bwd)


def adapter(p: Params | None, h: jax.Array, ctx: Ctx) -> jax.Array:
    """Bottleneck adapter on a sub-layer's output: h + up(act(down(h))); identity when absent."""
    if p is None:
        return h
    return h + dense(p["up"], jax.nn.relu(dense(p["down"], h, ctx)), ctx)
