"""Runs sharded train steps in a fresh process with N fake CPU devices and prints the results as JSON.

JAX fixes its device count when it is imported, and the test process already imported it with one
device, so tests/training/test_sharding.py runs this script in subprocesses:

    python tests/training/sharding_worker.py multidevice            # 8 devices: meshes, steps, merge/save, errors
    python tests/training/sharding_worker.py distributed PORT RANK  # one of two processes with 2 devices each
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings

MODE = sys.argv[1]
# The suite's cheap-compile flags (conftest.FAST_COMPILE, inherited) plus this mode's device count.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={8 if MODE == 'multidevice' else 2}"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jpeft import sharding  # noqa: E402

if MODE == "distributed":  # before anything touches a device
    sharding.init_distributed(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[3]))

import jpeft  # noqa: E402
from jpeft import batches, lora, prompt, quant, training, tree  # noqa: E402
from jpeft.models import t5  # noqa: E402

MESHES = {"1,1,1": (1, 1, 1), "8,1,1": (8, 1, 1), "2,2,2": (2, 2, 2), "1,2,4": (1, 2, 4)}


def t5_arch(**overrides) -> t5.Arch:
    """A tiny FLAN-style T5 whose dimensions the test meshes divide (transformers-free: no import cost per process)."""
    kwargs = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4, num_buckets=8,
                  max_distance=20, eps=1e-6, is_gated_act=True, act="gelu_new", scale_decoder_outputs=False, dropout_rate=0.0,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    kwargs.update(overrides)
    return t5.Arch(**kwargs)


def hf_config(a: t5.Arch):
    """The transformers config of `a`, which save_pretrained writes."""
    from transformers import T5Config

    return T5Config(vocab_size=a.vocab_size, d_model=a.d_model, d_kv=a.d_kv, d_ff=a.d_ff, num_layers=a.num_layers,
                    num_decoder_layers=a.num_decoder_layers, num_heads=a.num_heads, relative_attention_num_buckets=a.num_buckets,
                    relative_attention_max_distance=a.max_distance, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def make_batch(vocab: int, rows: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    mask = (np.arange(7)[None] < rng.integers(3, 8, rows)[:, None]).astype(np.int32)
    labels = rng.integers(2, vocab, (rows, 5)).astype(np.int32)
    labels[::3, 3:] = batches.IGNORE
    return {"input_ids": (rng.integers(2, vocab, (rows, 7)) * mask).astype(np.int32), "attention_mask": mask, "labels": labels}


METHODS = {
    "lora": lambda p: lora.inject(p, lora.LoraConfig(r=4, alpha=8, target_modules=["q", "k", "v", "o", "wi_0", "wi_1", "wo"]), jax.random.key(1)),
    "prompt": lambda p: prompt.inject(p, prompt.PromptTuningConfig(num_virtual_tokens=4), jax.random.key(1)),
}


def setup_method(config, method: str):
    params = METHODS[method](t5.init_params(config, jax.random.key(0)))
    if method == "lora":  # non-zero B so that A gets a gradient too
        flat = tree.flatten(params)
        flat = {p: (v + 0.1 * jax.random.normal(jax.random.key(len(p)), v.shape) if p.endswith("lora_b") else v) for p, v in flat.items()}
        params = tree.unflatten(flat)
    return jpeft.partition(params, jpeft.trainable_mask(params))


def run_steps(step, trainable, opt_state, frozen, batches):
    losses = []
    for batch in batches:
        trainable, opt_state, loss = step(trainable, opt_state, frozen, batch, None)
        losses.append(float(loss))
    return trainable, opt_state, losses


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def spec_report(values, shardings) -> dict:
    """{path: str(spec)} of placed arrays, and the paths whose spec differs from the intended sharding."""
    flat, want = tree.flatten(values), tree.flatten(shardings)
    specs = {p: str(v.sharding.spec) for p, v in flat.items() if v is not None}
    wrong = sorted(p for p, v in flat.items() if v is not None and v.sharding.spec != want[p].spec)
    return {"specs": specs, "wrong": wrong}


def state_report(opt_state, trainable) -> list[str]:
    """Optimizer-state leaves shaped like a parameter whose spec differs from that parameter's."""
    params = {p: v for p, v in tree.flatten(trainable).items() if v is not None}
    wrong = []
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [str(k.key) for k in key_path if isinstance(k, jax.tree_util.DictKey)]
        for start in range(len(keys)):
            path = "/".join(keys[start:])
            if path in params and params[path].shape == leaf.shape:
                if leaf.sharding.spec != params[path].sharding.spec:
                    wrong.append(jax.tree_util.keystr(key_path))
                break
        else:
            if leaf.ndim and leaf.sharding.spec != jax.sharding.PartitionSpec():
                wrong.append(jax.tree_util.keystr(key_path))
    return wrong


