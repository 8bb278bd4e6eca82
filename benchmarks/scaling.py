"""Scaling of the jpeft LoRA train step: time and XLA peak memory against sequence length, batch, rank and width,
with fitted log-log exponents, and the step on 1, 2, 4, 8 fake CPU devices (a subprocess with XLA_FLAGS).

The `long` sweep: LoRA on a SmolLM2-135M-shaped Llama at packed rows of 1024-8192 tokens, jpeft (blockwise attention,
remat) against HF PEFT (transformers' sdpa attention under a 4D block-diagonal mask of the same packing), each side in
its own subprocess (`python -m benchmarks.scaling long jpeft|peft QUICK OUT`) so its peak RSS is its own.
`python -m benchmarks.scaling long` runs that sweep alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax

from benchmarks import common
from jpeft import training
from jpeft.models import t5

# A mid-size T5 (4+4 layers) so every point of every sweep compiles and runs in seconds.
BASE = {"batch": 8, "source": 128, "rank": 8, "width": 256}
SWEEPS = {"source": [64, 128, 256, 512], "batch": [2, 4, 8, 16], "rank": [4, 16, 64, 256], "width": [128, 256, 512, 1024]}
QUICK_BASE = {"batch": 4, "source": 32, "rank": 4, "width": 64}
QUICK_SWEEPS = {"source": [16, 32], "batch": [2, 4], "rank": [2, 4], "width": [32, 64]}  # two points fit an exponent
DEVICES, QUICK_DEVICES = (1, 2, 4, 8), (1, 8)
LONG_LENGTHS, QUICK_LONG_LENGTHS = (1024, 2048, 4096, 8192), (64, 128)
LONG_LAYERS = 30  # SmolLM2-135M's full depth
LONG_TARGETS = 64  # scored tokens per packed sequence, as the DialogSum summaries
PEFT_MEMORY_LIMIT = 20 * 2**30  # a length whose predicted PEFT peak passes this is skipped (the machine has 24 GB)


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
    for n in QUICK_DEVICES if quick else DEVICES:
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
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()  # keeps the caller's flags
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-m", "benchmarks.scaling", str(int(quick)), str(out), str(warmup), str(repeats)],
                   check=True, env=env, cwd=Path(__file__).resolve().parents[1])
    figures = json.loads(out.read_text())
    figures["devices_8_over_1_step_time"] = figures["devices_8_step_s"] / figures["devices_1_step_s"]
    return figures


def long_config(quick: bool, layers: int = LONG_LAYERS):
    """SmolLM2-135M's shape with random weights and `layers` layers (quick: a 2-layer toy)."""
    import transformers

    from benchmarks import methods

    if quick:
        return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=2)
    return transformers.LlamaConfig(**{**methods.SMOLLM2_SHAPE, "max_position_embeddings": 8192}, num_hidden_layers=layers)


def long_batch(vocab: int, length: int, quick: bool) -> dict[str, np.ndarray]:
    """One packed row of `length` tokens: sequences of DialogSum's size (150-450 tokens; quick: 24-48) back to back,
    the last cut to fit, each scored on its last LONG_TARGETS tokens (quick: 8)."""
    rng = np.random.default_rng(0)
    lo, hi, n_targets = (24, 48, 8) if quick else (150, 450, LONG_TARGETS)
    lengths: list[int] = []
    while sum(lengths) < length:
        lengths.append(min(int(rng.integers(lo, hi)), length - sum(lengths)))
    if lengths[-1] <= n_targets:  # too short to score: folded into the one before
        last = lengths.pop()
        lengths[-1] += last
    ends = np.cumsum(lengths)
    return {"input_ids": rng.integers(3, vocab, (1, length), dtype=np.int32),
            "segment_ids": np.repeat(np.arange(1, len(lengths) + 1, dtype=np.int32), lengths)[None],
            "targets": rng.integers(3, vocab, (len(lengths), n_targets), dtype=np.int32),
            "target_index": (ends - n_targets).astype(np.int32)}


