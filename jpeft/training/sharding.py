"""Sharding on a device mesh: partition rules for HF-named trees and a train step that JAX's SPMD partitioner splits.

The mesh has three axes, `("data", "fsdp", "model")`. The batch is split over `("data", "fsdp")`;
base weights are split by fully sharded data parallelism over d_model on `"fsdp"` and by tensor
parallelism over heads / MLP hidden / vocabulary on `"model"`:

| leaf | spec |
| --- | --- |
| q, k, v, wi, wi_0, wi_1, q/k/v_proj, gate_proj, up_proj `kernel` (D, out) | `("fsdp", "model")` |
| o, wo, o_proj, down_proj `kernel` (in, D) | `("model", "fsdp")` |
| `shared/embedding`, `model/embed_tokens/embedding` (V, D) | `("model", "fsdp")` |
| `lm_head/kernel` (D, V) | `("fsdp", "model")` |
| q/k/v/gate/up_proj `bias` (out,) | `("model",)` |
| `relative_attention_bias/embedding` (buckets, H) | `(None, "model")` (along heads) |
| routed experts' `experts/gate_up_proj/kernel` (X, D, 2F) | `("model", "fsdp", None)` |
| routed experts' `experts/down_proj/kernel` (X, F, D) | `("model", None, "fsdp")` |
| a router's `mlp/gate/kernel` (D, X) | `("fsdp",)` |
| norms, o_proj/down_proj biases, anything unmatched | replicated |

Llama and Gemma trees share these names (Gemma's extra norms and `q_norm` / `k_norm` are replicated), and so do the
mixture-of-experts trees, whose routed experts are split over `"model"` by expert (expert parallelism: the MoE
layers use the tensor-parallel axis to hold different experts; each expert's matrix is split over d_model by `"fsdp"`).

PEFT leaves follow the kernel they sit beside: `lora_a` (in, r) takes the kernel's input-dim spec,
`lora_b` (r, out) and DoRA's `lora_magnitude` (out,) its output-dim spec, the rank is never split (routed experts'
`lora_a` (X, in, r) and `lora_b` (X, r, out) also take the kernel's expert-axis spec); `ia3_in` / `ia3_out` take the
kernel's input / output spec, which matches how the activations they scale are laid out under
tensor parallelism. LoHa's `loha_w*_b` (in, r) and `loha_w*_a` (r, out) follow the kernel as LoRA's A and
B do; LoKr's factors, about the square root of the kernel's dims, are replicated. The scales, `prompt_embeddings`,
P-tuning's `prompt_encoder` and bottleneck adapters are replicated (they are small and touch the residual stream).
`replicate_adapters=True` replicates every PEFT leaf.

A quantized weight (`jpeft.quant`, rows in PyTorch's (out, in) layout) is split along its output rows as its
kernel's output dim would be; its packed input dim stays whole (a split could cut a block), and NF4's
double-quantization scale and offset are replicated. PEFT leaves beside it follow the kernel it stands for.

A dimension that a rule would split unevenly (its size not divisible by the mesh axis) falls back
to replication for that dimension, with one warning listing the leaves. Divisibility is checked per
dimension, not per head: a projection whose width divides but whose head count does not (e.g. 2 KV
heads on model=4) is split inside heads, which is correct but communicates more. Optimizer state follows
its parameter. Everything goes through `jax.jit` with `NamedSharding` in/out shardings, so a
1-device mesh (the default) compiles to the same program as the unsharded step.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jpeft import leaves, quant, tree
from jpeft.training import split
from jpeft.training import losses
from jpeft.training.losses import LossFn
from jpeft.training.step import make_train_step

AXES = ("data", "fsdp", "model")
BATCH_AXES = losses.BATCH_AXES
Rules = Sequence[tuple[str, P]]

# (regex searched in the leaf's path, spec); the first match wins, no match means replicated.
T5_RULES: Rules = (
    (r"(^|/)shared/embedding$", P("model", "fsdp")),
    (r"(^|/)lm_head/kernel$", P("fsdp", "model")),
    (r"(SelfAttention|EncDecAttention)/(q|k|v)/kernel$", P("fsdp", "model")),
    (r"(SelfAttention|EncDecAttention)/o/kernel$", P("model", "fsdp")),
    (r"DenseReluDense/(wi|wi_0|wi_1)/kernel$", P("fsdp", "model")),
    (r"DenseReluDense/wo/kernel$", P("model", "fsdp")),
    (r"relative_attention_bias/embedding$", P(None, "model")),
)
LLAMA_RULES: Rules = (
    (r"(^|/)embed_tokens/embedding$", P("model", "fsdp")),
    (r"(^|/)lm_head/kernel$", P("fsdp", "model")),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", P("fsdp", "model")),
    (r"self_attn/o_proj/kernel$", P("model", "fsdp")),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", P("model")),
    (r"mlp/(gate_proj|up_proj)/kernel$", P("fsdp", "model")),
    (r"mlp/(gate_proj|up_proj)/bias$", P("model")),
    (r"mlp/down_proj/kernel$", P("model", "fsdp")),
)
MOE_RULES: Rules = (
    (r"mlp/experts/gate_up_proj/kernel$", P("model", "fsdp", None)),
    (r"mlp/experts/down_proj/kernel$", P("model", None, "fsdp")),
    (r"mlp/gate/kernel$", P("fsdp")),
)
DEFAULT_RULES: Rules = T5_RULES + LLAMA_RULES + MOE_RULES



# ----------------------------------------------------------------------------------------------
# Meshes


CPU_DEVICES_HINT = ("; on CPU, simulate {n} devices by setting XLA_FLAGS=--xla_force_host_platform_device_count={n} "
                    "in the environment before JAX starts")


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,fsdp=2,model=2' -> {'data': 2, 'fsdp': 2, 'model': 2}; missing axes are 1."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in sizes:
            raise ValueError(f"bad mesh entry {part!r} in {spec!r}: expected name=size with name in {AXES}")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ValueError(f"bad mesh size {value.strip()!r} for axis {name!r} in {spec!r}") from None
        if sizes[name] < 1:
            raise ValueError(f"mesh axis {name!r} must be at least 1, got {sizes[name]} in {spec!r}")
    return sizes


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "model") mesh over the first data*fsdp*model devices (all of them when multi-process)."""
    devices = list(jax.devices() if devices is None else devices)
    n = data * fsdp * model
    if min(data, fsdp, model) < 1:
        raise ValueError(f"mesh axes must be at least 1, got data={data}, fsdp={fsdp}, model={model}")
    if len(devices) % n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} x model={model} = {n} devices does not divide the {len(devices)} available"
                         + (CPU_DEVICES_HINT.format(n=n) if devices[0].platform == "cpu" else ""))
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"a multi-process mesh must cover all {len(devices)} devices, got {n}")
    # Auto axes: jit's in/out shardings drive GSPMD propagation, the model code carries no sharding types.
    return jax.make_mesh((data, fsdp, model), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:n])


