"""Every corpus `d2v prepare` knows. Importing this package registers them in `SOURCES`."""
from d2v.data.sources import (audioset, fashion_mnist, glue, imagenet, librilight, librispeech,  # noqa: F401
                              mini_librispeech, real_speech, text, user_text)
from d2v.data.sources.base import SOURCES, Context, Source

__all__ = ["SOURCES", "Context", "Source"]
