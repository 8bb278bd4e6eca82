"""Real sizes, measured here: checkpoints of Llama-3.2-1B's and Llama-3-8B's shapes (random weights written by this
module under --workdir, never committed), loaded, quantized and trained one LoRA step, beside HF PEFT + bitsandbytes
QLoRA; `jpeft.plan` against the measured peaks; Llama-3-70B and Llama-3.1-405B planned on fake CPU meshes.

    python -m benchmarks.scale --json benchmarks/scale.json                   # everything (~1 h on the 2-core CPU)
    python -m benchmarks.scale --parts 1b,plans --json /tmp/s.json            # a subset: 1b, peft, 8b, plans, mesh

Every heavy process runs in its own subprocess (peak resident memory is that process's own `VmHWM`), one at a time
under /tmp/heavy.lock (as `flock /tmp/heavy.lock` takes it: the machine is shared). Not part of `benchmarks.run`: the 8B checkpoint
is 16 GB on disk and its CPU step takes minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARD_BYTES = 1 << 30


def write_checkpoint(config: Any, out_dir: Path, dtype: str = "bfloat16", shard_bytes: int = SHARD_BYTES, seed: int = 0) -> int:
    """A random HF checkpoint of `config`'s Llama shape in `out_dir` (config.json, safetensors shards and their index),
    written a shard at a time so that no more than one shard is ever in memory; returns the weights' bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from jpeft.models import causal_lm, llama

    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    shapes = {causal_lm.path_to_hf(p): s for p, s in sorted(llama.param_shapes(llama.arch(config)).items())}
    rng = np.random.default_rng(seed)
    std = getattr(config, "initializer_range", 0.02)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups, current, size = [], [], 0
    for (name, transpose), shape in shapes.items():
        nbytes = math.prod(shape) * np_dtype.itemsize
        if current and size + nbytes > shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, shape[::-1] if transpose else shape))
        size += nbytes
    groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                value = 1 + 0.1 * rng.standard_normal(shape, np.float32)
            else:
                value = std * rng.standard_normal(shape, np.float32)
            shard[name] = value.astype(np_dtype)
            weight_map[name] = file
            total += shard[name].nbytes
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        del shard
    (out_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out_dir / "config.json").write_text(json.dumps({**config.to_dict(), "torch_dtype": dtype}, default=str))
    return total


# ----------------------------------------------------------------------------------------------
# Resident memory, measured


def status_bytes(key: str) -> int:
    """A /proc/self/status figure in bytes ("VmRSS", "VmHWM")."""
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))


def reset_peak() -> int:
    """Return freed heap to the OS, restart the peak count (VmHWM) and return the resident bytes now."""
    from jpeft.training.step import release_free_heap

    release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")
    return status_bytes("VmRSS")


def measure_step(p) -> dict[str, int]:
    """Run a plan's compiled step (`jpeft.plan`) on arrays of its shapes in this process and measure resident memory.

    `arguments`: the growth while the step's arguments are created; `step`: the growth of a second (warm) step above the
    resident bytes just before it; `measured` = the two together, what the plan's peak predicts. `cold`: the first step's
    growth above the start, which adds XLA's one-time runtime set-up (thread pools and the like, ~60-70 MB here)."""
    import jax
    import numpy as np

    ones = lambda t: jax.tree.map(lambda x: None if x is None else jax.device_put(np.ones(x.shape, x.dtype)), t)  # noqa: E731
    trainable, opt_state, frozen, batch, rng = p.shapes
    start = reset_peak()
    args = [ones(t) for t in (trainable, opt_state, frozen, batch)]
    arguments = status_bytes("VmRSS") - start
    out = p.step(*args, rng)
    jax.block_until_ready(out)
    cold = status_bytes("VmHWM") - start
    before = reset_peak()
    out = p.step(out[0], out[1], args[2], args[3], rng)
    jax.block_until_ready(out)
    step = status_bytes("VmHWM") - before
    return {"arguments": arguments, "step": step, "measured": arguments + step, "cold": cold}


