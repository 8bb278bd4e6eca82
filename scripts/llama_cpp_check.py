"""Acceptance run for the GGUF export: llama.cpp (llama-cpp-python) runs what jpeft trained, as jpeft runs it.

    python scripts/llama_cpp_check.py                     # train (or resume) a short LoRA, export, compare, report
    python scripts/llama_cpp_check.py --steps 40 --out runs/llama_cpp_check --report runs/llama_cpp_check/report.md

1. `train.summarize` trains a LoRA (q/k/v/o) on DialogSum on SmolLM2-135M-Instruct loaded from the packaged Q4_1 GGUF
   and writes `adapter.gguf` (f32) and `merged.gguf` (f16) with `--export-gguf adapter,merged`.
2. llama.cpp loads `Llama(model_path=<the Q4_1 file>, lora_path=adapter.gguf)`; jpeft runs the same Q4_1 base
   (dequantized) with the trained HF PEFT adapter. Both see the same prompt token ids.
3. Checks: llama.cpp's logits with the adapter minus without correlate >= 0.98 with jpeft's; greedy summaries of 10
   validation dialogues agree on >= 8; the merged f16 GGUF gives the same greedy summaries in llama.cpp as in jpeft.
   Decoding speed (greedy, batch 1, prompt included) of both is timed side by side. Controls, to tell the engines'
   arithmetic from the export: the Q4_1 base alone in both, and each engine against itself (llama.cpp fed the prompt
   in one batch vs token by token; jpeft one prompt at a time vs all ten in one batch), and the merged model in f32.
A Markdown report is printed and written to --report; the exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "dialogsum"
MODEL = "smollm2-135m-instruct"
MAX_SOURCE, MAX_NEW = 384, 64
N_DIALOGUES, N_LOGITS = 10, 3  # greedy summaries compared; prompts whose full logits are compared
MIN_CORRELATION, MIN_AGREE = 0.98, 8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="LoRA training steps")
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate")
    p.add_argument("--data", default=str(DATA), help="DialogSum directory (train/validation .jsonl)")
    p.add_argument("--out", default="runs/llama_cpp_check", help="run directory (train.summarize resumes it)")
    p.add_argument("--report", help="Markdown report file (default: OUT/llama_cpp_report.md)")
    p.add_argument("--extra-buffers", action="store_true", help="keep llama.cpp's AMX / repacked CPU weight buffers "
                   "(off by default: they crash with SIGILL where the CPU lists AMX but the kernel does not grant it)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    return p.parse_args(argv)


def train_command(args) -> list[str]:
    return ["--model", MODEL, "--data", args.data, "--method", "lora", "--lora-targets", "q_proj,k_proj,v_proj,o_proj",
            "--steps", str(args.steps), "--lr", str(args.lr), "--batch-size", "4", "--max-source-len", "256",
            "--max-target-len", str(MAX_NEW), "--eval-samples", "0", "--skip-base-eval", "--export-gguf", "adapter,merged",
            "--out", args.out]


def validation_rows(task, data: str) -> list[dict]:
    """The first N_DIALOGUES validation dialogues, encoded as train.summarize prompts them."""
    from train import tasks

    with open(Path(data) / "validation.jsonl") as f:
        raw = [json.loads(next(f)) for _ in range(N_DIALOGUES)]
    rows = [{"id": r["id"], "input": r["dialogue"], "reference": r["summary"]} for r in raw]
    return tasks.encode(task, rows, MAX_SOURCE, MAX_NEW)


def jpeft_logits(task, params, prompt: list[int]) -> np.ndarray:
    ids = np.asarray([prompt])
    return np.asarray(task.module.forward(task.config, params, ids, np.ones_like(ids)))[0]


def jpeft_greedy(task, params, prompts: list[list[int]], timed: bool = True) -> tuple[list[list[int]], float, float]:
    """Greedy ids per prompt (batch 1, up to EOS), and prompt / decoding tokens/s of timed passes after one that
    compiles. jpeft's loop is one program, so the prompt's time is that of a run generating one token."""
    def run(max_new: int) -> tuple[list[list[int]], float]:
        outs, t0 = [], time.perf_counter()
        for prompt in prompts:
            ids = np.asarray([prompt])
            row = np.asarray(task.module.generate(task.config, params, ids, np.ones_like(ids), max_new_tokens=max_new))[0].tolist()
            outs.append(row[: row.index(task.eos_id)] if task.eos_id in row else row)
        return outs, time.perf_counter() - t0

    if not timed:
        return run(MAX_NEW)[0], float("nan"), float("nan")
    run(MAX_NEW), run(1)
    (outs, full), (_, prefill) = run(MAX_NEW), run(1)
    return outs, sum(map(len, prompts)) / prefill, sum(map(len, outs)) / (full - prefill)


def without_extra_buffers() -> None:
    """Load llama.cpp models without its CPU "extra" buffer types (AMX, repacked weights): on CPUs that list AMX but
    whose kernel does not grant it, llama.cpp's AMX kernels die with SIGILL on the Q4_1 weights. Llama() takes no
    option for it, so the default model parameters it starts from are wrapped."""
    import llama_cpp.llama_cpp as C

    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params


def llama_cpp_model(path: Path, threads: int, lora: Path | None = None):
    from llama_cpp import Llama

    extra = {"lora_path": str(lora)} if lora else {}
    return Llama(model_path=str(path), n_ctx=MAX_SOURCE + MAX_NEW + 8, n_threads=threads, logits_all=True, verbose=False, **extra)


def llama_cpp_logits(model, prompt: list[int]) -> np.ndarray:
    model.reset()
    model.eval(prompt)
    return np.array(model.scores[: len(prompt)], dtype=np.float32)


def jpeft_batched(task, params, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy ids per prompt, all prompts in one left-padded batch (as `train.summarize` evaluates)."""
    from jpeft import batches
    from train import tasks

    ids = batches.pad(prompts, task.pad_id, left=True, bucket=tasks.BUCKET)
    mask = batches.pad([[1] * len(p) for p in prompts], 0, ids.shape[1], left=True)
    rows = np.asarray(task.module.generate(task.config, params, ids, mask, max_new_tokens=MAX_NEW)).tolist()
    return [row[: row.index(task.eos_id)] if task.eos_id in row else row for row in rows]


