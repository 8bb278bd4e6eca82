"""jpeft.quant: a frozen base that stays quantized (QLoRA).

NF4 and int8 bit for bit against bitsandbytes, GGUF blocks against the `gguf` package, LoRA on a quantized Llama
against LoRA on its dequantized twin, the compiled step's memory, and the packaged SmolLM2 GGUF loaded packed.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax

import jpeft
from jpeft import batches, lora, nn, quant, split, targets, training, tree
from jpeft.quant import bnb, ggml

bf = pytest.importorskip("bitsandbytes.functional")
torch = pytest.importorskip("torch")


def _weight(rng, out, d_in):
    w = (rng.standard_normal((out, d_in)) * rng.uniform(0.01, 2.0, (out, 1))).astype(np.float32)
    w[0, :64] = 0.0  # an all-zero block
    return w


# ----------------------------------------------------------------------------------------------
# Formats, value for value


def test_nf4_matches_bitsandbytes():
    w = _weight(np.random.default_rng(0), 48, 320)
    q, state = bf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    codes, absmax = bnb.quantize_nf4(w)
    np.testing.assert_array_equal(codes.reshape(-1), q.numpy().reshape(-1))
    np.testing.assert_array_equal(absmax.reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(bnb.dequantize_nf4(codes, absmax)), bf.dequantize_4bit(q, state).numpy())
    np.testing.assert_array_equal(bnb.NF4_LEVELS, bf.get_4bit_type("nf4", device="cpu").numpy())


def test_nf4_double_quant_matches_bitsandbytes():
    """bitsandbytes' own double-quantized state dequantizes bit for bit; jpeft's quantizer picks the nearest map value,
    which bitsandbytes' CPU binary search misses on rare near-ties, so a few codes may sit one level away."""
    np.testing.assert_array_equal(bnb.DYNAMIC_MAP, bf.create_dynamic_map().numpy())
    w = _weight(np.random.default_rng(1), 96, 320)
    q, state = bf.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    ref = bf.dequantize_4bit(q, state).numpy()
    shape = (96, 320 // 64)
    theirs = bnb.dequantize_absmax(state.absmax.numpy().reshape(shape), state.state2.absmax.numpy(), np.float32(state.offset.item()))
    np.testing.assert_array_equal(np.asarray(bnb.dequantize_nf4(q.numpy().reshape(96, 160), theirs)), ref)

    codes, scale, offset = bnb.quantize_absmax(bnb.quantize_nf4(w)[1])
    assert abs(offset - state.offset.item()) <= np.spacing(np.float32(offset))
    np.testing.assert_array_equal(scale, state.state2.absmax.numpy())
    diff = codes.reshape(-1).astype(int) - state.absmax.numpy().astype(int)
    assert np.abs(diff).max() <= 1 and np.mean(diff != 0) < 0.01
    group = quant.quantize({"m": {"kernel": jnp.asarray(w.T)}}, "nf4", double_quant=True, targets=["m"])["m"]
    assert sorted(group) == ["kernel_absmax_offset", "kernel_absmax_q", "kernel_absmax_scale", "kernel_nf4"]
    np.testing.assert_allclose(np.asarray(quant.weight(group)).T, ref, rtol=0, atol=2e-2 * np.abs(w).max())


def test_int8_matches_bitsandbytes():
    w = _weight(np.random.default_rng(2), 40, 72)
    codes, stats, _ = bf.int8_vectorwise_quant(torch.from_numpy(w))  # (codes, row absmax, outlier columns)
    ours, absmax = bnb.quantize_int8(w)
    np.testing.assert_array_equal(ours, codes.numpy())
    np.testing.assert_array_equal(absmax, stats.numpy())
    np.testing.assert_allclose(np.asarray(bnb.dequantize_int8(ours, absmax)), bf.int8_vectorwise_dequant(codes, stats).numpy(), rtol=1e-6)


def _gguf_rows(rng, qtype: str, out: int, d_in: int) -> np.ndarray:
    """Rows of a GGML type: quantized by the gguf package where it can, else random bytes with finite f16 scales."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype not in ("q4_k", "q6_k"):  # gguf quantizes these itself
        return quants.quantize(rng.standard_normal((out, d_in)).astype(np.float32), Q[qtype.upper()])
    block, size = quant.GGUF_TYPES[qtype]
    rows = rng.integers(0, 256, (out, d_in // block, size), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (out, d_in // block, 2)).astype(np.float16).view(np.uint8)  # 2 f16 = 4 bytes
    if qtype == "q4_k":
        rows[..., 0:4] = scales  # d, dmin
    else:
        rows[..., 208:210] = scales[..., :2]  # d
    return rows.reshape(out, -1)


@pytest.mark.parametrize("qtype", sorted(quant.GGUF_TYPES))
def test_gguf_blocks_match_gguf_package(qtype):
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    rows = _gguf_rows(np.random.default_rng(3), qtype, 24, 512)
    group = quant.gguf_leaves(qtype, rows)
    assert quant.weight_shape(group) == (512, 24)
    np.testing.assert_array_equal(np.asarray(jax.jit(ggml.DEQUANTIZE[qtype])(rows)), quants.dequantize(rows, Q[qtype.upper()]))


def test_quantize_targets_and_errors():
    rng = np.random.default_rng(4)
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32), "bias": jnp.zeros(64)},
              "odd": {"kernel": jnp.ones((96, 8))}, "lm_head": {"kernel": jnp.ones((64, 10))}}
    with pytest.raises(ValueError, match="odd to NF4: its input dim 96"):
        quant.quantize(params, "nf4")
    q = quant.quantize(params, "int8")
    assert quant.quantized_modules(q) == ["a", "odd"] and "kernel" in q["lm_head"]  # the LM head stays float by default
    assert quant.weight_shape(q["odd"]) == (96, 8) and q["a"]["bias"] is params["a"]["bias"]
    assert tree.flatten(quant.float_shapes(q)) == {p: tuple(v.shape) for p, v in tree.flatten(params).items()}
    with pytest.raises(ValueError, match="unknown quantization format"):
        quant.quantize(params, "nf3")
    with pytest.raises(ValueError, match="matches no module"):
        quant.quantize(q, "int8", targets=["a"])  # already quantized: not a float candidate
    back = quant.dequantize(q)
    np.testing.assert_allclose(back["a"]["kernel"], params["a"]["kernel"], atol=float(jnp.abs(params["a"]["kernel"]).max()) / 127)


# ----------------------------------------------------------------------------------------------
# Training on a quantized Llama


def _tiny_llama(hidden=128, inter=256, layers=2, vocab=96):
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                                      eos_token_id=1, tie_word_embeddings=True)
    from jpeft.models import llama

    return config, llama.init_params(config, jax.random.key(0))


def _batch(vocab=96, rows=3):
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(2, vocab, n)) for n in (5, 9, 3)[:rows]]
    targets = [list(rng.integers(2, vocab, n)) for n in (2, 4, 6)[:rows]]
    return {k: jnp.asarray(v) for k, v in batches.causal_lm_batch(prompts, targets, pad_id=0, eos_id=1, bucket=8).items()}


def _loss_and_grads(config, params, remat):
    mask = jpeft.trainable_mask(params)
    trainable, frozen = jpeft.partition(params, mask)
    loss_fn = training.causal_lm_loss(config, remat=remat)
    step = jax.jit(jax.value_and_grad(lambda t, f, b: loss_fn(jpeft.combine(t, f), b, None)))
    return step(trainable, frozen, _batch())


def _mixed_quantized(params):
    """Every projection quantized, in every format: NF4, double-quantized NF4, int8 and GGUF Q5_0 / Q8_0 blocks."""
    rng = np.random.default_rng(6)
    params = quant.quantize(params, "nf4", targets=["q_proj", "o_proj"])
    params = quant.quantize(params, "nf4", targets=["gate_proj"], double_quant=True)
    params = quant.quantize(params, "int8", targets=["k_proj", "up_proj"])
    flat = tree.flatten(params)
    for name, qtype in (("v_proj", "q5_0"), ("down_proj", "q8_0")):  # blocks as a GGUF file would hold them
        for path in [p for p in flat if p.endswith(f"{name}/kernel")]:
            d_in, out = flat.pop(path).shape
            group = quant.gguf_leaves(qtype, _gguf_rows(rng, qtype, out, d_in))
            flat.update({f"{path.rsplit('/', 1)[0]}/{k}": v for k, v in group.items()})
    return tree.unflatten(flat)


@pytest.mark.parametrize("remat", [False, True])
def test_lora_on_quantized_llama_matches_dequantized_base(remat):
    """Loss and LoRA gradients of the jitted step on a quantized base equal those on its dequantized float twin."""
    config, params = _tiny_llama()
    qparams = _mixed_quantized(params)
    assert len(quant.quantized_modules(qparams)) == 14
    qlora = lora.inject(qparams, jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"]),
                        jax.random.key(1))
    flat = tree.flatten(qlora)
    for p in [p for p in flat if p.endswith("lora_b")]:  # B nonzero so that A's gradient is too
        flat[p] = 0.01 * jax.random.normal(jax.random.key(len(p)), flat[p].shape)
    qlora = tree.unflatten(flat)
    float_lora = quant.dequantize(qlora)
    assert not quant.quantized_modules(float_lora)
    (loss_q, grads_q), (loss_f, grads_f) = _loss_and_grads(config, qlora, remat), _loss_and_grads(config, float_lora, remat)
    np.testing.assert_allclose(loss_q, loss_f, rtol=1e-5)
    gq, gf = ({p: v for p, v in tree.flatten(g).items() if v is not None} for g in (grads_q, grads_f))
    assert sorted(gq) == sorted(gf) and {p.rsplit("/", 1)[-1] for p in gq} == {"lora_a", "lora_b"}
    for p in gq:
        np.testing.assert_allclose(gq[p], gf[p], rtol=1e-4, atol=1e-6, err_msg=p)


def _naive_quantized_matmul(fmt, x, group):
    """What autodiff would do without the custom VJP: keep each dequantized W as a residual for the backward pass."""
    return nn.einsum("...i,oi->...o", x, quant.unpack(fmt, group).astype(x.dtype))


@pytest.mark.parametrize("remat", [False, True])
def test_compiled_step_holds_no_float_copy_of_the_base(remat, monkeypatch):
    """A model whose NF4 weights dominate: the compiled train step's temporaries (one layer's dequantized weights at a
    time, the scan's stacked codes, activations) stay far below the float32 size of the quantized weights, while
    dequantize-then-autodiff keeps every layer's dequantized weights from the forward pass to the backward pass."""
    config, params = _tiny_llama(hidden=256, inter=1024, layers=12, vocab=64)
    qparams = lora.inject(quant.quantize(params, "nf4"), jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), jax.random.key(1))
    float_bytes = 4 * sum(np.prod(quant.weight_shape(targets.get_module(qparams, m))) for m in quant.quantized_modules(qparams))
    mask = jpeft.trainable_mask(qparams)
    trainable, frozen = jpeft.partition(qparams, mask)
    tx = split.optimizer(optax.adam(1e-3), mask)
    args = (trainable, tx.init(trainable), frozen, _batch(vocab=64, rows=1), None)

    def temp_bytes():
        step = training.make_train_step(training.causal_lm_loss(config, remat=remat), tx)
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes() < 0.3 * float_bytes
    if not remat:
        monkeypatch.setattr(nn, "quantized_matmul", _naive_quantized_matmul)
        assert temp_bytes() > float_bytes


