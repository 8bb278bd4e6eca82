"""Training: the losses, the jitted step, the trainable/frozen split, meshes, batches, packing and checkpoints.

`jpeft.training.make_train_step(loss, tx)` and `jpeft.training.causal_lm_loss(config)` are the names most scripts
need; the submodules hold the rest (`split`, `sharding`, `batches`, `packing`, `checkpoint`, `losses`, `step`), and
beyond supervised tuning `preference` (DPO, IPO, SimPO, ORPO, ...: `training.preference_loss`) and `grpo`.
"""

from jpeft.training.losses import (BATCH_AXES, LOGITS_CHUNK_BYTES, LossFn, causal_lm_loss, head_cross_entropy, head_token_logps,
                                   seq2seq_loss, take_rows, target_hidden, token_cross_entropy)
from jpeft.training.step import compile_step, make_train_step
from jpeft.training import grpo, preference
from jpeft.training.preference import preference_loss

__all__ = ["BATCH_AXES", "LOGITS_CHUNK_BYTES", "LossFn", "causal_lm_loss", "compile_step", "grpo", "head_cross_entropy",
           "head_token_logps", "make_train_step", "preference", "preference_loss", "seq2seq_loss", "take_rows", "target_hidden",
           "token_cross_entropy"]
