"""The command line's tiny models and data: a random T5 with the real T5 tokenizer, and DialogSum-like rows."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SHARED, make_hf_t5

TOKENIZER = str(SHARED / "tokenizers" / "t5")
DIALOGUES = [
    ("#Person1#: Can I book a table for two at seven? #Person2#: Yes, we have a window table free.",
     "#Person1# books a table for two at seven."),
    ("#Person1#: My luggage did not arrive. #Person2#: Please fill in this form and we will call you.",
     "#Person1#'s luggage is lost and #Person2# takes a report."),
    ("#Person1#: How much is the blue jacket? #Person2#: It is forty dollars today.",
     "#Person1# asks the price of a jacket, which is forty dollars."),
    ("#Person1#: Where is the station? #Person2#: Go straight and turn left at the bank.",
     "#Person2# tells #Person1# the way to the station."),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_t5")
    make_hf_t5(path, vocab_size=32128, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_decoder_layers=1, num_heads=2,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    for split, n in (("train", 12), ("validation", 4)):
        with (path / f"{split}.jsonl").open("w") as f:
            for i in range(n):
                d, s = DIALOGUES[i % len(DIALOGUES)]
                f.write(json.dumps({"id": f"{split}{i}", "dialogue": d, "summary": s, "topic": "t"}) + "\n")
    return path
