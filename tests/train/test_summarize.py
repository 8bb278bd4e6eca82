"""The summarization CLI end to end at a tiny size: every method, resume, outputs, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import FAST_COMPILE, SHARED
from tests.train.conftest import DIALOGUES, TOKENIZER
from train import summarize
from train.errors import UsageError

pytestmark = pytest.mark.skipif(not (SHARED / "tokenizers" / "t5").is_dir(), reason="needs ../shared/tokenizers/t5")


def _run(model_dir, data_dir, out, *extra) -> int:
    return summarize.main(["--model", str(model_dir), "--tokenizer", TOKENIZER, "--data", str(data_dir), "--out", str(out),
                           "--batch-size", "2", "--eval-samples", "2", "--eval-batch-size", "2", "--max-source-len", "48",
                           "--max-target-len", "8", "--lr", "1e-2", *extra])


def test_lora_end_to_end(model_dir, data_dir, tmp_path):
    out = tmp_path / "lora"
    assert _run(model_dir, data_dir, out, "--method", "lora", "--steps", "3", "--lora-r", "4", "--merge") == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("method", "base", "tuned", "trainable_params", "total_params", "adapter_bytes", "train_seconds", "peak_memory_bytes", "final_loss"):
        assert key in results, key
    assert set(results["tuned"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert 0 < results["trainable_params"] < results["total_params"]
    phases = results["phase_seconds"]  # the whole command's time, phase by phase, in the order they ran
    assert list(phases) == ["load", "base_eval", "setup", "train", "save", "tuned_eval"] and all(t >= 0 for t in phases.values())
    assert phases["train"] >= results["train_seconds"] > 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in metrics)
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and {"reference", "base", "tuned"} <= set(predictions[0])


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_a_gemma_model_runs_end_to_end(data_dir, tmp_path, method):
    """A tiny random Gemma 3 directory: its family comes from config.json, its PEFT defaults are HF PEFT's for Gemma,
    packed training, generation and the adapter and merged exports all run."""
    from tests.models.test_gemma import make_hf_gemma

    make_hf_gemma(tmp_path / "gemma", vocab_size=32128, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, layer_types=["sliding_attention", "full_attention"])
    out = tmp_path / method
    lookup = ["--prompt-lookup", "3"] if method == "ia3" else ["--prompt-lookup", "0"]  # evaluation with and without drafts
    assert _run(tmp_path / "gemma", data_dir, out, "--method", method, "--steps", "2", "--merge", "--skip-base-eval", *lookup) == 0
    assert set(json.loads((out / "results.json").read_text())["tuned"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == (["q_proj", "v_proj"] if method == "lora" else ["down_proj", "q_proj", "v_proj"])
    assert json.loads((out / "merged" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]


@pytest.mark.parametrize("method", ["none", "full", "prompt", "ia3", "adapter", "selective"])
def test_every_method_runs(model_dir, data_dir, tmp_path, method):
    extra = ["--select-layer-norms"] if method == "selective" else []
    assert _run(model_dir, data_dir, tmp_path / method, "--method", method, "--steps", "2", "--skip-base-eval", *extra) == 0
    results = json.loads((tmp_path / method / "results.json").read_text())
    assert ("tuned" in results) == (method != "none")


@pytest.mark.parametrize("family", ["t5", "gemma"])
@pytest.mark.parametrize("method,peft_type", [("dora", "LORA"), ("loha", "LOHA"), ("lokr", "LOKR"), ("ptuning", "P_TUNING"),
                                              ("prefix", "PREFIX_TUNING")])
def test_the_newer_methods_train_save_and_merge(model_dir, data_dir, tmp_path, capsys, family, method, peft_type):
    """Each method trains (packed rows on the decoder, except soft prompts), saves a PEFT adapter of its type, merges
    where it can; a soft prompt reports its learned tokens' nearest vocabulary tokens."""
    from tests.models.test_gemma import make_hf_gemma

    model = model_dir
    if family == "gemma":
        model = tmp_path / "gemma"
        make_hf_gemma(model, vocab_size=32128, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=8, layer_types=["sliding_attention", "full_attention"])
    extra = {"ptuning": ["--encoder-type", "lstm", "--num-virtual-tokens", "3"],
             "prefix": ["--prefix-projection", "--num-virtual-tokens", "3"]}.get(method, ["--merge", "--lora-r", "4"])
    out = tmp_path / method
    if (family, method) == ("t5", "prefix"):  # this tiny T5's heads (2 x 4) do not span d_model 16, as PEFT's prefix needs
        err = _error(capsys, _run(model, data_dir, out, "--method", method, "--steps", "2", "--skip-base-eval", *extra))
        assert "prefix tuning needs num_heads * d_kv == d_model" in err
        return
    assert _run(model, data_dir, out, "--method", method, "--steps", "2", "--skip-base-eval", *extra) == 0
    results = json.loads((out / "results.json").read_text())
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == peft_type
    if method == "dora":
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    if method == "ptuning":
        assert len(results["nearest_tokens"]) == 3 and all(len(near) == 5 for near in results["nearest_tokens"])
    elif method == "prefix":
        assert json.loads((out / "adapter" / "adapter_config.json").read_text())["prefix_projection"] is True
    else:
        assert (out / "merged" / "model.safetensors").is_file()


