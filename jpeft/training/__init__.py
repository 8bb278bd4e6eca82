"""Training: the losses, the jitted step, the trainable/frozen split, meshes, batches, packing and checkpoints.

`jpeft.training.make_train_step(loss, tx)` and `jpeft.training.causal_lm_loss(config)` are the names most scripts
need; the submodules hold the rest (`split`, `sharding`, `batches`, `packing`, `checkpoint`, `losses`, `step`).
"""

from jpeft.training.losses import (BATCH_AXES, LOGITS_CHUNK_BYTES, LossFn, causal_lm_loss, head_cross_entropy, seq2seq_loss,
                                   take_rows, token_cross_entropy)
from jpeft.training.step import compile_step, make_train_step

__all__ = ["BATCH_AXES", "LOGITS_CHUNK_BYTES", "LossFn", "causal_lm_loss", "compile_step", "head_cross_entropy", "make_train_step",
           "seq2seq_loss", "take_rows", "token_cross_entropy"]
