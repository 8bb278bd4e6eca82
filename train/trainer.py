"""The training loop: optimizer from options, deterministic batches, jitted steps, logging and checkpoints."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jpeft import training
from train.errors import UsageError


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer options: AdamW or Adafactor, warmup then constant/linear/cosine, clipping and accumulation."""

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    clip_norm: float | None = 1.0
    grad_accum: int = 1


def learning_rate(cfg: OptimConfig, steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then the chosen decay over the remaining optimizer steps."""
    rest = max(1, steps - cfg.warmup_steps)
    decay = {
        "constant": optax.constant_schedule(cfg.lr),
        "linear": optax.linear_schedule(cfg.lr, 0.0, rest),
        "cosine": optax.cosine_decay_schedule(cfg.lr, rest),
    }[cfg.schedule]
    if cfg.warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), decay], [cfg.warmup_steps])


def make_optimizer(cfg: OptimConfig, steps: int) -> optax.GradientTransformation:
    """The optax chain for `cfg`; with accumulation, one optimizer step per `grad_accum` micro-batches."""
    lr = learning_rate(cfg, steps)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay)
    elif cfg.name == "adafactor":
        opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None)
    else:
        raise UsageError(f"unknown optimizer {cfg.name!r}; choose adamw or adafactor")
    if cfg.clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return optax.MultiSteps(opt, cfg.grad_accum) if cfg.grad_accum > 1 else opt


class Batches:
    """Deterministic, length-grouped batches: micro-batch `i` of any run with the same seed is the same batch.

    Each epoch shuffles the examples with a seeded permutation, sorts windows of `group` batches by
    length (so a batch pads little and few shapes compile), then shuffles the batch order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 32):
        self.lengths, self.batch_size, self.seed, self.group = np.asarray(lengths), batch_size, seed, group
        self.per_epoch = len(lengths) // batch_size
        if self.per_epoch == 0:
            raise UsageError(f"--batch-size {batch_size} is larger than the {len(lengths)} training examples")
        self._plan: tuple[int, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.per_epoch * self.batch_size]
        window = self.group * self.batch_size
        chunks = [order[k : k + window] for k in range(0, len(order), window)]
        order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
        batches = order.reshape(self.per_epoch, self.batch_size)
        return batches[rng.permutation(self.per_epoch)]

    def __call__(self, i: int) -> np.ndarray:
        """Example indices of micro-batch `i`."""
        epoch, j = divmod(i, self.per_epoch)
        if self._plan is None or self._plan[0] != epoch:
            self._plan = (epoch, self._epoch(epoch))
        return self._plan[1][j]


class Diverged(UsageError):
    """The loss became NaN or infinite."""


def fit(
    step_fn: Callable,
    trainable: Any,
    opt_state: Any,
    frozen: Any,
    make_batch: Callable[[int], dict],
    count_tokens: Callable[[dict], int],
    total: int,
    *,
    seed: int,
    out: Path,
    schedule: optax.Schedule,
    grad_accum: int = 1,
    log_every: int = 1,
    save: Callable[[int, Any, Any], None] | None = None,
    save_every: int = 0,
    start: int = 0,
    rollout: bool = False,
    host_metrics: Callable[[int], dict] | None = None,
) -> tuple[Any, Any, list[dict]]:
    """Run micro-steps start..total-1; log JSON lines to out/metrics.jsonl; stop on a non-finite loss.

    A step that returns metrics (`make_train_step(..., with_metrics=True)`) has them logged beside the loss, as are
    `host_metrics(i)` (numbers the batch maker measured, such as GRPO's rewards). With `rollout`, `make_batch(i,
    trainable)` also receives the current trainable leaves (GRPO samples its batch from the policy being trained).
    """
    key = jax.random.key(seed)
    history: list[dict] = []
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", unit="step", dynamic_ncols=True)
    tokens, t0 = 0, time.perf_counter()
    compiled: dict[tuple, Any] = {}  # one executable per batch shape and dtype
    with (out / "metrics.jsonl").open("a") as log:
        for i in bar:
            batch = make_batch(i, trainable) if rollout else make_batch(i)
            tokens += count_tokens(batch)
            rng = jax.random.fold_in(key, i)  # dropout keys fixed by seed and step, so a resumed run matches
            shapes = tuple((k, np.shape(v), v.dtype) for k, v in sorted(batch.items()))
            if shapes not in compiled:
                compiled[shapes] = training.compile_step(step_fn, trainable, opt_state, frozen, batch, rng)
            trainable, opt_state, loss, *metrics = compiled[shapes](trainable, opt_state, frozen, batch, rng)
            last = i + 1 == total
            saving = save is not None and save_every and ((i + 1) % save_every == 0 or last)
            if (i + 1) % log_every == 0 or last or saving:
                loss = float(loss)  # the only host sync; a checkpoint is written only after its loss is checked
                if not math.isfinite(loss):
                    raise Diverged(f"loss became {loss} at step {i + 1}; the last good checkpoint is kept in {out / 'checkpoints'}")
                elapsed = time.perf_counter() - t0
                record = {"step": i + 1, "loss": loss, "lr": float(schedule((i + 1) // grad_accum)),
                          "tokens_per_s": tokens / elapsed, "elapsed_s": elapsed,
                          **{k: float(v) for k, v in (metrics[0] if metrics else {}).items()}, **(host_metrics(i) if host_metrics else {})}
                history.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if saving:
                save(i + 1, trainable, opt_state)
    return trainable, opt_state, history


def plot_losses(history: list[dict], file: Path, title: str, curves: Sequence[str] = ()) -> None:
    """Loss against step as a PNG, with a panel beside it for each of `curves` (logged metrics such as rewards/margins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["loss", *(c for c in curves if any(c in h for h in history))]
    fig, axes = plt.subplots(1, len(names), figsize=(6 + 4 * (len(names) - 1), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [(h["step"], h[name]) for h in history if name in h]
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss" if name == "loss" else name)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def fresh_copy(tree: Any) -> Any:
    """Fresh buffers for a tree the jitted step will donate, so the caller's arrays stay valid."""
    return jax.tree.map(jnp.copy, tree)

