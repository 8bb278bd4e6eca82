"""The summarization CLI end to end at a tiny size: every method, resume, outputs, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHARED, make_hf_t5
from train import summarize

pytestmark = pytest.mark.skipif(not (SHARED / "tokenizers" / "t5").is_dir(), reason="needs ../shared/tokenizers/t5")

TOKENIZER = str(SHARED / "tokenizers" / "t5")
DIALOGUES = [
    ("#Person1#: Can I book a table for two at seven? #Person2#: Yes, we have a window table free.",
     "#Person1# books a table for two at seven."),
    ("#Person1#: My luggage did not arrive. #Person2#: Please fill in this form and we will call you.",
     "#Person1#'s luggage is lost and #Person2# takes a report."),
    ("#Person1#: How much is the blue jacket? #Person2#: It is forty dollars today.",
     "#Person1# asks the price of a jacket, which is forty dollars."),
    ("#Person1#: Where is the station? #Person2#: Go straight and turn left at the bank.",
     "#Person2# tells #Person1# the way to the station."),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_t5")
    make_hf_t5(path, vocab_size=32128, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    for split, n in (("train", 12), ("validation", 4)):
        with (path / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                d, s = DIALOGUES[i % len(DIALOGUES)]
                f.write(json.dumps({"id": f"{split}{i}", "dialogue": d, "summary": s, "topic": "t"}) + "\n")
    return path


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
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in metrics)
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "merged" / "model.safetensors").is_file()
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 and {"reference", "base", "tuned"} <= set(predictions[0])


@pytest.mark.parametrize("method", ["none", "full", "prompt", "ia3", "adapter", "selective"])
def test_every_method_runs(model_dir, data_dir, tmp_path, method):
    extra = ["--select-layer-norms"] if method == "selective" else []
    assert _run(model_dir, data_dir, tmp_path / method, "--method", method, "--steps", "2", "--skip-base-eval", *extra) == 0
    results = json.loads((tmp_path / method / "results.json").read_text())
    assert ("tuned" in results) == (method != "none")


def test_resume_continues_the_same_run(model_dir, data_dir, tmp_path):
    common = ("--method", "lora", "--eval-samples", "0", "--save-every", "1", "--seed", "3")
    assert _run(model_dir, data_dir, tmp_path / "whole", *common, "--steps", "4") == 0
    assert _run(model_dir, data_dir, tmp_path / "split", *common, "--steps", "2") == 0
    assert _run(model_dir, data_dir, tmp_path / "split", *common, "--steps", "4") == 0
    losses = lambda d: {m["step"]: m["loss"] for m in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(split) == [1, 2, 3, 4]
    for step in (3, 4):
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


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "nan"
    code = _run(model_dir, data_dir, out, "--method", "lora", "--steps", "3", "--eval-samples", "0", "--save-every", "1",
                "--lr", "nan", "--clip-norm", "0")
    err = _error(capsys, code)
    assert "loss became nan at step 2" in err and "checkpoint" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_overlong_inputs_warn_once_with_a_count(model_dir, data_dir, tmp_path, capsys):
    code = summarize.main(["--model", str(model_dir), "--tokenizer", TOKENIZER, "--data", str(data_dir), "--out", str(tmp_path / "w"),
                           "--method", "none", "--eval-samples", "1", "--eval-batch-size", "1", "--max-source-len", "24",
                           "--max-target-len", "4"])
    assert code == 0
    warning_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: truncated")]
    assert len(warning_lines) == 2 and "12 of 12 dialogues" in warning_lines[0] and "1 of 1 dialogues" in warning_lines[1]


def test_lab_writes_table_and_chart(model_dir, data_dir, tmp_path):
    from train import lab

    code = lab.main(["--methods", "none,lora,ia3", "--out", str(tmp_path / "lab"), "--model", str(model_dir), "--tokenizer", TOKENIZER,
                     "--data", str(data_dir), "--steps", "2", "--batch-size", "2", "--eval-samples", "2", "--eval-batch-size", "2",
                     "--max-source-len", "48", "--max-target-len", "8"])
    assert code == 0
    table = (tmp_path / "lab" / "table.md").read_text()
    assert "base (no training)" in table and "| lora |" in table and "| ia3 |" in table
    assert (tmp_path / "lab" / "rouge.png").stat().st_size > 0


def test_mesh_run_logs_the_same_losses(model_dir, data_dir, tmp_path):
    import os
    import subprocess
    import sys

    def losses(out):
        return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]

    args = ["--model", str(model_dir), "--tokenizer", TOKENIZER, "--data", str(data_dir), "--batch-size", "4", "--steps", "3",
            "--method", "lora", "--eval-samples", "0", "--max-source-len", "48", "--max-target-len", "8", "--lr", "1e-2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "train.summarize", *args, "--out", str(tmp_path / "mesh"), "--mesh", "data=2,fsdp=2,model=2"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summarize.main([*args, "--out", str(tmp_path / "single")]) == 0
    mesh, single = losses(tmp_path / "mesh"), losses(tmp_path / "single")
    assert len(mesh) == 3 and max(abs(a - b) for a, b in zip(mesh, single)) <= 1e-4
