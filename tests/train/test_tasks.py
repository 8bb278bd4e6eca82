"""Loading a task: model, tokenizer and what stays in memory after."""

from __future__ import annotations

import jax.numpy as jnp

from jpeft import gguf_io
from train import tasks


def test_loading_a_gguf_model_leaves_no_file_open():
    """The reader kept open while one load reads config, weights, vocabulary and hub id is closed after it,
    so its parsed metadata does not sit beside the training step (`gguf_io.close_reader`)."""
    task, params = tasks.load_task("smollm2-135m-instruct", None, jnp.float32)
    assert task.family == "llama" and params["model"]["layers"]["0"]
    assert gguf_io._reader.cache_info().currsize == 0
