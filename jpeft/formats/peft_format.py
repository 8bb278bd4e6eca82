"""Adapters on disk in Hugging Face PEFT's format: `adapter_config.json` + `adapter_model.safetensors`.

A directory written here loads with `peft.PeftModel.from_pretrained`, and one written by PEFT's
`save_pretrained` loads here, for LoRA (rank/alpha patterns, rsLoRA), (IA)^3, prompt tuning, P-tuning (whose
files hold the encoder's output, not its weights, so they load as a folded prompt, as PEFT's inference mode does),
LoHa, LoKr and prefix tuning (whose files also hold the computed prefix).
Tensor names are PEFT's (`base_model.model.<module>.lora_A.weight`, PyTorch layout: lora_A (r, in),
lora_B (out, r); `ia3_l` (out, 1), or (1, in) on feed-forward modules; `prompt_embeddings`; LoHa's `hada_w1_a`
(out, r), `hada_w1_b` (r, in), ...; LoKr's `lokr_w1`, `lokr_w2_a`, ..., each jpeft's leaf transposed), and the
module names are the tree's paths with dots, so any model whose tree mirrors transformers' names works. LoHa's and
LoKr's rank_dropout / module_dropout act in PEFT's training only; a file naming them loads for what it computes
in eval mode.
LoRA on layers PEFT's layout cannot hold (Flax Conv, Embed, Einsum and DenseGeneral weights, layers stacked
by scan) is stored by tree path instead, with `"jpeft_layout": "tree"` and the module paths in the config.

The safetensors metadata also records the base the adapter was trained on (its name and a
fingerprint of its parameter names and shapes); PEFT ignores it, `load_adapter` checks it first.

DoRA (`use_dora: true`) adds each module's magnitude as PEFT's `get_peft_model_state_dict` writes it:
`base_model.model.<module>.lora_magnitude_vector`, shape (out,), no `.weight` suffix.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jpeft import quant, tree
from jpeft.formats import hf_io
from jpeft.methods import ia3, loha, lokr, lora, prefix, prompt, ptuning, soft_prompt
from jpeft.training import split
from jpeft import targets as tg
from jpeft.formats.hf_io import CheckpointError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
FINGERPRINT_KEY = "jpeft_base_fingerprint"
BASE_NAME_KEY = "jpeft_base_model"
PEFT_TYPES = ("LORA", "IA3", "PROMPT_TUNING", "P_TUNING", "LOHA", "LOKR", "PREFIX_TUNING")
MAGNITUDE_SUFFIX = "lora_magnitude_vector"  # DoRA's magnitude in PEFT's state dict (no ".weight")
TREE_LAYOUT = "tree"  # adapter_config.json's `jpeft_layout` for LoRA leaves stored by tree path (Flax models)

# LoRA options that change the computation in ways jpeft does not implement: (key, PEFT's default).
# (`layers_to_transform` / `layers_pattern` only choose which modules get tensors; the file's names say that already.)
_UNSUPPORTED_LORA = (
    ("bias", "none"), ("lora_bias", False), ("fan_in_fan_out", False),
    ("layer_replication", None), ("target_parameters", None), ("trainable_token_indices", None),
    ("modules_to_save", None), ("use_qalora", False), ("alora_invocation_tokens", None), ("use_bdlora", None),
    ("arrow_config", None), ("monteclora_config", None), ("kasa_config", None),
)
BASE_LAYER_SUFFIX = "base_layer.weight"  # a frozen weight PEFT saves beside an adapted lm_head / embedding


def base_fingerprint(params: Mapping[str, Any]) -> str:
    """sha256 of the base model's parameter names and shapes (PEFT leaves ignored, dtype ignored).

    A quantized weight counts as the float kernel it stands for, so an adapter trained on a quantized base
    loads onto the float one and vice versa.
    """
    shapes = sorted((p, list(s)) for p, s in quant.float_shapes(params).items() if not split.is_adapter_path(p))
    return hashlib.sha256(json.dumps(shapes).encode()).hexdigest()


def task_type(params: Mapping[str, Any]) -> str:
    """PEFT's task type for a tree: encoder-decoder trees are SEQ_2_SEQ_LM, the rest CAUSAL_LM."""
    return "SEQ_2_SEQ_LM" if "encoder" in params and "decoder" in params else "CAUSAL_LM"


# ----------------------------------------------------------------------------------------------
# Saving


