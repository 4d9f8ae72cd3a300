"""Word n-gram language models for CTC beam search, as data2vec's LibriSpeech rows are decoded (a 4-gram, lexicon,
LM weight and word score tuned on dev; spec §9.2, [P1 Tab.6]):

- `kneser_ney` estimates an interpolated Kneser-Ney model from sentences and `write_arpa` stores it in the ARPA
  format KenLM reads (the embedded profile builds its 4-gram from the training books; the paper profile reads
  LibriSpeech's official `4-gram.arpa.gz` instead);
- `write_lexicon` spells the model's words in the CTC letter vocabulary;
- `LanguageModel` beam-searches CTC logits with flashlight-text's lexicon decoder (the one torchaudio's
  `ctc_decoder` wraps), in parallel processes that share one loaded KenLM and one lexicon trie, and `tune` picks the
  LM weight and word score on a dev split.
"""
from __future__ import annotations

import gzip
import hashlib
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from pydantic import Field, model_validator

from d2v.config import StrictModel
from d2v.data.manifest import LM_SPLIT, read_manifest
from d2v.eval.metrics import cer, greedy_transcripts, wer
from d2v.io import atomic_write, atomic_write_json, atomic_write_text, read_json, text_lines
from d2v.processes import forked_pool, usable_cpus

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
BLANK, SEPARATOR = 0, 1  # the letter indices of CTC's blank and the word separator '|'
NO_PROB = -99.0  # ARPA's log10 probability of <s>, which is never predicted
ARPA, LEXICON, WORDS, META = "lm.arpa", "lexicon.txt", "words.txt", "lm.json"


class LanguageModelConfig(StrictModel):
    """Where the model comes from (one of `corpus`, a prepared source whose manifest lists text files under the
    split `lm`, or `arpa`, an ARPA file such as openslr.org/11's `4-gram.arpa.gz`), and how to decode with it. The
    LM weight and word score are chosen on dev from the grids; `tune_beam` and `tune_limit` make that search
    cheaper than the final decode."""

    corpus: str | None = None
    arpa: str | None = None
    order: int = Field(4, ge=1, le=6)
    beam: int = Field(100, ge=1)
    beam_threshold: float = Field(25.0, gt=0)
    lm_weights: tuple[float, ...] = Field((0.5, 1.0, 2.0, 3.0), min_length=1)
    word_scores: tuple[float, ...] = Field((-1.0, 0.0, 1.0), min_length=1)
    tune_beam: int | None = Field(None, ge=1)  # None: `beam`
    tune_limit: int | None = Field(None, ge=1)  # dev utterances the search decodes (None: all)

    @model_validator(mode="after")
    def _one_source(self):
        if (self.corpus is None) == (self.arpa is None):
            raise ValueError("lm: give exactly one of `corpus` (a source with 'lm' text) or `arpa` (a file)")
        return self


# ------------------------------------------------------------------------------------------- estimation

def ngram_counts(sentences: Iterable[str], order: int) -> list[Counter]:
    """Raw counts of every 1..order-gram of `<s> words </s>` (sentence-initial n-grams start at <s>)."""
    counts = [Counter() for _ in range(order)]
    for sentence in sentences:
        words = [BOS, *sentence.split(), EOS]
        for n in range(1, order + 1):
            grams = counts[n - 1]
            for i in range(len(words) - n + 1):
                grams[tuple(words[i:i + n])] += 1
    return counts


def adjusted_counts(counts: list[Counter]) -> list[Counter]:
    """Kneser-Ney's counts: raw at the highest order and for n-grams that start at <s>; below, the number of
    distinct words seen before the n-gram (how many contexts it continues, not how often it occurs)."""
    adjusted = [Counter() for _ in counts]
    adjusted[-1] = Counter(counts[-1])
    for n in range(len(counts) - 1, 0, -1):
        for gram in counts[n]:
            adjusted[n - 1][gram[1:]] += 1
        for gram, c in counts[n - 1].items():
            if gram[0] == BOS:
                adjusted[n - 1][gram] = c
    return adjusted


def discount(adjusted: Counter) -> float:
    """Ney's absolute discount n1 / (n1 + 2 n2) from the count-of-counts; 0.5 when the counts cannot tell."""
    n1 = sum(1 for c in adjusted.values() if c == 1)
    n2 = sum(1 for c in adjusted.values() if c == 2)
    return n1 / (n1 + 2 * n2) if n1 and n2 else 0.5


