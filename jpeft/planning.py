"""Memory planning before any weight is read (`jpeft.plan`): the real train step compiled ahead of time on abstract shapes.

`plan(config, method, batch=..., seq_len=...)` builds the parameter tree from shapes alone (`param_shapes`, then
`jax.eval_shape` of quantization and of the method's inject), splits it as training does (`jpeft.partition`), and
compiles `training.make_train_step` of the model's own loss (or `sharding.make_sharded_train_step` on a mesh) for
those shapes. XLA's buffer assignment of that executable (`memory_analysis()`) gives the bytes per device; the plan
splits them into frozen weights, trainable weights, optimizer state, gradients and the rest (activations, temporaries,
the batch). Nothing runs and nothing is allocated, so a 70B model plans on a laptop (fake CPU devices for a mesh:
XLA_FLAGS=--xla_force_host_platform_device_count=N).

`Plan.fit(budget_bytes)` searches the settings that trade memory for something else: quantizing the frozen base
(none, then int8, then NF4), the micro-batch (the rest of the batch by gradient accumulation) and layer
rematerialisation, and returns the first plan that fits, in that order of preference.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jpeft import quant, training, tree
from jpeft.methods import adapters, ia3, loha, lokr, lora, prefix, prompt, ptuning
from jpeft.models import family
from jpeft.training import sharding, split

Method = Any  # a method's config (LoraConfig, IA3Config, ...), a callable params -> (params, mask), or None (full fine-tuning)
QUANTIZE_ORDER = (None, "int8", "nf4")  # what `fit` tries, least lossy first
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device of one compiled train step, and the settings it was compiled with.

    `peak` is XLA's buffer assignment: arguments + outputs - donated buffers + temporaries. `gradients` are the
    trainable leaves' float32 gradients; `activations` is the rest of the temporaries (activations kept for the
    backward pass, the LM head's logits, dequantized weights, the batch).
    """

    batch: int
    seq_len: int
    target_len: int
    dtype: str
    quantize: str | None
    remat: bool
    devices: int
    frozen: int
    trainable: int
    optimizer: int
    gradients: int
    activations: int
    peak: int
    request: "_Request" = dataclasses.field(repr=False, compare=False)
    step: Any = dataclasses.field(default=None, repr=False, compare=False)  # the compiled step, callable on arrays of `shapes`
    shapes: tuple = dataclasses.field(default=(), repr=False, compare=False)  # the step's arguments: (trainable, opt_state, frozen, batch, rng)

    def fit(self, budget_bytes: int | str) -> "Plan":
        """The plan of the first settings that fit `budget_bytes` per device (an int or "24GB" / "80GiB"): quantization
        from this plan's (none, int8, NF4), then the largest micro-batch dividing this plan's batch, then no remat before
        remat (whatever this plan's); `ValueError` naming what was tried and the smallest plan's bytes when nothing fits.
        Each setting compiles once per `plan` call (a few seconds for a small model, about a minute for a 70B one)."""
        budget = parse_bytes(budget_bytes)
        levels = QUANTIZE_ORDER[QUANTIZE_ORDER.index(self.quantize):] if self.quantize in QUANTIZE_ORDER else (self.quantize,)
        micros = [d for d in range(self.batch, 0, -1) if self.batch % d == 0]
        smallest, skipped = None, {}
        for i, fmt in enumerate(levels):
            try:  # first the whole batch (often this plan itself), then the least each quantization can need
                whole = self.request.compile(self.batch, True, fmt) if i == 0 else None
                floor = whole if whole is not None and whole.peak <= budget else self.request.compile(1, True, fmt)
            except ValueError as e:  # e.g. NF4 on a model whose widths are not multiples of 64
                skipped[fmt] = str(e)
                continue
            smallest = floor if smallest is None or floor.peak < smallest.peak else smallest
            for micro in micros if floor.peak <= budget else ():  # remat needs less: no remat is compiled only where remat fits
                with_remat = self.request.compile(micro, True, fmt)
                if with_remat.peak <= budget:
                    without = self.request.compile(micro, False, fmt)
                    return without if without.peak <= budget else with_remat
        tried = f"quantize {[f or 'none' for f in levels]} x micro-batch {micros} x remat [False, True]"
        tried += "".join(f" ({fmt} does not apply: {reason})" for fmt, reason in skipped.items())
        if smallest is None:
            raise ValueError(f"no settings compile for this model ({tried})")
        raise ValueError(f"nothing fits {_gb(budget)} per device: tried {tried}; the smallest plan (micro-batch 1, "
                         f"remat {smallest.remat}, quantize {smallest.quantize or 'none'}) needs {_gb(smallest.peak)}")

    def table(self) -> str:
        """The plan as a few aligned lines, for a terminal."""
        rows = [("frozen weights", self.frozen), ("trainable weights", self.trainable), ("optimizer state", self.optimizer),
                ("gradients", self.gradients), ("activations, temporaries", self.activations), ("peak", self.peak)]
        head = (f"memory plan: batch {self.batch} x {self.seq_len} tokens ({self.target_len} scored), {self.dtype} base"
                f"{', quantized ' + self.quantize if self.quantize else ''}, remat {'on' if self.remat else 'off'}, "
                f"{self.devices} device{'s' if self.devices > 1 else ''}; bytes per device:")
        return "\n".join([head] + [f"  {name:<26}{_gb(n):>12}" for name, n in rows])


