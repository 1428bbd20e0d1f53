"""Tasks: what a training run trains: GLM pretraining, cloze and seq2seq finetuning, and
zero-shot evaluation (docs/finetuning.md)."""
