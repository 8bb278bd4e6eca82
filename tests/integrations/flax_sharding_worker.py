"""Run with 8 simulated CPU devices: a Linen and an NNX model with partitioning annotations, with LoRA from jpeft,
sharded on the ("data", "fsdp", "model") mesh by the annotations alone, against the same model on one device."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"  # beside the suite's flags

import flax.linen as fnn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jpeft  # noqa: E402
from jpeft import linen, sharding  # noqa: E402
from jpeft import nnx as jnnx  # noqa: E402

D, H, K, V = 32, 4, 8, 64
IDS = np.asarray(jax.random.randint(jax.random.key(0), (8, 16), 0, V))
init = fnn.initializers.normal(0.2)


class Block(fnn.Module):
    @fnn.compact
    def __call__(self, x, _):
        q = fnn.DenseGeneral((H, K), kernel_init=fnn.with_partitioning(init, ("fsdp", "model", None)), name="query")(x)
        v = fnn.Einsum((D, H, K), "bsd,dhk->bshk", kernel_init=fnn.with_partitioning(init, ("fsdp", "model", None)), name="value")(x)
        att = jax.nn.softmax(jnp.einsum("bshk,bthk->bhst", q, q), axis=-1)
        o = fnn.DenseGeneral(D, axis=(-2, -1), kernel_init=fnn.with_partitioning(init, ("model", None, "fsdp")), name="out")(
            jnp.einsum("bhst,bthk->bshk", att, v))
        return x + o, None


class LinenModel(fnn.Module):
    @fnn.compact
    def __call__(self, ids):
        x = fnn.Embed(V, D, embedding_init=fnn.with_partitioning(init, ("model", "fsdp")), name="embed")(ids)
        stack = fnn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2,
                         metadata_params={fnn.PARTITION_NAME: None})
        x, _ = stack(name="layers")(x, None)
        return jnp.mean(x ** 2)


def _randomize(tree):
    flat = jpeft.tree.flatten(tree)
    for i, path in enumerate(sorted(p for p in flat if p.endswith(("/lora_a", "/lora_b")))):
        box = flat[path]
        flat[path] = box.replace_boxed(0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(5), i), box.value.shape))
    return jpeft.tree.unflatten(flat)


def linen_case(mesh) -> dict:
    model = LinenModel()
    params = model.init(jax.random.key(1), IDS)["params"]
    boxed = _randomize(linen.inject(model, params, jpeft.LoraConfig(r=4, alpha=8, target_modules=["query", "value", "out", "embed"]),
                                    jax.random.key(2), IDS))
    specs = fnn.get_partition_spec(boxed)
    values = fnn.meta.unbox(boxed)
    trainable, frozen = jpeft.partition(values, jpeft.trainable_mask(values))

    def loss(t, f, ids):
        return linen.apply(model, {"params": jpeft.combine(t, f)}, ids)

    step = jax.jit(jax.value_and_grad(loss))
    one_loss, one_grads = step(trainable, frozen, IDS)
    place = lambda tree: jax.device_put(tree, jax.tree.map(lambda s: NamedSharding(mesh, s), jpeft.partition(specs, jpeft.trainable_mask(values))[0 if tree is trainable else 1]))  # noqa: E731
    sharded_t, sharded_f = place(trainable), place(frozen)
    ids = jax.device_put(IDS, NamedSharding(mesh, P(("data", "fsdp"))))
    mesh_loss, mesh_grads = step(sharded_t, sharded_f, ids)
    return {"one": float(one_loss), "mesh": float(mesh_loss),
            "grad_diff": max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(one_grads), jax.tree.leaves(mesh_grads))),
            "specs": {p: str(s) for p, s in jpeft.tree.flatten(specs).items() if "lora" in p or p.endswith(("kernel", "embedding"))},
            "placed": str(sharded_t["layers"]["query"]["lora_a"].sharding.spec)}


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, 2 * D, kernel_init=nnx.with_partitioning(init, ("fsdp", "model")), rngs=rngs)
        self.down = nnx.Linear(2 * D, D, kernel_init=nnx.with_partitioning(init, ("model", "fsdp")), rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, embedding_init=nnx.with_partitioning(init, ("model", "fsdp")), rngs=rngs)
        self.block = NnxBlock(rngs)

    def __call__(self, ids):
        return jnp.mean(self.block(self.embed(ids)) ** 2)


def nnx_case(mesh) -> dict:
    with jax.set_mesh(mesh):
        model = NnxModel(nnx.Rngs(0))
        jnnx.inject(model, jpeft.LoraConfig(r=4, alpha=8, target_modules=["up", "down"]), jax.random.key(1))
        for i, (_, var) in enumerate(nnx.iter_graph(model)):
            if isinstance(var, nnx.LoRAParam):
                var[...] = 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(3), i), var[...].shape)
        graphdef, state = nnx.split(model)
        specs = nnx.get_partition_spec(state)
        sharded = jax.device_put(state, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
        ids = jax.device_put(IDS, NamedSharding(mesh, P(("data", "fsdp"))))
        mesh_loss = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))(sharded, ids)
    one = jax.device_put(jax.device_get(state), jax.devices()[0])
    one_loss = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))(one, IDS)
    return {"one": float(one_loss), "mesh": float(mesh_loss), "a_spec": str(specs["block"]["up"]["lora_a"].get_value()),
            "b_spec": str(specs["block"]["up"]["lora_b"].get_value()),
            "placed": str(sharded["block"]["down"]["lora_b"].get_value().sharding.spec)}


if __name__ == "__main__":
    mesh = sharding.make_mesh(2, 2, 2)
    json.dump({"devices": jax.device_count(), "linen": linen_case(mesh), "nnx": nnx_case(mesh)}, open(sys.argv[1], "w"))
