"""The GPU check, one prepared run on a lent NVIDIA GPU (`benchmarks/gpu.sh`): numerics of jpeft's GPU path, then
timings side by side with PyTorch / HF PEFT on the same device.

Parts, in order of what matters most when time runs out (each one is timed, and a failing part is recorded and
skipped, never fatal):

- `info`: devices, library versions, cuDNN.
- `peak`: a large bf16 (and fp32) matmul under jax: the measured peak MFU is counted against.
- `numerics`: tiny T5 / Llama / Gemma 3 with randomized LoRA, fp32 at the highest matmul precision: logits and LoRA
  gradients of the GPU path (`jpeft.nn.KERNELS`, attention through `jax.nn.dot_product_attention`) against the CPU
  path on jax's CPU backend; the bf16 GPU path (cuDNN flash attention where it applies) against the fp32 CPU path;
  and jpeft against transformers + PEFT on the GPU (fp32, tf32 off).
- `smollm2_step`, `t5_step`: LoRA train steps (SmolLM2-135M shape, r=16 on all seven projections, 16 x 512 tokens;
  FLAN-T5-small shape, r=8 on q, v, 32 x 512 -> 128 tokens), jpeft and PEFT interleaved, in fp32 and in bf16 compute
  with float32 master weights on both sides (jpeft's loss `dtype`, torch autocast), with MFU and peak memory.
- `generation`: greedy decoding of 64 tokens, T5-small shape and SmolLM2 shape, jpeft vs transformers, fp32 and bf16.
- `cpu_kernels`: the SmolLM2 bf16 step traced with the CPU-tuned paths (`KERNELS = "cpu"`) on the GPU: whether keeping
  them off the GPU is right.
- `scale`: Llama-3.2-1B and Llama-3-8B shapes (weights generated on the device), bf16 and NF4 bases, LoRA r=16 on all
  seven projections, rows of 512 tokens with remat: tokens/s, MFU, device peak memory against `jpeft.plan`, and HF PEFT
  (bf16 base) on the same GPU; each run in its own process (`benchmarks.scale`'s device workers). Not yet run on a GPU.

Figures go to OUT/gpu.json and OUT/gpu.md after every part, so a run cut short keeps what it measured.
`--cpu-smoke` runs every part on tiny shapes on the CPU (the GPU path forced with KERNELS="gpu"): how CI checks
this script (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import speed
from jpeft.models import attention

START = time.monotonic()
H200_BF16_PEAK = 790e12  # dense bf16 FLOP/s measured on an H200 (the issue's figure); the run measures its own too
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    """A progress line with the seconds since start, flushed at once (the run is watched live)."""
    print(f"[gpu {time.monotonic() - START:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Where things run


def accelerator() -> jax.Device:
    """The device under test: the first GPU, or the CPU in a smoke run."""
    return jax.devices()[0]


def on_gpu() -> bool:
    return accelerator().platform == "gpu"


@contextlib.contextmanager
def path(side: str):
    """Trace on `side`: "device" (the accelerator, GPU path) or "cpu" (jax's CPU backend, CPU-tuned path)."""
    from jpeft import nn

    saved = nn.KERNELS
    nn.KERNELS = ("auto" if on_gpu() else "gpu") if side == "device" else "cpu"
    device = accelerator() if side == "device" else jax.devices("cpu")[0]
    try:
        with jax.default_device(device):
            yield device
    finally:
        nn.KERNELS = saved


def run_on(side: str, fn: Callable, *args) -> Any:
    """fn(*args) jitted afresh on `side` (see `path`), arguments placed there, results as numpy."""
    with path(side) as device:  # a fresh function: jit's cache would otherwise keep the other side's trace
        out = jax.jit(lambda *a: fn(*a))(*jax.device_put(args, device))
        return jax.tree.map(np.asarray, out)


def precision_for(dtype: Any):
    """Full float32 matmuls for a float32 trace (XLA's GPU default rounds them to TF32, PyTorch's default does not);
    the default for bf16, whose products accumulate in float32 anyway."""
    return jax.default_matmul_precision("float32") if jnp.dtype(dtype) == jnp.float32 else contextlib.nullcontext()


def with_precision(dtype: Any, call: Callable[[], Any]) -> Callable[[], Any]:
    """`call` run under `precision_for(dtype)` every time: jit keys its cache on the precision, so a call outside the
    scope would retrace at the default."""

    def run():
        with precision_for(dtype):
            return call()

    return run


def torch_device() -> str:
    return "cuda" if on_gpu() else "cpu"


def torch_sync() -> None:
    if on_gpu():
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Tiny models for the numerics


def tiny_configs(smoke: bool = False) -> dict[str, Any]:
    """T5 (float position bias), Llama (GQA, head dim 16) and Gemma 3 (sliding window, QK-norm); even lengths suit cuDNN.
    A smoke run checks Llama only (tests/test_gpu_path.py covers the others on the CPU)."""
    import transformers

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.1, max_position_embeddings=128)
    configs = {
        "t5": transformers.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2, num_decoder_layers=2,
                                    relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                                    tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0),
        "llama": transformers.LlamaConfig(**common),
        "gemma3": transformers.Gemma3TextConfig(**common, sliding_window=6, layer_types=["sliding_attention", "full_attention"],
                                                query_pre_attn_scalar=16),
    }
    return {"llama": configs["llama"]} if smoke else configs


