"""Where is the downstream signal? Frozen features of every layer of an encoder (random init, the pretrained
student, the pretrained EMA teacher), scored by a linear probe on a labeled task. A diagnostic for issue 4: it
separates "pretraining learned nothing useful" from "fine-tuning cannot use it".

- Classification: features mean-pooled over tokens/patches, a logistic-regression probe (scikit-learn); for text
  also a bag-of-pieces probe on the same token ids as a no-learning reference, and each layer's token-level variance
  split into the share explained by the position alone and by the token id alone (a drift towards position is what
  the embedded text runs show; see `variance_shares`).
- Speech recognition (CTC tasks): the frame features of every layer are cached once and a linear CTC head per layer
  is trained on them (Adam, features standardised), then decoded greedily on the dev split: CER and WER. Frozen
  features make this far cheaper than fine-tuning, so a CPU can ask whether pretraining put letters within a
  linear read-out of the frames.
- Similarity (lee_sts): zero-shot, the cosine of two documents' mean-pooled features against the human rating over
  all 1,225 document pairs; no training, so far less noisy than fine-tuning on 435 pairs and testing on 45.

    python bench/feature_probe.py --task rt_polarity --pretrained runs/bench/pretrain/text/final.pt
        [--train 4000] [--out results/bench/feature_probe_rt_polarity.json]
    python bench/feature_probe.py --task lee_sts --pretrained runs/bench/pretrain/text/final.pt  # zero-shot
    python bench/feature_probe.py --task speech_1h --pretrained runs/bench/pretrain/speech/final.pt
        [--train 800] [--ctc-epochs 60]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from d2v.data.loaders import pad_tokens
from d2v.data.sources import Context
from d2v.data.sources.text import lee_documents
from d2v.data.tokenizer import LetterTokenizer, TextTokenizer
from d2v.eval.linear_ctc import fit_linear_ctc
from d2v.eval.metrics import cer, pearson, spearman, wer
from d2v.io import atomic_write_json, read_torch
from d2v.modalities.base import Batch
from d2v.modalities.registry import build_encoder
from d2v.train.task_data import as_inputs, loader
from d2v.train.tasks import TASKS, finetune_config


@torch.no_grad()
def pooled_layers(encoder, batch: Batch, pool: str = "mean") -> list[np.ndarray]:
    """Every layer's hidden states (embeddings first), mean-pooled over the unpadded tokens of each example, or
    (`first`) the first token's state: text's <s>, which the fine-tuning head reads."""
    out = encoder.encode(encoder.embed(batch.source, batch.padding_mask), None)
    if pool == "first":
        return [h[:, 0].numpy() for h in out.hidden_states]
    keep = torch.ones(out.x.shape[:2], dtype=torch.bool)
    if out.padding_mask is not None:
        keep[:, out.num_extra_tokens:] = ~out.padding_mask
    w = keep.unsqueeze(-1).float()
    return [((h * w).sum(1) / w.sum(1)).numpy() for h in out.hidden_states]


@torch.no_grad()
def layer_features(encoder, cfg, split: str, limit: int, pool: str = "mean") -> tuple[list[np.ndarray], np.ndarray,
                                                                                    list[list[int]]]:
    """Pooled hidden states of every layer (embeddings first), labels, and the token ids (text)."""
    encoder.eval()
    chunks, labels, tokens = [], [], []
    for item in loader(cfg, split, train=False):
        inputs = as_inputs(item, TASKS[cfg.task].modality, torch.device("cpu"))
        batch = inputs["batch"]
        chunks.append(pooled_layers(encoder, batch, pool))
        labels += inputs["labels"].tolist()
        if batch.source.dtype == torch.long:
            tokens += [row[~m].tolist() for row, m in zip(batch.source, batch.padding_mask if batch.padding_mask
                                                           is not None else torch.zeros_like(batch.source).bool())]
        if len(labels) >= limit:
            break
    n = min(limit, len(labels))
    feats = [np.concatenate(layer)[:n] for layer in zip(*chunks)]
    return feats, np.array(labels[:n]), tokens[:n]


def batches_of(cfg, split: str, limit: int):
    """The split's evaluation batches (as model inputs on the CPU) until `limit` examples."""
    seen = 0
    for item in loader(cfg, split, train=False):
        batch = as_inputs(item, TASKS[cfg.task].modality, torch.device("cpu"))["batch"]
        yield batch
        seen += len(batch.source)
        if seen >= limit:
            return


