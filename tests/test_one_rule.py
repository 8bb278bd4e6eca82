"""One rule for every method on every source of weights: each method x {T5, Llama, Gemma (jpeft's own), a Linen model
(nn.scan + nn.remat), an NNX model (nnx.vmap + nnx.scan)} x {float base, NF4 base (see NF4_METHODS)} gives the logits of the base model
on weights merged by hand here (W + s AB, DoRA's column rescaling, LoHa's Hadamard and LoKr's Kronecker products,
(IA)^3's scalings; a bottleneck adapter folded where its relu is the identity), starts as the base model where the
method's init is the identity, merges and unmerges, and saves and loads where the adapter file format holds it.

Tiny shapes (width 64, so NF4's 64-value blocks fit), one model per source, one compile per (method, source, base).
The Llama and T5 rows are compared with HF PEFT in their own tests (tests/methods); no torch here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import jpeft
from jpeft import leaves, linen, quant, tree
from jpeft import targets as tg
from jpeft import nnx as jnnx
from jpeft.methods import adapters, ia3, loha, lokr, lora, weights
from jpeft.models import gemma, llama, t5

D, H, K, F, V, LAYERS = 64, 4, 16, 128, 64, 2
IDS = np.random.default_rng(0).integers(2, V, (2, 6)).astype(np.int32)
MASK = np.ones_like(IDS)


class LinenBlock(fnn.Module):
    @fnn.compact
    def __call__(self, x, _):
        q = fnn.DenseGeneral((H, K), name="query")(x)                               # kernel (d, h, k)
        v = fnn.Einsum((H, D, K), "bsd,hdk->bshk", name="value")(x)                  # (h, d, k): contracted axis in the middle
        att = jax.nn.softmax(jnp.einsum("bshk,bthk->bhst", q, q) / 4.0, axis=-1)
        x = x + fnn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.einsum("bhst,bthk->bshk", att, v))  # (h, k, d)
        return x + fnn.Einsum((F, D), "bsf,fd->bsd", name="down")(jax.nn.gelu(fnn.Dense(F, name="up")(x))), None


class LinenModel(fnn.Module):
    @fnn.compact
    def __call__(self, ids):
        x = fnn.Embed(V, D, name="embed")(ids)
        stack = fnn.scan(fnn.remat(LinenBlock), variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        return fnn.Dense(V, name="head")(stack(name="layers")(x, None)[0])


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.query = nnx.LinearGeneral(D, (H, K), rngs=rngs)
        self.value = nnx.Einsum("bsd,hdk->bshk", (H, D, K), (H, K), rngs=rngs)
        self.out = nnx.LinearGeneral((H, K), D, axis=(-2, -1), rngs=rngs)
        self.up, self.down = nnx.Linear(D, F, rngs=rngs), nnx.Einsum("bsf,fd->bsd", (F, D), (D,), rngs=rngs)

    def __call__(self, x):
        q, v = self.query(x), self.value(x)
        att = jax.nn.softmax(jnp.einsum("bshk,bthk->bhst", q, q) / 4.0, axis=-1)
        x = x + self.out(jnp.einsum("bhst,bthk->bshk", att, v))
        return x + self.down(jax.nn.gelu(self.up(x)))


class NnxModel(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.split_rngs(splits=LAYERS)(nnx.vmap(lambda r: NnxBlock(r), in_axes=(0,), out_axes=0))(rngs)
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, ids):
        run = nnx.scan(nnx.remat(lambda x, block: block(x)), in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        return self.head(run(self.embed(ids), self.layers))


# The Flax models' weights seen as (in, out) matrices, by hand: the weight axes the input contracts, and the output
# axes (their biases hold the output axes in this order too).
FLAX_VIEWS = {"query": ((0,), (1, 2)), "value": ((1,), (0, 2)), "out": ((0, 1), (2,)), "up": ((0,), (1,)), "down": ((0,), (1,))}
FLAX_TARGETS = ["down", "query", "value", "out", "up"]


@dataclasses.dataclass
class Source:
    """A model as functions of a plain parameter tree."""

    targets: list[str]  # the layers each method adapts; the first is (IA)^3's feed-forward one
    base: dict  # the float base tree
    quantized: dict  # the NF4 base tree
    adapt: Callable[[Any, dict, jax.Array], dict]  # (config, base tree, key) -> tree with the method's fresh leaves
    run: Callable[[dict], jax.Array]  # logits of any tree: with leaves (the rule applies them) or plain, float or NF4
    merge: Callable[[dict], dict]
    unmerge: Callable[[dict, dict, Any], dict]  # (merged, adapter tree, DoRA norms or None)
    norms: Callable[[dict], Any]  # DoRA's norms, taken before merging
    views: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]  # layer name -> its weight's (in_axes, out_axes); default 2-D
    adapter_out: Callable[[str], tuple[str, str]]  # adapter holder -> (the module its input comes out of, "weight" | "norm")
    adapter_config: jpeft.AdapterConfig
    peft_files: bool  # whether methods other than LoRA fit PEFT's file layout here (2-D kernels, no stacked layers)


def _with_random_norms_and_biases(params: dict) -> dict:
    rng = np.random.default_rng(0)
    return tree.unflatten({p: v + 0.2 * rng.standard_normal(v.shape, np.float32) if p.endswith(("bias", "weight")) else v
                           for p, v in sorted(tree.flatten(params).items())})


def _own(family, config, targets: list[str], adapter_out: Callable[[str], tuple[str, str]]) -> Source:
    """T5, Llama or Gemma: jpeft's own functions of the tree."""
    base = _with_random_norms_and_biases(family.init_params(config, jax.random.key(1)))
    if family is t5:
        run = jax.jit(lambda p: t5.forward(config, p, IDS, MASK, IDS[:, ::-1]))
    else:
        run = jax.jit(lambda p: family.forward(config, p, IDS, MASK))
    inject = {lora.LoraConfig: lora.inject, ia3.IA3Config: ia3.inject, jpeft.LoHaConfig: loha.inject, jpeft.LoKrConfig: lokr.inject,
              jpeft.AdapterConfig: adapters.inject}
    return Source(targets, base, quant.quantize(base, "nf4"), lambda cfg, b, key: inject[type(cfg)](b, cfg, key), run,
                  merge=lambda p: weights.merge(p, _method(p)), unmerge=lambda m, a, n: weights.unmerge(m, a, _method(a), n),
                  norms=lora.dora_norms, views={}, adapter_out=adapter_out, adapter_config=jpeft.AdapterConfig(reduction_factor=16),
                  peft_files=True)


