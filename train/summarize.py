"""Fine-tune a model for summarization with any jpeft method, and compare ROUGE before and after.

    python -m train.summarize                      # offline default: SmolLM2-135M-Instruct + LoRA on the bundled sample
    python -m train.summarize --model DIR --data ../shared/data/dialogsum --method lora --steps 32
    python -m train.summarize --data xsum.parquet --input-field document --target-field summary --prompt "Summarize: {input}"

Every option is checked before the model loads; a restart with the same --out resumes the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp

import jpeft
from jpeft import adapters, checkpoint, hf_io, ia3, loha, lokr, lora, packing, prefix, prompt, ptuning, quant, sharding, soft_prompt, targets, training, tree
from jpeft.models import registry
from train import data as data_lib
from train import evaluate, options, run_dir, tasks, trainer
from train.errors import UsageError

DEFAULT_TARGETS = {
    "t5": {"lora": "q,v", "ia3": "k,v,wo", "ia3_ff": "wo"},
    "llama": {"lora": "q_proj,v_proj", "ia3": "k_proj,v_proj,down_proj", "ia3_ff": "down_proj"},
    "gemma": {"lora": "q_proj,v_proj", "ia3": "q_proj,v_proj,down_proj", "ia3_ff": "down_proj"},  # HF PEFT's Gemma defaults
}


LOW_RANK = {"lora": lora, "dora": lora, "loha": loha, "lokr": lokr}  # methods configured by the --lora-* options
MERGEABLE = {"lora": lora.merge, "dora": lora.merge, "ia3": ia3.merge, "loha": loha.merge, "lokr": lokr.merge}
SOFT_PROMPTS = ("prompt", "ptuning", "prefix")  # virtual tokens in front of each row: rows do not pack
NEAREST = 5  # vocabulary neighbours reported for each learned virtual token
JPEFT_ADAPTER = "jpeft_adapter.safetensors"  # the adapter file of methods HF PEFT has no format for
QUANTIZED = {"nf4": "quantized to NF4 (QLoRA)", "int8": "quantized to int8", "gguf": "kept in its GGUF quantization"}  # --quantize


def parser() -> argparse.ArgumentParser:
    """All command-line options, each with its default in `--help`."""
    p = options.parser("jpeft-summarize", __doc__)
    g = p.add_argument_group("memory planning")
    g.add_argument("--plan", action="store_true",
                   help="print the memory one train step needs per device (compiled from the model's shapes, no weights read: "
                        "jpeft.plan) and exit")
    g.add_argument("--memory-budget", metavar="SIZE",
                   help="choose the micro-batch (the rest of --batch-size by accumulation), remat and --quantize so that one step "
                        "fits SIZE per device (e.g. 24GB, 80GiB), and say which")
    return p


def gguf_export_fits(export: str, method: str) -> bool:
    """Whether `method` can be exported as `export`: llama.cpp's adapter file holds LoRA pairs, the merged file needs
    a method that folds into the weights."""
    return method == "lora" if export == "adapter" else method in (*MERGEABLE, "full")


def check_gguf_export(args: argparse.Namespace, family: str) -> None:
    """--export-gguf needs a decoder-only model; the adapter file needs plain LoRA, the merged one a mergeable method."""
    exports = getattr(args, "export_gguf", [])
    if exports and family == "t5":
        raise UsageError("--export-gguf: llama.cpp GGUF export is for decoder-only models (Llama family, Gemma); T5 is not a llama.cpp target")
    if "adapter" in exports and not gguf_export_fits("adapter", args.method):
        raise UsageError(f"--export-gguf adapter: llama.cpp adapters hold LoRA pairs only, not --method {args.method}; "
                         "export the merged model instead (--export-gguf merged)")
    if "merged" in exports and not gguf_export_fits("merged", args.method):
        raise UsageError(f"--export-gguf merged: --method {args.method} does not merge into the weights")


def _names(text: str | None, default: str) -> list[str] | str:
    text = text or default
    return "all-linear" if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


def _all_linear(params: dict) -> list[str]:
    return sorted({m.rsplit(".", 1)[-1] for m in targets.dense_modules(params) if not m.startswith("lm_head")})


def _low_rank_config(args: argparse.Namespace, family: str, params: dict, save: list[str]) -> Any:
    """The config of a low-rank method (LoRA, DoRA, LoHa, LoKr) from the shared --lora-* options."""
    targets = _names(args.lora_targets, DEFAULT_TARGETS[family]["lora"])
    targets = _all_linear(params) if targets == "all-linear" else targets
    if args.method in ("lora", "dora"):
        return jpeft.LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, use_rslora=args.rslora,
                                init=args.lora_init, target_modules=targets, modules_to_save=tuple(save),
                                **({"use_dora": True} if args.method == "dora" else {}))
    make = jpeft.LoHaConfig if args.method == "loha" else jpeft.LoKrConfig
    return make(r=args.lora_r, alpha=args.lora_alpha, target_modules=targets)


def apply_method(args: argparse.Namespace, family: str, tokenizer: Any, params: dict, config: Any) -> tuple[dict, dict, Any]:
    """(params with the method's leaves, trainable mask, the method's config or None); `config` is the model's."""
    key = jax.random.key(args.seed)
    defaults = DEFAULT_TARGETS[family]
    save = [m for m in args.modules_to_save.split(",") if m]
    try:
        if args.method == "full":
            return params, jax.tree.map(lambda _: True, params), None
        if args.method in LOW_RANK:
            cfg = _low_rank_config(args, family, params, save)
            params = LOW_RANK[args.method].inject(params, cfg, key)
        elif args.method == "prompt":
            cfg = jpeft.PromptTuningConfig(args.num_virtual_tokens, init=args.prompt_init, text=args.prompt_init_text,
                                           tokenizer=tokenizer if args.prompt_init == "text" else None)
            # Gemma scales its token embeddings by sqrt(d_model); a soft prompt starts on that scale (as in HF PEFT).
            scale = prompt.embedding_table(params).shape[1] ** 0.5 if family == "gemma" else 1.0
            params = prompt.inject(params, cfg, key, embed_scale=scale)
        elif args.method == "ptuning":
            cfg = jpeft.PromptEncoderConfig(args.num_virtual_tokens, encoder_reparameterization_type=args.encoder_type.upper(),
                                            encoder_hidden_size=args.encoder_hidden_size)
            params = ptuning.inject(params, cfg, key)
        elif args.method == "prefix":
            cfg = jpeft.PrefixTuningConfig(args.num_virtual_tokens, prefix_projection=args.prefix_projection,
                                           encoder_hidden_size=args.encoder_hidden_size)
            params = prefix.inject(params, cfg, key, config)
        elif args.method == "ia3":
            ia3_targets, ff = _names(args.ia3_targets, defaults["ia3"]), _names(args.ia3_feedforward, defaults["ia3_ff"])
            if args.ia3_feedforward is None and not isinstance(ia3_targets, str):  # as PEFT's default: only targets it names
                ff = [name for name in ff if name in ia3_targets]
            cfg = jpeft.IA3Config(target_modules=ia3_targets, feedforward_modules=ff, modules_to_save=tuple(save))
            params = ia3.inject(params, cfg)
        elif args.method == "adapter":
            cfg = jpeft.AdapterConfig(kind=args.adapter_kind, reduction_factor=args.adapter_reduction)
            params = adapters.inject(params, cfg, key)
        else:
            cfg = jpeft.SelectiveConfig(target_modules=_names(args.select_modules, "") if args.select_modules else (),
                                        layer_norms=args.select_layer_norms, last_n_blocks=args.select_last_blocks)
            return params, jpeft.trainable_mask(params, modules_to_save=save, selective=cfg), cfg
        return params, jpeft.trainable_mask(params, modules_to_save=save), cfg
    except ValueError as e:  # targets that match nothing, bad ranks: the method's own message
        raise UsageError(f"--method {args.method}: {e}") from None


