"""Train-step time on a FLAN-T5-small-shaped model: jpeft LoRA vs full fine-tuning vs HF PEFT LoRA, and MFU."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from benchmarks import common
from jpeft import training
from jpeft.models import t5


def shapes(quick: bool) -> tuple[int, int, int]:
    """(batch, source, target) tokens of the timed step."""
    return (8, 64, 16) if quick else (8, 256, 64)


def t5_matmul_flops(config, B: int, S: int, T: int, lora_r: int = 8, full: bool = False) -> float:
    """Analytic matmul FLOPs of one train step: LoRA (r on q, v), or full fine-tuning when `full`.

    Forward: every dense (LoRA's included), attention's score and value products, the LM head. Backward of
    full fine-tuning: both operands' gradients of every product, twice its forward. Backward of LoRA: a frozen
    dense needs only its input's gradient (once its forward); attention's and LoRA's products need both
    operands' (twice). The first encoder and decoder layers' q, k, v take the frozen embedding, so nothing
    there needs a gradient with respect to it or to their keys. Elementwise work is left out, as MFU
    conventionally does. `Step.dot_flops` counts the same products in XLA's compiled step.
    """
    D, inner, F, V = config.d_model, config.num_heads * config.d_kv, config.d_ff, config.vocab_size
    Le, Ld = config.num_layers, config.num_decoder_layers
    ff = (3 if config.is_gated_act else 2) * D * F
    # Multiply-accumulates of the forward pass, by kind. The decoder's cross-attention keys and values
    # are projected from the B * S source tokens.
    dense = B * S * Le * (4 * D * inner + ff) + B * T * Ld * (6 * D * inner + ff) + B * S * Ld * 2 * D * inner + B * T * D * V
    attention = B * S * Le * 2 * S * inner + B * T * Ld * 2 * (T + S) * inner
    if full:
        return 2 * 3 * (dense + attention)
    # LoRA's q and v, x A (D x r) then h B (r x inner): encoder q, v and cross-attention v on source tokens.
    lora = (B * S * (2 * Le + Ld) + 3 * B * T * Ld) * lora_r * (D + inner)
    first_qkv = 3 * D * inner * B * (S + T)  # input gradients the frozen embedding makes unnecessary
    first_keys = B * (S * S + T * T) * inner
    first_lora = 2 * lora_r * D * B * (S + T)
    return 2 * (2 * dense - first_qkv + 3 * attention - first_keys + 3 * lora - first_lora)


def llama_matmul_flops(config, B: int, L: int, T: int, lora_r: int) -> float:
    """Analytic matmul FLOPs of one LoRA step (r on all seven projections) of a Llama-family model, B rows of L
    tokens scoring the last T of each, as the GPU path computes it (whole L x L attention, LM head at targets only).

    Backward as in `t5_matmul_flops`: frozen products need their input's gradient, attention's and LoRA's both
    operands'; the first layer's q, k, v read the frozen embedding, so their inputs need no gradient."""
    D, F, V, N = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head = getattr(config, "head_dim", None) or D // config.num_attention_heads
    Hq, Hkv, n = config.num_attention_heads * head, config.num_key_value_heads * head, B * L
    dense = n * N * (2 * D * Hq + 2 * D * Hkv + 3 * D * F) + B * T * D * V
    attention = n * N * 2 * L * Hq
    lora = n * N * lora_r * (2 * (D + Hq) + 2 * (D + Hkv) + 3 * (D + F))
    first_qkv, first_lora = n * (D * Hq + 2 * D * Hkv), n * lora_r * D * 3
    return 2 * (2 * dense - first_qkv + 3 * attention + 3 * lora - first_lora)


def timed_together(calls: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, float]:
    """`common.timed` for several calls, interleaved round-robin, as flat `{name}_s`, `_s_min`, `_s_max` figures.

    The machine is shared: another job starting or stopping halves or doubles the CPU a call gets, so
    timing one side's repeats before the other's can compare different machines. Interleaved, every
    call's repeats see the same mix of loads.
    """
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, ts in times.items():
        out.update({f"{name}_s": statistics.median(ts), f"{name}_s_min": min(ts), f"{name}_s_max": max(ts)})
    return out


def jpeft_steps(config, batch: dict) -> dict[str, common.Step]:
    """LoRA (r=8 on q, v) and full fine-tuning steps on the same batch, compiled, keyed by figure name."""
    steps = {}
    for method in ("lora8", "full"):
        # Each step gets its own copy of the weights: full fine-tuning donates (deletes) the arrays it is passed.
        params = t5.init_params(config, jax.random.key(0))
        trainable, frozen = common.split_params(common.apply_method(params, method, jax.random.key(1)), method)
        steps[f"t5_{method}_step"] = common.Step(training.seq2seq_loss(config), trainable, frozen, batch)
    return steps


def peft_step(config, batch: dict) -> Callable[[], None]:
    """HF PEFT LoRA (r=8, alpha 8 on q, v) in PyTorch: same config and batch, AdamW, loss via labels=."""
    import peft
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(0)
    device = common.torch_device()
    model = peft.get_peft_model(T5ForConditionalGeneration(config), peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q", "v"], lora_dropout=0.0))
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tensors = {k: torch.from_numpy(np.asarray(v, np.int64)).to(device) for k, v in batch.items()}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**tensors).loss.backward()
        opt.step()
        common.torch_sync()

    return step


def run(quick: bool, warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """Step times (jpeft LoRA, jpeft full, PEFT LoRA) and an fp32 matmul peak, interleaved; their ratios and MFU."""
    config = common.t5_config(quick=quick)
    B, S, T = shapes(quick)
    batch = common.t5_batch(config, B, S, T)
    steps = jpeft_steps(config, batch)
    peak_call, peak_flops = common.matmul_peak_call(1024 if quick else 8192 if common.on_gpu() else 2048)
    out = timed_together({**steps, "t5_peft_lora8_step": peft_step(config, batch), "matmul_peak": peak_call}, warmup, repeats)
    peak = peak_flops / out["matmul_peak_s"]
    flops = t5_matmul_flops(config, B, S, T)
    full_flops = t5_matmul_flops(config, B, S, T, full=True)
    out.update({
        "lora_over_full_step_time": out["t5_lora8_step_s"] / out["t5_full_step_s"],
        "jpeft_over_peft_step_time": out["t5_lora8_step_s"] / out["t5_peft_lora8_step_s"],
        "matmul_peak_gflops": peak / 1e9,
        "t5_lora8_step_gflop_analytic": flops / 1e9,
        # Cross-check of the analytic count: the matmul FLOPs XLA's compiled step executes.
        "t5_lora8_step_gflop_xla_dots": steps["t5_lora8_step"].dot_flops() / 1e9,
        "mfu": flops / out["t5_lora8_step_s"] / peak,
        # The same count and peak for the other two steps, to put `mfu` beside them.
        "peft_mfu": flops / out["t5_peft_lora8_step_s"] / peak,
        "t5_full_step_gflop_analytic": full_flops / 1e9,
        "full_mfu": full_flops / out["t5_full_step_s"] / peak,
    })
    return out
