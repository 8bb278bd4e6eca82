"""Sharding: mesh parsing and errors, partition rules for T5 / Llama / PEFT leaves, uneven dimensions, and sharded
train steps on 8 fake CPU devices and across two processes that match one device.

The multi-device runs happen in subprocesses (tests/training/sharding_worker.py): XLA's fake device count is fixed when
JAX is imported, and this process already has JAX with one device.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jpeft
from jpeft import adapters, ia3, lora, prompt, sharding, tree
from jpeft.models import t5
from tests.conftest import FAST_COMPILE

WORKER = Path(__file__).with_name("sharding_worker.py")
ROOT = WORKER.parents[2]
TOL = 1e-5
SIZES = {"data": 2, "fsdp": 2, "model": 4}


def tiny_t5(**overrides) -> t5.Arch:
    kwargs = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4, num_buckets=8,
                  max_distance=20, eps=1e-6, is_gated_act=True, act="gelu_new", scale_decoder_outputs=False, dropout_rate=0.0,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    kwargs.update(overrides)
    return t5.Arch(**kwargs)


def abstract(build) -> dict:
    """Shapes only: the rules never look at values."""
    return jax.eval_shape(build)


def flat_specs(params, sizes=SIZES, **kwargs) -> dict:
    return tree.flatten(sharding.param_specs(params, sizes, **kwargs))


# ----------------------------------------------------------------------------------------------
# Meshes


def test_parse_mesh():
    assert sharding.parse_mesh("data=2,fsdp=2,model=2") == {"data": 2, "fsdp": 2, "model": 2}
    assert sharding.parse_mesh(" model=4 , data=2 ") == {"data": 2, "fsdp": 1, "model": 4}
    assert sharding.parse_mesh("") == {"data": 1, "fsdp": 1, "model": 1}
    for bad, words in {"tensor=2": "name=size", "data2": "name=size", "data=x": "bad mesh size", "model=0": "at least 1"}.items():
        with pytest.raises(ValueError, match=words):
            sharding.parse_mesh(bad)


def test_mesh_that_does_not_divide_the_devices_is_an_error():
    n = jax.device_count()
    with pytest.raises(ValueError, match=f"{n + 1} devices does not divide the {n} available") as e:
        sharding.make_mesh(data=n + 1)
    if jax.devices()[0].platform == "cpu":  # the way to get more devices on CPU is named
        assert f"XLA_FLAGS=--xla_force_host_platform_device_count={n + 1}" in str(e.value)
    with pytest.raises(ValueError, match="at least 1"):
        sharding.make_mesh(model=0)


def test_default_mesh_is_one_device():
    mesh = sharding.mesh_from_string(None)
    assert mesh.axis_names == sharding.AXES and mesh.devices.size == 1
    assert sharding.mesh_from_string(mesh) is mesh


# ----------------------------------------------------------------------------------------------
# Partition rules


def test_t5_rules():
    a = tiny_t5(num_layers=2, num_decoder_layers=2)
    specs = flat_specs(abstract(lambda: t5.init_params(a, jax.random.key(0), tie_word_embeddings=False)))
    column, row = P("fsdp", "model"), P("model", "fsdp")
    for path, spec in specs.items():
        leaf_module = path.split("/")[-2]
        if path.endswith("layer_norm/weight"):
            assert spec == P(), path
        elif leaf_module in ("q", "k", "v", "wi_0", "wi_1"):
            assert spec == column, path
        elif leaf_module in ("o", "wo"):
            assert spec == row, path
    assert specs["shared/embedding"] == P("model", "fsdp")
    assert specs["lm_head/kernel"] == P("fsdp", "model")
    assert specs["encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding"] == P(None, "model")
    assert specs["decoder/block/1/layer/1/EncDecAttention/o/kernel"] == row
    v1_0 = flat_specs(abstract(lambda: t5.init_params(tiny_t5(is_gated_act=False, act="relu"), jax.random.key(0))))
    assert v1_0["encoder/block/0/layer/1/DenseReluDense/wi/kernel"] == column


def llama_tree(V=128, D=32, heads=4, kv_heads=2, head_dim=8, F=64, layers=2, bias=True, tied=False) -> dict:
    """A synthetic Llama-family tree with the HF names and shapes (GQA, optional q/k/v biases)."""
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    flat = {"model/embed_tokens/embedding": s(V, D), "model/norm/weight": s(D)}
    if not tied:
        flat["lm_head/kernel"] = s(D, V)
    for i in range(layers):
        p = f"model/layers/{i}"
        flat |= {f"{p}/input_layernorm/weight": s(D), f"{p}/post_attention_layernorm/weight": s(D),
                 f"{p}/self_attn/q_proj/kernel": s(D, heads * head_dim), f"{p}/self_attn/k_proj/kernel": s(D, kv_heads * head_dim),
                 f"{p}/self_attn/v_proj/kernel": s(D, kv_heads * head_dim), f"{p}/self_attn/o_proj/kernel": s(heads * head_dim, D),
                 f"{p}/mlp/gate_proj/kernel": s(D, F), f"{p}/mlp/up_proj/kernel": s(D, F), f"{p}/mlp/down_proj/kernel": s(F, D)}
        if bias:
            flat |= {f"{p}/self_attn/{n}/bias": s(flat[f"{p}/self_attn/{n}/kernel"].shape[1]) for n in ("q_proj", "k_proj", "v_proj")}
    return tree.unflatten(flat)


def test_llama_rules():
    specs = flat_specs(llama_tree())
    assert specs["model/embed_tokens/embedding"] == P("model", "fsdp")
    assert specs["lm_head/kernel"] == P("fsdp", "model")
    assert specs["model/norm/weight"] == P()
    for i in range(2):
        p = f"model/layers/{i}"
        for n in ("q_proj", "k_proj", "v_proj"):
            assert specs[f"{p}/self_attn/{n}/kernel"] == P("fsdp", "model")
            assert specs[f"{p}/self_attn/{n}/bias"] == P("model")
        assert specs[f"{p}/self_attn/o_proj/kernel"] == P("model", "fsdp")
        assert specs[f"{p}/mlp/gate_proj/kernel"] == specs[f"{p}/mlp/up_proj/kernel"] == P("fsdp", "model")
        assert specs[f"{p}/mlp/down_proj/kernel"] == P("model", "fsdp")
        assert specs[f"{p}/input_layernorm/weight"] == specs[f"{p}/post_attention_layernorm/weight"] == P()


def test_llama_rules_on_llama_param_shapes():
    """The rules cover every leaf name jpeft.models.llama actually builds (biases included)."""
    from jpeft.models import llama

    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False)
    shapes = llama.param_shapes(config)
    specs = flat_specs(tree.unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()}))
    replicated = {p for p, s in specs.items() if s == P()}
    assert replicated == {p for p in shapes if p.endswith("norm/weight") or p.endswith("o_proj/bias") or p.endswith("down_proj/bias")}


def test_lora_follows_its_kernel_and_keeps_the_rank_whole():
    cfg = lora.LoraConfig(r=4, target_modules=["q", "o", "wi_0", "wo"])
    specs = flat_specs(abstract(lambda: lora.inject(t5.init_params(tiny_t5(), jax.random.key(0)), cfg, jax.random.key(1))))
    attn, ff = "encoder/block/0/layer/0/SelfAttention", "encoder/block/0/layer/1/DenseReluDense"
    assert specs[f"{attn}/q/lora_a"] == P("fsdp", None) and specs[f"{attn}/q/lora_b"] == P(None, "model")
    assert specs[f"{attn}/o/lora_a"] == P("model", None) and specs[f"{attn}/o/lora_b"] == P(None, "fsdp")
    assert specs[f"{ff}/wi_0/lora_a"] == P("fsdp", None) and specs[f"{ff}/wo/lora_b"] == P(None, "fsdp")
    assert specs[f"{attn}/q/lora_scale"] == P()
    llama_lora = flat_specs(abstract(lambda: lora.inject(jax.tree.map(lambda s: jnp.zeros(s.shape), llama_tree()),
                                                         lora.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]), jax.random.key(1))))
    assert llama_lora["model/layers/0/self_attn/q_proj/lora_b"] == P(None, "model")
    assert llama_lora["model/layers/1/mlp/down_proj/lora_a"] == P("model", None)
    replicated = flat_specs(abstract(lambda: lora.inject(t5.init_params(tiny_t5(), jax.random.key(0)), cfg, jax.random.key(1))), replicate_adapters=True)
    assert all(s == P() for p, s in replicated.items() if "/lora_" in p)
    assert replicated[f"{attn}/q/kernel"] == P("fsdp", "model")


def test_stacked_lora_shards_only_the_kernel_dim():
    s = jax.ShapeDtypeStruct
    params = {"q": {"kernel": s((32, 32), jnp.float32), "lora_a": s((3, 32, 4), jnp.float32), "lora_b": s((3, 4, 32), jnp.float32),
                    "lora_scale": s((3,), jnp.float32)}}
    specs = flat_specs({"encoder": {"block": {"0": {"layer": {"0": {"SelfAttention": params}}}}}})
    assert specs["encoder/block/0/layer/0/SelfAttention/q/lora_a"] == P(None, "fsdp", None)
    assert specs["encoder/block/0/layer/0/SelfAttention/q/lora_b"] == P(None, None, "model")
    assert specs["encoder/block/0/layer/0/SelfAttention/q/lora_scale"] == P()


def test_ia3_follows_its_kernel_dim_prompts_and_bottleneck_adapters_replicate():
    base = lambda: t5.init_params(tiny_t5(), jax.random.key(0))
    specs = flat_specs(abstract(lambda: ia3.inject(base(), ia3.IA3Config())))
    assert specs["encoder/block/0/layer/0/SelfAttention/k/ia3_out"] == P("model")
    assert specs["encoder/block/0/layer/1/DenseReluDense/wo/ia3_in"] == P("model")
    specs = flat_specs(abstract(lambda: prompt.inject(base(), prompt.PromptTuningConfig(num_virtual_tokens=4), jax.random.key(1))))
    assert specs["prompt_embeddings"] == P()
    specs = flat_specs(abstract(lambda: adapters.inject(base(), adapters.AdapterConfig(reduction_factor=8), jax.random.key(1))))
    adapter_specs = {p: s for p, s in specs.items() if "/adapter/" in p}
    assert adapter_specs and all(s == P() for s in adapter_specs.values())


def test_uneven_dimensions_fall_back_to_replication_with_one_warning():
    params = abstract(lambda: lora.inject(t5.init_params(tiny_t5(num_heads=3, vocab_size=98), jax.random.key(0)),
                                          lora.LoraConfig(r=4, target_modules=["q", "o"]), jax.random.key(1)))
    with pytest.warns(UserWarning, match="does not divide evenly") as caught:
        specs = flat_specs(params)
    assert len(caught) == 1
    message = str(caught[0].message)
    for leaf in ("shared/embedding (98, 32)", "lm_head/kernel (32, 98)", "relative_attention_bias/embedding (8, 3)"):
        assert leaf in message
    assert specs["shared/embedding"] == P(None, "fsdp")  # only the uneven dimension replicates
    assert specs["lm_head/kernel"] == P("fsdp", None)
    assert specs["encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding"] == P()
    # q's output (3 heads x 8 = 24) divides by 4: that kernel and its LoRA B stay sharded.
    assert specs["encoder/block/0/layer/0/SelfAttention/q/lora_b"] == P(None, "model")
    d_model_uneven = flat_specs(abstract(lambda: t5.init_params(tiny_t5(d_model=30), jax.random.key(0))), sizes={"data": 1, "fsdp": 4, "model": 1}, warn=False)
    assert d_model_uneven["encoder/block/0/layer/0/SelfAttention/q/kernel"] == P(None, "model")  # a size-1 axis always divides


def test_optimizer_state_follows_its_parameter():
    mesh = sharding.make_mesh()
    params = lora.inject(t5.init_params(tiny_t5(), jax.random.key(0)), lora.LoraConfig(r=4, target_modules=["q", "o"]), jax.random.key(1))
    mask = jpeft.trainable_mask(params)
    trainable, frozen = jpeft.partition(params, mask)
    shardings = sharding.step_shardings(optax.adamw(1e-3), mesh, trainable, frozen)
    q, o = "encoder/block/0/layer/0/SelfAttention/q", "encoder/block/0/layer/0/SelfAttention/o"
    full_sh = sharding.param_shardings(params, mesh)  # the full tree: LoRA leaves need their kernels beside them
    for tx, state_params, param_sh in ((optax.adamw(1e-3), trainable, shardings.trainable),
                                       (jpeft.optimizer(optax.adam(1e-3), mask), params, full_sh)):
        state = sharding.state_shardings(tx, state_params, param_sh, mesh)
        found = {}
        for key_path, sh in jax.tree_util.tree_flatten_with_path(state)[0]:
            keys = "/".join(str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey))
            found.setdefault(keys.removeprefix("train/"), []).append(sh.spec)
        assert found[f"{q}/lora_a"] == [P("fsdp", None)] * 2  # mu and nu
        assert found[f"{o}/lora_b"] == [P(None, "fsdp")] * 2
        others = [spec for path, specs in found.items() if "/lora_" not in path for spec in specs]
        assert others and all(spec == P() for spec in others)  # step counts
    assert tree.flatten(shardings.trainable)[f"{q}/lora_b"].spec == P(None, "model")
    assert tree.flatten(shardings.frozen)[f"{q}/kernel"].spec == P("fsdp", "model")


# ----------------------------------------------------------------------------------------------
# 8 fake devices and two processes, in subprocesses


def _run_worker(*args: str) -> subprocess.Popen:
    # The worker chooses its device count; of the caller's flags it keeps only the suite's cheap compile.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), "XLA_FLAGS": FAST_COMPILE}
    return subprocess.Popen([sys.executable, str(WORKER), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: int = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"worker failed ({proc.returncode}):\n{err[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module", autouse=True)
def multidevice_worker():
    """Started with the module's first test, so the 8-device run overlaps the in-process tests (CPU bound, 2 cores)."""
    proc = _run_worker("multidevice")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def multidevice(multidevice_worker):
    return _result(multidevice_worker)