def _method(p: dict) -> leaves.Method:
    return next(m for m in leaves.METHODS if any(path.rsplit("/", 1)[-1] in m.markers for path in tree.flatten(p)))


def _linen() -> Source:
    model = LinenModel()
    base = _with_random_norms_and_biases(model.init(jax.random.key(1), IDS)["params"])
    run = jax.jit(lambda p: linen.apply(model, {"params": p}, IDS))
    return Source(FLAX_TARGETS, base, linen.quantize(model, base, "nf4", IDS, targets=list(FLAX_VIEWS)),
                  adapt=lambda cfg, b, key: linen.inject(model, b, cfg, key, IDS), run=run, merge=lambda p: linen.merge(model, p, IDS),
                  unmerge=lambda merged, adapter, norms: linen.unmerge(model, merged, adapter, IDS, norms=norms),
                  norms=lambda p: linen.dora_norms(model, p, IDS), views=FLAX_VIEWS, adapter_out=lambda path: (path, "weight"),
                  adapter_config=jpeft.AdapterConfig(reduction_factor=16, target_modules=["out", "down"]), peft_files=False)


class _NnxTrees:
    """NNX models as functions of their pure-dict state: each tree structure met (plain, quantized, adapted by a method)
    keeps the graph it came from and one jitted call."""

    def __init__(self):
        self.graphs: dict[tuple, tuple[Any, Any, Callable]] = {}

    def tree(self, model: nnx.Module) -> dict:
        p = nnx.to_pure_dict(nnx.state(model))
        if (key := _structure(p)) not in self.graphs:
            graphdef, state = nnx.split(model)
            self.graphs[key] = graphdef, state, jax.jit(lambda s: nnx.merge(graphdef, s)(IDS))
        return p

    def _state(self, p: dict) -> tuple[Any, Any, Callable]:
        graphdef, state, call = self.graphs[_structure(p)]
        state = jax.tree.map(lambda x: x, state)
        nnx.replace_by_pure_dict(state, p)
        return graphdef, state, call

    def model(self, p: dict) -> nnx.Module:
        graphdef, state, _ = self._state(p)
        return nnx.merge(graphdef, state)

    def run(self, p: dict) -> jax.Array:
        _, state, call = self._state(p)
        return call(state)


