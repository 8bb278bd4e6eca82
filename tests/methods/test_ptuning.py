"""P-tuning: parity with HF PEFT's PromptEncoder (MLP and LSTM) on T5, Llama and Gemma 3, adapter files both ways,
folding, gradients against torch, init and errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file

import jpeft
from jpeft import ptuning, split, training, tree
from jpeft.models import gemma, llama, t5
from tests.conftest import jpeft_logits, torch_logits
from tests.models.test_gemma import make_hf_gemma
from tests.models.test_llama import batch, make_hf_llama

N, HIDDEN = 3, 12  # HIDDEN differs from every tiny model's d_model (32), so a transposed or misplaced kernel fails


def _peft_config(kind: str, task: str, **kw) -> peft.PromptEncoderConfig:
    return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=N, encoder_reparameterization_type=kind,
                                    encoder_hidden_size=HIDDEN, **kw)


def _ours(kind: str, **kw) -> ptuning.PromptEncoderConfig:
    return ptuning.PromptEncoderConfig(N, kind, HIDDEN, **kw)


def _randomized(ref: peft.PeftModel) -> peft.PeftModel:
    """Move every encoder weight off its init (trained-size values), reproducibly."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in ref.prompt_encoder["default"].parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ref.eval()


def from_torch(state: dict) -> dict:
    """A PEFT PromptEncoder state dict (weights or their gradients) as jpeft's `prompt_encoder` subtree (kernels transposed)."""
    flat = {}
    for name, value in state.items():
        v = value.detach().numpy()
        if name == "embedding.weight":
            flat["embedding"] = v
        elif m := re.fullmatch(r"mlp_head\.(\d+)\.(weight|bias)", name):
            flat[f"mlp_head/{m[1]}/{'kernel' if m[2] == 'weight' else 'bias'}"] = v.T if m[2] == "weight" else v
        elif m := re.fullmatch(r"lstm_head\.(weight|bias)_(ih|hh)_(l\d+(?:_reverse)?)", name):
            flat[f"lstm_head/{m[3]}/{'kernel' if m[1] == 'weight' else 'bias'}_{m[2]}"] = v.T if m[1] == "weight" else v
        else:
            raise AssertionError(f"unexpected PEFT encoder weight {name}")
    return jax.tree.map(jnp.asarray, tree.unflatten(flat))


def _with_torch_encoder(params: dict, cfg: ptuning.PromptEncoderConfig, ref: peft.PeftModel) -> dict:
    """jpeft's injected tree with PEFT's encoder weights copied in; the two trees must have the same leaves and shapes."""
    ours = ptuning.inject(params, cfg, jax.random.key(0))
    theirs = from_torch(ref.prompt_encoder["default"].state_dict())
    if ptuning.DROPOUT in ours[ptuning.ENCODER]:
        theirs[ptuning.DROPOUT] = ours[ptuning.ENCODER][ptuning.DROPOUT]
    shapes = lambda t: {p: tuple(v.shape) for p, v in tree.flatten(t).items()}  # noqa: E731
    assert shapes(ours[ptuning.ENCODER]) == shapes(theirs)
    return {**ours, ptuning.ENCODER: theirs}


@pytest.fixture(params=["MLP", "LSTM"])
def t5_pair(request, flan):
    """(kind, PEFT P-tuning T5 with randomized encoder, jpeft tree with the same encoder)."""
    kind = request.param
    ref = _randomized(peft.get_peft_model(flan.torch(), _peft_config(kind, "SEQ_2_SEQ_LM", encoder_dropout=0.2)))
    return kind, ref, _with_torch_encoder(flan.params, _ours(kind, encoder_dropout=0.2), ref)


def test_t5_logits_match_peft(flan, t5_pair):
    kind, ref, params = t5_pair
    assert params[ptuning.ENCODER]["embedding"].shape == (2 * N, flan.config.d_model)  # one block per submodule, as PEFT
    ours = jpeft_logits(flan, params)
    assert np.abs(ours - torch_logits(ref, flan.ids, flan.mask, flan.dec)).max() < 1e-4
    assert np.abs(ours - jpeft_logits(flan, flan.params)).max() > 1e-2
    # Folding runs the encoder once; the folded tree computes the same logits, through the prompt-tuning path.
    folded = ptuning.fold(params)
    assert ptuning.ENCODER not in folded and folded["prompt_embeddings"].shape == (N, flan.config.d_model)
    assert np.abs(jpeft_logits(flan, folded) - ours).max() < 1e-6
    np.testing.assert_array_equal(t5.generate(flan.config, folded, flan.ids, flan.mask, max_new_tokens=4),
                                  t5.generate(flan.config, params, flan.ids, flan.mask, max_new_tokens=4))


