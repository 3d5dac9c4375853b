"""Evaluation: the same code scores the base and the tuned model."""
