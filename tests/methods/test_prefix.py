"""Prefix tuning: parity with HF PEFT's PREFIX_TUNING on tiny Llama, Mistral (sliding window), Gemma 3 and T5,
with and without the projection MLP; generation, PEFT files both ways, training (gradients, remat, packing), counts.

Generation is checked against greedy decoding through PEFT's *forward* (the prefix passed as past keys/values), and
T5's also against `PeftModel.generate` itself: PEFT 0.21.2's seq2seq generate dropped the prefix under transformers 5
(it returned the base model's ids); 0.22 honours it (`test_t5_generation_matches_peft_generate`).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from packaging.version import Version

import jpeft
from jpeft import prefix, sharding, split, training, tree
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import gemma, llama, t5
from tests.conftest import T5_CONFIGS, make_hf_t5, padded_batch
from tests.models.test_gemma import CONFIGS as GEMMA_CONFIGS
from tests.models.test_gemma import make_hf_gemma
from tests.models.test_llama import CONFIGS as LLAMA_CONFIGS
from tests.models.test_llama import batch, make_hf_llama
from tests.training.test_packing import _batch as packing_batch

N = 3  # virtual tokens: with Gemma's and Mistral's window of 4, later tokens lose sight of the prefix
T5_ODD = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_heads=4, num_layers=3, num_decoder_layers=3)
CAUSAL = {  # name: (jpeft module, builder)
    "llama_gqa": (llama, lambda p: make_hf_llama(p, "llama", **LLAMA_CONFIGS["gqa_tied"][1])),
    "mistral_window": (llama, lambda p: make_hf_llama(p, "mistral", **LLAMA_CONFIGS["mistral_window"][1])),
    "gemma3_window": (gemma, lambda p: make_hf_gemma(p, "gemma3_text", **GEMMA_CONFIGS["gemma3_local_rope"][1])),
}
T5S = {"t5_even_layers": T5_CONFIGS["v1_0"], "t5_odd_layers": T5_ODD}


def _peft(model, task: str, projection: bool, seed: int = 1):
    """PEFT's prefix model over `model`, with its (random, non-zero) prefix weights drawn from `seed`."""
    torch.manual_seed(seed)
    cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=N, prefix_projection=projection,
                                  encoder_hidden_size=20 if projection else None)
    return peft.get_peft_model(model, cfg).eval()


def _leaves(ref) -> dict:
    """PEFT's prefix encoder weights as jpeft leaves (Linear weights transposed to kernels)."""
    enc = ref.prompt_encoder["default"]
    out = {prefix.LEAF: jnp.asarray(enc.embedding.weight.detach().numpy())}
    if ref.peft_config["default"].prefix_projection:
        out[prefix.MLP] = {i: {"kernel": jnp.asarray(enc.transform[int(i)].weight.detach().numpy().T),
                               "bias": jnp.asarray(enc.transform[int(i)].bias.detach().numpy())} for i in ("0", "2")}
    return out


@pytest.fixture(scope="module", params=sorted(CAUSAL))
def causal(request, tmp_path_factory):
    """(name, jpeft module, saved directory, jpeft config, base params) per decoder-only configuration."""
    module, build = CAUSAL[request.param]
    path = tmp_path_factory.mktemp(request.param)
    build(path)
    config, params = module.load_pretrained(path)
    return request.param, module, path, config, params


def _fresh(module, path):
    cls = {llama: "AutoModelForCausalLM", gemma: "AutoModelForCausalLM"}[module]
    import transformers

    return getattr(transformers, cls).from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=sorted(T5S))
def seq2seq(request, tmp_path_factory):
    """(saved directory, jpeft config, base params) per T5 configuration."""
    path = tmp_path_factory.mktemp(request.param)
    make_hf_t5(path, **T5S[request.param])
    config, params = t5.load_pretrained(path)
    return path, config, params


def _t5_torch(path):
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()


def _causal_logits(model, ids, mask, position_ids=None):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=None if position_ids is None else torch.tensor(position_ids)).logits.numpy()


def _t5_inputs():
    ids, mask = padded_batch(np.random.default_rng(7), 3, 9, 96)
    dec = np.random.default_rng(8).integers(2, 96, size=(3, 5))
    dec[:, 0] = 0
    dec_mask = np.ones_like(dec)
    dec_mask[1, 3:] = 0  # a padded target: PEFT extends decoder_attention_mask by N ones
    return ids, mask, dec, dec_mask


