"""Fine-tune a model for dialogue summarization with any jpeft method, and compare ROUGE before and after.

    python -m train.summarize                      # offline default: SmolLM2-135M-Instruct + LoRA on the bundled sample
    python -m train.summarize --model DIR --data ../shared/data/dialogsum --method lora --steps 32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp

import jpeft
from jpeft import adapters, checkpoint, hf_io, ia3, lora, packing, prompt, sharding, targets, training, tree
from train import data as data_lib
from train import evaluate, tasks, trainer
from train.errors import UsageError

METHODS = ("none", "full", "lora", "prompt", "ia3", "adapter", "selective")
DEFAULT_TARGETS = {
    "t5": {"lora": "q,v", "ia3": "k,v,wo", "ia3_ff": "wo"},
    "llama": {"lora": "q_proj,v_proj", "ia3": "k_proj,v_proj,down_proj", "ia3_ff": "down_proj"},
}


def parser() -> argparse.ArgumentParser:
    """All command-line options."""
    p = argparse.ArgumentParser(prog="jpeft-summarize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="smollm2-135m-instruct", help="HF directory, hub id, .gguf file, or smollm2-135m-instruct")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    g.add_argument("--data", help="directory with train.jsonl/validation.jsonl, one .jsonl/.csv file, or a hub dataset name "
                   "(default: the bundled sample in train/sample_data)")
    g.add_argument("--eval-data", help="separate evaluation file or directory")
    g.add_argument("--max-source-len", type=int, default=384, help="prompt tokens (the dialogue is cut to fit)")
    g.add_argument("--max-target-len", type=int, default=64, help="summary tokens, for training and generation")
    g = p.add_argument_group("method")
    g.add_argument("--method", default="lora", help=f"one of {', '.join(METHODS)}")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32)
    g.add_argument("--lora-targets", help="comma-separated module names (default q,v for T5, q_proj,v_proj for Llama) or 'all-linear'")
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--rslora", action="store_true")
    g.add_argument("--lora-init", default="default", choices=["default", "gaussian", "pissa"])
    g.add_argument("--num-virtual-tokens", type=int, default=20)
    g.add_argument("--prompt-init", default="vocab", choices=["random", "vocab", "text"])
    g.add_argument("--prompt-init-text", default="Summarize the following conversation.")
    g.add_argument("--ia3-targets", help="comma-separated (default k,v,wo for T5)")
    g.add_argument("--ia3-feedforward", help="comma-separated feed-forward targets (default wo for T5)")
    g.add_argument("--adapter-kind", default="houlsby", choices=["houlsby", "pfeiffer"])
    g.add_argument("--adapter-reduction", type=int, default=16)
    g.add_argument("--select-modules", help="selective: comma-separated module names to train")
    g.add_argument("--select-layer-norms", action="store_true", help="selective: train every norm")
    g.add_argument("--select-last-blocks", type=int, help="selective: train the last N blocks of each stack")
    g.add_argument("--modules-to-save", default="", help="comma-separated modules trained in full beside the method")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"])
    g.add_argument("--lr", type=float, default=2e-4)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    g.add_argument("--clip-norm", type=float, default=1.0)
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--steps", type=int, help="optimizer steps (default: --epochs worth)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true", help="bfloat16 compute (parameters stay float32)")
    g.add_argument("--no-remat", dest="remat", action="store_false",
                   help="store every layer's activations instead of recomputing them in the backward pass (more memory)")
    g.add_argument("--no-pack", dest="pack", action="store_false",
                   help="decoder-only models: one example per row instead of packing each batch's examples into few rows")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,model=2 (default: one device)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-samples", type=int, default=50, help="validation examples scored before and after (0: no evaluation)")
    g.add_argument("--eval-batch-size", type=int, default=16)
    g.add_argument("--skip-base-eval", action="store_true")
    g.add_argument("--out", default="runs/summarize")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N micro-steps (default: about 4 per run)")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--merge", action="store_true", help="also save the merged model (LoRA / IA3)")
    return p


def _names(text: str | None, default: str) -> list[str] | str:
    text = text or default
    return "all-linear" if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def _all_linear(params: dict) -> list[str]:
    return sorted({m.rsplit(".", 1)[-1] for m in targets.dense_modules(params) if not m.startswith("lm_head")})


def apply_method(args: argparse.Namespace, task: tasks.Task, params: dict) -> tuple[dict, dict, Any]:
    """(params with the method's leaves, trainable mask, the method's config or None)."""
    key = jax.random.key(args.seed)
    defaults = DEFAULT_TARGETS[task.family]
    save = [m for m in args.modules_to_save.split(",") if m]
    if args.method == "full":
        return params, jax.tree.map(lambda _: True, params), None
    if args.method == "lora":
        targets = _names(args.lora_targets, defaults["lora"])
        cfg = jpeft.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, use_rslora=args.rslora, init=args.lora_init,
                               target_modules=_all_linear(params) if targets == "all-linear" else targets, modules_to_save=tuple(save))
        params = lora.inject(params, cfg, key)
    elif args.method == "prompt":
        cfg = jpeft.PromptTuningConfig(args.num_virtual_tokens, init=args.prompt_init, text=args.prompt_init_text,
                                       tokenizer=task.tokenizer if args.prompt_init == "text" else None)
        params = prompt.inject(params, cfg, key)
    elif args.method == "ia3":
        cfg = jpeft.IA3Config(target_modules=_names(args.ia3_targets, defaults["ia3"]),
                              feedforward_modules=_names(args.ia3_feedforward, defaults["ia3_ff"]), modules_to_save=tuple(save))
        params = ia3.inject(params, cfg)
    elif args.method == "adapter":
        cfg = jpeft.AdapterConfig(kind=args.adapter_kind, reduction_factor=args.adapter_reduction)
        params = adapters.inject(params, cfg, key)
    elif args.method == "selective":
        cfg = jpeft.SelectiveConfig(target_modules=_names(args.select_modules, "") if args.select_modules else (),
                                    layer_norms=args.select_layer_norms, last_n_blocks=args.select_last_blocks)
        return params, jpeft.trainable_mask(params, modules_to_save=save, selective=cfg), cfg
    else:
        raise UsageError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    return params, jpeft.trainable_mask(params, modules_to_save=save), cfg


def _score(task, params, rows, args, dtype, desc) -> tuple[dict, list[str]]:
    predictions = evaluate.summarize_all(task, params, rows, args.max_target_len, args.eval_batch_size, dtype, desc)
    return evaluate.rouge(predictions, [r["summary"] for r in rows]), predictions


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_outputs(args, task, params, mask, method_cfg, out: Path) -> int:
    """Save what was trained (HF PEFT adapter, or the full model); returns the bytes written for the adapter."""
    if args.method == "full":
        task.module.save_pretrained(out / "model", task.config, params)
        return _dir_bytes(out / "model")
    if args.method in ("adapter", "selective"):  # no HF PEFT format for these: the trained leaves by tree path
        trained = {p: v for p, v in tree.flatten(jpeft.partition(params, mask)[0]).items() if v is not None}
        with hf_io.atomic_dir(out / "adapter") as tmp:
            hf_io.write_safetensors(tmp / "jpeft_adapter.safetensors", trained, {"format": "jpeft", "method": args.method})
        return _dir_bytes(out / "adapter")
    jpeft.save_adapter(out / "adapter", params, config=method_cfg, base_model_name_or_path=task.source)
    if args.merge and args.method in ("lora", "ia3"):
        merged = (lora.merge if args.method == "lora" else ia3.merge)(params)
        task.module.save_pretrained(out / "merged", task.config, merged)
    return _dir_bytes(out / "adapter")


def run(args: argparse.Namespace) -> dict:
    """The whole job: load, score the base, train, score the tuned model, write results."""
    if args.method not in METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    train_rows, eval_rows = data_lib.load_data(args.data, args.eval_data)
    task, base = tasks.load_task(args.model, args.tokenizer, jnp.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_enc = tasks.encode(task, train_rows, args.max_source_len, args.max_target_len)
        eval_enc = tasks.encode(task, eval_rows[: args.eval_samples], args.max_source_len, args.max_target_len)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)

    results: dict[str, Any] = {"method": args.method, "model": args.model, "eval_examples": len(eval_enc)}
    base_preds = None
    if args.eval_samples > 0 and (not args.skip_base_eval or args.method == "none"):
        results["base"], base_preds = _score(task, base, eval_enc, args, dtype, "eval base")
        print(f"base ROUGE: {_fmt(results['base'])}")
    if args.method == "none":
        return _finish(results, out, eval_enc, base_preds, None)

    params, mask, method_cfg = apply_method(args, task, base)
    n_train, n_total = jpeft.count_params(params, mask)
    results.update(trainable_params=n_train, total_params=n_total)
    steps = args.steps or max(1, int(args.epochs * len(train_enc) // (args.batch_size * args.grad_accum)))
    optim = trainer.OptimConfig(args.optimizer, args.lr, args.weight_decay, args.warmup_steps, args.schedule, args.clip_norm, args.grad_accum)
    tx = trainer.make_optimizer(optim, steps)
    loss_fn = tasks.loss_fn(task, dtype, args.lora_dropout if args.method == "lora" else 0.0, args.remat)

    trainable, frozen = jpeft.partition(params, mask)
    if args.mesh:
        placed = sharding.setup(args.mesh, loss_fn, tx, trainable, frozen, tx.init(trainable))
        trainable, frozen, opt_state, step_fn, place_batch = placed.trainable, placed.frozen, placed.opt_state, placed.step, placed.place_batch
    else:
        trainable = trainer.fresh_copy(trainable)  # the step donates it; the base tree stays valid
        opt_state, step_fn, place_batch = tx.init(trainable), training.make_train_step(loss_fn, tx), lambda b: b

    lengths = [len(r["source"]) + len(r["target"]) for r in train_enc]
    # A soft prompt is prepended per row, and sharded rows need a fixed row count: neither packs.
    pack = args.pack and task.family == "llama" and args.method != "prompt" and not args.mesh
    # Packed batches come in random order into rows of one length, so they vary only in their row count
    # (few shapes compile); unpacked ones are grouped by length so that they pad little.
    batches = trainer.Batches(lengths, args.batch_size, args.seed, group=1 if pack else 32)
    row_len = packing.round_up(max(lengths), tasks.BUCKET) if pack else None

    def make_batch(i: int) -> dict:
        idx = batches(i)
        return place_batch(tasks.train_batch(task, [train_enc[j] for j in idx], args.max_target_len, pack=pack, row_len=row_len))

    total = steps * args.grad_accum
    ckpt = checkpoint.Manager(out / "checkpoints", keep=args.keep_checkpoints, base=base, base_name=str(args.model))
    start = min(ckpt.latest_step() or 0, total)
    if start:
        restored, _ = ckpt.restore(start, {"trainable": trainable, "opt_state": opt_state})
        trainable, opt_state = restored["trainable"], restored["opt_state"]
        print(f"resuming from step {start} of {total} ({out / 'checkpoints'})")

    def save(step, trainable, opt_state):
        ckpt.save(step, {"trainable": trainable, "opt_state": opt_state}, {"seed": args.seed, "method": args.method, "model": args.model})

    t0 = time.perf_counter()
    try:
        trainable, opt_state, _ = trainer.fit(
            step_fn, trainable, opt_state, frozen, make_batch, tasks.token_count, total,
            seed=args.seed, out=out, schedule=trainer.learning_rate(optim, steps), grad_accum=args.grad_accum,
            log_every=args.log_every, save=save, save_every=args.save_every or max(1, total // 4), start=start,
        )
    finally:
        ckpt.close()
    results["train_seconds"] = time.perf_counter() - t0
    history = _all_history(out)  # across restarts: a resumed run still reports and plots the whole curve
    results["final_loss"] = history[-1]["loss"] if history else None
    if history:
        trainer.plot_losses(history, out / "loss.png", f"{args.method} on {Path(str(args.model)).name}")
    params = sharding.gather(jpeft.combine(trainable, frozen)) if args.mesh else jpeft.combine(trainable, frozen)
    results["adapter_bytes"] = save_outputs(args, task, params, mask, method_cfg, out)
    tuned_preds = None
    if args.eval_samples > 0:
        results["tuned"], tuned_preds = _score(task, params, eval_enc, args, dtype, "eval tuned")
        print(f"tuned ROUGE: {_fmt(results['tuned'])}")
    return _finish(results, out, eval_enc, base_preds, tuned_preds)


def _all_history(out: Path) -> list[dict]:
    """Every logged step, across restarts (the last record per step wins)."""
    records = {}
    log = out / "metrics.jsonl"
    for line in (log.read_text().splitlines() if log.exists() else []):
        record = json.loads(line)
        records[record["step"]] = record
    return [records[s] for s in sorted(records)]


def _fmt(scores: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items())


def _finish(results: dict, out: Path, rows: list[dict], base: list[str] | None, tuned: list[str] | None) -> dict:
    results["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    with (out / "predictions.jsonl").open("w") as f:
        for i, row in enumerate(rows):
            record = {"id": row["id"], "reference": row["summary"]}
            if base is not None:
                record["base"] = base[i]
            if tuned is not None:
                record["tuned"] = tuned[i]
            f.write(json.dumps(record) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user mistakes become one line on stderr and exit status 2."""
    args = parser().parse_args(argv)
    try:
        results = run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (hf_io.CheckpointError, ValueError) as e:
        if os.environ.get("JPEFT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: results.get(k) for k in ("method", "base", "tuned", "trainable_params", "train_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
