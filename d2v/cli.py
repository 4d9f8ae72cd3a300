"""`d2v` command line. Stages are thin wrappers over the library."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import get_args

from d2v.config import MODALITIES, Objective, nested_overrides

# Commands import what they need when they run: the data stages (prepare, shard, tokenizer, report) never pay for
# torch's import, which is most of a short job's start-up.

# steps, lr, batch size and input kwargs of the short demo pretraining per modality
DEMO = {
    "image": dict(steps=400, lr=2e-3, batch=16, kw={}),
    "speech": dict(steps=80, lr=3e-4, batch=8, kw=dict(seconds=1.0)),
    "text": dict(steps=200, lr=1e-3, batch=16, kw=dict(length=64)),
}


def demo(args: argparse.Namespace) -> int:
    """Short data2vec pretraining of each modality on structured synthetic inputs (real corpora: `d2v prepare`)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from d2v.data import synthetic
    from d2v.data2vec import CollapseError
    from d2v.io import atomic_write_json
    from d2v.modalities.registry import build_modality, make_objective
    from d2v.train.loop import pretrain

    names = MODALITIES if args.modality == "all" else (args.modality,)
    torch.manual_seed(args.seed)
    for name in names:
        run = DEMO[name]
        steps = args.steps or run["steps"]
        modality, cfg = build_modality(name, args.preset, args.objective)
        cfg = cfg.model_copy(update={"collapse": cfg.collapse.model_copy(update={"warmup_steps": 3 * steps // 4})})
        objective = make_objective(modality, cfg)
        kw, enc = dict(run["kw"]), modality.encoder.cfg
        if name == "text":
            kw["vocab_size"] = enc.vocab_size
        if name == "image":  # the preset's image shape (ViT-B: 224 px, RGB)
            kw.update(size=enc.img_size, channels=enc.in_chans)
        batches = synthetic.batches(name, np.random.default_rng(args.seed), run["batch"], **kw)
        start = time.perf_counter()
        with tqdm(total=steps, desc=f"pretrain {name}", unit="step", file=sys.stderr) as bar:

            def progress(step, m):
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.1e}", tau=f"{m['tau']:.5f}",
                                target_var=f"{m['target_var']:.3f}", pred_var=f"{m['pred_var']:.3f}")

            try:
                history = pretrain(objective, batches, steps, run["lr"], warmup=max(1, steps // 10),
                                   seed=args.seed, progress=progress)
            except CollapseError as err:
                bar.close()
                print(f"error: {name}: {err}", file=sys.stderr)
                return 2
        elapsed = time.perf_counter() - start
        first = float(np.mean([m["loss"] for m in history[:10]]))
        last = float(np.mean([m["loss"] for m in history[-10:]]))
        summary = {"modality": name, "preset": args.preset, "objective": args.objective, "steps": steps,
                   "seconds": round(elapsed, 2),
                   "loss_first10": first, "loss_last10": last, "final": history[-1],
                   "params": sum(p.numel() for p in objective.student.parameters()), "inputs": "synthetic"}
        atomic_write_json(f"{args.out}/{name}/summary.json", summary)
        atomic_write_json(f"{args.out}/{name}/history.json", history)
        print(f"{name:6s} {summary['params']/1e6:5.2f}M params  loss {first:.3f} -> {last:.3f}  "
              f"target_var {history[-1]['target_var']:.3f}  pred_var {history[-1]['pred_var']:.3f}  "
              f"{elapsed:.1f}s  -> {args.out}/{name}/")
    return 0


def presets(args: argparse.Namespace) -> int:
    from d2v.modalities.registry import ENCODERS, build_encoder, objectives_of

    for name, (table, _) in ENCODERS.items():
        for preset, cfg in table.items():
            for objective in objectives_of(name, preset):  # speech audioset: data2vec 1.0's recipe only
                n = sum(p.numel() for p in build_encoder(name, preset, objective).parameters())
                print(f"{name:6s} {preset:14s} {objective}  {n / 1e6:8.2f}M  D={cfg.dim} L={cfg.depth} "
                      f"H={cfg.num_heads}")
    return 0


def _profile(args: argparse.Namespace):
    """The named profile of params.yaml (validated as a whole), or None when the command runs without one."""
    from d2v.pipeline.params import PARAMS_FILE, load_params

    if getattr(args, "profile", None) is None:
        if getattr(args, "params", PARAMS_FILE) != PARAMS_FILE:  # not a silent run on the embedded defaults
            raise ValueError(f"--params {args.params} takes effect with --profile: name the profile to read from it")
        return None
    return load_params(args.params, args.profile).active


def _add_profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, help="take every setting from this profile of the params file")
    p.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")


def _add_lm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lm", default=None, metavar="FOLDER",
                   help="CTC tasks: also decode with this language model (`d2v lm`): wer_lm, cer_lm")
    p.add_argument("--decode-workers", type=int, default=1, metavar="N",
                   help="processes that beam-search with --lm, sharing one loaded model (default 1; at most the "
                        "CPUs this process may use)")


def _add_restart(p: argparse.ArgumentParser) -> None:
    p.add_argument("--restart-on-change", action="store_true",
                   help="discard checkpoints, or train over a finished run, of another config, data or recipe "
                        "instead of stopping (on with --profile)")


def prepare(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from d2v.data.sources import SOURCES, Context

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.source not in SOURCES:
        raise ValueError(f"unknown source {args.source!r}; expected one of {sorted(SOURCES)}")
    source = SOURCES[args.source]
    kwargs = nested_overrides(args.set)
    profile = _profile(args)
    if profile is not None:
        if args.source not in profile.sources:
            raise ValueError(f"{args.source}: not a source of profile {args.profile!r} (see {args.params})")
        kwargs = {**(profile.sources[args.source] or {}), **kwargs}
        args.root, args.cache, args.out = profile.data_root, profile.cache, str(profile.raw / args.source)
    kwargs = source.options(kwargs, args.source)
    out = Path(args.out or Path(args.root) / "raw" / args.source)
    start = time.perf_counter()
    source.prepare(Context(Path(args.cache), out), **kwargs)
    print(f"{args.source}: prepared in {time.perf_counter() - start:.1f}s -> {out}")
    return 0


def tokenizer(args: argparse.Namespace) -> int:
    from pathlib import Path

    from d2v.config import validate
    from d2v.data.manifest import read_manifest
    from d2v.data.tokenizer import LetterTokenizer, SentencePieceConfig, build_letter_vocab, corpus_lines, \
        train_sentencepiece

    profile = _profile(args)
    if profile is not None:
        tok = profile.tokenizer
        args.corpus = tok.corpus and str(profile.raw / tok.corpus)
        args.letters = tok.letters and str(profile.raw / tok.letters)
        args.letters_split, args.vocab_size, args.num_threads = tok.letters_split, tok.vocab_size, tok.num_threads
        args.sample_lines = tok.sample_lines
        args.out = str(profile.spm_model.parent)
    if args.corpus:
        cfg = validate(SentencePieceConfig, dict(vocab_size=args.vocab_size, model_type=args.model_type,
                                                 num_threads=args.num_threads, sample_lines=args.sample_lines),
                       "tokenizer")
        path = train_sentencepiece(corpus_lines(args.corpus), Path(args.out) / "spm.model", cfg)
        print(f"sentencepiece ({cfg.vocab_size} ids incl. <mask>) -> {path}")
    if args.letters:
        transcripts = read_manifest(args.letters, args.letters_split)["text"]
        path = LetterTokenizer(build_letter_vocab(transcripts)).save(Path(args.out) / "letters.json")
        print(f"letter vocabulary -> {path}")
    if not (args.corpus or args.letters):
        raise ValueError("give --corpus (SentencePiece) and/or --letters (CTC letter vocabulary)")
    return 0


def lm_cmd(args: argparse.Namespace) -> int:
    from d2v.config import validate
    from d2v.data.tokenizer import LetterTokenizer
    from d2v.eval import lm

    profile = _profile(args)
    if profile is not None:
        if profile.lm is None:
            raise ValueError(f"profile {args.profile!r} has no `lm` section (see {args.params})")
        cfg, letters, out = profile.lm, profile.letters, profile.lm_dir
        corpus_dir = cfg.corpus and profile.raw / cfg.corpus
    else:
        cfg = validate(lm.LanguageModelConfig, {"corpus": args.corpus, "arpa": args.arpa,
                                                **nested_overrides(args.set)}, "lm")
        letters, out, corpus_dir = args.letters, args.out, args.corpus
    start = time.perf_counter()
    meta = lm.build(cfg, LetterTokenizer.load(letters).symbols, out, lm.corpus_files(corpus_dir) if corpus_dir else ())
    print(f"language model ({meta.get('ngrams') or meta['arpa']}; {meta['lexicon_words']} words in the lexicon, "
          f"{meta['words_left_out']} left out) in {time.perf_counter() - start:.1f}s -> {out}")
    return 0


def shard(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from d2v.data.shards import ShardConfig, write_shards
    from d2v.data.tokenizer import TextTokenizer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profile = _profile(args)
    if profile is not None:  # --split names the shard set; the profile says how it is cut
        key = f"{args.dataset}/{args.split}"
        spec = profile.shard_spec(key)
        args.root, args.out = profile.data_root, str(profile.shard_dir(key))
        args.split, args.subset, args.limit, args.sample_seed = spec.split, spec.subset, spec.limit, spec.sample_seed
        if args.dataset == profile.tokenizer.corpus:
            args.tokenizer = str(profile.spm_model)
    source = Path(args.root) / "raw" / args.dataset
    name = args.split + (f"-{args.subset}" if args.subset else "")
    out = Path(args.out or Path(args.root) / "shards" / args.dataset / name)
    cfg = ShardConfig(max_bytes=int(args.max_mb * (1 << 20)), max_count=args.max_count)
    tok = TextTokenizer(args.tokenizer) if args.tokenizer else None
    index = write_shards(source, args.split, out, cfg, tokenizer=tok, subset=args.subset, limit=args.limit,
                          sample_seed=args.sample_seed, workers=args.workers)
    print(f"{args.dataset}/{name}: {index['count']} samples, {len(index['shards'])} shards, "
          f"{index['bytes'] / 1e6:.1f} MB, {index['skipped']['count']} skipped -> {out}")
    return 0


def index_cmd(args: argparse.Namespace) -> int:
    from d2v.data import index_cache
    from d2v.data.seekable import index_shards

    cache = index_cache.folder()
    if cache is None:
        print("D2V_INDEX_CACHE=off: there is no index cache to fill or prune", file=sys.stderr)
        return 2
    profile = _profile(args)
    seekable = _seekable_shards(profile)
    if profile is not None and not seekable:
        print(f"profile {args.profile}: no stage reads its shards with stream_resume: seek")
    for shard_dir in dict.fromkeys([*args.shards, *seekable]):
        start = time.perf_counter()
        found = index_shards(shard_dir)
        tokens = f", {found['tokens']:,} tokens" if "tokens" in found else ""
        print(f"{shard_dir}: {found['samples']:,} samples{tokens} in {found['tars']} tar(s), indexed in "
              f"{time.perf_counter() - start:.2f} s")
    if args.prune:
        pruned = index_cache.prune(cache)
        for p in pruned:
            print(f"pruned {p.entry.name}: {p.why}")
        print(f"pruned {len(pruned)} entries, {sum(p.size for p in pruned) / 1e6:.1f} MB")
    entries, size = index_cache.usage(cache)
    print(f"{cache}: {entries} entries, {size / 1e6:.1f} MB")
    return 0


def _seekable_shards(profile) -> list[str]:
    """The training shard folders a profile's stages read with `stream_resume: seek`."""
    if profile is None:
        return []
    from d2v.train.tasks import TASKS

    folders = [cfg.data.shards for modality in profile.pretrain for stage in profile.pretrain_stages(modality)
               if (cfg := profile.pretrain_config(modality, stage)).stream_resume == "seek"]
    folders += [str(profile.shard_dir(TASKS[task].shard_key(TASKS[task].train))) for task in profile.finetune
                if profile.finetune_config(task, init="scratch").stream_resume == "seek"]
    return folders


def pretrain_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from d2v.config import load_yaml
    from d2v.data2vec import CollapseError
    from d2v.train.config import merge, pretrain_config
    from d2v.train.preemption import Interrupted, report
    from d2v.train.pretrain import pretrain_main

    overrides = load_yaml(Path(args.config).read_text(), args.config) if args.config else {}
    profile = _profile(args)
    if profile is not None:
        if args.modality not in profile.pretrain:
            raise ValueError(f"pretrain.{args.modality}: not in profile {args.profile!r} (see {args.params})")
        base = profile.pretrain_config(args.modality, args.stage).model_dump(mode="json")
        cfg = pretrain_config(args.modality, merge(merge(base, overrides or {}), nested_overrides(args.set)))
        out = Path(args.out or profile.pretrain_dir(args.modality, args.stage))
        if args.modality == "text":
            args.tokenizer = args.tokenizer or str(profile.spm_model)
    else:
        if args.stage is not None:
            raise ValueError("--stage picks a stage of a profile's two-stage pretraining: it needs --profile")
        cfg = pretrain_config(args.modality, merge(overrides or {}, nested_overrides(args.set)))
        out = Path(args.out or f"runs/embedded/pretrain/{args.modality}")
    try:
        summary = pretrain_main(cfg, out, tokenizer=args.tokenizer, progress=not args.quiet,
                                restart_on_change=args.restart_on_change or profile is not None)
    except CollapseError as err:
        print(f"error: {args.modality}: {err}", file=sys.stderr)
        return 3
    except Interrupted as err:  # SIGTERM, SIGUSR1 or Ctrl-C after a checkpoint: the same command resumes
        return report(err, f"pretrain {args.modality}")
    last = summary.get("last", {})
    print(f"{args.modality}: {summary['step']} steps, loss {summary.get('first', {}).get('loss', float('nan')):.3f}"
          f" -> {last.get('loss', float('nan')):.3f}, {last.get('samples_per_s', 0):.1f} samples/s -> {out}")
    return 0


def finetune_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from d2v.config import load_yaml
    from d2v.train.config import merge
    from d2v.train.finetune import run_finetune
    from d2v.train.preemption import Interrupted, report
    from d2v.train.tasks import finetune_config

    overrides = load_yaml(Path(args.config).read_text(), args.config) if args.config else {}
    # the flags given override the config file; those left out leave its values (or the defaults) alone
    cli = {key: getattr(args, key) for key in ("init", "mode", "seed", "pretrained") if getattr(args, key) is not None}
    profile = _profile(args)
    if profile is not None:
        if args.task not in profile.finetune:
            raise ValueError(f"finetune.{args.task}: not in profile {args.profile!r} (see {args.params})")
        chosen = {k: v for k, v in {**(overrides or {}), **cli}.items() if k in ("init", "seed")}  # else its defaults
        base = profile.finetune_config(args.task, **chosen).model_dump(mode="json")
        cfg = finetune_config(args.task, merge(merge(merge(base, overrides or {}), cli), nested_overrides(args.set)))
        out = Path(args.out or profile.finetune_dir(args.task, cfg.init, cfg.seed))
    else:
        cfg = finetune_config(args.task, merge(merge(overrides or {}, cli), nested_overrides(args.set)))
        out = Path(args.out or f"runs/embedded/finetune/{args.task}-{cfg.init}-{cfg.mode}-s{cfg.seed}")
    from d2v.train.distributed import shutdown

    try:
        summary = run_finetune(cfg, out, progress=not args.quiet,  # under torchrun: DDP
                               restart_on_change=args.restart_on_change or profile is not None)
    except Interrupted as err:  # SIGTERM, SIGUSR1 or Ctrl-C after a checkpoint: the same command resumes
        return report(err, f"finetune {args.task}")
    finally:
        shutdown()
    print(f"{args.task}: {summary['steps']} steps in {summary['seconds']}s, best dev {summary['best_dev']} -> {out}")
    return 0


def _print_result(r: dict, label: str) -> None:
    """One line of metrics; a warning on stderr when every example got the same output (`prediction_stats`)."""
    values = "  ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items())
    print(f"{r['task']}/{r['split']} ({label}): {values}  n={r['n']}")
    if r.get("predictions", {}).get("degenerate"):
        print(f"warning: {r['task']}/{r['split']} ({label}): every example got the same output, so these numbers "
              f"measure the labels, not the model ({r['predictions']})", file=sys.stderr)


def evaluate_cmd(args: argparse.Namespace) -> int:
    from d2v.train.distributed import shutdown
    from d2v.eval.evaluate import evaluate

    try:  # under torchrun: each rank runs the model over its share, the first one scores and prints
        results = evaluate(args.run, args.split, args.out, args.checkpoint, tuple(args.extra), args.lm,
                           args.decode_workers)
    finally:
        shutdown()
    for r in results:
        _print_result(r, f"{r['init']}, {r['mode']}")
    return 0


def baseline_cmd(args: argparse.Namespace) -> int:
    from pathlib import Path

    from d2v.eval.baselines import run_baseline
    from d2v.train.config import merge
    from d2v.train.tasks import RAW, baseline_config

    profile = _profile(args)
    if profile is not None:
        if args.task not in profile.baselines:
            raise ValueError(f"baselines.{args.task}: not in profile {args.profile!r} (see {args.params})")
        cfg = baseline_config(args.task, merge(profile.baseline_config(args.task).model_dump(mode="json"),
                                               nested_overrides(args.set)))
        out = Path(args.out or profile.eval_dir(args.task, RAW, cfg.seed))
    else:
        cfg = baseline_config(args.task, nested_overrides(args.set))
        out = Path(args.out or f"results/baselines/{args.task}")
    for r in run_baseline(cfg, out, tuple(args.extra), args.lm, args.decode_workers):
        _print_result(r, f"raw features: {r['baseline']}")
    print(f"-> {out}")
    return 0


def export_cmd(args: argparse.Namespace) -> int:
    from d2v.interop.checkpoints import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.weights, args.tokenizer)
    config = json.loads((out / "config.json").read_text())
    print(f"{args.checkpoint} -> {out} ({config['architectures'][0]}; "
          f"transformers: AutoModel.from_pretrained({str(out)!r}))")
    return 0


def import_cmd(args: argparse.Namespace) -> int:
    from d2v.interop.checkpoints import import_checkpoint

    info = import_checkpoint(args.source, args.out, args.kind)
    teacher = "its EMA teacher" if info["has_teacher"] else "the student as teacher (the checkpoint has no EMA)"
    print(f"{args.source} ({info['imported']}) -> {args.out}: {info['modality']} encoder, preset {info['preset']}, "
          f"objective {info['objective']}, {teacher}")
    if info["preset"] != "custom":
        objective = " --set objective=v2" if info["objective"] == "v2" else ""
        print(f"fine-tune it: d2v finetune TASK --set pretrained={args.out} --set preset={info['preset']}{objective}")
    else:
        print("no d2v preset has this architecture, so d2v finetune cannot build it; its config is in the file "
              "(encoder_config)", file=sys.stderr)
    return 0


def report_cmd(args: argparse.Namespace) -> int:
    from d2v.pipeline.params import load_params
    from d2v.pipeline.report import compare, write_report

    params = load_params(args.params, args.profile)
    if args.compare:
        print(compare(params.active, args.compare, args.against))
        return 0
    table = write_report(params.active, params.profile)
    print(table)
    return 0


def pipeline_cmd(args: argparse.Namespace) -> int:
    import yaml

    from d2v.io import atomic_write_text
    from d2v.pipeline.params import load_params, read_params
    from d2v.pipeline.stages import StageTable, dvc_yaml

    params = load_params(args.params, args.profile)
    table = StageTable(params, params.profile, args.params, read_params(args.params))
    if args.action == "stages":
        for s in table:
            print(f"{s.name:48s} {s.cmd}")
        return 0
    text = DVC_HEADER + yaml.safe_dump(dvc_yaml(table), sort_keys=False, width=120)
    if args.action == "dvc":
        atomic_write_text(args.out, text)
        print(f"{len(table.stages)} stages ({params.profile}) -> {args.out}")
        return 0
    current = open(args.out).read() if os.path.exists(args.out) else ""
    if current != text:
        print(f"{args.out} is out of date with the stage table; run `d2v pipeline dvc`", file=sys.stderr)
        return 1
    print(f"{args.out} matches the stage table ({len(table.stages)} stages)")
    return 0


def _rehearsal_batch(value: str) -> int | str:
    if value == "config":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: expected a positive number of examples or 'config'")


def rehearse_cmd(args: argparse.Namespace) -> int:
    from d2v.pipeline.params import load_params
    from d2v.pipeline.rehearsal import rehearse_profile, report
    from d2v.train.distributed import resolve_device

    params = load_params(args.params, args.profile)
    device = resolve_device(args.device, "rehearse --device")
    batch = None if args.batch == "config" else args.batch
    size = "each stage's configured micro-batch at its longest inputs" if batch is None else f"{batch} examples"
    print(f"rehearsing profile {params.profile} on {device}, {size}\n{report([])}", flush=True)
    results = rehearse_profile(params.active, batch, str(device), args.stage or None,
                               progress=lambda r: print(report([r]).splitlines()[1], flush=True))
    failed = [r for r in results if r.error]
    print(f"{len(results) - len(failed)} of {len(results)} stages took a step" + (
        f"; failed: {', '.join(r.stage for r in failed)}" if failed else ""))
    if args.out:
        from dataclasses import asdict

        from d2v.io import atomic_write_json, git_commit

        atomic_write_json(args.out, {"benchmark": "rehearsal", "profile": params.profile, "device": str(device),
                                     "batch": args.batch, "commit": git_commit(),
                                     "stages": [asdict(r) for r in results]})
    return 1 if failed else 0


DVC_HEADER = "# Generated by `d2v pipeline dvc` from d2v/pipeline/stages.py; do not edit by hand.\n"


def _add_setup_commands(sub: argparse._SubParsersAction) -> None:
    """Demo and the encoder presets."""
    p = sub.add_parser("demo", help="short data2vec pretraining on structured synthetic inputs")
    p.add_argument("--modality", choices=(*MODALITIES, "all"), default="all")
    p.add_argument("--preset", default="embedded", help="encoder size preset (tiny | embedded | base | large)")
    p.add_argument("--objective", choices=get_args(Objective), default="v1", help="data2vec 1.0 or 2.0")
    p.add_argument("--steps", type=int, default=None, help="override the number of updates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=demo)
    p = sub.add_parser("presets", help="list encoder presets and parameter counts")
    p.set_defaults(func=presets)


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """The data stages: corpora, tokenizers, language models, shards and their indexes."""
    p = sub.add_parser("prepare", help="download/verify a corpus and write its manifest (data/raw/SOURCE)")
    p.add_argument("source")
    p.add_argument("--root", default="data")
    p.add_argument("--cache", default="data/cache", help="content-addressed download cache")
    p.add_argument("--out", default=None, help="output folder (default ROOT/raw/SOURCE)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="source option, e.g. --set archives=/data/imagenet or --set 'splits=[dev-clean]'")
    p.set_defaults(func=prepare)
    _add_profile(p)
    p = sub.add_parser("tokenizer", help="train SentencePiece on a text corpus and/or build a CTC letter vocabulary")
    p.add_argument("--corpus", help="prepared text corpus folder (its 'pretrain' split is used)")
    p.add_argument("--letters", help="prepared speech source whose transcripts define the letter vocabulary")
    p.add_argument("--letters-split", default="train_1h")
    p.add_argument("--out", default="data/tokenizer")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", default="unigram", choices=("unigram", "bpe"))
    p.add_argument("--num-threads", type=int, default=2)
    p.add_argument("--sample-lines", type=int, default=0, metavar="N",
                   help="train SentencePiece on a seeded sample of N corpus lines (default 0: every line)")
    p.set_defaults(func=tokenizer)
    _add_profile(p)
    p = sub.add_parser("lm", help="a word n-gram language model and letter lexicon for CTC beam search")
    p.add_argument("--corpus", help="prepared source folder whose 'lm' split is the text (Kneser-Ney estimate)")
    p.add_argument("--arpa", help="or an ARPA file (plain or .gz), e.g. LibriSpeech's 4-gram (openslr.org/11)")
    p.add_argument("--letters", default="data/tokenizer/letters.json", help="CTC letter vocabulary")
    p.add_argument("--out", default="data/lm")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. order=3, beam=500")
    p.set_defaults(func=lm_cmd)
    _add_profile(p)
    p = sub.add_parser("shard", help="write WebDataset shards + index.json for one split of a prepared source")
    p.add_argument("dataset")
    p.add_argument("--split", required=True)
    p.add_argument("--subset", default=None, help="keep rows tagged with this subset (e.g. 10min)")
    p.add_argument("--root", default="data")
    p.add_argument("--out", default=None, help="output folder (default ROOT/shards/DATASET/SPLIT[-SUBSET])")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (required for a text corpus)")
    p.add_argument("--max-mb", type=float, default=64.0)
    p.add_argument("--max-count", type=int, default=10_000)
    p.add_argument("--limit", type=int, default=None, help="first N rows only (smoke runs)")
    p.add_argument("--sample-seed", type=int, default=None, help="with --limit: a seeded random N rows instead")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that cut pieces of long recordings (Libri-light); the shards do not depend on it")
    p.set_defaults(func=shard)
    _add_profile(p)
    p = sub.add_parser("index", help="index shard folders for `stream_resume: seek` ahead of a launch, filling the "
                                     "shard index cache; --prune drops entries no tar matches any more")
    p.add_argument("shards", nargs="*", help="shard folders (holding index.json)")
    p.add_argument("--prune", action="store_true",
                   help="delete cache entries of deleted or changed tars, of older formats, and abandoned temp files")
    p.set_defaults(func=index_cmd)
    _add_profile(p)  # --profile: every training shard folder its stages read with `seek`


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    """Pretraining, fine-tuning, evaluation and the raw-feature baselines."""
    p = sub.add_parser("pretrain", help="data2vec pretraining from shards (resumes from its last checkpoint)")
    p.add_argument("modality", choices=MODALITIES)
    p.add_argument("--config", default=None, help="YAML with overrides of the embedded defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override, dotted keys: --set steps=100 --set optim.lr=1e-3 --set data.batch_size=8")
    p.add_argument("--out", default=None, help="run folder (default runs/embedded/pretrain/MODALITY)")
    p.add_argument("--tokenizer", default=None, help="text: SentencePiece model, checked against the encoder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stage", type=int, choices=(1, 2), default=None, help="with --profile: stage 1 of a two-stage "
                   "pretraining (pretrain.MODALITY.second_stage); default the final stage, which fine-tuning reads")
    _add_restart(p)
    p.set_defaults(func=pretrain_cmd)
    _add_profile(p)
    p = sub.add_parser("finetune", help="fine-tune (or linear-probe) a downstream task, from data2vec or scratch "
                       "(an interrupted run resumes from its last checkpoint)")
    p.add_argument("task")
    p.add_argument("--init", choices=("pretrained", "scratch"), default=None, help="default pretrained")
    p.add_argument("--mode", choices=("full", "probe"), default=None, help="default full")
    p.add_argument("--pretrained", default=None, help="final.pt of a pretraining run")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--config", default=None, help="YAML with overrides of the embedded defaults (a flag given wins)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    _add_restart(p)
    p.set_defaults(func=finetune_cmd)
    _add_profile(p)
    p = sub.add_parser("evaluate", help="score a fine-tuned run on its test splits; one JSON per split")
    p.add_argument("run", help="fine-tuning run folder")
    p.add_argument("--split", default=None)
    p.add_argument("--checkpoint", default="best.pt")
    p.add_argument("--extra", action="append", default=[], metavar="DATASET/SPLIT",
                   help="also score this extra test set of the task (e.g. real_speech/test_asterisk)")
    p.add_argument("--out", default=None, help="folder for the JSON results (default RUN/eval)")
    _add_lm(p)
    p.set_defaults(func=evaluate_cmd)
    p = sub.add_parser("baseline", help="fit a task's raw-feature baseline (no encoder) and score its test splits")
    p.add_argument("task")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. ctc_epochs=30")
    p.add_argument("--extra", action="append", default=[], metavar="DATASET/SPLIT",
                   help="also score this extra test set of the task (e.g. real_speech/test_asterisk)")
    p.add_argument("--out", default=None,
                   help="folder for the JSON results (default: the profile's RESULTS/TASK/raw-sSEED)")
    _add_lm(p)
    p.set_defaults(func=baseline_cmd)
    _add_profile(p)


def _add_checkpoint_commands(sub: argparse._SubParsersAction) -> None:
    """Checkpoints in and out: Hugging Face folders, fairseq/BEiT files."""
    p = sub.add_parser("export", help="a pretraining final.pt or a fine-tuned best.pt as a Hugging Face Data2Vec* "
                                      "model folder (config.json + model.safetensors)")
    p.add_argument("checkpoint")
    p.add_argument("out", help="folder to write (replaced atomically if it holds an earlier export)")
    p.add_argument("--weights", choices=("student", "teacher"), default="student",
                   help="pretraining checkpoints: the student or the EMA teacher")
    p.add_argument("--tokenizer", default=None,
                   help="SentencePiece model or letters.json to include (default: a fine-tune's own)")
    p.set_defaults(func=export_cmd)
    p = sub.add_parser("import", help="a Hugging Face Data2Vec* folder or an original fairseq/BEiT data2vec 1.0 or "
                                      "2.0 checkpoint as a d2v pretraining final.pt (for d2v finetune)")
    p.add_argument("source", help="HF model folder (config.json) or fairseq/BEiT .pt/.pth file")
    p.add_argument("out", help="the final.pt to write")
    p.add_argument("--kind", choices=MODALITIES, default=None, help="default: read off the checkpoint")
    p.set_defaults(func=import_cmd)


def _add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """The results report, the rehearsal and the stage table."""
    p = sub.add_parser("report", help="results/**/*.json → summary.md/.csv and plots; or --compare REV")
    p.add_argument("--compare", metavar="REV", default=None, help="print metric deltas of REV → the work tree")
    p.add_argument("--against", metavar="REV", default=None, help="compare REV with this revision instead")
    _add_profile(p)
    p.set_defaults(func=report_cmd)
    p = sub.add_parser("rehearse", help="every training stage of a profile takes one step here on synthetic inputs "
                       "of its configured shapes (before a cluster run)")
    p.add_argument("--batch", type=_rehearsal_batch, default=2,
                   help="examples per stage (default 2), or 'config': each stage's configured per-GPU micro-batch at "
                   "its longest inputs (the memory pre-flight on a GPU)")
    p.add_argument("--out", default=None, help="also write the results as JSON (e.g. results/bench/rehearsal_*.json)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--stage", action="append", default=[], metavar="'KIND NAME'",
                   help="only this stage, e.g. --stage 'pretrain text' --stage 'finetune glue_rte'")
    _add_profile(p)
    p.set_defaults(func=rehearse_cmd)
    p = sub.add_parser("pipeline", help="the stage table: list it, write dvc.yaml from it, or check dvc.yaml")
    p.add_argument("action", choices=("stages", "dvc", "check"))
    p.add_argument("--out", default="dvc.yaml")
    _add_profile(p)
    p.set_defaults(func=pipeline_cmd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2v", description="data2vec for images, speech and text")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_setup_commands, _add_data_commands, _add_training_commands, _add_checkpoint_commands,
                _add_pipeline_commands):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"error: {error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one inside a step: no traceback
        if os.environ.get("RANK", "0") == "0":  # once under torchrun
            print(f"\nd2v {args.command}: interrupted. Outputs are renamed into place only once complete, so nothing "
                  "is half-written: the same command starts again (a training run from its last checkpoint)",
                  file=sys.stderr)
        return 130  # 128 + SIGINT, as the shell reports a process Ctrl-C ended


def error_message(err: BaseException) -> str:
    """The error in its own words. torch re-raises a data loader worker's exception with the worker's traceback as
    its message ("Caught ShardError in DataLoader worker process 0. Original Traceback ..."): keep what the error
    said, and where."""
    text = str(err)
    first, _, rest = text.partition("\n")
    said = rest.rfind(f"{type(err).__name__}: ")
    if not (first.startswith("Caught ") and rest.startswith("Original Traceback") and said >= 0):
        return text
    return f"{rest[said + len(type(err).__name__) + 2:].rstrip()} ({first.removeprefix('Caught ').rstrip('.')})"


if __name__ == "__main__":
    sys.exit(main())
