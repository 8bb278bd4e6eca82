"""Inference: greedy generation jpeft vs transformers (fp32, and bf16 on both sides), unmerged (fused) vs merged LoRA, mixed vs single adapter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jpeft
from benchmarks import common, speed
from jpeft import multi, tree
from jpeft.models import t5

N_ADAPTERS = 4


def shapes(quick: bool) -> tuple[int, int, int]:
    """(batch, source tokens, new tokens) of the timed generation."""
    return (4, 32, 16) if quick else (8, 256, 64)


def lora_adapter(base: dict, seed: int) -> dict:
    """A LoRA (r=8 on q, v) adapter tree with a non-zero B, so it changes the output like a trained one."""
    params = jpeft.lora.inject(base, jpeft.LoraConfig(r=8, alpha=16, target_modules=["q", "v"]), jax.random.key(seed))
    flat = tree.flatten(jpeft.split_adapter(params)[1])
    return tree.unflatten({p: v + 0.01 if p.endswith("lora_b") else v for p, v in flat.items()})


def jpeft_generate(config, params: dict, ids: np.ndarray, new: int, adapter_ids=None, dtype=jnp.float32):
    """A blocking greedy-generation call that never stops early (no EOS id can match)."""
    return lambda: t5.generate(config, params, ids, max_new_tokens=new, eos_token_id=-1, adapter_ids=adapter_ids, dtype=dtype).block_until_ready()


def transformers_generate(config, base: dict, ids: np.ndarray, new: int, bf16: bool = False):
    """The same base weights in transformers' T5 (cast to bfloat16 if `bf16`), generating exactly `new` tokens greedily."""
    import torch
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(config).eval()
    state = {k: torch.from_numpy(np.array(v)) for k, v in t5.state_dict_from_params(base).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("embed_tokens" in k for k in missing), (missing, unexpected)  # embed_tokens are tied to shared
    model = model.to(common.torch_device(), torch.bfloat16 if bf16 else torch.float32)
    inputs = torch.from_numpy(ids.astype(np.int64)).to(common.torch_device())

    def call():
        with torch.inference_mode():
            out = model.generate(inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
        common.torch_sync()
        return out

    return call


def run(quick: bool, warmup: int = 1, repeats: int = 3) -> dict[str, float]:
    """Tokens/s and latencies; every variant decodes the same batch for the same number of steps."""
    config = common.t5_config(quick=quick)
    B, S, new = shapes(quick)
    ids = np.random.default_rng(0).integers(2, config.vocab_size, (B, S), dtype=np.int32)
    base = t5.init_params(config, jax.random.key(0))
    adapters = [lora_adapter(base, seed) for seed in range(N_ADAPTERS)]
    single = jpeft.attach(base, adapters[0])
    variants = {
        "jpeft_base": jpeft_generate(config, base, ids, new),
        "transformers_base": transformers_generate(config, base, ids, new),
        # bf16 weights and compute on both sides: a separate comparison, not the fp32 target's.
        "jpeft_bf16": jpeft_generate(config, jax.tree.map(lambda x: x.astype(jnp.bfloat16), base), ids, new, dtype=jnp.bfloat16),
        "transformers_bf16": transformers_generate(config, base, ids, new, bf16=True),
        "lora_unmerged": jpeft_generate(config, single, ids, new),
        "lora_merged": jpeft_generate(config, jpeft.lora.merge(single), ids, new),
        "lora_mixed": jpeft_generate(config, jpeft.attach(base, multi.stack_lora(adapters)), ids, new, np.arange(B) % N_ADAPTERS),
    }
    out = speed.timed_together({f"gen_{name}": call for name, call in variants.items()}, warmup, repeats)
    out["gen_jpeft_tokens_per_s"] = B * new / out["gen_jpeft_base_s"]
    out["gen_transformers_tokens_per_s"] = B * new / out["gen_transformers_base_s"]
    out["generate_speedup_vs_transformers"] = out["gen_transformers_base_s"] / out["gen_jpeft_base_s"]
    out["generate_speedup_vs_transformers_bf16"] = out["gen_transformers_bf16_s"] / out["gen_jpeft_bf16_s"]
    out["unmerged_over_merged_latency"] = out["gen_lora_unmerged_s"] / out["gen_lora_merged_s"]
    out["mixed_over_single_adapter_latency"] = out["gen_lora_mixed_s"] / out["gen_lora_unmerged_s"]
    return out
