"""Does pretraining on the embedded corpus teach which words are alike? A diagnostic for issue 4's text rows, with no
training at all: the human ratings of WordSim-353 (relatedness: tiger–cat) and SimLex-999 (similarity: happy–glad;
related but unlike pairs such as old–new score low), both in the gensim wheel the Lee task comes from, against the
cosine of word vectors.

- Encoders (a seeded random init, and the student and EMA teacher of each `--pretrained` checkpoint): each word is
  encoded alone as `<s> pieces </s>`, and its vector at each layer (the embedding layer first) is the mean over its
  pieces; `table` is the mean of its pieces' rows of the token-embedding table, without positions or LayerNorm.
- What the corpus itself offers: count-based word vectors of the same pretraining corpus, with no network (positive
  PMI of co-occurrences within a window, context-distribution smoothing α 0.75, truncated SVD; Levy, Goldberg and
  Dagan 2015), scored on the pairs whose words occur at least `--min-count` times.

Each score is the Spearman correlation between cosines and ratings, raw and with the vectors centred on the mean
of the set's words (transformer states share a direction that pushes every raw cosine towards 1).

    python bench/word_similarity.py --pretrained v1=runs/bench/pretrain/text/final.pt
        --pretrained v2=runs/bench-text-v2-2400/pretrain/text-v2/final.pt [--out results/bench/word_similarity_cpu.json]

Issue 6's time-to-accuracy where text's fine-tuned one is undefined (v1's pretrained text encoder fine-tunes below
scratch): `--reference v1` adds `time_to_reference`, for each other checkpoint whether its best layer (and its token
table) rates WordSim's pairs as well as the reference's does, and the ratio of their pretraining times (each run's
summary.json, or `--seconds LABEL=S` where a run was timed beside other jobs).
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from count_embeddings import ppmi_vectors
from feature_probe import load_encoders

from d2v.data.loaders import pad_tokens
from d2v.data.manifest import read_manifest
from d2v.data.sources import Context
from d2v.data.sources.text import SIMLEX, WORDSIM, word_pairs
from d2v.data.tokenizer import TextTokenizer
from d2v.eval.metrics import spearman
from d2v.io import atomic_write_json, read_torch

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
SETS = {"wordsim353": WORDSIM, "simlex999": SIMLEX}
TIMED_SET = "wordsim353"  # what pretraining learns of the two (relatedness); SimLex stays at a random encoder's level


def corpus_words(corpus_dir: Path) -> list[list[str]]:
    """The lower-cased words of each document of a prepared text corpus (its manifest's pretraining rows)."""
    manifest = read_manifest(corpus_dir, "pretrain")
    return [WORD.findall((corpus_dir / path).read_text(encoding="utf-8").lower()) for path in manifest["path"]]


def word_vectors(documents: list[list[str]], dim: int, window: int, min_count: int) -> dict[str, np.ndarray]:
    """Count-based vectors (`count_embeddings.ppmi_vectors`) of the words that occur at least `min_count` times."""
    counts = Counter(w for words in documents for w in words)
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in counts.items() if c >= min_count))}
    sequences = [np.array([vocab.get(w, -1) for w in words], dtype=np.int64) for words in documents]
    vectors, _ = ppmi_vectors(sequences, len(vocab), dim, window)
    return {w: vectors[i] for w, i in vocab.items()}


@torch.no_grad()
def encoder_word_vectors(encoder, tokenizer: TextTokenizer, words: list[str]) -> dict[str, list[np.ndarray]]:
    """Each word alone through the encoder: per layer (embeddings first) the mean of its pieces' states, and the
    mean of its pieces' rows of the token-embedding table."""
    encoder.eval()
    ids = [torch.as_tensor(tokenizer.encode(w)) for w in words]
    batch = pad_tokens([(x, 0.0) for x in ids], tokenizer.pad)["batch"]
    out = encoder.encode(encoder.embed(batch.source, batch.padding_mask), None)
    pieces = torch.zeros(batch.source.shape, dtype=torch.bool)
    for row, x in enumerate(ids):
        pieces[row, 1:len(x) - 1] = True  # between <s> and </s>
    weights = pieces.unsqueeze(-1).float() / pieces.sum(1, keepdim=True).unsqueeze(-1)
    table = encoder.embed_tokens.weight[batch.source]
    return {"table": [(table * weights).sum(1).numpy()],
            "layers": [(h * weights).sum(1).numpy() for h in out.hidden_states]}


def pair_cosines(vectors: np.ndarray, index: dict[str, int], pairs: list[tuple[str, str, float]],
                 centred: bool) -> np.ndarray:
    """The cosine of each pair's vectors (rows of `vectors` by `index`), the rows centred on their mean first or not."""
    v = vectors - vectors.mean(0) if centred else vectors
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return (v[[index[a] for a, _, _ in pairs]] * v[[index[b] for _, b, _ in pairs]]).sum(1)