MESHES = ["1,1,1", "8,1,1", "2,2,2", "1,2,4"]


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_sharded_step_matches_one_device(multidevice, method, mesh):
    assert multidevice["devices"] == 8
    r = multidevice[f"{method}/{mesh}"]
    assert r["mesh"] == dict(zip(sharding.AXES, map(int, mesh.split(","))))
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=0, atol=TOL)  # two steps: the second uses updated state
    assert r["param_diff"] <= TOL
    if mesh == "1,1,1":  # the default mesh costs nothing: the same numbers, no communication
        assert r["param_diff"] == 0.0 and r["losses"] == r["ref_losses"] and r["collectives"] == 0
    else:
        assert r["collectives"] > 0
    assert r["placed"]["trainable"]["wrong"] == r["placed"]["frozen"]["wrong"] == r["updated"]["wrong"] == []
    assert r["state_wrong"] == []
    assert r["batch_spec"] == str(P(("data", "fsdp")))
    frozen, trainable = r["placed"]["frozen"]["specs"], r["placed"]["trainable"]["specs"]
    attn, ff = "encoder/block/0/layer/0/SelfAttention", "decoder/block/0/layer/2/DenseReluDense"
    assert frozen[f"{attn}/q/kernel"] == frozen[f"{ff}/wi_1/kernel"] == frozen["lm_head/kernel"] == str(P("fsdp", "model"))
    assert frozen[f"{attn}/o/kernel"] == frozen[f"{ff}/wo/kernel"] == frozen["shared/embedding"] == str(P("model", "fsdp"))
    assert frozen[f"{attn}/relative_attention_bias/embedding"] == str(P(None, "model"))
    assert frozen["encoder/final_layer_norm/weight"] == str(P())
    if method == "lora":
        assert trainable[f"{attn}/q/lora_a"] == str(P("fsdp", None)) and trainable[f"{attn}/q/lora_b"] == str(P(None, "model"))
        assert trainable[f"{ff}/wo/lora_a"] == str(P("model", None)) and trainable[f"{ff}/wo/lora_b"] == str(P(None, "fsdp"))
        assert frozen[f"{attn}/q/lora_scale"] == str(P())
    else:
        assert trainable == {"prompt_embeddings": str(P())}


