"""Checkpoint interop with Hugging Face Data2Vec* models."""
from d2v.interop.hf import InteropError, load_hf

__all__ = ["InteropError", "load_hf"]