def _nnx() -> Source:
    trees = _NnxTrees()
    model = NnxModel()
    base = _with_random_norms_and_biases(trees.tree(model))
    nnx.replace_by_pure_dict(state := nnx.state(model), base)
    nnx.update(model, state)
    trees.tree(model)
    quantized = trees.tree(jnnx.quantize(trees.model(base), "nf4", targets=list(FLAX_VIEWS)))

    def unmerge(merged, adapter, norms):
        return trees.tree(jnnx.unmerge(trees.model(merged), adapter, norms))

    def merge(p):
        m = trees.model(p)
        jnnx.merge(m)
        return trees.tree(m)

    return Source(FLAX_TARGETS, base, quantized, adapt=lambda cfg, b, key: trees.tree(jnnx.inject(trees.model(b), cfg, key)),
                  run=trees.run, merge=merge, unmerge=unmerge, norms=lambda p: jnnx.dora_norms(trees.model(p)), views=FLAX_VIEWS,
                  adapter_out=lambda path: (path, "weight"),
                  adapter_config=jpeft.AdapterConfig(reduction_factor=16, target_modules=["out", "down"]), peft_files=False)


def _structure(p: dict) -> tuple:
    return tuple(sorted((k, tuple(np.shape(v))) for k, v in tree.flatten(p).items()))


def _t5() -> Source:
    config = t5.Arch(vocab_size=V, d_model=D, d_kv=K, d_ff=F, num_layers=1, num_decoder_layers=1, num_heads=H, num_buckets=8,
                     max_distance=20, eps=1e-6, is_gated_act=True, act="gelu_new", scale_decoder_outputs=False, dropout_rate=0.0,
                     pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    out = {"SelfAttention": "o", "EncDecAttention": "o", "DenseReluDense": "wo"}
    return _own(t5, config, ["wo", "q", "v", "o"], lambda path: (f"{path}/{out[path.rsplit('/', 1)[-1]]}", "weight"))


def _llama() -> Source:
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=1, num_attention_heads=H,
                                      num_key_value_heads=2, head_dim=K, pad_token_id=0, eos_token_id=1)
    out = {"self_attn": "o_proj", "mlp": "down_proj"}
    return _own(llama, config, ["down_proj", "q_proj", "v_proj", "o_proj"], lambda path: (f"{path}/{out[path.rsplit('/', 1)[-1]]}", "weight"))


