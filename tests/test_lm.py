"""Word n-gram language models for CTC beam search: the Kneser-Ney estimate against hand-computed values, every
context a distribution, KenLM reading our ARPA files as we compute them, the lexicon, the beam search against
torchaudio's `ctc_decoder` (the same words from one trie for every weight), beam search that corrects what
greedy decoding misspells, the choice of LM weight on dev, and the failure modes."""
import gzip
import itertools
import math
import os
import time

import numpy as np
import pytest

from d2v.eval import lm

LETTERS = ["<blank>", "|", "A", "C", "T", "X", "S"]


def log10_prob(model, context: tuple[str, ...], word: str) -> float:
    """The ARPA backoff rule, written out: the longest listed n-gram, plus the backoffs of the contexts skipped."""
    context = context[len(context) - (len(model) - 1):] if len(model) > 1 else ()
    penalty = 0.0
    while True:
        gram = (*context, word)
        if gram in model[len(gram) - 1]:
            return penalty + model[len(gram) - 1][gram][0]
        if not context:
            return penalty + model[0][(lm.UNK,)][0]
        penalty += model[len(context) - 1].get(context, (0.0, None))[1] or 0.0
        context = context[1:]


def random_corpus(n: int = 60, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["A", "CAT", "SAT", "AT", "TAX", "SCAT", "ACTS"]
    weights = np.arange(len(words), 0, -1) / sum(range(1, len(words) + 1))
    return [" ".join(rng.choice(words, size=rng.integers(1, 7), p=weights)) for _ in range(n)]


def test_kneser_ney_matches_the_formula_worked_by_hand():
    model = lm.kneser_ney(["A B", "A C"], order=2)
    # unigram continuation counts: A 1 (after <s>), B 1, C 1, </s> 2 (after B, C), <unk> 0; D1 = 3 / (3 + 2·1)
    # = 0.6, γ = 0.6 · 4 / 5 = 0.48 spread over 5 words
    assert 10 ** model[0][("A",)][0] == pytest.approx(0.4 / 5 + 0.48 / 5)
    assert 10 ** model[0][("</s>",)][0] == pytest.approx(1.4 / 5 + 0.48 / 5)
    assert 10 ** model[0][("<unk>",)][0] == pytest.approx(0.48 / 5)
    assert model[0][("<s>",)][0] == lm.NO_PROB
    # bigrams: counts 2, 1, 1, 1, 1 → D2 = 4 / 6; after <s>: γ = (2/3) · 1 / 2
    assert 10 ** model[1][("<s>", "A")][0] == pytest.approx((2 - 2 / 3) / 2 + (1 / 3) * 0.176)
    assert 10 ** model[0][("<s>",)][1] == pytest.approx(1 / 3)
    assert model[1][("A", "B")][1] is None  # the highest order has no backoff


def test_every_context_is_a_distribution_and_kenlm_scores_our_arpa_file_as_we_do(tmp_path):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    model = lm.kneser_ney(random_corpus(), order=3)
    vocab = [g[0] for g in model[0] if g[0] != lm.BOS]
    contexts = [(lm.BOS,), (lm.BOS, "A"), ("A", "CAT"), ("CAT", "SAT"), ("TAX",), ("SCAT", "ACTS"), ("ZZZ", "A")]
    for context in contexts:
        assert sum(10 ** log10_prob(model, context, w) for w in vocab) == pytest.approx(1.0, abs=1e-9), context
    lm.write_arpa(model, tmp_path / "lm.arpa")
    words = Dictionary()
    for w in vocab:
        words.add_entry(w)
    kenlm = KenLM(str(tmp_path / "lm.arpa"), words)
    for context in [(), ("A",), ("A", "CAT"), ("CAT", "SAT", "A")]:
        state = kenlm.start(False)  # after <s>
        for w in context:
            state, _ = kenlm.score(state, words.get_index(w))
        for w in vocab:
            if w == lm.EOS:
                _, score = kenlm.finish(state)
            elif w == lm.UNK:
                continue  # KenLM's own <unk> entry; our dictionary spells no such word
            else:
                _, score = kenlm.score(state, words.get_index(w))
            assert score == pytest.approx(log10_prob(model, (lm.BOS, *context), w), abs=1e-5), (context, w)


def test_the_arpa_file_lists_every_ngram_with_its_counts_header(tmp_path):
    model = lm.kneser_ney(random_corpus(20), order=3)
    text = lm.write_arpa(model, tmp_path / "lm.arpa").read_text()
    for n, entries in enumerate(model, start=1):
        assert f"ngram {n}={len(entries)}\n" in text
        section = text.split(f"\\{n}-grams:\n")[1].split("\n\n")[0].splitlines()
        assert len(section) == len(entries)
    assert text.rstrip().endswith("\\end\\")
    assert lm.read_arpa_vocabulary(tmp_path / "lm.arpa") == sorted(g[0] for g in model[0])


def test_the_lexicon_spells_the_words_the_letters_can_write(tmp_path):
    kept, dropped = lm.write_lexicon(["<s>", "</s>", "<unk>", "CAT", "SAT", "DOG", "TAX"], LETTERS, tmp_path)
    assert (kept, dropped) == (3, ["<s>", "</s>", "<unk>", "DOG"])
    assert (tmp_path / lm.LEXICON).read_text() == "CAT\tC A T |\nSAT\tS A T |\nTAX\tT A X |\n"
    assert (tmp_path / lm.WORDS).read_text().split() == ["CAT", "SAT", "TAX", "<unk>"]
    with pytest.raises(ValueError, match="no word of the language model is spelled with the letters"):
        lm.write_lexicon(["DOG"], LETTERS, tmp_path)


def emissions(frames: list[dict[str, float]]) -> np.ndarray:
    """(frames, letters) log-probabilities; each frame's unnamed letters share what its named ones leave."""
    out = np.empty((len(frames), len(LETTERS)))
    for t, named in enumerate(frames):
        rest = (1 - sum(named.values())) / (len(LETTERS) - len(named))
        out[t] = [named.get(s, rest) for s in LETTERS]
    return np.log(out)


# "CA?" where the last letter is X a little more than T: greedy spells CAX
CAX_OR_CAT = emissions([{"C": 0.9}, {"<blank>": 0.9}, {"A": 0.9}, {"<blank>": 0.9}, {"X": 0.5, "T": 0.4},
                        {"<blank>": 0.9}])


def built(tmp_path, sentences, **cfg) -> lm.LanguageModel:
    (tmp_path / "corpus.txt").write_text("\n".join(sentences) + "\n")
    config = lm.LanguageModelConfig(corpus="toy", order=2, **cfg)
    lm.build(config, LETTERS, tmp_path / "lm", [tmp_path / "corpus.txt"])
    return lm.LanguageModel(tmp_path / "lm", LETTERS)


def test_beam_search_keeps_to_the_lexicon_where_greedy_misspells(tmp_path):
    from d2v.data.tokenizer import LetterTokenizer
    from d2v.eval.metrics import ctc_greedy

    greedy = LetterTokenizer(LETTERS).decode(ctc_greedy(CAX_OR_CAT[None])[0])
    assert greedy == "CAX"
    model = built(tmp_path, ["CAT SAT", "SAT CAT", "CAT"])
    assert model.meta["ngrams"] == [5, 6] and model.meta["lexicon_words"] == 2
    assert model.decode([CAX_OR_CAT], lm_weight=1.0, word_score=0.0) == ["CAT"]
    assert model.decode([CAX_OR_CAT * 2 + 5.0], lm_weight=1.0, word_score=0.0) == ["CAT"]  # logits, not log-probs
    two_words = np.concatenate([CAX_OR_CAT, emissions([{"|": 0.9}, {"S": 0.9}, {"A": 0.9}, {"T": 0.9}])])
    assert model.decode([two_words], lm_weight=1.0, word_score=0.0) == ["CAT SAT"]
    with pytest.raises(ValueError, match=r"logits of shape \(6, 3\); expected \(frames, 7 letters\)"):
        model.decode([CAX_OR_CAT[:, :3]], 1.0, 0.0)


def test_tuning_chooses_the_lm_weight_that_decodes_dev_best(tmp_path):
    # CAX is a word too, but a rare one: only the language model prefers CAT to what the acoustics say
    model = built(tmp_path, ["CAT"] * 20 + ["CAX"], lm_weights=(0.0, 2.0), word_scores=(0.0, 1.0))
    assert model.decode([CAX_OR_CAT], lm_weight=0.0, word_score=0.0) == ["CAX"]
    assert model.decode([CAX_OR_CAT], lm_weight=2.0, word_score=0.0) == ["CAT"]
    tuned = model.tune([CAX_OR_CAT] * 3, ["CAT"] * 3)
    assert (tuned["lm_weight"], tuned["n"], len(tuned["grid"])) == (2.0, 3, 4)
    assert [g["wer"] for g in tuned["grid"] if g["lm_weight"] == 0.0] == [1.0, 1.0]
    assert min(g["wer"] for g in tuned["grid"]) == 0.0
    limited = lm.LanguageModel(tmp_path / "lm", LETTERS)
    limited.cfg = limited.cfg.model_copy(update={"tune_limit": 1, "tune_beam": 5})
    assert (limited.tune([CAX_OR_CAT] * 3, ["CAT"] * 3)["n"], limited.tune([CAX_OR_CAT], ["CAT"])["beam"]) == (1, 5)


def search_tagged_with_its_process(emissions: np.ndarray, search=lm._search_in_worker) -> str:
    time.sleep(0.05)  # long enough that no one worker takes every utterance before the others start
    return f"{search(emissions)}@{os.getpid()}"


def die_in_worker(emissions: np.ndarray) -> str:
    os._exit(3)  # as a crash in the C++ search would


def noisy_utterances(n: int, seed: int = 1) -> list[np.ndarray]:
    """Noisy spellings of random words and word pairs: the lexicon decides, not greedy reading."""
    rng = np.random.default_rng(seed)
    letters = [s for s in LETTERS if s not in ("<blank>", "|")]
    utterances = []
    for _ in range(n):
        text = " ".join(rng.choice(["CAT", "SAT", "TAX", "ACTS", "SCAT"], size=rng.integers(1, 3)))
        frames = [{(c if c != " " else "|"): 0.6, str(rng.choice(letters)): 0.3} if c != " " else {"|": 0.9}
                  for c in text for c in (c, "<blank>")]
        utterances.append(emissions(frames))
    return utterances


def test_the_search_decodes_what_torchaudios_ctc_decoder_does_from_one_trie(tmp_path):
    import torch
    from torchaudio.models.decoder import ctc_decoder

    model = built(tmp_path, random_corpus(40), beam=8, beam_threshold=10.0)
    utterances = noisy_utterances(12, seed=2)
    decoded = {}
    for lm_weight, word_score in [(0.0, 0.0), (1.0, 0.0), (3.0, -2.0), (0.5, 3.0)]:
        reference = ctc_decoder(lexicon=str(model.folder / lm.LEXICON), tokens=LETTERS, lm=str(model.arpa),
                                lm_dict=str(model.folder / lm.WORDS), beam_size=8, beam_threshold=10.0,
                                lm_weight=lm_weight, word_score=word_score, blank_token="<blank>", sil_token="|",
                                unk_word=lm.UNK)
        expected = [" ".join(reference(torch.from_numpy(model._emissions(u))[None])[0][0].words) for u in utterances]
        decoded[lm_weight, word_score] = model.decode(utterances, lm_weight, word_score)
        assert decoded[lm_weight, word_score] == expected
    assert len({tuple(words) for words in decoded.values()}) >= 3  # the weights change what is decoded
    assert model.decoder(1.0, 0.0).keep_alive[0] is model.decoder(2.0, 1.0).keep_alive[0]  # one trie for all
    with pytest.raises(ValueError, match="expected C-contiguous float32"):
        model.decoder(1.0, 0.0).best_words(model._emissions(utterances[0]).astype(np.float64))


def test_worker_processes_decode_the_words_one_process_does(tmp_path, monkeypatch):
    model = built(tmp_path, random_corpus(40))
    utterances = noisy_utterances(9)
    one = model.decode(utterances, lm_weight=1.0, word_score=0.0)
    assert len(set(one)) > 3 and all(one)  # different words per utterance, none lost

    monkeypatch.setattr(lm, "_search_in_worker", search_tagged_with_its_process)
    monkeypatch.setattr(lm, "usable_cpus", lambda: 4)  # whatever this machine has
    pooled = lm.LanguageModel(tmp_path / "lm", LETTERS, workers=3).decode(utterances, lm_weight=1.0, word_score=0.0)
    words, pids = zip(*(r.rsplit("@", 1) for r in pooled))
    assert list(words) == one  # the same words, in the same order
    assert len(set(pids)) >= 2 and str(os.getpid()) not in pids  # searched in parallel, none in this process
    with pytest.raises(ValueError, match=r"logits of shape \(6, 3\)"):  # checked here, before any fork
        lm.LanguageModel(tmp_path / "lm", LETTERS, workers=2).decode([CAX_OR_CAT, CAX_OR_CAT[:, :3]], 1.0, 0.0)
    with pytest.raises(ValueError, match="decode workers: 0"):
        lm.LanguageModel(tmp_path / "lm", LETTERS, workers=0)
    from concurrent.futures.process import BrokenProcessPool

    monkeypatch.setattr(lm, "_search_in_worker", die_in_worker)
    with pytest.raises(BrokenProcessPool):  # an error, not a wait for results that never come
        lm.LanguageModel(tmp_path / "lm", LETTERS, workers=2).decode(utterances, lm_weight=1.0, word_score=0.0)


def test_a_given_arpa_file_gzipped_decodes_like_the_one_built(tmp_path):
    model = lm.kneser_ney(["CAT SAT", "SAT CAT", "CAT"], order=2)
    lm.write_arpa(model, tmp_path / "plain.arpa")
    with gzip.open(tmp_path / "given.arpa.gz", "wt") as f:
        f.write((tmp_path / "plain.arpa").read_text())
    cfg = lm.LanguageModelConfig(arpa=str(tmp_path / "given.arpa.gz"))
    meta = lm.build(cfg, LETTERS, tmp_path / "lm")
    assert meta["arpa"] == str((tmp_path / "given.arpa.gz").resolve()) and not (tmp_path / "lm" / lm.ARPA).exists()
    given = lm.LanguageModel(tmp_path / "lm", LETTERS)
    assert given.decode([CAX_OR_CAT], 1.0, 0.0) == ["CAT"]


def test_built_models_move_with_their_folder(tmp_path):
    built(tmp_path, ["CAT SAT"])
    (tmp_path / "lm").rename(tmp_path / "moved")
    assert lm.LanguageModel(tmp_path / "moved", LETTERS).decode([CAX_OR_CAT], 1.0, 0.0) == ["CAT"]


@pytest.mark.parametrize("split, expected", [("dev_clean", "dev_clean"), ("test_other", "dev_other"),
                                             ("test-clean", "dev-clean"), ("real_speech/test_cards", "dev_clean"),
                                             ("test_noisy", "dev_clean")])
def test_each_split_is_decoded_with_the_weights_of_its_own_dev_split(split, expected):
    tests = ("dev_clean", "dev_other", "test_clean", "test_other", "dev-clean", "test-clean")
    assert lm.tuning_split(split, tests, "dev_clean") == expected


def test_bad_language_models_and_configs_are_named(tmp_path):
    with pytest.raises(ValueError, match="give exactly one of `corpus`"):
        lm.LanguageModelConfig()
    with pytest.raises(ValueError, match="give exactly one of `corpus`"):
        lm.LanguageModelConfig(corpus="a", arpa="b")
    with pytest.raises(FileNotFoundError, match="no language model here"):
        lm.LanguageModel(tmp_path, LETTERS)
    with pytest.raises(FileNotFoundError, match="lm.arpa: .*missing.arpa does not exist"):
        lm.build(lm.LanguageModelConfig(arpa=str(tmp_path / "missing.arpa")), LETTERS, tmp_path / "lm")
    with pytest.raises(FileNotFoundError, match=r"lm.corpus: missing \["):
        lm.build(lm.LanguageModelConfig(corpus="c"), LETTERS, tmp_path / "lm", [tmp_path / "none.txt"])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="language model corpus is empty"):
        lm.build(lm.LanguageModelConfig(corpus="c"), LETTERS, tmp_path / "lm", [tmp_path / "empty.txt"])
    (tmp_path / "notes.arpa").write_text("just some text\n")
    with pytest.raises(ValueError, match=r"notes.arpa: no \\1-grams: section"):
        lm.read_arpa_vocabulary(tmp_path / "notes.arpa")
    built(tmp_path, ["CAT"])
    with pytest.raises(ValueError, match=r"its lexicon is spelled with the letters \['<blank>', '\|', 'A', 'C'"):
        lm.LanguageModel(tmp_path / "lm", LETTERS[:-1])
    (tmp_path / "lm" / lm.LEXICON).unlink()
    with pytest.raises(FileNotFoundError, match="lexicon.txt: part of the language model"):
        lm.LanguageModel(tmp_path / "lm", LETTERS)
    with pytest.raises(ValueError, match="test_x: no dev split to choose the LM weight"):
        lm.tuning_split("test_x", ("test_x",), None)


def test_the_estimate_is_deterministic_and_orders_are_nested():
    corpus = random_corpus(40, seed=3)
    low, high = lm.kneser_ney(corpus, 2), lm.kneser_ney(corpus, 3)
    assert lm.kneser_ney(corpus, 3) == high
    assert set(low[1]) == set(high[1]) and set(low[0]) == set(high[0])
    # the same words and bigrams, but at order 3 the bigrams are continuation counts: other probabilities
    assert any(not math.isclose(low[1][g][0], high[1][g][0]) for g in itertools.islice(low[1], 50))
