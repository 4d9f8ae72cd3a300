"""mini-LibriSpeech: Jane Austen sentences read by espeak-ng voices, a LibriSpeech / Libri-light stand-in.

Faithful to LibriSpeech's structure where it matters for data2vec:
- books are disjoint across splits (train: Emma, Mansfield Park, Pride and Prejudice, Persuasion; dev: Northanger
  Abbey; test: Sense and Sensibility, so the real LibriVox S&S clips stay text-disjoint from training);
- speakers are disjoint between train, dev and test (held-out accents and voice variants);
- "clean" and "other" conditions (other = white or pink noise at 5-15 dB SNR);
- an unlabeled pretraining split, a labeled 1 h split whose first part is a 10 min subset, and 16 kHz audio with
  LibriSpeech-style transcripts (A-Z, apostrophe, space).
A second source, `mini_librispeech_lm`, holds every sentence of the training books as a transcript would read it:
the word n-gram's corpus, as LibriSpeech's LM corpus is books that leave out its dev and test books.
Everything is drawn from `np.random.default_rng([seed, split, index])`, so the corpus is identical for a given seed
and engine version. Synthetic speech is far easier than read human speech: WERs here are pipeline health figures.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from fractions import Fraction
from pathlib import Path

import numpy as np
from pydantic import Field

from d2v.config import StrictModel
from d2v.data.download import bytes_sha256
from d2v.data.manifest import LM_SPLIT, make_manifest, write_manifest
from d2v.data.sources import austen
from d2v.data.sources.base import Context, log, pcm16_flac, register, staged
from d2v.data.sources.tts import ENGINE_VERSION, LOADER_VERSION, Espeak

SAMPLE_RATE = 16_000
ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
            "croak")
DEV_ACCENT, TEST_ACCENT, DEV_VARIANT, TEST_VARIANT = "en-029", "en-us-nyc", "f5", "m7"
BOOKS = {"train": ("emma", "mansfieldpark", "prideprejudice", "persuasion"), "dev": ("northangerabbey",),
         "test": ("sensesensibility",)}

SPLITS = ("pretrain", "train_1h", "dev_clean", "dev_other", "test_clean", "test_other")  # what `plan` draws


class MiniLibriSpeechConfig(StrictModel):
    """Utterance counts per split (defaults: about 1.7 h pretrain, 1 h labeled, 8 min per dev/test split)."""

    pretrain: int = Field(1400, ge=0)
    train_1h: int = Field(800, ge=0)
    train_10min: int = Field(136, ge=0)  # the first N of train_1h form the ~10-minute subset
    dev: int = Field(100, ge=0)  # per condition (dev_clean, dev_other)
    test: int = Field(100, ge=0)  # per condition (test_clean, test_other)
    min_words: int = Field(6, ge=1)
    max_words: int = Field(30, ge=1)
    snr_db: tuple[float, float] = (5.0, 15.0)
    seed: int = 0
    block: int = Field(100, ge=1)  # utterances per fresh engine process (espeak-ng keeps state between utterances)
    workers: int = Field(2, ge=1)


def speaker_group(accent: str, variant: str) -> str:
    """train, dev or test: an accent decides first, then a variant, so the three speaker sets are disjoint."""
    if accent == DEV_ACCENT:
        return "dev"
    if accent == TEST_ACCENT:
        return "test"
    return {DEV_VARIANT: "dev", TEST_VARIANT: "test"}.get(variant, "train")


def speakers(group: str) -> list[tuple[str, str, int]]:
    """(accent, variant, base pitch) for every speaker of a group; the pitch is fixed per speaker."""
    out = []
    for a, accent in enumerate(ACCENTS):
        for v, variant in enumerate(VARIANTS):
            if speaker_group(accent, variant) == group:
                out.append((accent, variant, 30 + (7 * a + 11 * v) % 40))
    return out


def plan(cfg: MiniLibriSpeechConfig, sentences: dict[str, list[str]]) -> list[dict]:
    """Every utterance to synthesise: id, split, text, speaker, rate, pitch, condition, noise seed."""
    splits = [("pretrain", "train", cfg.pretrain, None), ("train_1h", "train", cfg.train_1h, None),
              ("dev_clean", "dev", cfg.dev, "clean"), ("dev_other", "dev", cfg.dev, "other"),
              ("test_clean", "test", cfg.test, "clean"), ("test_other", "test", cfg.test, "other")]
    pools = {}
    for g, (group, books) in enumerate(BOOKS.items()):
        pool = [(book, s) for book in books for s in sentences[book]]
        order = np.random.default_rng([cfg.seed, 100 + g]).permutation(len(pool))
        pools[group] = [pool[i] for i in order]
    taken = {group: 0 for group in BOOKS}
    jobs = []
    for k, (split, group, count, condition) in enumerate(splits):
        if taken[group] + count > len(pools[group]):
            raise ValueError(f"mini_librispeech: {split} needs {count} sentences, only "
                             f"{len(pools[group]) - taken[group]} left in {BOOKS[group]}")
        voices = speakers(group)
        for i in range(count):
            rng = np.random.default_rng([cfg.seed, k, i])
            book, text = pools[group][taken[group] + i]
            accent, variant, pitch = voices[int(rng.integers(len(voices)))]
            cond = condition or ("clean" if rng.random() < 0.5 else "other")
            jobs.append(dict(id=f"{split}-{i:05d}", split=split, text=text, book=book, voice=f"{accent}+{variant}",
                             speaker=f"{accent}+{variant}", rate=int(rng.integers(130, 201)),
                             pitch=int(np.clip(pitch + rng.integers(-5, 6), 0, 99)), condition=cond,
                             snr_db=float(rng.uniform(*cfg.snr_db)), noise="pink" if rng.random() < 0.5 else "white",
                             gain_db=float(rng.uniform(-6, 0)), seed=[cfg.seed, k, i],
                             subsets="10min|1h" if split == "train_1h" and i < cfg.train_10min else
                             ("1h" if split == "train_1h" else "")))
        taken[group] += count
    return jobs


def add_noise(x: np.ndarray, snr_db: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(len(x))
    if kind == "pink":  # 1/f power: scale the spectrum by 1/sqrt(f)
        spectrum = np.fft.rfft(noise)
        spectrum[1:] /= np.sqrt(np.arange(1, len(spectrum)))
        spectrum[0] = 0
        noise = np.fft.irfft(spectrum, len(x))
    power = np.mean(x ** 2) + 1e-12
    noise *= np.sqrt(power / (np.mean(noise ** 2) + 1e-12) / 10 ** (snr_db / 10))
    return x + noise


def render(job: dict) -> tuple[dict, bytes, float]:
    """Synthesise one utterance → (job, FLAC bytes, seconds)."""
    from scipy.signal import resample_poly

    engine = Espeak.get()
    pcm = engine.synthesize(job["text"], job["voice"], job["rate"], job["pitch"], seed=int(job["seed"][-1]))
    ratio = Fraction(SAMPLE_RATE, engine.sample_rate)  # 22,050 → 16,000 Hz = 320/441, polyphase low-pass
    x = resample_poly(pcm.astype(np.float64) / 32768.0, ratio.numerator, ratio.denominator)
    x *= 10 ** (job["gain_db"] / 20) * 0.9 / (np.abs(x).max() + 1e-9)
    if job["condition"] == "other":
        x = add_noise(x, job["snr_db"], job["noise"], np.random.default_rng(job["seed"]))
    return job, pcm16_flac(x, SAMPLE_RATE), len(x) / SAMPLE_RATE


def render_block(jobs: list[dict]) -> list[tuple[dict, bytes, float]]:
    """espeak-ng carries hidden state from one utterance to the next, so each fixed block of utterances runs in a
    fresh process: the audio then depends on the block's contents only, not on scheduling or worker count."""
    return [render(job) for job in jobs]


