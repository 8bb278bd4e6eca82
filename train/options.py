"""Command-line options of `train.summarize` and `train.lab`, and the checks that run before anything loads."""

from __future__ import annotations

import argparse
import math
from typing import Any

from train import tasks
from train.data import INPUT_FIELD, TARGET_FIELD
from train.errors import UsageError

METHODS = ("none", "full", "lora", "dora", "loha", "lokr", "prompt", "ptuning", "prefix", "ia3", "adapter", "selective")
LAB_METHODS = ("none", "full", "lora", "dora", "loha", "lokr", "qlora", "prompt", "ptuning", "prefix", "ia3", "adapter")
PROMPT_LOOKUP = 0  # evaluation's default draft count (see benchmarks/README.md, generate_real)
# Lab entries that are another method with settings of their own.
LAB_VARIANTS = {"qlora": {"method": "lora", "quantize": "nf4"}}
# Each lab method's learning rate when --lr is not given: the rates HF PEFT's examples and the methods' papers use
# for AdamW (LoRA's is the DialogSum course's; a soft prompt needs a rate ~30x LoRA's to move in a short budget).
LEARNING_RATES = {"full": 5e-5, "lora": 1e-3, "qlora": 1e-3, "dora": 1e-3, "loha": 1e-3, "lokr": 1e-3, "ia3": 3e-3,
                  "adapter": 1e-3, "prompt": 3e-2, "prefix": 1e-2, "ptuning": 1e-3, "selective": 1e-4}
GGUF_EXPORTS = ("adapter", "merged")  # --export-gguf: llama.cpp's LoRA adapter (f32), the merged model (f16)


class Formatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default in its help line; flags (on or off) and options
    whose default is no value say theirs in words, in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = action.nargs == 0  # store_true / store_false: "(default: True)" would read as if the flag were given
        unset = action.default is None or action.default is argparse.SUPPRESS or action.default in ("", [])
        if "%(default)" in text or "(default:" in text or flag or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parser(prog: str, description: str, lab: bool = False) -> argparse.ArgumentParser:
    """All options; the lab's parser takes `--methods` (several) instead of `--method`, and its own `--out` default."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=Formatter)
    g = p.add_argument_group("model and data")
    add_model_and_data(g)
    g.add_argument("--data", help="directory with train/validation .jsonl/.json/.csv/.parquet files, one such file, or a hub "
                   "dataset name such as knkarthick/dialogsum (default: the bundled sample in train/sample_data)")
    g.add_argument("--eval-data", help="separate evaluation file or directory (default: --data's validation split, or 10%% of a single file)")
    g = p.add_argument_group("method")
    if lab:
        g.add_argument("--methods", default=",".join(LAB_METHODS),
                       help=f"comma-separated, from {', '.join(lab_methods())} (qlora: lora on an NF4 base)")
        g.add_argument("--ranks", default="", help="LoRA rank study: comma-separated ranks, each a LoRA run at the same alpha/r "
                       "(e.g. 4,8,16,32,64)")
    else:
        g.add_argument("--method", default="lora", help=f"one of {', '.join(METHODS)}")
    g.add_argument("--lora-r", type=int, default=16, help="rank of LoRA, DoRA, LoHa and LoKr")
    g.add_argument("--lora-alpha", type=float, default=32, help="alpha of LoRA, DoRA, LoHa and LoKr (scale alpha/r, or alpha/sqrt(r) with --rslora)")
    g.add_argument("--lora-targets", help="LoRA, DoRA, LoHa, LoKr: comma-separated module names, or all-linear (default: q,v for T5, "
                   "q_proj,v_proj for Llama and Gemma)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on LoRA's and DoRA's input")
    g.add_argument("--rslora", action="store_true", help="rank-stabilised scale alpha/sqrt(r)")
    g.add_argument("--lora-init", default="default", choices=["default", "gaussian", "pissa"], help="initialisation of A and B")
    g.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt tuning, P-tuning, prefix tuning: virtual tokens")
    g.add_argument("--encoder-type", default="mlp", choices=["mlp", "lstm"], help="P-tuning: the prompt encoder")
    g.add_argument("--prefix-projection", action="store_true", help="prefix tuning: reparameterise the prefix by an MLP (PEFT's prefix_projection)")
    g.add_argument("--encoder-hidden-size", type=int, help="P-tuning's prompt encoder / prefix tuning's projection: hidden width "
                   "(default: the model's)")
    g.add_argument("--prompt-init", default="vocab", choices=["random", "vocab", "text"], help="prompt tuning: initialisation")
    g.add_argument("--prompt-init-text", default="Summarize the following conversation.", help="prompt tuning: text for --prompt-init text")
    g.add_argument("--ia3-targets", help="comma-separated (default: k,v,wo for T5, k_proj,v_proj,down_proj for Llama, "
                   "q_proj,v_proj,down_proj for Gemma)")
    g.add_argument("--ia3-feedforward", help="comma-separated feed-forward targets (default: wo for T5, down_proj for Llama and Gemma)")
    g.add_argument("--adapter-kind", default="houlsby", choices=["houlsby", "pfeiffer"], help="bottleneck adapter placement")
    g.add_argument("--adapter-reduction", type=int, default=16, help="bottleneck adapter: d_model / bottleneck width")
    g.add_argument("--select-modules", help="selective: comma-separated module names to train")
    g.add_argument("--select-layer-norms", action="store_true", help="selective: train every norm")
    g.add_argument("--select-last-blocks", type=int, help="selective: train the last N blocks of each stack")
    add_quantize(g)
    g.add_argument("--modules-to-save", default="", help="comma-separated modules trained in full beside the method (default: none)")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adafactor"], help="optax optimizer")
    if lab:
        rates = ", ".join(f"{m} {lr:g}" for m, lr in LEARNING_RATES.items())
        g.add_argument("--lr", type=float, help=f"peak learning rate for every method (default: each method's own: {rates}; the rank "
                                                "study's runs: lora's)")
    else:
        g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"], help="decay after warmup")
    g.add_argument("--clip-norm", type=float, default=1.0, help="global gradient norm clip (0: none)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    g.add_argument("--steps", type=int, help="optimizer steps (default: --epochs worth)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training data when --steps is not given")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="how the frozen base is stored and computed in: bfloat16 halves its memory (what trains, and the "
                        "optimizer state, stay float32 master copies)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 compute over a float32-stored base (--dtype bfloat16 also "
                   "stores the base in bfloat16)")
    g.add_argument("--no-remat", dest="remat", action="store_false",
                   help="store every layer's activations instead of recomputing them in the backward pass (more memory; "
                        "default: recompute)")
    g.add_argument("--no-pack", dest="pack", action="store_false",
                   help="decoder-only models: one example per row instead of packing each batch's examples into few rows "
                        "(default: pack)")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, batches and dropout")
    g.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,model=2 (default: one device)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-samples", type=int, default=50, help="validation examples scored before and after (0: no evaluation)")
    g.add_argument("--skip-base-eval", action="store_true", help="score only the tuned model")
    add_decoding(g)
    g.add_argument("--out", default="runs/lab" if lab else "runs/summarize", help="run directory (resumed when restarted with the same settings)")
    g.add_argument("--overwrite", action="store_true", help="start --out afresh, deleting its earlier run")
    g.add_argument("--log-every", type=int, default=1, help="log the loss every N micro-steps")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N micro-steps (0: about 4 per run)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept on disk")
    g.add_argument("--merge", action="store_true", help="also save the merged model (LoRA, DoRA, IA3, LoHa, LoKr)")
    g.add_argument("--export-gguf", type=_gguf_exports, default=[], metavar="{adapter,merged}",
                   help="also write llama.cpp GGUF files beside the adapter (comma list): adapter.gguf (the LoRA, for "
                        "Llama(lora_path=...)) and/or merged.gguf (the tuned model, f16); decoder-only models only"
                        + ("; in the lab, each run that can (default: none)" if lab else " (default: none)"))
    return p


def add_model_and_data(g: Any) -> None:
    """The model, its prompt and the data's columns: shared by `train.summarize`, `train.lab` and `train.generate`."""
    g.add_argument("--model", default="smollm2-135m-instruct", help="HF directory, hub id, .gguf file, or a packaged model: smollm2-135m-instruct, gemma3-270m")
    g.add_argument("--chat-template", default="auto", choices=["auto", "yes", "no"],
                   help="put prompts through the tokenizer's chat template (auto: packaged models know whether they are "
                        "instruct models; others use the template when their tokenizer has one)")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    g.add_argument("--input-field", default=INPUT_FIELD, help="column holding the text to summarize")
    g.add_argument("--target-field", default=TARGET_FIELD, help="column holding the reference summary")
    g.add_argument("--prompt", default=tasks.PROMPT, help="prompt template; {input} marks where each input goes (default: %(default)r)")
    g.add_argument("--max-source-len", type=int, default=384, help="prompt tokens (the input is cut to fit)")
    g.add_argument("--max-target-len", type=int, default=64, help="target tokens, for training and generation")


