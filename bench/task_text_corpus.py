"""A task-adaptive text corpus (Gururangan et al. 2020, "Don't Stop Pretraining"): the embedded pretraining corpus
plus the unlabeled text of the downstream tasks' **train** splits (labels dropped; dev and test text never enter),
tokenized and sharded like `text_corpus/pretrain`.

Why: the embedded corpus is 1.7M tokens of Austen and 106 Wikipedia articles, while the text tasks are movie
snippets, Bible verses and news sentences. Pretraining on it alone does not beat training from scratch
(results/embedded/pretrain_vs_scratch*.json); this corpus tests whether in-domain unlabeled text changes that.

    python bench/task_text_corpus.py [--tasks rt_polarity,bible_para,lee_sts] [--out data/shards/text_tapt/pretrain]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from d2v.data.download import bytes_sha256
from d2v.data.manifest import make_manifest, read_manifest, write_manifest
from d2v.data.shards import write_shards
from d2v.data.tokenizer import TextTokenizer


def task_text(raw: Path, task: str) -> str:
    """One line per sentence of the task's train split (both sides of a pair), labels dropped."""
    df = read_manifest(raw / task, "train")
    lines = [t for col in ("text", "text_b") for t in df[col].dropna() if t.strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default="rt_polarity,bible_para,lee_sts")
    parser.add_argument("--raw", default="data/raw")
    parser.add_argument("--tokenizer", default="data/tokenizer/spm.model")
    parser.add_argument("--out", default="data/shards/text_tapt/pretrain")
    args = parser.parse_args()
    raw = Path(args.raw)
    corpus = read_manifest(raw / "text_corpus", "pretrain")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        for folder in {p.split("/")[0] for p in corpus["path"]}:
            (src / folder).symlink_to((raw / "text_corpus" / folder).resolve())
        (src / "tasks").mkdir()
        rows = corpus.to_dict("records")
        for task in args.tasks.split(","):
            data = task_text(raw, task).encode()
            (src / "tasks" / f"{task}.txt").write_bytes(data)
            rows.append({"id": f"task-{task}", "path": f"tasks/{task}.txt", "split": "pretrain", "bytes": len(data),
                         "sha256": bytes_sha256(data)})
        write_manifest(src, make_manifest(rows), source="text_corpus", tasks=args.tasks.split(","))
        index = write_shards(src, "pretrain", args.out, tokenizer=TextTokenizer(args.tokenizer))
    print(f"{args.out}: {index['count']} chunks in {len(index['shards'])} shards")


if __name__ == "__main__":
    main()