def recipe_digest(cfg: MiniLibriSpeechConfig) -> str:
    """Changes whenever the recipe, the engine or the source text would change the corpus."""
    key = dict(cfg=cfg.model_dump(exclude={"workers"}), engine=ENGINE_VERSION, loader=LOADER_VERSION,
               text=austen.RDB.sha256, sample_rate=SAMPLE_RATE, recipe=2)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@register("mini_librispeech", "speech", "embedded",
          "Austen sentences read by espeak-ng voices: pretrain / train_1h (10min subset) / dev,test clean,other",
          splits=SPLITS, subsets=("10min", "1h"))
def prepare(ctx: Context, cfg: MiniLibriSpeechConfig | None = None) -> Path:
    cfg = cfg or MiniLibriSpeechConfig()
    digest = recipe_digest(cfg)
    meta_file = ctx.out_dir / "manifest.json"
    if meta_file.exists() and json.loads(meta_file.read_text()).get("recipe_digest") == digest:
        log.info("mini_librispeech: up to date (%s)", digest[:12])
        return ctx.out_dir
    novels = austen.read_novels(ctx)
    sentences = {k: austen.transcript_sentences(v, cfg.min_words, cfg.max_words) for k, v in novels.items()}
    jobs = plan(cfg, sentences)
    rows = []
    blocks = [jobs[i:i + cfg.block] for i in range(0, len(jobs), cfg.block)]
    with staged(ctx.out_dir) as out, mp.get_context("fork").Pool(cfg.workers, maxtasksperchild=1) as pool:
        for job, flac, seconds in (r for block in pool.imap(render_block, blocks) for r in block):
            rel = f"{job['split']}/{job['speaker']}/{job['id']}.flac"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(flac)
            rows.append(dict(id=job["id"], path=rel, split=job["split"], bytes=len(flac), duration=seconds,
                             text=job["text"], sha256=bytes_sha256(flac), speaker=job["speaker"], book=job["book"],
                             condition=job["condition"], subsets=job["subsets"]))
        df = make_manifest(rows)
        hours = {s: round(float(d), 4) for s, d in (df.groupby("split")["duration"].sum() / 3600).items()}
        write_manifest(out, df, source="mini_librispeech", recipe_digest=digest, hours=hours,
                       engine=f"espeak-ng {ENGINE_VERSION} (espeakng-loader {LOADER_VERSION})",
                       config=cfg.model_dump(), skipped={"count": 0, "files": []},
                       text_source={austen.DEB.name: austen.DEB.sha256}, sample_rate=SAMPLE_RATE,
                       note="synthetic speech (stand-in for LibriSpeech / Libri-light); WER is a health metric")
    return ctx.out_dir


