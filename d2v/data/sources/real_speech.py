"""Real human speech with transcripts, reported separately from the synthetic corpus (it exposes the domain gap).

- Asterisk core prompts (Allison Smith, CC-BY-SA-3.0): 16 kHz G.722 from Debian's `asterisk-core-sounds-en-g722`,
  transcripts from `asterisk-core-sounds-en`. Tones, silence and untranscribed files are skipped and counted.
- pocketsphinx test data (BSD-style): five LibriVox *Sense and Sensibility* clips (LibriSpeech's own domain) and
  five "cards" clips, 16 kHz WAV with sphinx-format transcripts.
"""
from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from d2v.data.download import bytes_sha256
from d2v.data.manifest import Skipped, make_manifest, write_manifest
from d2v.data.sources.austen import normalize_transcript
from d2v.data.sources.base import Context, Member, debian, log, pcm16_flac, register, staged
from d2v.io import text_lines

SAMPLE_RATE = 16_000
G722 = debian("asterisk-core-sounds-en-g722_1.6.1-1_all.deb", "a/asterisk-core-sounds/",
              "38c5261820b406dcb0ecb37675720da2b0864850690690352ca52707eb623806")
PROMPTS = Member(debian("asterisk-core-sounds-en_1.6.1-1_all.deb", "a/asterisk-core-sounds/",
                        "973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50"),
                 "usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz",
                 "436538195b7c7361bd227036686f1a4039f694648c76573bdaca956655d34450")
SPHINX = debian("pocketsphinx-testdata_0.8+5prealpha+1-15_all.deb", "p/pocketsphinx/",
                "eaeb7a01d54f20b799d1a81ef110ec544b2cb47ea006614078220737a33019f0")
ALLISON = "usr/share/asterisk/sounds/en_US_f_Allison/"
SPHINX_DIR = "usr/share/pocketsphinx/test/data/"

_ONES = "ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE THIRTEEN FOURTEEN FIFTEEN SIXTEEN " \
        "SEVENTEEN EIGHTEEN NINETEEN".split()
_TENS = "_ _ TWENTY THIRTY FORTY FIFTY SIXTY SEVENTY EIGHTY NINETY".split()


def number_words(n: int) -> str:
    """0..999,999 in words, as a reader says them (LibriSpeech transcripts spell numbers out)."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        return _ONES[n // 100] + " HUNDRED" + ("" if n % 100 == 0 else " " + number_words(n % 100))
    if n < 1_000_000:
        return number_words(n // 1000) + " THOUSAND" + ("" if n % 1000 == 0 else " " + number_words(n % 1000))
    raise ValueError(f"number {n} out of range")


def spoken_form(text: str) -> str:
    """IVR prompt text → what is said: digits spelled, '*' STAR, '#' POUND, '%' PERCENT; then normalised."""
    text = text.replace("*", " star ").replace("#", " pound ").replace("%", " percent ").replace("&", " and ")
    text = re.sub(r"\d+", lambda m: " " + number_words(int(m.group())) + " ", text)
    return normalize_transcript(text)


def parse_prompts(text: str) -> dict[str, str]:
    """`name: text` lines (comments start with ';'); a name may contain '/' (sub-folders)."""
    prompts = {}
    for line in text_lines(text):
        if not line.strip() or line.startswith(";") or ":" not in line:
            continue
        name, said = line.split(":", 1)
        prompts[name.strip()] = said.strip()
    return prompts


def decode_g722(data: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(data), format="g722") as container:
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(audio=0)]
        rate = container.streams.audio[0].rate
    if rate != SAMPLE_RATE:
        raise ValueError(f"G.722 stream at {rate} Hz, expected {SAMPLE_RATE}")
    pcm = np.concatenate(frames) if frames else np.zeros(0, np.int16)
    return pcm.astype(np.float32) / (32768.0 if pcm.dtype == np.int16 else 1.0)


def parse_sphinx_transcription(text: str) -> dict[str, str]:
    """`<s> words </s> (utterance-id)` lines."""
    out = {}
    for line in text_lines(text):
        m = re.match(r"\s*<s>(.*)</s>\s*\((\S+)\)\s*$", line)
        if m:
            out[m.group(2)] = normalize_transcript(m.group(1))
    return out


def _allison(ctx: Context, skipped: Skipped) -> list[tuple[str, str, np.ndarray, str]]:
    prompts = parse_prompts(gzip.decompress(ctx.read(PROMPTS)).decode("utf-8", "replace"))
    out = []
    with ctx.package(G722) as pkg:
        for member in pkg.glob(ALLISON + "*.g722"):
            name = member.removeprefix(ALLISON).removesuffix(".g722")
            said = prompts.get(name)
            if said is None:
                skipped.add(member, "no transcript")
            elif name.startswith("silence/") or re.fullmatch(r"[\[(].*[\])]", said):
                skipped.add(member, f"not speech: {said!r}")
            else:
                try:
                    out.append((name, "asterisk", decode_g722(pkg.read(member)), spoken_form(said)))
                except Exception as err:  # a corrupt file is skipped and reported, never fatal
                    skipped.add(member, f"undecodable G.722: {err}", log)
    return out


def _sphinx(ctx: Context, skipped: Skipped) -> list[tuple[str, str, np.ndarray, str]]:
    out = []
    with ctx.package(SPHINX) as pkg:
        for folder, transcription in (("librivox", "transcription"), ("cards", "cards.transcription")):
            texts = parse_sphinx_transcription(pkg.read(SPHINX_DIR + f"{folder}/{transcription}").decode())
            for member in pkg.glob(SPHINX_DIR + f"{folder}/*.wav"):
                utt = Path(member).stem
                try:
                    x, rate = sf.read(io.BytesIO(pkg.read(member)), dtype="float32")
                except Exception as err:
                    skipped.add(member, f"unreadable WAV: {err}", log)
                    continue
                if utt not in texts or rate != SAMPLE_RATE:
                    skipped.add(member, "no transcript" if utt not in texts else f"{rate} Hz, expected 16 kHz", log)
                    continue
                out.append((f"{folder}/{utt}", folder, x, texts[utt]))
    return out


@register("real_speech", "speech", "embedded",
          "human speech test sets: Asterisk prompts (Allison Smith) and pocketsphinx LibriVox/cards clips",
          splits=("test_asterisk", "test_librivox", "test_cards"))
def prepare(ctx: Context) -> Path:
    skipped = Skipped()
    utterances = _allison(ctx, skipped) + _sphinx(ctx, skipped)
    rows = []
    with staged(ctx.out_dir) as out:
        for name, corpus, x, text in utterances:
            data = pcm16_flac(x, SAMPLE_RATE)
            rel = f"{corpus}/{name.replace('/', '_')}.flac"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
            rows.append(dict(id=f"{corpus}-{name.replace('/', '_')}", path=rel, split=f"test_{corpus}",
                             bytes=len(data), duration=len(x) / SAMPLE_RATE, text=text, sha256=bytes_sha256(data),
                             speaker="allison" if corpus == "asterisk" else corpus))
        df = make_manifest(rows)
        minutes = {s: round(float(d) / 60, 2) for s, d in df.groupby("split")["duration"].sum().items()}
        write_manifest(out, df, source="real_speech", minutes=minutes, skipped=skipped.as_json(),
                       artifacts={a.name: a.sha256 for a in (G722, PROMPTS.artifact, SPHINX)},
                       licence="Asterisk prompts CC-BY-SA-3.0; pocketsphinx test data BSD-style (CMU)")
    return ctx.out_dir