def llama_cpp_greedy(model, prompts: list[list[int]], eos: int, stepwise: bool = False) -> tuple[list[list[int]], float, float]:
    """Greedy ids per prompt (argmax of llama.cpp's logits, up to EOS), and prompt / decoding tokens/s after a warm-up
    (a fresh context's first evaluations are several times slower). `stepwise` feeds the prompt one token at a
    time instead of in one batch: the same model and tokens, only llama.cpp's own order of arithmetic differs."""
    model.reset()
    model.eval(prompts[0])
    for token in prompts[0][:8]:
        model.eval([token])
    outs, prefill, decode = [], 0.0, 0.0
    for prompt in prompts:
        t0 = time.perf_counter()
        model.reset()
        for part in ([[t] for t in prompt] if stepwise else [prompt]):
            model.eval(part)
        t1 = time.perf_counter()
        out = []
        while len(out) < MAX_NEW:
            token = int(np.argmax(model.scores[model.n_tokens - 1]))
            if token == eos:
                break
            out.append(token)
            model.eval([token])
        prefill, decode = prefill + t1 - t0, decode + time.perf_counter() - t1
        outs.append(out)
    return outs, sum(map(len, prompts)) / prefill, sum(map(len, outs)) / decode


def divergences(task, params, model, prompts: list[list[int]], ours: list[list[int]], theirs: list[list[int]]) -> list[tuple]:
    """Where each pair of differing greedy outputs parts: (index, position, jpeft's token, llama.cpp's token, jpeft's
    logit margin of its token over llama.cpp's, llama.cpp's margin of its token over jpeft's), both sides scoring the
    same prompt + common prefix. Margins below the engines' usual logit disagreement make the parting a near tie
    that their arithmetic decides, not a difference in the exported weights."""
    parted = []
    for n, (prompt, a, b) in enumerate(zip(prompts, ours, theirs)):
        if a == b:
            continue
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        mine, other = (a + [task.eos_id])[d], (b + [task.eos_id])[d]  # a shorter output parted by ending
        j = jpeft_logits(task, params, prompt + a[:d])[-1]
        c = llama_cpp_logits(model, prompt + a[:d])[-1]
        parted.append((n, d, mine, other, float(j[mine] - j[other]), float(c[other] - c[mine])))
    return parted