def save_adapter(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    config: lora.LoraConfig | ia3.IA3Config | prompt.PromptTuningConfig | ptuning.PromptEncoderConfig | loha.LoHaConfig | lokr.LoKrConfig | None = None,
    base_model_name_or_path: str | None = None,
    *,
    task: str | None = None,
) -> None:
    """Write the adapter in `params` (a full tree: base + one PEFT method) as a PEFT adapter directory, atomically.

    Without `config`, the config is rebuilt from the leaves (ranks from shapes, alpha from the scale); LoKr needs it.
    A folded soft prompt is written as prompt tuning, or as P-tuning when `config` is a PromptEncoderConfig.
    """
    flat = tree.flatten(params)
    params = tree.unflatten(flat)  # string keys throughout (an NNX state's list indices are ints)
    if not any(not split.is_adapter_path(p) for p in flat):
        raise ValueError("save_adapter needs the full tree (base + adapter), e.g. jpeft.attach(base, adapter), to fingerprint the base")
    method = _method(flat)
    if method == "PROMPT_TUNING" and isinstance(config, ptuning.PromptEncoderConfig):
        method = "P_TUNING"
    task = task or task_type(params)
    if method == "LORA" and not _peft_layout(flat):
        cfg_json, tensors = _tree_lora_out(flat, config)
    elif method == "LORA":
        cfg_json, tensors = _lora_out(params, flat, config)
    elif method == "IA3":
        cfg_json, tensors = _ia3_out(params, flat, config)
    elif method == "PREFIX_TUNING":
        cfg_json, tensors = _prefix_out(params, config)
    elif method in _LYCORIS:
        cfg_json, tensors = _lycoris_out(method, params, flat, config)
    elif method == "P_TUNING":
        cfg_json, tensors = _ptuning_out(params, config)
    else:
        cfg_json, tensors = _prompt_out(flat, config, task)
    cfg_json.update(peft_type=method, task_type=task, base_model_name_or_path=base_model_name_or_path,
                    inference_mode=True, revision=None, auto_mapping=None)
    metadata = {"format": "pt", FINGERPRINT_KEY: base_fingerprint(params), BASE_NAME_KEY: base_model_name_or_path or ""}
    with hf_io.atomic_dir(path) as tmp:
        hf_io.write_safetensors(tmp / WEIGHTS_FILE, tensors, metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")


def _method(flat: Mapping[str, Any]) -> str:
    encoder = {"P_TUNING"} if any(p.startswith(f"{ptuning.ENCODER}/") for p in flat) else set()
    encoder |= {"PREFIX_TUNING"} if prefix.LEAF in flat else set()
    own_leaves = (f"{ptuning.ENCODER}/", f"{prefix.LEAF}", f"{prefix.MLP}/")  # whole-tree methods, found above
    leaves = {p.rsplit("/", 1)[-1] for p in flat if split.is_adapter_path(p) and not p.startswith(own_leaves)}
    found = sorted(encoder | {"LORA" if leaf.startswith("lora_") else "IA3" if leaf.startswith("ia3_")
                              else "PROMPT_TUNING" if leaf == prompt.LEAF else _LYCORIS_PREFIX.get(leaf[:5], "bottleneck adapter")
                              for leaf in leaves})
    if not found:
        raise ValueError("save_adapter: the tree holds no adapter (no lora_a, ia3_*, prompt_embeddings or prefix_embeddings leaves)")
    if len(found) > 1 or found[0] not in PEFT_TYPES:
        raise ValueError(f"save_adapter: the tree holds {found}; a PEFT adapter file holds exactly one of LoRA, IA3, prompt tuning, "
                         "P-tuning, prefix tuning, LoHa or LoKr")
    return found[0]


def _modules_with(flat: Mapping[str, Any], leaf: str) -> list[str]:
    return sorted(p[: -len(leaf) - 1].replace("/", ".") for p in flat if p.endswith(f"/{leaf}"))


def _short_targets(candidates: list[str], chosen: list[str]) -> list[str]:
    """PEFT target_modules that select exactly `chosen`: last name parts when they suffice, else full names."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in chosen})
    return suffixes if sorted(n for n in candidates if tg.matches(suffixes, n)) == sorted(chosen) else sorted(chosen)


def _alpha(scale: Any, r: int) -> float | int:
    """PEFT's alpha for a module's float32 scale alpha / r: short where that gives the scale back exactly (2.6666667461
    * 3 -> 8), else the exact product (an rsLoRA scale alpha / sqrt(r) has no short alpha / r); an int when whole."""
    scale = np.float32(scale)
    exact = float(scale) * r
    short = float(f"{exact:.7g}")
    alpha = short if np.float32(short / r) == scale else exact
    return int(alpha) if alpha.is_integer() else alpha


def _most_common(values: Mapping[str, Any]) -> Any:
    return collections.Counter(values.values()).most_common(1)[0][0]


def _lora_out(params, flat, config):
    modules = _modules_with(flat, "lora_a")
    if any(np.ndim(flat[f"{m.replace('.', '/')}/lora_a"]) != 2 for m in modules):
        raise ValueError("save_adapter: stacked (multi-adapter) LoRA leaves cannot be saved as one PEFT adapter; save each adapter")
    ranks = {m: int(flat[f"{m.replace('.', '/')}/lora_a"].shape[1]) for m in modules}
    scales = {m: float(flat[f"{m.replace('.', '/')}/lora_scale"]) for m in modules}
    dora = _modules_with(flat, lora.MAGNITUDE)
    if dora and dora != modules:
        raise ValueError(f"save_adapter: DoRA magnitudes sit on {len(dora)} of the {len(modules)} LoRA modules (none at "
                         f"{sorted(set(modules) - set(dora))[:3]}); a PEFT adapter is DoRA on every module or on none")
    if config is None:
        alphas = {m: _alpha(scales[m], ranks[m]) for m in modules}
        r, alpha = _most_common(ranks), _most_common(alphas)
        config = lora.LoraConfig(
            r=r, alpha=alpha, target_modules=_short_targets(tg.dense_modules(params), modules),
            rank_pattern={m: v for m, v in ranks.items() if v != r}, alpha_pattern={m: v for m, v in alphas.items() if v != alpha},
            use_dora=bool(dora),
        )
    elif not isinstance(config, lora.LoraConfig):
        raise ValueError(f"save_adapter: the tree holds LoRA weights but config is a {type(config).__name__}")
    _check_lora_config(params, config, modules, ranks, scales)
    if config.use_dora != bool(dora):
        raise ValueError(f"save_adapter: config.use_dora={config.use_dora}, but the tree {'has' if dora else 'has no'} DoRA magnitudes (lora_magnitude)")
    tensors = {}
    for m in modules:
        module = tg.get_module(params, m)
        tensors[f"{PREFIX}{m}.lora_A.weight"] = np.asarray(module["lora_a"]).T
        tensors[f"{PREFIX}{m}.lora_B.weight"] = np.asarray(module["lora_b"]).T
        if config.use_dora:
            tensors[f"{PREFIX}{m}.{MAGNITUDE_SUFFIX}"] = np.asarray(module[lora.MAGNITUDE])
    target = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    cfg_json = dict(
        r=config.r, lora_alpha=config.alpha, target_modules=target, rank_pattern=dict(config.rank_pattern),
        alpha_pattern=dict(config.alpha_pattern), use_rslora=config.use_rslora, lora_dropout=config.dropout,
        bias="none", fan_in_fan_out=False, init_lora_weights=True, modules_to_save=None, use_dora=config.use_dora,
    )
    return cfg_json, tensors


def _peft_layout(flat: Mapping[str, Any]) -> bool:
    """Whether every LoRA module is a Linear as PEFT stores it: a 2-D kernel (in, out), A (in, r), B (r, out), one scale.

    A 2-D kernel stored (out, in), as an einsum "bsd,kd->bsk" keeps it, takes the tree layout: loading reads a
    PEFT-layout kernel as (in, out)."""
    weights = quant.float_shapes(tree.unflatten(flat))

    def linear(p: str) -> bool:
        kernel, a, b = weights.get(f"{p}/kernel", ()), np.shape(flat[f"{p}/lora_a"]), np.shape(flat[f"{p}/lora_b"])
        return len(kernel) == 2 and len(a) == 2 and np.ndim(flat[f"{p}/lora_scale"]) == 0 and (a[0], b[-1]) == kernel

    return all(linear(path[: -len("/lora_a")]) for path in flat if path.endswith("/lora_a"))


def _spanned_weight(flat: Mapping[str, Any], prefix: str, a, b, s) -> Any | None:
    """The module's weight that A (*lead, *in, r) and B (*lead, r, *out) span, its axes in some order, or None.

    Stacked scan layers have the scale's leading axes on the weight too; stacked adapters (`multi.stack_lora`)
    do not, so they span nothing."""
    lead = np.shape(s)
    size = math.prod(np.shape(a)[len(lead):-1]) * math.prod(np.shape(b)[len(lead) + 1:]) * math.prod(lead)
    return next((v for p, v in flat.items() if p.rsplit("/", 1)[0] == prefix and np.ndim(v) >= 2 and not split.is_adapter_path(p)
                 and np.shape(v)[: len(lead)] == lead and np.size(v) == size), None)


def _tree_lora_out(flat, config):
    """Adapters PEFT's layout cannot hold (Flax layers: Conv, Embed, Einsum and DenseGeneral weights, layers stacked by
    scan): the LoRA leaves by tree path, each module's scale included, and the module paths in the config."""
    paths = sorted(p[: -len("/lora_a")] for p in flat if p.endswith("/lora_a"))
    if any(p.endswith(f"/{lora.MAGNITUDE}") for p in flat):
        raise ValueError("save_adapter: DoRA (lora_magnitude) is only saved in PEFT's layout, on 2-D dense kernels")
    if any(_spanned_weight(flat, p, *(flat[f"{p}/{leaf}"] for leaf in lora.LEAVES)) is None for p in paths):
        raise ValueError("save_adapter: stacked (multi-adapter) LoRA leaves cannot be saved as one adapter; save each adapter")
    tensors = {f"{p}/{leaf}": np.asarray(flat[f"{p}/{leaf}"]) for p in paths for leaf in lora.LEAVES}
    ranks = {p: int(np.shape(flat[f"{p}/lora_a"])[-1]) for p in paths}
    cfg_json = dict(jpeft_layout=TREE_LAYOUT, modules=[p.replace("/", ".") for p in paths], r=_most_common(ranks),
                    lora_alpha=None if config is None else config.alpha, use_rslora=bool(config and config.use_rslora),
                    target_modules=None if config is None else (config.target_modules if isinstance(config.target_modules, str)
                                                                else list(config.target_modules)))
    return cfg_json, tensors


