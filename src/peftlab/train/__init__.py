"""Training: the recipe (recipe.py) and what it is built from: TrainingArguments (arguments.py), the
Trainer subclass with the chunked loss (trainer.py), every callback (callbacks.py), checkpoints and
resume (checkpoints.py), and the scoped speed-ups (speedups.py)."""
