"""Dialogue summarization on either model family: loading, prompts, tokenization, batches, loss and generation."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from jpeft import batches, gguf_io, training
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import family as model_family
from jpeft.models import gemma, llama, registry, t5
from jpeft.formats.tokenizer import load_tokenizer
from train.errors import UsageError

PROMPT = "Summarize the following conversation.\n\n{input}\n\nSummary: "  # the default --prompt
MARK = "\x00DIALOGUE\x00"
BUCKET = 64  # padded lengths are multiples of this, so only a few shapes ever compile
IGNORE = batches.IGNORE
MODULES = {"t5": t5, "llama": llama, "gemma": gemma}  # family -> the jpeft module implementing it


@dataclasses.dataclass
class Task:
    """A loaded model family with its tokenizer: everything model-specific the CLI needs."""

    family: str  # "t5" (encoder-decoder), or "llama" / "gemma" (decoder-only)
    config: Any
    tokenizer: Any
    source: str  # what an adapter records as its base: a hub id where one is known
    chat: bool = False  # prompts go through the tokenizer's chat template (instruct models)

    @property
    def module(self):
        return MODULES[self.family]

    @property
    def decoder_only(self) -> bool:
        return self.family != "t5"

    @property
    def eos_id(self) -> int:
        a = self.module.arch(self.config)
        return a.eos_token_ids[0] if self.decoder_only else a.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.module.arch(self.config).pad_token_id


def _family(path: Path) -> str:
    if path.suffix == ".gguf":
        return _family_of(gguf_io.load_config(path).model_type, path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{path} has no config.json")
    return _family_of(json.loads(config_file.read_text()).get("model_type"), config_file)


def _family_of(model_type: str | None, source: Path) -> str:
    if model_type in ("t5", "mt5", "umt5"):
        return "t5"
    with contextlib.suppress(ValueError):
        name = model_family.of(model_type).name if model_type is not None else None
        if name in MODULES:  # the CLI trains T5, Llama and Gemma (not yet the mixtures of experts)
            return name
    raise UsageError(f"{source}: model_type {model_type!r} is not supported (T5, a Llama-family decoder, or Gemma 2 / 3)")


@contextlib.contextmanager
def _as_usage_errors(model: str) -> Iterator[None]:
    try:
        yield
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"could not load a tokenizer for {model} ({str(e).splitlines()[0][:200]}); pass --tokenizer DIR") from None


def find_model(model: str) -> tuple[str, Any, Path]:
    """(family, config, local path) of a model directory, hub id, .gguf file or packaged short name; no weights are read."""
    from jpeft.formats.hf_io import resolve_model_dir

    with _as_usage_errors(model):
        resolved = registry.resolve(model)
        path = Path(resolved) if Path(resolved).suffix == ".gguf" else resolve_model_dir(resolved)
        if path.suffix == ".gguf" and not path.is_file():
            raise UsageError(f"model file {path} does not exist")
        family = _family(path)
        return family, MODULES[family].load_config(path), path


def load_task(model: str, tokenizer: str | None, dtype: Any, chat: bool | None = None, quantized: bool = False,
              quantize: str | None = None, mesh: Any = None) -> tuple[Task, dict]:
    """(task, params) for a model directory, hub id, .gguf file or packaged short name (the tokenizer loads first).

    `chat` says whether prompts go through the chat template; None decides: a packaged model's registry entry
    says whether it is an instruct model, and any other decoder-only model uses its tokenizer's template if it has one.
    `quantized` keeps a .gguf file's quantized Linear weights packed (`--quantize gguf`); `quantize` ("nf4", "int8")
    quantizes the projections as they stream in (`--quantize nf4`), so no float copy of the base is ever whole; `mesh`
    puts each weight straight into its shards (`--mesh`), so no device ever holds the whole base.
    """
    family, _, path = find_model(model)
    with _as_usage_errors(model):
        tok = load_tokenizer(registry.resolve(tokenizer) if tokenizer else path)
        load = MODULES[family].load_pretrained
        options = {"quantized": True} if quantized else {}  # GGUF decoders only
        config, params = load(path, dtype=dtype, quantize=quantize, mesh=mesh, **options)
    has_template = bool(getattr(tok, "chat_template", None))
    if chat and not has_template:
        raise UsageError(f"the tokenizer of {tokenizer or model} has no chat template to apply")
    if chat is None:
        chat = registry.is_instruct(model)
        chat = has_template if chat is None else chat
    task = Task(family, config, tok, registry.hub_id(model), chat=family != "t5" and chat)
    gguf_io.close_reader()  # everything is read: what stays open would add to the training step's peak memory
    return task, params


def check_prompt(template: str) -> None:
    """A prompt template holds `{input}` exactly once (the rest is literal text, braces included)."""
    if template.count("{input}") != 1:
        raise UsageError(f"--prompt {template!r} must contain {{input}} exactly once (where each example's input goes)")


def _frame(task: Task, template: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the input in the prompt (through the chat template for instruct models)."""
    check_prompt(template)
    text = template.replace("{input}", MARK)
    if task.chat:
        text = task.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    before, after = text.split(MARK)
    tok = task.tokenizer
    # Decoder-only tokenizers add their BOS (if any) at the very start; T5 ends the source with EOS.
    return (tok(before, add_special_tokens=task.decoder_only)["input_ids"],
            tok(after, add_special_tokens=False)["input_ids"] + ([] if task.decoder_only else [task.eos_id]))