def test_quantized_leaves_never_train():
    config, params = _tiny_llama()
    qparams = quant.quantize(params, "nf4")
    with pytest.raises(ValueError, match="quantized weights cannot be trained: .*q_proj/kernel_absmax"):
        jpeft.trainable_mask(qparams, selective=jpeft.SelectiveConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantized weights cannot be trained"):
        jpeft.trainable_mask(qparams, modules_to_save=["mlp"])
    with pytest.raises(ValueError, match="quantized weights cannot be trained"):
        split.optimizer(optax.adam(1e-3), jax.tree.map(lambda _: True, qparams))  # full fine-tuning
    with pytest.raises(ValueError, match="PiSSA"):
        lora.inject(qparams, jpeft.LoraConfig(init="pissa", target_modules=["q_proj"]), jax.random.key(0))
    # Norms are not quantized, so selective training of them still works.
    mask = tree.flatten(jpeft.trainable_mask(qparams, selective=jpeft.SelectiveConfig(layer_norms=True)))
    assert any(mask.values()) and not any(m for p, m in mask.items() if quant.is_quantized_leaf(p))


def test_saving_a_quantized_base_as_a_checkpoint_names_dequantize(tmp_path):
    from jpeft.models import llama

    config, params = _tiny_llama()
    with pytest.raises(ValueError, match=r"needs float weights.*q_proj.*jpeft\.quant\.dequantize"):
        llama.save_pretrained(tmp_path / "out", config, quant.quantize(params, "int8", targets=["q_proj"]))
    assert not (tmp_path / "out").exists()


def test_parameter_counts_do_not_change_when_the_base_is_quantized():
    config, params = _tiny_llama()
    cfg = jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    floating = lora.inject(params, cfg, jax.random.key(0))
    quantized = lora.inject(quant.quantize(params, "nf4"), cfg, jax.random.key(0))
    assert jpeft.count_params(quantized, verbose=False) == jpeft.count_params(floating, verbose=False)


def test_generation_on_quantized_llama_matches_dequantized():
    from jpeft.models import llama

    config, params = _tiny_llama()
    qparams = quant.quantize(params, "int8")
    ids = np.array([[5, 6, 7, 8], [0, 9, 10, 11]])
    mask = (ids > 0).astype(np.int32)
    ours = llama.generate(config, qparams, ids, mask, max_new_tokens=4)
    np.testing.assert_array_equal(ours, llama.generate(config, quant.dequantize(qparams), ids, mask, max_new_tokens=4))


# ----------------------------------------------------------------------------------------------
# The packaged SmolLM2 GGUF, kept packed


@pytest.fixture(scope="module")
def smollm2():
    from jpeft.models import llama
    from tests.conftest import NO_SMOLLM, SMOLLM

    if SMOLLM is None:
        pytest.skip(NO_SMOLLM)
    config, packed = llama.load_pretrained(SMOLLM, quantized=True)
    return config, packed, llama.load_pretrained(SMOLLM)[1]


def test_smollm2_loads_packed(smollm2, tmp_path):
    from jpeft.models import llama

    config, packed, floats = smollm2
    formats = {quant.format_of(targets.get_module(packed, m)) for m in quant.quantized_modules(packed)}
    assert formats == {"q4_1"} and len(quant.quantized_modules(packed)) == 7 * config.num_hidden_layers
    assert packed["model"]["embed_tokens"]["embedding"].dtype == jnp.float32  # the Q8_0 table is gathered: float
    ids = np.array([[1, 504, 3458, 314, 260, 1345, 28, 9421, 30]])
    logits = jax.jit(lambda p: llama.forward(config, p, ids, np.ones_like(ids)))
    np.testing.assert_allclose(logits(packed), logits(floats), rtol=1e-4, atol=1e-4)

    cfg = jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = lora.inject(packed, cfg, jax.random.key(0))
    mask = jpeft.trainable_mask(model)
    assert {p.rsplit("/", 1)[-1] for p, m in tree.flatten(mask).items() if m} == {"lora_a", "lora_b"}
    state = split.optimizer(optax.adam(1e-3), mask).init(jpeft.partition(model, mask)[0])
    assert all(np.size(leaf) <= 4 * 576 for leaf in jax.tree.leaves(state))  # no state beside the base
    jpeft.save_adapter(tmp_path / "adapter", model, cfg)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size < 2_000_000  # LoRA only, never the base
    reloaded = jpeft.load_adapter(tmp_path / "adapter", floats)  # the fingerprint counts packed weights as their kernels
    merged = lora.merge(model)
    assert "kernel" in merged["model"]["layers"]["0"]["self_attn"]["q_proj"] and quant.is_quantized(merged["model"]["layers"]["0"]["mlp"]["up_proj"])
    np.testing.assert_allclose(merged["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"],
                               lora.merge(reloaded)["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# The CLI's --quantize


def test_cli_quantize_is_checked_before_loading(tmp_path, capsys):
    from train import summarize

    cases = [(["--quantize", "gguf", "--model", str(tmp_path)], "--quantize gguf keeps a .gguf file's blocks packed"),
             (["--quantize", "nf4", "--method", "full"], "--method full trains every weight")]
    for argv, message in cases:
        assert summarize.main(argv + ["--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_quantize_end_to_end(tmp_path, capsys):
    """A tiny T5 whose dims are not multiples of 64: NF4 is refused by name before loading; int8 trains, records
    --quantize in run.json and exports the merged model in float."""
    import json

    from tests.conftest import SHARED, make_hf_t5
    from tests.train import test_summarize

    if not (SHARED / "tokenizers" / "t5").is_dir():
        pytest.skip("needs ../shared/tokenizers/t5")

    model_dir, data_dir = tmp_path / "t5", tmp_path / "data"
    make_hf_t5(model_dir, vocab_size=32128, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    data_dir.mkdir()
    for split_name in ("train", "validation"):
        rows = [{"id": str(i), "dialogue": d, "summary": s} for i, (d, s) in enumerate(test_summarize.DIALOGUES)]
        (data_dir / f"{split_name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert test_summarize._run(model_dir, data_dir, tmp_path / "nf4", "--quantize", "nf4") == 2
    assert "--quantize nf4: cannot quantize" in capsys.readouterr().err
    out = tmp_path / "int8"
    assert test_summarize._run(model_dir, data_dir, out, "--quantize", "int8", "--steps", "1", "--eval-samples", "0", "--merge") == 0
    assert json.loads((out / "run.json").read_text())["settings"]["quantize"] == "int8"
    assert (out / "merged" / "model.safetensors").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()


_SHARDED = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np, optax, jpeft
from jpeft import batches, lora, sharding, training, tree
from tests.quant.test_quant import _mixed_quantized, _tiny_llama

config, params = _tiny_llama()
params = lora.inject(_mixed_quantized(params), jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]), jax.random.key(1))
params = jax.tree.map(lambda x: x + 0.01 if x.dtype == jnp.float32 and x.ndim == 2 and x.shape[0] == 4 else x, params)  # B != 0
trainable, frozen = jpeft.partition(params, jpeft.trainable_mask(params))
rng = np.random.default_rng(0)  # 4 examples: data x fsdp = 4 ways divide the rows
batch = batches.causal_lm_batch([list(rng.integers(2, 96, n)) for n in (5, 9, 3, 7)], [list(rng.integers(2, 96, n)) for n in (2, 4, 6, 3)],
                                pad_id=0, eos_id=1, bucket=8)
tx, loss_fn = optax.sgd(0.1), training.causal_lm_loss(config)
ref = training.make_train_step(loss_fn, tx)(jax.tree.map(jnp.copy, trainable), tx.init(trainable), frozen, batch, None)
run = sharding.setup("data=2,fsdp=2,model=2", loss_fn, tx, trainable, frozen, tx.init(trainable), batch)
codes = [x for p, x in tree.flatten(run.frozen).items() if p.endswith("/kernel_nf4")]
assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in codes), "NF4 codes were not sharded"
out = run.step(run.trainable, run.opt_state, run.frozen, run.batch, None)
assert abs(float(out[2]) - float(ref[2])) < 1e-5, (float(out[2]), float(ref[2]))
updated = {p: v for p, v in tree.flatten(sharding.gather(out[0])).items() if v is not None}
assert len(updated) == 12  # lora_a, lora_b on three modules of two layers
for path, value in updated.items():
    np.testing.assert_allclose(np.asarray(value), np.asarray(tree.flatten(ref[0])[path]), atol=1e-5, err_msg=path)
print("OK")
"""


def test_sharded_step_on_a_quantized_base_matches_one_device():
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import FAST_COMPILE

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])), "XLA_FLAGS": FAST_COMPILE}
    done = subprocess.run([sys.executable, "-c", _SHARDED], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-4000:]
