"""Orbax training-state checkpoints: exact resume after SIGKILL, keep-last-K, typed keys, base checks, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jpeft
from jpeft import checkpoint, lora, peft_format
from jpeft.formats.hf_io import CheckpointError
from tests.conftest import damage_file, make_hf_t5

SCRIPT = Path(__file__).with_name("resume_script.py")
STEPS = 10


def _run(args, env, **kwargs):
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, **kwargs)


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    base = tmp_path / "base"
    make_hf_t5(base, feed_forward_proj="gated-gelu", num_layers=1, num_decoder_layers=1, num_heads=2)
    # The three runs compile the same step: share XLA's persistent cache so only the first pays for it.
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "JAX_PLATFORMS": "cpu"}

    reference = _run([base, tmp_path / "ref_ckpt", tmp_path / "ref.npz", STEPS, 0], env)
    assert reference.wait(timeout=300) == 0

    run = _run([base, tmp_path / "ckpt", tmp_path / "out.npz", STEPS, 0.3], env)
    for line in run.stdout:  # kill once a few steps are done, with a save of the latest step likely in flight
        if line.strip() == "step 4":
            run.send_signal(signal.SIGKILL)
            break
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL and not (tmp_path / "out.npz").exists()
    survived = checkpoint.Manager(tmp_path / "ckpt").all_steps()
    assert survived and max(survived) < STEPS

    resumed = _run([base, tmp_path / "ckpt", tmp_path / "out.npz", STEPS, 0], env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0
    first = out.splitlines()[0]
    assert first.startswith("resumed ") and 1 <= int(first.split()[1]) < STEPS, out

    ref, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "out.npz")
    assert sorted(ref.files) == sorted(got.files) and ref.files
    assert max(float(np.abs(ref[k] - got[k]).max()) for k in ref.files) <= 1e-6
    assert checkpoint.Manager(tmp_path / "ckpt").all_steps() == [STEPS - 2, STEPS - 1, STEPS]  # keep=3


@pytest.fixture
def state(flan):
    params = lora.inject(flan.params, lora.LoraConfig(r=2, target_modules=["q"]), jax.random.key(0))
    trainable, _ = jpeft.partition(params, jpeft.trainable_mask(params))
    tx = optax.adam(1e-3)
    return {"trainable": trainable, "opt_state": tx.init(trainable), "rng": jax.random.key(7), "data_position": 3}


def test_save_restore_round_trip_and_keep(flan, state, tmp_path):
    with checkpoint.Manager(tmp_path / "c", keep=2, base=flan.params, base_name="tiny-flan") as ckpt:
        assert ckpt.latest_step() is None
        for step in range(1, 5):
            bumped = {**state, "data_position": step, "trainable": jax.tree.map(lambda x: x + step, state["trainable"])}
            ckpt.save(step, bumped, {"loss": 1.0 / step})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
        restored, meta = ckpt.restore(None, state)
    assert meta == {"loss": 0.25} and restored["data_position"] == 4
    assert jax.tree.structure(restored) == jax.tree.structure(state)  # optax's namedtuples come back as such
    assert jax.random.key_impl(restored["rng"]) == jax.random.key_impl(state["rng"])
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))
    for got, want in zip(jax.tree.leaves(restored["trainable"]), jax.tree.leaves(state["trainable"])):
        np.testing.assert_array_equal(got, want + 4)
    # The base itself is not saved, only a reference to it beside the state.
    meta = json.loads((tmp_path / "c" / "4" / "meta" / "metadata").read_text())
    assert meta["base"] == {"name": "tiny-flan", "fingerprint": peft_format.base_fingerprint(flan.params)}


def test_restore_checks_the_base_and_the_target(flan, state, tmp_path):
    with checkpoint.Manager(tmp_path / "c", base=flan.params, base_name="tiny-flan") as ckpt:
        ckpt.save(1, state)
    other = {**flan.params, "shared": {"embedding": jnp.zeros((10, 32))}}
    with checkpoint.Manager(tmp_path / "c", base=other, base_name="another-t5") as ckpt:
        with pytest.raises(CheckpointError, match=r"trained on base 'tiny-flan'.*this run's base 'another-t5'"):
            ckpt.restore(1, state)
    with checkpoint.Manager(tmp_path / "c", base=flan.params) as ckpt:
        with pytest.raises(CheckpointError, match="no complete checkpoint for step 5"):
            ckpt.restore(5, state)
        wrong = {**state, "trainable": {"x": jnp.zeros(3)}}
        with pytest.raises(CheckpointError, match=r"holds another state than the one asked for: leaves only in the checkpoint "
                                                  r"\['trainable.decoder.*; leaves only in the target \['trainable.x'\]"):
            ckpt.restore(1, wrong)
        wider = {**state, "trainable": jax.tree.map(lambda x: jnp.zeros((*x.shape[:-1], 2 * x.shape[-1])), state["trainable"])}
        with pytest.raises(CheckpointError, match=r"holds another state than the one asked for: leaves of other shapes \(saved, target\) "
                                                  r"\[\('trainable.decoder.block.0.layer.0.SelfAttention.q.lora_a', \(32, 2\), \(32, 4\)\)"):
            ckpt.restore(1, wider)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.Manager(tmp_path / "empty").restore(None, state)


@pytest.mark.parametrize("damaged", ["meta/metadata", "state/_METADATA", "state/d"])
def test_a_damaged_checkpoint_says_so_and_the_one_before_it_restores(state, tmp_path, damaged):
    with checkpoint.Manager(tmp_path / "c", keep=3) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
    file = tmp_path / "c" / "2" / damaged
    damage_file(file if file.is_file() else sorted(file.iterdir())[0], "truncate")  # state/d: the arrays' data
    with checkpoint.Manager(tmp_path / "c", keep=3) as ckpt:
        with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path}/c/2 is damaged \(.+\): a file in it was cut short or changed "
                                                  rf"after it was written; delete {tmp_path}/c/2 to go on from step 1, the checkpoint before it"):
            ckpt.restore(2, state)
    shutil.rmtree(tmp_path / "c" / "2")
    with checkpoint.Manager(tmp_path / "c", keep=3) as ckpt:
        restored, _ = ckpt.restore(None, state)
    assert ckpt.latest_step() == 1 and restored["data_position"] == 3


def test_save_copies_before_returning(state, tmp_path):
    """A donated buffer can be overwritten right after save(); the checkpoint must hold the values at save time."""
    step = jax.jit(lambda t: jax.tree.map(lambda x: x * 0 - 1, t), donate_argnums=0)
    with checkpoint.Manager(tmp_path / "c") as ckpt:
        trainable = jax.tree.map(jnp.copy, state["trainable"])
        want = jax.tree.map(np.array, trainable)
        ckpt.save(1, {**state, "trainable": trainable})
        step(trainable)
        ckpt.wait()
        restored, _ = ckpt.restore(1, state)
    for got, expected in zip(jax.tree.leaves(restored["trainable"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, expected)