def plan(config: Any, method: Method = None, *, batch: int = 1, seq_len: int = 512, target_len: int | None = None,
         dtype: Any = jnp.float32, compute_dtype: Any = None, quantize: str | None = None, remat: bool = True,
         mesh: Any = None, optimizer: optax.GradientTransformation | None = None, lora_dropout: float = 0.0) -> Plan:
    """The memory plan of one train step of `config`'s model (a transformers Llama-family, Gemma or T5 config) under
    `method` (a method config such as `LoraConfig(...)`, a callable `params -> (params, trainable mask)`, or None for
    full fine-tuning), on rows of `seq_len` tokens of which `target_len` (default: all) are scored.

    `dtype` is how the frozen base is stored (`load_pretrained(dtype=...)`), `compute_dtype` the loss's (default: the
    same); `quantize` "nf4" / "int8" quantizes the base as `load_pretrained(quantize=...)` does; `mesh` (a Mesh or
    "data=2,fsdp=4") compiles the sharded step and reports one device's share; `optimizer` defaults to AdamW.
    """
    request = _Request(config, method, seq_len, target_len or seq_len, jnp.dtype(dtype), jnp.dtype(compute_dtype or dtype), mesh,
                       optimizer or optax.adamw(1e-4), lora_dropout)
    return request.compile(batch, remat, quantize)


def parse_bytes(text: int | str) -> int:
    """"24GB" (10^9), "80GiB" (2^30), "512MB", or a plain number of bytes -> int."""
    if isinstance(text, (int, np.integer)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 24GB, 80GiB or 512MB")
    return int(float(match[1]) * UNITS[(match[2] or "B").upper()])


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@dataclasses.dataclass(frozen=True)
class _Request:
    """What a plan is of, less the settings `fit` varies (micro-batch, remat, quantization)."""

    config: Any
    method: Method
    seq_len: int
    target_len: int
    dtype: Any
    compute_dtype: Any
    mesh: Any
    optimizer: optax.GradientTransformation
    lora_dropout: float

    plans: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)  # (batch, remat, quantize) -> Plan

    def compile(self, batch: int, remat: bool, quantize: str | None) -> Plan:
        """The plan of these settings: the step compiled once and its buffer sizes read."""
        key = (batch, remat, quantize)
        if key not in self.plans:
            self.plans[key] = self._compile(batch, remat, quantize)
        return self.plans[key]

    def _compile(self, batch: int, remat: bool, quantize: str | None) -> Plan:
        trainable, frozen = self.abstract_split(quantize)
        opt_state = jax.eval_shape(self.optimizer.init, trainable)
        loss_fn, batch_shapes = self.loss(batch, remat)
        rng = jax.random.key(0) if self.lora_dropout else None
        if self.mesh is None:
            step, devices, shardings = training.make_train_step(loss_fn, self.optimizer), 1, (None, None, None)
        else:
            mesh = sharding.mesh_from_string(self.mesh)
            step, sh = sharding.make_sharded_train_step(loss_fn, self.optimizer, mesh, trainable, frozen)
            devices, shardings = mesh.size, (sh.trainable, sh.opt_state, sh.frozen)
        compiled = training.compile_step(step, trainable, opt_state, frozen, batch_shapes, rng)
        m = compiled.memory_analysis()
        peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
        trained, optimizer, fixed = (_bytes(t, s) for t, s in zip((trainable, opt_state, frozen), shardings))
        return Plan(batch, self.seq_len, self.target_len, str(self.dtype), quantize, remat, devices, frozen=fixed, trainable=trained,
                    optimizer=optimizer, gradients=trained, activations=max(0, peak - fixed - 2 * trained - optimizer), peak=peak,
                    request=self, step=compiled, shapes=(trainable, opt_state, frozen, batch_shapes, rng))

    def abstract_split(self, quantize: str | None) -> tuple[dict, dict]:
        """(trainable, frozen) ShapeDtypeStruct trees: the base from shapes, quantized, the method injected, split."""
        shapes = {p: jax.ShapeDtypeStruct(s, self.dtype) for p, s in _family(self.config).param_shapes(self.config, **_tied(self.config)).items()}
        params = tree.unflatten(shapes)
        if quantize is not None:
            params = jax.eval_shape(lambda p: quant.quantize(p, quantize), params)
        if self.method is None:  # full fine-tuning
            params, mask = params, jax.tree.map(lambda _: True, params)
        else:
            params, mask = _apply(self.method, params, self.config)
        return split.partition(params, mask)

    def loss(self, batch: int, remat: bool) -> tuple[Callable, dict]:
        """The model's loss and the ShapeDtypeStructs of a batch of `batch` rows."""
        rows = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
        if _seq2seq(self.config):
            return (training.seq2seq_loss(self.config, self.compute_dtype, self.lora_dropout, remat),
                    {"input_ids": rows(batch, self.seq_len), "attention_mask": rows(batch, self.seq_len), "labels": rows(batch, self.target_len)})
        return (training.causal_lm_loss(self.config, self.compute_dtype, self.lora_dropout, remat),
                {"input_ids": rows(batch, self.seq_len), "attention_mask": rows(batch, self.seq_len), "targets": rows(batch, self.target_len),
                 "target_index": rows(batch)})