@torch.no_grad()
def variance_shares(encoder, cfg, split: str, limit: int = 512) -> list[dict[str, float]]:
    """Per layer (embeddings first): the fraction of the variance of the unpadded token states that the mean state
    at each position explains, and the fraction that the mean state of each token id explains. A random encoder
    sits near the same shares at every layer; a layer whose position share grows while its token share shrinks has
    drifted towards encoding where a token is rather than what it is. Ids seen once explain their own variance, so
    the token share is inflated in absolute terms: compare encoders, not numbers. `first`: the variance of the first
    token's state (<s>, what the fine-tuning head reads) across examples, as a fraction of the variance of all
    token states: near 0, the head reads nearly the same vector whatever the sentence."""
    encoder.eval()
    states, positions, ids = None, [], []
    for batch in batches_of(cfg, split, limit):
        out = encoder.encode(encoder.embed(batch.source, batch.padding_mask), None)
        keep = ~batch.padding_mask if batch.padding_mask is not None else torch.ones_like(batch.source, dtype=bool)
        layers = [h[:, out.num_extra_tokens:][keep].double().numpy() for h in out.hidden_states]
        states = layers if states is None else [np.concatenate(pair) for pair in zip(states, layers)]
        positions.append(torch.arange(batch.source.shape[1]).expand_as(batch.source)[keep].numpy())
        ids.append(batch.source[keep].numpy())
    positions, ids = np.concatenate(positions), np.concatenate(ids)

    def explained(h: np.ndarray, groups: np.ndarray) -> float:
        _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        means = np.zeros((len(counts), h.shape[1]))
        np.add.at(means, inverse, h)
        means /= counts[:, None]
        return float(means[inverse].var(0).sum() / h.var(0).sum())

    return [{"position": round(explained(h, positions), 4), "token": round(explained(h, ids), 4),
             "first": round(float(h[positions == 0].var(0).sum() / h.var(0).sum()), 4)} for h in states]


@torch.no_grad()
def attention_reach(encoder, batches) -> list[dict[str, float]]:
    """Per block: how far attention reaches, in tokens, averaged over heads, over each example's unpadded queries
    (`all`) and for its first token's query (`first`, <s>: what the fine-tuning head reads), next to the same means
    under uniform attention over the unpadded keys (`uniform_all`, `uniform_first`). A block that attends by position
    reaches a few tokens; one that has learned nothing about where to attend sits at the uniform reach."""
    from d2v.nn.attention import Attention, _additive_mask

    encoder.eval()
    sums: dict[int, np.ndarray] = {}
    uniform, seen = np.zeros(2), 0

    def distance(T: int) -> torch.Tensor:
        return (torch.arange(T)[:, None] - torch.arange(T)[None]).abs().float()

    def hook(index):
        def record(module, args, output):
            x, bias, pad = (*args, None, None)[:3]
            B, T, _ = x.shape
            qkv = torch.nn.functional.linear(x, module.qkv.weight, module._qkv_bias())
            q, k = qkv.view(B, T, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)[:2]
            scores = q @ k.transpose(-1, -2) / module.head_dim ** 0.5
            mask = _additive_mask(bias, pad, q.dtype)
            weights = (scores if mask is None else scores + mask).softmax(-1).mean(1)  # (B, T, T), heads averaged
            reach = (weights * distance(T)).sum(-1)  # (B, T): each query's mean distance
            valid = ~pad if pad is not None else torch.ones(B, T, dtype=torch.bool)
            per_example = (reach * valid).sum(1) / valid.sum(1)
            sums[index] = sums.get(index, np.zeros(2)) + [per_example.sum().item(), reach[:, 0].sum().item()]
        return record

    attentions = [m for m in encoder.modules() if isinstance(m, Attention)]
    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(attentions)]
    try:
        for batch in batches:
            encoder.encode(encoder.embed(batch.source, batch.padding_mask), None)
            lengths = (~batch.padding_mask).sum(-1) if batch.padding_mask is not None else \
                torch.full((len(batch.source),), batch.source.shape[1])
            for n in lengths.tolist():
                uniform += [distance(n).mean().item(), distance(n)[0].mean().item()]
            seen += len(lengths)
    finally:
        for h in handles:
            h.remove()
    return [{"all": round(float(sums[i][0] / seen), 2), "first": round(float(sums[i][1] / seen), 2),
             "uniform_all": round(float(uniform[0] / seen), 2), "uniform_first": round(float(uniform[1] / seen), 2)}
            for i in range(len(attentions))]