# ----------------------------------------------------------------------------------------------
# Shapes (transformers LlamaConfig arguments of the real models)

LLAMA3 = dict(num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5, vocab_size=128256,
              bos_token_id=128000, eos_token_id=128001, pad_token_id=128001)
ROPE31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.2-1b": dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64, tie_word_embeddings=True,
                         rope_parameters=ROPE31, max_position_embeddings=131072),
    "llama-3-8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama-3-70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "llama-3.1-405b": dict(LLAMA3, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                           tie_word_embeddings=False, rope_parameters=ROPE31, max_position_embeddings=131072),
    # the other models that run here, for the planner's error
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, sliding_window=512, query_pre_attn_scalar=256)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEQ = 512
TARGETS = [
    ("load_peak_over_weights", "<=", 1.15),
    ("qlora_8b_load_peak_gb", "<=", 7.5),
    ("qlora_8b_step_peak_gb", "<=", 14.0),
    ("jpeft_over_peft_qlora_1b_peak_memory", "<=", 0.5),
    ("plan_error_max", "<=", 0.15),
]


def config_of(name: str):
    """The transformers config of a shape above."""
    import transformers

    if name == "gemma3-270m":
        return transformers.Gemma3TextConfig(**GEMMA3_270M)
    return transformers.LlamaConfig(**SHAPES[name])


def lora_config():
    """LoRA r=16, alpha 32 on all seven projections, no dropout (as PEFT's side)."""
    import jpeft

    return jpeft.LoraConfig(r=16, alpha=32, target_modules=PROJ)


# ----------------------------------------------------------------------------------------------
# Workers (each a fresh process: its VmHWM is its own)


def jpeft_worker(spec: dict) -> dict:
    """Load a checkpoint streaming (bf16, or NF4 as read), optionally quantize the loaded tree, and run LoRA steps of
    1 x 512 tokens (remat) through the compiled plan's own executable on the loaded weights; resident memory throughout."""
    import jax
    import jax.numpy as jnp

    import optax

    import jpeft
    from jpeft import quant
    from jpeft.methods import lora
    from jpeft.models import llama

    out: dict[str, Any] = {}
    dtype = jnp.dtype(spec.get("dtype", "bfloat16"))
    llama.load_config(spec["dir"])  # transformers' config classes: fixed imports, whatever the checkpoint's size
    start = reset_peak()
    t = time.perf_counter()
    config, params = llama.load_pretrained(spec["dir"], dtype=dtype, quantize=spec.get("quantize"))
    jax.block_until_ready(params)
    out.update(load_s=time.perf_counter() - t, load_peak_over_start=status_bytes("VmHWM") - start, load_peak=status_bytes("VmHWM"),
               tree_bytes=sum(x.nbytes for x in jax.tree.leaves(params)))
    peak = out["load_peak"]
    if spec.get("quantize_after"):
        t = time.perf_counter()
        jax.block_until_ready(quant.quantize(params, "nf4"))
        out["quantize_s"] = time.perf_counter() - t
    if not spec.get("steps"):
        return out
    params = lora.inject(params, lora_config(), jax.random.key(0))
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    del params
    optimizer = optax.adamw(1e-4)  # what jpeft.plan compiles with by default
    opt_state = optimizer.init(trainable)
    jax.block_until_ready((trainable, opt_state))
    resident = status_bytes("VmRSS") - start  # the step's arguments: the tree, LoRA and AdamW's state
    t = time.perf_counter()
    p = jpeft.plan(config, lora_config(), batch=1, seq_len=SEQ, target_len=SEQ - 1, dtype=dtype, quantize=spec.get("quantize"), remat=True,
                   optimizer=optimizer)
    out.update(compile_s=time.perf_counter() - t, plan={k: v for k, v in vars(p).items() if isinstance(v, (int, float, str))},
               arguments=resident)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, SEQ)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "targets": ids[:, 1:], "target_index": np.ones(1, np.int32)}
    times, losses = [], []
    for _ in range(spec["steps"]):
        peak = max(peak, status_bytes("VmHWM"))
        before = reset_peak()
        t = time.perf_counter()
        trainable, opt_state, loss = p.step(trainable, opt_state, frozen, batch, None)
        losses.append(float(loss))
        times.append(time.perf_counter() - t)
    # The last step's growth above the resident bytes before it, on top of its arguments (compile leftovers excluded).
    out.update(step_s=times, losses=losses, measured=resident + status_bytes("VmHWM") - before, peak=max(peak, status_bytes("VmHWM")))
    return out


