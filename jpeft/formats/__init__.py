"""File formats: Hugging Face checkpoints (`hf_io`), PEFT adapter directories (`peft_format`), GGUF (`gguf`, with its
reader and writer plumbing in `gguf_io`) and tokenizers (`tokenizer`); `loading` builds a model's parameter tree from
checkpoint tensors streamed one at a time (cast, quantized, placed as each is read)."""