def encode(task: Task, examples: list[dict], max_source: int, max_target: int, prompt: str = PROMPT) -> list[dict]:
    """Token ids per example: `source` (the prompt with the input cut to fit max_source) and `target` (reference + EOS)."""
    before, after = _frame(task, prompt)
    budget = max_source - len(before) - len(after)
    if budget <= 0:
        raise UsageError(f"--max-source-len {max_source} leaves no room for the input (the prompt alone takes {len(before) + len(after)} tokens)")
    if not examples:
        return []
    inputs = task.tokenizer([e["input"] for e in examples], add_special_tokens=False)["input_ids"]
    references = task.tokenizer([e["reference"] for e in examples], add_special_tokens=False)["input_ids"]
    out, cut_src, cut_tgt = [], 0, 0
    for ex, d, s in zip(examples, inputs, references):
        cut_src += len(d) > budget
        cut_tgt += len(s) + 1 > max_target
        out.append({"id": ex["id"], "source": before + d[:budget] + after, "target": s[: max_target - 1] + [task.eos_id], "reference": ex["reference"]})
    cuts = [f"{cut_src} of {len(examples)} inputs to fit {max_source} prompt tokens"] if cut_src else []
    cuts += [f"{cut_tgt} of {len(examples)} targets to {max_target} tokens"] if cut_tgt else []
    if cuts:
        warnings.warn("truncated " + " and ".join(cuts), stacklevel=2)
    return out


def train_batch(task: Task, rows: list[dict], max_target: int, pack: bool = False, row_len: int | None = None) -> dict[str, np.ndarray]:
    """Arrays for one training step (`jpeft.batches`); targets always padded to max_target so the loss shape is fixed."""
    sources, targets = [r["source"] for r in rows], [r["target"] for r in rows]
    if task.family == "t5":
        return batches.seq2seq_batch(sources, targets, task.pad_id, max_target=max_target, bucket=BUCKET)
    return batches.causal_lm_batch(sources, targets, task.pad_id, max_target=max_target, pack=pack, row_len=row_len, bucket=BUCKET)


def loss_fn(task: Task, dtype: Any, lora_dropout: float, remat: bool = True):
    """The task's training loss (seq2seq cross-entropy, or summary-only causal-LM cross-entropy)."""
    make = training.seq2seq_loss if task.family == "t5" else training.causal_lm_loss
    return make(task.config, dtype=dtype, lora_dropout=lora_dropout, remat=remat)


def generate(task: Task, params: dict, rows: list[dict], max_new_tokens: int, dtype: Any, prompt_lookup: int = 0,
             adapter_ids: list[int] | None = None) -> list[str]:
    """Greedy summaries for a batch of encoded rows, decoded to text; decoder-only models draft `prompt_lookup` tokens
    per pass from the prompt (`llama.generate`), which changes the speed, never the summaries (T5 decodes plainly).
    `adapter_ids` (one per row) picks each row's adapter from a `jpeft.multi.stack_lora` stack."""
    sources = [r["source"] for r in rows]
    left = task.decoder_only
    ids = batches.pad(sources, task.pad_id, left=left, bucket=BUCKET)
    mask = batches.pad([[1] * len(s) for s in sources], 0, ids.shape[1], left=left)
    lookup = {"prompt_lookup": prompt_lookup} if left else {}
    chosen = None if adapter_ids is None else np.asarray(adapter_ids, np.int32)
    return decode(task, np.asarray(task.module.generate(task.config, params, ids, mask, max_new_tokens=max_new_tokens, dtype=dtype,
                                                        adapter_ids=chosen, **lookup)))


def decode(task: Task, generated: np.ndarray) -> list[str]:
    """Generated ids (rows, tokens) as text, each row cut at its first EOS."""
    texts = []
    for row in generated:
        row = row.tolist()
        row = row[: row.index(task.eos_id)] if task.eos_id in row else row
        texts.append(task.tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def token_count(batch: dict[str, np.ndarray]) -> int:
    """Real (non-padding) tokens in a training batch, for throughput."""
    n = int((batch["segment_ids"] > 0).sum()) if "segment_ids" in batch else int(batch["attention_mask"].sum())
    return n + int((batch["labels"] != IGNORE).sum()) if "labels" in batch else n