def agreement(vectors: np.ndarray, index: dict[str, int], pairs: list[tuple[str, str, float]]) -> dict[str, float]:
    """Spearman between the cosines of each pair's vectors and its rating, raw and with the vectors centred on the
    mean of the rows."""
    ratings = [r for _, _, r in pairs]
    return {kind: round(spearman(pair_cosines(vectors, index, pairs, centred), ratings), 4)
            for kind, centred in (("spearman", False), ("centred_spearman", True))}


def score_encoder(encoder, tokenizer: TextTokenizer, sets: dict, covered: dict) -> tuple[dict, dict]:
    """Per set: the table's and each layer's agreement over all pairs and over the pairs the counts cover; and the
    centred cosines over all pairs behind them (for `paired_interval`)."""
    report, cosines = {}, {}
    for name, pairs in sets.items():
        words = sorted({w for a, b, _ in pairs for w in (a, b)})
        index = {w: i for i, w in enumerate(words)}
        vectors = encoder_word_vectors(encoder, tokenizer, words)
        report[name] = {kind: [{"all": agreement(v, index, pairs), "covered": agreement(v, index, covered[name])}
                               for v in layers] for kind, layers in vectors.items()}
        cosines[name] = {kind: [pair_cosines(v, index, pairs, centred=True) for v in layers]
                         for kind, layers in vectors.items()}
    return report, cosines


def paired_interval(own: np.ndarray, goal: np.ndarray, ratings: np.ndarray, draws: int = 2000,
                    seed: int = 0) -> list[float]:
    """The 95 % bootstrap interval of spearman(own) - spearman(goal): the pairs resampled with replacement, one
    resample for both, so what the two encoders share of the set's hard pairs cancels."""
    rng = np.random.default_rng(seed)
    gains = []
    for _ in range(draws):
        i = rng.integers(0, len(ratings), len(ratings))
        gains.append(spearman(own[i], ratings[i]) - spearman(goal[i], ratings[i]))
    return [round(float(q), 4) for q in np.percentile(gains, [2.5, 97.5])]


def best_layer(entry: dict, set_name: str) -> int:
    """The layer of an encoder's scores that agrees best with `set_name` (centred Spearman over all pairs)."""
    return int(np.argmax([r["all"]["centred_spearman"] for r in entry[set_name]["layers"]]))


def summary_scores(entry: dict, set_name: str) -> dict[str, float]:
    """An encoder's best layer and its token table, centred Spearman over all of `set_name`'s pairs."""
    scores = entry[set_name]
    return {"best_layer": scores["layers"][best_layer(entry, set_name)]["all"]["centred_spearman"],
            "table": scores["table"][0]["all"]["centred_spearman"]}


def time_to_reference(encoders: dict, reference: str, seconds: dict[str, float], set_name: str = "wordsim353",
                      cosines: dict | None = None, ratings: np.ndarray | None = None) -> dict:
    """For each encoder of another checkpoint (`LABEL/NAME`), whether its best layer and its token table agree with
    `set_name`'s ratings (centred Spearman over all pairs) at least as well as the reference checkpoint's encoder of
    the same NAME, and the reference's pretraining seconds over its own (above 1: it got there sooner); given each
    encoder's `cosines` of those pairs ({"best_layer": ..., "table": ...}) and the `ratings`, the paired bootstrap
    interval of each gain. Checkpoints with no pretraining time (count vectors) are left out."""
    if not any(key.startswith(f"{reference}/") for key in encoders):
        raise SystemExit(f"--reference {reference}: not the NAME of a --pretrained checkpoint")
    if reference not in seconds:
        raise SystemExit(f"--reference {reference}: no pretraining time for it (no summary.json beside its checkpoint; "
                         "pass --seconds)")
    rows = []
    for key, entry in encoders.items():
        label, _, name = key.partition("/")
        target = encoders.get(f"{reference}/{name}")
        if label == reference or target is None or label not in seconds:
            continue
        own, goal = summary_scores(entry, set_name), summary_scores(target, set_name)
        row = {"encoder": key, "steps": entry["steps"], "pretrain_seconds": seconds[label]}
        for kind in own:
            row.update({kind: own[kind], f"reference_{kind}": goal[kind], f"reaches_{kind}": own[kind] >= goal[kind]})
            if cosines is not None:
                row[f"{kind}_gain_interval"] = paired_interval(cosines[key][kind], cosines[f"{reference}/{name}"][kind],
                                                               ratings)
        rows.append({**row, "speedup": round(seconds[reference] / seconds[label], 3)})
    return {"reference": reference, "reference_seconds": seconds[reference], "set": set_name,
            "score": "centred Spearman over all pairs", "rows": rows}