def _tree_lora_in(params, who, cfg, tensors) -> dict[str, Any]:
    modules = cfg.get("modules")
    if not isinstance(modules, list) or not modules:
        raise CheckpointError(f"{who}/{CONFIG_FILE} names no modules (its jpeft_layout {TREE_LAYOUT!r} needs a 'modules' list)")
    expected = {f"{m.replace('.', '/')}/{leaf}" for m in modules for leaf in lora.LEAVES}
    if set(tensors) != expected:
        raise CheckpointError(f"{who}: tensors {sorted(set(tensors) - expected)[:5]} unexpected, {sorted(expected - set(tensors))[:5]} missing")
    flat = tree.flatten(params)
    for m in modules:
        prefix = m.replace(".", "/")
        if f"{prefix}/lora_a" in flat:
            raise CheckpointError(f"{who}: the given base already has LoRA weights at {m}; split its adapter off first")
        a, b, s = (tensors[f"{prefix}/{leaf}"] for leaf in lora.LEAVES)
        weight = _spanned_weight(flat, prefix, a, b, s)
        if weight is None:
            raise CheckpointError(f"{who} adapts {m} with A {tuple(a.shape)} and B {tuple(b.shape)}, which fit no weight of "
                                  "that module in the given base (missing, or of another size)")
        for leaf, v in (("lora_a", a), ("lora_b", b)):
            tensors[f"{prefix}/{leaf}"] = jnp.asarray(v, weight.dtype)
        tensors[f"{prefix}/lora_scale"] = jnp.asarray(s, jnp.float32)
    return dict(tensors)