@torch.no_grad()
def frame_features(encoder, cfg, split: str, limit: int) -> tuple[list[list[torch.Tensor]], list[torch.Tensor],
                                                                   list[str]]:
    """Per layer (embeddings first), each utterance's unpadded frame states (float16, to halve the cache), with
    its letter targets and transcript."""
    encoder.eval()
    layers, targets, texts = None, [], []
    for item in loader(cfg, split, train=False):
        inputs = as_inputs(item, "speech", torch.device("cpu"))
        batch = inputs["batch"]
        out = encoder.encode(encoder.embed(batch.source, batch.padding_mask), None)
        T = out.x.shape[1]
        lengths = (~out.padding_mask).sum(-1).tolist() if out.padding_mask is not None else [T] * len(out.x)
        layers = layers or [[] for _ in out.hidden_states]
        for layer, h in zip(layers, out.hidden_states):
            layer += [h[i, :n].half() for i, n in enumerate(lengths)]
        targets += list(inputs["targets"].split(inputs["target_lengths"].tolist()))
        texts += inputs["text"]
        if len(texts) >= limit:
            break
    n = min(limit, len(texts))
    return [layer[:n] for layer in layers], targets[:n], texts[:n]


def ctc_probe(train: list[torch.Tensor], targets: list[torch.Tensor], dev: list[torch.Tensor],
              dev_targets: list[torch.Tensor], dev_texts: list[str], letters: LetterTokenizer, epochs: int, lr: float,
              batch_size: int = 16, seed: int = 0) -> dict:
    """A linear CTC head trained on frozen frame features: dev CER/WER of its greedy decoding, its dev CTC loss (per
    letter; finer than CER while decoding is still poor) and the last epoch's mean training loss (near the letters'
    entropy means it never left the blank plateau)."""
    head, train_loss, _ = fit_linear_ctc(train, targets, len(letters.symbols), epochs=epochs, lr=lr,
                                         batch_size=batch_size, seed=seed)
    hyps = head.transcribe(dev, letters)
    return {"cer": round(cer(hyps, dev_texts), 4), "wer": round(wer(hyps, dev_texts), 4),
            "dev_loss": round(head.mean_loss(dev, dev_targets), 4), "train_loss": round(train_loss, 4),
            "example": hyps[0]}


def probe(train_x, train_y, test_x, test_y) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def load_encoders(modality: str, state: dict, names: list[str]):
    """(name, encoder) for each requested encoder that the checkpoint holds: a seeded random init, the student, the
    teacher."""
    objective = state.get("objective", "v1")
    for name in names:
        key = {"student": "encoder", "teacher": "teacher"}.get(name)
        if key and key not in state:
            print(f"the checkpoint holds no {name} ({key!r}); skipped")
            continue
        torch.manual_seed(0)
        encoder = build_encoder(modality, state["preset"], objective)
        if name != "random":
            encoder.load_state_dict(state[key], strict=False)
        yield name, encoder


def text_tokenizer(args) -> str:
    return args.tokenizer or f"{args.data_root}/tokenizer/spm.model"