def peft_worker(spec: dict) -> dict:
    """HF PEFT + bitsandbytes QLoRA, the standard recipe: the checkpoint loaded 4-bit (NF4, bf16 compute),
    `prepare_model_for_kbit_training` with gradient checkpointing, LoRA r=16 on all seven projections, AdamW,
    1 x 512 tokens through `labels=`."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    from benchmarks import common

    torch.set_num_threads(common.CPUS)
    start = reset_peak()
    t = time.perf_counter()
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = LlamaForCausalLM.from_pretrained(spec["dir"], quantization_config=q, dtype=torch.bfloat16, device_map="cpu")
    out = {"load_s": time.perf_counter() - t, "load_peak": status_bytes("VmHWM"), "load_peak_over_start": status_bytes("VmHWM") - start}
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJ))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, model.config.vocab_size, (1, SEQ)))
    times, losses = [], []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        times.append(time.perf_counter() - t)
    out.update(step_s=times, losses=losses, peak=status_bytes("VmHWM"))
    return out


def plan_worker(spec: dict) -> dict:
    """`jpeft.plan` of a model shape against `measure_step` of the plan's own executable on arrays of its shapes."""
    import jax.numpy as jnp

    import jpeft

    p = jpeft.plan(config_of(spec["model"]), lora_config(), batch=spec.get("batch", 1), seq_len=spec.get("seq", SEQ),
                   dtype=jnp.dtype(spec.get("dtype", "float32")), quantize=spec.get("quantize"), remat=spec.get("remat", True))
    return {"plan": p.peak, **measure_step(p)}


def mesh_worker(spec: dict) -> dict:
    """`jpeft.plan` of a big model's sharded step (bf16 base, LoRA r=16 on all projections, FSDP over every device,
    one row of `seq` tokens per device), compiled on fake CPU devices: bytes per device."""
    import jax
    import jax.numpy as jnp

    import jpeft

    t = time.perf_counter()
    n = jax.device_count()
    p = jpeft.plan(config_of(spec["model"]), lora_config(), batch=n, seq_len=spec["seq"], dtype=jnp.bfloat16, remat=True, mesh=f"fsdp={n}")
    return {"devices": n, "compile_s": time.perf_counter() - t, **{k: v for k, v in vars(p).items() if isinstance(v, (int, float, str))}}


def device_params(config, dtype: Any, quantize: str | None) -> dict:
    """Random Llama weights of `config`'s shape generated on the default device a leaf at a time, each projection
    quantized as it is made (as a streaming load quantizes as it reads): the device holds the tree plus one leaf."""
    import jax
    import jax.numpy as jnp

    from jpeft import quant, tree
    from jpeft.models import llama

    shapes = llama.param_shapes(llama.arch(config))
    abstract = tree.unflatten({p: jax.ShapeDtypeStruct(s, dtype) for p, s in shapes.items()})
    chosen = {f"{m.replace('.', '/')}/kernel" for m in quant.select(abstract, quantize)} if quantize else set()
    flat = {}
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        if path.endswith("weight"):
            flat[path] = jnp.ones(shape, dtype)
            continue
        leaf = (jax.random.normal(jax.random.key(i), shape, jnp.float32) * 0.02).astype(dtype)
        if path in chosen:
            flat.update({f"{path.rsplit('/', 1)[0]}/{k}": v for k, v in quant.quantize_weight(leaf.T, quantize).items()})
        else:
            flat[path] = leaf
        del leaf
    return tree.unflatten(flat)