def _t5_logits(model, ids, mask, dec, dec_mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
                     decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()


# ---- logits


@pytest.mark.parametrize("projection", [False, True])
def test_causal_logits_match_peft(causal, projection):
    name, module, path, config, params = causal
    ref = _peft(_fresh(module, path), "CAUSAL_LM", projection)
    ours_params = {**params, **_leaves(ref)}
    ids, mask = batch(np.random.default_rng(0), 4, 11)  # right-padded, longer than the window
    real = mask.astype(bool)
    ours = np.asarray(module.forward(config, ours_params, ids, mask))
    assert np.abs(ours - _causal_logits(ref, ids, mask))[real].max() < 1e-4
    assert np.abs(ours - np.asarray(module.forward(config, params, ids, mask)))[real].max() > 1e-2  # the prefix acts
    if name == "llama_gqa":  # left padding, with the positions jpeft uses (PEFT shifts given position_ids by N)
        ids, mask = batch(np.random.default_rng(1), 4, 9, side="left")
        positions = np.maximum(mask.cumsum(-1) - 1, 0)
        ours = np.asarray(module.forward(config, ours_params, ids, mask))
        assert np.abs(ours - _causal_logits(ref, ids, mask, positions))[mask.astype(bool)].max() < 1e-4


@pytest.mark.parametrize("projection", [False, True])
def test_t5_logits_match_peft(seq2seq, projection):
    """PEFT gives T5's decoder self-attention a prefix (cross-attention's is discarded, the encoder gets none); with
    an even number of layers half of the prefix rows are never read, with an odd number all are."""
    path, config, params = seq2seq
    ref = _peft(_t5_torch(path), "SEQ_2_SEQ_LM", projection)
    ours_params = {**params, **_leaves(ref)}
    ids, mask, dec, dec_mask = _t5_inputs()
    ours = np.asarray(t5.forward(config, ours_params, ids, mask, dec, dec_mask))
    real = dec_mask.astype(bool)
    assert np.abs(ours - _t5_logits(ref, ids, mask, dec, dec_mask))[real].max() < 1e-4
    assert np.abs(ours - np.asarray(t5.forward(config, params, ids, mask, dec, dec_mask)))[real].max() > 1e-2


def test_rows_feed_the_layers_peft_feeds(seq2seq):
    """Which prefix rows each layer reads: T5 layer l takes blocks 4l, 4l+1 (mod 2L); decoder-only layer l 2l, 2l+1."""
    _, config, params = seq2seq
    L, width = config.num_layers, config.num_layers * 2 * config.d_model
    rows = jnp.arange(N * width, dtype=jnp.float32).reshape(N, width)
    blocks = rows.reshape(N, 2 * L, -1)
    for l, (k, v) in enumerate(prefix.past_key_values({**params, prefix.LEAF: rows}, config)):
        r = (4 * l) % (2 * L)
        np.testing.assert_array_equal(k.transpose(1, 0, 2).reshape(N, -1), blocks[:, r])
        np.testing.assert_array_equal(v.transpose(1, 0, 2).reshape(N, -1), blocks[:, r + 1])


# ---- generation


def _peft_greedy_causal(ref, ids, mask, steps):
    """Greedy continuation through PEFT's forward, positions from the mask as transformers' generate computes them."""
    seq, mk = torch.tensor(ids), torch.tensor(mask)
    with torch.no_grad():
        for _ in range(steps):
            logits = ref(input_ids=seq, attention_mask=mk, position_ids=(mk.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
            seq, mk = torch.cat([seq, logits.argmax(-1)[:, None]], 1), torch.cat([mk, torch.ones_like(mk[:, :1])], 1)
    return seq[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("projection", [False, True])
def test_causal_generation_matches_peft_forward(causal, projection):
    """Batched, left-padded jpeft generation (KV cache holding the prefix) against each row decoded alone through PEFT:
    jpeft's sliding windows count real slots only, so padding between the prefix and a prompt changes nothing."""
    _, module, path, config, params = causal
    ref = _peft(_fresh(module, path), "CAUSAL_LM", projection)
    ours_params = {**params, **_leaves(ref)}
    ids, mask = batch(np.random.default_rng(3), 3, 7, side="left")
    ours = np.asarray(module.generate(config, ours_params, ids, mask, max_new_tokens=8, eos_token_id=-1))
    for row, m, got in zip(ids, mask, ours):
        alone = row[m.astype(bool)][None]
        np.testing.assert_array_equal(got, _peft_greedy_causal(ref, alone, np.ones_like(alone), 8)[0])
    assert not np.array_equal(ours, np.asarray(module.generate(config, params, ids, mask, max_new_tokens=8, eos_token_id=-1)))


def test_t5_generation_matches_peft_forward(seq2seq):
    path, config, params = seq2seq
    ref = _peft(_t5_torch(path), "SEQ_2_SEQ_LM", projection=True)
    ours_params = {**params, **_leaves(ref)}
    ids, mask, _, _ = _t5_inputs()
    dec = torch.zeros((3, 1), dtype=torch.long)
    with torch.no_grad():
        for _ in range(7):
            logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=dec).logits[:, -1]
            dec = torch.cat([dec, logits.argmax(-1)[:, None]], 1)
    ours = np.asarray(t5.generate(config, ours_params, ids, mask, max_new_tokens=7, eos_token_id=-1))
    np.testing.assert_array_equal(ours, dec[:, 1:].numpy())


PEFT_HONOURS_SEQ2SEQ_PREFIX = Version(peft.__version__) >= Version("0.22")


@pytest.mark.skipif(not PEFT_HONOURS_SEQ2SEQ_PREFIX, reason="PEFT < 0.22's seq2seq generate drops the prefix under transformers 5")
def test_t5_generation_matches_peft_generate(tmp_path):
    """PEFT 0.22's seq2seq generate honours the prefix (0.21.2's returned the base model's ids under transformers 5):
    jpeft's greedy ids equal PEFT's `generate`, and differ from the base model's."""
    make_hf_t5(tmp_path, **T5_ODD)
    ref = _peft(_t5_torch(tmp_path), "SEQ_2_SEQ_LM", projection=False)
    config, params = t5.load_pretrained(tmp_path)
    ids, mask, _, _ = _t5_inputs()
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6, do_sample=False, eos_token_id=-1)
    with torch.no_grad():
        want = ref.generate(**kwargs).numpy()[:, 1:]  # without the decoder start token
        with ref.disable_adapter():
            base = ref.generate(**kwargs).numpy()[:, 1:]
    ours = np.asarray(t5.generate(config, {**params, **_leaves(ref)}, ids, mask, max_new_tokens=6, eos_token_id=-1))
    np.testing.assert_array_equal(ours, want)
    assert not np.array_equal(want, base)


# ---- PEFT files


def _causal_ref_logits_after_load(module, path, adapter_dir, ids, mask):
    loaded = peft.PeftModel.from_pretrained(_fresh(module, path), adapter_dir).eval()
    return _causal_logits(loaded, ids, mask)


def test_peft_files_both_ways_causal(causal, tmp_path):
    """PEFT writes the projected prefix (`prompt_embeddings`) even when it trained with projection; jpeft reads it
    as the prefix itself, and writes the same, which PEFT loads for inference."""
    _, module, path, config, params = causal
    ref = _peft(_fresh(module, path), "CAUSAL_LM", projection=True)
    ids, mask = batch(np.random.default_rng(5), 3, 8)
    real = mask.astype(bool)
    want = _causal_logits(ref, ids, mask)
    ref.save_pretrained(tmp_path / "peft")
    loaded = jpeft.load_adapter(tmp_path / "peft", params)
    assert set(tree.flatten(split.split_adapter(loaded)[1])) == {prefix.LEAF}
    assert np.abs(np.asarray(module.forward(config, loaded, ids, mask)) - want)[real].max() < 1e-4

    ours = {**params, **_leaves(_peft(_fresh(module, path), "CAUSAL_LM", projection=True, seed=2))}
    jpeft.save_adapter(tmp_path / "ours", ours, jpeft.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True))
    got = _causal_ref_logits_after_load(module, path, tmp_path / "ours", ids, mask)
    assert np.abs(np.asarray(module.forward(config, ours, ids, mask)) - got)[real].max() < 1e-4
    again = jpeft.load_adapter(tmp_path / "ours", params)  # and back: the folded prefix
    np.testing.assert_allclose(again[prefix.LEAF], prefix.fold(ours)[prefix.LEAF], atol=1e-6)


def test_peft_files_both_ways_t5(seq2seq, tmp_path):
    path, config, params = seq2seq
    ref = _peft(_t5_torch(path), "SEQ_2_SEQ_LM", projection=False)
    ids, mask, dec, dec_mask = _t5_inputs()
    real = dec_mask.astype(bool)
    ref.save_pretrained(tmp_path / "peft")
    loaded = jpeft.load_adapter(tmp_path / "peft", params)
    want = _t5_logits(ref, ids, mask, dec, dec_mask)
    assert np.abs(np.asarray(t5.forward(config, loaded, ids, mask, dec, dec_mask)) - want)[real].max() < 1e-4

    ours = prefix.inject(params, jpeft.PrefixTuningConfig(num_virtual_tokens=N), jax.random.key(4), config)
    jpeft.save_adapter(tmp_path / "ours", ours)
    back = peft.PeftModel.from_pretrained(_t5_torch(path), tmp_path / "ours").eval()
    got = _t5_logits(back, ids, mask, dec, dec_mask)
    assert np.abs(np.asarray(t5.forward(config, ours, ids, mask, dec, dec_mask)) - got)[real].max() < 1e-4


def test_bad_files_and_configs_are_refused(seq2seq, tmp_path):
    path, config, params = seq2seq
    ours = prefix.inject(params, jpeft.PrefixTuningConfig(num_virtual_tokens=N), jax.random.key(0), config)
    with pytest.raises(ValueError, match="disagrees with config"):
        jpeft.save_adapter(tmp_path / "x", ours, jpeft.PrefixTuningConfig(num_virtual_tokens=N + 1))
    jpeft.save_adapter(tmp_path / "ok", ours)
    # A prefix of twice the layers at half the width has the same flat shape: the config's dims tell them apart.
    cfg_file = tmp_path / "ok" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "num_layers": cfg["num_layers"] * 2, "token_dim": cfg["token_dim"] // 2}))
    with pytest.raises(CheckpointError, match=r"trained for \{'num_layers': \d+, 'token_dim': \d+\}, but the given base has"):
        jpeft.load_adapter(tmp_path / "ok", params)
    cfg_file.write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    state = load_file(tmp_path / "ok" / "adapter_model.safetensors")
    save_file({"prompt_embeddings": state["prompt_embeddings"][:, :-1]}, tmp_path / "ok" / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"prompt_embeddings has shape .* need"):
        jpeft.load_adapter(tmp_path / "ok", params)


def test_t5_shapes_peft_cannot_split_are_refused(tmp_path):
    """PEFT cuts a T5 prefix into heads of d_model / num_heads and sizes it by the encoder's layers; jpeft refuses the
    T5s where that goes wrong (PEFT itself fails with a reshape error there)."""
    make_hf_t5(tmp_path / "a", **T5_CONFIGS["flan_odd_heads"])  # 3 heads of 8 in d_model 32; 2 encoder, 3 decoder layers
    config, params = t5.load_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="num_decoder_layers == num_layers"):
        prefix.inject(params, jpeft.PrefixTuningConfig(num_virtual_tokens=2), jax.random.key(0), config)
    with pytest.raises(ValueError, match=r"num_heads \* d_kv == d_model"):
        prefix.layout(config.__class__(**{**config.to_dict(), "num_decoder_layers": 2}))