def classification_probes(args, task, state: dict, report: dict) -> None:
    cfg = finetune_config(args.task, {"batch_size": 64, "data_root": args.data_root,
                                      "tokenizer": text_tokenizer(args)})
    pooled = {"mean": "mean-pooled features", "first": "the first token's features (<s>, as the head reads)"}
    report["probe"] = f"logistic regression on standardised {pooled[args.pool]} (sklearn, C=1)"
    for name, encoder in load_encoders(task.modality, state, args.encoders.split(",")):
        train_f, train_y, train_tok = layer_features(encoder, cfg, task.train, args.train, args.pool)
        dev_f, dev_y, dev_tok = layer_features(encoder, cfg, task.dev, 10 ** 9, args.pool)
        report["encoders"][name] = [round(probe(a, train_y, b, dev_y), 4) for a, b in zip(train_f, dev_f)]
        print(f"{name:8s} dev accuracy per layer (embeddings first): {report['encoders'][name]}", flush=True)
        if task.modality == "text":
            report.setdefault("variance_shares", {})[name] = variance_shares(encoder, cfg, task.dev)
            print(f"{name:8s} variance shares (position, token, first token's): "
                  f"{[(v['position'], v['token'], v['first']) for v in report['variance_shares'][name]]}", flush=True)
            report.setdefault("attention_reach", {})[name] = attention_reach(encoder, batches_of(cfg, task.dev, 512))
            print(f"{name:8s} attention reach in tokens per block (all queries, <s>): "
                  f"{[(r['all'], r['first']) for r in report['attention_reach'][name]]}; uniform: "
                  f"{report['attention_reach'][name][0]['uniform_all']}, "
                  f"{report['attention_reach'][name][0]['uniform_first']}", flush=True)
    if train_tok:
        bag = make_pipeline(CountVectorizer(analyzer=lambda ids: ids, binary=True),
                            LogisticRegression(C=1.0, max_iter=2000))
        bag.fit(train_tok, train_y)
        report["bag_of_pieces"] = round(float(bag.score(dev_tok, dev_y)), 4)
        print(f"bag of pieces: {report['bag_of_pieces']}")
    report["majority"] = round(float(max(np.mean(dev_y == c) for c in np.unique(dev_y))), 4)
    report["n_train"], report["n_dev"] = int(len(train_y)), int(len(dev_y))


def ctc_probes(args, task, state: dict, report: dict) -> None:
    cfg = finetune_config(args.task, {"batch_size": 8, "data_root": args.data_root})
    letters = LetterTokenizer.load(cfg.letters)
    report["probe"] = (f"linear CTC head per layer on standardised frozen frame features, Adam lr {args.ctc_lr}, "
                       f"{args.ctc_epochs} epochs, batch 16, greedy decoding")
    for name, encoder in load_encoders(task.modality, state, args.encoders.split(",")):
        train_f, targets, _ = frame_features(encoder, cfg, task.train, args.train)
        dev_f, dev_targets, dev_texts = frame_features(encoder, cfg, task.dev, 10 ** 9)
        layers = range(len(train_f)) if args.layers is None else [int(i) for i in args.layers.split(",")]
        report["encoders"][name] = {i: ctc_probe(train_f[i], targets, dev_f[i], dev_targets, dev_texts, letters,
                                                 args.ctc_epochs, args.ctc_lr) for i in layers}
        print(f"{name:8s} dev CER / CTC loss by layer (0: embeddings): "
              f"{ {i: (r['cer'], r['dev_loss']) for i, r in report['encoders'][name].items()} }", flush=True)
    report["n_train"], report["n_dev"] = len(targets), len(dev_texts)