def multidevice() -> dict:
    out = {"devices": jax.device_count()}
    config = t5_arch()
    loss_fn = training.seq2seq_loss(config)
    tx = optax.adamw(1e-3)
    batches = [make_batch(config.vocab_size, seed=s) for s in (0, 1)]
    for method in METHODS:
        trainable, frozen = setup_method(config, method)
        ref_step = training.make_train_step(loss_fn, tx)
        ref_t, _, ref_losses = run_steps(ref_step, jax.tree.map(jnp.copy, trainable), tx.init(trainable), frozen, batches)
        ref_merged = t5.state_dict_from_params(lora.merge(jpeft.combine(ref_t, frozen))) if method == "lora" else None
        for name, (d, f, m) in MESHES.items():
            run = sharding.setup(f"data={d},fsdp={f},model={m}", loss_fn, tx, trainable, frozen, tx.init(trainable), batches[0])
            placed = {"trainable": spec_report(run.trainable, run.shardings.trainable), "frozen": spec_report(run.frozen, run.shardings.frozen)}
            compiled = run.step.lower(run.trainable, run.opt_state, run.frozen, run.batch, None).compile()
            hlo = compiled.as_text()
            new_t, new_state, losses = run_steps(compiled, run.trainable, run.opt_state, run.frozen, [run.batch, run.place_batch(batches[1])])
            res = {
                "losses": losses, "ref_losses": ref_losses, "param_diff": max_diff(new_t, ref_t), "placed": placed,
                "updated": spec_report(new_t, run.shardings.trainable), "state_wrong": state_report(new_state, new_t),
                "batch_spec": str(run.batch["input_ids"].sharding.spec), "mesh": dict(run.mesh.shape),
                "collectives": sum(hlo.count(f" {op}(") + hlo.count(f" {op}-start(") for op in COLLECTIVES),
            }
            if method == "lora" and name == "2,2,2":  # gathering on save is layout-independent: one mesh is enough
                merged = lora.merge(jpeft.combine(new_t, run.frozen))
                res["merged_q_spec"] = str(merged["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]["kernel"].sharding.spec)
                with tempfile.TemporaryDirectory() as tmp:
                    t5.save_pretrained(tmp, hf_config(config), merged)
                    _, loaded = t5.load_pretrained(tmp)
                    _, streamed = t5.load_pretrained(tmp, quantize="int8", mesh=run.mesh)  # each leaf straight into its shards
                res["streamed"] = spec_report(streamed, sharding.param_shardings(streamed, run.mesh))
                res["streamed_equal"] = jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), streamed, quant.quantize(loaded, "int8")))
                saved = t5.state_dict_from_params(loaded)
                res["saved_keys_match"] = sorted(saved) == sorted(ref_merged)
                res["saved_diff"] = max(float(np.max(np.abs(saved[k] - ref_merged[k]))) for k in ref_merged)
            out[f"{method}/{name}"] = res
    out["errors"] = errors(config, loss_fn, tx)
    out["uneven"] = uneven(tx)
    out["causal_lm"] = causal_lm(tx)
    return out


def _compile_logging(jitted, *args) -> tuple[object, str]:
    """(compiled, what XLA wrote to stderr while compiling): its partitioner's warnings come from C++, on fd 2."""
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            compiled = jitted.lower(*args).compile()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        return compiled, log.read().decode(errors="replace")