def test_causal_lm_step_on_a_mesh_matches_one_device_without_full_rematerialization(multidevice):
    """The causal-LM loss gathers target positions from any row of the batch: the sharded step gathers the rows once
    on purpose (`training.take_rows`), where XLA left alone replicates and repartitions them with a warning."""
    r = multidevice["causal_lm"]
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=0, atol=TOL)
    assert r["remat_warnings"] == 0 and r["unhinted_remat_warnings"] > 0  # the control: the capture sees XLA's warning


def test_merge_and_save_from_sharded_parameters(multidevice):
    r = multidevice["lora/2,2,2"]
    assert r["merged_q_spec"] == str(P("fsdp", "model"))  # merging keeps the layout; saving gathers leaf by leaf
    assert r["saved_keys_match"] and r["saved_diff"] <= TOL


def test_streaming_load_places_each_leaf_on_its_shards(multidevice):
    """`load_pretrained(..., quantize="int8", mesh=...)`: every leaf (int8 rows included) lands on its rule's sharding, and the
    values are those of quantizing the one-device load."""
    r = multidevice["lora/2,2,2"]["streamed"]
    assert r["wrong"] == [] and multidevice["lora/2,2,2"]["streamed_equal"]
    q = "encoder/block/0/layer/0/SelfAttention/q"
    assert r["specs"][f"{q}/kernel_int8"] == str(P("model", None)) and r["specs"]["shared/embedding"] == str(P("model", "fsdp"))


