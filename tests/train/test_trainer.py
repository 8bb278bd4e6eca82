"""Batches, optimizer options and the schedule."""

from __future__ import annotations

import numpy as np
import pytest

from train import trainer
from train.errors import UsageError


def test_batches_are_deterministic_cover_each_epoch_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 500, size=1000)
    a, b = trainer.Batches(lengths, 8, seed=1), trainer.Batches(lengths, 8, seed=1)
    epoch = [a(i) for i in range(125)]
    assert all(np.array_equal(x, b(i)) for i, x in enumerate(epoch))
    assert sorted(np.concatenate(epoch).tolist()) == list(range(1000))
    assert not np.array_equal(a(125), epoch[0])  # a new epoch reshuffles
    spread = np.mean([np.ptp(lengths[x]) for x in epoch])
    assert spread < 0.2 * np.ptp(lengths)  # grouped: each batch holds similar lengths
    assert not np.array_equal(trainer.Batches(lengths, 8, seed=2)(0), epoch[0])


def test_batch_larger_than_data_is_a_usage_error():
    with pytest.raises(UsageError, match="larger than the 3 training examples"):
        trainer.Batches([5, 6, 7], 8, seed=0)


def test_schedule_warms_up_then_decays():
    cfg = trainer.OptimConfig(lr=1.0, warmup_steps=10, schedule="linear")
    lr = trainer.learning_rate(cfg, 110)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1.0) and float(lr(60)) == pytest.approx(0.5)
    with pytest.raises(UsageError, match="unknown optimizer"):
        trainer.make_optimizer(trainer.OptimConfig(name="sgdx"), 10)
