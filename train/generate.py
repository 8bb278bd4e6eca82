"""Use what you trained: summaries from a base with its adapter(s), a merged model or a GGUF export, scored with ROUGE
where the examples have references.

    python -m train.generate --adapter runs/summarize --text "#Person1#: ..."            # a train.summarize run directory
    python -m train.generate --adapter runs/summarize --data new.jsonl --out runs/new     # predictions.jsonl, results.json
    python -m train.generate --model smollm2-135m-instruct --adapter my-peft-adapter --data - < rows.jsonl
    python -m train.generate --model runs/summarize/merged.gguf --text - < dialogue.txt
    python -m train.generate --adapter a=runs/a --adapter b=runs/b --data new.jsonl       # two LoRA adapters in one batch

An adapter is an HF PEFT directory, a `train.summarize` run directory, jpeft's own adapter file (bottleneck adapters,
selective) or a llama.cpp LoRA GGUF. A run directory's settings (model, tokenizer, prompt, lengths, chat template,
quantization) are the defaults here; so are those of the run a --model lies in (merged/, merged.gguf, model/), but its
model and quantization. Every input is checked before the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp

import jpeft
from jpeft import multi, peft_format, quant
from jpeft.models import registry
from train import data as data_lib
from train import evaluate, options, run_dir, summarize, tasks
from train.errors import UsageError

# The options a run directory records that say how its model reads and writes text.
RUN_SETTINGS = ("model", "tokenizer", "chat_template", "prompt", "max_source_len", "max_target_len", "input_field", "target_field",
                "quantize")


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One --adapter: its name in outputs, its files, their kind ("peft", "jpeft" or "gguf"), and its run's settings."""

    name: str
    path: Path
    kind: str
    run: dict | None


def parser() -> argparse.ArgumentParser:
    """All options, each with its default in `--help`."""
    p = argparse.ArgumentParser(prog="jpeft-generate", description=__doc__, formatter_class=options.Formatter)
    g = p.add_argument_group("model and data", "(a run directory given to --adapter, or holding --model, sets these defaults)")
    options.add_model_and_data(g)
    g.add_argument("--data", help="the examples: a .jsonl/.json/.csv/.parquet file, a directory holding a --split file, a hub "
                   "dataset name, or - for JSON lines on stdin")
    g.add_argument("--split", default="validation", help="which file of a --data directory, or split of a hub dataset")
    g.add_argument("--text", action="append", default=[], help="an input to summarize (repeatable; - reads all of stdin as one)")
    g.add_argument("--limit", type=int, help="run the first N examples (default: all)")
    g = p.add_argument_group("adapters")
    g.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                   help="an HF PEFT adapter directory, a train.summarize run directory, jpeft's adapter directory or a llama.cpp "
                        "LoRA .gguf (repeatable: several LoRA adapters run in one batch, each example through each; default: "
                        "none, the model alone)")
    g.add_argument("--adapter-field", help="with several adapters: the column naming each example's adapter (default: every "
                   "adapter on every example)")
    options.add_quantize(g)
    g = p.add_argument_group("generation and output")
    options.add_decoding(g)
    g.add_argument("--bf16", action="store_true", help="bfloat16 compute")
    g.add_argument("--out", help="directory for predictions.jsonl and results.json (default: predictions on stdout, as JSON lines, "
                   "or one line each for --text)")
    return p


def _run_at(path: Path) -> dict | None:
    """The settings of the train.summarize run directory that `path` is or lies directly in, or None."""
    for directory in (path, path.parent):
        settings = run_dir.recorded_settings(directory)
        if settings is not None:
            return settings
    return None


def find_adapter(spec: str) -> Adapter:
    """An --adapter given as PATH or NAME=PATH, checked to be one of the kinds this command reads."""
    name, sep, path = spec.partition("=")
    name, path = (name, Path(path)) if sep and "/" not in name else ("", Path(spec))
    if not path.exists():
        raise UsageError(f"--adapter {path}: no such file or directory")
    run = _run_at(path)
    if run is not None and (path / run_dir.SETTINGS_FILE).is_file():
        if run.get("method") in ("none", "full"):
            model = f"; use --model {path / 'model'}" if run["method"] == "full" else ""
            raise UsageError(f"--adapter {path}: this run (--method {run['method']}) trained no adapter{model}")
        if not (path / "adapter").is_dir():
            raise UsageError(f"--adapter {path}: this run has not finished (it holds no adapter/ yet); run its "
                             f"python -m train.summarize --out {path} again to finish it")
        path = path / "adapter"
    if path.is_file() and path.suffix == ".gguf":
        kind = "gguf"
    elif (path / peft_format.CONFIG_FILE).is_file():
        kind = "peft"
    elif (path / summarize.JPEFT_ADAPTER).is_file():
        kind = "jpeft"
    else:
        raise UsageError(f"--adapter {path} is neither an adapter ({peft_format.CONFIG_FILE} of HF PEFT, {summarize.JPEFT_ADAPTER}, "
                         f"or a llama.cpp LoRA .gguf) nor a train.summarize run directory ({run_dir.SETTINGS_FILE})")
    return Adapter(name or (path.parent.name if path.name == "adapter" else path.stem), path, kind, run)


