"""`train.generate` end to end: adapters trained here by `train.summarize` (a tiny T5, and the packaged SmolLM2) give
back the run's own predictions through every way in (run directory, merged model, PEFT directory, llama.cpp GGUF, a
mixed batch of adapters), and every mistake is one line before the model loads."""

from __future__ import annotations

import io
import json
import shutil

import jax
import pytest

import jpeft
from jpeft.models import t5
from tests.conftest import SHARED, needs_smollm
from tests.train.conftest import DIALOGUES, TOKENIZER
from train import generate, summarize, tasks

pytestmark = pytest.mark.skipif(not (SHARED / "tokenizers" / "t5").is_dir(), reason="needs ../shared/tokenizers/t5")
SMALL = ["--eval-batch-size", "2", "--limit", "2"]  # the run's own evaluation shapes: its compiled decoder is reused


@pytest.fixture(scope="module")
def run(model_dir, data_dir, tmp_path_factory):
    """A LoRA run of train.summarize (1 step), scored on the first 2 validation rows, with its merged model."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert summarize.main(["--model", str(model_dir), "--tokenizer", TOKENIZER, "--data", str(data_dir), "--out", str(out),
                           "--batch-size", "2", "--steps", "1", "--lr", "1e-2", "--eval-samples", "2", "--eval-batch-size", "2",
                           "--skip-base-eval", "--max-source-len", "48", "--max-target-len", "8", "--merge"]) == 0
    return out


def _tuned(run) -> list[str]:
    return [json.loads(line)["tuned"] for line in (run / "predictions.jsonl").read_text().splitlines()]


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_run_directory_and_its_merged_model_give_the_run_s_own_predictions(run, data_dir, tmp_path, capsys):
    """The run directory supplies model, tokenizer, prompt and lengths: the same rows give the run's summaries and ROUGE."""
    assert generate.main(["--adapter", str(run), "--data", str(data_dir), *SMALL, "--out", str(tmp_path / "out")]) == 0
    records = _lines((tmp_path / "out" / "predictions.jsonl").read_text())
    assert [r["id"] for r in records] == ["validation0", "validation1"] and [r["prediction"] for r in records] == _tuned(run)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["rouge"] == json.loads((run / "results.json").read_text())["tuned"] and results["examples"] == 2
    err = capsys.readouterr().err
    assert "scoring 2 examples: the first 2 examples of the 4 in --data" in err and "(--limit 2)" in err
    assert "warning: ROUGE over 2 examples is a noisy figure" in err and "raise --limit" in err

    # The merged model of the run, no adapter: the run's tokenizer and prompt again; predictions on stdout.
    assert generate.main(["--model", str(run / "merged"), "--data", str(data_dir), *SMALL]) == 0
    assert [r["prediction"] for r in _lines(capsys.readouterr().out)] == _tuned(run)


def test_a_plain_peft_directory_summarizes_text_from_stdin(run, model_dir, data_dir, tmp_path, capsys, monkeypatch):
    plain = shutil.copytree(run / "adapter", tmp_path / "my-adapter")  # no run directory around it: options say everything
    monkeypatch.setattr("sys.stdin", io.StringIO(DIALOGUES[0][0]))
    assert generate.main(["--model", str(model_dir), "--tokenizer", TOKENIZER, "--adapter", str(plain), "--text", "-",
                          "--max-source-len", "48", "--max-target-len", "8", "--eval-batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == _tuned(run)[:1] and "scoring" not in captured.err  # no reference: no ROUGE


def test_several_adapters_share_a_batch(run, model_dir, data_dir, tmp_path, capsys, monkeypatch):
    """Two LoRA adapters stacked (`jpeft.multi`): each example by its --adapter-field, or every example through each; an
    adapter's summaries are the same in either batch, and the run's adapter gives the run's own."""
    other = tmp_path / "other"  # the run's adapter with a larger update: another adapter, a plain PEFT directory
    trained = jpeft.load_adapter(run / "adapter", t5.load_pretrained(model_dir)[1])
    boosted = jax.tree_util.tree_map_with_path(lambda p, v: v * 40 if "lora_b" in jax.tree_util.keystr(p) else v, trained)
    jpeft.save_adapter(other, boosted)
    rows = [json.loads(line) for line in (data_dir / "validation.jsonl").read_text().splitlines()[:2]]
    mixed = [{**rows[0], "id": "x0", "who": "mine"}, {**rows[1], "id": "x1", "who": "other"}]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(json.dumps(r) + "\n" for r in mixed)))
    adapters = ["--adapter", f"mine={run}", "--adapter", f"other={other}"]
    assert generate.main([*adapters, "--data", "-", "--adapter-field", "who", "--eval-batch-size", "2"]) == 0
    by_field = {r["id"]: r for r in _lines(capsys.readouterr().out)}
    assert generate.main([*adapters, "--data", str(data_dir), *SMALL, "--out", str(tmp_path / "both")]) == 0
    both = {(r["id"], r["adapter"]): r["prediction"] for r in _lines((tmp_path / "both" / "predictions.jsonl").read_text())}
    assert [both[(f"validation{i}", "mine")] for i in (0, 1)] == _tuned(run)
    assert by_field["x0"]["prediction"] == both[("validation0", "mine")] and by_field["x1"]["prediction"] == both[("validation1", "other")]
    assert both[("validation1", "other")] != both[("validation1", "mine")]  # the second adapter really is another one
    assert set(json.loads((tmp_path / "both" / "results.json").read_text())["rouge"]) == {"mine", "other"}


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(tasks, "load_task", refuse)


