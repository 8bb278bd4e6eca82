"""Smoke test of the benchmark suite: `--quick` runs end to end and writes finite figures (timings never asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, speed
from benchmarks.run import TARGETS

ROOT = Path(__file__).resolve().parents[1]
QUICK_SKIPS = {"jpeft_over_peft_smollm2_step_time", "jpeft_over_peft_smollm2_peak_memory", "jpeft_over_peft_command_time",
               "smollm2_generate_speedup_vs_transformers", "smollm2_prefill_speedup_vs_transformers",
               "jpeft_over_trl_dpo_step_time", "jpeft_over_trl_dpo_peak_memory"}


def test_quick_run_writes_finite_figures(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out)], cwd=ROOT, check=True, timeout=900)
    figures = json.loads(out.read_text())
    headline = {name for name, _, _ in TARGETS} - QUICK_SKIPS
    assert headline <= figures.keys()
    for key in ("machine_cpu_count", "machine_jax", "machine_torch", "machine_platform", "total_s",
                "mem_t5_full_step_peak_bytes", "mem_t5_lora8_gradient_bytes", "scale_source_time_exponent", "devices_8_step_s",
                "generate_speedup_vs_transformers_bf16", "peft_mfu", "full_mfu", "matmul_peak_s", "t5_lora8_step_gflop_xla_dots",
                "flax_linen_qwix_step_s", "flax_nnx_jpeft_peak_bytes", "jpeft_over_qwix_nnx_step_time",
                "dora_over_lora_step_time", "peft_dora_over_lora_step_time", "smollm2_dora_over_lora_step_time",
                "smollm2_peft_dora_over_lora_step_time", "smollm2_jpeft_dora_step_s", "long_jpeft_128_xla_peak_bytes",
                "long_peft_128_peak_rss_bytes", "scale_long_jpeft_time_exponent", "scale_long_peft_time_exponent"):
        assert key in figures, key
    numbers = {k: v for k, v in figures.items() if isinstance(v, (int, float))}
    assert all(math.isfinite(v) for v in numbers.values()), [k for k, v in numbers.items() if not math.isfinite(v)]
    assert figures["lora_opt_state_over_trainable_bytes"] == 2.0  # exact: AdamW keeps two moments per trainable leaf
    assert figures["mem_t5_lora8_trainable_bytes"] < figures["mem_t5_full_trainable_bytes"]


def test_sections_run_in_order_less_the_skipped(tmp_path):
    from benchmarks.run import SECTIONS, sections

    assert list(sections(False, tmp_path)) == list(SECTIONS)
    assert list(sections(True, tmp_path)) == ["memory", "speed", "inference", "scaling", "flax", "methods"]  # --quick has no SmolLM2
    skipped = frozenset({"smollm2", "scaling", "flax", "methods", "generate_real", "preference", "command"})
    assert list(sections(False, tmp_path, skipped)) == ["memory", "speed", "inference"]


def test_analytic_flops_are_the_products_xla_compiles():
    # `mfu`'s numerator: every product the LoRA step needs and no other, so exactly what XLA keeps after
    # dropping the gradients nobody asked for (the first layers' q, k, v inputs, the frozen weights').
    config = common.t5_config(quick=True)
    B, S, T = speed.shapes(True)
    steps = speed.jpeft_steps(config, common.t5_batch(config, B, S, T))
    assert steps["t5_lora8_step"].dot_flops() == speed.t5_matmul_flops(config, B, S, T)
    assert steps["t5_full_step"].dot_flops() == speed.t5_matmul_flops(config, B, S, T, full=True)


def test_hlo_dot_flops_counts_batched_and_fused_products():
    a, b, w = jnp.ones((2, 3, 4, 5)), jnp.ones((2, 3, 5, 6)), jnp.ones((6, 7))
    hlo = jax.jit(lambda a, b, w: jnp.tanh(a @ b) @ w).lower(a, b, w).compile().as_text()
    assert common.hlo_dot_flops(hlo) == 2 * 2 * 3 * 4 * 6 * 5 + 2 * 2 * 3 * 4 * 7 * 6
    # Older XLA printed each operand's shape before its name.
    older = "%a = f32[2,3]{1,0} parameter(0)\n%d = f32[2,4]{1,0} dot(f32[2,3]{1,0} %a, f32[3,4]{1,0} %b), lhs_contracting_dims={1}"
    assert common.hlo_dot_flops(older) == 2 * 2 * 4 * 3
    with pytest.raises(ValueError, match="no dot"):
        common.hlo_dot_flops(jax.jit(jnp.tanh).lower(a).compile().as_text())


def test_the_command_benchmark_runs_the_readme_command_and_estimates_peft_from_ratios():
    from benchmarks import command

    readme = (ROOT / "README.md").read_text()
    block = readme.split("### Results: LoRA on SmolLM2-135M-Instruct, DialogSum")[1].split("```bash")[1].split("```")[0]
    words = block.replace("\\\n", " ").split()
    assert words[:3] == ["python", "-m", "train.summarize"] and words[3:words.index("--out")] == command.ARGS

    results = {"phase_seconds": {"load": 10.0, "base_eval": 60.0, "setup": 5.0, "train": 300.0, "save": 1.0, "tuned_eval": 64.0},
               "tuned": {"rouge1": 0.37}}
    assert "jpeft_over_peft_command_time" not in command.figures(results, {})  # no ratios measured: no estimate
    out = command.figures(results, {"smollm2_peft_step_s": 20.0, "smollm2_generate_speedup_vs_transformers": 2.0})
    assert out["command_total_s"] == 440.0 and math.isclose(sum(v for k, v in out.items() if k.endswith("_share")), 1.0)
    assert out["command_peft_train_s"] == 32 * 20.0 and out["command_peft_base_eval_s"] == 120.0 and out["command_peft_load_s"] == 10.0
    assert math.isclose(out["jpeft_over_peft_command_time"], 440.0 / (10 + 120 + 5 + 640 + 1 + 128))


def test_analytic_llama_flops_are_the_products_the_gpu_path_compiles(monkeypatch):
    # The GPU check's SmolLM2 MFU numerator (on the GPU, cuBLAS custom calls hide the products from `dot_flops`):
    # on the CPU the same GPU path compiles to plain dots, which must be exactly the analytic count.
    import transformers

    import jpeft
    from benchmarks import memory
    from jpeft import nn, training
    from jpeft.models import llama

    monkeypatch.setattr(nn, "KERNELS", "gpu")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, tie_word_embeddings=True)
    B, L, T, r = 2, 32, 8, 4
    params = jpeft.lora.inject(llama.init_params(config, jax.random.key(0)),
                               jpeft.LoraConfig(r=r, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
                               jax.random.key(1))
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    step = common.Step(training.causal_lm_loss(config), trainable, frozen, memory.smollm2_batch(config, B, L, T))
    assert step.dot_flops() == speed.llama_matmul_flops(config, B, L, T, lora_r=r)


def test_long_rows_pack_dialogsum_sized_sequences_each_scored_at_its_end():
    from benchmarks import scaling

    batch = scaling.long_batch(49152, 4096, quick=False)
    segments = batch["segment_ids"][0]
    assert batch["input_ids"].shape == (1, 4096) and segments.shape == (4096,) and segments[0] == 1
    lengths = np.bincount(segments)[1:]
    assert len(lengths) == len(batch["targets"]) and lengths[:-1].min() >= 150 and lengths.max() < 450 + 64
    ends = np.cumsum(lengths)
    np.testing.assert_array_equal(batch["target_index"] + scaling.LONG_TARGETS, ends)  # the last 64 tokens of each sequence
