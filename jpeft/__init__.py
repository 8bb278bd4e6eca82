"""jpeft: parameter-efficient fine-tuning for JAX, numerically matched to Hugging Face PEFT.

Every method is a pure transform of a plain parameter tree (`lora.inject`, `prompt.inject`, `prefix.inject`, ...);
the models use the added leaves when present, and a mask says what trains. `jpeft.linen` and `jpeft.nnx`
do the same for unmodified Flax models. Where things live: README's "Layout" section.
"""

import sys as _sys

from jpeft import nn, quant, tree
from jpeft.formats import gguf, gguf_io, hf_io, peft_format, tokenizer
from jpeft.formats.peft_format import load_adapter, save_adapter
from jpeft.methods import adapters, ia3, loha, lokr, lora, lycoris, merging, multi, prefix, prompt, ptuning, selective, soft_prompt
from jpeft.methods.adapters import AdapterConfig
from jpeft.methods.ia3 import IA3Config
from jpeft.methods.loha import LoHaConfig
from jpeft.methods.lokr import LoKrConfig
from jpeft.methods.lora import LoraConfig
from jpeft.methods.merging import merge_adapters
from jpeft.methods.prefix import PrefixTuningConfig
from jpeft.methods.prompt import PromptTuningConfig
from jpeft.methods.ptuning import PromptEncoderConfig
from jpeft.methods.selective import SelectiveConfig
from jpeft.models import generation
from jpeft.planning import Plan, plan
from jpeft.training import batches, checkpoint, packing, sharding, split
from jpeft import training
from jpeft.training.split import attach, combine, count_params, optimizer, partition, split_adapter, trainable_mask

__version__ = "0.1.0"

# The modules that lived at the top level before the folders: `from jpeft.lora import LoraConfig` keeps working.
for _name, _module in {"adapters": adapters, "batches": batches, "checkpoint": checkpoint, "generation": generation,
                       "gguf": gguf, "gguf_io": gguf_io, "hf_io": hf_io, "ia3": ia3, "loha": loha, "lokr": lokr, "lora": lora,
                       "lycoris": lycoris, "merging": merging, "multi": multi, "packing": packing, "peft_format": peft_format,
                       "prefix": prefix, "prompt": prompt, "ptuning": ptuning, "selective": selective, "sharding": sharding,
                       "split": split, "tokenizer": tokenizer}.items():
    _sys.modules[f"{__name__}.{_name}"] = _module

__all__ = [
    "AdapterConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "LoraConfig", "Plan", "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig", "SelectiveConfig",
    "adapters", "attach", "batches", "checkpoint", "combine", "count_params", "generation", "gguf", "ia3", "load_adapter", "loha", "lokr",
    "lora", "merge_adapters", "merging", "multi", "nn", "optimizer", "packing", "partition", "plan", "prefix", "prompt", "ptuning", "quant",
    "save_adapter", "selective", "sharding", "soft_prompt", "split", "split_adapter", "tokenizer", "trainable_mask", "training", "tree",
]