def check_method_fits(args: argparse.Namespace, family: str, config: Any) -> None:
    """Apply the method to the model's parameter shapes alone (`jax.eval_shape`): targets, ranks and patterns are
    checked against the real module names before any weight is read; so is --quantize nf4 / int8."""
    module = tasks.MODULES[family]
    tied = {"tie_word_embeddings": getattr(config, "tie_word_embeddings", True)} if family == "t5" else {}
    shapes = {path: jax.ShapeDtypeStruct(shape, jnp.float32) for path, shape in module.param_shapes(config, **tied).items()}
    if args.quantize in quant.FORMATS:
        try:
            quant.select(tree.unflatten(shapes), args.quantize)
        except ValueError as e:
            raise UsageError(f"--quantize {args.quantize}: {e}") from None
    if args.method == "none":
        return
    # A text-initialised prompt needs the tokenizer, not yet loaded; its shapes are those of any other init.
    check = argparse.Namespace(**{**vars(args), "prompt_init": "random" if args.prompt_init == "text" else args.prompt_init})
    jax.eval_shape(lambda p: apply_method(check, family, None, p, config)[0], tree.unflatten(shapes))


class Phases:
    """Wall-clock seconds of the command's phases, in order (`lap(name)` closes the phase running since the last)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the time since the previous lap as phase `name`."""
        now = time.perf_counter()
        self.seconds[name] = now - self._mark
        self._mark = now


