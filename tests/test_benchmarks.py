"""Smoke test of the benchmark suite: `--quick` runs end to end and writes finite figures (timings never asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from benchmarks.run import TARGETS

ROOT = Path(__file__).resolve().parents[1]
QUICK_SKIPS = {"jpeft_over_peft_smollm2_step_time", "jpeft_over_peft_smollm2_peak_memory"}


def test_quick_run_writes_finite_figures(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--json", str(out)], cwd=ROOT, check=True, timeout=900)
    figures = json.loads(out.read_text())
    headline = {name for name, _, _ in TARGETS} - QUICK_SKIPS
    assert headline <= figures.keys()
    for key in ("machine_cpu_count", "machine_jax", "machine_torch", "machine_platform", "total_s",
                "mem_t5_full_step_peak_bytes", "mem_t5_lora8_gradient_bytes", "scale_source_time_exponent", "devices_8_step_s",
                "generate_speedup_vs_transformers_bf16", "peft_mfu", "full_mfu"):
        assert key in figures, key
    numbers = {k: v for k, v in figures.items() if isinstance(v, (int, float))}
    assert all(math.isfinite(v) for v in numbers.values()), [k for k, v in numbers.items() if not math.isfinite(v)]
    assert figures["lora_opt_state_over_trainable_bytes"] == 2.0  # exact: AdamW keeps two moments per trainable leaf
    assert figures["mem_t5_lora8_trainable_bytes"] < figures["mem_t5_full_trainable_bytes"]


def test_sections_run_in_order_less_the_skipped(tmp_path):
    from benchmarks.run import SECTIONS, sections

    assert list(sections(False, tmp_path)) == list(SECTIONS)
    assert list(sections(True, tmp_path)) == ["memory", "speed", "inference", "scaling"]  # --quick has no SmolLM2
    assert list(sections(False, tmp_path, frozenset({"smollm2", "scaling"}))) == ["memory", "speed", "inference"]
