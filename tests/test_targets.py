"""Choosing modules by name: HF PEFT's matching on the same model, and a typo in one of several names is an error
for every method that takes names (where PEFT drops the entry and trains a smaller run)."""

from __future__ import annotations

import warnings

import jax
import pytest

import jpeft
from jpeft import ia3, loha, lokr, lora, quant, selective
from jpeft import targets as tg
from jpeft.models import llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF Llama, jpeft's parameter shapes of the same model): two layers, so dotted suffixes and indices mean something."""
    from tests.models.test_llama import make_hf_llama

    path = tmp_path_factory.mktemp("llama")
    model = make_hf_llama(path, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1)
    _, params = llama.load_pretrained(path)
    return model, params


def _peft_targets(model, targets) -> list[str] | None:
    """The modules HF PEFT adapts for `targets`, or None if it refuses them."""
    import copy

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            adapted = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules=targets))
        except ValueError:  # NoMatchingPeftModuleError, or a matched module of a type LoRA cannot wrap
            return None
    return sorted(adapted.base_model.targeted_module_names)


def _ours(params, targets) -> list[str] | None:
    try:
        return sorted(lora.target_names(params, lora.LoraConfig(target_modules=targets)))
    except ValueError:
        return None


@pytest.mark.parametrize("targets", [
    ["q_proj"], ["q_proj", "v_proj"], ["self_attn.q_proj"], ["layers.1.self_attn.q_proj"], ["model.layers.0.mlp.down_proj"],
    r".*\.1\..*_proj", ".*q_proj", "q_proj",  # a string is one regex, matched against the whole name ("q_proj" matches none)
    ["nonexistent"], ["proj"], ["self_attn"], ["layers.2.self_attn.q_proj"],
])
def test_the_modules_chosen_or_refused_are_peft_s(tiny, targets):
    model, params = tiny
    assert _ours(params, targets) == _peft_targets(model, targets)


@pytest.mark.parametrize("targets,typo", [(["q_proj", "q_prj"], "q_prj"), (["q_proj", "nonexistent_proj"], "nonexistent_proj")])
def test_a_list_entry_that_matches_nothing_is_refused_where_peft_drops_it(tiny, targets, typo):
    """The one place jpeft is stricter than HF PEFT 0.22, on purpose: PEFT trains q_proj alone."""
    model, params = tiny
    assert _peft_targets(model, targets) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    with pytest.raises(ValueError, match=rf"target_modules=\['q_proj', '{typo}'\]: '{typo}' matches no module\."):
        lora.target_names(params, lora.LoraConfig(target_modules=targets))


TYPO = ["q_proj", "v_prj"]
CLOSE = r"'v_prj' matches no module\. 'v_prj': did you mean 'v_proj'\?.*Module names in this model: \[.*'down_proj'"
ALL_METHODS = {
    "lora": lambda p: lora.inject(p, lora.LoraConfig(target_modules=TYPO), jax.random.key(0)),
    "dora": lambda p: lora.inject(p, lora.LoraConfig(target_modules=TYPO, use_dora=True), jax.random.key(0)),
    "ia3": lambda p: ia3.inject(p, ia3.IA3Config(target_modules=TYPO, feedforward_modules=[])),
    "loha": lambda p: loha.inject(p, loha.LoHaConfig(target_modules=TYPO), jax.random.key(0)),
    "lokr": lambda p: lokr.inject(p, lokr.LoKrConfig(target_modules=TYPO), jax.random.key(0)),
    "quantize": lambda p: quant.quantize(p, "int8", targets=TYPO),
    "selective": lambda p: selective.selected_paths(p, selective.SelectiveConfig(target_modules=TYPO)),
    "modules_to_save": lambda p: jpeft.trainable_mask(p, modules_to_save=TYPO),
}


@pytest.mark.parametrize("method", sorted(ALL_METHODS))
def test_a_typo_in_one_of_several_names_is_an_error_naming_it_and_the_close_name(tiny, method):
    with pytest.raises(ValueError, match=CLOSE):
        ALL_METHODS[method](tiny[1])


def test_ia3_checks_its_feedforward_names_against_the_targets(tiny):
    _, params = tiny
    with pytest.raises(ValueError, match=r"feedforward_modules='.\*mlp\\\\..\*' matches no module"):
        ia3.inject(params, ia3.IA3Config(target_modules=".*self_attn.*_proj", feedforward_modules=r".*mlp\..*"))
    on = ia3.inject(params, ia3.IA3Config(target_modules=".*(v|down)_proj", feedforward_modules=["down_proj"]))
    assert set(tg.get_module(on, "model.layers.0.mlp.down_proj")) == {"kernel", "ia3_in"}


def test_a_name_only_in_modules_to_save_says_so(tiny):
    """HF PEFT never adapts a module that modules_to_save trains whole; naming one only there is the error that explains it."""
    _, params = tiny
    cfg = lora.LoraConfig(target_modules=["q_proj", "lm_head"], modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match="'lm_head' names only modules in modules_to_save, which train whole and take no adapter"):
        lora.target_names(params, cfg)
    assert lora.target_names(params, lora.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