# ---- training, counts, sharding


def test_init_and_counts_match_peft(causal):
    """The leaves' shapes are PEFT's PrefixEncoder's (KV heads under GQA), and count_params reports what PEFT does:
    with projection, the embedding and the whole MLP train."""
    _, module, path, config, params = causal
    for projection in (False, True):
        ref = _peft(_fresh(module, path), "CAUSAL_LM", projection)
        cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=20 if projection else None)
        ours = prefix.inject(params, cfg, jax.random.key(0), config)
        assert jax.tree.map(jnp.shape, split.split_adapter(ours)[1]) == jax.tree.map(jnp.shape, _leaves(ref))
        trainable, total = jpeft.count_params(ours, verbose=False)
        assert (trainable, total) == ref.get_nb_trainable_parameters()
    flat_pre = np.asarray(prefix.flat(ours))
    assert flat_pre.std() > 0.1 and prefix.fold(ours).keys() == params.keys() | {prefix.LEAF}
    zero = prefix.inject(params, jpeft.PrefixTuningConfig(num_virtual_tokens=N, init_weights="zero"), jax.random.key(0), config)
    assert not np.asarray(zero[prefix.LEAF]).any()


def test_fold_keeps_the_logits(causal):
    _, module, _, config, params = causal
    cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True)
    ours = prefix.inject(params, cfg, jax.random.key(1), config)
    ids, mask = batch(np.random.default_rng(2), 2, 6)
    np.testing.assert_allclose(module.forward(config, prefix.fold(ours), ids, mask), module.forward(config, ours, ids, mask), atol=1e-5)


