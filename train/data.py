"""Loading dialogue/summary pairs from local jsonl/csv files, directories, or the Hugging Face Hub."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from train.errors import UsageError

FIELDS = ("dialogue", "summary")
SAMPLE_DIR = Path(__file__).parent / "sample_data"


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{n} is not valid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, list) else data.get("data", [])
    raise UsageError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .json or .csv")


def _from_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets

        return [dict(r) for r in datasets.load_dataset(name, split=split)]
    except Exception as e:  # offline, unknown dataset, missing split
        raise UsageError(
            f"could not load dataset {name!r} split {split!r} from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). If this machine is offline, "
            "pass local files instead: --data DIR (with train.jsonl and validation.jsonl) or --data FILE.jsonl/.csv"
        ) from None


def _check(rows: list[dict], source: str) -> list[dict]:
    if not rows:
        raise UsageError(f"{source} holds no examples")
    for i, row in enumerate(rows):
        missing = [f for f in FIELDS if not isinstance(row.get(f), str) or not row[f].strip()]
        if missing:
            raise UsageError(f"{source}: example {i} has no {' or '.join(missing)} (each row needs 'dialogue' and 'summary' text)")
    return [{"id": str(r.get("id", i)), "dialogue": r["dialogue"], "summary": r["summary"]} for i, r in enumerate(rows)]


def load_split(spec: str | None, split: str) -> list[dict]:
    """Examples of one split: `spec` is a directory ({split}.jsonl/.csv), a single file, a hub name, or None for the sample."""
    path = Path(spec) if spec else SAMPLE_DIR
    if path.is_dir():
        for ext in (".jsonl", ".csv", ".json"):
            if (path / f"{split}{ext}").is_file():
                return _check(_read_file(path / f"{split}{ext}"), str(path / f"{split}{ext}"))
        raise UsageError(f"{path} has no {split}.jsonl or {split}.csv")
    if path.is_file():
        return _check(_read_file(path), str(path))
    if path.suffix or str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise UsageError(f"data path {spec} does not exist")
    return _check(_from_hub(str(spec), split), f"{spec} [{split}]")


def load_data(data: str | None, eval_data: str | None) -> tuple[list[dict], list[dict]]:
    """(train, eval) examples. A single file without --eval-data is split 90/10 deterministically."""
    if data and Path(data).is_file():
        rows = load_split(data, "train")
        if eval_data:
            return rows, load_split(eval_data, "validation")
        if len(rows) < 2:
            raise UsageError(f"{data} needs at least 2 examples to hold some out for evaluation, or pass --eval-data")
        cut = max(1, len(rows) // 10)
        return rows[cut:], rows[:cut]
    train = load_split(data, "train")
    return train, load_split(eval_data, "validation") if eval_data else load_split(data, "validation")