def mesh_from_string(spec: str | Mesh | None) -> Mesh:
    """A mesh from the CLI string ('data=2,fsdp=2,model=2'); None or '' is the 1-device mesh; a Mesh passes through."""
    if isinstance(spec, Mesh):
        return spec
    return make_mesh(**parse_mesh(spec or ""))


# ----------------------------------------------------------------------------------------------
# Partition rules


def rule_spec(path: str, rules: Rules = DEFAULT_RULES) -> P:
    """The spec the first matching rule gives a base-model leaf (replicated when none matches)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return spec
    return P()


def _dims(spec: P, ndim: int) -> list:
    return list(spec) + [None] * (ndim - len(spec))


def _fit(spec: P, shape: Sequence[int], axis_sizes: Mapping[str, int]) -> tuple[P, bool]:
    """`spec` with every dimension that its axes would split unevenly replicated; and whether any was."""
    dims, uneven = _dims(spec, len(shape)), False
    for i, axis in enumerate(dims):
        if axis is None:
            continue
        names = axis if isinstance(axis, tuple) else (axis,)
        if any(a not in axis_sizes for a in names):
            raise ValueError(f"partition spec {spec} names an axis the mesh {dict(axis_sizes)} does not have")
        if shape[i] % int(np.prod([axis_sizes[a] for a in names])):
            dims[i], uneven = None, True
    return (P(*dims) if any(d is not None for d in dims) else P()), uneven


def _peft_spec(path: str, shape: Sequence[int], shapes: Mapping[str, Sequence[int]], rules: Rules, axis_sizes: Mapping[str, int]) -> P:
    """A method leaf's dims that span its weight's input or output (as the method declares) take the kernel's spec
    there; ranks, factors and stacked-adapter dims stay whole."""
    module, _, name = path.rpartition("/")
    kernel_shape, declared = shapes.get(f"{module}/kernel"), leaves.leaf(name)
    if declared is None or kernel_shape is None or not any(declared.dims):
        return P()
    kernel, _ = _fit(rule_spec(f"{module}/kernel", rules), kernel_shape, axis_sizes)
    *stack, d_in, d_out = _dims(kernel, len(kernel_shape))  # routed experts' (X, in, out) lead with their expert axis
    stack = stack if any(declared.dims) else []  # (as `leaves.fits`): the leaf leads with the kernel's axes, then its own
    kernel_dims = {leaves.IN: d_in, leaves.OUT: d_out}
    lead = [None] * (len(shape) - len(declared.dims) - len(stack))  # stacked adapters' dims stay whole
    return P(*lead, *stack, *(kernel_dims.get(d) for d in declared.dims))


def _quantized_spec(path: str, shape: Sequence[int], kernels: Mapping[str, Sequence[int]], rules: Rules) -> P:
    """A quantized leaf's rows take its kernel's output-dim spec (and routed experts' groups, which lead with the expert
    axis, that axis's spec); everything else of it is whole."""
    module, _, leaf = path.rpartition("/")
    if leaf not in quant.ROW_LEAVES:
        return P()
    *stack, _, out_axis = _dims(rule_spec(f"{module}/kernel", rules), len(kernels[f"{module}/kernel"]))
    return P(*stack, out_axis, *[None] * (len(shape) - len(stack) - 1))


def param_specs(params: Mapping[str, Any], axis_sizes: Mapping[str, int], rules: Rules = DEFAULT_RULES,
                replicate_adapters: bool = False, warn: bool = True) -> dict:
    """A tree of PartitionSpecs for `params` (arrays or ShapeDtypeStructs; None leaves stay None).

    `axis_sizes` is `mesh.shape` (or any {axis: size}); uneven dimensions fall back to replication,
    listed in one warning. PEFT leaves read the spec of the kernel beside them, so pass the whole
    tree (`combine(trainable, frozen)`, as `step_shardings` does): a LoRA leaf without its kernel is replicated.
    """
    flat = {p: v for p, v in tree.flatten(params).items() if v is not None}
    shapes = {p: tuple(v.shape) for p, v in flat.items()}
    kernels = quant.float_shapes(tree.unflatten(flat))  # a quantized weight as the (in, out) kernel it stands for
    specs, uneven = {}, []
    for path, shape in shapes.items():
        if split.is_adapter_path(path):
            spec = P() if replicate_adapters else _peft_spec(path, shape, kernels, rules, axis_sizes)
        elif quant.is_quantized_leaf(path):
            spec = _quantized_spec(path, shape, kernels, rules)
        else:
            spec = rule_spec(path, rules)
        if len(spec) > len(shape):
            raise ValueError(f"partition rule {spec} has more dimensions than {path} {shape}")
        specs[path], bad = _fit(spec, shape, axis_sizes)
        if bad:
            uneven.append(f"{path} {shape} {spec}")
    if uneven and warn:
        warnings.warn(f"replicating dimensions the mesh {dict(axis_sizes)} does not divide evenly: " + "; ".join(sorted(uneven)), stacklevel=2)
    return tree.unflatten({p: specs.get(p) for p in tree.flatten(params)})


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpecs -> NamedShardings on `mesh` (None stays None)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def param_shardings(params: Mapping[str, Any], mesh: Mesh, rules: Rules = DEFAULT_RULES, replicate_adapters: bool = False) -> dict:
    """NamedShardings for a whole parameter tree on `mesh` (see `param_specs`; `step_shardings` splits them)."""
    return named(mesh, param_specs(params, mesh.shape, rules, replicate_adapters))


def state_shardings(tx: optax.GradientTransformation, params: Mapping[str, Any], shardings: Mapping[str, Any], mesh: Mesh) -> Any:
    """Shardings for `tx.init(params)`: a leaf whose dict-key path ends with a parameter's path and has its shape follows it.

    Everything else (step counts, scalars) is replicated. Works for masked / multi-transform states,
    whose parameter-shaped trees sit under extra keys.
    """
    flat_params = {p: v for p, v in tree.flatten(params).items() if v is not None}
    flat_shardings = tree.flatten(shardings)
    replicated = NamedSharding(mesh, P())

    def follow(key_path, leaf):
        keys = [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
        for start in range(len(keys)):
            path = tree.SEP.join(keys[start:])
            if path in flat_params and tuple(flat_params[path].shape) == tuple(leaf.shape):
                return flat_shardings[path]
        return replicated

    return jax.tree_util.tree_map_with_path(follow, jax.eval_shape(tx.init, params))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) dimension split over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


# ----------------------------------------------------------------------------------------------
# Placement


def _put(x: Any, sharding: NamedSharding, copy: bool) -> jax.Array:
    if copy and isinstance(x, jax.Array):
        x = jnp.copy(x)  # device_put(may_alias=False) still aliases a replicated target's first shard (jax 0.10)
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    # Multi-process from a host value every process holds: each one supplies only its own shards.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(values: Any, shardings: Any, copy: bool = False) -> Any:
    """Put every array of `values` on its sharding (a tree of the same structure; None leaves stay None).

    Without `copy` a result may share buffers with its input, so donating it deletes the input too.
    """
    return jax.tree.map(lambda x, s: _put(x, s, copy), values, shardings)


def shard_params(params: Mapping[str, Any], mesh: Mesh, rules: Rules = DEFAULT_RULES, replicate_adapters: bool = False) -> dict:
    """`params` placed on `mesh` by the partition rules."""
    return place(params, param_shardings(params, mesh, rules, replicate_adapters))


def place_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict:
    """A batch split over ("data", "fsdp"); in multi-process runs each process passes its own slice of the global batch."""
    sharding = batch_sharding(mesh)
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if sharding.is_fully_addressable:
        for name, x in batch.items():
            if np.shape(x)[0] % ways:
                raise ValueError(f"batch[{name!r}] has {np.shape(x)[0]} rows, which data x fsdp = {ways} does not divide")
        return {k: jax.device_put(x, sharding) for k, x in batch.items()}
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(x)) for k, x in batch.items()}