def _score(task, params, rows, args, dtype, desc) -> tuple[dict, list[str]]:
    predictions = evaluate.summarize_all(task, params, rows, args.max_target_len, args.eval_batch_size, dtype, desc,
                                         prompt_lookup=args.prompt_lookup)
    return evaluate.rouge(predictions, [r["reference"] for r in rows]), predictions


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_outputs(args, task, params, mask, method_cfg, out: Path) -> int:
    """Save what was trained (HF PEFT adapter, or the full model); returns the bytes written for the adapter."""
    if args.method == "full":
        task.module.save_pretrained(out / "model", task.config, params)
        return _dir_bytes(out / "model")
    if args.method in ("adapter", "selective"):  # no HF PEFT format for these: the trained leaves by tree path
        save_trained_leaves(out / "adapter", params, mask, args.method)
        return _dir_bytes(out / "adapter")
    jpeft.save_adapter(out / "adapter", params, config=method_cfg, base_model_name_or_path=task.source)
    if args.merge and args.method in MERGEABLE:
        task.module.save_pretrained(out / "merged", task.config, _merged(args, params))
    export_gguf(args, task, params, out)
    return _dir_bytes(out / "adapter")


def save_trained_leaves(directory: Path, params: dict, mask: dict, method: str) -> None:
    """jpeft's own adapter file, for methods HF PEFT has no format for: every trained leaf by its tree path."""
    trained = {p: v for p, v in tree.flatten(jpeft.partition(params, mask)[0]).items() if v is not None}
    with hf_io.atomic_dir(directory) as tmp:
        hf_io.write_safetensors(tmp / JPEFT_ADAPTER, trained, {"format": "jpeft", "method": method})


def load_trained_leaves(directory: Path, base: dict) -> dict:
    """`base` with the leaves `save_trained_leaves` wrote: new ones (bottleneck adapters) attached, trained base
    weights (selective) put in place of the base's, each checked against the base's shape."""
    from safetensors.numpy import load_file

    flat, saved = tree.flatten(base), load_file(directory / JPEFT_ADAPTER)
    for path, value in saved.items():
        if path in flat and tuple(value.shape) != tuple(flat[path].shape):
            raise hf_io.CheckpointError(f"{directory}: {path} has shape {tuple(value.shape)}, but the base's is {tuple(flat[path].shape)}: "
                                        "it was trained on another base")
    replaced = {**flat, **{p: jnp.asarray(v) for p, v in saved.items() if p in flat}}
    added = {p: jnp.asarray(v) for p, v in saved.items() if p not in flat}
    try:
        return jpeft.attach(tree.unflatten(replaced), tree.unflatten(added))
    except ValueError as e:
        raise hf_io.CheckpointError(f"{directory} does not fit this base: {e}") from None


