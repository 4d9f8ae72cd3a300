"""In-process espeak-ng through ctypes, from the `espeakng-loader` wheel (no apt, no subprocess per utterance).

Output is byte-deterministic for a given engine build, so the engine version is pinned and recorded with the
corpus; a different build is refused rather than silently producing different audio.
"""
from __future__ import annotations

import ctypes
import importlib.metadata

import numpy as np

ENGINE_VERSION = "1.52.0"
LOADER_VERSION = "0.2.4"
_SYNCHRONOUS, _UTF8 = 0x02, 0x01
_RATE, _PITCH = 1, 3


class Espeak:
    """One espeak-ng engine per process (the C library keeps global state)."""

    _instance: Espeak | None = None

    def __init__(self):
        import espeakng_loader

        loader = importlib.metadata.version("espeakng-loader")
        self.lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
        self.sample_rate = self.lib.espeak_Initialize(_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.sample_rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self.lib.espeak_Info.restype = ctypes.c_char_p
        self.version = self.lib.espeak_Info(None).decode()
        if self.version != ENGINE_VERSION or loader != LOADER_VERSION:
            raise RuntimeError(f"espeak-ng {self.version} (espeakng-loader {loader}) found; the corpus recipe is "
                               f"pinned to {ENGINE_VERSION} (espeakng-loader=={LOADER_VERSION})")
        self._chunks: list[np.ndarray] = []
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

        def collect(wav, n, _events):
            if n > 0:
                self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
            return 0

        self._callback = callback_type(collect)  # keep a reference: the C side holds a raw pointer
        self.lib.espeak_SetSynthCallback(self._callback)
        self.libc = ctypes.CDLL(None)

    @classmethod
    def get(cls) -> Espeak:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, seed: int = 0) -> np.ndarray:
        """int16 samples at `self.sample_rate` (22,050 Hz).

        Voice variants add random jitter/flutter, drawn from espeak-ng's generator and libc's rand(); both are
        re-seeded per utterance, so the output depends only on the arguments, not on what was synthesised before.
        """
        self._chunks.clear()
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        self.libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, int(rate), 0)
        self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        data = text.encode("utf-8") + b"\0"
        self.lib.espeak_Synth(data, len(data), 0, 0, 0, _UTF8, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
