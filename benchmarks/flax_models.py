"""LoRA on a third-party Flax model: jpeft beside qwix 0.1.8 and full fine-tuning, on a GPT-2-small-shaped decoder.

The same decoder is written for Linen and for NNX (12 layers, d 768, 12 heads, vocabulary 50,257, batch 4 x 256;
`--quick` shrinks it), LoRA r=16 on q/k/v/o and the MLP. Each variant is one jitted AdamW step that differentiates
only what trains; step time is the median over interleaved repeats, memory is XLA's peak for the compiled step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jpeft
from benchmarks import speed
from jpeft import linen
from jpeft import nnx as jnnx

TARGETS = ["q", "k", "v", "o", "up", "down"]
RANK, ALPHA = 16, 32.0


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int = 12
    d: int = 768
    heads: int = 12
    vocab: int = 50257
    batch: int = 4
    seq: int = 256


QUICK = Shape(layers=2, d=128, heads=4, vocab=1000, batch=2, seq=64)


def _attend(q, k, v, heads):
    b, s, d = q.shape
    q, k, v = (t.reshape(b, s, heads, d // heads) for t in (q, k, v))
    scores = jnp.einsum("bshk,bthk->bhst", q, k) / np.sqrt(d // heads)
    scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -1e9)
    return jnp.einsum("bhst,bthk->bshk", jax.nn.softmax(scores, axis=-1), v).reshape(b, s, d)


class LinenBlock(fnn.Module):
    shape: Shape

    @fnn.compact
    def __call__(self, x):
        d = self.shape.d
        h = fnn.LayerNorm(name="ln1")(x)
        x = x + fnn.Dense(d, name="o")(_attend(fnn.Dense(d, name="q")(h), fnn.Dense(d, name="k")(h), fnn.Dense(d, name="v")(h), self.shape.heads))
        h = fnn.LayerNorm(name="ln2")(x)
        return x + fnn.Dense(d, name="down")(jax.nn.gelu(fnn.Dense(4 * d, name="up")(h)))


class LinenDecoder(fnn.Module):
    shape: Shape

    @fnn.compact
    def __call__(self, ids):
        embed = fnn.Embed(self.shape.vocab, self.shape.d, name="wte")
        x = embed(ids) + self.param("wpe", fnn.initializers.normal(0.02), (self.shape.seq, self.shape.d))
        for i in range(self.shape.layers):
            x = LinenBlock(self.shape, name=f"h_{i}")(x)
        return embed.attend(fnn.LayerNorm(name="ln_f")(x))


class NnxBlock(nnx.Module):
    def __init__(self, shape: Shape, rngs: nnx.Rngs):
        d = shape.d
        self.heads = shape.heads
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.q, self.k, self.v, self.o = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))
        self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        h = self.ln1(x)
        x = x + self.o(_attend(self.q(h), self.k(h), self.v(h), self.heads))
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class NnxDecoder(nnx.Module):
    def __init__(self, shape: Shape, rngs: nnx.Rngs):
        self.wte = nnx.Embed(shape.vocab, shape.d, rngs=rngs)
        self.wpe = nnx.Param(jax.random.normal(rngs.params(), (shape.seq, shape.d)) * 0.02)
        self.h = nnx.List([NnxBlock(shape, rngs) for _ in range(shape.layers)])
        self.ln_f = nnx.LayerNorm(shape.d, rngs=rngs)

    def __call__(self, ids):
        x = self.wte(ids) + self.wpe[...]
        for block in self.h:
            x = block(x)
        return self.wte.attend(self.ln_f(x))


def _xent(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


class Trainer:
    """One compiled AdamW step of `loss(trainable, frozen, ids)`, with its XLA peak memory."""

    def __init__(self, loss: Callable, trainable: Any, frozen: Any, ids: jax.Array, expect_leaves: int | None = None):
        n = len([x for x in jax.tree.leaves(trainable) if x is not None])
        if expect_leaves is not None and n != expect_leaves:  # e.g. a module path that matched nothing: no comparison
            raise RuntimeError(f"{n} trainable leaves, expected {expect_leaves}")
        tx = optax.adamw(1e-4)

        def step(trainable, opt_state, frozen, ids):
            value, grads = jax.value_and_grad(loss)(trainable, frozen, ids)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, value

        self.state = [jax.tree.map(jnp.copy, trainable), tx.init(trainable)]
        self.frozen, self.ids = frozen, ids
        self.compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*self.state, frozen, ids).compile()

    def __call__(self) -> float:
        self.state[0], self.state[1], loss = self.compiled(*self.state, self.frozen, self.ids)
        return float(loss)

    def peak_bytes(self) -> int:
        m = self.compiled.memory_analysis()
        return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def _by_name(tree: Any, keep: Callable[[str], bool]) -> tuple[dict, dict]:
    """(leaves whose path `keep` accepts, the rest), as two trees with None in the other's places."""
    mask = jax.tree_util.tree_map_with_path(lambda p, _: keep(jax.tree_util.keystr(p)), tree)
    return jpeft.partition(tree, mask)