def _merged(args, params):
    """The tuned weights with the method folded in, in float (a quantized base exported dequantized)."""
    return quant.dequantize(MERGEABLE[args.method](params) if args.method in MERGEABLE else params)


def export_gguf(args, task, params, out: Path) -> None:
    """The --export-gguf files: adapter.gguf (LoRA, f32) and merged.gguf (f16; the vocabulary is the model's own GGUF's,
    the one llama.cpp knows, else that of --tokenizer or the model directory)."""
    exports = getattr(args, "export_gguf", [])
    if "adapter" in exports:
        jpeft.gguf.save_lora(out / "adapter.gguf", params, task.config)
    if "merged" in exports:
        model = registry.resolve(args.model)
        source = model if str(model).endswith(".gguf") else args.tokenizer or model
        jpeft.gguf.save(out / "merged.gguf", task.config, _merged(args, params), dtype="f16", tokenizer_source=source)
    for name in exports:
        print(f"wrote {out / f'{name}.gguf'} (llama.cpp GGUF)")


def _plan(args, n_train: int, steps: int, trainable: int, total: int, out: Path, resume_from: int) -> str:
    per_step = args.batch_size * args.grad_accum
    base = f"{args.model} {QUANTIZED[args.quantize]}" if args.quantize else args.model
    lines = [f"plan: {args.method} on {base}, {steps} optimizer steps x {per_step} examples "
             f"({args.batch_size} per micro-batch x {args.grad_accum} accumulated) = {steps * per_step} examples "
             f"({steps * per_step / n_train:.2f} epochs of {n_train})",
             f"      trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); lr {args.lr:g} "
             f"({args.schedule}), seed {args.seed}; writing to {out}"]
    if resume_from:
        lines.append(f"      resuming at micro-step {resume_from} of {steps * args.grad_accum} from {out / 'checkpoints'}")
    return "\n".join(lines)


class Prepared(NamedTuple):
    """What `prepare` found: the rows, where the evaluation rows come from, and a finished run's results (else None)."""

    train_rows: list[dict]
    eval_rows: list[dict]
    finished: dict | None
    eval_origin: str


def prepare(args: argparse.Namespace, train_data: Any = None, eval_data: Any = None, *, command: Any = None,
            columns: tuple[str, str] | None = None, **normalize_options: Any) -> Prepared:
    """Everything that needs no weights: options, the method against the model's shapes, the data, the run directory.

    `train_data` / `eval_data` (a `datasets.Dataset` or a list of dicts) take the place of --data / --eval-data.
    `command` (a module with `parser()`, default this one) says whose option defaults an older run directory lacks;
    `columns` (input, target) replace --input-field / --target-field and `normalize_options` go to `data.normalize`
    (`train.prefer` reads prompt and chosen, and keeps its rejected column).
    """
    options.check(args)
    family, config, _ = tasks.find_model(args.model)
    check_gguf_export(args, family)
    check_method_fits(args, family, config)
    if getattr(args, "memory_budget", None):  # train.prefer and train.grpo plan no step of their own
        fit_memory_budget(args, family, config)
    data = args.data if train_data is None else train_data
    evaluation = args.eval_data if eval_data is None else eval_data
    train_rows, eval_rows = data_lib.load_data(data, evaluation, *(columns or (args.input_field, args.target_field)), **normalize_options)
    out = Path(args.out)
    defaults = vars((command or sys.modules[__name__]).parser().parse_args([]))
    finished = run_dir.prepare(out, run_dir.settings(args, train_rows), args.overwrite, defaults)
    return Prepared(train_rows, eval_rows, finished, data_lib.eval_origin(data, evaluation))