def _module(name: str):
    from jpeft.models import gemma, llama, t5

    return {"t5": t5, "llama": llama, "gemma3": gemma}[name]


def lora_params(name: str, config, targets: list[str]) -> dict:
    """Random base weights with LoRA (r=4) on `targets`, B randomized as if trained."""
    import jpeft

    params = jpeft.lora.inject(_module(name).init_params(config, jax.random.key(0)), jpeft.LoraConfig(r=4, alpha=8, target_modules=targets),
                               jax.random.key(1))
    flat = jpeft.tree.flatten(params)
    for i, (p, v) in enumerate(sorted(flat.items())):
        if p.endswith("lora_b"):
            flat[p] = 0.1 * jax.random.normal(jax.random.fold_in(jax.random.key(2), i), v.shape, v.dtype)
    return jpeft.tree.unflatten(flat)


def tiny_batch(name: str, config, B: int = 2, T: int = 16) -> tuple[dict, Callable, Callable]:
    """(batch, forward(params, batch) -> logits, loss_for(dtype) -> loss(params, batch, rng)); row 1 padded (left for decoders)."""
    from jpeft import training

    rng = np.random.default_rng(0)
    if name == "t5":
        from jpeft.models import t5

        mask = np.ones((B, T), np.int32)
        mask[1, T // 2:] = 0
        batch = {"input_ids": rng.integers(2, 128, (B, T)).astype(np.int32) * mask, "attention_mask": mask,
                 "labels": rng.integers(2, 128, (B, T // 2)).astype(np.int32)}
        forward = lambda p, b: t5.forward(config, p, b["input_ids"], b["attention_mask"], t5.shift_right(b["labels"], config))  # noqa: E731
        return batch, forward, lambda dtype: training.seq2seq_loss(config, dtype=dtype)
    module = _module(name)
    mask = np.ones((B, T), np.int32)
    mask[1, : T // 4] = 0
    targets = rng.integers(2, 128, (B, 4)).astype(np.int32)
    batch = {"input_ids": rng.integers(3, 128, (B, T)).astype(np.int32) * mask, "attention_mask": mask, "targets": targets,
             "target_index": (np.arange(B) * T + T - 4).astype(np.int32)}
    forward = lambda p, b: module.forward(config, p, b["input_ids"], b["attention_mask"])  # noqa: E731
    return batch, forward, lambda dtype: training.causal_lm_loss(config, dtype=dtype)


def _max_rel(a: Any, b: Any) -> float:
    """Largest |a - b| over the largest |b|, across a tree (0 when both are zero)."""
    diffs = [float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    scale = max(float(np.max(np.abs(np.asarray(y, np.float32)))) for y in jax.tree.leaves(b))
    return max(diffs) / max(scale, 1e-30)


# ----------------------------------------------------------------------------------------------
# Parts


def part_info(smoke: bool) -> dict:
    import flax
    import optax
    import peft
    import torch
    import transformers

    if shutil.which("nvidia-smi"):
        log(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
    log(f"jax devices: {jax.devices()}")
    info = {"device": accelerator().device_kind, "platform": accelerator().platform, "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": sys.version.split()[0], "torch_cuda": torch.cuda.is_available(),
            "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "compute_capability": getattr(accelerator(), "compute_capability", None)}
    for k, v in info.items():
        log(f"  {k}: {v}")
    return info


def part_peak(smoke: bool) -> dict:
    """FLOP/s of n x n x n matmuls under jax, bf16 and fp32 (default precision: TF32 where the GPU uses it)."""
    n, reps = (256, 2) if smoke else (8192, 20)
    out = {}
    for dtype in ("bfloat16", "float32"):
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        b = jax.random.normal(jax.random.key(1), (n, n), dtype)
        f = jax.jit(lambda a, b: a @ b)
        f(a, b).block_until_ready()

        def call():
            for _ in range(reps):
                y = f(a, b)
            y.block_until_ready()

        t = speed.timed_together({"mm": call}, 1, 3)["mm_s"]
        out[f"matmul_peak_{dtype}_tflops"] = 2 * n**3 * reps / t / 1e12
        log(f"  {dtype} {n}^3 matmul: {out[f'matmul_peak_{dtype}_tflops']:.1f} TFLOP/s")
    return out


def part_numerics(smoke: bool) -> dict:
    """GPU path vs CPU path (fp32 and bf16), and jpeft vs transformers + PEFT on the device (fp32)."""
    from jpeft import nn, split

    out: dict[str, Any] = {}
    impls: list[str] = []
    real = jax.nn.dot_product_attention

    def counted(*args, **kwargs):
        impls.append(kwargs.get("implementation"))
        return real(*args, **kwargs)

    jax.nn.dot_product_attention = counted
    try:
        for name, config in tiny_configs(smoke).items():
            targets = ["q", "v", "wo"] if name == "t5" else ["q_proj", "v_proj", "down_proj"]
            params = lora_params(name, config, targets)
            batch, forward, loss_for = tiny_batch(name, config)
            trainable, frozen = split.partition(params, split.trainable_mask(params))

            def grad(t, b, loss=loss_for(jnp.float32)):
                return jax.grad(lambda t: loss(split.combine(t, frozen), b, None))(t)

            keep = np.asarray(batch["attention_mask"], bool) if name != "t5" else np.ones(batch["labels"].shape, bool)
            with jax.default_matmul_precision("highest"):
                logits = {side: run_on(side, forward, params, batch)[keep] for side in ("device", "cpu")}
                grads = {side: run_on(side, grad, trainable, batch) for side in ("device", "cpu")}
            out[f"{name}_fp32_logits_max_abs_diff"] = float(np.max(np.abs(logits["device"] - logits["cpu"])))
            out[f"{name}_fp32_lora_grad_max_rel_diff"] = _max_rel(grads["device"], grads["cpu"])
            # bf16 compute on both paths (cuDNN flash attention for the decoders' boolean masks on the device), each
            # against the fp32 CPU path: the GPU path must be no less accurate than the CPU path.
            before = len(impls)
            half_grad = lambda t, b: grad(t, b, loss_for(jnp.bfloat16))  # noqa: E731
            try:
                half = {"device": run_on("device", half_grad, trainable, batch)}
            except Exception as e:  # noqa: BLE001  cuDNN refused: record it, and let XLA's implementation serve the rest of the run
                if not attention.CUDNN_ATTENTION:
                    raise
                log(f"  cuDNN attention failed ({type(e).__name__}: {str(e)[:300]}); continuing with JPEFT_CUDNN_ATTENTION=0")
                out["cudnn_attention_error"] = f"{type(e).__name__}: {str(e)[:500]}"
                attention.CUDNN_ATTENTION = False
                half = {"device": run_on("device", half_grad, trainable, batch)}
            half["cpu"] = run_on("cpu", half_grad, trainable, batch)
            out[f"{name}_bf16_attention_impls"] = sorted(set(impls[before:]))
            err = {side: _max_rel(g, grads["cpu"]) for side, g in half.items()}
            out[f"{name}_bf16_lora_grad_max_rel_err_device"], out[f"{name}_bf16_lora_grad_max_rel_err_cpu"] = err["device"], err["cpu"]
            out[f"{name}_bf16_error_over_cpu_path_error"] = err["device"] / max(err["cpu"], 1e-30)
            log(f"  {name}: fp32 logits {out[f'{name}_fp32_logits_max_abs_diff']:.2e}, fp32 grads {out[f'{name}_fp32_lora_grad_max_rel_diff']:.2e}; "
                f"bf16 grads' error device {err['device']:.2e} ({out[f'{name}_bf16_attention_impls']}), cpu path {err['cpu']:.2e}")
        out["attention_impls_seen"] = sorted(set(map(str, impls)))
    finally:
        jax.nn.dot_product_attention = real
    out.update(_attention_kernel_check(nn, 64 if smoke else 256))
    out.update(_vs_peft(smoke))
    tolerances = {"fp32_logits_max_abs_diff": 1e-4, "fp32_lora_grad_max_rel_diff": 1e-4, "bf16_error_over_cpu_path_error": 2.0,
                  "vs_peft_fp32_logits_max_abs_diff": 1e-4, "attention_float32_out_max_abs_diff": 1e-4, "attention_float32_grad_max_rel_diff": 1e-4,
                  "attention_bfloat16_out_max_abs_diff": 5e-2, "attention_bfloat16_grad_max_rel_diff": 5e-2}
    failed = [k for k, v in out.items() if any(k.endswith(s) and v > tol for s, tol in tolerances.items())]
    out["numerics_tolerances"] = tolerances
    out["numerics_ok"] = not failed
    if failed:
        log(f"  OUT OF TOLERANCE: {failed}")
    return out


def _attention_kernel_check(nn, T: int) -> dict:
    """One causal, left-padded GQA attention (head dim 64, T tokens) in bf16 on the device's path vs fp32 on the CPU's."""
    B, KV, G, E = 2, 2, 3, 64
    keys = jax.random.split(jax.random.key(5), 4)
    q, k, v, g = (jax.random.normal(kk, s, jnp.float32) for kk, s in zip(keys, [(B, KV, G, T, E), (B, KV, T, E), (B, KV, T, E), (B, KV, G, T, E)]))
    real = np.ones((B, T), bool)
    real[1, : T // 6] = False
    visible = jnp.asarray(real[:, None, :] & np.tril(np.ones((T, T), bool))[None])[:, None, None]
    scale = E**-0.5
    ctx = nn.Ctx()

    def f(q, k, v, g, dtype):
        out, vjp = jax.vjp(lambda q, k, v: attention.causal_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), visible, scale, ctx), q, k, v)
        return out, vjp(g.astype(dtype))

    rows = np.broadcast_to(real[:, None, None, :, None], (B, KV, G, T, 1))
    g = jnp.where(rows, g, 0)  # padding queries see no key: their outputs are arbitrary, so no gradient flows from them
    ref = run_on("cpu", lambda *a: f(*a, jnp.float32), q, k, v, g)
    res = {}
    for dtype in ("float32", "bfloat16"):
        with jax.default_matmul_precision("highest"):
            got = run_on("device", lambda *a: f(*a, jnp.dtype(dtype)), q, k, v, g)
        out_diff = float(np.max(np.abs(np.where(rows, got[0].astype(np.float32) - ref[0], 0))))
        res[f"attention_{dtype}_out_max_abs_diff"] = out_diff
        res[f"attention_{dtype}_grad_max_rel_diff"] = _max_rel(got[1], ref[1])
        log(f"  attention kernel {dtype}: out {out_diff:.2e}, grads {res[f'attention_{dtype}_grad_max_rel_diff']:.2e}")
    return res


def _vs_peft(smoke: bool) -> dict:
    """jpeft (device, fp32, highest precision) against transformers + PEFT (device, fp32, tf32 off): tiny Llama and T5 with LoRA."""
    import peft
    import torch
    import transformers

    import jpeft
    from jpeft.models import llama, t5

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    configs = tiny_configs(smoke)
    models = {"llama": (transformers.LlamaForCausalLM, llama, ["q_proj", "v_proj", "down_proj"]),
              "t5": (transformers.T5ForConditionalGeneration, t5, ["q", "v", "wo"])}
    out = {}
    for name, (cls, module, targets) in models.items():
        if name not in configs:
            continue
        torch.manual_seed(0)
        model = cls(configs[name]).eval()
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(f"{tmp}/base")
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(0.1 * torch.randn_like(p))
            model.save_pretrained(f"{tmp}/adapter")
            _, base = module.load_pretrained(f"{tmp}/base")
            params = jpeft.load_adapter(f"{tmp}/adapter", base)
        batch, forward, _ = tiny_batch(name, configs[name])
        model = model.to(torch_device())
        tensors = {k: torch.from_numpy(np.asarray(batch[k], np.int64)).to(torch_device()) for k in ("input_ids", "attention_mask")}
        if name == "t5":
            tensors["decoder_input_ids"] = torch.from_numpy(np.asarray(t5.shift_right(batch["labels"], configs[name]), np.int64)).to(torch_device())
        with torch.no_grad():
            ref = model(**tensors).logits.float().cpu().numpy()
        with jax.default_matmul_precision("highest"):
            got = run_on("device", forward, params, batch)
        keep = np.asarray(batch["attention_mask"], bool) if name != "t5" else np.ones(ref.shape[:2], bool)
        out[f"{name}_vs_peft_fp32_logits_max_abs_diff"] = float(np.max(np.abs(got[keep] - ref[keep])))
        log(f"  {name} vs transformers+PEFT on {torch_device()}: {out[f'{name}_vs_peft_fp32_logits_max_abs_diff']:.2e}")
    return out


def smollm2_config(smoke: bool):
    """SmolLM2-135M's shape (30 layers, 576 wide, 9 heads over 3 KV heads of 64, 49152 tokens, tied head); tiny when smoke."""
    import transformers

    if smoke:
        return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
                                    pad_token_id=2, eos_token_id=2, bos_token_id=1)


def _peft_train_step(model, tensors: dict, bf16: bool) -> Callable[[], None]:
    """One AdamW step of a PEFT model on the device; bf16 compute by autocast over float32 weights, as PEFT users train."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch_device(), dtype=torch.bfloat16, enabled=bf16):
            loss = model(**tensors).loss
        loss.backward()
        opt.step()
        torch_sync()

    return step


def _torch_peak(call: Callable[[], None]) -> int:
    """Peak bytes PyTorch allocates on the GPU during one call (0 off the GPU)."""
    if not on_gpu():
        call()
        return 0
    import torch

    torch.cuda.reset_peak_memory_stats()
    call()
    return int(torch.cuda.max_memory_allocated())


def _steps(prefix: str, jpeft_steps: dict[str, Any], peft_steps: dict[str, Callable[[], None]], work: float, tokens: int, smoke: bool) -> dict:
    """jpeft and PEFT steps ({"fp32": ..., "bf16": ...}) timed interleaved: times, tokens/s, peak memory, and MFU of
    `work` FLOPs against the measured bf16 peak and against 790 TFLOP/s."""
    out: dict[str, Any] = {f"{prefix}_step_gflop": work / 1e9}
    calls = {}
    for dtype, step in jpeft_steps.items():
        calls[f"{prefix}_jpeft_{dtype}_step"], calls[f"{prefix}_peft_{dtype}_step"] = step, peft_steps[dtype]
        out[f"{prefix}_jpeft_{dtype}_xla_peak_bytes"] = step.memory()["peak"]
        out[f"{prefix}_peft_{dtype}_torch_peak_bytes"] = _torch_peak(peft_steps[dtype])
    out.update(speed.timed_together(calls, 1 if smoke else 2, 2 if smoke else 5))
    peak = FIGURES.get("matmul_peak_bfloat16_tflops")
    for dtype in jpeft_steps:
        for side in ("jpeft", "peft"):
            t = out[f"{prefix}_{side}_{dtype}_step_s"]
            out[f"{prefix}_{side}_{dtype}_tokens_per_s"] = tokens / t
            out[f"{prefix}_{side}_{dtype}_mfu_vs_790"] = work / t / H200_BF16_PEAK
            if peak:
                out[f"{prefix}_{side}_{dtype}_mfu"] = work / t / (peak * 1e12)
        j, p = out[f"{prefix}_jpeft_{dtype}_step_s"], out[f"{prefix}_peft_{dtype}_step_s"]
        out[f"{prefix}_jpeft_over_peft_{dtype}_step_time"] = j / p
        log(f"  {prefix} {dtype}: jpeft {j * 1e3:.1f} ms, PEFT {p * 1e3:.1f} ms, ratio {j / p:.2f}")
    return out


def _smollm2_jpeft_step(config, batch) -> Callable[[Any], Any]:
    """dtype -> a compiled jpeft LoRA step (r=16, alpha 32, all seven projections) on `batch`."""
    import jpeft
    from benchmarks import common
    from jpeft import training
    from jpeft.models import llama

    def make(dtype):
        params = jpeft.lora.inject(llama.init_params(config, jax.random.key(0)), jpeft.LoraConfig(r=16, alpha=32, target_modules=PROJ),
                                   jax.random.key(1))
        trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
        # No remat: at this size the activations fit easily on the GPU, as PEFT's do without gradient checkpointing.
        with precision_for(dtype):
            return common.Step(training.causal_lm_loss(config, dtype=dtype), trainable, frozen, batch)

    return make


def smollm2_batch(config, smoke: bool) -> tuple[dict, int]:
    from benchmarks import memory

    B, L, targets = (2, 32, 8) if smoke else (16, 512, 64)
    return memory.smollm2_batch(config, B, L, targets), B * L


def part_smollm2_step(smoke: bool) -> dict:
    """SmolLM2-shaped LoRA step, jpeft vs PEFT (random weights of the real shape)."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    config = smollm2_config(smoke)
    batch, tokens = smollm2_batch(config, smoke)
    L, T = batch["input_ids"].shape[1], batch["targets"].shape[1]
    labels = np.full(batch["input_ids"].shape, -100, np.int64)
    labels[:, L - T:] = batch["targets"]  # memory.smollm2_batch scores each row's last T tokens

    def peft_step(bf16: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ, lora_dropout=0.0, task_type="CAUSAL_LM"))
        model.to(torch_device()).train()
        tensors = {"input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)).to(torch_device()),
                   "attention_mask": torch.from_numpy(batch["attention_mask"].astype(np.int64)).to(torch_device()),
                   "labels": torch.from_numpy(labels).to(torch_device())}
        return _peft_train_step(model, tensors, bf16)

    make = _smollm2_jpeft_step(config, batch)
    jpeft_steps = {"fp32": make(jnp.float32), "bf16": make(jnp.bfloat16)}
    COMPILED["smollm2_bf16"] = jpeft_steps["bf16"]  # `cpu_kernels` times it again beside the CPU-tuned trace
    log("  smollm2: jpeft steps compiled")
    # Counted analytically: on the GPU most products compile to cuBLAS custom calls that `dot_flops` cannot see.
    work = speed.llama_matmul_flops(config, *batch["input_ids"].shape, batch["targets"].shape[1], lora_r=16)
    return _steps("smollm2", jpeft_steps, {"fp32": peft_step(False), "bf16": peft_step(True)}, work, tokens, smoke)


def part_t5_step(smoke: bool) -> dict:
    """FLAN-T5-small-shaped LoRA step (r=8 on q, v), jpeft vs PEFT."""
    import peft
    import torch
    from transformers import T5ForConditionalGeneration

    import jpeft
    from benchmarks import common
    from jpeft import training
    from jpeft.models import t5

    config = common.t5_config(quick=smoke)
    B, S, T = (2, 32, 8) if smoke else (32, 512, 128)
    batch = common.t5_batch(config, B, S, T)

    def jpeft_step(dtype):
        params = jpeft.lora.inject(t5.init_params(config, jax.random.key(0)), jpeft.LoraConfig(r=8, alpha=8, target_modules=["q", "v"]), jax.random.key(1))
        trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
        with precision_for(dtype):
            return common.Step(training.seq2seq_loss(config, dtype=dtype), trainable, frozen, batch)

    def peft_step(bf16: bool):
        torch.manual_seed(0)
        model = peft.get_peft_model(T5ForConditionalGeneration(config), peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.0))
        model.to(torch_device()).train()
        tensors = {k: torch.from_numpy(np.asarray(v, np.int64)).to(torch_device()) for k, v in batch.items()}
        return _peft_train_step(model, tensors, bf16)

    jpeft_steps = {"fp32": jpeft_step(jnp.float32), "bf16": jpeft_step(jnp.bfloat16)}
    log("  t5: jpeft steps compiled")
    return _steps("t5", jpeft_steps, {"fp32": peft_step(False), "bf16": peft_step(True)}, speed.t5_matmul_flops(config, B, S, T), B * (S + T), smoke)


def part_generation(smoke: bool) -> dict:
    """Greedy decoding of `new` tokens (EOS never matches), jpeft vs transformers, fp32 and bf16 weights and compute."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks import common, inference
    from jpeft.models import llama, t5

    B, P, new = (2, 16, 4) if smoke else (8, 256, 64)
    out: dict[str, Any] = {}
    calls: dict[str, Callable] = {}
    t5_config = common.t5_config(quick=smoke)
    ids = np.random.default_rng(0).integers(2, t5_config.vocab_size, (B, P), dtype=np.int32)
    t5_base = t5.init_params(t5_config, jax.random.key(0))
    config = smollm2_config(smoke)
    base = llama.init_params(config, jax.random.key(0))
    prompt = np.random.default_rng(1).integers(3, config.vocab_size, (B, P), dtype=np.int32)
    mask = np.ones((B, P), np.int32)
    model = LlamaForCausalLM(config).eval()  # fp32 here; the bf16 copy below is a separate module (`.to` casts in place)
    state = {k: torch.from_numpy(np.array(v)) for k, v in llama.state_dict_from_params(config, base).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    for dtype in ("fp32", "bf16"):
        bf16 = dtype == "bf16"
        jdtype = jnp.bfloat16 if bf16 else jnp.float32
        cast = lambda t: jax.tree.map(lambda x: x.astype(jdtype), t)  # noqa: E731
        calls[f"gen_t5_jpeft_{dtype}"] = with_precision(jdtype, inference.jpeft_generate(t5_config, cast(t5_base), ids, new, dtype=jdtype))
        calls[f"gen_t5_transformers_{dtype}"] = inference.transformers_generate(t5_config, t5_base, ids, new, bf16=bf16)
        params = cast(base)
        calls[f"gen_smollm2_jpeft_{dtype}"] = with_precision(jdtype, lambda p=params, d=jdtype: llama.generate(
            config, p, prompt, mask, max_new_tokens=new, eos_token_id=-1, dtype=d).block_until_ready())
        m = (copy.deepcopy(model) if bf16 else model).to(torch_device(), torch.bfloat16 if bf16 else torch.float32)
        tensors = (torch.from_numpy(prompt.astype(np.int64)).to(torch_device()), torch.from_numpy(mask.astype(np.int64)).to(torch_device()))

        def hf(m=m, tensors=tensors):
            with torch.inference_mode():
                y = m.generate(tensors[0], attention_mask=tensors[1], max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
            torch_sync()
            return y

        calls[f"gen_smollm2_transformers_{dtype}"] = hf
        if dtype == "fp32":  # same tokens out: the comparison is of the same work
            j = np.asarray(calls["gen_smollm2_jpeft_fp32"]())[:, -new:]
            h = hf().cpu().numpy()[:, -new:]
            out["gen_smollm2_fp32_same_tokens_fraction"] = float(np.mean(j == h))
        log(f"  generation {dtype}: set up")
    out.update(speed.timed_together(calls, 1, 2 if smoke else 3))
    for model_name in ("t5", "smollm2"):
        for dtype in ("fp32", "bf16"):
            j, h = out[f"gen_{model_name}_jpeft_{dtype}_s"], out[f"gen_{model_name}_transformers_{dtype}_s"]
            out[f"gen_{model_name}_{dtype}_speedup_vs_transformers"] = h / j
            out[f"gen_{model_name}_jpeft_{dtype}_tokens_per_s"] = B * new / j
            log(f"  {model_name} {dtype}: jpeft {j:.3f} s, transformers {h:.3f} s, speedup {h / j:.2f}")
    return out


def part_cpu_kernels(smoke: bool) -> dict:
    """The SmolLM2 bf16 step with the CPU-tuned paths traced on the device, beside the GPU path's."""
    config = smollm2_config(smoke)
    batch, _ = smollm2_batch(config, smoke)
    make = _smollm2_jpeft_step(config, batch)
    with path("device"):
        gpu_step = COMPILED.get("smollm2_bf16") or make(jnp.bfloat16)
    with path("cpu"), jax.default_device(accelerator()):  # the CPU-tuned code, traced for the device
        cpu_step = make(jnp.bfloat16)
    out = speed.timed_together({"smollm2_bf16_gpu_path_step": gpu_step, "smollm2_bf16_cpu_tuned_path_step": cpu_step}, 1, 2 if smoke else 5)
    out["smollm2_bf16_gpu_path_over_cpu_path_step_time"] = out["smollm2_bf16_gpu_path_step_s"] / out["smollm2_bf16_cpu_tuned_path_step_s"]
    log(f"  GPU path over CPU-tuned path on this device: {out['smollm2_bf16_gpu_path_over_cpu_path_step_time']:.2f}")
    return out


def part_scale(smoke: bool) -> dict:
    """Llama-3.2-1B and Llama-3-8B shapes on the device (weights generated there; `benchmarks.scale`'s device workers,
    each in a fresh process so each peak is its own): bf16 and NF4 bases, LoRA r=16 on all seven projections, rows of
    512 tokens with remat; tokens/s, MFU against the measured bf16 peak, device peak memory against `jpeft.plan`; HF
    PEFT (bf16 base, gradient checkpointing) on the same GPU, alone in its process."""
    from benchmarks import scale

    runs = {"tiny": 2} if smoke else {"llama-3.2-1b": 8, "llama-3-8b": 4}  # model -> rows of `seq` tokens
    seq, out = 32 if smoke else scale.SEQ, {}
    for model, rows in runs.items():
        name = model.replace("-", "_").replace(".", "_")
        for fmt in (None, "nf4"):
            spec = {"kind": "device", "model": model, "batch": rows, "seq": seq, "quantize": fmt, "repeats": 1 if smoke else 3,
                    "peak_tflops": FIGURES.get("matmul_peak_bfloat16_tflops")}
            r = scale.run_worker(spec, timeout=900)
            out.update({f"scale_{name}_{fmt or 'bf16'}_{k}": v for k, v in r.items()})
            log(f"  {model} {fmt or 'bf16'}: {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']}, peak {r['device_peak_bytes']} (plan {r['plan_bytes']})")
        try:
            r = scale.run_worker({"kind": "device_peft", "model": model, "batch": rows, "seq": seq, "repeats": 1 if smoke else 3}, timeout=900)
            out.update({f"scale_{name}_peft_bf16_{k}": v for k, v in r.items()})
            out[f"scale_{name}_jpeft_over_peft_bf16_step_time"] = out[f"scale_{name}_bf16_step_s"] / r["step_s"]
        except RuntimeError as e:  # out of memory, most likely: recorded, and the next shape runs
            out[f"scale_{name}_peft_bf16_error"] = str(e)[-300:]
    return out


PARTS: dict[str, Callable[[bool], dict]] = {
    "info": part_info, "peak": part_peak, "numerics": part_numerics, "smollm2_step": part_smollm2_step,
    "t5_step": part_t5_step, "generation": part_generation, "cpu_kernels": part_cpu_kernels, "scale": part_scale,
}
FIGURES: dict[str, Any] = {}
COMPILED: dict[str, Any] = {}  # steps one part compiles and a later one reuses


def write(out_dir: Path, status: dict[str, str]) -> None:
    """gpu.json (every figure) and gpu.md (a table), rewritten after each part."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps({"parts": status, "figures": FIGURES}, indent=1, default=str))
    lines = ["| part | status |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in status.items()), "", "| figure | value |", "| --- | ---: |"]
    for k, v in FIGURES.items():
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    (out_dir / "gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the parts in order within `--budget-s`; 0 when every part ran and the numerics held."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu_out")), help="folder for gpu.json, gpu.md")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, GPU path forced (CI)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no part after this many seconds")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    if args.cpu_smoke:  # the CPU stands in for the device: the GPU path is forced wherever a part does not choose
        from jpeft import nn

        jax.config.update("jax_platforms", "cpu")
        nn.KERNELS = "gpu"
    elif not on_gpu():
        log("warning: no GPU visible to jax; figures will be the CPU's (use --cpu-smoke for the quick check)")
    status: dict[str, str] = {}
    for name in parts:
        if time.monotonic() - START > args.budget_s:
            status[name] = "skipped (time budget spent)"
            log(f"{name}: skipped, {args.budget_s:.0f} s budget spent")
            continue
        log(f"{name} ...")
        t0 = time.monotonic()
        try:
            FIGURES.update(PARTS[name](args.cpu_smoke))
            status[name] = f"ok ({time.monotonic() - t0:.0f} s)"
        except Exception as e:  # noqa: BLE001  a failing part is recorded and the next one runs
            traceback.print_exc()
            status[name] = f"failed ({time.monotonic() - t0:.0f} s): {type(e).__name__}: {str(e)[:300]}"
        log(f"{name}: {status[name]}")
        write(args.out, status)
    write(args.out, status)
    log(f"done; figures in {args.out}/gpu.json and gpu.md")
    ok = all(s.startswith("ok") for s in status.values()) and FIGURES.get("numerics_ok", "numerics" not in parts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