def _error(capsys, code) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_mistakes_are_one_line_before_the_model_loads(run, data_dir, tmp_path, capsys, no_loading):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run / "run.json", unfinished / "run.json")
    dora = shutil.copytree(run / "adapter", tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    other_prompt = shutil.copytree(run, tmp_path / "other-prompt")
    record = json.loads((other_prompt / "run.json").read_text())
    record["settings"]["prompt"] = "Sum up: {input}"
    (other_prompt / "run.json").write_text(json.dumps(record))
    data = ["--data", str(data_dir)]
    cases = [
        (["--adapter", str(tmp_path / "missing"), *data], f"--adapter {tmp_path / 'missing'}: no such file or directory"),
        (["--adapter", str(data_dir), *data], "is neither an adapter (adapter_config.json of HF PEFT"),
        (["--adapter", str(unfinished), *data], "this run has not finished (it holds no adapter/ yet)"),
        (["--adapter", str(run)], "nothing to summarize: give --data FILE"),
        (["--adapter", str(run), *data, "--text", "hi"], "give the inputs as --data or as --text, not both"),
        (["--adapter", str(run), *data, "--adapter-field", "topic"], "--adapter-field picks each example's adapter among several"),
        (["--adapter", f"a={run}", "--adapter", f"b={run}", *data, "--adapter-field", "topic"], "examples name adapters ['t'], but the adapters are ['a', 'b']"),
        (["--adapter", str(run), "--adapter", str(dora), *data], "is DoRA: several adapters share a batch only as plain LoRA"),
        (["--adapter", str(run), "--adapter", f"b={other_prompt}", *data], "the runs given differ in --prompt"),
        (["--adapter", str(run), *data, "--prompt", "no slot"], "must contain {input} exactly once"),
        (["--adapter", str(run), *data, "--input-field", "text"], "has no 'text' column"),
        (["--adapter", str(run), *data, "--limit", "0"], "--limit must be at least 1"),
    ]
    for argv, words in cases:
        assert words in _error(capsys, generate.main(argv)), argv


def test_help_names_every_default(capsys):
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("usage: jpeft-generate", "--split SPLIT which file of a --data directory, or split of a hub dataset (default: validation)",
                  "--limit LIMIT run the first N examples (default: all)", "default: none, the model alone",
                  "a run directory given to --adapter, or holding --model, sets these defaults"):
        assert words in text, words


@needs_smollm
def test_smollm2_adapter_and_its_gguf_export_summarize_alike(data_dir, tmp_path, capsys):
    """The packaged SmolLM2 (chat template, packed training): the run directory and the llama.cpp adapter it exported
    give the same summary of an evaluation row, side by side in one batch."""
    out = tmp_path / "smol"
    assert summarize.main(["--model", "smollm2-135m-instruct", "--data", str(data_dir), "--out", str(out), "--batch-size", "2", "--steps", "1",
                           "--lora-r", "2", "--eval-samples", "0", "--max-source-len", "64", "--max-target-len", "4",
                           "--export-gguf", "adapter"]) == 0
    capsys.readouterr()
    # One load, one batch: the run's adapter and its llama.cpp export stacked (the .gguf lies in the run directory).
    assert generate.main(["--adapter", f"run={out}", "--adapter", f"gguf={out / 'adapter.gguf'}", "--data", str(data_dir),
                          "--limit", "1", "--eval-batch-size", "2"]) == 0
    run, gguf = _lines(capsys.readouterr().out)
    assert (run["adapter"], gguf["adapter"], run["id"], gguf["id"]) == ("run", "gguf", "validation0", "validation0")
    assert run["prediction"] == gguf["prediction"] and run["prediction"].strip()
