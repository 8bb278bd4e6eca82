"""Memory: parameter, trainable, gradient and optimizer-state bytes, and XLA's peak for one compiled train step."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from jpeft import training
from jpeft.models import llama, registry, t5

METHODS = ("full", "lora8", "lora32", "prompt", "ia3")
LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA_IA3 = (("k_proj", "v_proj", "down_proj"), ("down_proj",))


def method_figures(prefix: str, init: Callable[[jax.Array], dict], method: str, loss_fn, batch: dict, **inject) -> dict[str, float]:
    """Bytes of one method, all from shapes (no weights are allocated): the step is compiled, never run."""
    params = jax.eval_shape(lambda k: common.apply_method(init(k), method, k, **inject), jax.random.key(0))
    trainable, frozen = common.split_params(params, method)
    step = common.Step(loss_fn, trainable, frozen, batch)
    # AdamW's moments; the int32 step counter (4 bytes) is left out so the ratio reads 2.0.
    moments = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(step.opt_state) if x.ndim > 0)
    mem = step.memory()
    key = f"{prefix}_{method}"
    return {
        f"{key}_param_bytes": common.tree_bytes(params),
        f"{key}_trainable_bytes": common.tree_bytes(trainable),
        f"{key}_gradient_bytes": common.tree_bytes(trainable),  # value_and_grad over `trainable` only
        f"{key}_opt_state_bytes": moments,
        f"{key}_step_temp_bytes": mem["temp"],
        f"{key}_step_peak_bytes": mem["peak"],
    }


def t5_memory(quick: bool) -> dict[str, float]:
    """t5-small shape, random weights; batch 8 of 256 source / 64 target tokens (quick: tiny model)."""
    config = common.t5_config(quick=quick, small=True)
    batch = common.t5_batch(config, 8, 64 if quick else 256, 16 if quick else 64)
    out: dict[str, float] = {}
    for method in METHODS:
        out.update(method_figures("mem_t5", lambda k: t5.init_params(config, k), method, training.seq2seq_loss(config), batch))
    return out


def smollm2_batch(config, batch: int, length: int, targets: int) -> dict[str, np.ndarray]:
    """Random prompt+target rows of `length` tokens whose last `targets` tokens are scored."""
    rng = np.random.default_rng(0)
    vocab = llama.arch(config).vocab_size
    return {
        "input_ids": rng.integers(2, vocab, (batch, length), dtype=np.int32),
        "attention_mask": np.ones((batch, length), np.int32),
        "target_index": np.arange(batch, dtype=np.int32) * length + length - targets,
        "targets": rng.integers(2, vocab, (batch, targets), dtype=np.int32),
    }


def llama_loss(config) -> Any:
    """The causal-LM loss, with layer rematerialisation when the library offers it."""
    kwargs = {"remat": True} if common.supports_remat(training.causal_lm_loss) else {}
    return training.causal_lm_loss(config, **kwargs)


def smollm2_memory() -> dict[str, float]:
    """SmolLM2-135M shapes, batch 8 x 448 tokens (384 prompt + 64 target); LoRA on all seven projections."""
    config = llama.load_config(registry.resolve("smollm2-135m-instruct"))
    batch = smollm2_batch(config, 8, 448, 64)
    loss_fn = llama_loss(config)
    out: dict[str, float] = {}
    for method in METHODS:
        out.update(method_figures("mem_smollm2", lambda k: llama.init_params(config, k), method, loss_fn, batch,
                                  targets=LLAMA_PROJ, ia3_targets=LLAMA_IA3))
    return out


def run(quick: bool) -> dict[str, float]:
    """All memory figures plus the optimizer-state ratio the issue asks for."""
    out = t5_memory(quick)
    if not quick:
        out.update(smollm2_memory())
    out["lora_opt_state_over_trainable_bytes"] = out["mem_t5_lora8_opt_state_bytes"] / out["mem_t5_lora8_trainable_bytes"]
    return out
