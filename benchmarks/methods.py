"""What a PEFT method costs over plain LoRA, jpeft beside HF PEFT: train-step time of each method over LoRA's.

Every method in `METHODS` is timed against `lora` on two shapes, interleaved with it (`speed.timed_together`), on
both sides: jpeft's jitted AdamW step and PEFT's `get_peft_model` + AdamW step in PyTorch, same transformers config,
batch and targets. Figures, per shape prefix P ("" for T5, "smollm2_" for SmolLM2) and method M:

- `{P}{M}_over_lora_step_time`: jpeft's M step over its LoRA step; `{P}peft_{M}_over_lora_step_time`: PEFT's.
- `jpeft_over_peft_{P}{M}_over_lora_step_time`: the first over the second, below 1 when jpeft's overhead is the lower.
- `{P}{jpeft|peft}_{M}_step_s` (with `_min`, `_max`): the step times themselves.

Shapes: T5 is `speed.py`'s FLAN-T5-small step (batch 8, 256 source / 64 target tokens, LoRA r=8 on q, v). SmolLM2
is SmolLM2-135M's layer shape (d 576, 9 heads / 3 KV heads, MLP 1536, vocabulary 49,152, tied head) with random
weights and `SMOLLM2_LAYERS` of its 30 layers (a full 30-layer step per side and method is minutes on a shared
CPU), batch 8 x 448 tokens of which the last 64 are scored, LoRA r=16, alpha 32 on all seven projections, remat on.

A method is one `Method` entry: how jpeft adds it to a parameter tree and which PEFT config adds it to a torch
model. Prefix tuning (20 virtual tokens, no projection) runs on the SmolLM2 shape only: FLAN-T5-small's heads
(6 x 64) do not span its d_model (512), which PEFT's prefix layout needs (PEFT fails on it; jpeft refuses it).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks.run sets it, for `python -m benchmarks.methods` (see README)

import jax
import numpy as np

import jpeft
from benchmarks import common, memory, speed
from jpeft import training
from jpeft.models import llama, t5

SMOLLM2_LAYERS = 4
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                     rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=2048,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclasses.dataclass(frozen=True)
class Method:
    """One PEFT method as each side adds it: jpeft (params, targets, rank, key) -> params; PEFT (targets, rank, task) -> config."""

    jpeft: Callable[[dict, tuple[str, ...], int, jax.Array, Any], dict]  # (params, targets, rank, key, model config)
    peft: Callable[[tuple[str, ...], int, str], Any]
    t5: bool = True  # whether it runs on the T5 shape


def _lora(dora: bool) -> Method:
    """LoRA (alpha = 2r, no dropout) on `targets`, as DoRA when `dora`."""
    def ours(params, targets, r, key, config):
        return jpeft.lora.inject(params, jpeft.LoraConfig(r=r, alpha=2 * r, target_modules=list(targets), use_dora=dora), key)

    def theirs(targets, r, task):
        import peft

        return peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0, use_dora=dora, task_type=task)

    return Method(ours, theirs)


def _prefix() -> Method:
    """Prefix tuning, 20 virtual tokens, no projection (P-tuning v2)."""
    def theirs(targets, r, task):
        import peft

        return peft.PrefixTuningConfig(num_virtual_tokens=20, task_type=task)

    return Method(lambda params, targets, r, key, config: jpeft.prefix.inject(params, jpeft.PrefixTuningConfig(20), key, config),
                  theirs, t5=False)


BASELINE = "lora"
METHODS: dict[str, Method] = {"lora": _lora(False), "dora": _lora(True), "prefix": _prefix()}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model and batch both sides train on: jpeft's (config, params, loss, batch), torch's model and inputs."""

    prefix: str  # figure prefix
    config: Any  # the transformers config both sides build
    targets: tuple[str, ...]
    rank: int
    task: str  # PEFT task type
    init: Callable[[jax.Array], dict]  # jpeft params
    loss: Any
    batch: dict
    torch_model: Callable[[], Any]  # a fresh transformers model of the same config
    torch_inputs: dict  # keyword arguments of its forward, labels= included


def t5_shape(quick: bool) -> Shape:
    """`speed.py`'s T5 step: FLAN-T5-small shape (quick: shrunk), LoRA r=8 on q, v."""
    from transformers import T5ForConditionalGeneration

    config = common.t5_config(quick=quick)
    batch = common.t5_batch(config, *speed.shapes(quick))
    return Shape("", config, ("q", "v"), 8, "SEQ_2_SEQ_LM", lambda k: t5.init_params(config, k), training.seq2seq_loss(config), batch,
                 lambda: T5ForConditionalGeneration(config), {k: np.asarray(v, np.int64) for k, v in batch.items()})


