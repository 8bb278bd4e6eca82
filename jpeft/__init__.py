"""jpeft: parameter-efficient fine-tuning for JAX, numerically matched to Hugging Face PEFT."""

__version__ = "0.1.0"
