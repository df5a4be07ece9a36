"""nanopipe: train a small ChatGPT-style model from raw text; see README.md."""

__version__ = "0.1.0"