def device_worker(spec: dict) -> dict:
    """On the accelerator (benchmarks/gpu.py's `scale` part): weights generated there, bf16 or NF4, a LoRA step of
    batch x seq tokens (remat) through the plan's own executable: seconds, tokens/s, MFU of the needed products
    (`speed.llama_matmul_flops`) against `peak_tflops`, and the device's peak memory against the plan's."""
    import jax
    import jax.numpy as jnp

    import jpeft
    from benchmarks import common, speed
    from jpeft.methods import lora

    config, B, L, fmt = config_of(spec["model"]), spec["batch"], spec["seq"], spec.get("quantize")
    params = device_params(config, jnp.bfloat16, fmt)
    p = jpeft.plan(config, lora_config(), batch=B, seq_len=L, target_len=L - 1, dtype=jnp.bfloat16, quantize=fmt, remat=True)
    params = lora.inject(params, lora_config(), jax.random.key(1))
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    del params
    state = {"trainable": trainable, "opt": p.request.optimizer.init(trainable)}
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (B, L)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "targets": ids[:, 1:],
             "target_index": (np.arange(B) * L + 1).astype(np.int32)}

    def step() -> None:
        state["trainable"], state["opt"], loss = p.step(state["trainable"], state["opt"], frozen, batch, None)
        loss.block_until_ready()

    t = common.timed(step, warmup=1, repeats=spec.get("repeats", 3))["median"]
    flops = speed.llama_matmul_flops(config, B, L, L - 1, lora_r=16)
    stats = jax.devices()[0].memory_stats() or {}
    peak = spec.get("peak_tflops")
    return {"step_s": t, "tokens_per_s": B * L / t, "step_tflop": flops / 1e12, "mfu": flops / t / (peak * 1e12) if peak else None,
            "device_peak_bytes": stats.get("peak_bytes_in_use"), "plan_bytes": p.peak}