def _check_stackable(adapters: list[Adapter]) -> None:
    """Several adapters run in one batch as stacked LoRA (`jpeft.multi`): each must be plain LoRA, and named once."""
    names = [a.name for a in adapters]
    if len(set(names)) < len(names):
        raise UsageError(f"--adapter: two adapters are named {sorted({n for n in names if names.count(n) > 1})}; name them NAME=PATH")
    for a in adapters:
        if a.kind == "jpeft":
            other = "in jpeft's own format (a bottleneck adapter or selective weights)"
        elif a.kind == "peft":
            config = json.loads((a.path / peft_format.CONFIG_FILE).read_text())
            other = "DoRA" if config.get("use_dora") else None if config.get("peft_type") == "LORA" else config.get("peft_type")
        else:
            other = None  # a llama.cpp adapter holds LoRA pairs only
        if other:
            raise UsageError(f"--adapter {a.name}={a.path} is {other}: several adapters share a batch only as plain LoRA "
                             "(jpeft.multi.stack_lora); run it on its own")


def apply_run_defaults(args: argparse.Namespace, adapters: list[Adapter], given: set[str]) -> bool | None:
    """Fill the options not given from the runs of --adapter and --model; returns whether their model is an instruct
    model (packaged models know; None: its tokenizer's chat template decides), as those runs decided."""
    runs = [(a.run, a.run.get("model")) for a in adapters if a.run is not None]  # (settings to take, the run's base)
    model_run = _run_at(Path(args.model)) if "model" in given and Path(args.model).exists() else None
    if model_run is not None:  # a merged or fully tuned model of a run: its text settings, and its base's tokenizer
        runs.append(({**{k: v for k, v in model_run.items() if k not in ("model", "quantize")},
                      "tokenizer": model_run.get("tokenizer") or model_run.get("model")}, model_run.get("model")))
    for key in RUN_SETTINGS:
        values = {json.dumps(r[key]) for r, _ in runs if key in r}
        if key in given or not values:
            continue
        if len(values) > 1:
            raise UsageError(f"the runs given differ in --{key.replace('_', '-')} ({', '.join(sorted(values))}); give it to choose")
        setattr(args, key, json.loads(values.pop()))
    return next((registry.is_instruct(base) for _, base in runs), None)


def read_examples(args: argparse.Namespace) -> tuple[list[dict], str]:
    """(rows as `data.normalize` makes them, where they come from): --text, --data FILE/DIR/hub name, or --data - (stdin)."""
    if args.text and args.data:
        raise UsageError("give the inputs as --data or as --text, not both")
    if args.text:
        texts = [sys.stdin.read() if t == "-" else t for t in args.text]
        if not all(t.strip() for t in texts):
            raise UsageError("--text: an input is empty")
        return [{"id": str(i), "input": t} for i, t in enumerate(texts)], "--text"
    if args.data is None:
        raise UsageError("nothing to summarize: give --data FILE (or - for JSON lines on stdin), or --text TEXT")
    fields = dict(input_field=args.input_field, target_field=args.target_field, need_target=False,
                  keep=(("--adapter-field", args.adapter_field),) if args.adapter_field else ())
    if args.data != "-":
        return data_lib.load_split(args.data, args.split, **fields), f"--data {args.data}"
    rows = []
    for i, line in enumerate(sys.stdin):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UsageError(f"stdin line {i + 1} is not JSON ({e}); --data - reads one JSON object per line") from None
    return data_lib.normalize(rows, "stdin", **fields), "stdin"


def _jobs(rows: list[dict], adapters: list[Adapter], field: str | None) -> list[tuple[int, int | None]]:
    """(row, adapter) pairs to generate: each row by its --adapter-field, or through every adapter, or the one model."""
    names = [a.name for a in adapters]
    if field:
        if len(adapters) < 2:
            raise UsageError("--adapter-field picks each example's adapter among several --adapter NAME=PATH")
        unknown = sorted({r[field] for r in rows} - set(names))
        if unknown:
            raise UsageError(f"--adapter-field {field}: examples name adapters {unknown}, but the adapters are {names}")
        return [(i, names.index(r[field])) for i, r in enumerate(rows)]
    return [(i, k if len(adapters) > 1 else None) for i in range(len(rows)) for k in range(max(1, len(adapters)))]


