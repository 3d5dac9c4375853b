"""CPU-only speed-ups, each a scoped switch restored in `finally`: causal attention in query blocks
(attention_blocks.py), frozen linear forwards on oneDNN (onednn_linear.py), glibc malloc thresholds
and heap trimming (malloc.py), huge-page tensor allocation for the command line (huge_pages.py).
Private torch/transformers internals are looked up only when a switch turns on."""