def test_mesh_and_batch_errors_on_eight_devices(multidevice):
    e = multidevice["errors"]
    assert e["mesh_3"].startswith("mesh data=3 x fsdp=1 x model=1 = 3 devices does not divide the 8 available; on CPU, simulate 3 "
                                  "devices by setting XLA_FLAGS=--xla_force_host_platform_device_count=3")
    assert "16 devices does not divide the 8 available" in e["mesh_16"]
    assert "has 6 rows, which data x fsdp = 8 does not divide" in e["batch_6"]
    assert e["subset_mesh"] == 2  # a mesh that divides the device count uses the first devices


def test_uneven_model_trains_sharded_with_replicated_dims(multidevice):
    r = multidevice["uneven"]
    assert len(r["warnings"]) == 1
    for leaf in ("shared/embedding", "lm_head/kernel", "relative_attention_bias/embedding"):
        assert leaf in r["warnings"][0]
    assert r["specs"]["shared/embedding"] == str(P(None, "fsdp"))
    assert r["specs"]["encoder/block/0/layer/0/SelfAttention/relative_attention_bias/embedding"] == str(P())
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=0, atol=TOL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_match_one_device():
    port = str(_free_port())
    procs = [_run_worker("distributed", port, str(rank)) for rank in (0, 1)]
    results = [_result(p, timeout=240) for p in procs]
    for rank, r in enumerate(results):
        assert (r["process"], r["processes"], r["devices"]) == (rank, 2, 4)
        np.testing.assert_allclose(r["losses"], results[0]["ref_losses"], rtol=0, atol=TOL)  # rank 0 ran the reference
        assert r["q_spec"] == str(P("fsdp", "model"))
    assert results[0]["param_diff"] <= TOL
    assert results[0]["saved_diff"] is not None and results[0]["saved_diff"] <= TOL  # merged + gathered = the unsharded merge
