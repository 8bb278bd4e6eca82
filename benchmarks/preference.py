"""One DPO step with LoRA: jpeft (`training.preference_loss`, reference = the base with the adapter off, in the same
jitted step) vs TRL 1.16 DPOTrainer's loss (`_compute_loss`, reference = PEFT's adapter disabled) on the same model,
LoRA and batch.

Each side runs in its own subprocess (`python -m benchmarks.preference jpeft|trl OUT.json QUICK`) so its peak resident
memory (`VmHWM`) is its own. The model is SmolLM2-135M-shaped with random weights (8 of its 30 layers; `--quick`: a
2-layer toy), LoRA r=16, alpha 32 on all seven projections, 4 pairs of a 192-token prompt and 48/64-token completions,
fp32, no dropout, no gradient checkpointing on either side. TRL's side is DPOTrainer's own loss code on the PEFT model
(its fused LM head added as DPOTrainer adds it) with `loss.backward()` and torch AdamW: the trainer's per-step work
without its data loading or logging, which favours TRL a little. jpeft's is `make_train_step` with the same AdamW.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAIRS, PROMPT, CHOSEN, REJECTED = 4, 192, 64, 48


def config(quick: bool):
    """A SmolLM2-135M-shaped LlamaConfig (8 layers), or a 2-layer toy."""
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
                       num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0, pad_token_id=0, eos_token_id=1)


def pairs(quick: bool, vocab: int) -> tuple[list, list, list]:
    """Random token pairs (fixed seed), each completion ending in EOS (1)."""
    scale = 4 if quick else 1
    rng = np.random.default_rng(0)
    draw = lambda n: rng.integers(2, vocab, size=n).tolist()  # noqa: E731
    return ([draw(PROMPT // scale) for _ in range(PAIRS)], [draw(CHOSEN // scale - 1) + [1] for _ in range(PAIRS)],
            [draw(REJECTED // scale - 1) + [1] for _ in range(PAIRS)])


def jpeft_worker(quick: bool, warmup: int, repeats: int) -> dict:
    """jpeft's jitted DPO step (policy and adapter-off reference in one step), AdamW on the LoRA leaves."""
    import jax
    import optax

    import jpeft
    from benchmarks import common
    from jpeft import batches, training
    from jpeft.models import llama

    cfg = config(quick)
    params = jpeft.lora.inject(llama.init_params(cfg, jax.random.key(0)), jpeft.LoraConfig(r=16, alpha=32, target_modules=PROJ),
                               jax.random.key(1))
    mask = jpeft.trainable_mask(params)
    trainable, frozen = jpeft.partition(params, mask)
    tx = jpeft.optimizer(optax.adamw(1e-4), mask)
    state = {"t": trainable, "o": tx.init(trainable)}
    batch = batches.preference_batch(*pairs(quick, cfg.vocab_size), 0, 1, bucket=8)
    compiled = training.compile_step(training.make_train_step(training.preference_loss(cfg, "sigmoid"), tx), trainable, state["o"],
                                     frozen, batch, None)

    def step() -> None:
        state["t"], state["o"], loss = compiled(state["t"], state["o"], frozen, batch, None)
        loss.block_until_ready()

    memory = compiled.memory_analysis()
    return {**common.timed(step, warmup, repeats),
            "xla_peak_bytes": memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes}


def trl_worker(quick: bool, warmup: int, repeats: int) -> dict:
    """TRL DPOTrainer's `_compute_loss` on a PEFT LoRA model (reference: the adapter disabled), backward, torch AdamW."""
    import peft
    import torch
    from transformers import LlamaForCausalLM
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    from benchmarks import common

    torch.set_num_threads(common.CPUS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config(quick))
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ, lora_dropout=0.0, task_type="CAUSAL_LM"))
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    model.train()
    trainer = DPOTrainer.__new__(DPOTrainer)
    accelerator = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m, gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer.__dict__.update(
        model=model, ref_model=None, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=False,
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), f_divergence_type="reverse_kl", loss_types=["sigmoid"],
        loss_weights=[1.0], label_smoothing=0.0, beta=0.1, use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    prompts, chosen, rejected = pairs(quick, model.config.vocab_size)
    inputs = DataCollatorForPreference(pad_token_id=0)([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
                                                       for p, c, r in zip(prompts, chosen, rejected)])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        trainer._compute_loss(model, inputs, return_outputs=False).backward()
        opt.step()

    return common.timed(step, warmup, repeats)


def run_side(side: str, out: Path, quick: bool, warmup: int, repeats: int) -> dict:
    """Run one side in a fresh interpreter and return its figures, peak RSS included."""
    subprocess.run([sys.executable, "-m", "benchmarks.preference", side, str(out), str(int(quick)), str(warmup), str(repeats)], check=True,
                   cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return json.loads(out.read_text())


def run(workdir: Path, quick: bool = False, warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """Both sides, one after the other, and their ratios."""
    j = run_side("jpeft", workdir / "dpo_jpeft.json", quick, warmup, repeats)
    t = run_side("trl", workdir / "dpo_trl.json", quick, warmup, repeats)
    return {"dpo_jpeft_step_s": j["median"], "dpo_jpeft_step_s_min": j["min"], "dpo_jpeft_step_s_max": j["max"],
            "dpo_trl_step_s": t["median"], "dpo_trl_step_s_min": t["min"], "dpo_trl_step_s_max": t["max"],
            "dpo_jpeft_peak_rss_bytes": j["maxrss_bytes"], "dpo_trl_peak_rss_bytes": t["maxrss_bytes"],
            "dpo_jpeft_xla_peak_bytes": j["xla_peak_bytes"],
            "jpeft_over_trl_dpo_step_time": j["median"] / t["median"],
            "jpeft_over_trl_dpo_peak_memory": j["maxrss_bytes"] / t["maxrss_bytes"]}


if __name__ == "__main__":
    from benchmarks import smollm2, torchless

    side, path, quick, warm, reps = sys.argv[1], Path(sys.argv[2]), bool(int(sys.argv[3])), int(sys.argv[4]), int(sys.argv[5])
    if side == "jpeft":
        torchless.hide()  # jpeft's worker runs as jpeft installs: without torch
    figures = jpeft_worker(quick, warm, reps) if side == "jpeft" else trl_worker(quick, warm, reps)
    figures["maxrss_bytes"] = smollm2.peak_rss_bytes()
    path.write_text(json.dumps(figures))
