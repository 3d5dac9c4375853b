"""Data: load sources, normalise records, tokenise, and pack into training blocks."""