def linen_trainers(shape: Shape) -> dict[str, Trainer]:
    """jpeft LoRA, qwix LoRA and full fine-tuning of the Linen decoder."""
    import qwix

    model, ids = LinenDecoder(shape), jax.random.randint(jax.random.key(0), (shape.batch, shape.seq), 0, shape.vocab)
    params = model.init(jax.random.key(1), ids)["params"]
    ours = linen.inject(model, params, jpeft.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS), jax.random.key(2), ids)
    t, f = jpeft.partition(ours, jpeft.trainable_mask(ours))
    lora_leaves = 2 * len(TARGETS) * shape.layers
    out = {"jpeft": Trainer(lambda t, f, ids: _xent(linen.apply(model, {"params": jpeft.combine(t, f)}, ids), ids), t, f, ids, lora_leaves)}
    qmodel = qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=r".*h_\d+/(q|k|v|o|up|down)", rank=RANK, alpha=ALPHA))
    theirs = qmodel.init(jax.random.key(1), ids)["params"]
    t, f = _by_name(theirs, lambda path: "_lora_" in path)
    out["qwix"] = Trainer(lambda t, f, ids: _xent(qmodel.apply({"params": jpeft.combine(t, f)}, ids), ids), t, f, ids, lora_leaves)
    out["full"] = Trainer(lambda t, f, ids: _xent(model.apply({"params": t}, ids), ids), params, {}, ids)
    return out


def nnx_trainers(shape: Shape) -> dict[str, Trainer]:
    """jpeft LoRA and qwix LoRA on the NNX decoder, trained through `nnx.split` / `nnx.merge`."""
    import qwix

    ids = jax.random.randint(jax.random.key(0), (shape.batch, shape.seq), 0, shape.vocab)
    config = jpeft.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS)
    ours = jnnx.inject(NnxDecoder(shape, nnx.Rngs(1)), config, jax.random.key(2))
    theirs = qwix.apply_lora_to_model(NnxDecoder(shape, nnx.Rngs(1)), qwix.LoraProvider(module_path=r".*h/\d+/(q|k|v|o|up|down)", rank=RANK,
                                                                                        alpha=ALPHA), ids, rngs=nnx.Rngs(3))
    out = {}
    for name, model in (("jpeft", ours), ("qwix", theirs)):
        graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
        out[name] = Trainer(lambda t, f, ids, g=graphdef: _xent(nnx.merge(g, t, f)(ids), ids), lora_state, rest, ids,
                            2 * len(TARGETS) * shape.layers)
    return out


def run(quick: bool = False, warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """The flax section's figures: step times, XLA peaks and the three headline ratios."""
    shape = QUICK if quick else Shape()
    out: dict[str, float] = {"flax_shape_layers": shape.layers, "flax_shape_d": shape.d, "flax_tokens_per_step": shape.batch * shape.seq}
    for family, make in (("linen", linen_trainers), ("nnx", nnx_trainers)):
        trainers = make(shape)
        out.update(speed.timed_together({f"flax_{family}_{name}_step": t for name, t in trainers.items()}, warmup, repeats))
        out.update({f"flax_{family}_{name}_peak_bytes": t.peak_bytes() for name, t in trainers.items()})
        del trainers
    out["jpeft_over_qwix_step_time"] = out["flax_linen_jpeft_step_s"] / out["flax_linen_qwix_step_s"]
    out["jpeft_over_qwix_peak_memory"] = out["flax_linen_jpeft_peak_bytes"] / out["flax_linen_qwix_peak_bytes"]
    out["jpeft_over_qwix_nnx_step_time"] = out["flax_nnx_jpeft_step_s"] / out["flax_nnx_qwix_step_s"]
    out["jpeft_over_qwix_nnx_peak_memory"] = out["flax_nnx_jpeft_peak_bytes"] / out["flax_nnx_qwix_peak_bytes"]
    out["flax_lora_over_full_step_time"] = out["flax_linen_jpeft_step_s"] / out["flax_linen_full_step_s"]
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