def memory_plan(args: argparse.Namespace, family: str, config: Any) -> jpeft.Plan:
    """`jpeft.plan` of this command's train step: its model, method, batch of the longest rows, dtypes, optimizer and mesh."""
    if args.quantize == "gguf":
        raise UsageError("--plan / --memory-budget plan from the config's shapes, which do not say how a .gguf file's blocks are "
                         "packed: plan with --quantize nf4 (the same 4.5 bits a weight) instead")
    check = argparse.Namespace(**{**vars(args), "prompt_init": "random" if args.prompt_init == "text" else args.prompt_init})
    storage, compute = compute_dtypes(args)
    seq_len = args.max_source_len + (args.max_target_len if family != "t5" else 0)
    optim = trainer.OptimConfig(args.optimizer, args.lr, args.weight_decay, args.warmup_steps, args.schedule, args.clip_norm, args.grad_accum)
    method = None if args.method == "full" else lambda p: apply_method(check, family, None, p, config)[:2]
    return jpeft.plan(config, method, batch=args.batch_size, seq_len=seq_len, target_len=args.max_target_len, dtype=storage,
                      compute_dtype=compute, quantize=args.quantize, remat=args.remat, mesh=args.mesh or None,
                      optimizer=trainer.make_optimizer(optim, 1), lora_dropout=args.lora_dropout if args.method in ("lora", "dora") else 0.0)


def fit_memory_budget(args: argparse.Namespace, family: str, config: Any) -> None:
    """Set the micro-batch, accumulation, remat and quantization that `jpeft.plan` finds fit --memory-budget, and say so."""
    try:
        chosen = memory_plan(args, family, config).fit(args.memory_budget)
    except ValueError as e:
        raise UsageError(f"--memory-budget {args.memory_budget}: {e}") from None
    accum = args.grad_accum * args.batch_size // chosen.batch
    print(f"memory budget {args.memory_budget}: micro-batch {chosen.batch} x {accum} accumulated, remat {'on' if chosen.remat else 'off'}, "
          f"quantize {chosen.quantize or 'none'} (one step needs {chosen.peak / 1e9:.2f} GB per device)", flush=True)
    args.batch_size, args.grad_accum, args.remat, args.quantize = chosen.batch, accum, chosen.remat, chosen.quantize


def show_plan(args: argparse.Namespace) -> dict:
    """--plan: the checks that need no weights, then the memory plan (and what --memory-budget would choose), printed."""
    options.check(args)
    family, config, _ = tasks.find_model(args.model)
    check_method_fits(args, family, config)
    p = memory_plan(args, family, config)
    print(p.table())
    if args.memory_budget:
        fit_memory_budget(args, family, config)
    return {"plan": {k: v for k, v in vars(p).items() if k not in ("request", "step", "shapes")}}


def run(args: argparse.Namespace, train_data: Any = None, eval_data: Any = None) -> dict:
    """The whole job: check, load, score the base, train, score the tuned model, write results (--plan: the plan only)."""
    if getattr(args, "plan", False):
        return show_plan(args)
    return run_prepared(args, prepare(args, train_data, eval_data), execute)


def run_prepared(args: argparse.Namespace, prepared: Prepared, execute: Any) -> dict:
    """`execute(args, prepared)` after `prepare`, unless `--out` already holds this run complete."""
    if prepared.finished is not None:
        out = Path(args.out)
        print(f"{out} already holds this run, complete: its results are in {out / run_dir.RESULTS_FILE} "
              "(use --overwrite to train it again, or a new --out)")
        return prepared.finished
    return execute(args, prepared)


def compute_dtypes(args: argparse.Namespace) -> tuple[Any, Any]:
    """(the frozen base's storage dtype, the compute dtype): --dtype bfloat16 stores and computes in bf16, --bf16 computes in
    bf16 over a float32 base; trainable leaves are float32 masters either way (`jpeft.partition`)."""
    storage = jnp.dtype(args.dtype)
    return storage, jnp.dtype(jnp.bfloat16) if args.bf16 else storage


