"""LoRA on a mixture of experts' routed experts: jpeft's grouped-matmul step against HF PEFT's `target_parameters` step,
and against jpeft's own dense formulation that runs every token through every expert.

The shape is Qwen3-MoE's scaled to this machine (`SHAPE`: 8 experts, top-2, 4 layers of width 512, random weights), a
batch of 4 x 256 tokens whose last 64 are scored; LoRA r=16, alpha 32 on q, k, v, o and on the routed experts
(`target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`), AdamW, no router aux loss (transformers'
default), no remat. Each of jpeft and PEFT runs in its own subprocess (`python -m benchmarks.moe --worker jpeft|peft OUT.json`) so
that its peak resident memory (`VmHWM`) is its own, jpeft's without torch (`benchmarks.torchless`).
The grouped-over-dense ratio is timed in one process, the two jpeft steps interleaved (`speed.timed_together`).

Figures: `moe_{jpeft,peft}_step_s` (+ `_min`, `_max`), `moe_{jpeft,peft}_peak_rss_bytes`, `moe_jpeft_xla_peak_bytes`,
`jpeft_over_peft_moe_step_time`, `jpeft_over_peft_moe_peak_memory`; `moe_{grouped,dense}_experts_step_s`, their XLA
peaks, and `ragged_over_dense_experts_step_time` (grouped over dense). `--quick`: 2 layers of width 128, batch 2 x 64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks.run sets it, for `python -m benchmarks.moe` (see README)

SHAPE = dict(hidden_size=512, moe_intermediate_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, vocab_size=8192,
             rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
QUICK = dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, head_dim=32,
             vocab_size=1024)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
RANK = 16


def config(quick: bool):
    import transformers

    return transformers.Qwen3MoeConfig(**{**SHAPE, **(QUICK if quick else {})})


def batch(cfg, quick: bool) -> dict[str, np.ndarray]:
    """Rows of random tokens whose last `targets` tokens are scored."""
    rows, length, targets = (2, 64, 16) if quick else (4, 256, 64)
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(2, cfg.vocab_size, (rows, length), dtype=np.int32),
            "attention_mask": np.ones((rows, length), np.int32),
            "target_index": np.arange(rows, dtype=np.int32) * length + length - targets,
            "targets": rng.integers(2, cfg.vocab_size, (rows, targets), dtype=np.int32)}


def jpeft_step(quick: bool, dense: bool = False):
    """jpeft's compiled AdamW step; with `dense`, every token runs through every expert (`dense_experts`)."""
    import jax

    import jpeft
    from benchmarks import common
    from jpeft.models import moe

    cfg = config(quick)
    params = moe.init_params(cfg, jax.random.key(0))
    params = jpeft.lora.inject(params, jpeft.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=TARGET_MODULES, target_parameters=EXPERTS),
                               jax.random.key(1))
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    grouped = moe._experts
    moe._experts = dense_experts if dense else grouped  # read when the step is traced, inside Step
    try:
        return common.Step(jpeft.training.causal_lm_loss(cfg), trainable, frozen, batch(cfg, quick))
    finally:
        moe._experts = grouped


def dense_experts(p, h, a, ctx, routing):
    """jpeft's sparse MLP as a dense product: every token through every expert (LoRA included), the outputs weighted by
    the router's top-k weights (zero for the experts a token did not choose). The same numbers, X / K times the work."""
    import jax.numpy as jnp

    from jpeft.models import moe, ops

    B, T, D = h.shape
    x = h.reshape(B * T, D).astype(ctx.dtype)
    weights, experts, routing = moe._route(p["gate"], x, a, ctx, routing)
    gates = jnp.zeros((B * T, a.num_experts), ctx.dtype).at[jnp.arange(B * T)[:, None], experts].set(weights)  # (N, X)

    def every_expert(q, x, spec):  # spec: x's (N, in) or (X, N, in) against W (X, in, out)
        y = jnp.einsum(f"{spec},xio->xno", x, q["kernel"].astype(ctx.dtype))
        low = jnp.einsum("xnr,xro->xno", jnp.einsum(f"{spec},xir->xnr", x, q["lora_a"].astype(ctx.dtype)), q["lora_b"].astype(ctx.dtype))
        return y + low * q["lora_scale"].astype(ctx.dtype)

    gate, up = jnp.split(every_expert(p["experts"]["gate_up_proj"], x, "ni"), 2, axis=-1)  # (X, N, F) each
    out = every_expert(p["experts"]["down_proj"], ops.activation(a.act)(gate) * up, "xni")  # (X, N, D)
    return jnp.einsum("xnd,nx->nd", out, gates).reshape(B, T, D), routing


