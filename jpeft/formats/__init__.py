"""File formats: Hugging Face checkpoints (`hf_io`), PEFT adapter directories (`peft_format`), GGUF (`gguf`, with its
reader and writer plumbing in `gguf_io`) and tokenizers (`tokenizer`)."""