def kneser_ney(sentences: Iterable[str], order: int) -> list[dict[tuple[str, ...], tuple[float, float | None]]]:
    """Interpolated Kneser-Ney, per order {n-gram: (log10 p, log10 backoff or None)} in ARPA's terms. A seen
    n-gram h w has p = max(a(h w) - D, 0) / a(h ·) + γ(h) p(w | h without its first word), where γ(h) = D N1+(h ·) /
    a(h ·) is the mass the discount frees; unigrams interpolate with the uniform distribution, which gives <unk>
    its probability. An unseen h w is γ(h) p(w | shorter h), so γ is the backoff weight and the ARPA file holds
    the interpolated model exactly."""
    counts = ngram_counts(sentences, order)
    if not counts[0]:
        raise ValueError("language model corpus is empty")
    adjusted = adjusted_counts(counts)
    adjusted[0].pop((BOS,), None)
    adjusted[0].setdefault((UNK,), 0)
    vocab = len(adjusted[0])
    probs: list[dict] = []
    gammas: list[dict] = []
    for n, grams in enumerate(adjusted, start=1):
        d = discount(grams)
        total, types = defaultdict(int), defaultdict(int)
        for gram, a in grams.items():
            total[gram[:-1]] += a
            types[gram[:-1]] += a > 0
        gamma = {h: d * types[h] / total[h] for h in total}
        lower = probs[-1] if probs else None
        probs.append({gram: max(a - d, 0) / total[gram[:-1]] +
                      gamma[gram[:-1]] * (lower[gram[1:]] if lower else 1 / vocab) for gram, a in grams.items()})
        gammas.append(gamma)
    model = []
    for n, table in enumerate(probs, start=1):
        backoff = gammas[n] if n < order else {}
        entries = {gram: (math.log10(p), _log10(backoff.get(gram))) for gram, p in table.items()}
        if n == 1:
            entries[(BOS,)] = (NO_PROB, _log10(backoff.get((BOS,))))
        model.append(entries)
    return model


def _log10(x: float | None) -> float | None:
    return None if x is None else math.log10(x) if x > 0 else NO_PROB


def write_arpa(model: list[dict], path: str | Path) -> Path:
    def lines():
        yield "\n\\data\\\n"
        yield from (f"ngram {n}={len(entries)}\n" for n, entries in enumerate(model, start=1))
        for n, entries in enumerate(model, start=1):
            yield f"\n\\{n}-grams:\n"
            for gram in sorted(entries):
                logp, bow = entries[gram]
                yield f"{logp:.7f}\t{' '.join(gram)}" + ("" if bow is None else f"\t{bow:.7f}") + "\n"
        yield "\n\\end\\\n"

    return atomic_write(path, lambda f: f.writelines(line.encode("utf-8") for line in lines()))


def read_arpa_vocabulary(path: str | Path) -> list[str]:
    """The 1-gram words of an ARPA file (plain or .gz), in file order."""
    opener = gzip.open if str(path).endswith(".gz") else open
    words, section = [], None
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line.startswith("\\"):
                section = line
                if line in ("\\2-grams:", "\\end\\"):
                    break
            elif section == "\\1-grams:" and line:
                fields = line.split()
                if len(fields) < 2:
                    raise ValueError(f"{path}: malformed 1-gram line {line!r}")
                words.append(fields[1])
    if not words:
        raise ValueError(f"{path}: no \\1-grams: section (not an ARPA language model?)")
    return words


def write_lexicon(words: Iterable[str], letters: Iterable[str], folder: str | Path) -> tuple[int, list[str]]:
    """`WORD<TAB>W O R D |` for every word spelled with the letter vocabulary, and the decoder's word list (the
    same words, then <unk>); returns how many were kept and the words left out (<s>, </s>, and words with other
    characters, which the decoder cannot emit)."""
    alphabet = set(letters)
    kept, dropped = [], []
    for word in words:
        (kept if word not in (BOS, EOS, UNK) and set(word) <= alphabet else dropped).append(word)
    if not kept:
        raise ValueError(f"no word of the language model is spelled with the letters {''.join(sorted(alphabet))}")
    folder = Path(folder)
    atomic_write_text(folder / LEXICON, "".join(f"{w}\t{' '.join(w)} |\n" for w in kept))
    atomic_write_text(folder / WORDS, "".join(f"{w}\n" for w in [*kept, UNK]))
    return len(kept), dropped


def corpus_files(source_dir: str | Path) -> list[Path]:
    """The language-model text files a prepared source lists under the manifest split `lm`."""
    rows = read_manifest(source_dir, split=LM_SPLIT)
    if rows.empty:
        raise ValueError(f"{source_dir}: its manifest has no '{LM_SPLIT}' rows (not a language-model corpus)")
    return [Path(source_dir) / p for p in rows["path"]]