def add_quantize(g: Any) -> None:
    """--quantize: the frozen base kept quantized."""
    g.add_argument("--quantize", choices=["nf4", "int8", "gguf"],
                   help="keep the frozen base quantized (QLoRA): nf4 or int8 as bitsandbytes makes them (every dense weight but "
                        "the LM head), or gguf to keep a .gguf model's own blocks packed (default: none, the base stays float)")


def add_decoding(g: Any) -> None:
    """How summaries are generated: batch size and prompt-lookup drafts."""
    g.add_argument("--eval-batch-size", type=int, default=16, help="examples per generation batch")
    g.add_argument("--prompt-lookup", type=int, default=PROMPT_LOOKUP, metavar="N",
                   help="decoder-only models: each decoding pass also checks up to N tokens copied from the prompt's own n-grams "
                        "(the same summaries in fewer passes; 0: one token per pass) (default: %(default)s)")


def _gguf_exports(text: str) -> list[str]:
    chosen = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))  # a list: run.json records it as one
    bad = [t for t in chosen if t not in GGUF_EXPORTS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(GGUF_EXPORTS)} (comma-separated)")
    return chosen


def lab_methods() -> tuple[str, ...]:
    """What the lab's --methods takes: every method and the lab's variants (qlora)."""
    return (*METHODS, *LAB_VARIANTS)


def method_list(text: str) -> list[str]:
    """The lab's `--methods`, each checked."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UsageError("--methods names no method")
    for m in methods:
        if m not in lab_methods():
            raise UsageError(f"unknown method {m!r}; choose from {', '.join(lab_methods())}")
    if len(set(methods)) < len(methods):
        raise UsageError(f"--methods {text!r} names a method twice")
    return methods


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def at_least(args: argparse.Namespace, minimum: float, *names: str) -> None:
    """Each named option, where given, is at least `minimum`."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= minimum:  # `not >=` also catches NaN
            raise UsageError(f"--{name.replace('_', '-')} must be at least {minimum:g}, got {value}")


def check(args: argparse.Namespace) -> None:
    """Every mistake visible in the options alone: budgets, ranges, the prompt template and the mesh."""
    check_method(args.method)
    at_least(args, 1, "batch_size", "grad_accum", "steps", "max_source_len", "max_target_len", "eval_batch_size", "lora_r",
              "num_virtual_tokens", "encoder_hidden_size", "adapter_reduction", "select_last_blocks", "log_every", "keep_checkpoints")
    at_least(args, 0, "eval_samples", "prompt_lookup", "warmup_steps", "save_every", "weight_decay", "clip_norm")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise UsageError(f"--epochs must be a positive number, got {args.epochs}")
    if not args.lora_alpha > 0:
        raise UsageError(f"--lora-alpha must be positive, got {args.lora_alpha}")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.steps is not None and args.warmup_steps >= args.steps:
        raise UsageError(f"--warmup-steps {args.warmup_steps} leaves no training after warmup in --steps {args.steps}")
    tasks.check_prompt(args.prompt)
    check_quantize(args)
    if getattr(args, "memory_budget", None):
        from jpeft import planning

        try:
            planning.parse_bytes(args.memory_budget)
        except ValueError as e:
            raise UsageError(f"--memory-budget {args.memory_budget}: {e}") from None
    if args.mesh:
        check_mesh(args.mesh)


def check_quantize(args: argparse.Namespace) -> None:
    """--quantize gguf needs a .gguf model, and a quantized base never trains in full."""
    from jpeft.models import registry

    if args.quantize == "gguf" and not str(registry.resolve(args.model)).endswith(".gguf"):
        raise UsageError(f"--quantize gguf keeps a .gguf file's blocks packed, but --model {args.model} is not a .gguf file; "
                         "use --quantize nf4 or int8")
    if args.quantize and getattr(args, "method", None) == "full":
        raise UsageError(f"--method full trains every weight, but --quantize {args.quantize} keeps the base frozen and quantized; "
                         "use lora, ia3, prompt or adapter")


def check_mesh(spec: str) -> None:
    """The mesh parses and fits the devices JAX sees (building a mesh loads no model)."""
    from jpeft import sharding

    try:
        sharding.mesh_from_string(spec)
    except ValueError as e:
        raise UsageError(f"--mesh {spec}: {e}") from None
