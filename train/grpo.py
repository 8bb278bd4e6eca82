"""Tune a decoder-only model for summarization by GRPO with any jpeft method: sampled summaries scored by a reward.

    python -m train.grpo --model smollm2-135m-instruct --method lora --reward rouge --data ../shared/data/dialogsum --steps 32

Each rollout samples --group summaries of --batch-size prompts with the policy being trained (jitted, KV-cached),
rewards each (rouge: ROUGE-L F1 against the reference summary), normalises the rewards within each prompt's group,
and takes --num-iterations optimizer steps on TRL's clipped objective, with a --beta KL term to the base with the
adapter switched off (one copy of the model). Data, prompts, evaluation (ROUGE of greedy summaries before and after),
run directories, resume, plots and adapter export are `train.summarize`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from jpeft.models.sampling import Sampling
from jpeft.training import grpo as jgrpo
from train import options, run_dir, summarize, tasks
from train.errors import UsageError

CURVES = ("reward", "kl")  # plotted beside the loss


def rouge_reward(prompts: list[str], completions: list[str], reference: list[str]) -> list[float]:
    """ROUGE-L F1 of each completion against its reference summary (rouge-score, stemming on)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(ref, text)["rougeL"].fmeasure for text, ref in zip(completions, reference)]


REWARDS = {"rouge": rouge_reward}


def parser() -> argparse.ArgumentParser:
    """`train.summarize`'s options, plus the reward, the rollouts and TRL's GRPO settings."""
    p = options.parser("jpeft-grpo", __doc__)
    p.set_defaults(out="runs/grpo")
    g = p.add_argument_group("GRPO")
    g.add_argument("--reward", default="rouge", choices=sorted(REWARDS), help="rouge: ROUGE-L F1 against the reference summary")
    g.add_argument("--group", type=int, default=4, help="completions sampled per prompt (TRL's num_generations)")
    g.add_argument("--num-iterations", type=int, default=1, help="optimizer steps per rollout batch")
    g.add_argument("--beta", type=float, default=0.0, help="weight of the KL term to the adapter-off base (0: no reference pass)")
    g.add_argument("--epsilon", type=float, default=0.2, help="clip range of the probability ratio")
    g.add_argument("--epsilon-high", type=float, help="upper clip range (default: --epsilon)")
    g.add_argument("--loss-type", default="dapo", choices=list(jgrpo.LOSS_TYPES), help="how token losses are averaged (TRL's)")
    g.add_argument("--scale-rewards", default="group", choices=list(jgrpo.SCALES), help="advantages divided by the group's reward std, the batch's, or none")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus mass")
    return p


def check(args: argparse.Namespace) -> Sampling:
    """The GRPO options on their own, before anything loads; returns the sampling settings."""
    options.at_least(args, 1, "group", "num_iterations")
    if args.group < 2:
        raise UsageError("--group must be at least 2: advantages compare the completions of one prompt")
    if args.grad_accum != 1:
        raise UsageError("--grad-accum: each rollout batch is one optimizer step here; raise --batch-size instead")
    if args.method == "none":
        raise UsageError("--method none trains nothing; choose a PEFT method such as lora")
    if args.beta and args.method in ("full", "selective"):
        raise UsageError(f"--beta: the KL reference is the base with the adapter off, but --method {args.method} trains base weights")
    if args.mesh:
        raise UsageError("--mesh: GRPO runs on one device for now")
    try:
        jgrpo.check_settings(args.beta, args.epsilon, args.epsilon_high, args.loss_type, args.temperature)
        return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    except ValueError as e:
        raise UsageError(str(e)) from None


def prepare(args: argparse.Namespace) -> summarize.Prepared:
    """`train.summarize.prepare` after the GRPO options are checked."""
    check(args)
    if tasks.find_model(args.model)[0] == "t5":
        raise UsageError(f"{args.model} is an encoder-decoder (T5) model; GRPO here is for decoder-only models (Llama family, Gemma)")
    return summarize.prepare(args, command=sys.modules[__name__])


