"""A run directory that knows what run it holds: `run.json` records the settings, so a restart resumes only the same run.

A restart with the same settings resumes from the last checkpoint; a finished run is reported, not redone;
different settings stop with the list of what differs, before anything is loaded or overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from train.errors import UsageError

SETTINGS_FILE = "run.json"
RESULTS_FILE = "results.json"
# What a run writes: all that --overwrite deletes (nothing else in the directory is touched).
ARTIFACTS = (SETTINGS_FILE, RESULTS_FILE, "metrics.jsonl", "predictions.jsonl", "loss.png", "checkpoints", "adapter", "merged", "model")
# Options that change only what is scored, logged or kept, or how much memory a step takes, never the trained
# weights: a restart may change them.
FREE = ("out", "overwrite", "eval_data", "eval_samples", "eval_batch_size", "skip_base_eval", "prompt_lookup", "log_every", "save_every",
        "keep_checkpoints", "merge", "remat")
BUDGET = ("steps", "epochs")


def settings(args: argparse.Namespace, train_rows: list[dict]) -> dict[str, Any]:
    """The options that decide the trained weights, and a hash of the training examples themselves."""
    record = {k: v for k, v in sorted(vars(args).items()) if k not in FREE}
    text = json.dumps([[r[k] for k in sorted(r) if k != "id"] for r in train_rows], ensure_ascii=False)  # input, reference and any kept columns
    record["train_examples"] = {"count": len(train_rows), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    return record


def write_json(file: Path, value: Any) -> None:
    """Write JSON atomically: a crash leaves the old file or the new one, never half of either."""
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, file)


def write_jsonl(file: Path, records: list[dict]) -> None:
    """Write one JSON object per line, atomically (as `write_json`)."""
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, file)


def _read(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{file} is unreadable ({e}); use a new --out or --overwrite") from None


def recorded_settings(out: Path) -> dict[str, Any] | None:
    """The settings `out`'s run.json records, or None if `out` is no run directory."""
    return _read(out / SETTINGS_FILE).get("settings", {}) if (out / SETTINGS_FILE).is_file() else None


def _option(key: str) -> str:
    return "training data" if key == "train_examples" else f"--{key.replace('_', '-')}"


def prepare(out: Path, current: dict[str, Any], overwrite: bool, defaults: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Make `out` ready for the run `current` describes; returns the finished run's results if it already ran to the end.

    An option that a run directory does not record (one added to jpeft after the run) counts as its value in
    `defaults`, so upgrading jpeft does not orphan earlier runs.
    Budgets may grow between restarts only under a constant learning rate, where the earlier steps are the same.
    """
    if overwrite:
        for name in ARTIFACTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    file = out / SETTINGS_FILE
    if not file.is_file():
        earlier = [name for name in ARTIFACTS if (out / name).exists()]
        if earlier:
            raise UsageError(f"{out} holds an earlier run ({', '.join(earlier)}) without its {SETTINGS_FILE}, so it cannot be resumed "
                             "safely; use a new --out, or --overwrite to delete it")
        write_json(file, {"settings": current, "complete": False, "train_seconds": 0.0})
        return None
    record = _read(file)
    before = {**{k: v for k, v in (defaults or {}).items() if k in current}, **record.get("settings", {})}
    differ = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
    extendable = current.get("schedule") == "constant" and set(differ) <= set(BUDGET)
    if differ and not extendable:
        changes = "; ".join(f"{_option(k)} {_show(before.get(k))} -> {_show(current.get(k))}" for k in differ)
        raise UsageError(f"{out} holds a run with other settings ({changes}); use a new --out to keep both, "
                         "or --overwrite to replace it")
    if differ:  # a longer (or shorter) budget at a constant rate: the same run, continued
        write_json(file, {**record, "settings": current, "complete": False})
    elif record.get("complete") and (out / RESULTS_FILE).is_file():
        return _read(out / RESULTS_FILE)
    return None


def _show(value: Any) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"({value['count']} examples, sha256 {value['sha256'][:12]})"
    return json.dumps(value)


def reset_peak_memory() -> None:
    """Restart the process's peak resident memory count (Linux; elsewhere the peak stays the process's own)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def add_train_seconds(out: Path, seconds: float) -> float:
    """Add one session's training time to the run's total (a resumed run counts all its sessions); the new total."""
    record = _read(out / SETTINGS_FILE)
    record["train_seconds"] = record.get("train_seconds", 0.0) + seconds
    write_json(out / SETTINGS_FILE, record)
    return record["train_seconds"]


def finish(out: Path, results: dict[str, Any]) -> None:
    """Write the results, then mark the run complete (in that order, so a complete run always has its results)."""
    write_json(out / RESULTS_FILE, results)
    record = _read(out / SETTINGS_FILE)
    write_json(out / SETTINGS_FILE, {**record, "complete": True})