def _check_lora_config(params, config, modules, ranks, scales):
    if config.modules_to_save:
        raise ValueError("save_adapter: modules_to_save is not supported in adapter files; merge and save the model instead")
    expected = lora.target_names(params, config)
    if sorted(expected) != modules:
        extra, missing = sorted(set(modules) - set(expected)), sorted(set(expected) - set(modules))
        raise ValueError(f"save_adapter: the LoRA modules disagree with the config's target_modules: adapted but not targeted {extra[:3]}, targeted but not adapted {missing[:3]}")
    for m in modules:
        r, scale = config.rank_and_scale(m)
        if r != ranks[m] or not np.isclose(scale, scales[m], rtol=1e-6, atol=0):
            raise ValueError(f"save_adapter: {m} has rank {ranks[m]} and scale {scales[m]:.6g}, but the config says rank {r} and scale {scale:.6g}")


def _ia3_out(params, flat, config):
    modules = sorted(set(_modules_with(flat, "ia3_in")) | set(_modules_with(flat, "ia3_out")))
    ff = _modules_with(flat, "ia3_in")
    if config is None:
        targets = _short_targets(tg.dense_modules(params), modules)
        ff_targets = _short_targets(modules, ff)
        # PEFT requires feedforward_modules to be a subset of target_modules, name for name: short names where they
        # are, else every module by its full name in both lists.
        short = set(ff_targets) <= set(targets)
        config = ia3.IA3Config(target_modules=targets if short else modules, feedforward_modules=ff_targets if short else ff)
    elif not isinstance(config, ia3.IA3Config):
        raise ValueError(f"save_adapter: the tree holds IA3 vectors but config is a {type(config).__name__}")
    if config.modules_to_save:
        raise ValueError("save_adapter: modules_to_save is not supported in adapter files; merge and save the model instead")
    if sorted(ia3.target_names(params, config)) != modules or sorted(
        m for m in modules if tg.matches(config.feedforward_modules, m)) != ff:
        raise ValueError("save_adapter: the IA3 vectors disagree with the config's target_modules / feedforward_modules")
    _check_ia3_linear(params, modules)
    tensors = {}
    for m in modules:
        module = tg.get_module(params, m)
        vec = np.asarray(module["ia3_in"])[None, :] if "ia3_in" in module else np.asarray(module["ia3_out"])[:, None]
        tensors[f"{PREFIX}{m}.ia3_l"] = vec
    as_json = lambda t: t if isinstance(t, str) else list(t)  # noqa: E731
    cfg_json = dict(target_modules=as_json(config.target_modules), feedforward_modules=as_json(config.feedforward_modules),
                    fan_in_fan_out=False, init_ia3_weights=True, modules_to_save=None)
    return cfg_json, tensors


def _check_ia3_linear(params, modules) -> None:
    """PEFT's (IA)^3 file holds one vector per 2-D (in, out) kernel; refuse, by module, vectors it cannot hold (layers
    stacked by scan / vmap, multi-axis features, kernels stored (out, in)) rather than write a file that cannot load."""
    weights = quant.float_shapes(params)
    for m in modules:
        module, kernel = tg.get_module(params, m), weights.get(f"{m.replace('.', '/')}/kernel", ())
        leaf = "ia3_in" if "ia3_in" in module else "ia3_out"
        shape = tuple(np.shape(module[leaf]))
        if len(kernel) != 2 or shape != (kernel[0] if leaf == "ia3_in" else kernel[1],):
            raise ValueError(f"save_adapter: {m} has {leaf} {shape} beside a kernel {kernel}; PEFT's (IA)^3 format holds one "
                             "vector per 2-D (in, out) kernel, so this adapter (layers stacked by scan / vmap, multi-axis "
                             "features, or a kernel stored (out, in)) cannot be saved as a file; merge it into the model instead")


def _prompt_out(flat, config, task):
    table = np.asarray(flat[prompt.LEAF])
    n, d = table.shape
    if config is not None and (not isinstance(config, prompt.PromptTuningConfig) or config.num_virtual_tokens != n):
        raise ValueError(f"save_adapter: prompt_embeddings has {n} rows, which disagrees with config {config}")
    submodules = 2 if task == "SEQ_2_SEQ_LM" else 1
    # PEFT keeps one block of N rows per transformer submodule but feeds only the first to a seq2seq
    # model under prompt tuning; the decoder block is never read, so it is written as zeros.
    rows = np.concatenate([table] + [np.zeros_like(table)] * (submodules - 1))
    # The weights are the result of any init; "RANDOM" keeps PEFT from fetching a tokenizer on load.
    cfg_json = dict(num_virtual_tokens=n, token_dim=d, num_transformer_submodules=submodules, num_layers=None,
                    num_attention_heads=None, prompt_tuning_init="RANDOM", prompt_tuning_init_text=None,
                    tokenizer_name_or_path=None, tokenizer_kwargs=None, modules_to_save=None)
    return cfg_json, {prompt.LEAF: rows}


