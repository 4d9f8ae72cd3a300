"""Do the beam-search workers share the parent's KenLM pages, or does each end up with a copy?

`LanguageModel.decode` loads KenLM before it forks its workers (`d2v.processes.forked_pool`), so that the paper
profiles' 1.4 GB `4-gram.arpa.gz` is in memory once. This estimates a word 4-gram from a synthetic corpus (Zipfian
words of random letters, enough sentences for an ARPA file of a few hundred MB), loads it in the parent, forks the
workers, lets each beam-search random emissions through it, and reads `/proc/self/smaps`: the parent notes the new
anonymous mappings that hold KenLM's tables, and each worker reports how much of them it holds as a private copy
after searching (copy-on-write: 0 when every page stays shared). Two ways of giving the workers a decoder are
compared by each worker's private memory from fork to the end of its search: each building its own (its own lexicon
trie), and inheriting the one the parent built before the fork, as `LanguageModel.decode` does. The n-grams are
estimated in a child process, whose Python heap the workers must not inherit.

    python bench/lm_fork_memory.py [--sentences 300000] [--workers 2] [--out results/bench/lm_fork_memory_cpu.json]
"""
from __future__ import annotations

import argparse
import string
import tempfile
import time
from pathlib import Path

import numpy as np

from d2v.eval import lm as lm_module
from d2v.io import atomic_write_json
from d2v.processes import forked_pool, usable_cpus

LETTERS = ["<blank>", "|", *string.ascii_uppercase, "'"]


def split(fields: dict[str, int]) -> dict[str, int]:
    """smaps fields (kB) → resident, shared with another process, private (this process's own)."""
    return {"rss": fields.get("Rss", 0), "shared": fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0),
            "private": fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)}