def pretrain_seconds(checkpoint: str) -> float | None:
    """The training time the pretraining run recorded beside its final.pt (summary.json), if any."""
    summary = Path(checkpoint).parent / "summary.json"
    return json.loads(summary.read_text()).get("seconds") if summary.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained", action="append", default=[], metavar="NAME=PATH",
                        help="a pretraining's final.pt, named (repeatable)")
    parser.add_argument("--encoders", default="student,teacher",
                        help="of each checkpoint; a random init is scored once")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--tokenizer", default=None, help="default: the data root's tokenizer/spm.model")
    parser.add_argument("--dim", type=int, default=300)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference", default=None, help="a --pretrained NAME: time-to-reference rows against it")
    parser.add_argument("--seconds", action="append", default=[], metavar="NAME=S",
                        help="a checkpoint's pretraining time, instead of its run's summary.json")
    parser.add_argument("--out", type=Path, default=Path("results/bench/word_similarity_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = Path(args.data_root)
    sets = {name: word_pairs(Context(root / "cache", root / "raw" / "word_similarity"), member)
            for name, member in SETS.items()}
    documents = corpus_words(root / "raw" / "text_corpus")
    counts = word_vectors(documents, args.dim, args.window, args.min_count)
    covered = {name: [p for p in pairs if p[0] in counts and p[1] in counts] for name, pairs in sets.items()}
    report = {"benchmark": "word_similarity", "corpus_words": sum(map(len, documents)), "machine": platform.machine(),
              "sets": {name: {"pairs": len(pairs), "covered_pairs": len(covered[name])}
                       for name, pairs in sets.items()},
              "counts": {"method": f"PPMI (window {args.window}, α 0.75, min count {args.min_count}) + SVD {args.dim}",
                         "vocabulary": len(counts)}, "encoders": {}}
    for name, pairs in covered.items():
        words = sorted({w for a, b, _ in pairs for w in (a, b)})
        report["counts"][name] = agreement(np.stack([counts[w] for w in words]),
                                           {w: i for i, w in enumerate(words)}, pairs)
    print(f"counts: {report['counts']}", flush=True)
    tokenizer = TextTokenizer(args.tokenizer or root / "tokenizer" / "spm.model")
    all_words = sorted({w for pairs in sets.values() for a, b, _ in pairs for w in (a, b)})
    report["single_piece_words"] = round(float(np.mean([len(tokenizer.encode(w)) == 3 for w in all_words])), 4)
    given = {label: float(value) for label, _, value in (s.partition("=") for s in args.seconds)}
    seconds, picked = dict(given), {}
    for i, spec in enumerate(args.pretrained):
        label, _, path = spec.partition("=")
        state = read_torch(path)
        if label not in seconds and (recorded := pretrain_seconds(path)) is not None:
            seconds[label] = recorded
        names = (["random"] if i == 0 else []) + args.encoders.split(",")
        for name, encoder in load_encoders("text", state, names):
            key = name if name == "random" else f"{label}/{name}"
            scores, cosines = score_encoder(encoder, tokenizer, sets, covered)
            report["encoders"][key] = {"checkpoint": None if name == "random" else path,
                                       "steps": 0 if name == "random" else state.get("steps"),
                                       "objective": state.get("objective", "v1"), **scores}
            layer = best_layer(scores, TIMED_SET)
            picked[key] = {"best_layer": cosines[TIMED_SET]["layers"][layer], "table": cosines[TIMED_SET]["table"][0]}
            best = {s: summary_scores(scores, s)["best_layer"] for s in sets}
            print(f"{key:16s} best layer, centred Spearman over all pairs: {best}", flush=True)
    if args.reference:
        ratings = np.array([r for _, _, r in sets[TIMED_SET]])
        report["time_to_reference"] = {**time_to_reference(report["encoders"], args.reference, seconds, TIMED_SET,
                                                           picked, ratings),
                                       "seconds_given": given,  # instead of the runs' own records
                                       # is the reference's score above a random encoder's beyond the pairs' noise?
                                       "reference_gain_over_random": {
                                           kind: paired_interval(picked[f"{args.reference}/student"][kind],
                                                                 picked["random"][kind], ratings)
                                           for kind in ("best_layer", "table")}}
        for row in report["time_to_reference"]["rows"]:
            print(f"{row['encoder']:20s} best layer {row['best_layer']:.3f} (reference "
                  f"{row['reference_best_layer']:.3f}), table {row['table']:.3f} ({row['reference_table']:.3f}), "
                  f"time ratio {row['speedup']}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, report)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