def logit_gap(model, task, params, prompts: list[list[int]]) -> float:
    """The engines' usual disagreement: the median over positions of |llama.cpp - jpeft| at jpeft's top token,
    each side's logits centred on their own mean."""
    gaps = []
    for p in prompts:
        j, c = jpeft_logits(task, params, p), llama_cpp_logits(model, p)
        j, c = j - j.mean(axis=-1, keepdims=True), c - c.mean(axis=-1, keepdims=True)
        top = j.argmax(axis=-1)
        gaps.append(np.abs(np.take_along_axis(c - j, top[:, None], axis=-1)[:, 0]))
    return float(np.median(np.concatenate(gaps)))


def same(ours: list[list[int]], theirs: list[list[int]]) -> int:
    """How many outputs are the same token for token."""
    return sum(a == b for a, b in zip(ours, theirs))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def check(args) -> tuple[str, bool]:
    """Train and export (or resume), run both sides, and return (Markdown report, all checks passed)."""
    import jax.numpy as jnp

    import jpeft
    from jpeft.models import llama, registry
    from train import summarize, tasks

    out = Path(args.out)
    t0 = time.perf_counter()
    if summarize.main(train_command(args)) != 0:
        raise SystemExit("training failed")
    train_s = time.perf_counter() - t0
    base_file = Path(registry.resolve(MODEL))
    task, base = tasks.load_task(MODEL, None, jnp.float32)
    tuned = jpeft.load_adapter(out / "adapter", base)
    rows = validation_rows(task, args.data)
    prompts = [r["source"] for r in rows]

    plain, adapted = llama_cpp_model(base_file, args.threads), llama_cpp_model(base_file, args.threads, out / "adapter.gguf")
    corrs = [correlation(llama_cpp_logits(adapted, p) - llama_cpp_logits(plain, p), jpeft_logits(task, tuned, p) - jpeft_logits(task, base, p))
             for p in prompts[:N_LOGITS]]
    ours, *ours_tps = jpeft_greedy(task, tuned, prompts)
    theirs, *theirs_tps = llama_cpp_greedy(adapted, prompts, task.eos_id)
    agree = same(ours, theirs)
    parted, gap = divergences(task, tuned, adapted, prompts, ours, theirs), logit_gap(adapted, task, tuned, prompts[:N_LOGITS])
    # The control: the Q4_1 base alone, to tell llama.cpp's Q4_1 arithmetic (activations rounded to 8 bits) from the adapter.
    agree_base = same(jpeft_greedy(task, base, prompts, timed=False)[0], llama_cpp_greedy(plain, prompts, task.eos_id)[0])
    # Each engine against itself: how often a near tie goes another way when only the order of arithmetic changes.
    self_cpp = same(theirs, llama_cpp_greedy(adapted, prompts, task.eos_id, stepwise=True)[0])
    self_jpeft = same(ours, jpeft_batched(task, tuned, prompts))

    merged_cpp = llama_cpp_model(out / "merged.gguf", args.threads)
    config_m, merged = llama.load_pretrained(out / "merged.gguf")
    merged_task = type(task)(task.family, config_m, task.tokenizer, task.source, task.chat)
    ours_m, *ours_m_tps = jpeft_greedy(merged_task, merged, prompts)
    theirs_m, *theirs_m_tps = llama_cpp_greedy(merged_cpp, prompts, task.eos_id)
    agree_m = same(ours_m, theirs_m)
    self_cpp_m = same(theirs_m, llama_cpp_greedy(merged_cpp, prompts, task.eos_id, stepwise=True)[0])
    # The same merged model stored in f32, where llama.cpp multiplies float32 activations as jpeft does.
    jpeft.gguf.save(out / "merged-f32.gguf", task.config, tuned, dtype="f32", tokenizer_source=base_file)
    merged32 = llama.load_pretrained(out / "merged-f32.gguf")[1]
    agree_m32 = same(jpeft_greedy(merged_task, merged32, prompts, timed=False)[0],
                     llama_cpp_greedy(llama_cpp_model(out / "merged-f32.gguf", args.threads), prompts, task.eos_id)[0])
    parted = [("adapter", *p) for p in parted] + [("merged", *p) for p in divergences(merged_task, merged, merged_cpp, prompts, ours_m, theirs_m)]

    ok = min(corrs) >= MIN_CORRELATION and agree >= MIN_AGREE and agree_m == N_DIALOGUES
    decode = lambda ids: task.tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ").replace("|", "\\|")  # noqa: E731
    import llama_cpp

    lines = [
        "# llama.cpp runs jpeft's GGUF export",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; llama-cpp-python {llama_cpp.__version__}; "
        f"SmolLM2-135M-Instruct ({base_file.name}); LoRA r=16 alpha=32 on q/k/v/o, {args.steps} steps on DialogSum "
        f"(trained in {train_s:.0f} s, or resumed); {os.cpu_count()} CPUs, llama.cpp threads {args.threads}"
        f"{'' if args.extra_buffers else ', without its AMX / repacked CPU buffers'}.",
        "",
        "```",
        "python -m train.summarize " + " ".join(train_command(args)),
        "Llama(model_path=" + base_file.name + ", lora_path=" + str(out / "adapter.gguf") + ")",
        "```",
        "",
        "| check | result | needed |",
        "| --- | --- | --- |",
        f"| logits with adapter minus without: correlation llama.cpp vs jpeft ({N_LOGITS} prompts, min) | {min(corrs):.4f} | >= {MIN_CORRELATION} |",
        f"| greedy summaries, Q4_1 base + adapter.gguf: same in llama.cpp and jpeft | {agree} / {N_DIALOGUES} | >= {MIN_AGREE} |",
        f"| greedy summaries, merged.gguf (f16): same in llama.cpp and jpeft | {agree_m} / {N_DIALOGUES} | {N_DIALOGUES} |",
        f"| (control) greedy summaries, Q4_1 base alone: same in llama.cpp and jpeft | {agree_base} / {N_DIALOGUES} | |",
        f"| (control) llama.cpp against itself, Q4_1 base + adapter.gguf: prompt in one batch vs token by token | {self_cpp} / {N_DIALOGUES} | |",
        f"| (control) jpeft against itself, Q4_1 base + adapter: one prompt at a time vs all {N_DIALOGUES} in one batch | {self_jpeft} / {N_DIALOGUES} | |",
        f"| (control) llama.cpp against itself, merged.gguf: prompt in one batch vs token by token | {self_cpp_m} / {N_DIALOGUES} | |",
        f"| (control) greedy summaries, the merged model saved in f32 (`jpeft.gguf.save(dtype=\"f32\")`): same in llama.cpp and jpeft | {agree_m32} / {N_DIALOGUES} | |",
        "",
        "| greedy generation, batch 1 (tokens/s) | llama.cpp prompt | llama.cpp decoding | jpeft prompt | jpeft decoding |",
        "| --- | --- | --- | --- | --- |",
        f"| Q4_1 base + LoRA adapter (jpeft: float32, adapter unmerged) | {theirs_tps[0]:.0f} | {theirs_tps[1]:.1f} | {ours_tps[0]:.0f} | {ours_tps[1]:.1f} |",
        f"| merged f16 (jpeft: float32) | {theirs_m_tps[0]:.0f} | {theirs_m_tps[1]:.1f} | {ours_m_tps[0]:.0f} | {ours_m_tps[1]:.1f} |",
        "",
        "| id | llama.cpp (base + adapter.gguf) | jpeft | same |",
        "| --- | --- | --- | --- |",
        *(f"| {r['id']} | {decode(t)} | {decode(o)} | {'yes' if t == o else 'no'} |" for r, t, o in zip(rows, theirs, ours)),
        "",
        f"Where the differing summaries part (both sides scoring the same prefix; the engines' median |logit difference| "
        f"at jpeft's top token over the first {N_LOGITS} prompts, Q4_1 base + adapter: {gap:.3f}):",
        "",
        "| file | id | token | jpeft's choice | llama.cpp's choice | jpeft's margin | llama.cpp's margin |",
        "| --- | --- | ---: | --- | --- | ---: | ---: |",
        *(f"| {f} | {rows[n]['id']} | {d} | {decode([a])!r} | {decode([b])!r} | {ma:.3f} | {mb:.3f} |" for f, n, d, a, b, ma, mb in parted),
        "",
        f"All checks {'passed' if ok else 'FAILED'}.",
    ]
    return "\n".join(lines) + "\n", ok


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama_cpp is not importable: `pip install llama-cpp-python` (builds llama.cpp from source, ~10 min)", file=sys.stderr)
        return 2
    if not args.extra_buffers:
        without_extra_buffers()
    report, ok = check(args)
    path = Path(args.report or Path(args.out) / "llama_cpp_report.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report)
    print(report)
    print(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