def build(cfg: LanguageModelConfig, letters: Sequence[str], folder: str | Path,
          corpus: Sequence[str | Path] = ()) -> dict:
    """The language model folder: lm.arpa (estimated from the `corpus` files, one sentence a line) unless
    `cfg.arpa` names one, lexicon.txt, words.txt and lm.json (the config and what was built)."""
    folder = Path(folder)
    meta: dict = {"config": cfg.model_dump(mode="json")}
    if cfg.arpa:
        arpa = Path(cfg.arpa)
        if not arpa.is_file():
            raise FileNotFoundError(f"lm.arpa: {arpa} does not exist (LibriSpeech's 4-gram: openslr.org/11)")
        arpa = arpa.resolve()
    else:
        if not corpus:
            raise ValueError(f"lm.corpus: no text files given (prepare the source {cfg.corpus!r} first)")
        missing = [str(f) for f in corpus if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"lm.corpus: missing {missing}")
        model = kneser_ney((line for f in corpus for line in text_lines(Path(f).read_text("utf-8"))
                            if line.strip()), cfg.order)
        arpa = write_arpa(model, folder / ARPA)
        meta |= {"corpus": [str(f) for f in corpus], "ngrams": [len(m) for m in model]}
    kept, dropped = write_lexicon(read_arpa_vocabulary(arpa), letters, folder)
    # a built model is named relative to its folder (which may move), a given one by its absolute path
    meta |= {"arpa": str(arpa) if cfg.arpa else ARPA, "letters": list(letters), "lexicon_words": kept,
             "words_left_out": len(dropped), "examples_left_out": dropped[:20]}
    atomic_write_json(folder / META, meta)
    return meta


# ------------------------------------------------------------------------------------------- decoding

def tuning_split(split: str, tests: Sequence[str], dev: str | None) -> str:
    """The dev split whose LM weights decode `split`: a dev split itself, test_X (test-X) its dev_X (dev-X), any
    other test set the task's selection split."""
    if split.startswith("dev"):
        return split
    paired = "dev" + split[len("test"):] if split.startswith("test") else None
    if paired in tests:
        return paired
    if dev is None:
        raise ValueError(f"{split}: no dev split to choose the LM weight and word score on (the task has none)")
    return dev