def load(args: argparse.Namespace) -> tuple[tasks.Task, dict]:
    """(task, base parameters) of --model with --tokenizer and --chat-template, stored as --dtype; --quantize nf4 / int8
    quantizes each projection as it streams in, and --mesh puts each weight straight into its shards."""
    return tasks.load_task(args.model, args.tokenizer, compute_dtypes(args)[0], chat={"auto": None, "yes": True, "no": False}[args.chat_template],
                           quantized=args.quantize == "gguf", quantize=args.quantize if args.quantize in quant.FORMATS else None,
                           mesh=sharding.mesh_from_string(args.mesh) if args.mesh else None)


@contextlib.contextmanager
def warnings_to_stderr() -> Iterator[None]:
    """Warnings raised inside (truncated inputs, ...) printed as `warning:` lines after the block."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)


def execute(args: argparse.Namespace, prepared: Prepared) -> dict:
    """Load the model, score the base, train, score the tuned model, write results (after `prepare`)."""
    train_rows, eval_rows = prepared.train_rows, prepared.eval_rows
    out = Path(args.out)
    run_dir.reset_peak_memory()  # a lab runs several of these in one process: each reports its own peak
    clock = Phases()
    _, dtype = compute_dtypes(args)
    task, base = load(args)
    with warnings_to_stderr():
        train_enc = tasks.encode(task, train_rows, args.max_source_len, args.max_target_len, args.prompt)
        eval_enc = tasks.encode(task, eval_rows[: args.eval_samples], args.max_source_len, args.max_target_len, args.prompt)
    if args.eval_samples:
        evaluate.report_count(len(eval_enc), len(eval_rows), prepared.eval_origin, "--eval-samples", args.eval_samples,
                              "pass more evaluation examples with --eval-data")

    results: dict[str, Any] = {"method": args.method, "quantize": args.quantize, "model": args.model, "eval_examples": len(eval_enc),
                               "phase_seconds": clock.seconds}
    clock.lap("load")
    base_preds = None
    if args.eval_samples > 0 and (not args.skip_base_eval or args.method == "none"):
        results["base"], base_preds = _score(task, base, eval_enc, args, dtype, "eval base")
        print(f"base ROUGE: {fmt(results['base'])}")
        clock.lap("base_eval")
    if args.method == "none":
        return _finish(results, out, eval_enc, base_preds, None)

    steps = args.steps or max(1, int(args.epochs * len(train_enc) // (args.batch_size * args.grad_accum)))
    loss_fn = tasks.loss_fn(task, dtype, args.lora_dropout if args.method in ("lora", "dora") else 0.0, args.remat)
    run = setup(args, task, base, loss_fn, steps, out, results)

    lengths = [len(r["source"]) + len(r["target"]) for r in train_enc]
    # A soft prompt is prepended per row, and sharded rows need a fixed row count: neither packs.
    pack = args.pack and task.decoder_only and args.method not in SOFT_PROMPTS and not args.mesh
    # Packed batches come in random order into rows of one length, so they vary only in their row count
    # (few shapes compile); unpacked ones are grouped by length so that they pad little.
    batches = trainer.Batches(lengths, args.batch_size, args.seed, group=1 if pack else 32)
    row_len = packing.round_up(max(lengths), tasks.BUCKET) if pack else None

    def make_batch(i: int) -> dict:
        idx = batches(i)
        return run.place_batch(tasks.train_batch(task, [train_enc[j] for j in idx], args.max_target_len, pack=pack, row_len=row_len))

    print(_plan(args, len(train_enc), steps, run.n_train, run.n_total, out, run.start), flush=True)
    params = train(args, task, run, make_batch, tasks.token_count, out, results, clock)
    if soft_prompt.present(params):
        results["nearest_tokens"] = soft_prompt.nearest_tokens(params, task.tokenizer, NEAREST)
        print("nearest vocabulary tokens of the first learned virtual tokens (cosine):")
        for i, near in enumerate(results["nearest_tokens"][:5]):
            print(f"  {i}: " + ", ".join(f"{t!r} {c:.3f}" for t, c in near))
    tuned_preds = None
    if args.eval_samples > 0:
        results["tuned"], tuned_preds = _score(task, params, eval_enc, args, dtype, "eval tuned")
        print(f"tuned ROUGE: {fmt(results['tuned'])}")
        clock.lap("tuned_eval")
    return _finish(results, out, eval_enc, base_preds, tuned_preds)


@dataclasses.dataclass
class Training:
    """What `setup` prepared for `train`: the method's tree split for the jitted step, the optimizer and its state,
    the checkpoints (restored from when resuming) and the parameter counts."""

    mask: Any
    method_cfg: Any
    trainable: Any
    frozen: Any
    opt_state: Any
    step_fn: Any
    place_batch: Any
    optim: trainer.OptimConfig
    steps: int
    ckpt: checkpoint.Manager
    start: int
    n_train: int
    n_total: int


def setup(args: argparse.Namespace, task: tasks.Task, base: dict, loss_fn: Any, steps: int, out: Path, results: dict,
          with_metrics: bool = False) -> Training:
    """Apply --method to `base`, build the optimizer and the jitted step of `loss_fn` (sharded with --mesh), and restore
    the latest checkpoint in `out`; records the parameter counts in `results`. `with_metrics`: the step also returns
    the loss's metrics (`training.make_train_step`)."""
    params, mask, method_cfg = apply_method(args, task.family, task.tokenizer, base, task.config)
    n_train, n_total = jpeft.count_params(params, mask, verbose=False)
    results.update(trainable_params=n_train, total_params=n_total)
    optim = trainer.OptimConfig(args.optimizer, args.lr, args.weight_decay, args.warmup_steps, args.schedule, args.clip_norm, args.grad_accum)
    tx = trainer.make_optimizer(optim, steps)
    trainable, frozen = jpeft.partition(params, mask)
    if args.mesh:
        placed = sharding.setup(args.mesh, loss_fn, tx, trainable, frozen, tx.init(trainable))
        trainable, frozen, opt_state, step_fn, place_batch = placed.trainable, placed.frozen, placed.opt_state, placed.step, placed.place_batch
    else:
        trainable = trainer.fresh_copy(trainable)  # the step donates it; the base tree stays valid
        opt_state, place_batch = tx.init(trainable), lambda b: b
        step_fn = training.make_train_step(loss_fn, tx, with_metrics=with_metrics)
    ckpt = checkpoint.Manager(out / "checkpoints", keep=args.keep_checkpoints, base=base, base_name=str(args.model))
    start = min(ckpt.latest_step() or 0, steps * args.grad_accum)
    if start:
        try:
            restored, _ = ckpt.restore(start, {"trainable": trainable, "opt_state": opt_state})
        except hf_io.CheckpointError as e:
            ckpt.close()
            raise UsageError(f"{e}; or rerun with --overwrite to start the run afresh") from None
        trainable, opt_state = restored["trainable"], restored["opt_state"]
    return Training(mask, method_cfg, trainable, frozen, opt_state, step_fn, place_batch, optim, steps, ckpt, start, n_train, n_total)


