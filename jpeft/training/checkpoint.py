"""Training-state checkpoints with Orbax: the trainable part only, plus a reference to the frozen base.

A state is any pytree the training loop owns, e.g. `{"trainable": ..., "opt_state": ..., "rng": key,
"data_position": 1234}`; the frozen base is not saved, only its name and fingerprint (parameter names
and shapes), which `restore` checks. Saves run in the background (`wait` blocks until they are on
disk); each step is written to a temporary directory and renamed when complete, so a killed run
leaves either a whole checkpoint or none that counts, and only the newest `keep` are kept.

    ckpt = checkpoint.Manager("runs/x/checkpoints", keep=3, base=params, base_name="google/flan-t5-base")
    if (step := ckpt.latest_step()) is not None:
        state, meta = ckpt.restore(step, state)
    ...
    ckpt.save(step, state, {"loss": float(loss)})
    ckpt.close()
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jpeft.formats.hf_io import CheckpointError
from jpeft.formats.peft_format import base_fingerprint


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_host(state: Any) -> Any:
    """A host copy with typed PRNG keys as their raw data (Orbax stores plain arrays).

    The copy is taken before `save` returns, so a train step that donates these buffers right after
    cannot change what the background write sees.
    """
    def host(x):
        if _is_key(x):
            x = jax.random.key_data(x)
        return np.array(jax.device_get(x)) if isinstance(x, (jax.Array, np.ndarray)) else x

    return jax.tree.map(host, state)


def _leaf_shapes(tree: Any) -> dict[str, tuple]:
    """{dotted leaf name ("trainable.q.lora_a"), as Orbax names them: shape} of a state tree or of its saved metadata."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _restore_keys(restored: Any, target: Any) -> Any:
    return jax.tree.map(lambda r, t: jax.random.wrap_key_data(r, impl=jax.random.key_impl(t)) if _is_key(t) else r, restored, target)


def _key_data_target(target: Any) -> Any:
    return jax.tree.map(lambda t: jax.random.key_data(t) if _is_key(t) else t, target)


class Manager:
    """Keeps the newest `keep` training states under `directory`; one per step, saved asynchronously."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, base: Mapping[str, Any] | str | None = None,
                 base_name: str | None = None, async_save: bool = True):
        """`base`: the frozen parameter tree (or its fingerprint) that restored states must belong to."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.base = {"name": base_name, "fingerprint": base if isinstance(base, str) or base is None else base_fingerprint(base)}
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, metadata: Mapping[str, Any] | None = None) -> None:
        """Start writing `state` (and JSON-able `metadata`) as checkpoint `step`; returns once the arrays are copied."""
        meta = {"step": int(step), "base": self.base, "user": dict(metadata or {})}
        args = ocp.args.Composite(state=ocp.args.StandardSave(_to_host(state)), meta=ocp.args.JsonSave(meta))
        self._manager.save(int(step), args=args, force=True)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None, target: Any) -> tuple[Any, dict]:
        """(state shaped like `target`, user metadata) of checkpoint `step` (None: the newest); checks the base first."""
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise CheckpointError(f"{self.directory} has no complete checkpoint for step {step} (it has {self.all_steps()})")
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise self._damaged(step, e) from None
        saved, ours = meta["base"].get("fingerprint"), self.base["fingerprint"]
        if saved and ours and saved != ours:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} was trained on base {meta['base'].get('name')!r} (fingerprint {saved[:12]}), "
                f"but this run's base {self.base['name']!r} has fingerprint {ours[:12]}: parameter names or shapes differ"
            )
        plain = _key_data_target(target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(plain))).state
        except (ValueError, KeyError, TypeError, OSError) as e:
            saved, wanted = self._saved_leaves(step), _leaf_shapes(plain)
            if saved is None or saved == wanted:  # the files cannot be read, or hold the right leaves but not their values
                raise self._damaged(step, e) from None
            differences = [f"{what} {names[:3]}" for what, names in (
                ("leaves only in the checkpoint", sorted(set(saved) - set(wanted))), ("leaves only in the target", sorted(set(wanted) - set(saved))),
                ("leaves of other shapes (saved, target)", [(k, saved[k], wanted[k]) for k in sorted(set(saved) & set(wanted)) if saved[k] != wanted[k]]),
            ) if names]
            raise CheckpointError(f"checkpoint {self.directory}/{step} holds another state than the one asked for: "
                                  f"{'; '.join(differences)}") from None
        return _restore_keys(restored, target), meta["user"]

    def _saved_leaves(self, step: int) -> dict[str, tuple] | None:
        """{name: shape} of the leaves checkpoint `step` holds, from its metadata; None if that cannot be read."""
        try:
            with ocp.StandardCheckpointer() as reader:
                found = reader.metadata(self.directory / str(step) / "state").item_metadata
        except (ValueError, KeyError, TypeError, OSError):
            return None
        return None if found is None else _leaf_shapes(found.tree)

    def _damaged(self, step: int, error: Exception) -> CheckpointError:
        """The error for a checkpoint whose files cannot be read, saying how to go on."""
        earlier = [s for s in self.all_steps() if s < step]
        way_on = (f"delete {self.directory / str(step)} to go on from step {earlier[-1]}, the checkpoint before it" if earlier
                  else f"no earlier checkpoint is kept in {self.directory}: start again without it")
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return CheckpointError(f"checkpoint {self.directory}/{step} is damaged ({first_line}): a file in it was cut short or "
                               f"changed after it was written; {way_on}")

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release Orbax's background threads."""
        self._manager.close()

    def __enter__(self) -> "Manager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
