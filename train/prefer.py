"""Preference-tune a decoder-only model (DPO, IPO, hinge, robust DPO, SimPO, ORPO) with any jpeft method.

    python -m train.prefer --model smollm2-135m-instruct --method lora --loss dpo --data prefs.jsonl
    python -m train.prefer --data pairs/ --prompt-field question --chosen-field good --rejected-field bad --loss orpo

Each row holds a prompt and two completions, the chosen one preferred (columns prompt, chosen, rejected); --prompt
wraps each prompt ("{input}": as it is) and instruct models see it through their chat template. DPO, IPO, hinge and
robust compare with the reference, the base with the adapter switched off: one copy of the model. Held-out pairs are
scored before and after (reward accuracy and margin, TRL's metrics); --rouge-data also scores the ROUGE of greedy
summaries as `train.summarize` does. Run directories, resume, plots and adapter export are `train.summarize`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jpeft import batches, packing, training
from jpeft.training import preference
from train import data as data_lib
from train import options, run_dir, summarize, tasks, trainer
from train.errors import UsageError

LOSSES = {"dpo": "sigmoid", "sigmoid": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "simpo": "simpo", "orpo": "orpo"}
CURVES = ("rewards/margins", "rewards/accuracies")  # plotted beside the loss
TRAINS_BASE = ("full", "selective")  # methods whose trained weights are the base's own: no adapter to switch off


def parser() -> argparse.ArgumentParser:
    """`train.summarize`'s options, plus the preference loss and the data's columns."""
    p = options.parser("jpeft-prefer", __doc__)
    p.set_defaults(out="runs/prefer", prompt="{input}")
    g = p.add_argument_group("preference")
    g.add_argument("--loss", default="dpo", choices=sorted(LOSSES), help="dpo (= sigmoid), ipo, hinge, robust (label-smoothed DPO), "
                   "simpo (reference-free, length-normalised) or orpo (reference-free, SFT + odds ratio)")
    g.add_argument("--beta", type=float, default=0.1, help="the loss's beta (ORPO's lambda, IPO's tau)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="robust and simpo: the share of pairs assumed flipped")
    g.add_argument("--simpo-gamma", type=float, default=0.5, help="simpo: the target reward margin")
    g.add_argument("--sft-weight", type=float, default=0.0, help="simpo: weight of the chosen completions' cross-entropy (CPO's cpo_alpha)")
    g.add_argument("--precompute-reference", action="store_true",
                   help="score the reference once over the data before training (TRL's precompute_ref_log_probs) instead of in every step")
    g.add_argument("--prompt-field", default="prompt", help="column holding the prompt")
    g.add_argument("--chosen-field", default="chosen", help="column holding the preferred completion")
    g.add_argument("--rejected-field", default="rejected", help="column holding the other completion")
    g.add_argument("--rouge-data", help="also score ROUGE of greedy summaries before and after on this summarization data's "
                   "validation split (--input-field / --target-field columns), as train.summarize does")
    return p


def check(args: argparse.Namespace) -> None:
    """The preference options on their own, before anything loads."""
    kind = LOSSES[args.loss]
    try:
        preference.check_settings(kind, args.beta, args.label_smoothing)
    except ValueError as e:
        raise UsageError(f"--loss {args.loss}: {e}") from None
    if args.method == "none":
        raise UsageError("--method none trains nothing; choose a PEFT method such as lora")
    needs_reference = kind not in preference.REFERENCE_FREE
    if needs_reference and not args.precompute_reference and (args.method in TRAINS_BASE or args.modules_to_save):
        raise UsageError(f"--loss {args.loss} compares with the base with the adapter switched off, but --method {args.method} "
                         f"{'with --modules-to-save ' if args.modules_to_save else ''}trains base weights: add --precompute-reference "
                         "(the reference scored once before training) or use --loss simpo / orpo")
    if args.mesh:
        raise UsageError("--mesh: preference tuning runs on one device for now")


def prepare(args: argparse.Namespace) -> summarize.Prepared:
    """`train.summarize.prepare` for preference pairs, after the preference options are checked."""
    check(args)
    if tasks.find_model(args.model)[0] == "t5":
        raise UsageError(f"{args.model} is an encoder-decoder (T5) model; preference tuning is for decoder-only models (Llama family, Gemma)")
    return summarize.prepare(args, command=sys.modules[__name__], columns=(args.prompt_field, args.chosen_field),
                             flags=("--prompt-field", "--chosen-field"), keep=(("--rejected-field", args.rejected_field),))


def encode_pairs(task: tasks.Task, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """Token ids per pair: `source` (the framed prompt), `chosen` and `rejected` (each + EOS, cut to --max-target-len)."""
    both = [tasks.encode(task, [{**r, "reference": r[side]} for r in rows], args.max_source_len, args.max_target_len, args.prompt)
            for side in ("reference", args.rejected_field)]
    return [{"id": c["id"], "source": c["source"], "chosen": c["target"], "rejected": r["target"]} for c, r in zip(*both)]


def pair_batch(task: tasks.Task, rows: list[dict], args: argparse.Namespace, pack: bool = False, row_len: int | None = None,
               reference: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A `preference_batch` of encoded pairs; its target width is fixed (ORPO also scores the prompt), so few shapes compile."""
    orpo = LOSSES[args.loss] == "orpo"
    width = args.max_target_len + (args.max_source_len if orpo else 0)
    ref = {} if reference is None else {"ref_chosen_logps": reference[0], "ref_rejected_logps": reference[1]}
    return batches.preference_batch([r["source"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows], task.pad_id,
                                    task.eos_id, max_target=packing.round_up(width, tasks.BUCKET), pack=pack, row_len=row_len,
                                    bucket=tasks.BUCKET, score_prompt=orpo, **ref)


def _chunks(rows: list[dict], size: int) -> list[list[int]]:
    """Indices in chunks of `size` (the last one shorter)."""
    return [list(range(lo, min(lo + size, len(rows)))) for lo in range(0, len(rows), size)]


def reference_logps(task: tasks.Task, base: dict, rows: list[dict], args: argparse.Namespace, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(chosen (E,), rejected (E,)) reference log-probabilities of every pair, scored once by the base."""
    score = preference.reference_logps(task.config, dtype)
    chosen, rejected = np.zeros(len(rows), np.float32), np.zeros(len(rows), np.float32)
    for idx in _chunks(rows, args.eval_batch_size):
        values = np.asarray(score(base, pair_batch(task, [rows[i] for i in idx], args)))
        chosen[idx], rejected[idx] = values[: len(idx)], values[len(idx):]
    return chosen, rejected


def pair_metrics(loss_fn: Any, task: tasks.Task, params: dict, rows: list[dict], args: argparse.Namespace,
                 reference: tuple[np.ndarray, np.ndarray] | None) -> dict[str, float]:
    """The loss and TRL's metrics over held-out pairs (each chunk's means weighted by its pairs)."""
    scored = jax.jit(lambda p, b: loss_fn.with_metrics(p, b, None))
    totals: dict[str, float] = {}
    for idx in _chunks(rows, args.eval_batch_size):
        ref = None if reference is None else (reference[0][idx], reference[1][idx])
        loss, metrics = scored(params, pair_batch(task, [rows[i] for i in idx], args, reference=ref))
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * len(idx)
    return {k: v / len(rows) for k, v in totals.items()}


def run(args: argparse.Namespace) -> dict:
    """The whole job: check, load, score the base, train, score the tuned model, write results."""
    return summarize.run_prepared(args, prepare(args), execute)


def execute(args: argparse.Namespace, prepared: summarize.Prepared) -> dict:
    """Load the model, score the base, preference-tune, score the tuned model, write results (after `prepare`)."""
    train_rows, eval_rows = prepared.train_rows, prepared.eval_rows
    out = Path(args.out)
    run_dir.reset_peak_memory()
    clock = summarize.Phases()
    _, dtype = summarize.compute_dtypes(args)
    kind = LOSSES[args.loss]
    task, base = summarize.load(args)
    with summarize.warnings_to_stderr():
        train_enc = encode_pairs(task, train_rows, args)
        eval_enc = encode_pairs(task, eval_rows[: args.eval_samples], args)
        rouge_rows = []
        if args.rouge_data and args.eval_samples:
            summaries = data_lib.load_split(args.rouge_data, "validation", args.input_field, args.target_field)[: args.eval_samples]
            rouge_rows = tasks.encode(task, summaries, args.max_source_len, args.max_target_len, args.prompt)
    results: dict[str, Any] = {"method": args.method, "model": args.model, "loss": args.loss, "eval_pairs": len(eval_enc),
                               "phase_seconds": clock.seconds}
    clock.lap("load")

    precompute = args.precompute_reference and kind not in preference.REFERENCE_FREE
    train_ref = reference_logps(task, base, train_enc, args, dtype) if precompute else None
    eval_ref = reference_logps(task, base, eval_enc, args, dtype) if precompute and eval_enc else None
    loss_fn = training.preference_loss(task.config, kind, args.beta, label_smoothing=args.label_smoothing, gamma=args.simpo_gamma,
                                       sft_weight=args.sft_weight, precompute_reference=precompute, dtype=dtype,
                                       lora_dropout=args.lora_dropout if args.method in ("lora", "dora") else 0.0, remat=args.remat)

    def score(params: dict, label: str) -> list[str] | None:
        """Held-out pairs' metrics and, with --rouge-data, ROUGE of greedy summaries, recorded as `label` in the results."""
        predictions = None
        if eval_enc:
            results[f"{label}_pairs"] = pair_metrics(loss_fn, task, params, eval_enc, args, eval_ref)
            print(f"{label} on held-out pairs: {summarize.fmt(results[f'{label}_pairs'])}")
        if rouge_rows:
            results[label], predictions = summarize._score(task, params, rouge_rows, args, dtype, f"eval {label}")
            print(f"{label} ROUGE: {summarize.fmt(results[label])}")
        clock.lap(f"{label}_eval")
        return predictions

    base_preds = None if args.skip_base_eval else score(base, "base")
    steps = args.steps or max(1, int(args.epochs * len(train_enc) // (args.batch_size * args.grad_accum)))
    run = summarize.setup(args, task, base, loss_fn, steps, out, results, with_metrics=True)
    lengths = [len(r["source"]) + max(len(r["chosen"]), len(r["rejected"])) for r in train_enc]
    pack = args.pack and args.method not in summarize.SOFT_PROMPTS
    pairs = trainer.Batches(lengths, args.batch_size, args.seed, group=1 if pack else 32)
    row_len = packing.round_up(max(lengths), tasks.BUCKET) if pack else None

    def make_batch(i: int) -> dict:
        idx = pairs(i)
        ref = None if train_ref is None else (train_ref[0][idx], train_ref[1][idx])
        return pair_batch(task, [train_enc[j] for j in idx], args, pack, row_len, ref)

    print(summarize._plan(args, len(train_enc), steps, run.n_train, run.n_total, out, run.start), flush=True)
    params = summarize.train(args, task, run, make_batch, tasks.token_count, out, results, clock, curves=CURVES)
    tuned_preds = score(params, "tuned")
    return summarize._finish(results, out, rouge_rows, base_preds, tuned_preds)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user mistakes become one line on stderr and exit status 2."""
    code, results = summarize.guarded(run, parser().parse_args(argv))
    if code == 0:
        print(json.dumps({k: results.get(k) for k in ("method", "loss", "base_pairs", "tuned_pairs", "base", "tuned", "train_seconds")},
                         indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