def gather(values: Any) -> Any:
    """Host numpy copies of (possibly sharded, possibly multi-process) arrays, for saving; None stays None."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, values)


# ----------------------------------------------------------------------------------------------
# The sharded train step


class Shardings(NamedTuple):
    """NamedShardings for the train step's arguments."""

    trainable: Any
    frozen: Any
    opt_state: Any
    batch: NamedSharding
    replicated: NamedSharding


def step_shardings(tx: optax.GradientTransformation, mesh: Mesh, trainable: Mapping[str, Any], frozen: Mapping[str, Any],
                   rules: Rules = DEFAULT_RULES, replicate_adapters: bool = False) -> Shardings:
    """Shardings for (trainable, frozen, opt_state, batch) from the rules; each PEFT leaf sees its kernel in `frozen`."""
    full = split.combine(trainable, frozen)
    specs = tree.flatten(param_specs(full, mesh.shape, rules, replicate_adapters))
    pick = lambda part: named(mesh, tree.unflatten({p: specs[p] if v is not None else None for p, v in tree.flatten(part).items()}))
    t_sh, f_sh = pick(trainable), pick(frozen)
    return Shardings(t_sh, f_sh, state_shardings(tx, trainable, t_sh, mesh), batch_sharding(mesh), NamedSharding(mesh, P()))


