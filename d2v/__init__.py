"""d2v: data2vec for images, speech and text."""
__version__ = "0.1.0"