def _seq2seq(config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def _family(config: Any):
    """What gives `param_shapes` for the config: the t5 module or a decoder-only family."""
    from jpeft.models import t5

    return t5 if _seq2seq(config) else family.of(config)


def _tied(config: Any) -> dict:
    return {"tie_word_embeddings": getattr(config, "tie_word_embeddings", True)} if _seq2seq(config) else {}


INJECT: dict[type, Callable[..., dict]] = {
    lora.LoraConfig: lambda p, cfg, key, config: lora.inject(p, cfg, key),
    ia3.IA3Config: lambda p, cfg, key, config: ia3.inject(p, cfg),
    loha.LoHaConfig: lambda p, cfg, key, config: loha.inject(p, cfg, key),
    lokr.LoKrConfig: lambda p, cfg, key, config: lokr.inject(p, cfg, key),
    adapters.AdapterConfig: lambda p, cfg, key, config: adapters.inject(p, cfg, key),
    prompt.PromptTuningConfig: lambda p, cfg, key, config: prompt.inject(p, cfg, key),
    ptuning.PromptEncoderConfig: lambda p, cfg, key, config: ptuning.inject(p, cfg, key),
    prefix.PrefixTuningConfig: lambda p, cfg, key, config: prefix.inject(p, cfg, key, config),
}


def _apply(method: Method, params: dict, config: Any) -> tuple[dict, dict]:
    """(the method's ShapeDtypeStruct tree, its trainable mask of bools), from shapes alone."""
    if not callable(method) or isinstance(method, tuple(INJECT)):
        inject = INJECT.get(type(method))
        if inject is None:
            raise TypeError(f"plan() takes a method config ({', '.join(c.__name__ for c in INJECT)}), a callable params -> (params, mask), "
                            f"or None for full fine-tuning; got {type(method).__name__}")
        cfg = method

        def method(p):
            p = inject(p, cfg, jax.random.key(0), config)
            return p, split.trainable_mask(p, modules_to_save=getattr(cfg, "modules_to_save", ()) or ())

    masks = []  # the mask's bools, kept from the one trace (eval_shape would turn them into abstract arrays)

    def traced(p):
        p, mask = method(p)
        masks.append(mask)
        return p

    return jax.eval_shape(traced, params), masks[0]


def _bytes(values: Any, shardings: Any = None) -> int:
    """Bytes per device of a tree of ShapeDtypeStructs (None leaves skipped): whole, or each leaf's shard of its sharding."""
    leaves = [x for x in jax.tree.leaves(values) if hasattr(x, "shape")]
    shapes = [x.shape for x in leaves] if shardings is None else [s.shard_shape(x.shape) for x, s in zip(leaves, jax.tree.leaves(shardings))]
    return int(sum(math.prod(shape) * jnp.dtype(x.dtype).itemsize for x, shape in zip(leaves, shapes)))