def make_sharded_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, mesh: Mesh,
                            trainable: Mapping[str, Any], frozen: Mapping[str, Any], rules: Rules = DEFAULT_RULES,
                            replicate_adapters: bool = False) -> tuple[Callable, Shardings]:
    """(`training.make_train_step`'s step jitted with NamedSharding in/out shardings on `mesh`, the shardings).

    Same signature and donation as the unsharded step: (trainable, opt_state, frozen, batch, rng) ->
    (trainable, opt_state, loss); the loss comes back replicated.
    """
    sh = step_shardings(tx, mesh, trainable, frozen, rules, replicate_adapters)
    train_step = make_train_step(loss_fn, tx)

    def on_mesh(*args):
        # what the layout hints (`losses.take_rows`, `nn.keep_rows_sharded`: activations split by rows) see
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return train_step(*args)

    step = jax.jit(on_mesh,
                   in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.batch, sh.replicated),
                   out_shardings=(sh.trainable, sh.opt_state, sh.replicated),
                   donate_argnums=(0, 1))
    return step, sh


class Placed(NamedTuple):
    """Everything a training loop needs on the mesh: placed trees, the jitted step and a batch placer."""

    mesh: Mesh
    trainable: Any
    frozen: Any
    opt_state: Any
    batch: Any
    step: Callable
    place_batch: Callable[[Mapping[str, Any]], dict]
    shardings: Shardings


def setup(mesh: str | Mesh | None, loss_fn: LossFn, tx: optax.GradientTransformation, trainable: Mapping[str, Any],
          frozen: Mapping[str, Any], opt_state: Any, batch: Mapping[str, Any] | None = None, rules: Rules = DEFAULT_RULES,
          replicate_adapters: bool = False) -> Placed:
    """One call for a CLI: build the mesh from its string, place trainable / frozen / opt_state / batch, jit the step.

    The placed trainable and opt_state are copies (the step donates them), so the trees passed in stay usable.
    """
    mesh = mesh_from_string(mesh)
    step, sh = make_sharded_train_step(loss_fn, tx, mesh, trainable, frozen, rules, replicate_adapters)
    placed_batch = None if batch is None else place_batch(batch, mesh)
    return Placed(mesh, place(trainable, sh.trainable, copy=True), place(frozen, sh.frozen), place(opt_state, sh.opt_state, copy=True),
                  placed_batch, step, lambda b: place_batch(b, mesh), sh)


# ----------------------------------------------------------------------------------------------
# Multi-host


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                     local_device_ids: Sequence[int] | None = None) -> None:
    """`jax.distributed.initialize` (all None: auto-detected on TPU pods / SLURM / Open MPI); call before any other JAX call."""
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