def test_t5_files_both_ways(flan, t5_pair, tmp_path):
    kind, ref, params = t5_pair
    expected = torch_logits(ref, flan.ids, flan.mask, flan.dec)
    ref.save_pretrained(tmp_path / "peft")
    loaded = jpeft.load_adapter(tmp_path / "peft", flan.params)  # PEFT's file holds the encoder's output: a folded prompt
    assert np.abs(jpeft_logits(flan, loaded) - expected).max() < 1e-4
    jpeft.save_adapter(tmp_path / "ours", params, _ours(kind, encoder_dropout=0.2))
    # The same rows PEFT writes (all 2N, the decoder's block included) and the same config.
    ours_rows, peft_rows = (load_file(tmp_path / d / "adapter_model.safetensors")["prompt_embeddings"] for d in ("ours", "peft"))
    assert ours_rows.shape == (2 * N, flan.config.d_model) and np.abs(ours_rows - peft_rows).max() < 1e-5
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    assert (cfg.peft_type, cfg.encoder_reparameterization_type, cfg.encoder_hidden_size, cfg.encoder_dropout) == ("P_TUNING", kind, HIDDEN, 0.2)
    back = peft.PeftModel.from_pretrained(flan.torch(), str(tmp_path / "ours")).eval()
    assert np.abs(torch_logits(back, flan.ids, flan.mask, flan.dec) - expected).max() < 1e-4
    # Without a config it is rebuilt from the encoder; a folded tree saves as P-tuning when given the config.
    jpeft.save_adapter(tmp_path / "rebuilt", params)
    assert peft.PeftConfig.from_pretrained(str(tmp_path / "rebuilt")).encoder_hidden_size == HIDDEN
    jpeft.save_adapter(tmp_path / "folded", ptuning.fold(params), _ours(kind, encoder_dropout=0.2))
    folded_back = peft.PeftModel.from_pretrained(flan.torch(), str(tmp_path / "folded")).eval()
    assert np.abs(torch_logits(folded_back, flan.ids, flan.mask, flan.dec) - expected).max() < 1e-4


def _causal_pair(family: str, kind: str, path):
    model = make_hf_llama(path) if family == "llama" else make_hf_gemma(path, "gemma3_text", tie_word_embeddings=False)
    module = llama if family == "llama" else gemma
    config, base = module.load_pretrained(path)
    ref = _randomized(peft.get_peft_model(model, _peft_config(kind, "CAUSAL_LM")))
    return module, config, base, ref, _with_torch_encoder(base, _ours(kind), ref)


def _torch_causal(family: str, path) -> torch.nn.Module:
    """The saved tiny causal LM, reloaded fresh for PEFT to wrap."""
    import transformers

    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Gemma3ForCausalLM
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def _peft_causal_logits(ref, ids, mask):
    with torch.no_grad():
        return ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("kind", ["MLP", "LSTM"])
def test_causal_lm_logits_and_files_match_peft(family, kind, tmp_path):
    """The encoder's output is prepended unscaled on Gemma too: PEFT concatenates it past the sqrt(D)-scaling embedding layer."""
    module, config, base, ref, params = _causal_pair(family, kind, tmp_path / "model")
    ids, mask = batch(np.random.default_rng(2), 3, 7)
    expected = _peft_causal_logits(ref, ids, mask)[:, N:]
    ours = np.asarray(module.forward(config, params, ids, mask, prompt_logits=True))
    assert ours.shape[1] == N + 7
    assert np.abs(ours[:, N:] - expected)[mask > 0].max() < 1e-4
    assert np.abs(np.asarray(module.forward(config, ptuning.fold(params), ids, mask)) - ours[:, N:]).max() < 1e-6
    ref.save_pretrained(tmp_path / "peft")
    loaded = jpeft.load_adapter(tmp_path / "peft", base)
    assert np.abs(np.asarray(module.forward(config, loaded, ids, mask)) - expected)[mask > 0].max() < 1e-4
    jpeft.save_adapter(tmp_path / "ours", params, _ours(kind))
    back = peft.PeftModel.from_pretrained(_torch_causal(family, tmp_path / "model"), str(tmp_path / "ours")).eval()
    assert np.abs(_peft_causal_logits(back, ids, mask)[:, N:] - expected)[mask > 0].max() < 1e-4


def test_gradients_reach_only_the_encoder_and_match_torch(flan):
    """LSTM on T5: the bidirectional LSTM reads all 2N embedding rows, so the decoder block's rows get gradients too."""
    ref = _randomized(peft.get_peft_model(flan.torch(), _peft_config("LSTM", "SEQ_2_SEQ_LM", encoder_dropout=0.3)))
    params = _with_torch_encoder(flan.params, _ours("LSTM", encoder_dropout=0.3), ref)
    labels = np.random.default_rng(3).integers(2, flan.config.vocab_size, size=(3, 5))
    labels[0, -2:] = -100
    data = {"input_ids": flan.ids, "attention_mask": flan.mask, "labels": labels}
    mask = split.trainable_mask(params)
    trainable, frozen = split.partition(params, mask)
    chosen = sorted(p for p, m in tree.flatten(mask).items() if m)
    assert chosen == sorted(p for p in tree.flatten(params) if p.startswith("prompt_encoder/") and p != "prompt_encoder/encoder_dropout")
    loss_fn = training.seq2seq_loss(flan.config)
    loss, grads = jax.jit(jax.value_and_grad(lambda tr: loss_fn(split.combine(tr, frozen), data, None)))(trainable)
    out = ref(input_ids=torch.tensor(flan.ids), attention_mask=torch.tensor(flan.mask), labels=torch.tensor(labels))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) < 1e-5
    theirs = from_torch({n: p.grad for n, p in ref.prompt_encoder["default"].named_parameters()})
    ours = {p: g for p, g in tree.flatten(grads).items() if g is not None}
    assert set(ours) == {f"prompt_encoder/{p}" for p in tree.flatten(theirs)}  # no gradient leaves for the base or the constant
    for path, g in tree.flatten(theirs).items():
        assert np.abs(np.asarray(ours[f"prompt_encoder/{path}"]) - np.asarray(g)).max() < 1e-4, path
    assert np.abs(np.asarray(ours["prompt_encoder/embedding"])[N:]).max() > 1e-4
    # PEFT counts exactly these as trainable.
    assert split.count_params(params, verbose=False)[0] == ref.get_nb_trainable_parameters()[0]