def _prefix_dims(params: Mapping[str, Any]) -> tuple[int, int, int | None]:
    """(layers, token_dim, heads or None) of the attentions a prefix feeds, read off a jpeft T5/Llama/Gemma tree."""
    shapes = quant.float_shapes(params)
    try:
        if task_type(params) == "SEQ_2_SEQ_LM":
            attn = "decoder/block/0/layer/0/SelfAttention"
            return len(params["decoder"]["block"]), shapes[f"{attn}/k/kernel"][1], shapes[f"{attn}/relative_attention_bias/embedding"][1]
        # Decoder-only: PEFT derives its heads from the model config (key/value heads), so none is recorded.
        return len(params["model"]["layers"]), shapes["model/layers/0/self_attn/k_proj/kernel"][1], None
    except KeyError as e:
        raise ValueError(f"prefix-tuning files are read and written for jpeft's T5, Llama and Gemma trees; this one lacks {e}") from None


def _prefix_out(params, config):
    layers, token_dim, heads = _prefix_dims(params)
    rows = np.asarray(prefix.flat(params)).astype(params[prefix.LEAF].dtype)  # PEFT saves the projected prefix
    n, projected = rows.shape[0], prefix.MLP in params
    if rows.shape[1] != layers * 2 * token_dim:
        raise ValueError(f"save_adapter: the prefix has {rows.shape[1]} columns, but this base needs {layers} layers x 2 x {token_dim}")
    if config is not None and (not isinstance(config, prefix.PrefixTuningConfig) or config.num_virtual_tokens != n
                               or config.prefix_projection != projected):
        raise ValueError(f"save_adapter: a prefix of {n} tokens{' with' if projected else ' without'} projection disagrees with config {config}")
    cfg_json = dict(num_virtual_tokens=n, token_dim=token_dim, num_transformer_submodules=2 if heads is not None else 1,
                    num_layers=layers, num_attention_heads=heads, prefix_projection=projected, init_weights=None,
                    encoder_hidden_size=params[prefix.MLP]["0"]["kernel"].shape[1] if projected else token_dim, modules_to_save=None)
    return cfg_json, {prompt.LEAF: rows}


_LYCORIS = {"LOHA": (loha, loha.LoHaConfig), "LOKR": (lokr, lokr.LoKrConfig)}
_LYCORIS_PREFIX = {"loha_": "LOHA", "lokr_": "LOKR"}
_UNSUPPORTED_LYCORIS = (("modules_to_save", None),)


def _lycoris_shapes(kind: str, d_in: int, d_out: int, r: int, config: Any) -> dict[str, tuple[int, int]]:
    """jpeft's trainable leaves of one module and their (in-first) shapes."""
    return loha.shapes(d_in, d_out, r) if kind == "LOHA" else lokr.shapes(d_in, d_out, r, config)


def _peft_name(leaf: str) -> str:
    """PEFT's tensor name for a LoHa / LoKr leaf (LoHa's are `hada_*`)."""
    return leaf.replace("loha_", "hada_")


def _lycoris_out(kind, params, flat, config):
    module_of, config_cls = _LYCORIS[kind]
    scale_leaf = f"{kind.lower()}_scale"
    modules = _modules_with(flat, scale_leaf)
    scales = {m: float(flat[f"{m.replace('.', '/')}/{scale_leaf}"]) for m in modules}
    if config is None and kind == "LOKR":
        raise ValueError("save_adapter: a LoKr adapter needs its LoKrConfig (config=...): whole Kronecker factors do not "
                         "record the rank that PEFT's scale alpha / r uses")
    if config is None:
        ranks = {m: int(np.shape(flat[f"{m.replace('.', '/')}/loha_w1_b"])[1]) for m in modules}
        alphas = {m: _alpha(scales[m], ranks[m]) for m in modules}
        r, alpha = _most_common(ranks), _most_common(alphas)
        config = loha.LoHaConfig(r=r, alpha=alpha, target_modules=_short_targets(tg.dense_modules(params), modules),
                                 rank_pattern={m: v for m, v in ranks.items() if v != r},
                                 alpha_pattern={m: v for m, v in alphas.items() if v != alpha})
    elif not isinstance(config, config_cls):
        raise ValueError(f"save_adapter: the tree holds {kind} weights but config is a {type(config).__name__}")
    expected = sorted(module_of.target_names(params, config))
    if expected != modules:
        extra, missing = sorted(set(modules) - set(expected)), sorted(set(expected) - set(modules))
        raise ValueError(f"save_adapter: the {kind} modules disagree with the config's target_modules: adapted but not targeted "
                         f"{extra[:3]}, targeted but not adapted {missing[:3]}")
    tensors = {}
    for m in modules:
        module = tg.get_module(params, m)
        r, scale = config.rank_and_scale(m)
        want = _lycoris_shapes(kind, *quant.weight_shape(module), r, config)
        have = {leaf: tuple(np.shape(module[leaf])) for leaf in module_of.TRAINABLE if leaf in module}
        if have != want or not np.isclose(scale, scales[m], rtol=1e-6, atol=0):
            raise ValueError(f"save_adapter: {m} has leaves {have} and scale {scales[m]:.6g}, but the config (rank {r}) gives "
                             f"{want} and scale {scale:.6g}")
        tensors.update({f"{PREFIX}{m}.{_peft_name(leaf)}": np.asarray(module[leaf]).T for leaf in want})
    cfg_json = dict(r=config.r, alpha=config.alpha, rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern),
                    target_modules=config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules),
                    rank_dropout=0.0, module_dropout=0.0, init_weights=config.init_weights, use_effective_conv2d=config.use_effective_conv2d,
                    exclude_modules=None, layers_to_transform=None, layers_pattern=None, modules_to_save=None)
    if kind == "LOKR":
        cfg_json.update(decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
                        rank_dropout_scale=config.rank_dropout_scale)
    return cfg_json, tensors