def memory_kb() -> dict[str, int]:
    """This process's resident memory split as smaps_rollup reports it (kB)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":")
        fields[key] = int(value.split()[0])
    return {**split(fields), "pss": fields["Pss"]}


def corpus(path: Path, sentences: int, vocab: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, vocab)
    words = np.array(["".join(rng.choice(list(string.ascii_uppercase), n)) for n in lengths])
    ranks = np.minimum(rng.zipf(1.2, size=sentences * 12), vocab) - 1
    lines, k = [], 0
    for n in rng.integers(6, 18, sentences):
        lines.append(" ".join(words[ranks[k:k + n]]))
        k += n
    path.write_text("\n".join(lines) + "\n")
    return path


def mappings() -> dict[tuple[int, int], dict[str, int]]:
    """Each anonymous mapping of this process (address range; where malloc and KenLM put large tables) with its
    smaps fields in kB. Mappings of files (shared libraries) are left out."""
    out, current = {}, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if "-" in parts[0] and not parts[0].endswith(":"):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            anonymous = len(parts) == 5 or parts[5] == "[heap]"
            current = out.setdefault((lo, hi), {}) if anonymous else None
        elif current is not None and len(parts) == 3 and parts[2] == "kB":
            current[parts[0].rstrip(":")] = int(parts[1])
    return out


def new_ranges(before: dict, after: dict, min_kb: int = 1024) -> list[tuple[int, int]]:
    """Mappings that appeared or grew between two snapshots (KenLM's tables: large anonymous mappings)."""
    return [r for r, f in after.items() if r not in before and f.get("Rss", 0) >= min_kb]


def in_ranges(ranges: list[tuple[int, int]]) -> dict[str, int]:
    """This process's memory inside `ranges` (kB): resident, shared with the parent, private (copied)."""
    inside = [split(f) for (lo, hi), f in mappings().items() if any(lo < r_hi and r_lo < hi for r_lo, r_hi in ranges)]
    return {key: sum(m[key] for m in inside) for key in ("rss", "shared", "private")}


_AT_FORK: dict = {}  # a worker's memory as forked, before it has a decoder
_KENLM_RANGES: list = []  # where the parent's KenLM tables are (the same addresses in a forked worker)


def own_decoder(model, *args) -> None:
    """The decode workers before 2026-12-02: each built its decoder (its own lexicon trie) over the shared KenLM."""
    _AT_FORK.update(memory_kb())
    lm_module._use_search(model.decoder(*args))


def inherited_decoder(search) -> None:
    """`LanguageModel.decode` now: the parent builds the decoder before the fork, and the workers share it."""
    _AT_FORK.update(memory_kb())
    lm_module._use_search(search)


def search_and_measure(emissions: list[np.ndarray]) -> dict:
    """In a worker: its memory as forked and after beam-searching `emissions`, and its copy of KenLM's tables."""
    start = time.perf_counter()
    for e in emissions:
        lm_module._search_in_worker(e)
    return {"forked": dict(_AT_FORK), "after_search": memory_kb(), "kenlm_tables": in_ranges(_KENLM_RANGES),
            "search_seconds": time.perf_counter() - start}


def build_lm(folder: Path, sentences: int, vocab: int) -> tuple[dict, float]:
    """Estimate the 4-gram (in a child process: its Python heap of n-gram dicts must not sit in the parent, where
    the workers would inherit it and blur what KenLM costs them)."""
    start = time.perf_counter()
    cfg = lm_module.LanguageModelConfig(corpus="synthetic", beam=50)
    meta = lm_module.build(cfg, LETTERS, folder, [corpus(folder.parent / "corpus.txt", sentences, vocab)])
    return meta, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=300_000)
    parser.add_argument("--vocab", type=int, default=60_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/bench/lm_fork_memory_cpu.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with forked_pool(1) as pool:
            meta, build_seconds = pool.submit(build_lm, tmp / "lm", args.sentences, args.vocab).result()
        arpa_mb = (tmp / "lm" / lm_module.ARPA).stat().st_size / 1e6
        model = lm_module.LanguageModel(tmp / "lm", LETTERS, workers=args.workers)
        before, maps = memory_kb(), mappings()
        model._kenlm  # noqa: B018  (what decode loads before it forks)
        loaded = memory_kb()
        _KENLM_RANGES[:] = new_ranges(maps, mappings())
        parent_tables = in_ranges(_KENLM_RANGES)
        kenlm_kb = loaded["rss"] - before["rss"]
        rng = np.random.default_rng(0)
        emissions = [model._emissions(rng.standard_normal((200, len(LETTERS))).astype(np.float32))
                     for _ in range(4 * args.workers)]
        parts = [emissions[k::args.workers] for k in range(args.workers)]
        with forked_pool(args.workers, own_decoder, (model, 1.0, 0.0, 50)) as pool:
            own = list(pool.map(search_and_measure, parts))
        search = model.decoder(1.0, 0.0, 50)
        with forked_pool(args.workers, inherited_decoder, (search,)) as pool:
            inherited = list(pool.map(search_and_measure, parts))
    growth = lambda w: (w["after_search"]["private"] - w["forked"]["private"]) / 1024  # noqa: E731
    report = {"benchmark": "lm_fork_memory", "sentences": args.sentences, "ngrams": meta["ngrams"],
              "lexicon_words": meta["lexicon_words"], "arpa_mb": arpa_mb, "build_seconds": build_seconds,
              "kenlm_rss_mb": kenlm_kb / 1024, "kenlm_tables_in_parent_kb": parent_tables,
              "parent_after_load_kb": loaded, "usable_cpus": usable_cpus(),
              "workers_own_decoder": own, "workers_inherited_decoder": inherited,
              # at most this part of KenLM's tables is a worker's own copy after searching (0: all shared; an upper
              # bound: the mappings that hold the tables may hold the worker's own allocations too)
              "kenlm_copied": [w["kenlm_tables"]["private"] / max(1, parent_tables["rss"]) for w in own + inherited],
              "private_growth_mb": {"own_decoder": [growth(w) for w in own],
                                    "inherited_decoder": [growth(w) for w in inherited]}}
    atomic_write_json(args.out, report)
    print(f"ARPA {arpa_mb:.0f} MB ({sum(meta['ngrams']):,} n-grams, {meta['lexicon_words']:,} words), KenLM "
          f"{kenlm_kb / 1024:.0f} MB in the parent; its tables: {parent_tables['rss'] / 1024:.0f} MB resident")
    for name, rows in (("own decoder", own), ("inherited decoder", inherited)):
        for k, w in enumerate(rows):
            print(f"{name}, worker {k}: private memory +{growth(w):.0f} MB from fork to the end of its search, at "
                  f"most {w['kenlm_tables']['private'] / 1024:.1f} MB of KenLM's tables copied")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