class LanguageModel:
    """A built language model folder, decoding CTC logits over `letters` (blank first, then '|'), the letters its
    lexicon was spelled with, in up to `workers` processes."""

    def __init__(self, folder: str | Path, letters: Sequence[str], workers: int = 1):
        self.folder = Path(folder)
        meta_file = self.folder / META
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file}: no language model here (run `d2v lm` first)")
        if workers < 1:
            raise ValueError(f"decode workers: {workers}; expected at least 1")
        raw = meta_file.read_bytes()
        self.meta = read_json(meta_file, "the language model's description `d2v lm` writes", raw)
        if not isinstance(self.meta, dict) or not {"config", "arpa"} <= self.meta.keys():
            raise ValueError(f"{meta_file}: expected an object with 'config' and 'arpa' (run `d2v lm` again)")
        self.digest = hashlib.sha256(raw).hexdigest()[:16]  # which model decoded a result
        self.cfg = LanguageModelConfig.model_validate(self.meta["config"])
        self.arpa = self.folder / self.meta["arpa"]
        for path in (self.arpa, self.folder / LEXICON, self.folder / WORDS):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: part of the language model in {self.folder} is missing")
        self.letters = list(letters)
        if self.meta.get("letters", self.letters) != self.letters:
            raise ValueError(f"{meta_file}: its lexicon is spelled with the letters {self.meta['letters']}, the model "
                             f"decodes {self.letters} (run `d2v lm` again with this letter vocabulary)")
        self.workers = workers

    @cached_property
    def _words(self):
        return _flashlight().dictionary.Dictionary(str(self.folder / WORDS))

    @cached_property
    def _kenlm(self):
        """Loaded once: a large ARPA file takes minutes, and every (weight, score) pair reuses it."""
        return _flashlight().kenlm.KenLM(str(self.arpa), self._words)

    @cached_property
    def _trie(self):
        """The lexicon's spellings over the letters, each word scored by the LM's unigram and the scores smeared up
        the trie: built once and shared by every (weight, score) pair, as it depends on neither (6 s for 200k words,
        `bench/lm_decoder_build.py`; torchaudio's `ctc_decoder` builds it again for each)."""
        fl = _flashlight()
        letters = fl.dictionary.Dictionary(self.letters)
        trie = fl.decoder.Trie(letters.index_size(), SEPARATOR)
        start = self._kenlm.start(False)
        for word, spellings in fl.dictionary.load_words(str(self.folder / LEXICON)).items():
            index = self._words.get_index(word)
            _, score = self._kenlm.score(start, index)
            for spelling in spellings:
                trie.insert([letters.get_index(letter) for letter in spelling], index, score)
        trie.smear(fl.decoder.SmearingMode.MAX)
        return trie

    def decoder(self, lm_weight: float, word_score: float, beam: int | None = None) -> BeamSearch:
        """flashlight's lexicon decoder with ctc_decoder's defaults (every letter considered at each frame, unknown
        words never emitted, no silence score, max rather than log-add when hypotheses merge)."""
        fl = _flashlight().decoder
        options = fl.LexiconDecoderOptions(
            beam_size=beam or self.cfg.beam, beam_size_token=len(self.letters),
            beam_threshold=self.cfg.beam_threshold, lm_weight=lm_weight, word_score=word_score,
            unk_score=float("-inf"), sil_score=0.0, log_add=False, criterion_type=fl.CriterionType.CTC)
        search = fl.LexiconDecoder(options, self._trie, self._kenlm, SEPARATOR, BLANK, self._words.get_index(UNK),
                                   [], False)
        return BeamSearch(search, self._words, keep_alive=(self._trie, self._kenlm))

    def decode(self, logits: Sequence[np.ndarray], lm_weight: float, word_score: float,
               beam: int | None = None) -> list[str]:
        """Best word sequence per utterance; logits: per utterance (frames, letters). The same words in any number
        of workers."""
        return self._search([self._emissions(x) for x in logits], lm_weight, word_score, beam)

    def _search(self, emissions: list[np.ndarray], lm_weight: float, word_score: float,
                beam: int | None = None) -> list[str]:
        """`decode` of emissions `_emissions` made."""
        workers = min(self.workers, len(emissions), usable_cpus())
        # built before the fork: the workers share the loaded KenLM and the decoder's lexicon trie page by page,
        # where each would otherwise build a trie of its own (147 MB for 51.5k words; bench/lm_fork_memory.py)
        search = self.decoder(lm_weight, word_score, beam)
        if workers <= 1:
            return [search.best_words(e) for e in emissions]
        with forked_pool(workers, _use_search, (search,)) as pool:
            return list(pool.map(_search_in_worker, emissions, chunksize=max(1, len(emissions) // (4 * workers))))

    def _emissions(self, x: np.ndarray) -> np.ndarray:
        """One utterance's (frames + 1, letters) float32 log-probabilities, with one more frame, certainly the word
        separator: every spelling ends in '|', as fairseq's letter targets do, but ours have no '|' after the last
        word, so without it the last word could never be finished (a separator the model did emit merges with
        this one, as CTC merges repeats). Normalised in float64."""
        import torch  # not at import time: the params and the stage graph load this module's config

        if x.ndim != 2 or x.shape[1] != len(self.letters):
            raise ValueError(f"logits of shape {x.shape}; expected (frames, {len(self.letters)} letters)")
        log_probs = torch.from_numpy(np.asarray(x, dtype=np.float64)).log_softmax(-1).numpy()
        end = np.full((1, x.shape[1]), math.log(1e-10))
        end[0, 1] = 0.0
        return np.concatenate([log_probs, end]).astype(np.float32)

    def tune(self, logits: Sequence[np.ndarray], references: Sequence[str]) -> dict:
        """The (LM weight, word score) of the grid with the lowest WER on these dev utterances (ties: CER, then the
        grid's order), and the whole grid's scores."""
        limit = self.cfg.tune_limit or len(logits)
        emissions, references = [self._emissions(x) for x in logits[:limit]], references[:limit]  # once, not per point
        grid = []
        for lm_weight in self.cfg.lm_weights:
            for word_score in self.cfg.word_scores:
                hyps = self._search(emissions, lm_weight, word_score, self.cfg.tune_beam)
                grid.append({"lm_weight": lm_weight, "word_score": word_score, "wer": wer(hyps, references),
                             "cer": cer(hyps, references)})
        best = min(grid, key=lambda g: (g["wer"], g["cer"]))
        return {"lm_weight": best["lm_weight"], "word_score": best["word_score"], "n": len(references),
                "beam": self.cfg.tune_beam or self.cfg.beam, "grid": grid}


def _flashlight():
    """flashlight-text's modules (the `lm` extra)."""
    try:
        import flashlight.lib.text.decoder as decoder
        import flashlight.lib.text.decoder.kenlm as kenlm
        import flashlight.lib.text.dictionary as dictionary
    except ImportError:
        raise ImportError("decoding with a language model needs flashlight-text: pip install 'd2v[lm]' "
                          "(make venv installs it)") from None
    return SimpleNamespace(decoder=decoder, kenlm=kenlm, dictionary=dictionary)


class BeamSearch:
    """One (LM weight, word score) beam search over a `LanguageModel`'s trie and KenLM. pybind holds no reference
    from the C++ decoder to them, so this does (`keep_alive`)."""

    def __init__(self, search, words, keep_alive: tuple):
        self.search, self.words, self.keep_alive = search, words, keep_alive

    def best_words(self, emissions: np.ndarray) -> str:
        """The best word sequence for (frames, letters) C-contiguous float32 log-probabilities."""
        if emissions.dtype != np.float32 or not emissions.flags.c_contiguous:
            raise ValueError(f"emissions: {emissions.dtype}, contiguous {emissions.flags.c_contiguous}; "
                             "expected C-contiguous float32 (the decoder reads raw memory)")
        results = self.search.decode(emissions.ctypes.data, *emissions.shape)
        return " ".join(self.words.get_entry(w) for w in results[0].words if w >= 0) if results else ""


_WORKER_SEARCH = None  # a decode worker's beam search: the parent's, inherited by the fork


def _use_search(search) -> None:
    global _WORKER_SEARCH
    _WORKER_SEARCH = search


def _search_in_worker(emissions: np.ndarray) -> str:
    return _WORKER_SEARCH.best_words(emissions)


class CTCScorer:
    """A CTC model's transcripts of each split: greedy, and with a language model (when given a folder) under the
    LM weight and word score tuned on the split's dev split (`tuning_split`; tuned once per dev split), beam-searched
    in `workers` processes. `logits_of(split)` gives the split's per-utterance (frames, letters) logits and reference
    transcripts."""

    def __init__(self, logits_of: Callable[[str], tuple[list[np.ndarray], list[str]]], letters,
                 lm_dir: str | Path | None, tests: Sequence[str], dev: str | None, workers: int = 1):
        self.logits_of, self.letters, self.tests, self.dev = logits_of, letters, tests, dev
        self.lm = LanguageModel(lm_dir, letters.symbols, workers) if lm_dir is not None else None
        self.tuned: dict[str, dict] = {}

    def reads(self, splits: Sequence[str], with_lm: bool) -> list[str]:
        """The splits `score` asks `logits_of` for, in order, when it scores `splits` one after another (with a
        language model, each dev split the first time it tunes on it): what a rank that only runs the model (under
        torchrun, for the rank that scores) must run in the same order."""
        order, tuned = [], set(self.tuned)
        for split in splits:
            order.append(split)
            dev = tuning_split(split, self.tests, self.dev) if with_lm else None
            if dev is not None and dev not in tuned:
                tuned.add(dev)
                order += [dev] if dev != split else []
        return order

    def score(self, split: str) -> tuple[list[str], list[str], dict]:
        """(greedy transcripts, references, the LM's metrics and settings, or {} without a language model)."""
        logits, refs = self.logits_of(split)
        greedy = greedy_transcripts(logits, self.letters)
        if self.lm is None:
            return greedy, refs, {}
        dev = tuning_split(split, self.tests, self.dev)
        if dev not in self.tuned:
            self.tuned[dev] = self.lm.tune(*((logits, refs) if dev == split else self.logits_of(dev)))
        best = self.tuned[dev]
        hyps = self.lm.decode(logits, best["lm_weight"], best["word_score"])
        return greedy, refs, {"metrics": {"wer_lm": wer(hyps, refs), "cer_lm": cer(hyps, refs)},
                              "folder": str(self.lm.folder), "digest": self.lm.digest, "arpa": str(self.lm.arpa),
                              "beam": self.lm.cfg.beam, "lm_weight": best["lm_weight"],
                              "word_score": best["word_score"], "tuned_on": dev, "tuning": best}


def with_lm_fields(result: dict, lm_fields: dict) -> dict:
    """An evaluation record with the LM's metrics beside the greedy ones and its settings under "lm"."""
    if not lm_fields:
        return result
    fields = dict(lm_fields)
    return {**result, "metrics": {**result["metrics"], **fields.pop("metrics")}, "lm": fields}
