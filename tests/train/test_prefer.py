"""The preference and GRPO commands end to end on a tiny random Llama: training, metrics, plots, resume, adapter export,
evaluation, and clear errors."""

from __future__ import annotations

import json

import pytest

from tests.train.test_summarize import DIALOGUES, TOKENIZER, pytestmark  # noqa: F401  (skipped without the shared T5 tokenizer)
from train import grpo, prefer

COMMON = ["--tokenizer", TOKENIZER, "--batch-size", "2", "--eval-batch-size", "2", "--max-source-len", "48", "--max-target-len", "8",
          "--lr", "1e-2", "--lora-r", "4", "--chat-template", "no"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, preference file, summarization dir) of a tiny Llama on the T5 tokenizer's vocabulary."""
    from tests.models.test_llama import make_hf_llama

    root = tmp_path_factory.mktemp("prefer")
    make_hf_llama(root / "llama", vocab_size=32128, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1)
    with (root / "prefs.jsonl").open("w") as f:
        for i in range(10):
            dialogue, summary = DIALOGUES[i % len(DIALOGUES)]
            f.write(json.dumps({"question": dialogue, "good": summary, "bad": DIALOGUES[(i + 1) % len(DIALOGUES)][1]}) + "\n")
    (root / "dialogsum").mkdir()
    for split, n in (("train", 6), ("validation", 2)):
        with (root / "dialogsum" / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{split}{i}", "dialogue": DIALOGUES[i % 4][0], "summary": DIALOGUES[i % 4][1]}) + "\n")
    return root


def _prefer(setup, out, *extra) -> int:
    return prefer.main(["--model", str(setup / "llama"), "--data", str(setup / "prefs.jsonl"), "--out", str(out), "--prompt-field", "question",
                        "--chosen-field", "good", "--rejected-field", "bad", *COMMON, *extra])


def test_dpo_trains_logs_its_metrics_and_scores(setup, tmp_path, capsys):
    """DPO on packed pairs with the reference scored once beforehand; held-out pairs and ROUGE scored; a rerun of the
    finished run is reported, not redone (train.summarize's run directories)."""
    out = tmp_path / "dpo"
    args = ["--loss", "dpo", "--precompute-reference", "--rouge-data", str(setup / "dialogsum"), "--eval-samples", "2",
            "--prompt", "Summarize the following conversation.\n\n{input}\n\nSummary: "]
    assert _prefer(setup, out, *args, "--steps", "3", "--skip-base-eval") == 0
    results = json.loads((out / "results.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logits/chosen"} <= set(metrics[0])
    assert results["tuned_pairs"]["rewards/margins"] != 0 and set(results["tuned"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert len([json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]) == 2
    assert (out / "loss.png").stat().st_size > 0 and (out / "adapter" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert _prefer(setup, out, *args, "--steps", "3", "--skip-base-eval") == 0
    assert "already holds this run, complete" in capsys.readouterr().out


def test_grpo_with_a_rouge_reward(setup, tmp_path):
    out = tmp_path / "grpo"
    assert grpo.main(["--model", str(setup / "llama"), "--data", str(setup / "dialogsum"), "--out", str(out), *COMMON, "--steps", "4",
                      "--group", "2", "--num-iterations", "2", "--beta", "0.05", "--eval-samples", "0"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all({"reward", "kl", "clip_ratio/region_mean"} <= set(m) for m in metrics)
    assert metrics[0]["reward"] == metrics[1]["reward"]  # two optimizer steps on each rollout
    assert (out / "loss.png").stat().st_size > 0 and (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("command,args,message", [
    ("prefer", ["--rejected-field", "worse"], "has no 'worse' column (its columns: 'question', 'good', 'bad'); name the right one with --rejected-field"),
    ("prefer", ["--method", "full"], "add --precompute-reference"),
    ("prefer", ["--loss", "robust", "--label-smoothing", "0.7"], "label_smoothing=0.7"),
    ("grpo", ["--group", "1"], "--group must be at least 2"),
    ("grpo", ["--top-p", "0"], "top_p=0.0"),
])
def test_mistakes_are_one_line(setup, tmp_path, capsys, command, args, message):
    if command == "prefer":
        code = _prefer(setup, tmp_path / "x", *args)
    else:
        code = grpo.main(["--model", str(setup / "llama"), "--data", str(setup / "dialogsum"), "--out", str(tmp_path / "x"), *COMMON, *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
