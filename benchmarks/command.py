"""The README's DialogSum LoRA command end to end: each phase's time and share, and HF PEFT's same phases.

`python -m benchmarks.command [--ratios FIGURES.json]`. The command runs as a user runs it (a fresh process,
`python -m train.summarize` with the README's options); its `results.json` holds the phases' wall-clock
seconds (`phase_seconds`). PEFT's command is not run (its 32 training steps alone take ~13 min here): its
phases are estimated from figures measured side by side in the same benchmark run — training as the command's
step count times PEFT's measured step on the same 8 DialogSum dialogues (`smollm2_peft_step_s`), each
evaluation as jpeft's evaluation time times transformers' generation time over jpeft's
(`smollm2_generate_speedup_vs_transformers`); loading, setup and saving count the same on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIALOGSUM = ROOT.parent / "shared" / "data" / "dialogsum"
# The README's "Results: LoRA on SmolLM2-135M-Instruct, DialogSum" command, option for option.
ARGS = ["--model", "smollm2-135m-instruct", "--data", "../shared/data/dialogsum", "--method", "lora",
        "--lora-r", "16", "--lora-alpha", "32", "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "--lr", "2e-4", "--batch-size", "8", "--steps", "32", "--max-source-len", "384", "--max-target-len", "64",
        "--eval-samples", "50", "--eval-batch-size", "25"]
EVALS = ("base_eval", "tuned_eval")


def run_command(out: Path) -> dict:
    """Run the README command into `out` in a fresh interpreter and return its results.json."""
    subprocess.run([sys.executable, "-m", "train.summarize", *ARGS, "--out", str(out), "--overwrite"], check=True, cwd=ROOT,
                   env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    return json.loads((out / "results.json").read_text())


def peft_phases(phases: dict[str, float], steps: int, ratios: dict[str, float]) -> dict[str, float] | None:
    """PEFT's phases estimated from jpeft's and the side-by-side ratios; None without the ratios."""
    if "smollm2_peft_step_s" not in ratios or "smollm2_generate_speedup_vs_transformers" not in ratios:
        return None
    speedup = ratios["smollm2_generate_speedup_vs_transformers"]
    return {name: steps * ratios["smollm2_peft_step_s"] if name == "train" else seconds * speedup if name in EVALS else seconds
            for name, seconds in phases.items()}


def figures(results: dict, ratios: dict[str, float]) -> dict[str, float]:
    """Flat figures: every phase's seconds and share, and the whole command against PEFT's estimate."""
    phases = results["phase_seconds"]
    total = sum(phases.values())
    out = {"command_total_s": total, "command_train_steps": float(ARGS[ARGS.index("--steps") + 1]),
           "command_tuned_rouge1": results["tuned"]["rouge1"]}
    for name, seconds in phases.items():
        out[f"command_{name}_s"], out[f"command_{name}_share"] = seconds, seconds / total
    peft = peft_phases(phases, int(out["command_train_steps"]), ratios)
    if peft is not None:
        out.update({f"command_peft_{name}_s": seconds for name, seconds in peft.items()})
        out["jpeft_over_peft_command_time"] = total / sum(peft.values())
    return out


def run(workdir: Path, ratios: dict[str, float]) -> dict[str, float]:
    """The command's figures; `ratios` are the figures of the sections run before it (smollm2, generate_real)."""
    if not DIALOGSUM.is_dir():
        print(f"[command] skipped: {DIALOGSUM} is not there", flush=True)
        return {}
    return figures(run_command(workdir / "command"), ratios)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=Path, help="a benchmarks.run JSON holding the smollm2 and generate_real figures")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-command"), help="the command's run directory")
    args = parser.parse_args()
    print(json.dumps(figures(run_command(args.out), json.loads(args.ratios.read_text()) if args.ratios else {}), indent=1))
