"""The GPU code path (`jpeft.nn.KERNELS = "gpu"`: `jax.nn.dot_product_attention`, plain matmuls and autodiff) run on
the CPU against the CPU-tuned path: T5, Llama and Gemma logits and LoRA gradients, with padding, packing (segment ids),
sliding windows, soft-capping, prefix keys and T5's trainable position bias; and bf16 compute with float32 masters.

On a CPU `dot_product_attention` runs XLA's implementation; cuDNN's is checked on the device by benchmarks/gpu.py.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

import jpeft
from jpeft import lora, nn, prefix, split, training
from jpeft.models import gemma, llama, t5
from jpeft.models import attention
from tests.training.test_packing import _batch as packing_batch
from tests.formats.test_peft_format import _randomize

ROOT = Path(__file__).resolve().parents[1]


def _t5_config():
    return transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=3, num_layers=1, num_decoder_layers=1,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)


def _decoder_config(kind: str):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.2, max_position_embeddings=64, num_hidden_layers=2)
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    layers = ["sliding_attention", "full_attention"]
    if kind == "gemma2":  # soft-capped scores: the dispatch keeps them on the autodiff path
        return transformers.Gemma2Config(**common, sliding_window=4, layer_types=layers, attn_logit_softcapping=2.0, final_logit_softcapping=4.0)
    return transformers.Gemma3TextConfig(**common, sliding_window=4, layer_types=layers, query_pre_attn_scalar=12)


MODELS = {"llama": llama, "gemma2": gemma, "gemma3": gemma}


def _under(kernels: str, fn, *args):
    """fn(*args) traced afresh with `nn.KERNELS = kernels` (jit caches would otherwise keep the other path)."""
    saved = nn.KERNELS
    nn.KERNELS = kernels
    jax.clear_caches()  # the models' forward is jitted too: its cache would keep the path compiled first
    try:
        return jax.jit(lambda *a: fn(*a))(*args)
    finally:
        nn.KERNELS = saved


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of `jax.nn.dot_product_attention`, so a test knows the GPU path really ran."""
    calls = []
    real = jax.nn.dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs["implementation"])
        return real(*args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", counted)
    return calls


def _assert_trees_close(a, b, atol):
    flat_b = jpeft.tree.flatten(b)
    assert flat_b.keys() == jpeft.tree.flatten(a).keys()
    for path, x in jpeft.tree.flatten(a).items():
        if x is None:
            continue
        np.testing.assert_allclose(np.asarray(flat_b[path]), np.asarray(x), atol=atol, rtol=atol, err_msg=path)


def _lora_params(init, config):
    targets = ["q", "v", "wo"] if init is t5.init_params else ["q_proj", "v_proj", "down_proj"]  # each family's own names
    params = lora.inject(init(config, jax.random.key(0)), lora.LoraConfig(r=2, target_modules=targets), jax.random.key(1))
    return _randomize(params, jax.random.key(2), scale=0.3)


def test_t5_logits_and_lora_gradients_match_the_cpu_path(spy):
    """Encoder, decoder and cross-attention with T5's float position bias (XLA's implementation, bias gradient kept)."""
    config = _t5_config()
    params = _lora_params(t5.init_params, config)
    rng = np.random.default_rng(0)
    ids, dec = rng.integers(2, 64, (3, 9)), rng.integers(2, 64, (3, 6))
    mask = (np.arange(9)[None] < np.array([9, 5, 7])[:, None]).astype(np.int32)
    forward = lambda p: t5.forward(config, p, ids * mask, mask, dec)  # noqa: E731
    cpu, gpu = _under("cpu", forward, params), _under("gpu", forward, params)
    assert spy == ["xla"] * 3  # encoder, decoder self- and cross-attention: float biases never reach cuDNN
    np.testing.assert_allclose(gpu, cpu, atol=1e-5)

    batch = {"input_ids": ids * mask, "attention_mask": mask, "labels": np.where(np.arange(6) < 4, dec, -100)}
    mask_tree = split.trainable_mask(params)
    # The position-bias table trainable too, so its gradient through the bias must flow on both paths.
    mask_tree = jpeft.tree.unflatten({p: m or "relative_attention_bias" in p for p, m in jpeft.tree.flatten(mask_tree).items()})
    trainable, frozen = split.partition(params, mask_tree)
    grad = lambda t: jax.grad(lambda t: training.seq2seq_loss(config)(split.combine(t, frozen), batch, None))(t)  # noqa: E731
    g_cpu, g_gpu = _under("cpu", grad, trainable), _under("gpu", grad, trainable)
    assert any("relative_attention_bias" in p and v is not None and np.abs(v).max() > 0 for p, v in jpeft.tree.flatten(g_gpu).items())
    _assert_trees_close(g_cpu, g_gpu, 1e-4)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_decoder_logits_and_lora_gradients_match_the_cpu_path(kind, spy):
    """Left-padded logits; then LoRA gradients on packed rows (segment ids, Gemma 3's sliding window) or under prefix
    tuning (prefix keys, Llama). Gemma 2's soft-cap keeps the autodiff path, which needs no second gradient check."""
    config, model = _decoder_config(kind), MODELS[kind]
    params = _lora_params(model.init_params, config)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 64, (2, 7))
    mask = np.array([[1] * 7, [0, 0, 0] + [1] * 4], np.int32)
    cpu = _under("cpu", lambda p: model.forward(config, p, ids * mask, mask), params)
    gpu = _under("gpu", lambda p: model.forward(config, p, ids * mask, mask), params)
    assert spy == ([] if kind == "gemma2" else ["xla"] * 2)
    real = mask.astype(bool)  # padding queries see no key: their outputs are arbitrary on both paths
    np.testing.assert_allclose(np.asarray(gpu)[real], np.asarray(cpu)[real], atol=1e-5)
    if kind == "gemma2":
        return

    seqs = [rng.integers(3, 64, n).tolist() for n in (9, 4, 6)]
    if kind == "llama":
        params = _randomize(prefix.inject(params, jpeft.PrefixTuningConfig(num_virtual_tokens=3), jax.random.key(3), config), jax.random.key(4))
        batch = packing_batch(seqs, [3, 2, 4], 10, pack=False)
    else:
        batch = packing_batch(seqs, [3, 2, 4], 12, pack=True)
    trainable, frozen = split.partition(params, split.trainable_mask(params))
    loss = training.causal_lm_loss(config)
    grad = lambda t, b: jax.grad(lambda t: loss(split.combine(t, frozen), b, None))(t)  # noqa: E731
    _assert_trees_close(_under("cpu", grad, trainable, batch), _under("gpu", grad, trainable, batch), 1e-4)