def causal_lm(tx) -> dict:
    """A Llama's LoRA step on data=2,fsdp=2,model=2 against one device; and XLA's full-rematerialization warnings with
    the loss's layout hints (`training.take_rows`, set by the sharded step) and without them (the same step jitted alone)."""
    from transformers import LlamaConfig

    from jpeft import batches as batch_lib
    from jpeft.models import llama

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    params = lora.inject(llama.init_params(config, jax.random.key(0)), lora.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), jax.random.key(1))
    params = tree.unflatten({p: v + 0.1 if p.endswith("lora_b") else v for p, v in tree.flatten(params).items()})
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    rng = np.random.default_rng(0)
    batch = batch_lib.causal_lm_batch([rng.integers(2, 128, 12).tolist() for _ in range(8)], [rng.integers(2, 128, 4).tolist() for _ in range(8)],
                                      pad_id=0, eos_id=1)
    loss_fn = training.causal_lm_loss(config)
    _, _, ref_losses = run_steps(training.make_train_step(loss_fn, tx), jax.tree.map(jnp.copy, trainable), tx.init(trainable), frozen, [batch])
    run = sharding.setup("data=2,fsdp=2,model=2", loss_fn, tx, trainable, frozen, tx.init(trainable), batch)
    args = (run.trainable, run.opt_state, run.frozen, run.batch, None)
    compiled, hinted = _compile_logging(run.step, *args)
    sh = run.shardings
    bare = jax.jit(training.make_train_step(loss_fn, tx), in_shardings=(sh.trainable, sh.opt_state, sh.frozen, sh.batch, sh.replicated))
    _, unhinted = _compile_logging(bare, *args)
    _, _, losses = run_steps(compiled, *args[:3], [run.batch])
    remat = "Involuntary full rematerialization"
    return {"losses": losses, "ref_losses": ref_losses, "remat_warnings": hinted.count(remat), "unhinted_remat_warnings": unhinted.count(remat)}


def errors(config, loss_fn, tx) -> dict:
    found = {}
    for label, make in {"mesh_3": lambda: sharding.make_mesh(data=3), "mesh_16": lambda: sharding.make_mesh(data=2, model=8),
                        "batch_6": lambda: sharding.place_batch(make_batch(config.vocab_size, rows=6), sharding.make_mesh(data=4, fsdp=2))}.items():
        try:
            make()
            found[label] = None
        except ValueError as e:
            found[label] = str(e)
    found["subset_mesh"] = len(sharding.make_mesh(data=2).devices.flat)
    return found


def uneven(tx) -> dict:
    """A T5 whose heads (3) and vocabulary (98) model=4 does not divide: those dims replicate, the step still matches."""
    config = t5_arch(num_heads=3, vocab_size=98)
    loss_fn = training.seq2seq_loss(config)
    trainable, frozen = setup_method(config, "lora")
    batch = make_batch(config.vocab_size)
    _, _, ref_losses = run_steps(training.make_train_step(loss_fn, tx), jax.tree.map(jnp.copy, trainable), tx.init(trainable), frozen, [batch])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = sharding.setup("fsdp=2,model=4", loss_fn, tx, trainable, frozen, tx.init(trainable), batch)
    _, _, losses = run_steps(run.step, run.trainable, run.opt_state, run.frozen, [run.batch])
    specs = spec_report(run.frozen, run.shardings.frozen)["specs"]
    return {"warnings": [str(w.message) for w in caught], "losses": losses, "ref_losses": ref_losses, "specs": specs}


def distributed() -> dict:
    config = t5_arch()
    loss_fn = training.seq2seq_loss(config)
    tx = optax.adamw(1e-3)
    trainable, frozen = setup_method(config, "lora")
    batch = make_batch(config.vocab_size)
    half = slice(4 * jax.process_index(), 4 * jax.process_index() + 4)  # each process feeds its own rows
    local = {k: v[half] for k, v in batch.items()}
    run = sharding.setup("data=2,model=2", loss_fn, tx, trainable, frozen, tx.init(trainable), local)
    new_t, _, losses = run_steps(run.step, run.trainable, run.opt_state, run.frozen, [run.batch])
    gathered = sharding.gather(new_t)
    saved = t5.state_dict_from_params(sharding.gather(lora.merge(jpeft.combine(new_t, run.frozen))))  # what save_pretrained writes
    ref_losses = param_diff = saved_diff = None
    if jax.process_index() == 0:  # the unsharded reference once, on this process's first device alone
        with jax.default_device(jax.local_devices()[0]):
            ref_t, _, ref_losses = run_steps(training.make_train_step(loss_fn, tx), jax.tree.map(jnp.copy, trainable),
                                             tx.init(trainable), frozen, [batch])
        param_diff = max_diff(gathered, jax.device_get(ref_t))
        ref_saved = t5.state_dict_from_params(lora.merge(jpeft.combine(ref_t, frozen)))
        saved_diff = max(float(np.max(np.abs(saved[k] - ref_saved[k]))) for k in ref_saved) if sorted(saved) == sorted(ref_saved) else None
    return {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
            "losses": losses, "ref_losses": ref_losses, "param_diff": param_diff,
            "saved_diff": saved_diff,
            "q_spec": str(run.frozen["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]["kernel"].sharding.spec)}


if __name__ == "__main__":
    result = multidevice() if MODE == "multidevice" else distributed()
    print("RESULT " + json.dumps(result))