def test_lstm_dropout_only_with_an_rng():
    enc = ptuning.init_encoder(jax.random.key(0), ptuning.PromptEncoderConfig(4, "LSTM", 8, encoder_dropout=0.5), 16)
    plain = ptuning.prompt_embeddings(enc)
    np.testing.assert_array_equal(plain, ptuning.prompt_embeddings(enc))
    dropped = ptuning.prompt_embeddings(enc, jax.random.key(1))
    assert np.abs(dropped - plain).max() > 1e-3
    np.testing.assert_array_equal(dropped, ptuning.prompt_embeddings(enc, jax.random.key(1)))
    no_rate = {**enc, ptuning.DROPOUT: jnp.float32(0.0)}
    np.testing.assert_allclose(ptuning.prompt_embeddings(no_rate, jax.random.key(1)), plain, atol=1e-7)
    one_layer = ptuning.init_encoder(jax.random.key(0), ptuning.PromptEncoderConfig(4, "LSTM", 8, encoder_num_layers=1, encoder_dropout=0.5), 16)
    np.testing.assert_array_equal(ptuning.prompt_embeddings(one_layer, jax.random.key(1)), ptuning.prompt_embeddings(one_layer))


def test_init_follows_torch_defaults(flan):
    params = ptuning.inject(flan.params, ptuning.PromptEncoderConfig(50, "LSTM", 16), jax.random.key(0))
    enc = params[ptuning.ENCODER]
    assert abs(float(jnp.std(enc["embedding"])) - 1.0) < 0.05 and enc["embedding"].dtype == jnp.float32
    for path, v in tree.flatten(enc["lstm_head"]).items():
        assert float(jnp.abs(v).max()) <= 16**-0.5 and float(jnp.abs(v).max()) > 0.9 * 16**-0.5, path
    for name, fan_in in (("0", 32), ("2", 32)):
        assert float(jnp.abs(enc["mlp_head"][name]["kernel"]).max()) <= fan_in**-0.5
    assert float(enc[ptuning.DROPOUT]) == 0.0
    assert ptuning.encoder_config(enc, 50) == ptuning.PromptEncoderConfig(50, "LSTM", 16)


def test_errors(flan, tmp_path):
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        ptuning.PromptEncoderConfig(encoder_reparameterization_type="GRU")
    with pytest.raises(ValueError, match="encoder_dropout"):
        ptuning.PromptEncoderConfig(encoder_dropout=1.0)
    params = ptuning.inject(flan.params, _ours("MLP"), jax.random.key(0))
    with pytest.raises(ValueError, match="already has a soft prompt"):
        ptuning.inject(params, _ours("MLP"), jax.random.key(0))
    with pytest.raises(ValueError, match="no prompt_encoder"):
        ptuning.fold(flan.params)
    with pytest.raises(ValueError, match="disagrees with config"):
        jpeft.save_adapter(tmp_path / "x", params, _ours("LSTM"))
    with pytest.raises(ValueError, match="disagrees with config"):
        jpeft.save_adapter(tmp_path / "x", params, ptuning.PromptEncoderConfig(N, "MLP", HIDDEN + 1))
    with pytest.raises(ValueError, match="disagrees with config"):
        jpeft.save_adapter(tmp_path / "x", params, jpeft.PromptTuningConfig(num_virtual_tokens=N))
    assert not (tmp_path / "x").exists()


def test_the_models_draw_encoder_dropout_from_the_forward_rng():
    """Llama without attention dropout: only the LSTM encoder's dropout can make a keyed forward pass differ."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    base = llama.init_params(config, jax.random.key(0))
    ids, mask = batch(np.random.default_rng(0), 2, 5, vocab=64)
    for kind, differs in (("LSTM", True), ("MLP", False)):
        params = ptuning.inject(base, ptuning.PromptEncoderConfig(2, kind, 8, encoder_dropout=0.5), jax.random.key(1))
        plain, keyed = (np.asarray(llama.forward(config, params, ids, mask, dropout_rng=r)) for r in (None, jax.random.key(2)))
        assert (np.abs(plain - keyed).max() > 1e-4) == differs, kind
