"""LoRA on Google tunix's NNX LLMs (llama3, qwen3, gemma3; tiny configs, their code unmodified): tunix keeps each
projection's einsum on the instance (`self.einsum_str`), so its `Einsum` is registered with a callable, and every
projection (q, k, v, o and the MLP's gate, up, down; gemma3's fused kv) is adapted. Checked against the same model on
weights merged by hand here, and against qwix's LoRA on llama3; a fixed equation that does not fit a layer is refused
at inject, by name."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft import nnx as jnnx
from jpeft.integrations import nnx as nnx_integration

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tunix") is None, reason="google-tunix is not installed")

R, ALPHA = 4, 8.0
IDS = np.random.default_rng(0).integers(0, 64, (2, 6)).astype(np.int32)
POSITIONS = np.broadcast_to(np.arange(6, dtype=np.int32), IDS.shape)
CAUSAL = np.broadcast_to(np.tril(np.ones((6, 6), bool)), (2, 6, 6))


def tunix_model(family: str) -> types.ModuleType:
    """`tunix.models.<family>.model` without tunix's package __init__, which imports its trainers (and their
    dependencies): the package is registered empty, so only the model's own imports run."""
    if "tunix" not in sys.modules:
        package = types.ModuleType("tunix")
        package.__path__ = list(importlib.util.find_spec("tunix").submodule_search_locations)
        sys.modules["tunix"] = package
    return importlib.import_module(f"tunix.models.{family}.model")


def _build(family: str):
    """A tiny random model of the family (tunix zero-initialises the MLP: every param is drawn here) and its call."""
    lib = tunix_model(family)
    common = dict(num_layers=1, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2)
    if family == "gemma3":
        config = lib.ModelConfig(num_embed=64, sliding_window_size=4, param_dtype=jnp.float32, **common)
        model = lib.Gemma3(config, rngs=nnx.Rngs(0))
    else:
        config = lib.ModelConfig(vocab_size=64, rope_theta=10_000, norm_eps=1e-6, **common)
        model = (lib.Llama3 if family == "llama3" else lib.Qwen3)(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var[...] = 0.3 * rng.standard_normal(var[...].shape).astype(np.float32)
    return lib, model


def _logits(model):
    return nnx.jit(lambda m: m(IDS, POSITIONS, None, CAUSAL)[0])(model)


# Each projection's merged weight, by hand: A (*in, r) and B (r, *out) to the weight's own layout.
MERGE = {
    "q_proj": "dr,rnh->dnh", "k_proj": "dr,rkh->dkh", "v_proj": "dr,rkh->dkh", "o_proj": "nhr,rd->nhd",
    "q_einsum": "dr,rnh->ndh", "kv_einsum": "dr,rckh->ckdh", "attn_vec_einsum": "nhr,rd->nhd",
    "gate_proj": "dr,rf->df", "up_proj": "dr,rf->df", "down_proj": "fr,rd->fd",
}
TARGETS = {"llama3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "gemma3": ["q_einsum", "kv_einsum", "attn_vec_einsum", "gate_proj", "up_proj", "down_proj"]}


@pytest.fixture
def registered():
    """jpeft.nnx.register(tunix's Einsum, ...) for one test: a registration is process-wide."""
    classes = []

    def register(cls, *how):
        classes.append(cls)
        jnnx.register(cls, *how)

    yield register
    for cls in classes:
        nnx_integration.KINDS.pop(cls, None)


@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma3"])
def test_every_projection_takes_lora_through_a_callable_registration(registered, family):
    lib, model = _build(family)
    registered(lib.Einsum, "w", lambda m: m.einsum_str)
    targets = TARGETS.get(family, TARGETS["llama3"])
    jnnx.inject(model, jpeft.LoraConfig(r=R, alpha=ALPHA, target_modules=targets), jax.random.key(2))
    rng = np.random.default_rng(3)
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.LoRAParam):
            var[...] = 0.3 * rng.standard_normal(var[...].shape).astype(np.float32)
    state = nnx.to_pure_dict(nnx.state(model))
    adapted = sorted(p for p in jpeft.tree.flatten(state) if p.endswith("/lora_a"))
    assert sorted(p.split("/")[-2] for p in adapted) == sorted(targets)

    merged = {}
    for path, value in jpeft.tree.flatten(state).items():
        module, leaf = path.rsplit("/", 1)
        if leaf.startswith("lora_"):
            continue
        if f"{module}/lora_a" in jpeft.tree.flatten(state) and leaf in ("w", "kernel"):
            flat = jpeft.tree.flatten(state)
            a, b, s = flat[f"{module}/lora_a"], flat[f"{module}/lora_b"], flat[f"{module}/lora_scale"]
            value = value + s * jnp.einsum(MERGE[module.rsplit("/", 1)[-1]], a, b)
        merged[path] = value
    _, plain = _build(family)
    nnx.update(plain, _state_of(plain, jpeft.tree.unflatten(merged)))
    want = _logits(plain)
    got = _logits(model)
    assert float(jnp.abs(got - want).max()) <= 1e-5 * float(jnp.abs(want).max())
    assert float(jnp.abs(got - _logits(_build(family)[1])).max()) > 1e-2


def _state_of(model, pure: dict):
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    return state


def test_llama3_equals_qwix_lora_on_the_same_leaves(registered):
    qwix = pytest.importorskip("qwix")
    lib, ours = _build("llama3")
    registered(lib.Einsum, "w", lambda m: m.einsum_str)
    targets = TARGETS["llama3"]
    jnnx.inject(ours, jpeft.LoraConfig(r=R, alpha=ALPHA, target_modules=targets), jax.random.key(2))
    theirs = qwix.apply_lora_to_model(_build("llama3")[1], qwix.LoraProvider(module_path=".*(" + "|".join(targets) + ")", rank=R, alpha=ALPHA),
                                      IDS, POSITIONS, None, CAUSAL, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(4)
    for layer in targets:  # the same A and B on both sides (qwix flattens an einsum weight's axes; jpeft keeps them)
        block = "attn" if layer[0] in "qkvo" else "mlp"
        mine, other = getattr(getattr(ours.layers[0], block), layer), getattr(getattr(theirs.layers[0], block), layer)
        weight = "w" if hasattr(other, "w") else "kernel"
        for leaf in ("lora_a", "lora_b"):
            value = 0.3 * rng.standard_normal(getattr(mine, leaf)[...].shape).astype(np.float32)
            getattr(mine, leaf)[...] = value
            getattr(other, f"{weight}_{leaf}")[...] = value.reshape(getattr(other, f"{weight}_{leaf}")[...].shape)
    got, want = _logits(ours), _logits(theirs)
    assert float(jnp.abs(got - want).max()) <= 1e-5 * float(jnp.abs(want).max())


def test_a_fixed_equation_that_does_not_fit_a_layer_is_refused_at_inject_by_name(registered):
    lib, model = _build("llama3")
    registered(lib.Einsum, "w", "BTD,DNH->BTNH")  # q_proj's, fixed for the class: o_proj is 'BTNH,NHD->BTD'
    with pytest.raises(ValueError, match=r"layers\.0\.attn\.o_proj: its class is registered with the fixed equation 'BTD,DNH->BTNH', "
                                         r"but this instance \(its w \(4, 8, 32\)\) carries its own \['BTNH,NHD->BTD'\]"):
        jnnx.inject(model, jpeft.LoraConfig(r=R, target_modules=["q_proj", "o_proj"]), jax.random.key(2))
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model))  # nothing was built
    jnnx.inject(model, jpeft.LoraConfig(r=R, target_modules=["q_proj"]), jax.random.key(2))  # q_proj fits the fixed one