def device_peft_worker(spec: dict) -> dict:
    """HF PEFT on the accelerator: the same shape's random weights made on the device in bf16, LoRA r=16 on all seven
    projections, gradient checkpointing, AdamW, `labels=`: seconds, tokens/s and PyTorch's peak allocation."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from benchmarks import common

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config, B, L = config_of(spec["model"]), spec["batch"], spec["seq"]
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.gradient_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJ))  # float32 adapters
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, config.vocab_size, (B, L))).to(device)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = common.timed(step, warmup=0, repeats=spec.get("repeats", 3))["median"]
    return {"step_s": t, "tokens_per_s": B * L / t, "torch_peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None}


WORKERS = {"jpeft": jpeft_worker, "peft": peft_worker, "plan": plan_worker, "mesh": mesh_worker, "device": device_worker,
           "device_peft": device_peft_worker}


@contextlib.contextmanager
def heavy():
    """Hold /tmp/heavy.lock (as `flock /tmp/heavy.lock` does): on a shared machine, one memory-heavy job at a time."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_worker(spec: dict, devices: int = 1, timeout: int = 7200) -> dict:
    """One worker in a fresh interpreter, alone (`heavy`); its RESULT line as a dict."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    command = [sys.executable, "-m", "benchmarks.scale", "worker", json.dumps(spec)]
    print(f"[scale] {spec}", flush=True)
    with heavy():
        t = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"worker {spec} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(next(line for line in done.stdout.splitlines()[::-1] if line.startswith("RESULT "))[len("RESULT "):])
    print(f"[scale]   {time.perf_counter() - t:.0f} s: {json.dumps(result)[:600]}", flush=True)
    return result


ROOT = Path(__file__).resolve().parents[1]
LOCK = "/tmp/heavy.lock"
GB = 1e9


# ----------------------------------------------------------------------------------------------
# Parts


def part_1b(workdir: Path, figures: dict) -> dict[str, float]:
    """Llama-3.2-1B shape, bf16 safetensors: streaming load (bf16 and NF4 as read), whole-tree NF4 time, LoRA steps."""
    ckpt = workdir / "llama-3.2-1b"
    weights = ensure_checkpoint("llama-3.2-1b", ckpt)
    bf16 = run_worker({"kind": "jpeft", "dir": str(ckpt), "dtype": "bfloat16", "quantize_after": True, "steps": 1})
    nf4 = run_worker({"kind": "jpeft", "dir": str(ckpt), "dtype": "bfloat16", "quantize": "nf4", "steps": 1})
    out = {"weights_1b_bytes": weights, "load_peak_over_weights": bf16["load_peak_over_start"] / weights,
           "load_1b_bf16_s": bf16["load_s"], "load_1b_bf16_peak_over_start_gb": bf16["load_peak_over_start"] / GB,
           "quantize_1b_nf4_s": bf16["quantize_s"], "load_1b_nf4_s": nf4["load_s"], "load_1b_nf4_peak_gb": nf4["load_peak"] / GB,
           "load_1b_nf4_peak_over_tree": nf4["load_peak_over_start"] / nf4["tree_bytes"]}
    for name, r in (("bf16", bf16), ("nf4", nf4)):
        out.update({f"step_1b_{name}_s": r["step_s"][-1], f"step_1b_{name}_compile_s": r["compile_s"], f"step_1b_{name}_losses": r["losses"],
                    f"step_1b_{name}_peak_gb": r["peak"] / GB, f"step_1b_{name}_measured_bytes": r["measured"],
                    f"step_1b_{name}_plan_bytes": r["plan"]["peak"],
                    f"plan_error_1b_{name}": abs(r["plan"]["peak"] - r["measured"]) / r["measured"]})
    return out


def part_peft(workdir: Path, figures: dict) -> dict[str, float]:
    """HF PEFT + bitsandbytes QLoRA on the same 1B checkpoint, beside jpeft's NF4 run of `part_1b` (whole-process peaks)."""
    ckpt = workdir / "llama-3.2-1b"
    ensure_checkpoint("llama-3.2-1b", ckpt)
    peft = run_worker({"kind": "peft", "dir": str(ckpt), "steps": 1})
    if "step_1b_nf4_peak_gb" not in figures:
        figures.update(part_1b(workdir, figures))
    return {"peft_qlora_1b_load_s": peft["load_s"], "peft_qlora_1b_load_peak_gb": peft["load_peak"] / GB,
            "peft_qlora_1b_step_s": peft["step_s"][-1], "peft_qlora_1b_peak_gb": peft["peak"] / GB, "peft_qlora_1b_losses": peft["losses"],
            "jpeft_over_peft_qlora_1b_peak_memory": figures["step_1b_nf4_peak_gb"] / (peft["peak"] / GB),
            "jpeft_over_peft_qlora_1b_step_time": figures["step_1b_nf4_s"] / peft["step_s"][-1]}


def part_8b(workdir: Path, figures: dict) -> dict[str, float]:
    """Llama-3-8B shape, bf16 safetensors (16 GB, deleted afterwards): QLoRA load (NF4 as read) and one LoRA step."""
    ckpt = workdir / "llama-3-8b"
    try:
        weights = ensure_checkpoint("llama-3-8b", ckpt)
        wait_for_memory(12 * GB)
        r = run_worker({"kind": "jpeft", "dir": str(ckpt), "dtype": "bfloat16", "quantize": "nf4", "steps": 1})
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)
    return {"weights_8b_bytes": weights, "qlora_8b_load_s": r["load_s"], "qlora_8b_load_peak_gb": r["load_peak"] / GB,
            "qlora_8b_tree_gb": r["tree_bytes"] / GB, "qlora_8b_step_s": r["step_s"][0], "qlora_8b_compile_s": r["compile_s"],
            "qlora_8b_step_peak_gb": r["peak"] / GB, "qlora_8b_step_measured_bytes": r["measured"],
            "qlora_8b_plan_bytes": r["plan"]["peak"], "qlora_8b_losses": r["losses"],
            "plan_error_8b_nf4": abs(r["plan"]["peak"] - r["measured"]) / r["measured"]}