class Rollouts:
    """`make_batch(i, trainable)` for `trainer.fit`: a fresh rollout every --num-iterations micro-steps, sampled by the
    current policy with a key fixed by the seed and the rollout's number (a resumed run samples the same), and its
    reward statistics for the log."""

    def __init__(self, args: argparse.Namespace, task: tasks.Task, rows: list[dict], frozen: Any, sample: Sampling, dtype: Any):
        self.args, self.task, self.rows, self.frozen, self.sample, self.dtype = args, task, rows, frozen, sample, dtype
        self.order = np.random.default_rng(args.seed).permutation(len(rows))
        self.score = jgrpo.score(task.config, args.temperature, dtype, old=args.num_iterations > 1, reference=bool(args.beta))
        self.cached: tuple[int, dict, dict] | None = None

    def __call__(self, i: int, trainable: Any) -> dict:
        k = i // self.args.num_iterations
        if self.cached is None or self.cached[0] != k:
            self.cached = (k, *self._rollout(k, jpeft.combine(trainable, self.frozen)))
        return self.cached[1]

    def stats(self, i: int) -> dict:
        return self.cached[2]

    def _rollout(self, k: int, params: dict) -> tuple[dict, dict]:
        args, task = self.args, self.task
        n = args.batch_size
        picked = [self.rows[j] for j in np.resize(self.order, (k + 1) * n)[k * n:]]  # epochs wrap around the shuffled order
        batch = jgrpo.rollout(task.module, task.config, params, [r["source"] for r in picked], group=args.group,
                              max_new_tokens=args.max_target_len, sample=self.sample, key=jax.random.fold_in(jax.random.key(args.seed), k),
                              max_prompt_len=args.max_source_len, dtype=self.dtype)
        completions = np.where(batch["targets"] >= 0, batch["targets"], task.pad_id)
        texts = tasks.decode(task, completions)
        prompts = [task.tokenizer.decode(r["source"], skip_special_tokens=True) for r in picked for _ in range(args.group)]
        rewards = jgrpo.text_rewards(REWARDS[args.reward], prompts, texts, args.group,
                                     reference=[r["reference"] for r in picked for _ in range(args.group)])
        batch["advantages"] = jgrpo.advantages(rewards, args.group, args.scale_rewards)
        batch = {key: jnp.asarray(v) for key, v in batch.items()}
        batch.update(self.score(params, batch))
        return batch, {"reward": float(rewards.mean()), "reward_std": float(rewards.std())}


def run(args: argparse.Namespace) -> dict:
    """The whole job: check, load, score the base, train by GRPO, score the tuned model, write results."""
    return summarize.run_prepared(args, prepare(args), execute)


def execute(args: argparse.Namespace, prepared: summarize.Prepared) -> dict:
    """Load the model, score the base, train by GRPO, score the tuned model, write results (after `prepare`)."""
    train_rows, eval_rows = prepared.train_rows, prepared.eval_rows
    sample = check(args)
    out = Path(args.out)
    run_dir.reset_peak_memory()
    clock = summarize.Phases()
    _, dtype = summarize.compute_dtypes(args)
    task, base = summarize.load(args)
    with summarize.warnings_to_stderr():
        train_enc = tasks.encode(task, train_rows, args.max_source_len, args.max_target_len, args.prompt)
        eval_enc = tasks.encode(task, eval_rows[: args.eval_samples], args.max_source_len, args.max_target_len, args.prompt)
    results: dict[str, Any] = {"method": args.method, "model": args.model, "reward": args.reward, "eval_examples": len(eval_enc),
                               "phase_seconds": clock.seconds}
    clock.lap("load")
    base_preds = None
    if args.eval_samples > 0 and not args.skip_base_eval:
        results["base"], base_preds = summarize._score(task, base, eval_enc, args, dtype, "eval base")
        print(f"base ROUGE: {summarize.fmt(results['base'])}")
        clock.lap("base_eval")

    rollouts_per_epoch = max(1, len(train_enc) // args.batch_size)
    steps = args.steps or max(1, int(args.epochs * rollouts_per_epoch * args.num_iterations))
    loss_fn = jgrpo.grpo_loss(task.config, args.beta, args.epsilon, args.epsilon_high, args.loss_type, temperature=args.temperature,
                              max_completion_length=args.max_target_len, dtype=dtype,
                              lora_dropout=args.lora_dropout if args.method in ("lora", "dora") else 0.0, remat=args.remat)
    run = summarize.setup(args, task, base, loss_fn, steps, out, results, with_metrics=True)
    rollouts = Rollouts(args, task, train_enc, run.frozen, sample, dtype)
    print(summarize._plan(args, len(train_enc), steps, run.n_train, run.n_total, out, run.start) +
          f"\n      each rollout: {args.batch_size} prompts x {args.group} samples, {args.num_iterations} optimizer step(s)", flush=True)
    params = summarize.train(args, task, run, rollouts, lambda b: int(np.asarray(b["attention_mask"]).sum()), out, results, clock,
                             rollout=True, host_metrics=rollouts.stats, curves=CURVES)
    tuned_preds = None
    if args.eval_samples > 0:
        results["tuned"], tuned_preds = summarize._score(task, params, eval_enc, args, dtype, "eval tuned")
        print(f"tuned ROUGE: {summarize.fmt(results['tuned'])}")
        clock.lap("tuned_eval")
    return summarize._finish(results, out, eval_enc, base_preds, tuned_preds)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user mistakes become one line on stderr and exit status 2."""
    code, results = summarize.guarded(run, parser().parse_args(argv))
    if code == 0:
        print(json.dumps({k: results.get(k) for k in ("method", "reward", "base", "tuned", "train_seconds")}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
