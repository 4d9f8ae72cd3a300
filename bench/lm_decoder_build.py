"""What it costs to build the beam-search decoders of a tuning grid at LibriSpeech's lexicon size.

`LanguageModel.tune` decodes dev once per point of its (LM weight, word score) grid. torchaudio's `ctc_decoder`
fixes both at construction and builds its lexicon trie (every word spelled into it, scored by the LM, then smeared)
for each point; `LanguageModel` builds the trie once and a decoder per point over it. This writes an ARPA file
of `--words` random unigrams (200k: LibriSpeech's 4-gram has 200,000) and the few bigrams KenLM needs, builds the
language-model folder from it (`d2v.eval.lm.build` with `arpa:`), loads KenLM once and times both: the trie, then
`--repeats` decoders over it, and `--repeats` torchaudio `ctc_decoder`s; the JSON prices the paper profile's grid
each way.

    python bench/lm_decoder_build.py [--words 200000] [--repeats 3] [--out results/bench/lm_decoder_build_cpu.json]
"""
from __future__ import annotations

import argparse
import platform
import string
import tempfile
import time
from pathlib import Path

import numpy as np

from lm_fork_memory import LETTERS

from d2v.eval import lm as lm_module
from d2v.io import atomic_write_json
from d2v.pipeline.params import load_params


def unigram_arpa(path: Path, words: int, seed: int = 0) -> Path:
    """`words` distinct random words of 3-12 letters with Zipfian probabilities, plus <s>, </s> and <unk>, and
    bigrams after <s> of the 1000 likeliest (KenLM loads nothing below order 2)."""
    rng = np.random.default_rng(seed)
    vocab: set[str] = set()
    while len(vocab) < words:
        vocab.update("".join(rng.choice(list(string.ascii_uppercase), n)) for n in rng.integers(3, 13, words))
    vocab_list = sorted(vocab)[:words]
    probs = 1.0 / np.arange(1, words + 1)
    probs /= probs.sum()
    grams = {(w,): (float(np.log10(p)), None) for w, p in zip(vocab_list, probs)}
    grams |= {(lm_module.BOS,): (lm_module.NO_PROB, 0.0), (lm_module.EOS,): (-1.0, None),
              (lm_module.UNK,): (-7.0, None)}
    bigrams = {(lm_module.BOS, w): (float(np.log10(p)) + 0.1, None) for w, p in zip(vocab_list[:1000], probs)}
    return lm_module.write_arpa([grams, bigrams], path)


def paper_grid_points() -> int:
    cfg = load_params(profile="paper").active.lm
    return len(cfg.lm_weights) * len(cfg.word_scores)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--words", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/bench/lm_decoder_build_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        arpa = unigram_arpa(Path(tmp) / "unigram.arpa", args.words)
        meta = lm_module.build(lm_module.LanguageModelConfig(arpa=str(arpa)), LETTERS, Path(tmp) / "lm")
        model = lm_module.LanguageModel(Path(tmp) / "lm", LETTERS)
        kenlm_seconds = timed(lambda: model._kenlm)  # once per evaluation, not per grid point
        trie_seconds = timed(lambda: model._trie)
        decoder_seconds = [timed(lambda: model.decoder(1.0 + k, 0.0)) for k in range(args.repeats)]
        torchaudio_decoder(model, 1.0)  # untimed: the first imports torchaudio's decoder module
        ctc_decoder_seconds = [timed(lambda: torchaudio_decoder(model, 1.0 + k)) for k in range(args.repeats)]
    per_decoder, per_ctc_decoder = float(np.median(decoder_seconds)), float(np.median(ctc_decoder_seconds))
    points = paper_grid_points()
    grid = {"one_trie": trie_seconds + points * per_decoder, "ctc_decoder_per_point": points * per_ctc_decoder}
    report = {
        "benchmark": "lm_decoder_build", "lexicon_words": meta["lexicon_words"], "kenlm_load_seconds": kenlm_seconds,
        "trie_seconds": trie_seconds, "decoder_seconds": decoder_seconds,
        "ctc_decoder_seconds": ctc_decoder_seconds, "paper_grid_points": points,
        "paper_grid_build_seconds": grid,
        "machine": platform.machine()}
    atomic_write_json(args.out, report)
    print(f"{meta['lexicon_words']} words: trie {trie_seconds:.2f} s, decoder over it {per_decoder * 1e3:.2f} ms, "
          f"torchaudio ctc_decoder {per_ctc_decoder:.2f} s; the paper grid's {points} points: "
          f"{grid['one_trie']:.1f} s against {grid['ctc_decoder_per_point']:.0f} s")


def timed(build) -> float:
    start = time.perf_counter()
    build()
    return time.perf_counter() - start


def torchaudio_decoder(model: lm_module.LanguageModel, lm_weight: float):
    """What `LanguageModel.decoder` built until 2026-12-02: torchaudio's decoder over the same KenLM."""
    from torchaudio.models.decoder import ctc_decoder

    return ctc_decoder(lexicon=str(model.folder / lm_module.LEXICON), tokens=LETTERS, lm=model._kenlm,
                       lm_dict=str(model.folder / lm_module.WORDS), beam_size=model.cfg.beam,
                       beam_threshold=model.cfg.beam_threshold, lm_weight=lm_weight, word_score=0.0,
                       blank_token=LETTERS[0], sil_token=LETTERS[1], unk_word=lm_module.UNK)


if __name__ == "__main__":
    main()
