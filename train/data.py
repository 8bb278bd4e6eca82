"""Input/target text pairs from local files, directories, the Hugging Face Hub, a `datasets.Dataset` or a list of dicts.

Every source goes through `datasets` (`load_dataset("json" | "csv" | "parquet", data_files=...)` for local
files), and every row comes out as {"id", "input", "reference"}, whatever the columns were called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from train.errors import UsageError

INPUT_FIELD, TARGET_FIELD = "dialogue", "summary"  # DialogSum's columns
SAMPLE_DIR = Path(__file__).parent / "sample_data"
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
HUB_TIMEOUT = 5.0  # seconds to wait for the Hub's host to take a connection


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _read_file(path: Path) -> Any:
    """A local file as a `datasets.Dataset`."""
    import datasets

    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"{path}: unsupported data file type {path.suffix!r}; use {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        raise UsageError(f"{path} holds no examples (the file is empty)")
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a local file reads in a blink; its "Generating train split" bar is noise
    try:
        rows = datasets.load_dataset(fmt, data_files=str(path), split="train")
        if fmt == "json" and rows.column_names == ["data"]:  # {"data": [...]}, SQuAD-style
            rows = datasets.load_dataset(fmt, data_files=str(path), field="data", split="train")
    except Exception as e:  # datasets wraps parser errors (pyarrow, pandas) in its own types
        cause = e.__cause__ or e
        raise UsageError(f"{path} is not a readable {fmt} file ({_first_line(cause)})") from None
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return rows


def _hub_unreachable() -> str | None:
    """Why the Hub cannot answer at all (its host does not take a connection), or None; one quick try, where `datasets`
    would retry for half a minute. Offline mode (HF_HUB_OFFLINE=1, the local cache only) and proxies are left to it."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or urllib.request.getproxies():
        return None
    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=HUB_TIMEOUT).close()
    except OSError as e:
        return f"{url.hostname} cannot be reached: {e}; set HF_HUB_OFFLINE=1 to use a dataset in the local cache"
    return None


def _from_hub(name: str, split: str) -> Any:
    import datasets

    try:
        if reason := _hub_unreachable():
            raise ConnectionError(reason)
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown dataset, missing split
        raise UsageError(
            f"could not load dataset {name!r} split {split!r} from the Hugging Face Hub ({_first_line(e)}). "
            "If this machine is offline, pass local files instead: --data DIR (with train.jsonl and validation.jsonl) "
            f"or --data FILE ({', '.join(FORMATS)})"
        ) from None


def normalize(rows: Iterable[Mapping[str, Any]], source: str, input_field: str = INPUT_FIELD, target_field: str = TARGET_FIELD,
              need_target: bool = True, keep: tuple[tuple[str, str], ...] = (),
              flags: tuple[str, str] = ("--input-field", "--target-field")) -> list[dict]:
    """Rows as {"id", "input", "reference"}; a missing column or empty text is an error naming it and what to pass.

    Without `need_target`, rows of data that has no target column come without "reference"; `keep` holds
    (flag, column) pairs of further text columns each row must have, kept under their own names. `flags` name the
    options that set the input and target columns (`train.prefer`'s are --prompt-field and --chosen-field).
    """
    rows = list(rows)
    if not rows:
        raise UsageError(f"{source} holds no examples")
    if not all(isinstance(row, Mapping) for row in rows):
        kind = next(type(row).__name__ for row in rows if not isinstance(row, Mapping))
        raise UsageError(f"{source}: an example is a {kind}, not a row of named fields")
    columns = list(dict.fromkeys(k for row in rows for k in row))
    has_target = need_target or target_field in columns
    fields = ((flags[0], input_field), *(((flags[1], target_field),) if has_target else ()), *keep)
    for flag, field in fields:
        if field not in columns:
            raise UsageError(f"{source} has no {field!r} column (its columns: {', '.join(map(repr, columns))}); "
                             f"name the right one with {flag}")
    for i, row in enumerate(rows):
        missing = [f for _, f in fields if not isinstance(row.get(f), str) or not row[f].strip()]
        if missing:
            raise UsageError(f"{source}: example {i} has no {' or '.join(map(repr, missing))} text")
    return [{"id": str(r.get("id", i)), "input": r[input_field], **({"reference": r[target_field]} if has_target else {}),
             **{field: r[field] for _, field in keep}} for i, r in enumerate(rows)]


def _rows(spec: Any, split: str) -> tuple[Any, str]:
    """(rows, a name for messages) of one split of a directory, a file or a hub dataset."""
    path = Path(spec) if spec is not None else SAMPLE_DIR
    if path.is_dir():
        for ext in FORMATS:
            if (path / f"{split}{ext}").is_file():
                return _read_file(path / f"{split}{ext}"), str(path / f"{split}{ext}")
        raise UsageError(f"{path} has no {split} file ({' or '.join(split + ext for ext in FORMATS)})")
    if path.is_file():
        return _read_file(path), str(path)
    if path.suffix or str(spec).startswith((".", "/", "~")) or str(spec).count("/") > 1:
        raise UsageError(f"data path {spec} does not exist")
    return _from_hub(str(spec), split), f"{spec} [{split}]"


def load_split(spec: Any, split: str, input_field: str = INPUT_FIELD, target_field: str = TARGET_FIELD, **normalize_options: Any) -> list[dict]:
    """One split: `spec` is a directory ({split}.jsonl/.json/.csv/.parquet), a file, a hub name, rows in memory
    (a `datasets.Dataset` or a list of dicts), or None for the bundled sample; see `normalize` for its options."""
    if isinstance(spec, (str, Path)) or spec is None:
        rows, source = _rows(spec, split)
    else:
        rows, source = spec, f"the given {type(spec).__name__}"
    return normalize(rows, source, input_field, target_field, **normalize_options)


def _splits_itself(spec: Any) -> bool:
    """A single file or rows in memory hold no validation split of their own."""
    return not (spec is None or (isinstance(spec, (str, Path)) and not Path(spec).is_file()))


def eval_origin(data: Any, eval_data: Any = None) -> str:
    """Where `load_data(data, eval_data)`'s evaluation rows come from, in words for messages."""
    if eval_data is not None:
        return f"--eval-data {eval_data}" if isinstance(eval_data, (str, Path)) else f"the given {type(eval_data).__name__}"
    if not _splits_itself(data):
        return f"the validation split of {data if data is not None else SAMPLE_DIR}"
    what = data if isinstance(data, (str, Path)) else f"the given {type(data).__name__}"
    return f"the first 10% of {what}, held out as no --eval-data was given"


def load_data(data: Any, eval_data: Any = None, input_field: str = INPUT_FIELD, target_field: str = TARGET_FIELD,
              **normalize_options: Any) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows. A single file or in-memory rows without `eval_data` hold out their first 10% for evaluation.
    `normalize_options` go to `normalize` for every split."""
    fields = (input_field, target_field)
    if eval_data is not None:
        return load_split(data, "train", *fields, **normalize_options), load_split(eval_data, "validation", *fields, **normalize_options)
    if _splits_itself(data):
        rows = load_split(data, "train", *fields, **normalize_options)
        if len(rows) < 2:
            raise UsageError(f"{len(rows)} example: at least 2 are needed to hold some out for evaluation, or pass separate evaluation data")
        cut = max(1, len(rows) // 10)
        return rows[cut:], rows[:cut]
    return load_split(data, "train", *fields, **normalize_options), load_split(data, "validation", *fields, **normalize_options)