def _gemma() -> Source:
    config = transformers.Gemma3TextConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=1, num_attention_heads=H,
                                           num_key_value_heads=2, head_dim=K, pad_token_id=0, eos_token_id=1, sliding_window=4)
    norm = {"self_attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}  # Gemma's adapters follow these norms
    return _own(gemma, config, ["down_proj", "q_proj", "v_proj", "o_proj"],
                lambda path: (f"{path.rsplit('/', 1)[0]}/{norm[path.rsplit('/', 1)[-1]]}", "norm"))


SOURCES = {"t5": _t5, "llama": _llama, "gemma": _gemma, "linen": _linen, "nnx": _nnx}


@pytest.fixture(scope="module")
def sources() -> dict[str, Source]:
    return {}


def _source(sources: dict, name: str) -> Source:
    if name not in sources:
        sources[name] = SOURCES[name]()
    return sources[name]


# ----------------------------------------------------------------------------------------------
# Methods, and the merge each one means, written out here on (in, out) matrices


def _configs(src: Source) -> dict[str, Any]:
    t = src.targets
    return {
        # rsLoRA and rank / alpha patterns only change each layer's r and scale (plain alpha / r: tests/methods, HF PEFT)
        "lora": jpeft.LoraConfig(r=4, alpha=8, target_modules=t, use_rslora=True, rank_pattern={t[1]: 2}, alpha_pattern={t[2]: 3}),
        "pissa": jpeft.LoraConfig(r=4, alpha=8, target_modules=t, init="pissa"),
        "dora": jpeft.LoraConfig(r=4, alpha=8, target_modules=t, use_dora=True),
        "loha": jpeft.LoHaConfig(r=4, alpha=8, target_modules=t),
        "lokr": jpeft.LoKrConfig(r=4, alpha=8, target_modules=t),
        "ia3": jpeft.IA3Config(target_modules=t, feedforward_modules=t[:1]),
        "adapters": src.adapter_config,
    }


METHODS = ["lora", "pissa", "dora", "loha", "lokr", "ia3", "adapters"]
IDENTITY_AT_INIT = {"lora", "loha", "lokr", "ia3", "adapters"}  # exactly the base before training


def _randomized(p: dict, seed: int) -> dict:
    """Every trained leaf moved off its init, as training would; a bottleneck adapter set where its relu is the identity
    (down's bias 50) and its output a per-feature scaling of its input (down selects the first features, up scales
    them back, up's bias cancels down's), so it folds into the weights by hand."""
    rng = np.random.default_rng(seed)
    flat = tree.flatten(p)
    for path, v in sorted(flat.items()):
        name = path.rsplit("/", 1)[-1]
        noise = rng.standard_normal(np.shape(v)).astype(np.float32)
        if "/adapter/" in path or not leaves.is_peft_leaf(name) or not leaves.leaf(name).trainable:
            continue
        flat[path] = 1 + 0.3 * noise if name.startswith("ia3_") else v * (1 + 0.2 * noise) if name == lora.MAGNITUDE else 0.3 * noise
    for holder in sorted({path.split("/adapter/")[0] for path in flat if "/adapter/" in path}):
        *lead, d, w = np.shape(flat[f"{holder}/adapter/down/kernel"])
        u = 0.5 * rng.standard_normal((*lead, w)).astype(np.float32)
        up = np.zeros((*lead, w, d), np.float32)
        up[..., np.arange(w), np.arange(w)] = u
        flat[f"{holder}/adapter/down/kernel"] = np.broadcast_to(np.eye(d, w, dtype=np.float32), (*lead, d, w)).copy()
        flat[f"{holder}/adapter/down/bias"] = np.full((*lead, w), 50.0, np.float32)
        flat[f"{holder}/adapter/up/kernel"], flat[f"{holder}/adapter/up/bias"] = up, -50.0 * up.sum(axis=-2)
    return tree.unflatten(flat)


def _matrix(w, view):
    """A weight (*shape) as its (in, out) matrix."""
    ins, outs = view
    return np.transpose(w, ins + outs).reshape(math.prod(w.shape[a] for a in ins), -1)


def _unmatrix(m, view, shape):
    ins, outs = view
    return np.transpose(m.reshape([shape[a] for a in ins + outs]), np.argsort(ins + outs))


def _leaf_matrix(name: str, v):
    """A leaf in its layer's axes as a matrix: A-like leaves (*in, r), B-like (r, *out), vectors along in or out."""
    if name in ("lora_a", "loha_w1_b", "loha_w2_b"):
        return v.reshape(-1, v.shape[-1])
    if name in ("lora_b", "loha_w1_a", "loha_w2_a"):
        return v.reshape(v.shape[0], -1)
    return v.reshape(-1) if name in (lora.MAGNITUDE, "ia3_in", "ia3_out") else v


def _merged_matrix(w, held: dict, bias):
    """(W', bias') of one layer: W (in, out) with its leaves folded in, by the formulas of the methods' papers (float64)."""
    m = {n: _leaf_matrix(n, np.asarray(v, np.float64)) for n, v in held.items()}
    if "lora_a" in m:
        w = w + m["lora_scale"] * m["lora_a"] @ m["lora_b"]
        if lora.MAGNITUDE in m:
            w = w * m[lora.MAGNITUDE] / np.linalg.norm(w, axis=0)
    if "loha_scale" in m:
        w = w + (m["loha_w1_b"] @ m["loha_w1_a"]) * (m["loha_w2_b"] @ m["loha_w2_a"]) * m["loha_scale"]
    if "lokr_scale" in m:
        factor = lambda n: m[f"lokr_{n}"] if f"lokr_{n}" in m else m[f"lokr_{n}_b"] @ m[f"lokr_{n}_a"]  # noqa: E731
        w = w + np.kron(factor("w1"), factor("w2")) * m["lokr_scale"]
    if "ia3_in" in m:
        w = w * m["ia3_in"][:, None]
    if "ia3_out" in m:
        w, bias = w * m["ia3_out"][None, :], None if bias is None else bias * m["ia3_out"]
    return w, bias


def _per_layer(w, view, fn):
    """fn applied to each stacked layer's (in, out) matrix of w (*lead, *shape), the result back in w's layout."""
    lead = w.shape[: w.ndim - len(view[0]) - len(view[1])]
    out = np.empty(w.shape, np.float64)
    for i in np.ndindex(*lead):
        out[i] = _unmatrix(fn(i, _matrix(np.asarray(w[i], np.float64), view)), view, w.shape[len(lead):])
    return out


_dequantized = jax.jit(quant.weight)


def _merged_by_hand(src: Source, p: dict) -> dict:
    """The float base tree the adapted tree `p` stands for: quantized weights dequantized, every method folded in."""
    flat = {k: np.asarray(v) for k, v in tree.flatten(p).items()}
    out = {k: v for k, v in flat.items() if not leaves.is_adapter_path(k) and not quant.is_quantized_leaf(k)}
    base = tree.flatten(src.base)
    view_of = lambda path: src.views.get(path.rsplit("/", 1)[-1], ((0,), (1,)))  # noqa: E731
    for name in quant.quantized_modules(p):  # dequantized, each stacked layer's (in, out) matrix back in the layer's layout
        path = name.replace(".", "/")
        group = {k: np.asarray(v) for k, v in quant.leaves(tg.get_module(p, name)).items()}
        lead = np.shape(group[quant.NF4])[:-2]
        out[f"{path}/kernel"] = _per_layer(np.zeros(base[f"{path}/kernel"].shape), view_of(path),
                                           lambda i, _: np.asarray(_dequantized({k: v[i] for k, v in group.items()})))
        assert lead == base[f"{path}/kernel"].shape[: len(lead)]
    for path in sorted({k.rsplit("/", 1)[0] for k in flat if leaves.is_peft_leaf(k.rsplit("/", 1)[-1])}):
        held = {k.rsplit("/", 1)[-1]: v for k, v in flat.items() if k.rsplit("/", 1)[0] == path and leaves.is_peft_leaf(k.rsplit("/", 1)[-1])}
        bias, biases = out.get(f"{path}/bias"), {}

        def merge(i, w, held=held, bias=bias, biases=biases):
            w, biases[i] = _merged_matrix(w, {k: v[i] for k, v in held.items()}, None if bias is None else np.asarray(bias[i], np.float64).reshape(-1))
            return w

        out[f"{path}/kernel"] = _per_layer(out[f"{path}/kernel"], view_of(path), merge)
        if bias is not None:
            out[f"{path}/bias"] = np.stack([biases[i] for i in sorted(biases)]).reshape(bias.shape)
    for holder in sorted({k.split("/adapter/")[0] for k in flat if "/adapter/" in k}):
        scale = 1 + np.diagonal(flat[f"{holder}/adapter/up/kernel"], axis1=-2, axis2=-1)  # (*lead, w): of its first w features
        target, how = src.adapter_out(holder)
        if how == "norm":  # Gemma's post-norm x (1 + w), then the adapter's scaling
            w = np.asarray(out[f"{target}/weight"], np.float64)
            out[f"{target}/weight"] = np.concatenate([(1 + w[..., : scale.shape[-1]]) * scale - 1, w[..., scale.shape[-1]:]], axis=-1)
            continue
        columns = lambda i, n: np.concatenate([scale[i], np.ones(n - scale.shape[-1])])  # noqa: E731
        out[f"{target}/kernel"] = _per_layer(out[f"{target}/kernel"], view_of(target), lambda i, w: w * columns(i, w.shape[1]))
        if (bias := out.get(f"{target}/bias")) is not None:
            lead = bias.shape[: bias.ndim - 1]
            out[f"{target}/bias"] = np.stack([bias[i] * columns(i, bias.shape[-1]) for i in np.ndindex(*lead)]).reshape(bias.shape)
    return tree.unflatten({k: np.asarray(v, np.float32) for k, v in out.items()})


def _close(got, want, tol=1e-4):
    got, want = np.asarray(got), np.asarray(want)
    err = float(np.abs(got - want).max())
    assert err <= tol * max(1.0, float(np.abs(want).max())), f"max abs error {err:.3g}"


# ----------------------------------------------------------------------------------------------
# The table


# On an NF4 base the rule's frozen product x @ W dequantizes inside the matmul, whatever the method: the NF4 column runs
# the methods whose math meets that product differently (LoRA beside it and merged into a dequantized weight, DoRA's norm
# of it, (IA)^3 scaling its input or output, PiSSA's refusal). LoHa, LoKr and adapters add to its output as LoRA does,
# so their NF4 cells would compile the same frozen path again for nothing new (the suite's time budget).
NF4_METHODS = ("lora", "dora", "ia3", "pissa")
CELLS = [(m, s, b) for m in METHODS for s in sorted(SOURCES) for b in ("float", "nf4") if b == "float" or m in NF4_METHODS]


@pytest.mark.parametrize("method,source,base", CELLS, ids=["-".join(c) for c in CELLS])
def test_every_method_on_every_source(sources, method, source, base, tmp_path):
    src = _source(sources, source)
    cfg = _configs(src)[method]
    start = src.quantized if base == "nf4" else src.base
    if method == "pissa" and base == "nf4":  # PiSSA rewrites the base weight, which a quantized base cannot take
        with pytest.raises(ValueError, match="PiSSA rewrites the base weight of .*, which is quantized"):
            src.adapt(cfg, start, jax.random.key(3))
        return
    fresh = src.adapt(cfg, start, jax.random.key(3))
    untrained, plain = src.run(fresh), src.run(start)
    if method in IDENTITY_AT_INIT:
        np.testing.assert_array_equal(untrained, plain)
    else:  # PiSSA's residual + AB and DoRA's m / ||W|| give the base back up to rounding
        _close(untrained, plain, 1e-5 if method == "dora" else 1e-4)

    params = _randomized(fresh, 7)
    got = src.run(params)
    _close(got, src.run(_merged_by_hand(src, params)))
    assert float(np.abs(np.asarray(got) - np.asarray(plain)).max()) > 1e-2  # the trained leaves do change the output

    if method != "adapters":
        norms = src.norms(params) if method == "dora" else None
        merged = src.merge(params)
        _close(src.run(merged), got)
        if base == "float":
            adapter = jpeft.split_adapter(params)[1]
            back = tree.flatten(src.unmerge(merged, adapter, norms))
            for path, value in tree.flatten(params).items():
                _close(back[path], value, 1e-4)

    _check_files(src, method, cfg, params, got, tmp_path)


def _check_files(src: Source, method: str, cfg: Any, params: dict, got, tmp_path) -> None:
    """Save and load where the format holds the adapter (PEFT's layout; Flax LoRA by tree path); a clear refusal elsewhere."""
    base = jpeft.split_adapter(params)[0]
    if method == "adapters" or (not src.peft_files and method not in ("lora", "pissa")):
        with pytest.raises(ValueError, match="save_adapter: "):
            jpeft.save_adapter(tmp_path / "a", params, cfg, base_model_name_or_path="m")
        assert not (tmp_path / "a").exists()
        return
    jpeft.save_adapter(tmp_path / "a", params, cfg, base_model_name_or_path="m")
    np.testing.assert_array_equal(src.run(jpeft.load_adapter(tmp_path / "a", base)), got)