def cosine_agreement(features: np.ndarray, ratings: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman between the cosines of every pair of rows of `features` (n, d) and their ratings (the
    upper triangle of `ratings` (n, n)), raw and with the features centred on their mean (a direction that all
    features share, common in transformers, pushes every raw cosine towards 1)."""
    pairs = np.triu_indices(len(features), 1)
    out = {}
    for kind, f in (("", features), ("centred_", features - features.mean(0))):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        cos = np.asarray(f @ f.T)[pairs]
        out |= {f"{kind}pearson": round(pearson(cos, ratings[pairs]), 4),
                f"{kind}spearman": round(spearman(cos, ratings[pairs]), 4)}
    return out


def zero_shot_similarity(args, task, state: dict, report: dict) -> None:
    """lee_sts without any training: the cosine of two documents' mean-pooled features, per layer, against the mean
    human rating, over all 1,225 pairs of the 50 documents (the fine-tuning splits score 45). Each document is cut to
    the encoder's context, as fine-tuning cuts it; TF-IDF cosines of the same pieces, of the whole documents' pieces
    and of their words (the reference's 0.445 Pearson), and the cosine of raw piece counts, are the no-learning
    references."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs, ratings = lee_documents(Context(Path(args.data_root) / "cache", Path(args.data_root) / "raw" / "lee_sts"))

    def agreement(features) -> dict[str, float]:
        return cosine_agreement(features, ratings)

    tokenizer = TextTokenizer(text_tokenizer(args))
    report["probe"] = "zero-shot: cosine of mean-pooled features (embeddings first) vs mean human rating"
    encoders = list(load_encoders(task.modality, state, args.encoders.split(",")))
    if not encoders:
        raise SystemExit(f"{args.pretrained}: none of the encoders {args.encoders!r} to score")
    ids = [(torch.as_tensor(tokenizer.encode(d, max_tokens=encoders[0][1].cfg.max_positions)), 0.0) for d in docs]
    batch = pad_tokens(ids, tokenizer.pad)["batch"]
    for name, encoder in encoders:
        encoder.eval()
        layers = pooled_layers(encoder, batch)
        report["encoders"][name] = [agreement(f) for f in layers]
        print(f"{name:8s} Pearson per layer (embeddings first), raw / centred: "
              f"{[(r['pearson'], r['centred_pearson']) for r in report['encoders'][name]]}", flush=True)
    texts = {"tfidf_pieces": [x[1:-1].tolist() for x, _ in ids], "tfidf_pieces_whole": tokenizer.sp.encode(docs)}
    report["references"] = {name: agreement(TfidfVectorizer(analyzer=lambda s: s).fit_transform(seqs).toarray())
                            for name, seqs in texts.items()}
    # what a random encoder's mean pool roughly is: a random projection of the piece counts, with no IDF
    report["references"]["counts_pieces"] = agreement(
        CountVectorizer(analyzer=lambda s: s).fit_transform(texts["tfidf_pieces"]).toarray().astype(float))
    report["references"]["tfidf_words_whole"] = agreement(TfidfVectorizer().fit_transform(docs).toarray())
    report["n_documents"], report["n_pairs"] = len(docs), len(docs) * (len(docs) - 1) // 2
    report["pieces_per_document"] = {"kept": float(np.mean([len(x) for x, _ in ids])),
                                     "whole": float(np.mean([len(s) + 2 for s in texts["tfidf_pieces_whole"]]))}
    print(f"references: {report['references']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="rt_polarity")
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--train", type=int, default=4000, help="at most this many training examples")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--tokenizer", default=None, help="text: the encoder's SentencePiece model (default: the "
                        "data root's tokenizer/spm.model)")
    parser.add_argument("--encoders", default="random,student,teacher")
    parser.add_argument("--ctc-epochs", type=int, default=60)
    parser.add_argument("--ctc-lr", type=float, default=2e-3)
    parser.add_argument("--pool", choices=("mean", "first"), default="mean",
                        help="classification: mean-pool the tokens, or take the first (<s>, what the head reads)")
    parser.add_argument("--layers", default=None, help="CTC: probe only these layers, e.g. 0,4 (0: embeddings)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = TASKS[args.task]
    if args.task != "lee_sts" and (task.dev is None or task.kind not in ("classification", "ctc")):
        raise SystemExit(f"{args.task}: the probe needs a classification or CTC task with a dev split, or lee_sts")
    state = read_torch(args.pretrained)
    report = {"benchmark": "feature_probe", "task": args.task, "pretrained": args.pretrained,
              "pretrain_steps": state.get("steps"), "objective": state.get("objective", "v1"),
              "machine": platform.machine(), "encoders": {}}
    start = time.perf_counter()
    probes = {"ctc": ctc_probes, "classification": classification_probes, "regression": zero_shot_similarity}
    probes[task.kind](args, task, state, report)
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out or f"results/bench/feature_probe_{args.task}.json")
    atomic_write_json(out, report)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
