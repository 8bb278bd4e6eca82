"""Dialogue summarization on either model family: loading, prompts, tokenization, batches, loss and generation."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jpeft import packing, training
from jpeft.hf_io import CheckpointError
from jpeft.models import llama, registry, t5
from jpeft.tokenizer import load_tokenizer
from train.errors import UsageError

PROMPT = "Summarize the following conversation.\n\n{dialogue}\n\nSummary: "
MARK = "\x00DIALOGUE\x00"
BUCKET = 64  # padded lengths are multiples of this, so only a few shapes ever compile
IGNORE = training.IGNORE


@dataclasses.dataclass
class Task:
    """A loaded model family with its tokenizer: everything model-specific the CLI needs."""

    family: str  # "t5" (encoder-decoder) or "llama" (decoder-only)
    config: Any
    tokenizer: Any
    source: str

    @property
    def module(self):
        return t5 if self.family == "t5" else llama

    @property
    def eos_id(self) -> int:
        return t5.arch(self.config).eos_token_id if self.family == "t5" else llama.arch(self.config).eos_token_ids[0]

    @property
    def pad_id(self) -> int:
        return t5.arch(self.config).pad_token_id if self.family == "t5" else llama.arch(self.config).pad_token_id


def _family(path: Path) -> str:
    if path.suffix == ".gguf":
        return "llama"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{path} has no config.json")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type in ("t5", "mt5", "umt5"):
        return "t5"
    if model_type in ("llama", "mistral", "qwen2"):
        return "llama"
    raise UsageError(f"{config_file}: model_type {model_type!r} is not supported (T5 or a Llama-family decoder)")


def load_task(model: str, tokenizer: str | None, dtype: Any) -> tuple[Task, dict]:
    """(task, params) for a model directory, hub id, .gguf file or packaged short name."""
    from jpeft.hf_io import resolve_model_dir

    try:
        resolved = registry.resolve(model)
        path = Path(resolved) if Path(resolved).suffix == ".gguf" else resolve_model_dir(resolved)
        if path.suffix == ".gguf" and not path.is_file():
            raise UsageError(f"model file {path} does not exist")
        family = _family(path)
        module = t5 if family == "t5" else llama
        config, params = module.load_pretrained(path, dtype=dtype)
        tok = load_tokenizer(registry.resolve(tokenizer) if tokenizer else path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"could not load a tokenizer for {model} ({str(e).splitlines()[0][:200]}); pass --tokenizer DIR") from None
    return Task(family, config, tok, str(model)), params


def _frame(task: Task) -> tuple[list[int], list[int]]:
    """Token ids before and after the dialogue in the prompt (chat template for instruct models)."""
    text = PROMPT.format(dialogue=MARK)
    if task.family == "llama" and getattr(task.tokenizer, "chat_template", None):
        text = task.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    before, after = text.split(MARK)
    tok = task.tokenizer
    # Decoder-only tokenizers add their BOS (if any) at the very start; T5 ends the source with EOS.
    return (tok(before, add_special_tokens=task.family == "llama")["input_ids"],
            tok(after, add_special_tokens=False)["input_ids"] + ([task.eos_id] if task.family == "t5" else []))


def encode(task: Task, examples: list[dict], max_source: int, max_target: int) -> list[dict]:
    """Token ids per example: `source` (prompt with the dialogue cut to fit max_source) and `target` (summary + EOS)."""
    before, after = _frame(task)
    budget = max_source - len(before) - len(after)
    if budget <= 0:
        raise UsageError(f"--max-source-len {max_source} leaves no room for the dialogue (the prompt alone takes {len(before) + len(after)} tokens)")
    if not examples:
        return []
    dialogues = task.tokenizer([e["dialogue"] for e in examples], add_special_tokens=False)["input_ids"]
    summaries = task.tokenizer([e["summary"] for e in examples], add_special_tokens=False)["input_ids"]
    out, cut_src, cut_tgt = [], 0, 0
    for ex, d, s in zip(examples, dialogues, summaries):
        cut_src += len(d) > budget
        cut_tgt += len(s) + 1 > max_target
        out.append({"id": ex["id"], "source": before + d[:budget] + after, "target": s[: max_target - 1] + [task.eos_id], "summary": ex["summary"], "dialogue": ex["dialogue"]})
    cuts = [f"{cut_src} of {len(examples)} dialogues to fit {max_source} prompt tokens"] if cut_src else []
    cuts += [f"{cut_tgt} of {len(examples)} summaries to {max_target} tokens"] if cut_tgt else []
    if cuts:
        warnings.warn("truncated " + " and ".join(cuts), stacklevel=2)
    return out


def _pad(rows: list[list[int]], value: int, length: int | None = None, left: bool = False) -> np.ndarray:
    length = length or packing.round_up(max(map(len, rows)), BUCKET)
    out = np.full((len(rows), length), value, np.int32)
    for i, r in enumerate(rows):
        if left:
            out[i, length - len(r):] = r
        else:
            out[i, : len(r)] = r
    return out


def train_batch(task: Task, rows: list[dict], max_target: int, pack: bool = False, row_len: int | None = None) -> dict[str, np.ndarray]:
    """Arrays for one training step; targets always padded to max_target so the loss shape is fixed.

    For decoder-only models `pack` puts several examples in a row (`jpeft.packing`), so the step
    computes on little padding: into rows of `row_len`, or of the cheapest length for this batch
    when it is None. Otherwise each example has its own right-padded row.
    """
    targets = _pad([r["target"] for r in rows], IGNORE, max_target)
    if task.family == "t5":
        ids = _pad([r["source"] for r in rows], task.pad_id)
        return {"input_ids": ids, "attention_mask": (_pad([[1] * len(r["source"]) for r in rows], 0, ids.shape[1])), "labels": targets}
    seqs = [r["source"] + r["target"] for r in rows]
    if not pack:
        row_len = packing.round_up(max(map(len, seqs)), BUCKET)
    elif row_len is None:
        row_len = packing.row_length([len(s) for s in seqs], BUCKET)
    packed = packing.pack(seqs, row_len, task.pad_id, rows=None if pack else [[i] for i in range(len(seqs))])
    batch = {"input_ids": packed["input_ids"], "targets": targets,
             "target_index": packed["start"] + np.array([len(r["source"]) for r in rows], np.int32)}
    if pack:
        batch["segment_ids"] = packed["segment_ids"]
    else:
        batch["attention_mask"] = (packed["segment_ids"] > 0).astype(np.int32)
    return batch


def loss_fn(task: Task, dtype: Any, lora_dropout: float, remat: bool = True):
    """The task's training loss (seq2seq cross-entropy, or summary-only causal-LM cross-entropy)."""
    make = training.seq2seq_loss if task.family == "t5" else training.causal_lm_loss
    return make(task.config, dtype=dtype, lora_dropout=lora_dropout, remat=remat)


def generate(task: Task, params: dict, rows: list[dict], max_new_tokens: int, dtype: Any) -> list[str]:
    """Greedy summaries for a batch of encoded rows, decoded to text."""
    sources = [r["source"] for r in rows]
    left = task.family == "llama"
    ids = _pad(sources, task.pad_id, left=left)
    mask = _pad([[1] * len(s) for s in sources], 0, ids.shape[1], left=left)
    out = np.asarray(task.module.generate(task.config, params, ids, mask, max_new_tokens=max_new_tokens, dtype=dtype))
    texts = []
    for row in out:
        row = row.tolist()
        row = row[: row.index(task.eos_id)] if task.eos_id in row else row
        texts.append(task.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def token_count(batch: dict[str, np.ndarray]) -> int:
    """Real (non-padding) tokens in a training batch, for throughput."""
    n = int((batch["segment_ids"] > 0).sum()) if "segment_ids" in batch else int(batch["attention_mask"].sum())
    return n + int((batch["labels"] != IGNORE).sum()) if "labels" in batch else n
