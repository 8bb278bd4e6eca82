"""Where the FLAN-T5-small LoRA step and greedy generation spend their time: `python -m benchmarks.breakdown` (not part of run.py).

Times, side by side: the whole train step; the forward loss alone; the forward without LM head and loss;
and single ops at the model's shapes (dense, attention einsums, LM head, softmaxes) against a 2048^3
matmul; generation split into prefill and per-token decoding. Used to explain the MFU and step-time gaps in benchmarks/README.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in run.py: set before torch loads

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, inference, speed
from jpeft import nn, training
from jpeft.models import t5


def op_rates(B: int, S: int, D: int, H: int, K: int, F: int, V: int, T: int) -> dict[str, float]:
    """GFLOP/s of single jitted ops at the step's shapes (elementwise ops: GFLOP/s of one FLOP per element)."""
    r = lambda *s: jax.random.normal(jax.random.key(0), s, jnp.float32)
    ops = {
        "matmul_2048_cubed": (lambda a, b: a @ b, (r(2048, 2048), r(2048, 2048)), 2 * 2048**3),
        "dense_qkv": (lambda a, b: a @ b, (r(B * S, D), r(D, H * K)), 2 * B * S * D * H * K),
        "dense_ff_in": (lambda a, b: a @ b, (r(B * S, D), r(D, F)), 2 * B * S * D * F),
        "lm_head": (lambda a, b: a @ b, (r(B * T, D), r(D, V)), 2 * B * T * D * V),
        "attention_scores": (lambda q, k: jnp.einsum("bqhk,bthk->bhqt", q, k), (r(B, S, H, K), r(B, S, H, K)), 2 * B * H * S * S * K),
        "attention_values": (lambda w, v: jnp.einsum("bhqt,bthk->bqhk", w, v), (r(B, H, S, S), r(B, S, H, K)), 2 * B * H * S * S * K),
        "softmax_scores": (lambda s: jax.nn.softmax(s, -1), (r(B, H, S, S),), B * H * S * S),
        "log_softmax_vocab": (lambda s: jax.nn.log_softmax(s, -1), (r(B * T, V),), B * T * V),
    }
    out = {}
    for name, (f, args, flops) in ops.items():
        f = jax.jit(f)
        out[f"op_{name}_gflops"] = flops / common.timed(lambda: jax.block_until_ready(f(*args)), 2, 5)["median"] / 1e9
    return out


def forward_parts(config, params: dict, batch: dict) -> dict[str, float]:
    """Seconds of the forward loss, and of the forward up to the decoder's last hidden state (no LM head, no loss)."""
    a = t5.arch(config)
    loss = jax.jit(training.seq2seq_loss(config))

    @jax.jit
    def hidden(p, b):
        ctx = nn.Ctx()
        enc, mask = t5.encode(a, p, b["input_ids"], b["attention_mask"], ctx)
        # decode() ends in the LM head: a (D, 1) head keeps the decoder stack and drops the vocabulary projection.
        no_head = {**p, "lm_head": {"kernel": jnp.zeros((a.d_model, 1))}}
        return t5.decode(a, no_head, t5.shift_right(b["labels"], a), enc, mask, ctx=ctx)[0].sum()

    t_loss = common.timed(lambda: loss(params, batch, None).block_until_ready(), 1, 3)["median"]
    t_hidden = common.timed(lambda: hidden(params, batch).block_until_ready(), 1, 3)["median"]
    return {"forward_loss_s": t_loss, "forward_without_lm_head_s": t_hidden}


def torch_forward_s(config, batch: dict) -> float:
    """Seconds of the PEFT LoRA model's forward loss in PyTorch (no graph kept), to set against its whole step."""
    import peft
    import torch
    from transformers import T5ForConditionalGeneration

    model = peft.get_peft_model(T5ForConditionalGeneration(config), peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q", "v"]))
    tensors = {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in batch.items()}

    def forward() -> None:
        with torch.no_grad():
            model(**tensors)

    return common.timed(forward, 1, 3)["median"]


def generation_parts(config, params: dict, B: int, S: int, new: int) -> dict[str, float]:
    """Prefill (1 new token) vs per-token decoding cost of greedy generation, jpeft and transformers."""
    ids = np.random.default_rng(0).integers(2, config.vocab_size, (B, S), dtype=np.int32)
    out = {}
    for side, make in (("jpeft", inference.jpeft_generate), ("transformers", inference.transformers_generate)):
        first, full = (common.timed(make(config, params, ids, n), 1, 3)["median"] for n in (1, new))
        out[f"gen_{side}_prefill_s"], out[f"gen_{side}_per_token_ms"] = first, (full - first) / (new - 1) * 1e3
    return out


def main() -> None:
    """Print the breakdown of the timed LoRA step and of greedy generation."""
    import torch

    torch.set_num_threads(common.CPUS)
    config = common.t5_config()
    B, S, T = speed.shapes(False)
    batch = {k: jnp.asarray(v) for k, v in common.t5_batch(config, B, S, T).items()}
    base = t5.init_params(config, jax.random.key(0))
    params = common.apply_method(base, "lora8", jax.random.key(1))
    figures = forward_parts(config, params, batch)  # before the step, which donates (deletes) the LoRA leaves
    step = common.Step(training.seq2seq_loss(config), *common.split_params(params, "lora8"), batch)
    figures["lora_step_s"] = common.timed(step, 1, 3)["median"]
    figures["peft_forward_loss_s"] = torch_forward_s(config, batch)
    figures.update(op_rates(B, S, config.d_model, config.num_heads, config.d_kv, config.d_ff, config.vocab_size, T))
    figures["analytic_step_gflop"] = speed.t5_matmul_flops(config, B, S, T) / 1e9
    figures.update(generation_parts(config, base, B, S, 64))
    for k, v in figures.items():
        print(f"{k:32s} {v:10.3f}")


if __name__ == "__main__":
    main()
