"""jpeft: parameter-efficient fine-tuning for JAX, numerically matched to Hugging Face PEFT.

Every method is a pure transform of a plain parameter tree (`lora.inject`, `prompt.inject`, `prefix.inject`, ...);
the models use the added leaves when present, and a mask says what trains. `jpeft.linen` and `jpeft.nnx`
do the same for unmodified Flax models.
"""

from jpeft import adapters, batches, gguf, ia3, loha, lokr, lora, merging, prefix, prompt, ptuning, selective
from jpeft.adapters import AdapterConfig
from jpeft.ia3 import IA3Config
from jpeft.loha import LoHaConfig
from jpeft.lokr import LoKrConfig
from jpeft.lora import LoraConfig
from jpeft.merging import merge_adapters
from jpeft.peft_format import load_adapter, save_adapter
from jpeft.planning import Plan, plan
from jpeft.prefix import PrefixTuningConfig
from jpeft.prompt import PromptTuningConfig
from jpeft.ptuning import PromptEncoderConfig
from jpeft.selective import SelectiveConfig
from jpeft.split import attach, combine, count_params, optimizer, partition, split_adapter, trainable_mask

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "LoraConfig", "Plan", "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig", "SelectiveConfig",
    "adapters", "attach", "batches", "combine", "count_params", "gguf", "ia3", "load_adapter", "loha", "lokr", "lora", "merge_adapters", "merging",
    "optimizer", "partition", "plan", "prefix", "prompt", "ptuning", "save_adapter", "selective", "split_adapter", "trainable_mask",
]
