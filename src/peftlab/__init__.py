"""peftlab: fine-tune causal language models with many methods and compare them honestly.

Importing peftlab changes nothing in the host process (no environment variables, no patches);
docs/architecture.md lists every process-wide effect, where it is switched on and how it is undone.
"""

__version__ = "0.1.0"