def check(args: argparse.Namespace, adapters: list[Adapter]) -> None:
    """Every mistake visible without the weights: options, the prompt, the model's family, several adapters."""
    options.at_least(args, 1, "max_source_len", "max_target_len", "eval_batch_size", "limit")
    options.at_least(args, 0, "prompt_lookup")
    tasks.check_prompt(args.prompt)
    options.check_quantize(args)
    tasks.find_model(args.model)
    if len(adapters) > 1:
        _check_stackable(adapters)


def load(args: argparse.Namespace, adapters: list[Adapter], chat: bool | None) -> tuple[tasks.Task, dict]:
    """The model with its adapter, or with several stacked for `adapter_ids` (`jpeft.multi`)."""
    task, base = tasks.load_task(args.model, args.tokenizer, jnp.float32, chat=chat, quantized=args.quantize == "gguf")
    if args.quantize in quant.FORMATS:
        base = quant.quantize(base, args.quantize)
    loaded = []
    for a in adapters:
        if a.kind == "peft":
            loaded.append(jpeft.load_adapter(a.path, base))
        elif a.kind == "gguf":
            loaded.append(jpeft.gguf.load_adapter(a.path, base, task.config))
        else:
            loaded.append(summarize.load_trained_leaves(a.path, base))
    if len(loaded) < 2:
        return task, loaded[0] if loaded else base
    return task, jpeft.attach(base, multi.stack_lora([jpeft.split_adapter(p)[1] for p in loaded]))


def run(args: argparse.Namespace, given: set[str]) -> dict:
    """Check, read the examples, load, generate, score; write or print the predictions. Returns the results."""
    adapters = [find_adapter(spec) for spec in args.adapter]
    instruct = apply_run_defaults(args, adapters, given)
    chat = {"yes": True, "no": False}.get(args.chat_template, instruct)  # auto: as the run decided, or the model's own way
    check(args, adapters)
    every, origin = read_examples(args)
    rows = every[: args.limit]
    jobs = _jobs(rows, adapters, args.adapter_field)
    scored = all("reference" in r for r in rows)
    if scored:
        evaluate.report_count(len(rows), len(every), origin, "--limit", args.limit, "pass more examples with --data", file=sys.stderr)

    task, params = load(args, adapters, chat)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Only the prompts matter here: no reference is tokenized, none is cut to fit.
        encoded = tasks.encode(task, [{**r, "reference": ""} for r in rows], args.max_source_len, args.max_target_len, args.prompt)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    ids = [k for _, k in jobs] if len(adapters) > 1 else None
    texts = evaluate.summarize_all(task, params, [encoded[i] for i, _ in jobs], args.max_target_len, args.eval_batch_size,
                                   jnp.bfloat16 if args.bf16 else jnp.float32, "generate", args.prompt_lookup, ids)

    named = len(adapters) > 1
    records = [{"id": rows[i]["id"], **({"adapter": adapters[k].name} if named else {}), "prediction": text,
                **({"reference": rows[i]["reference"]} if scored else {})} for (i, k), text in zip(jobs, texts)]
    results: dict[str, Any] = {"model": args.model, "adapters": {a.name: str(a.path) for a in adapters}, "quantize": args.quantize,
                               "examples": len(rows), "predictions": len(records)}
    if scored:
        groups = {a.name: [r for r in records if r["adapter"] == a.name] for a in adapters} if named else {None: records}
        scores = {name: evaluate.rouge([r["prediction"] for r in group], [r["reference"] for r in group])
                  for name, group in groups.items() if group}
        for name, s in scores.items():
            print(f"ROUGE{f' ({name})' if name else ''}: {summarize.fmt(s)}", file=sys.stderr)
        results["rouge"] = scores if named else scores[None]
    _write(args, records, results)
    return results


def _write(args: argparse.Namespace, records: list[dict], results: dict) -> None:
    """predictions.jsonl and results.json into --out; else the predictions on stdout."""
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        run_dir.write_jsonl(out / "predictions.jsonl", records)
        run_dir.write_json(out / run_dir.RESULTS_FILE, results)
        print(f"wrote {out}/: predictions.jsonl, {run_dir.RESULTS_FILE}", file=sys.stderr)
    elif args.text:
        for r in records:
            print(f"[{r['adapter']}] {r['prediction']}" if "adapter" in r else r["prediction"])
    else:
        for r in records:
            print(json.dumps(r, ensure_ascii=False))


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """The options, and which of those a run directory records the command line gave (its settings fill in the rest)."""
    p, unset = parser(), object()
    args = p.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(RUN_SETTINGS, unset)))  # argparse keeps preset values
    given = {k for k in RUN_SETTINGS if getattr(args, k) is not unset}
    defaults = vars(p.parse_args([]))
    for key in set(RUN_SETTINGS) - given:
        setattr(args, key, defaults[key])
    return args, given


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: user mistakes become one line on stderr and exit status 2."""
    code, _ = summarize.guarded(run, *parse(argv))
    return code


if __name__ == "__main__":
    sys.exit(main())