def test_resume_continues_the_same_run_and_a_damaged_checkpoint_says_how_to_go_on(model_dir, data_dir, tmp_path, capsys):
    import shutil

    from tests.conftest import damage_file

    common = ("--method", "lora", "--eval-samples", "0", "--save-every", "1", "--seed", "3")
    assert _run(model_dir, data_dir, tmp_path / "whole", *common, "--steps", "4") == 0
    split = tmp_path / "split"
    assert _run(model_dir, data_dir, split, *common, "--steps", "2") == 0
    # Step 2's checkpoint cut short (a full disk, a copy interrupted): the error says so and how to go on, before training.
    damage_file(split / "checkpoints" / "2" / "state" / "_METADATA", "truncate")
    capsys.readouterr()
    err = _error(capsys, _run(model_dir, data_dir, split, *common, "--steps", "4")).strip().splitlines()[-1]
    assert err.startswith(f"error: checkpoint {split / 'checkpoints'}/2 is damaged (") and err.endswith(
        f"delete {split / 'checkpoints' / '2'} to go on from step 1, the checkpoint before it; or rerun with --overwrite to start the run afresh")
    shutil.rmtree(split / "checkpoints" / "2")
    assert _run(model_dir, data_dir, split, *common, "--steps", "4") == 0  # resumes at step 1: steps 2 to 4 again
    losses = lambda d: {m["step"]: m["loss"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    whole, split = losses(tmp_path / "whole"), losses(split)
    assert sorted(split) == [1, 2, 3, 4]
    for step in (2, 3, 4):
        assert split[step] == pytest.approx(whole[step], abs=1e-5)


def _error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_clear_errors(model_dir, data_dir, tmp_path, capsys):
    assert "does not exist" in _error(capsys, _run(model_dir, tmp_path / "missing.jsonl", tmp_path / "o1"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"dialogue": "hi there"}) + "\n" + json.dumps({"dialogue": "x", "summary": "y"}) + "\n")
    assert "example 0 has no 'summary' text" in _error(capsys, _run(model_dir, bad, tmp_path / "o2"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no examples" in _error(capsys, _run(model_dir, empty, tmp_path / "o3"))
    assert "unknown method" in _error(capsys, _run(model_dir, data_dir, tmp_path / "o4", "--method", "magic"))
    assert "not a model directory" in _error(capsys, _run(tmp_path / "nope", data_dir, tmp_path / "o5"))
    assert "offline" in _error(capsys, _run("someone/some-model", data_dir, tmp_path / "o6"))
    assert "pass local files" in _error(capsys, _run(model_dir, "someone/some-dataset", tmp_path / "o7"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(model_dir, data_dir, tmp_path, capsys, monkeypatch):
    import optax

    from train import trainer

    monkeypatch.setattr(trainer, "make_optimizer", lambda cfg, steps: optax.sgd(float("nan")))  # step 1's update poisons the weights
    out = tmp_path / "nan"
    err = _error(capsys, _run(model_dir, data_dir, out, "--method", "lora", "--steps", "3", "--eval-samples", "0", "--save-every", "1"))
    assert "loss became nan at step 2" in err and "checkpoint" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_overlong_inputs_warn_once_with_a_count(model_dir, data_dir, tmp_path, capsys):
    code = summarize.main(["--model", str(model_dir), "--tokenizer", TOKENIZER, "--data", str(data_dir), "--out", str(tmp_path / "w"),
                           "--method", "none", "--eval-samples", "1", "--eval-batch-size", "1", "--max-source-len", "24",
                           "--max-target-len", "4"])
    assert code == 0
    warning_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: truncated")]
    assert len(warning_lines) == 2 and "12 of 12 inputs" in warning_lines[0] and "1 of 1 inputs" in warning_lines[1]


def test_lab_writes_table_charts_and_rank_study(model_dir, data_dir, tmp_path):
    from train import lab

    code = lab.main(["--methods", "none,lora,ia3,prompt", "--ranks", "2,4", "--lora-r", "4", "--lora-alpha", "8", "--out", str(tmp_path / "lab"),
                     "--model", str(model_dir), "--tokenizer", TOKENIZER, "--data", str(data_dir), "--steps", "2", "--batch-size", "2",
                     "--eval-samples", "2", "--eval-batch-size", "2", "--max-source-len", "48", "--max-target-len", "8"])
    assert code == 0
    table = (tmp_path / "lab" / "table.md").read_text()
    assert "base (no training)" in table and "| lora | 0.001 |" in table and "| ia3 | 0.003 |" in table and "| lora-r2 |" in table
    ranks = (tmp_path / "lab" / "ranks.md").read_text().splitlines()
    assert [line.split("|")[1:3] for line in ranks[2:]] == [[" 2 ", " 4 "], [" 4 ", " 8 "]]  # the lora run is rank 4; alpha/r kept
    rows = {r["name"]: r for r in json.loads((tmp_path / "lab" / "lab.json").read_text())}
    assert rows["lora-r2"]["trainable_params"] * 2 == rows["lora"]["trainable_params"]
    assert json.loads((tmp_path / "lab" / "lora-r2" / "run.json").read_text())["settings"]["lora_alpha"] == 4
    tokens = (tmp_path / "lab" / "prompt_tokens.md").read_text().splitlines()
    assert len(tokens) == 2 + 5 and all(line.startswith("| prompt |") and line.count("`") == 2 * 5 for line in tokens[2:])
    for chart in ("rouge.png", "ranks.png"):
        assert (tmp_path / "lab" / chart).stat().st_size > 0


def test_each_run_reports_its_own_peak_memory():
    """A lab runs several methods in one process: the peak is restarted per run, not the process's peak so far."""
    import resource

    import numpy as np

    from train import run_dir

    big = np.ones(2**30 // 8)  # 1 GiB resident
    del big
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run_dir.reset_peak_memory()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < before - 2**29


def test_lab_plan_learning_rates_and_variants():
    from train import lab

    runs = dict(lab.plan(lab.parser().parse_args(["--methods", "none,full,qlora,prompt", "--ranks", "8,16"])))
    assert list(runs) == ["none", "full", "qlora", "prompt", "lora-r8", "lora-r16"]
    assert (runs["full"].lr, runs["qlora"].lr, runs["prompt"].lr) == (5e-5, 1e-3, 3e-2)
    assert (runs["qlora"].method, runs["qlora"].quantize, runs["prompt"].quantize) == ("lora", "nf4", None)
    assert (runs["lora-r8"].lora_r, runs["lora-r8"].lora_alpha) == (8, 16)
    runs = dict(lab.plan(lab.parser().parse_args(["--methods", "lora,ia3", "--lr", "1e-3", "--ranks", "16"])))
    assert list(runs) == ["lora", "ia3"] and {r.lr for r in runs.values()} == {1e-3}  # rank 16 is the lora run itself
    runs = dict(lab.plan(lab.parser().parse_args(["--methods", "none,qlora,ia3,prompt", "--ranks", "8", "--export-gguf", "adapter,merged"])))
    assert {name: r.export_gguf for name, r in runs.items()} == {"none": [], "qlora": ["adapter", "merged"], "ia3": ["merged"], "prompt": [],
                                                               "lora-r8": ["adapter", "merged"]}  # each run what it can


def test_mesh_run_logs_the_same_losses(model_dir, data_dir, tmp_path):
    import os
    import subprocess
    import sys

    def losses(out):
        return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    args = ["--model", str(model_dir), "--tokenizer", TOKENIZER, "--data", str(data_dir), "--batch-size", "4", "--steps", "3",
            "--method", "lora", "--eval-samples", "0", "--max-source-len", "48", "--max-target-len", "8", "--lr", "1e-2"]
    env = {**os.environ, "XLA_FLAGS": f"{FAST_COMPILE} --xla_force_host_platform_device_count=8"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "train.summarize", *args, "--out", str(tmp_path / "mesh"), "--mesh", "data=2,fsdp=2,model=2"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summarize.main([*args, "--out", str(tmp_path / "single")]) == 0
    mesh, single = losses(tmp_path / "mesh"), losses(tmp_path / "single")
    assert len(mesh) == 3 and max(abs(a - b) for a, b in zip(mesh, single)) <= 1e-4


@pytest.fixture
def no_loading(monkeypatch):
    """Make loading weights (or evaluating) a test failure: the checks under test must come first."""
    from train import tasks

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(tasks, "load_task", refuse)
    monkeypatch.setattr(summarize, "execute", refuse)


@pytest.mark.parametrize("extra,words", [
    (["--mesh", "data=2,fsdp=2,model=2"], "XLA_FLAGS=--xla_force_host_platform_device_count=8"),
    (["--mesh", "tensor=2"], "expected name=size"),
    (["--method", "lora", "--lora-targets", "nope"], "--method lora: target_modules=['nope'] matches no module. Module names in this model"),
    (["--method", "ia3", "--ia3-targets", "q_proj"], "matches no module"),
    (["--method", "lora", "--lora-targets", "q,vv"], "--method lora: target_modules=['q', 'vv']: 'vv' matches no module. 'vv': did you mean 'v'?"),
    (["--method", "ia3", "--ia3-targets", "k,v,wo,kk"], "target_modules=['k', 'v', 'wo', 'kk']: 'kk' matches no module. 'kk': did you mean 'k'?"),
    (["--modules-to-save", "shraed"], "modules_to_save=['shraed'] matches no module. 'shraed': did you mean 'shared'?"),
    (["--method", "selective", "--select-modules", "nothing"], "--method selective: target_modules=['nothing'] matches no module"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--batch-size", "-2"], "--batch-size must be at least 1"),
    (["--eval-samples", "-1"], "--eval-samples must be at least 0"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1)"),
    (["--warmup-steps", "5", "--steps", "5"], "leaves no training after warmup"),
    (["--prompt", "Summarize this."], "must contain {input} exactly once"),
    (["--input-field", "text"], "has no 'text' column (its columns: 'id', 'dialogue', 'summary', 'topic'); name the right one with --input-field"),
], ids=["mesh-devices", "mesh-syntax", "lora-targets", "ia3-targets", "lora-target-typo", "ia3-target-typo", "modules-to-save-typo", "selective", "steps", "batch", "eval-samples", "lr", "dropout",
        "warmup", "prompt", "field"])
def test_mistakes_are_reported_before_the_model_loads(model_dir, data_dir, tmp_path, capsys, no_loading, extra, words):
    err = _error(capsys, _run(model_dir, data_dir, tmp_path / "o", *extra))
    assert words in err and len(err.strip().splitlines()) == 1


def _results(out):
    return (out / "results.json").read_bytes()


def test_run_directory_resumes_only_the_same_run(model_dir, data_dir, tmp_path, capsys):
    import shutil

    out, data_dir = tmp_path / "run", shutil.copytree(data_dir, tmp_path / "data")
    common = ("--method", "lora", "--lora-r", "4", "--steps", "2", "--eval-samples", "1", "--eval-batch-size", "1")
    assert _run(model_dir, data_dir, out, *common) == 0
    first, settings = _results(out), json.loads((out / "run.json").read_text())
    assert settings["complete"] and settings["settings"]["lora_r"] == 4 and settings["settings"]["train_examples"]["count"] == 12
    capsys.readouterr()

    # The same settings again: reported as done, nothing retrained, results.json untouched (evaluation options may differ).
    assert _run(model_dir, data_dir, out, *common, "--eval-samples", "2") == 0
    assert "already holds this run, complete" in capsys.readouterr().out
    assert _results(out) == first

    # A run directory from before an option existed resumes: the option it does not record counts as its default.
    record = json.loads((out / "run.json").read_text())
    del record["settings"]["rslora"]
    (out / "run.json").write_text(json.dumps(record))
    assert _run(model_dir, data_dir, out, *common) == 0 and "already holds this run, complete" in capsys.readouterr().out
    assert "--rslora false -> true" in _error(capsys, _run(model_dir, data_dir, out, *common, "--rslora"))

    # Other settings: one line naming each difference and the two ways out; the run is left as it was.
    for extra, change in ((["--lora-r", "8"], "--lora-r 4 -> 8"), (["--lr", "0.5"], "--lr 0.01 -> 0.5"),
                          (["--steps", "3", "--schedule", "linear"], '--schedule "constant" -> "linear"; --steps 2 -> 3')):
        err = _error(capsys, _run(model_dir, data_dir, out, *common, *extra))
        assert change in err and "use a new --out" in err and "--overwrite" in err, err
    edited = (data_dir / "train.jsonl").read_text().replace("seven", "eight")  # same file, other examples
    (data_dir / "train.jsonl").write_text(edited)
    assert "training data (12 examples, sha256" in _error(capsys, _run(model_dir, data_dir, out, *common))
    assert _results(out) == first

    # --overwrite trains the new settings from scratch.
    assert _run(model_dir, data_dir, out, *common, "--lora-r", "8", "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["settings"]["lora_r"] == 8
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_run_directory_without_its_settings_is_not_resumed(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "old"
    (out / "checkpoints" / "3").mkdir(parents=True)
    err = _error(capsys, _run(model_dir, data_dir, out, "--steps", "1"))
    assert "holds an earlier run (checkpoints) without its run.json" in err


def test_help_shows_defaults_and_the_run_shows_its_plan_and_outputs(model_dir, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        summarize.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("usage: jpeft-summarize", "--lr LR peak learning rate (default: 0.0002)", "(default: 8)", "(default: runs/summarize)",
                  "(default: 'Summarize the following conversation.\\n\\n{input}\\n\\nSummary: ')",
                  "--weight-decay WEIGHT_DECAY decoupled weight decay (default: 0.0)", "--warmup-steps WARMUP_STEPS linear warmup steps (default: 0)",
                  "--seed SEED seed for initialisation, batches and dropout (default: 0)", "(0: about 4 per run) (default: 0)",
                  "gguf to keep a .gguf model's own blocks packed (default: none, the base stays float)",
                  "(more memory; default: recompute)", "into few rows (default: pack)", "beside the method (default: none)",
                  "decoder-only models only (default: none)"):
        assert words in text, words
    assert "(default: True)" not in text and "(default: )" not in text  # a flag's default reads as if it were given
    assert text.split("options: ")[1].split(" model and data: ")[0] == "-h, --help show this help message and exit"
    # a --dtype bfloat16 base trains float32 LoRA masters, and saves them so
    assert _run(model_dir, data_dir, tmp_path / "p", "--method", "lora", "--steps", "2", "--eval-samples", "0", "--dtype", "bfloat16") == 0
    out = capsys.readouterr().out
    assert "plan: lora on" in out and "2 optimizer steps x 2 examples" in out and "trainable parameters:" in out
    assert f"wrote {tmp_path / 'p'}/: run.json, results.json, metrics.jsonl" in out
    from safetensors.numpy import load_file

    assert {v.dtype.name for v in load_file(tmp_path / "p" / "adapter" / "adapter_model.safetensors").values()} == {"float32"}


def test_lab_has_its_own_help_and_checks_every_run_first(model_dir, data_dir, tmp_path, capsys, no_loading):
    from train import lab

    with pytest.raises(SystemExit):
        lab.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: jpeft-lab" in text and "--methods METHODS" in text
    assert "(default:none,full,lora,dora,loha,lokr,qlora,prompt,ptuning,prefix,ia3,adapter)" in text.replace(" ", "")  # wrapped anywhere
    assert "(default: runs/lab)" in text and "[--method METHOD]" not in text
    assert "--lr LR peak learning rate for every method (default: each method's own: full 5e-05, lora 0.001, qlora 0.001," in text
    assert "see the table" not in text and "--export-gguf {adapter,merged}" in text
    common = ["--model", str(model_dir), "--tokenizer", TOKENIZER, "--data", str(data_dir), "--out", str(tmp_path / "lab")]
    assert "unknown method 'lorra'; choose from none, full, lora, dora, loha, lokr, prompt, ptuning, prefix, ia3, adapter, selective, qlora" in \
        _error(capsys, lab.main([*common, "--methods", "none,lorra"]))
    assert "--export-gguf adapter: no run of --methods none,prompt can be exported so" in \
        _error(capsys, lab.main([*common, "--methods", "none,prompt", "--export-gguf", "adapter"]))
    assert "matches no module" in _error(capsys, lab.main([*common, "--methods", "none,lora", "--lora-targets", "nope"]))
    assert "--steps must be at least 1" in _error(capsys, lab.main([*common, "--steps", "0"]))
    assert "--ranks '4,x' must be comma-separated whole numbers" in _error(capsys, lab.main([*common, "--ranks", "4,x"]))


def test_parquet_with_other_columns_and_a_prompt_template(model_dir, tmp_path, capsys):
    """Also: a held-out split smaller than --eval-samples says how many it scores and why, and a quantized base is named."""
    import datasets

    rows = [{"document": d, "summary": s, "id": f"x{i}"} for i, (d, s) in enumerate(DIALOGUES * 3)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "xsum_like.parquet"))
    out = tmp_path / "pq"
    code = summarize.main(["--model", str(model_dir), "--tokenizer", TOKENIZER, "--data", str(tmp_path / "xsum_like.parquet"),
                           "--input-field", "document", "--target-field", "summary", "--prompt", "Summarize: {input}",
                           "--out", str(out), "--batch-size", "2", "--steps", "1", "--eval-samples", "50", "--eval-batch-size", "1",
                           "--max-source-len", "48", "--max-target-len", "8", "--quantize", "int8", "--skip-base-eval"])
    assert code == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["x0"] and predictions[0]["reference"] == DIALOGUES[0][1]  # the held-out first 10%
    captured = capsys.readouterr()
    assert (f"scoring 1 example: all there are in the first 10% of {tmp_path / 'xsum_like.parquet'}, held out as no --eval-data was "
            "given; --eval-samples 50 asked for more") in captured.out
    assert ("warning: ROUGE over 1 example is a noisy figure (one summary moves it by points); score 20 or more: pass more evaluation "
            "examples with --eval-data") in captured.err
    assert f"plan: lora on {model_dir} quantized to int8, 1 optimizer steps" in captured.out
    results = json.loads((out / "results.json").read_text())
    assert (results["method"], results["quantize"], results["eval_examples"]) == ("lora", "int8", 1)


def test_a_prompt_template_reaches_the_tokens(model_dir):
    from train import data, tasks

    task, _ = tasks.load_task(str(model_dir), TOKENIZER, "float32")
    rows = data.normalize([{"text": "hello there", "gist": "hi"}], "rows", "text", "gist")
    # Other braces are literal text, not format fields (T5's vocabulary has no "{": it decodes without them).
    (plain,), (custom,) = (tasks.encode(task, rows, 48, 8, p) for p in ("{input}", "Summarize: {input} {x} (done)"))
    words = lambda ids: task.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    assert words(plain["source"]) == "hello there" and words(custom["source"]) == "Summarize: hello there x (done)"


@pytest.mark.parametrize("as_dataset", [True, False], ids=["datasets.Dataset", "list-of-dicts"])
def test_python_api_takes_rows_in_memory(model_dir, tmp_path, as_dataset):
    import datasets

    rows = [{"text": d, "gist": s} for d, s in DIALOGUES * 3]
    train = datasets.Dataset.from_list(rows) if as_dataset else rows
    results = summarize.finetune(train, rows[:2], model=str(model_dir), tokenizer=TOKENIZER, input_field="text", target_field="gist",
                                 method="lora", lora_r=2, steps=2, batch_size=2, eval_samples=2, eval_batch_size=2,
                                 max_source_len=48, max_target_len=8, out=str(tmp_path / "api"))
    assert results["eval_examples"] == 2 and set(results["tuned"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    recorded = json.loads((tmp_path / "api" / "run.json").read_text())["settings"]
    assert recorded["data"] == ("<Dataset>" if as_dataset else "<list>") and recorded["train_examples"]["count"] == 12
    with pytest.raises(TypeError, match="unknown options \\['lora_rank'\\]"):
        summarize.finetune(train, lora_rank=4)
    with pytest.raises(UsageError, match="example 1 has no 'gist' text"):
        summarize.finetune([rows[0], {"text": "x", "gist": ""}], model=str(model_dir), input_field="text", target_field="gist")


def test_export_gguf_writes_llama_cpp_files(model_dir, data_dir, tmp_path):
    """--export-gguf adapter,merged on a tiny Llama GGUF: adapter.gguf reads back as the HF PEFT adapter saved beside it,
    merged.gguf as that adapter merged (f16); a T5 model is refused before anything loads."""
    import numpy as np
    import transformers

    import jpeft
    from jpeft import tree
    from jpeft.models import llama
    from tests.formats.test_gguf_io import write_gguf

    config = transformers.LlamaConfig(vocab_size=32128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    base = llama.init_params(config, __import__("jax").random.key(0))
    write_gguf(tmp_path / "tiny.gguf", config, llama.state_dict_from_params(config, base), types={})
    out = tmp_path / "run"
    assert _run(tmp_path / "tiny.gguf", data_dir, out, "--method", "lora", "--steps", "2", "--eval-samples", "0",
                "--export-gguf", "adapter,merged") == 0
    _, base = llama.load_pretrained(tmp_path / "tiny.gguf")
    want = jpeft.load_adapter(out / "adapter", base)
    got = tree.flatten(jpeft.gguf.load_adapter(out / "adapter.gguf", base))
    assert sorted(got) == sorted(tree.flatten(want))
    for path, value in tree.flatten(want).items():
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=path)
    _, merged = llama.load_pretrained(out / "merged.gguf")
    for path, value in tree.flatten(jpeft.lora.merge(want)).items():
        np.testing.assert_allclose(np.asarray(tree.flatten(merged)[path]), np.asarray(value), atol=2e-3, err_msg=path)
    # A base kept quantized exports its merged model dequantized, as --merge does.
    assert _run(tmp_path / "tiny.gguf", data_dir, tmp_path / "int8", "--method", "lora", "--steps", "1", "--eval-samples", "0",
                "--quantize", "int8", "--export-gguf", "merged") == 0
    assert llama.load_pretrained(tmp_path / "int8" / "merged.gguf")[1]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].shape == (32, 32)
    with pytest.raises(SystemExit):
        summarize.parser().parse_args(["--export-gguf", "lora"])
    assert _run(model_dir, data_dir, tmp_path / "t5", "--export-gguf", "adapter") == 2


def test_plan_and_memory_budget(model_dir, data_dir, tmp_path, capsys):
    """--plan prints one step's bytes per device (compiled from shapes) and exits without a run directory; --memory-budget
    says which settings fit (what nothing fits says: tests/test_planning.py). (--dtype bfloat16: the help test's run.)"""
    assert _run(model_dir, data_dir, tmp_path / "p", "--method", "lora", "--plan", "--memory-budget", "10GB") == 0
    out = capsys.readouterr().out
    assert "memory plan: batch 2 x 48 tokens (8 scored), float32 base, remat on, 1 device" in out and "optimizer state" in out
    assert "memory budget 10GB: micro-batch 2 x 1 accumulated, remat off, quantize none" in out
    assert not (tmp_path / "p").exists()
    assert _run(model_dir, data_dir, tmp_path / "p", "--memory-budget", "lots") == 2
    assert "error: --memory-budget lots: cannot read 'lots' as a size" in capsys.readouterr().err
