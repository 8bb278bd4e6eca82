"""Shared pieces: timing with spread, machine info, model configs, jpeft train steps and XLA memory figures."""

from __future__ import annotations

import inspect
import math
import os
import platform
import re
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft import training

CPUS = os.cpu_count() or 1


def timed(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """Median / min / max seconds of `fn()` over `repeats` runs after `warmup` untimed ones (fn must block)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def on_gpu() -> bool:
    """Whether jax runs on a GPU; PyTorch's side then runs on it too, so both sides share one device."""
    return jax.default_backend() == "gpu"


def torch_device() -> str:
    """The device PyTorch's side of every comparison uses."""
    return "cuda" if on_gpu() else "cpu"


def torch_sync() -> None:
    """Wait for PyTorch's queued GPU work, so a timed call ends when its work does (nothing to wait for on CPU)."""
    if on_gpu():
        import torch

        torch.cuda.synchronize()


def machine() -> dict[str, Any]:
    """Where the numbers were taken: CPU count, load, devices, library versions, platform."""
    import torch
    import transformers
    import peft

    return {
        "machine_cpu_count": CPUS,
        "machine_load_1min": os.getloadavg()[0],
        "machine_platform": platform.platform(),
        "machine_processor": platform.processor() or platform.machine(),
        "machine_python": platform.python_version(),
        "machine_jax": jax.__version__,
        "machine_jax_backend": jax.default_backend(),
        "machine_jax_device": jax.devices()[0].device_kind,
        "machine_jax_matmul_precision": jax.config.jax_default_matmul_precision or "default",
        "machine_torch_device": torch.cuda.get_device_name() if on_gpu() else "cpu",
        "machine_torch": torch.__version__,
        "machine_torch_threads": torch.get_num_threads(),
        "machine_omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "machine_transformers": transformers.__version__,
        "machine_peft": peft.__version__,
    }


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares exponent k of y ~ x^k."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def t5_config(quick: bool = False, small: bool = False, **overrides):
    """FLAN-T5-small shape (8+8 layers, 6x64 heads, gated d_ff 1024); `small=True` is t5-small (6+6, 8x64, relu 2048)."""
    from transformers import T5Config

    if small:
        base = dict(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_layers=6, num_decoder_layers=6, feed_forward_proj="relu", tie_word_embeddings=True)
    else:
        base = dict(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    if quick:  # same family, shrunk so the CI smoke run stays short
        base.update(d_model=128, d_kv=32, num_heads=4, d_ff=256, num_layers=2, num_decoder_layers=2, vocab_size=2048)
    # No dropout on either side, so jpeft and PyTorch run the same computation (no RNG work in the step).
    base.update(dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base.update(overrides)
    return T5Config(**base)


def t5_batch(config, batch: int, src: int, tgt: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token batch with full attention masks (no padding, so every token is real work)."""
    rng = np.random.default_rng(seed)
    return {
        "input_ids": rng.integers(2, config.vocab_size, (batch, src), dtype=np.int32),
        "attention_mask": np.ones((batch, src), np.int32),
        "labels": rng.integers(2, config.vocab_size, (batch, tgt), dtype=np.int32),
    }


def supports_remat(loss_factory: Callable) -> bool:
    """Whether the lead's `remat=` option exists on this loss factory yet."""
    return "remat" in inspect.signature(loss_factory).parameters


def apply_method(params: dict, method: str, key: jax.Array, targets: tuple[str, ...] = ("q", "v"), ia3_targets=None) -> dict:
    """Inject one PEFT method: 'full', 'lora8', 'lora32' (any 'loraN'), 'prompt' or 'ia3'."""
    if method == "full":
        return params
    if method.startswith("lora"):
        r = int(method[4:])
        return jpeft.lora.inject(params, jpeft.LoraConfig(r=r, alpha=r, target_modules=list(targets)), key)
    if method == "prompt":
        return jpeft.prompt.inject(params, jpeft.PromptTuningConfig(num_virtual_tokens=20), key)
    if method == "ia3":
        cfg = jpeft.IA3Config() if ia3_targets is None else jpeft.IA3Config(*ia3_targets)
        return jpeft.ia3.inject(params, cfg)
    raise ValueError(f"unknown method {method!r}")


def split_params(params: dict, method: str) -> tuple[dict, dict]:
    """(trainable, frozen): everything trains for 'full', else the mask's PEFT leaves."""
    if method == "full":
        return jpeft.partition(params, jax.tree.map(lambda _: True, params))
    return jpeft.partition(params, jpeft.trainable_mask(params))


def tree_bytes(tree: Any) -> int:
    """Bytes of every array leaf (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class Step:
    """A jpeft train step compiled ahead of time, with its XLA memory and cost figures."""

    def __init__(self, loss_fn, trainable: dict, frozen: dict, batch: dict, lr: float = 1e-4):
        """Compiles from shapes; ShapeDtypeStruct leaves give a memory-only Step that is never called."""
        tx = optax.adamw(lr)
        self.trainable, self.frozen, self.batch = trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()}
        concrete = all(isinstance(x, jax.Array) for x in jax.tree.leaves(trainable))
        self.opt_state = tx.init(trainable) if concrete else jax.eval_shape(tx.init, trainable)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (trainable, self.opt_state, frozen, self.batch))
        self.compiled = training.compile_step(training.make_train_step(loss_fn, tx), *abstract, None)

    def __call__(self) -> float:
        """One step, blocking; the donated state is carried forward so repeats keep working."""
        self.trainable, self.opt_state, loss = self.compiled(self.trainable, self.opt_state, self.frozen, self.batch, None)
        return float(loss)

    def memory(self) -> dict[str, int]:
        """XLA's buffer figures for the compiled step; peak = temp + argument + output."""
        m = self.compiled.memory_analysis()
        return {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
                "alias": m.alias_size_in_bytes,
                "peak": m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes}

    def dot_flops(self) -> float:
        """Matmul FLOPs of one step as compiled: `hlo_dot_flops` of XLA's optimised program."""
        return hlo_dot_flops(self.compiled.as_text())


def hlo_dot_flops(hlo: str) -> float:
    """2 x output elements x contracted size, summed over every `dot` in an HLO module's text (fusion bodies included).

    XLA's `cost_analysis()` adds elementwise work to the products and reports no split, so the products
    are read from the program itself. Raises if it finds none: a changed HLO text format, not a zero.
    """
    shapes = {name: _dims(dims) for name, dims in re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo)}
    total = 0
    for out, lhs, attrs in re.findall(r"= \w+\[([\d,]*)\]\S* dot\((?:\S+ )?%([\w.\-]+), [^)]*\), (.*)", hlo):
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
        total += 2 * math.prod(_dims(out)) * math.prod(shapes[lhs][i] for i in _dims(contracting))
    if not total:
        raise ValueError("no dot instructions found in the HLO text; has its format changed?")
    return float(total)


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def matmul_peak_call(n: int = 2048, products: int = 4) -> tuple[Callable[[], None], float]:
    """A blocking call of `products` fp32 n x n x n matmuls under jax, and its FLOPs: the machine's peak.

    Timed beside the steps (`speed.timed_together`), so that peak and steps see the same load: the
    reference alone moved between 162 and 189 GFLOP/s within a minute on this shared machine.
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)

    def call() -> None:
        for _ in range(products):
            out = f(a, b)
        out.block_until_ready()

    return call, 2.0 * n**3 * products