def smollm2_shape(quick: bool, layers: int = SMOLLM2_LAYERS) -> Shape:
    """SmolLM2-135M's layer shape with `layers` random layers (quick: one, batch 2 x 64), LoRA r=16 on all seven projections."""
    import transformers

    config = transformers.LlamaConfig(**SMOLLM2_SHAPE, num_hidden_layers=1 if quick else layers)
    rows, length, targets = (2, 64, 16) if quick else (8, 448, 64)
    batch = memory.smollm2_batch(config, rows, length, targets)
    labels = np.full((rows, length), -100, np.int64)
    labels[:, length - targets:] = batch["targets"]
    inputs = {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64), "labels": labels}
    return Shape("smollm2_", config, tuple(memory.LLAMA_PROJ), 16, "CAUSAL_LM", lambda k: llama.init_params(config, k), memory.llama_loss(config),
                 batch, lambda: transformers.LlamaForCausalLM(config), inputs)


def jpeft_step(shape: Shape, method: Method) -> common.Step:
    """jpeft's compiled AdamW step of `method` on `shape` (its own copy of the weights)."""
    params = method.jpeft(shape.init(jax.random.key(0)), shape.targets, shape.rank, jax.random.key(1), shape.config)
    trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
    return common.Step(shape.loss, trainable, frozen, shape.batch)


def peft_step(shape: Shape, method: Method) -> Callable[[], None]:
    """PEFT's AdamW step of `method` on `shape` in PyTorch, through transformers' labels= loss."""
    import peft
    import torch

    torch.manual_seed(0)
    device = common.torch_device()
    model = peft.get_peft_model(shape.torch_model(), method.peft(shape.targets, shape.rank, shape.task)).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    inputs = {k: torch.from_numpy(v).to(device) for k, v in shape.torch_inputs.items()}

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        opt.step()
        common.torch_sync()

    return step


def compare(shape: Shape, methods: dict[str, Method], warmup: int, repeats: int) -> dict[str, float]:
    """Every method and the baseline on both sides, interleaved; step times and each method's ratio to the baseline."""
    calls = {}
    for name, method in methods.items():
        calls[f"{shape.prefix}jpeft_{name}_step"] = jpeft_step(shape, method)
        calls[f"{shape.prefix}peft_{name}_step"] = peft_step(shape, method)
    out = speed.timed_together(calls, warmup, repeats)
    p = shape.prefix
    for name in methods:
        if name == BASELINE:
            continue
        ours = out[f"{p}jpeft_{name}_step_s"] / out[f"{p}jpeft_{BASELINE}_step_s"]
        theirs = out[f"{p}peft_{name}_step_s"] / out[f"{p}peft_{BASELINE}_step_s"]
        out.update({f"{p}{name}_over_{BASELINE}_step_time": ours, f"{p}peft_{name}_over_{BASELINE}_step_time": theirs,
                    f"jpeft_over_peft_{p}{name}_over_{BASELINE}_step_time": ours / theirs})
    return out


SHAPES = ("t5", "smollm2")


def run(quick: bool, warmup: int = 1, repeats: int = 3, smollm2_layers: int = SMOLLM2_LAYERS,
        shapes: tuple[str, ...] = SHAPES) -> dict[str, float]:
    """The `shapes` (both by default), each method against LoRA on both sides."""
    methods = {BASELINE: METHODS[BASELINE], **METHODS}
    out = {}
    if "t5" in shapes:
        out.update(compare(t5_shape(quick), {k: m for k, m in methods.items() if m.t5}, warmup, repeats))
    if "smollm2" in shapes:
        out.update(compare(smollm2_shape(quick, smollm2_layers), methods, warmup, repeats))
        out["smollm2_methods_layers"] = 1 if quick else smollm2_layers
    return out


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smollm2-layers", type=int, default=SMOLLM2_LAYERS)
    parser.add_argument("--shape", action="append", choices=SHAPES, help="run only this shape (repeatable; default both)")
    args = parser.parse_args()
    figures = run(args.quick, repeats=args.repeats, smollm2_layers=args.smollm2_layers, shapes=tuple(args.shape or SHAPES))
    print(json.dumps(figures, indent=1, sort_keys=True))