def _encoder_key(config, token_dim):
    """What of a PromptEncoderConfig the encoder's leaves determine (an MLP ignores the LSTM's layers and dropout)."""
    lstm = config.encoder_reparameterization_type == "LSTM"
    return (config.num_virtual_tokens, config.encoder_reparameterization_type, config.encoder_hidden_size or token_dim,
            config.encoder_num_layers if lstm else None, config.encoder_dropout if lstm else None)


def _ptuning_out(params, config):
    """P_TUNING as PEFT's save_pretrained writes it: the encoder's output, every submodule's block, and the encoder's config."""
    n, submodules, d = soft_prompt.num_tokens(params), prompt.transformer_submodules(params), prompt.embedding_table(params).shape[1]
    if ptuning.ENCODER in params:
        rows = np.asarray(ptuning.prompt_embeddings(params[ptuning.ENCODER]))
        built = ptuning.encoder_config(params[ptuning.ENCODER], n)
    else:  # folded: only the fed block is left; the others are never read, so they are written as zeros
        table = np.asarray(params[prompt.LEAF], np.float32)
        rows, built = np.concatenate([table] + [np.zeros_like(table)] * (submodules - 1)), None
    config = config or built
    fits = isinstance(config, ptuning.PromptEncoderConfig) and config.num_virtual_tokens == n
    if not fits or (built is not None and _encoder_key(built, d) != _encoder_key(config, d)):
        raise ValueError(f"save_adapter: the tree's prompt encoder ({built or f'{n} folded rows'}) disagrees with config {config}")
    cfg_json = dict(num_virtual_tokens=n, token_dim=d, num_transformer_submodules=submodules, num_layers=None, num_attention_heads=None,
                    encoder_reparameterization_type=config.encoder_reparameterization_type, encoder_hidden_size=config.encoder_hidden_size or d,
                    encoder_num_layers=config.encoder_num_layers, encoder_dropout=config.encoder_dropout, modules_to_save=None)
    return cfg_json, {prompt.LEAF: rows}


# ----------------------------------------------------------------------------------------------
# Loading


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, Any], dict[str, str]]:
    """(adapter_config, tensors by PEFT name, safetensors metadata) of an adapter directory; CheckpointError if unreadable."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing: an adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") not in PEFT_TYPES:
        got = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise CheckpointError(f"{cfg_file}: peft_type {got!r} is not one jpeft reads (it reads {list(PEFT_TYPES)})")
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise CheckpointError(f"{path} holds only adapter_model.bin, a pickle; re-save it with PEFT's safe_serialization=True")
        raise CheckpointError(f"{weights} is missing")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="flax") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return cfg, tensors, metadata


def load_adapter(path: str | os.PathLike, params: Mapping[str, Any]) -> dict:
    """`params` (a base without adapter) with the PEFT adapter at `path` attached; every check runs before anything is built.

    The directory comes first, as in `save_adapter(path, params)`.
    """
    if isinstance(path, Mapping):
        raise TypeError("load_adapter(path, params): the adapter directory comes first, then the base parameters")
    params = tree.unflatten(tree.flatten(params))  # string keys throughout (an NNX state's list indices are ints)
    cfg, tensors, metadata = read_adapter(path)
    _check_base(params, path, cfg, metadata)
    who = f"{path} (adapter for {_base_name(cfg, metadata)!r})"
    tensors = _without_saved_base_layers(params, who, tensors)
    kind = cfg["peft_type"]
    if kind == "LORA" and cfg.get("jpeft_layout") == TREE_LAYOUT:  # shapes checked against the weights there
        return tree.unflatten({**tree.flatten(params), **_tree_lora_in(params, who, cfg, tensors)})
    if kind == "LORA":
        leaves = _lora_in(params, who, cfg, tensors)
    elif kind == "IA3":
        leaves = _ia3_in(params, who, cfg, tensors)
    elif kind == "PREFIX_TUNING":
        leaves = _prefix_in(params, who, cfg, tensors)
    elif kind in _LYCORIS:
        leaves = _lycoris_in(kind, params, who, cfg, tensors)
    else:
        leaves = _prompt_in(params, who, cfg, tensors)
    try:
        return split.attach(params, tree.unflatten(leaves))
    except ValueError as e:
        raise CheckpointError(f"{who} does not fit this base: {e}") from None


def _base_name(cfg: Mapping[str, Any], metadata: Mapping[str, str]) -> str:
    return metadata.get(BASE_NAME_KEY) or cfg.get("base_model_name_or_path") or "an unnamed base"


def _check_base(params, path, cfg, metadata) -> None:
    recorded = metadata.get(FINGERPRINT_KEY)
    if recorded is None:  # written by PEFT: the per-tensor shape checks below stand in for the fingerprint
        return
    ours = base_fingerprint(params)
    if recorded != ours:
        n = sum(1 for p in tree.flatten(params) if not split.is_adapter_path(p))
        raise CheckpointError(
            f"{path} was trained on base {_base_name(cfg, metadata)!r} (fingerprint {recorded[:12]}), but the given base "
            f"has fingerprint {ours[:12]} ({n} tensors): its parameter names or shapes differ, so the adapter does not fit it"
        )


def _without_saved_base_layers(params, who, tensors: dict[str, Any]) -> dict[str, Any]:
    """`tensors` less the frozen weights PEFT saves beside an adapted lm_head or embedding (`save_embedding_layers`),
    each checked equal to the given base's, since jpeft attaches adapters and never replaces base weights."""
    kept = {}
    for name, value in tensors.items():
        if not (name.startswith(PREFIX) and name.endswith(f".{BASE_LAYER_SUFFIX}")):
            kept[name] = value
            continue
        module = name[len(PREFIX): -len(BASE_LAYER_SUFFIX) - 1]
        ours = _base_weight(params, module)
        if ours is None:
            raise CheckpointError(f"{who}: holds a base weight for {module}, which the given base does not have")
        theirs = np.asarray(value, np.float32)
        tol = float(np.finfo(np.asarray(value).dtype).eps)
        if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=tol, atol=tol):
            raise CheckpointError(
                f"{who}: its copy of {module}'s frozen weight ({name}, shape {tuple(theirs.shape)}) differs from the given "
                f"base's (shape {tuple(ours.shape)}): the adapter was trained on a resized or changed {module}. Load that "
                "base, or merge the adapter in PEFT and load the merged model")
    return kept


