"""Scaling of the jpeft LoRA train step: time and XLA peak memory against sequence length, batch, rank and width,
with fitted log-log exponents, and the step on 1, 2, 4, 8 fake CPU devices (a subprocess with XLA_FLAGS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import optax

from benchmarks import common
from jpeft import training
from jpeft.models import t5

# A mid-size T5 (4+4 layers) so every point of every sweep compiles and runs in seconds.
BASE = {"batch": 8, "source": 128, "rank": 8, "width": 256}
SWEEPS = {"source": [64, 128, 256, 512], "batch": [2, 4, 8, 16], "rank": [4, 16, 64, 256], "width": [128, 256, 512, 1024]}
QUICK_BASE = {"batch": 4, "source": 32, "rank": 4, "width": 64}
QUICK_SWEEPS = {"source": [16, 32, 64], "batch": [2, 4, 8], "rank": [2, 4, 8], "width": [32, 64, 128]}
DEVICES = (1, 2, 4, 8)


def point_config(width: int, quick: bool):
    """Heads of 64 (quick: 16) and a gated d_ff of 2 x width: width scales the whole model."""
    k = 16 if quick else 64
    return common.t5_config(quick=quick, d_model=width, d_kv=k, num_heads=max(1, width // k), d_ff=2 * width,
                            num_layers=2 if quick else 4, num_decoder_layers=2 if quick else 4)


def lora_step(point: dict[str, int], quick: bool) -> common.Step:
    """A compiled LoRA (q, v) step at one point of a sweep, 16 target tokens (quick: 8)."""
    config = point_config(point["width"], quick)
    params = common.apply_method(t5.init_params(config, jax.random.key(0)), f"lora{point['rank']}", jax.random.key(1))
    trainable, frozen = common.split_params(params, "lora")
    batch = common.t5_batch(config, point["batch"], point["source"], 8 if quick else 16)
    return common.Step(training.seq2seq_loss(config), trainable, frozen, batch)


def sweeps(quick: bool, warmup: int, repeats: int) -> tuple[dict[str, float], dict[str, list]]:
    """Every sweep point (shared points measured once); figures and the curves for the plot."""
    base, grid = (QUICK_BASE, QUICK_SWEEPS) if quick else (BASE, SWEEPS)
    cache: dict[tuple, tuple[float, float]] = {}
    out, curves = {}, {}
    for axis, values in grid.items():
        times, peaks = [], []
        for v in values:
            point = {**base, axis: v}
            key = tuple(sorted(point.items()))
            if key not in cache:
                step = lora_step(point, quick)
                cache[key] = (common.timed(step, warmup, repeats)["median"], step.memory()["peak"])
            t, peak = cache[key]
            times.append(t)
            peaks.append(peak)
            out[f"scale_{axis}_{v}_step_s"], out[f"scale_{axis}_{v}_peak_bytes"] = t, peak
        out[f"scale_{axis}_time_exponent"] = common.loglog_slope(values, times)
        out[f"scale_{axis}_memory_exponent"] = common.loglog_slope(values, peaks)
        curves[axis] = [values, times, peaks]
    return out, curves


def devices_worker(quick: bool, warmup: int, repeats: int) -> dict[str, float]:
    """In a process with 8 fake CPU devices: the same step data-parallel on the first 1, 2, 4 and 8."""
    from jpeft import sharding

    point = QUICK_BASE if quick else BASE
    config = point_config(point["width"], quick)
    params = common.apply_method(t5.init_params(config, jax.random.key(0)), f"lora{point['rank']}", jax.random.key(1))
    trainable, frozen = common.split_params(params, "lora")
    batch = common.t5_batch(config, 8, point["source"], 8 if quick else 16)  # 8 rows split evenly on every mesh
    out = {}
    for n in DEVICES:
        tx = optax.adamw(1e-4)
        mesh = sharding.make_mesh(data=n, devices=jax.devices()[:n])
        run = sharding.setup(mesh, training.seq2seq_loss(config), tx, trainable, frozen, tx.init(trainable), batch)
        state = {"t": run.trainable, "o": run.opt_state}

        def step():
            state["t"], state["o"], loss = run.step(state["t"], state["o"], run.frozen, run.batch, None)
            loss.block_until_ready()

        out[f"devices_{n}_step_s"] = common.timed(step, warmup, repeats)["median"]
    return out


def devices(quick: bool, workdir: Path, warmup: int, repeats: int) -> dict[str, float]:
    """Run `devices_worker` in a subprocess, since the fake device count is fixed when jax starts."""
    out = workdir / "devices.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "benchmarks.scaling", str(int(quick)), str(out), str(warmup), str(repeats)],
                   check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    figures = json.loads(out.read_text())
    figures["devices_8_over_1_step_time"] = figures["devices_8_step_s"] / figures["devices_1_step_s"]
    return figures


def plot(curves: dict[str, list], device_figures: dict[str, float], path: Path) -> None:
    """Log-log step time and peak memory per sweep, plus step time per device count, in one small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=80)
    for axis, (xs, times, peaks) in curves.items():
        rel = [x / xs[0] for x in xs]
        axes[0].loglog(rel, [t / times[0] for t in times], "o-", label=axis)
        axes[1].loglog(rel, [p / peaks[0] for p in peaks], "o-", label=axis)
    for ax, title in zip(axes[:2], ("step time (relative)", "XLA peak memory (relative)")):
        ax.set(title=title, xlabel="size / smallest size")
        ax.legend(fontsize=8)
    n = [d for d in DEVICES if f"devices_{d}_step_s" in device_figures]
    axes[2].plot(n, [device_figures[f"devices_{d}_step_s"] for d in n], "o-")
    axes[2].set(title="step time vs fake CPU devices", xlabel="devices (data parallel)", ylabel="s", xticks=n)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(quick: bool, workdir: Path, png: Path | None, warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """Sweeps, the device-count step, and the plot (written only when `png` is given)."""
    out, curves = sweeps(quick, warmup, repeats)
    dev = devices(quick, workdir, warmup, repeats)
    out.update(dev)
    if png is not None:
        plot(curves, dev, png)
    return out


if __name__ == "__main__":
    quick_flag, path, warm, reps = bool(int(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    path.write_text(json.dumps(devices_worker(quick_flag, warm, reps)))