def test_loss_gradients_remat_and_packing(causal):
    """The causal-LM loss equals the cross-entropy of PEFT's logits; gradients (through jpeft.partition) reach every
    prefix leaf and nothing else, identically under remat; packed rows are refused."""
    _, module, path, config, params = causal
    ref = _peft(_fresh(module, path), "CAUSAL_LM", projection=True)
    ours = {**params, **_leaves(ref)}
    rng = np.random.default_rng(0)
    seqs, n_targets = [rng.integers(3, 96, n).tolist() for n in (9, 4, 6)], [3, 2, 4]
    b = packing_batch(seqs, n_targets, 10, pack=False)
    total, count = 0.0, 0
    for s, n in zip(seqs, n_targets):
        logp = torch.log_softmax(torch.tensor(_causal_logits(ref, np.array([s]), np.ones((1, len(s)), int))[0]), -1)
        total -= sum(float(logp[len(s) - n - 1 + t, s[len(s) - n + t]]) for t in range(n))
        count += n
    mask = jpeft.trainable_mask(ours)
    trainable, frozen = jpeft.partition(ours, mask)
    assert {p for p, v in tree.flatten(trainable).items() if v is not None} == {
        prefix.LEAF, "prefix_mlp/0/kernel", "prefix_mlp/0/bias", "prefix_mlp/2/kernel", "prefix_mlp/2/bias"}
    results = []
    for remat in (False, True):
        loss_fn = training.causal_lm_loss(config, remat=remat)
        value, grads = jax.jit(jax.value_and_grad(lambda t: loss_fn(jpeft.combine(t, frozen), b, None)))(trainable)
        results.append((value, grads))
    assert abs(float(results[0][0]) - total / count) < 1e-4
    flat_grads = {p: g for p, g in tree.flatten(results[0][1]).items() if g is not None}
    assert set(flat_grads) == set(p for p, v in tree.flatten(trainable).items() if v is not None)
    assert all(float(jnp.abs(g).max()) > 0 for g in flat_grads.values())
    for g0, g1 in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(g0, g1, atol=1e-5)
    with pytest.raises(ValueError, match="prefix tuning cannot train on packed rows"):
        training.causal_lm_loss(config)(ours, packing_batch(seqs, n_targets, 16, pack=True), None)


def test_t5_loss_remat_agrees(seq2seq):
    _, config, params = seq2seq
    ours = prefix.inject(params, jpeft.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True), jax.random.key(2), config)
    ids, mask, dec, _ = _t5_inputs()
    b = {"input_ids": ids, "attention_mask": mask, "labels": np.where(dec > 1, dec, -100)}
    trainable, frozen = jpeft.partition(ours, jpeft.trainable_mask(ours))
    grads = [jax.jit(jax.grad(lambda t, r=remat: training.seq2seq_loss(config, remat=r)(jpeft.combine(t, frozen), b, None)))(trainable)
             for remat in (False, True)]
    assert float(jnp.abs(grads[0][prefix.LEAF]).max()) > 0
    for g0, g1 in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(g0, g1, atol=1e-5)


def test_prefix_leaves_are_replicated(causal):
    _, _, _, config, params = causal
    ours = prefix.inject(params, jpeft.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True), jax.random.key(0), config)
    specs = tree.flatten(sharding.param_specs(ours, {"data": 1, "fsdp": 2, "model": 2}, warn=False))
    assert all(specs[p] == jax.sharding.PartitionSpec() for p in specs if p.startswith(("prefix_",)))