def test_kernels_setting_is_checked_and_auto_follows_the_backend(monkeypatch):
    monkeypatch.setattr(nn, "KERNELS", "auto")
    assert nn.gpu_kernels() is (jax.default_backend() == "gpu")
    with jax.default_device(jax.devices("cpu")[0]):
        assert not nn.gpu_kernels()
    monkeypatch.setattr(nn, "KERNELS", "cuda")
    with pytest.raises(ValueError, match="'auto', 'gpu' or 'cpu'"):
        nn.gpu_kernels()


def test_cudnn_is_asked_only_for_what_it_supports(monkeypatch):
    """Off a CUDA device, in float32, or with odd lengths or head dims, the XLA implementation is chosen."""
    assert not attention._cudnn_applies(jnp.bfloat16, 64, 128, 128)  # this machine has no CUDA device
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [type("D", (), {"compute_capability": "9.0"})()])
    assert attention._cudnn_applies(jnp.bfloat16, 64, 128, 128) and attention._cudnn_applies(jnp.float16, 256, 2, 130)
    assert not attention._cudnn_applies(jnp.float32, 64, 128, 128)
    assert not attention._cudnn_applies(jnp.bfloat16, 60, 128, 128)
    assert not attention._cudnn_applies(jnp.bfloat16, 64, 1, 128)  # a decoding step: XLA's
    monkeypatch.setattr(attention, "CUDNN_ATTENTION", False)
    assert not attention._cudnn_applies(jnp.bfloat16, 64, 128, 128)


def test_bf16_compute_keeps_float32_masters():
    """`dtype=jnp.bfloat16` on the loss (the CLI's --bf16) computes in bf16 while the trainables and the optimizer
    state stay float32: the loss is within bf16's rounding of float32's, and a step moves float32 weights."""
    config = _decoder_config("llama")
    params = _lora_params(llama.init_params, config)
    rng = np.random.default_rng(2)
    batch = packing_batch([rng.integers(3, 64, n).tolist() for n in (9, 5)], [3, 2], 16, pack=True)
    make = training.causal_lm_loss
    trainable, frozen = split.partition(params, split.trainable_mask(params))
    full, half = (float(make(config, dtype=d)(split.combine(trainable, frozen), batch, None)) for d in (jnp.float32, jnp.bfloat16))
    assert half == pytest.approx(full, rel=2e-2) and half != full
    tx = optax.adam(1e-2)
    step = training.make_train_step(make(config, dtype=jnp.bfloat16), tx)
    before = jax.tree.map(np.asarray, trainable)
    new, state, loss = step(jax.tree.map(jnp.array, trainable), tx.init(trainable), frozen, batch, None)
    assert {x.dtype for x in jax.tree.leaves((new, state)) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    assert float(loss) == pytest.approx(half, rel=1e-2)
    assert any(np.abs(np.asarray(n) - b).max() > 0 for n, b in zip(jax.tree.leaves(new), jax.tree.leaves(before)))


def test_device_script_runs_on_cpu(tmp_path):
    """benchmarks/gpu.py --cpu-smoke with the packages the device lacks made unimportable: the numerics and the SmolLM2
    step beside PEFT (the parts the others share their code with), on tiny shapes.

    ~40 s idle (~90 s on the loaded 2-core machine), for the compiles: the script gets one shot on a lent GPU. The
    remaining parts (t5_step, generation, cpu_kernels) take as long again; `python -m benchmarks.gpu --cpu-smoke`
    runs them all.
    """
    blocked = ("gguf", "rouge_score", "datasets", "qwix", "bitsandbytes")
    code = (  # a None in sys.modules reads as not installed, to `import` and to importlib.util.find_spec alike
        f"import sys, runpy\nsys.modules.update(dict.fromkeys({blocked!r}))\n"
        f"sys.argv = ['gpu', '--cpu-smoke', '--parts', 'info,numerics,smollm2_step', '--out', {str(tmp_path)!r}]\n"
        "runpy.run_module('benchmarks.gpu', run_name='__main__')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=900)
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert all(status.startswith("ok") for status in result["parts"].values()), result["parts"]
    figures = result["figures"]
    assert figures["numerics_ok"] is True and figures["attention_impls_seen"] == ["xla"]
    for key in ("llama_fp32_logits_max_abs_diff", "llama_vs_peft_fp32_logits_max_abs_diff", "attention_bfloat16_grad_max_rel_diff",
                "smollm2_jpeft_over_peft_bf16_step_time", "smollm2_jpeft_fp32_mfu_vs_790", "smollm2_peft_bf16_torch_peak_bytes"):
        assert math.isfinite(figures[key]), key
    assert "| numerics | ok" in (tmp_path / "gpu.md").read_text()