def jpeft_worker(quick: bool, warmup: int, repeats: int) -> dict:
    from benchmarks import common

    step = jpeft_step(quick)
    return {**common.timed(step, warmup, repeats), "xla_peak_bytes": step.memory()["peak"]}


def peft_worker(quick: bool, warmup: int, repeats: int) -> dict:
    """HF PEFT's LoRA with target_parameters on the same config and batch, through transformers' labels= loss."""
    import peft
    import torch
    import transformers

    from benchmarks import common

    torch.set_num_threads(common.CPUS)
    torch.manual_seed(0)
    cfg = config(quick)
    b = batch(cfg, quick)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGET_MODULES, target_parameters=EXPERTS,
                                                       lora_dropout=0.0, task_type="CAUSAL_LM")).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    labels = np.full(b["input_ids"].shape, -100, np.int64)
    labels[:, -b["targets"].shape[1]:] = b["targets"]
    inputs = {"input_ids": torch.from_numpy(b["input_ids"].astype(np.int64)), "attention_mask": torch.from_numpy(b["attention_mask"].astype(np.int64)),
              "labels": torch.from_numpy(labels)}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()

    return common.timed(step, warmup, repeats)


def run_side(side: str, out: Path, quick: bool, warmup: int, repeats: int) -> dict:
    """One side in a fresh interpreter; its figures, peak RSS included."""
    subprocess.run([sys.executable, "-m", "benchmarks.moe", "--worker", side, str(out), "--warmup", str(warmup), "--repeats", str(repeats)]
                   + (["--quick"] if quick else []),
                   check=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return json.loads(out.read_text())


def run(quick: bool, workdir: Path, warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """Both sides in subprocesses, then the grouped and dense jpeft steps interleaved here."""
    from benchmarks import speed

    j = run_side("jpeft", workdir / "moe_jpeft.json", quick, warmup, repeats)
    p = run_side("peft", workdir / "moe_peft.json", quick, warmup, repeats)
    out = {f"moe_{side}_{k}": v for side, fig in (("jpeft", j), ("peft", p))
           for k, v in {"step_s": fig["median"], "step_s_min": fig["min"], "step_s_max": fig["max"], "peak_rss_bytes": fig["maxrss_bytes"]}.items()}
    out.update(moe_jpeft_xla_peak_bytes=j["xla_peak_bytes"], jpeft_over_peft_moe_step_time=j["median"] / p["median"],
               jpeft_over_peft_moe_peak_memory=j["maxrss_bytes"] / p["maxrss_bytes"])
    steps = {"moe_grouped_experts_step": jpeft_step(quick), "moe_dense_experts_step": jpeft_step(quick, dense=True)}
    out.update(speed.timed_together(steps, warmup, repeats))
    out.update({f"{name}_xla_peak_bytes": step.memory()["peak"] for name, step in steps.items()})
    out["ragged_over_dense_experts_step_time"] = out["moe_grouped_experts_step_s"] / out["moe_dense_experts_step_s"]
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("SIDE", "OUT"), help="(internal) run one side (jpeft or peft), write its figures to OUT")
    args = parser.parse_args()
    if args.worker is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(run(args.quick, Path(tmp), args.warmup, args.repeats), indent=1, sort_keys=True))
    else:
        from benchmarks import smollm2, torchless

        side, out = args.worker
        if side == "jpeft":
            torchless.hide()
        figures = (jpeft_worker if side == "jpeft" else peft_worker)(args.quick, args.warmup, args.repeats)
        figures["maxrss_bytes"] = smollm2.peak_rss_bytes()
        Path(out).write_text(json.dumps(figures))
