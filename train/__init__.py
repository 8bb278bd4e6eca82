"""Fine-tuning and evaluation entry points built on jpeft (dialogue summarization)."""
