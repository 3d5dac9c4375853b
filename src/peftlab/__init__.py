"""peftlab: fine-tune causal language models with many methods and compare them honestly."""

__version__ = "0.1.0"
