"""A tiny LoRA training run that checkpoints every step and resumes from its newest checkpoint.

Used by tests/training/test_checkpoint.py as a subprocess, which kills it with SIGKILL part-way and restarts it:
    python tests/training/resume_script.py BASE_DIR CKPT_DIR OUT.npz STEPS SLEEP_SECONDS
Prints "resumed <step>" when it picks up a checkpoint, "step <n>" after each step, and writes the final
trainable parameters to OUT.npz. Data order depends only on the data position, so a resumed run sees
the same batches as an uninterrupted one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jpeft  # noqa: E402
from jpeft import checkpoint, lora, training, tree  # noqa: E402
from jpeft.models import t5  # noqa: E402


def batch_at(position: int, vocab: int) -> dict:
    rng = np.random.default_rng(1000 + position)
    ids = rng.integers(2, vocab, size=(4, 7))
    labels = rng.integers(2, vocab, size=(4, 5))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}


def main(base_dir: str, ckpt_dir: str, out: str, steps: int, sleep: float) -> None:
    config, base = t5.load_pretrained(base_dir)
    params = lora.inject(base, lora.LoraConfig(r=4, alpha=8, target_modules=["q", "v", "wo"]), jax.random.key(0))
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    tx = optax.adamw(1e-2)
    state = {"trainable": trainable, "opt_state": tx.init(trainable), "rng": jax.random.key(42), "data_position": 0, "step": 0}
    train_step = training.make_train_step(training.seq2seq_loss(config, lora_dropout=0.1), tx)
    ckpt = checkpoint.Manager(ckpt_dir, keep=3, base=base, base_name=base_dir)
    if ckpt.latest_step() is not None:
        state, _ = ckpt.restore(None, state)
        print(f"resumed {state['step']}", flush=True)
    while state["step"] < steps:
        rng, sub = jax.random.split(state["rng"])
        batch = batch_at(state["data_position"], config.vocab_size)
        trainable, opt_state, loss = train_step(state["trainable"], state["opt_state"], frozen, batch, sub)
        state = {"trainable": trainable, "opt_state": opt_state, "rng": rng,
                 "data_position": state["data_position"] + 1, "step": state["step"] + 1}
        ckpt.save(state["step"], state, {"loss": float(loss)})
        print(f"step {state['step']}", flush=True)
        time.sleep(sleep)
    ckpt.close()
    np.savez(out, **{k: np.asarray(v) for k, v in tree.flatten(state["trainable"]).items() if v is not None})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
