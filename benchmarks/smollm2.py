"""The real model: one LoRA train step on SmolLM2-135M-Instruct over DialogSum, jpeft vs HF PEFT, and QLoRA.

Each side runs in its own subprocess (`python -m benchmarks.smollm2 jpeft|peft|nf4|gguf OUT.json`) so its
peak resident memory (`peak_rss_bytes`) is its own; the parent reads the JSON each one writes. `nf4` and
`gguf` are jpeft's step on a base kept quantized (NF4 made by `jpeft.quant`, or the file's own Q4_1 blocks).
jpeft's workers run without torch, as jpeft installs (`benchmarks.torchless`); `jpeft+torch` is the same
step where torch is importable, as in an environment that also holds PyTorch.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks import torchless

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "train.jsonl"
MODEL = "smollm2-135m-instruct"
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, MAX_SOURCE, MAX_TARGET = 8, 384, 64


def dialogsum_batch(pack: bool = False, quantize: str | None = None):
    """(task, params, batch) for the first BATCH DialogSum training dialogues, formatted (and packed) as train.tasks does."""
    import jax.numpy as jnp

    import jpeft
    from train import data, tasks

    task, params = tasks.load_task(MODEL, None, jnp.float32, quantized=quantize == "gguf")
    if quantize == "nf4":
        params = jpeft.quant.quantize(params, "nf4")
    with open(DATA) as f:
        examples = data.normalize([json.loads(next(f)) for _ in range(BATCH)], str(DATA))
    rows = tasks.encode(task, examples, MAX_SOURCE, MAX_TARGET)
    return task, params, tasks.train_batch(task, rows, MAX_TARGET, pack=pack)


def real_tokens(batch: dict) -> int:
    """Prompt + target tokens that are not padding."""
    from train import tasks

    return tasks.token_count(batch)


def jpeft_worker(warmup: int, repeats: int, quantize: str | None = None) -> dict:
    """jpeft LoRA (r=16, alpha 32, all seven projections) step: summary-only loss, remat when available."""
    import jax

    import jpeft
    from benchmarks import common, memory

    task, params, batch = dialogsum_batch(pack=True, quantize=quantize)
    params = jpeft.lora.inject(params, jpeft.LoraConfig(r=16, alpha=32, target_modules=PROJ), jax.random.key(0))
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    step = common.Step(memory.llama_loss(task.config), trainable, frozen, batch)
    t = common.timed(step, warmup, repeats)
    return {**t, "tokens": real_tokens(batch), "shape": list(batch["input_ids"].shape), "remat": common.supports_remat(jpeft.training.causal_lm_loss),
            "xla_peak_bytes": step.memory()["peak"]}


def peft_worker(warmup: int, repeats: int) -> dict:
    """HF PEFT LoRA with the same config through transformers' standard labels= loss (full-sequence logits)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks import common
    from jpeft.models import registry

    torch.set_num_threads(common.CPUS)
    _, _, batch = dialogsum_batch()
    path = Path(registry.resolve(MODEL))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ, lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    labels = np.full(batch["input_ids"].shape, -100, np.int64)
    L = labels.shape[1]
    for i, index in enumerate(batch["target_index"]):
        n, start = int((batch["targets"][i] != -100).sum()), int(index) - i * L
        labels[i, start:start + n] = batch["targets"][i, :n]
    inputs = {"input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)),
              "attention_mask": torch.from_numpy(batch["attention_mask"].astype(np.int64)), "labels": torch.from_numpy(labels)}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()

    return {**common.timed(step, warmup, repeats), "tokens": real_tokens(batch), "shape": list(batch["input_ids"].shape)}


def peak_rss_bytes() -> int:
    """This process's peak resident memory since its exec.

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries that high-water mark over `exec`, so a worker
    started from a big parent (the full benchmark run) reported the parent's peak instead of its own.
    `VmHWM` belongs to the address space the exec created.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: ru_maxrss is the best there is


def run_side(side: str, out: Path, warmup: int, repeats: int) -> dict:
    """Run one side in a fresh interpreter and return its figures, peak RSS included."""
    subprocess.run([sys.executable, "-m", "benchmarks.smollm2", side, str(out), str(warmup), str(repeats)], check=True,
                   cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return json.loads(out.read_text())


def run(workdir: Path, warmup: int = 1, repeats: int = 2) -> dict[str, float]:
    """Every side, one after the other, and their ratios."""
    j = run_side("jpeft", workdir / "smollm2_jpeft.json", warmup, repeats)
    with_torch = run_side("jpeft+torch", workdir / "smollm2_jpeft_torch.json", warmup, repeats)
    p = run_side("peft", workdir / "smollm2_peft.json", warmup, repeats)
    quantized = {side: run_side(side, workdir / f"smollm2_{side}.json", warmup, repeats) for side in ("nf4", "gguf")}
    qlora = {}
    for side, q in quantized.items():
        qlora.update({f"smollm2_{side}_step_s": q["median"], f"smollm2_{side}_peak_rss_bytes": q["maxrss_bytes"],
                      f"smollm2_{side}_xla_peak_bytes": q["xla_peak_bytes"],
                      f"qlora_{side}_over_lora_step_time": q["median"] / j["median"],
                      f"qlora_{side}_over_lora_peak_memory": q["maxrss_bytes"] / j["maxrss_bytes"]})
    return {**qlora,
        "smollm2_tokens": j["tokens"], "smollm2_batch_len": j["shape"][1], "smollm2_remat": float(j["remat"]),
        "smollm2_jpeft_step_s": j["median"], "smollm2_jpeft_step_s_min": j["min"], "smollm2_jpeft_step_s_max": j["max"],
        "smollm2_peft_step_s": p["median"], "smollm2_peft_step_s_min": p["min"], "smollm2_peft_step_s_max": p["max"],
        "smollm2_jpeft_peak_rss_bytes": j["maxrss_bytes"], "smollm2_peft_peak_rss_bytes": p["maxrss_bytes"],
        "smollm2_jpeft_torch_importable_peak_rss_bytes": with_torch["maxrss_bytes"],
        "smollm2_jpeft_xla_peak_bytes": j["xla_peak_bytes"],
        "jpeft_over_peft_smollm2_step_time": j["median"] / p["median"],
        "jpeft_over_peft_smollm2_peak_memory": j["maxrss_bytes"] / p["maxrss_bytes"],
        "jpeft_over_peft_smollm2_peak_memory_torch_importable": with_torch["maxrss_bytes"] / p["maxrss_bytes"],
    }


if __name__ == "__main__":
    side, path, warm, reps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    if side != "peft" and not side.endswith("+torch"):
        torchless.hide()
    quantize = side.removesuffix("+torch")
    figures = peft_worker(warm, reps) if side == "peft" else jpeft_worker(warm, reps, None if quantize == "jpeft" else quantize)
    figures["maxrss_bytes"] = peak_rss_bytes()
    path.write_text(json.dumps(figures))
