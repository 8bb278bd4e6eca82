"""T5 parity with transformers: logits, greedy and beam generation, save/load round trip, bad checkpoints."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jpeft import training, tree
from jpeft.formats.hf_io import CheckpointError
from jpeft.models import t5
from tests.conftest import SHARED, damage_file, make_hf_t5, padded_batch, rewrite_safetensors


def torch_logits(model, ids, mask, dec, dec_mask=None):  # noqa: F811 (adds the decoder mask)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    decoder_input_ids=torch.tensor(dec),
                    decoder_attention_mask=None if dec_mask is None else torch.tensor(dec_mask))
    return out.logits.numpy()


def test_logits_match_transformers(hf_t5_dir):
    path, model = hf_t5_dir
    config, params = t5.load_pretrained(path)
    rng = np.random.default_rng(0)
    ids, mask = padded_batch(rng, 3, 11, config.vocab_size)
    dec, dec_mask = padded_batch(rng, 3, 7, config.vocab_size)
    dec[:, 0] = 0
    ref = torch_logits(model, ids, mask, dec, dec_mask)
    ours = np.asarray(jax.jit(lambda p, *a: t5.forward(config, p, *a))(params, ids, mask, dec, dec_mask))
    valid = dec_mask.astype(bool)
    assert np.abs(ours - ref)[valid].max() < 1e-4


def test_full_gradients_match_transformers(hf_t5_dir):
    """Every weight's gradient of the mean token loss, position-bias tables included (T5's attention has a custom VJP)."""
    path, model = hf_t5_dir
    config, params = t5.load_pretrained(path)
    rng = np.random.default_rng(4)
    ids, mask = padded_batch(rng, 3, 11, config.vocab_size)
    labels, dec_mask = padded_batch(rng, 3, 6, config.vocab_size)
    labels = np.where(dec_mask > 0, labels, -100)
    model.zero_grad()
    model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss.backward()
    ref = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    loss = training.seq2seq_loss(config)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels.astype(np.int32)}
    grads = tree.flatten(jax.jit(jax.grad(lambda p: loss(p, batch, None)))(params))
    ours = t5.state_dict_from_params(tree.unflatten(grads))
    assert "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" in ours
    for name, g in ours.items():
        scale = max(np.abs(ref[name]).max(), 1e-3)
        assert np.abs(g - ref[name]).max() < 1e-4 * scale + 1e-6, name


def test_bf16_compute_stays_close(hf_t5_dir):
    path, model = hf_t5_dir
    config, params = t5.load_pretrained(path)
    ids, mask = padded_batch(np.random.default_rng(1), 2, 9, config.vocab_size)
    dec = np.zeros((2, 4), np.int64)
    ref = torch_logits(model, ids, mask, dec)
    ours = np.asarray(t5.forward(config, params, ids, mask, dec, dtype=jnp.bfloat16))
    assert ours.dtype == np.float32 and params["shared"]["embedding"].dtype == jnp.float32
    assert np.abs(ours - ref).max() < 0.1 * np.abs(ref).max()


def test_dropout_is_deterministic_per_key_and_off_without_one(hf_t5_dir):
    path, _ = hf_t5_dir
    config, params = t5.load_pretrained(path)
    ids, mask = padded_batch(np.random.default_rng(2), 2, 6, config.vocab_size)
    dec = np.zeros((2, 3), np.int64)
    plain = t5.forward(config, params, ids, mask, dec)
    a = t5.forward(config, params, ids, mask, dec, dropout_rng=jax.random.key(0))
    b = t5.forward(config, params, ids, mask, dec, dropout_rng=jax.random.key(0))
    c = t5.forward(config, params, ids, mask, dec, dropout_rng=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - c).max() > 1e-3


def _trim(seq, eos):
    seq = list(seq)
    return seq[: seq.index(eos) + 1] if eos in seq else seq


def _compare_generation(model, config, params, ids, mask, max_new, num_beams, eos, length_penalty=1.0):
    with torch.no_grad():
        use_cache = config.num_decoder_layers == config.num_layers  # transformers' cache breaks otherwise
        ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=max_new,
                             num_beams=num_beams, do_sample=False, eos_token_id=eos, use_cache=use_cache,
                             length_penalty=length_penalty, early_stopping=False).numpy()[:, 1:]
    ours = np.asarray(t5.generate(config, params, ids, mask, max_new_tokens=max_new, num_beams=num_beams, eos_token_id=eos,
                                  length_penalty=length_penalty))
    assert ours.shape == (ids.shape[0], max_new)
    for r, o in zip(ref, ours):
        assert _trim(o, eos) == _trim(r, eos)
    return ours


def _stopped_early(row, eos, pad):
    row = list(row)
    return eos in row[:-1] and set(row[row.index(eos) + 1:]) == {pad}


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_matches_transformers(hf_t5_dir, num_beams):
    path, model = hf_t5_dir
    config, params = t5.load_pretrained(path)
    ids, mask = padded_batch(np.random.default_rng(3), 6, 10, config.vocab_size)
    out = _compare_generation(model, config, params, ids, mask, 12, num_beams, eos=1)
    # Tokens the model emits early, used as EOS, exercise early stopping, finished hypotheses and padding;
    # length_penalty=0 makes beam search favour short finished hypotheses.
    stopped = False
    for eos in list(dict.fromkeys(t for t in out[:, :3].ravel().tolist() if t != config.pad_token_id))[:3]:
        for penalty in (1.0, 0.0) if num_beams > 1 else (1.0,):
            again = _compare_generation(model, config, params, ids, mask, 12, num_beams, eos=eos, length_penalty=penalty)
            stopped |= any(_stopped_early(row, eos, config.pad_token_id) for row in again)
    assert stopped


def test_save_pretrained_round_trip(hf_t5_dir, tmp_path):
    from transformers import T5ForConditionalGeneration

    path, model = hf_t5_dir
    config, params = t5.load_pretrained(path)
    t5.save_pretrained(tmp_path / "out", config, params)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, mask = padded_batch(np.random.default_rng(4), 2, 8, config.vocab_size)
    dec = np.zeros((2, 5), np.int64)
    np.testing.assert_allclose(torch_logits(reloaded, ids, mask, dec), torch_logits(model, ids, mask, dec), atol=1e-5)
    _, again = t5.load_pretrained(tmp_path / "out")
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)


def test_sharded_checkpoint_loads(tmp_path):
    model = make_hf_t5(tmp_path / "single", feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    config, params = t5.load_pretrained(tmp_path / "sharded")
    ids, mask = padded_batch(np.random.default_rng(5), 2, 6, config.vocab_size)
    dec = np.zeros((2, 3), np.int64)
    np.testing.assert_allclose(t5.forward(config, params, ids, mask, dec), torch_logits(model, ids, mask, dec), atol=1e-4)


def test_init_params_matches_the_checkpoint_layout(hf_t5_dir):
    path, _ = hf_t5_dir
    config, params = t5.load_pretrained(path)
    fresh = t5.init_params(config, jax.random.key(0), tie_word_embeddings="lm_head" not in params)
    assert jax.tree_util.tree_map(jnp.shape, fresh) == jax.tree_util.tree_map(jnp.shape, params)


@pytest.mark.skipif(not (SHARED / "tokenizers" / "t5").is_dir(), reason="../shared/tokenizers/t5 not present")
def test_real_tokenizer_feeds_the_model(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / "t5")
    assert tok("Hello world").input_ids == [8774, 296, 1]
    model = make_hf_t5(tmp_path / "m", vocab_size=32128, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1,
                       num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    config, params = t5.load_pretrained(tmp_path / "m")
    batch = tok(["Summarize: #Person1#: Hi, how are you?", "Hello world"], padding=True, return_tensors="np")
    dec = np.zeros((2, 3), np.int64)
    ours = t5.forward(config, params, batch.input_ids, batch.attention_mask, dec)
    ref = torch_logits(model, batch.input_ids, batch.attention_mask, dec)
    assert np.abs(np.asarray(ours) - ref).max() < 1e-4
    generated = t5.generate(config, params, batch.input_ids, batch.attention_mask, max_new_tokens=4)
    assert all(isinstance(s, str) for s in tok.batch_decode(np.asarray(generated), skip_special_tokens=True))


# ---- bad input: one clear error naming the file or tensor, nothing half-loaded


@pytest.fixture
def saved(tmp_path):
    make_hf_t5(tmp_path / "m", feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return tmp_path / "m"


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        t5.load_pretrained(saved)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(saved, damage):
    damage_file(saved / "model.safetensors", damage)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        t5.load_pretrained(saved)


def test_shape_disagreeing_with_config(saved):
    rewrite_safetensors(saved, lambda s: s.update({"encoder.block.1.layer.0.SelfAttention.q.weight": np.zeros((5, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=r"encoder\.block\.1\.layer\.0\.SelfAttention\.q\.weight.*\(5, 32\)"):
        t5.load_pretrained(saved)


def test_missing_tensor(saved):
    rewrite_safetensors(saved, lambda s: s.pop("decoder.block.0.layer.2.DenseReluDense.wo.weight"))
    with pytest.raises(CheckpointError, match=r"decoder\.block\.0\.layer\.2\.DenseReluDense\.wo\.weight"):
        t5.load_pretrained(saved)


def test_pickle_only_directory_is_refused(saved):
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*allow_pickle"):
        t5.load_pretrained(saved)


def test_pickle_loads_when_opted_in(saved):
    from safetensors.torch import load_file

    torch.save(load_file(saved / "model.safetensors"), saved / "pytorch_model.bin")
    (saved / "model.safetensors").unlink()
    _, params = t5.load_pretrained(saved, allow_pickle=True)
    assert "lm_head" in params


def test_hub_id_offline_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline.*local directory"):
        t5.load_pretrained("google/flan-t5-base-does-not-exist-here")


def test_save_refuses_peft_leaves_and_leaves_nothing_behind(saved, tmp_path):
    config, params = t5.load_pretrained(saved)
    params["encoder"]["block"]["0"]["layer"]["0"]["SelfAttention"]["q"]["lora_a"] = jnp.zeros((32, 2))
    with pytest.raises(ValueError, match="lora_a"):
        t5.save_pretrained(tmp_path / "out", config, params)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
