"""Where is the downstream signal? Frozen features of every layer of an encoder (random init, the pretrained
student, the pretrained EMA teacher), mean-pooled over tokens/frames/patches, scored by a logistic-regression probe
(scikit-learn) on a labeled task; plus a bag-of-pieces probe on the same token ids as a no-learning reference for
text. A diagnostic for issue 4: it separates "pretraining learned nothing useful" from "fine-tuning cannot use it".
For text it also splits each layer's token-level variance into the share explained by the position alone and by the
token id alone (a drift towards position is what the embedded text runs show; see `variance_shares`).

    python bench/feature_probe.py --task rt_polarity --pretrained runs/bench/pretrain/text/final.pt
        [--train 4000] [--out results/bench/feature_probe_rt_polarity.json]
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

from d2v.io import atomic_write_json
from d2v.modalities.registry import build_encoder
from d2v.train.finetune import TASKS, as_inputs, finetune_config, loader


@torch.no_grad()
def layer_features(encoder, cfg, split: str, limit: int) -> tuple[list[np.ndarray], np.ndarray, list[list[int]]]:
    """Mean-pooled hidden states of every layer (embeddings first), labels, and the token ids (text)."""
    encoder.eval()
    chunks, labels, tokens = [], [], []
    for item in loader(cfg, split, train=False):
        inputs = as_inputs(item, TASKS[cfg.task].modality, torch.device("cpu"))
        batch = inputs["batch"]
        out = encoder.encode(encoder.embed(batch.source, batch.padding_mask), None)
        keep = torch.ones(out.x.shape[:2], dtype=torch.bool)
        if out.padding_mask is not None:
            keep[:, out.num_extra_tokens:] = ~out.padding_mask
        w = keep.unsqueeze(-1).float()
        pooled = [((h * w).sum(1) / w.sum(1)).numpy() for h in out.hidden_states]
        chunks.append(pooled)
        labels += inputs["labels"].tolist()
        if batch.source.dtype == torch.long:
            tokens += [row[~m].tolist() for row, m in zip(batch.source, batch.padding_mask if batch.padding_mask
                                                           is not None else torch.zeros_like(batch.source).bool())]
        if len(labels) >= limit:
            break
    n = min(limit, len(labels))
    feats = [np.concatenate(layer)[:n] for layer in zip(*chunks)]
    return feats, np.array(labels[:n]), tokens[:n]


@torch.no_grad()
def variance_shares(encoder, cfg, split: str, limit: int = 512) -> list[dict[str, float]]:
    """Per layer (embeddings first): the fraction of the variance of the unpadded token states that the mean state
    at each position explains, and the fraction that the mean state of each token id explains. A random encoder
    sits near the same shares at every layer; a layer whose position share grows while its token share shrinks has
    drifted towards encoding where a token is rather than what it is. Ids seen once explain their own variance, so
    the token share is inflated in absolute terms: compare encoders, not numbers."""
    encoder.eval()
    states, positions, ids, seen = None, [], [], 0
    for item in loader(cfg, split, train=False):
        batch = as_inputs(item, TASKS[cfg.task].modality, torch.device("cpu"))["batch"]
        out = encoder.encode(encoder.embed(batch.source, batch.padding_mask), None)
        keep = ~batch.padding_mask if batch.padding_mask is not None else torch.ones_like(batch.source, dtype=bool)
        layers = [h[:, out.num_extra_tokens:][keep].double().numpy() for h in out.hidden_states]
        states = layers if states is None else [np.concatenate(pair) for pair in zip(states, layers)]
        positions.append(torch.arange(batch.source.shape[1]).expand_as(batch.source)[keep].numpy())
        ids.append(batch.source[keep].numpy())
        seen += batch.source.shape[0]
        if seen >= limit:
            break
    positions, ids = np.concatenate(positions), np.concatenate(ids)

    def explained(h: np.ndarray, groups: np.ndarray) -> float:
        _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
        means = np.zeros((len(counts), h.shape[1]))
        np.add.at(means, inverse, h)
        means /= counts[:, None]
        return float(means[inverse].var(0).sum() / h.var(0).sum())

    return [{"position": round(explained(h, positions), 4), "token": round(explained(h, ids), 4)} for h in states]


def probe(train_x, train_y, test_x, test_y) -> float:
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="rt_polarity")
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--encoders", default="random,student,teacher")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    task = TASKS[args.task]
    if task.kind != "classification" or task.dev is None:
        raise SystemExit(f"{args.task}: the probe needs a classification task with a dev split")
    cfg = finetune_config(args.task, {"batch_size": 64, "data_root": args.data_root,
                                      "tokenizer": f"{args.data_root}/tokenizer/spm.model"})
    state = torch.load(args.pretrained, map_location="cpu", weights_only=False)
    objective = state.get("objective", "v1")
    report = {"benchmark": "feature_probe", "task": args.task, "pretrained": args.pretrained,
              "pretrain_steps": state.get("steps"), "objective": objective,
              "machine": platform.machine(), "probe": "logistic regression "
              "on standardised mean-pooled features (sklearn, C=1)", "encoders": {}}
    start = time.perf_counter()
    for name in args.encoders.split(","):
        key = {"student": "encoder", "teacher": "teacher"}.get(name)
        if key and key not in state:
            print(f"{args.pretrained} holds no {name} ({key!r}); skipped")
            continue
        torch.manual_seed(0)
        encoder = build_encoder(task.modality, state["preset"], objective)
        if name != "random":
            encoder.load_state_dict(state[key], strict=False)
        train_f, train_y, train_tok = layer_features(encoder, cfg, task.train, args.train)
        dev_f, dev_y, dev_tok = layer_features(encoder, cfg, task.dev, 10 ** 9)
        report["encoders"][name] = [round(probe(a, train_y, b, dev_y), 4) for a, b in zip(train_f, dev_f)]
        print(f"{name:8s} dev accuracy per layer (embeddings first): {report['encoders'][name]}", flush=True)
        if task.modality == "text":
            report.setdefault("variance_shares", {})[name] = variance_shares(encoder, cfg, task.dev)
            print(f"{name:8s} variance shares (position, token): "
                  f"{[(v['position'], v['token']) for v in report['variance_shares'][name]]}", flush=True)
    if train_tok:
        bag = make_pipeline(CountVectorizer(analyzer=lambda ids: ids, binary=True),
                            LogisticRegression(C=1.0, max_iter=2000))
        bag.fit(train_tok, train_y)
        report["bag_of_pieces"] = round(float(bag.score(dev_tok, dev_y)), 4)
        print(f"bag of pieces: {report['bag_of_pieces']}")
    report["majority"] = round(float(max(np.mean(dev_y == c) for c in np.unique(dev_y))), 4)
    report["n_train"], report["n_dev"] = int(len(train_y)), int(len(dev_y))
    report["seconds"] = round(time.perf_counter() - start, 1)
    out = Path(args.out or f"results/bench/feature_probe_{args.task}.json")
    atomic_write_json(out, report)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