def long_worker(side: str, quick: bool, out: Path, warmup: int, repeats: int) -> None:
    """One side's LoRA step (r=16, alpha 32, all seven projections) at each length in turn, longest last, writing its
    figures after each: step time, the peak RSS so far (the peak at that length, as memory grows with it) and, for
    jpeft, XLA's peak. PEFT stops before a length whose peak, extrapolated from the last two, would pass the limit."""
    from benchmarks import smollm2

    from jpeft.models import attention

    if quick:  # the smoke run's toy rows take the blockwise attention too
        attention.FLASH_MIN_LEN, attention.FLASH_BLOCK = 0, 32
    config = long_config(quick)
    figures: dict[str, float] = {}
    step_at = _jpeft_long_step if side == "jpeft" else _peft_long_step
    lengths = QUICK_LONG_LENGTHS if quick else LONG_LENGTHS
    for i, length in enumerate(lengths):
        if side == "peft" and i >= 2:
            rss = [figures[f"long_peft_{n}_peak_rss_bytes"] for n in lengths[i - 2:i]]
            if rss[1] * (rss[1] / rss[0]) ** np.log2(length / lengths[i - 1]) > PEFT_MEMORY_LIMIT:
                break
        step, extra = step_at(config, long_batch(config.vocab_size, length, quick))
        figures[f"long_{side}_{length}_step_s"] = common.timed(step, warmup, repeats)["median"]
        figures[f"long_{side}_{length}_peak_rss_bytes"] = smollm2.peak_rss_bytes()
        figures.update({f"long_{side}_{length}_{k}": v for k, v in extra.items()})
        out.write_text(json.dumps(figures))


def _jpeft_long_step(config, batch: dict[str, np.ndarray]):
    import jpeft
    from benchmarks import memory

    params = jpeft.lora.inject(jpeft.models.llama.init_params(config, jax.random.key(0)),
                               jpeft.LoraConfig(r=16, alpha=32, target_modules=list(memory.LLAMA_PROJ)), jax.random.key(1))
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    step = common.Step(jpeft.training.causal_lm_loss(config, remat=True), trainable, frozen, batch)
    return step, {"xla_peak_bytes": step.memory()["peak"]}


def _peft_long_step(config, batch: dict[str, np.ndarray]):
    import peft
    import torch
    import transformers

    from benchmarks import memory

    torch.set_num_threads(common.CPUS)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(memory.LLAMA_PROJ), lora_dropout=0.0,
                                                       task_type="CAUSAL_LM")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    segments = torch.from_numpy(batch["segment_ids"].astype(np.int64))
    L = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    mask = (same & torch.ones(L, L, dtype=torch.bool).tril())[:, None]  # (1, 1, L, L): causal within each sequence
    starts = np.concatenate([[0], np.flatnonzero(np.diff(batch["segment_ids"][0])) + 1])
    positions = np.arange(L) - np.repeat(starts, np.diff(np.append(starts, L)))
    labels = np.full((1, L), -100, np.int64)
    for index, targets in zip(batch["target_index"], batch["targets"]):
        labels[0, index:index + len(targets)] = targets
    inputs = {"input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)), "attention_mask": mask,
              "position_ids": torch.from_numpy(positions[None]), "labels": torch.from_numpy(labels)}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()

    return step, {}


def long_sweep(quick: bool, workdir: Path, warmup: int = 1, repeats: int = 2) -> dict[str, float]:
    """Both sides of the long-row sweep, with least-squares log-log exponents over the lengths each side ran."""
    out: dict[str, float] = {}
    for side in ("jpeft", "peft"):
        path = workdir / f"long_{side}.json"
        subprocess.run([sys.executable, "-m", "benchmarks.scaling", "long", side, str(int(quick)), str(path), str(warmup), str(repeats)],
                       check=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        out.update(json.loads(path.read_text()))
    for side, memory in (("jpeft", "xla_peak_bytes"), ("peft", "peak_rss_bytes")):
        lengths = [n for n in (QUICK_LONG_LENGTHS if quick else LONG_LENGTHS) if f"long_{side}_{n}_step_s" in out]
        if len(lengths) >= 2:
            out[f"scale_long_{side}_time_exponent"] = common.loglog_slope(lengths, [out[f"long_{side}_{n}_step_s"] for n in lengths])
            out[f"scale_long_{side}_memory_exponent"] = common.loglog_slope(lengths, [out[f"long_{side}_{n}_{memory}"] for n in lengths])
    return out


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
    """Sweeps, the device-count step, the long-row sweep, and the plot (written only when `png` is given)."""
    out, curves = sweeps(quick, warmup, repeats)
    dev = devices(quick, workdir, warmup, repeats)
    out.update(dev)
    out.update(long_sweep(quick, workdir, warmup, repeats))
    if png is not None:
        plot(curves, dev, png)
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["long"] and len(sys.argv) == 7:  # a worker: long SIDE QUICK OUT WARMUP REPEATS
        long_worker(sys.argv[2], bool(int(sys.argv[3])), Path(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif sys.argv[1:2] == ["long"]:  # the long sweep alone: long [--quick]
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(long_sweep("--quick" in sys.argv, Path(tmp)), indent=1, sort_keys=True))
    else:
        quick_flag, path, warm, reps = bool(int(sys.argv[1])), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        path.write_text(json.dumps(devices_worker(quick_flag, warm, reps)))