PLAN_RUNS = {  # name -> plan_worker spec: the other models that run here, as the planner sees and runs them
    "tiny_f32": {"model": "tiny", "batch": 4, "seq": 256},
    "smollm2_f32": {"model": "smollm2-135m"},
    "gemma3_270m_bf16_nf4": {"model": "gemma3-270m", "dtype": "bfloat16", "quantize": "nf4"},
}


def part_plans(workdir: Path, figures: dict) -> dict[str, float]:
    """The planner against measured peaks on the models that run here (random weights of their shapes, 1 x 512, remat)."""
    out = {}
    for name, spec in PLAN_RUNS.items():
        r = run_worker({"kind": "plan", **spec})
        out.update({f"plan_{name}_bytes": r["plan"], f"plan_{name}_measured_bytes": r["measured"], f"plan_{name}_cold_bytes": r["cold"],
                    f"plan_error_{name}": abs(r["plan"] - r["measured"]) / r["measured"]})
    return out


MESH_RUNS = {"llama_3_70b_fsdp8": ("llama-3-70b", 8), "llama_3_1_405b_fsdp64": ("llama-3.1-405b", 64)}


def part_mesh(workdir: Path, figures: dict) -> dict[str, float]:
    """Llama-3-70B on 8 and Llama-3.1-405B on 64 fake CPU devices: one sharded step's bytes per device, compiled."""
    out = {}
    for name, (model, n) in MESH_RUNS.items():
        r = run_worker({"kind": "mesh", "model": model, "seq": 4096}, devices=n)
        out.update({f"mesh_{name}_{k}": v for k, v in r.items() if isinstance(v, (int, float))})
    return out


PARTS = {"1b": part_1b, "peft": part_peft, "8b": part_8b, "plans": part_plans, "mesh": part_mesh}


def wait_for_memory(needed: float, timeout: float = 3600) -> None:
    """Wait (up to `timeout` s) until the machine has `needed` bytes available: other jobs share it, and not all take the lock."""
    deadline = time.monotonic() + timeout
    while True:
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable:"))
        if available >= needed or time.monotonic() > deadline:
            return
        print(f"[scale] waiting for memory: {available / GB:.1f} GB available, {needed / GB:.1f} GB wanted", flush=True)
        time.sleep(60)


def ensure_checkpoint(name: str, directory: Path) -> int:
    """The random checkpoint of shape `name` in `directory`, written once (reused while its config matches)."""
    config = config_of(name)
    index = directory / "model.safetensors.index.json"
    if index.is_file() and json.loads((directory / "config.json").read_text()).get("hidden_size") == config.hidden_size:
        return json.loads(index.read_text())["metadata"]["total_size"]
    shutil.rmtree(directory, ignore_errors=True)
    t = time.perf_counter()
    with heavy():
        weights = write_checkpoint(config, directory)
    print(f"[scale] wrote {directory} ({weights / GB:.2f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    return weights


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen parts, print the targets' table, write the JSON."""
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        spec = json.loads(argv[1])
        print("RESULT " + json.dumps(WORKERS[spec.pop("kind")](spec)), flush=True)
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/jpeft_scale"), help="where the random checkpoints are written")
    parser.add_argument("--json", type=Path, help="write every figure here (merged into what the file already holds)")
    args = parser.parse_args(argv)
    from benchmarks import common
    from benchmarks.run import met

    figures = json.loads(args.json.read_text()) if args.json and args.json.is_file() else {}
    figures.update(common.machine())
    for name in args.parts.split(","):
        t = time.perf_counter()
        figures.update(PARTS[name](args.workdir, figures))
        figures[f"section_scale_{name}_s"] = time.perf_counter() - t
        errors = [v for k, v in figures.items() if k.startswith("plan_error_") and isinstance(v, float)]
        if errors:
            figures["plan_error_max"] = max(errors)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1, sort_keys=True))
    for key, op, target in TARGETS:
        value = figures.get(key)
        print(f"{key:<40} {'-' if value is None else f'{value:.3f}':>10} {op} {target}  "
              f"{'' if value is None else 'met' if met(value, op, target) else 'NOT MET'}")
    return figures


if __name__ == "__main__":
    main()