@register("mini_librispeech_lm", "speech", "embedded",
          "the training books' sentences as transcripts: the word n-gram corpus (librispeech-lm-norm stand-in)",
          splits=(LM_SPLIT,))
def prepare_lm_corpus(ctx: Context) -> Path:
    """Every sentence of the training books, normalised as the transcripts are (not only the ones read aloud, as
    LibriSpeech's LM corpus holds whole books); the dev and test books stay out, as LibriSpeech's do."""
    novels = austen.read_novels(ctx)
    rows = []
    with staged(ctx.out_dir) as out:
        for book in BOOKS["train"]:
            lines = austen.transcript_sentences(novels[book], min_words=1, max_words=10**6)
            data = ("\n".join(lines) + "\n").encode()
            (out / f"{book}.txt").write_bytes(data)
            rows.append(dict(id=book, path=f"{book}.txt", split=LM_SPLIT, bytes=len(data), sha256=bytes_sha256(data),
                             sentences=len(lines), words=sum(len(s.split()) for s in lines)))
        write_manifest(out, make_manifest(rows), source="mini_librispeech_lm", skipped={"count": 0, "files": []},
                       artifacts={austen.DEB.name: austen.DEB.sha256}, licence="public domain (janeaustenr MIT)",
                       held_out=[*BOOKS["dev"], *BOOKS["test"]])
    return ctx.out_dir