def _base_weight(params, module: str) -> np.ndarray | None:
    """A module's float weight as PyTorch lays it out ((out, in), or an embedding's (vocab, d)); the input embedding
    for a tied `lm_head`; None if the base has no such weight."""
    found = _module_or_none(params, module)
    if module.split(".")[-1] == "lm_head" and found is None:
        return np.asarray(prompt.embedding_table(params), np.float32)
    if not isinstance(found, Mapping):
        return None
    if "embedding" in found:
        return np.asarray(found["embedding"], np.float32)
    return np.asarray(quant.weight(found), np.float32).T if quant.has_weight(found) else None


def _split_names(who, tensors, suffixes: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """{dotted module: {suffix: tensor}} for PEFT names `base_model.model.<module>.<suffix>`; unknown names fail."""
    out: dict[str, dict[str, Any]] = {}
    unknown = []
    for name, value in tensors.items():
        suffix = next((s for s in suffixes if name.startswith(PREFIX) and name.endswith(f".{s}")), None)
        if suffix is None:
            unknown.append(name)
            continue
        out.setdefault(name[len(PREFIX): -len(suffix) - 1], {})[suffix] = value
    if unknown:
        raise CheckpointError(f"{who}: tensors jpeft does not know how to read: {sorted(unknown)[:5]}")
    if not out:
        raise CheckpointError(f"{who} holds no adapter tensors")
    return out


def _module_or_none(params, module: str) -> Any:
    """The base's module at a dotted name, or None where it has none."""
    try:
        return tg.get_module(params, module)
    except (KeyError, TypeError):
        return None


def _weight(params, who, module: str) -> tuple[tuple[int, int], Any]:
    """The logical (in, out) shape and float dtype of a module's weight, float or quantized."""
    found = _module_or_none(params, module)
    if not isinstance(found, Mapping) or not quant.has_weight(found):
        raise CheckpointError(f"{who} adapts {module}, which the given base does not have")
    return quant.weight_shape(found), quant.weight_dtype(found)


def _lora_in(params, who, cfg, tensors) -> dict[str, Any]:
    for key, default in _UNSUPPORTED_LORA:
        if cfg.get(key, default) not in (default, [], {}):
            raise CheckpointError(f"{who}: LoRA option {key}={cfg[key]!r} is not supported by jpeft")
    try:
        config = lora.LoraConfig(r=cfg["r"], alpha=cfg["lora_alpha"], target_modules=cfg.get("target_modules") or (),
                                 use_rslora=bool(cfg.get("use_rslora", False)), rank_pattern=cfg.get("rank_pattern") or {},
                                 alpha_pattern=cfg.get("alpha_pattern") or {}, dropout=cfg.get("lora_dropout", 0.0) or 0.0,
                                 use_dora=bool(cfg.get("use_dora", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{who}/{CONFIG_FILE} is not a valid LoRA config: {e!r}") from None
    needed = {"lora_A.weight", "lora_B.weight"} | ({MAGNITUDE_SUFFIX} if config.use_dora else set())
    leaves = {}
    for module, pair in _split_names(who, tensors, ("lora_A.weight", "lora_B.weight", MAGNITUDE_SUFFIX)).items():
        if set(pair) != needed:
            raise CheckpointError(f"{who}: {module} has {sorted(pair)}, but {'DoRA' if config.use_dora else 'LoRA'} "
                                  f"(use_dora={config.use_dora} in {CONFIG_FILE}) needs {sorted(needed)}")
        a, b = pair["lora_A.weight"], pair["lora_B.weight"]
        (d_in, d_out), dtype = _weight(params, who, module)
        r, scale = config.rank_and_scale(module)
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise CheckpointError(
                f"{who}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, but its config rank {r} and the "
                f"base kernel (in={d_in}, out={d_out}) need ({r}, {d_in}) and ({d_out}, {r})"
            )
        prefix = module.replace(".", "/")
        leaves[f"{prefix}/lora_a"] = a.T.astype(dtype)
        leaves[f"{prefix}/lora_b"] = b.T.astype(dtype)
        leaves[f"{prefix}/lora_scale"] = jnp.asarray(scale, jnp.float32)
        if config.use_dora:
            magnitude = pair[MAGNITUDE_SUFFIX]
            if magnitude.shape != (d_out,):
                raise CheckpointError(f"{who}: {module}.{MAGNITUDE_SUFFIX} has shape {tuple(magnitude.shape)}, but the base kernel "
                                      f"(in={d_in}, out={d_out}) needs ({d_out},)")
            leaves[f"{prefix}/{lora.MAGNITUDE}"] = magnitude.astype(dtype)
    return leaves


def _ia3_in(params, who, cfg, tensors) -> dict[str, Any]:
    ff = cfg.get("feedforward_modules") or []
    leaves = {}
    for module, vec in _split_names(who, tensors, ("ia3_l",)).items():
        vec = vec["ia3_l"]
        (d_in, d_out), dtype = _weight(params, who, module)
        is_ff = tg.matches(ff, module)
        want = (1, d_in) if is_ff else (d_out, 1)
        if tuple(vec.shape) != want:
            raise CheckpointError(f"{who}: {module}.ia3_l has shape {tuple(vec.shape)}, but a {'feed-forward' if is_ff else 'non-feed-forward'} "
                                  f"module with kernel (in={d_in}, out={d_out}) needs {want}")
        leaves[f"{module.replace('.', '/')}/{'ia3_in' if is_ff else 'ia3_out'}"] = vec.reshape(-1).astype(dtype)
    return leaves


def _prompt_in(params, who, cfg, tensors) -> dict[str, Any]:
    if set(tensors) != {prompt.LEAF}:
        raise CheckpointError(f"{who}: a prompt-tuning adapter holds only prompt_embeddings, found {sorted(tensors)[:5]}")
    rows = tensors[prompt.LEAF]
    n, d = cfg.get("num_virtual_tokens"), prompt.embedding_table(params).shape[1]
    submodules = cfg.get("num_transformer_submodules") or (2 if task_type(params) == "SEQ_2_SEQ_LM" else 1)
    if not isinstance(n, int) or rows.ndim != 2 or rows.shape != (n * submodules, d):
        raise CheckpointError(f"{who}: prompt_embeddings has shape {tuple(rows.shape)}, but num_virtual_tokens={n}, "
                              f"num_transformer_submodules={submodules} and the base's d_model={d} need ({n} * {submodules}, {d})")
    return {prompt.LEAF: rows[:n].astype(prompt.embedding_table(params).dtype)}


def _prefix_in(params, who, cfg, tensors) -> dict[str, Any]:
    if set(tensors) != {prompt.LEAF}:
        raise CheckpointError(f"{who}: a prefix-tuning adapter holds only prompt_embeddings, found {sorted(tensors)[:5]}")
    try:
        layers, token_dim, _ = _prefix_dims(params)
    except ValueError as e:
        raise CheckpointError(f"{who}: {e}") from None
    rows, n = tensors[prompt.LEAF], cfg.get("num_virtual_tokens")
    # The flat width alone can match a base of other layers and widths (4 x 16 = 2 x 32): the config says which it was.
    theirs = {key: cfg.get(key) for key in ("num_layers", "token_dim") if cfg.get(key) is not None}
    if theirs and theirs != {"num_layers": layers, "token_dim": token_dim}:
        raise CheckpointError(f"{who}: the prefix was trained for {theirs}, but the given base has {layers} layers of "
                              f"{token_dim}-wide keys and values")
    if not isinstance(n, int) or tuple(rows.shape) != (n, layers * 2 * token_dim):
        raise CheckpointError(f"{who}: prompt_embeddings has shape {tuple(rows.shape)}, but num_virtual_tokens={n} and the base's "
                              f"{layers} layers of {token_dim}-wide keys and values need ({n}, {layers} * 2 * {token_dim})")
    # The file holds the prefix itself (projected, when trained with prefix_projection), as PEFT loads it for inference.
    return {prefix.LEAF: rows.astype(prompt.embedding_table(params).dtype)}


def _lycoris_in(kind, params, who, cfg, tensors) -> dict[str, Any]:
    module_of, config_cls = _LYCORIS[kind]
    for key, default in _UNSUPPORTED_LYCORIS:
        if cfg.get(key, default) not in (default, [], {}):
            raise CheckpointError(f"{who}: {kind} option {key}={cfg[key]!r} is not supported by jpeft")
    fields = dict(target_modules=cfg.get("target_modules") or (), rank_pattern=cfg.get("rank_pattern") or {},
                  alpha_pattern=cfg.get("alpha_pattern") or {}, init_weights=cfg.get("init_weights", True))
    if kind == "LOKR":
        fields.update(decompose_both=bool(cfg.get("decompose_both", False)), decompose_factor=cfg.get("decompose_factor", -1))
    try:
        config = config_cls(r=cfg["r"], alpha=cfg["alpha"], **fields)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{who}/{CONFIG_FILE} is not a valid {kind} config: {e!r}") from None
    scale_leaf = f"{kind.lower()}_scale"
    leaves = {}
    for module, found in _split_names(who, tensors, tuple(_peft_name(leaf) for leaf in module_of.TRAINABLE)).items():
        (d_in, d_out), dtype = _weight(params, who, module)
        r, scale = config.rank_and_scale(module)
        want = _lycoris_shapes(kind, d_in, d_out, r, config)
        have, need = {name: tuple(v.shape) for name, v in found.items()}, {_peft_name(leaf): shape[::-1] for leaf, shape in want.items()}
        if have != need:
            raise CheckpointError(f"{who}: {module} has {have}, but its config (rank {r}) and the base weight (in={d_in}, "
                                  f"out={d_out}) need {need}")
        prefix = module.replace(".", "/")
        leaves.update({f"{prefix}/{leaf}": found[_peft_name(leaf)].T.astype(dtype) for leaf in want})
        leaves[f"{prefix}/{scale_leaf}"] = jnp.asarray(scale, jnp.float32)
    return leaves