def train(args: argparse.Namespace, task: tasks.Task, run: Training, make_batch: Any, count_tokens: Any, out: Path, results: dict,
          clock: Phases, rollout: bool = False, host_metrics: Any = None, curves: Sequence[str] = ()) -> dict:
    """Run `trainer.fit` from the restored step to the end, checkpointing, then plot the logged curves (`loss.png`: the loss
    and `curves`, across restarts) and save the outputs (`save_outputs`); returns the trained tree."""
    def save(step, trainable, opt_state):
        run.ckpt.save(step, {"trainable": trainable, "opt_state": opt_state}, {"seed": args.seed, "method": args.method, "model": args.model})

    total = run.steps * args.grad_accum
    clock.lap("setup")
    t0 = time.perf_counter()
    try:
        trainable, opt_state, _ = trainer.fit(
            run.step_fn, run.trainable, run.opt_state, run.frozen, make_batch, count_tokens, total,
            seed=args.seed, out=out, schedule=trainer.learning_rate(run.optim, run.steps), grad_accum=args.grad_accum,
            log_every=args.log_every, save=save, save_every=args.save_every or max(1, total // 4), start=run.start,
            rollout=rollout, host_metrics=host_metrics,
        )
    finally:
        run.ckpt.close()
    results["train_seconds"] = run_dir.add_train_seconds(out, time.perf_counter() - t0)
    clock.lap("train")
    history = all_history(out)  # across restarts: a resumed run still reports and plots the whole curve
    results["final_loss"] = history[-1]["loss"] if history else None
    if history:
        trainer.plot_losses(history, out / "loss.png", f"{args.method} on {Path(str(args.model)).name}", curves)
    params = sharding.gather(jpeft.combine(trainable, run.frozen)) if args.mesh else jpeft.combine(trainable, run.frozen)
    results["adapter_bytes"] = save_outputs(args, task, params, run.mask, run.method_cfg, out)
    clock.lap("save")
    return params


def all_history(out: Path) -> list[dict]:
    """Every logged step, across restarts (the last record per step wins)."""
    records = {}
    log = out / "metrics.jsonl"
    for line in (log.read_text().splitlines() if log.exists() else []):
        record = json.loads(line)
        records[record["step"]] = record
    return [records[s] for s in sorted(records)]


def fmt(scores: dict) -> str:
    """ROUGE scores on one line."""
    return " ".join(f"{k}={v:.4f}" for k, v in scores.items())


def _finish(results: dict, out: Path, rows: list[dict], base: list[str] | None, tuned: list[str] | None) -> dict:
    results["peak_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    records = []
    for i, row in enumerate(rows):
        records.append({"id": row["id"], "reference": row["reference"]})
        if base is not None:
            records[-1]["base"] = base[i]
        if tuned is not None:
            records[-1]["tuned"] = tuned[i]
    run_dir.write_jsonl(out / "predictions.jsonl", records)
    run_dir.finish(out, results)
    written = [name for name in run_dir.ARTIFACTS if (out / name).exists()]
    print(f"wrote {out}/: {', '.join(written)}")
    return results


def finetune(data: Any = None, eval_data: Any = None, **settings: Any) -> dict:
    """The command as a function: `data` is what --data takes or a `datasets.Dataset` / list of dicts; every other
    option by its Python name (`method="lora"`, `lora_r=8`, `steps=32`, ...). Returns the results dict."""
    args = parser().parse_args([])
    unknown = sorted(set(settings) - set(vars(args)))
    if unknown:
        raise TypeError(f"finetune() got unknown options {unknown}; the options are {sorted(vars(args))}")
    vars(args).update(settings)
    label = lambda d: d if d is None or isinstance(d, str) else str(d) if isinstance(d, os.PathLike) else f"<{type(d).__name__}>"  # noqa: E731
    args.data, args.eval_data = label(data), label(eval_data)  # what run.json records; the rows' hash says the rest
    return run(args, data, eval_data)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user mistakes become one line on stderr and exit status 2."""
    args = parser().parse_args(argv)
    code, results = guarded(run, args)
    if code == 0 and not args.plan:
        print(json.dumps({k: results.get(k) for k in ("method", "base", "tuned", "trainable_params", "train_seconds")}, indent=2))
    return code


def guarded(fn, *args) -> tuple[int, Any]:
    """(0, fn(*args)), or (2, None) after printing a user mistake as one `error:` line (JPEFT_DEBUG=1 re-raises)."""
    try:
        return 0, fn(*args)
    except (UsageError, hf_io.CheckpointError, ValueError) as e:
        if os.environ.get("JPEFT_DEBUG") and not isinstance(e, UsageError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2, None


if __name__ == "__main__":
    sys.exit(main())
