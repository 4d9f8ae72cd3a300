"""Shards, readers and tokenizers on small prepared sources built in the test."""
import io
import itertools
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset
from fixtures import flac_bytes
from PIL import Image

from d2v.data.loaders import AudioConfig, ImageAugConfig, crop_to_shortest, image_loader, pack_blocks, \
    pad_waveforms, seekable_text_task_batches, speech_loader, text_pretrain_loader, text_task_loader
from d2v.data.download import file_digest
from d2v.data.manifest import make_manifest, write_manifest
from d2v.data.shards import ShardConfig, ShardError, read_index, write_shards
from d2v.data.tokenizer import LetterTokenizer, SentencePieceConfig, TextTokenizer, build_letter_vocab, \
    train_sentencepiece


def _image_source(root, n=30, broken=(), missing=(), changed=()):
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((28, 28), i * 8, dtype=np.uint8)).save(buf, "PNG")
        data = buf.getvalue()
        rel = f"train/{i % 3}/img_{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\x89PNG broken" if i in broken else data + (b"x" if i in changed else b""))
        if i in missing:
            (root / rel).unlink()
        import hashlib
        rows.append(dict(id=f"img_{i:03d}", path=rel, split="train", bytes=len(data), label=i % 3,
                         sha256=hashlib.sha256(b"\x89PNG broken" if i in broken else data).hexdigest()))
    write_manifest(root, make_manifest(rows), source="fashion_mnist")
    return root


def test_image_shards_are_deterministic_indexed_and_skip_bad_files(tmp_path, caplog):
    src = _image_source(tmp_path / "src", broken=(3,), missing=(5,), changed=(7,))
    cfg = ShardConfig(max_count=8)
    a = write_shards(src, "train", tmp_path / "a", cfg)
    b = write_shards(src, "train", tmp_path / "b", cfg)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]  # byte-identical
    assert a["count"] == 27 and [s["count"] for s in a["shards"]] == [8, 8, 8, 3]
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:  # plain ustar members, no PAX header each (1 KB)
        members = tar.getmembers()
    assert len(members) == 16 and not any(m.pax_headers for m in members) and {m.mtime for m in members} == {0}
    assert members[1].offset_data == members[1].offset + 512
    reasons = {f["path"].split("/")[-1]: f["reason"].split(":")[0].split(" (")[0] for f in a["skipped"]["files"]}
    assert reasons == {"img_003.png": "undecodable", "img_005.png": "missing",
                       "img_007.png": "sha256 differs from the manifest"}
    assert "img_005.png" in caplog.text
    assert read_index(tmp_path / "a", verify=True)["count"] == 27
    with open(tmp_path / "a" / "shard-000001.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ShardError, match="shard-000001.tar: 1000 bytes, index says"):
        read_index(tmp_path / "a")


def test_shards_are_byte_for_byte_what_webdatasets_shard_writer_writes(tmp_path):
    """TarShards stands in for webdataset's ShardWriter (whose import brings torch into every shard job): the same
    tars for every field type shards hold, and the same cut into tars by sample count and by payload bytes."""
    from d2v.data.shards import TarShards

    rng = np.random.default_rng(0)
    samples = []
    for i in range(23):
        samples += [{"__key__": f"img{i}", "png": rng.bytes(int(rng.integers(10, 400))), "cls": int(i % 10)},
                    {"__key__": f"utt{i}", "flac": rng.bytes(300), "txt": "A CAT'S TALE ü",
                     "json": {"duration": 1.5, "speaker": "s", "labels": [0, 137]}},
                    {"__key__": f"txt{i}", "ids.npy": rng.integers(0, 8000, int(rng.integers(1, 50)))},
                    {"__key__": f"task{i}", "json": {"text": "ok", "text_b": None, "label": 1.0}}]
    for maxcount, maxsize in ((10_000, 64 << 20), (7, 64 << 20), (10_000, 2000)):
        ours, theirs = tmp_path / f"ours-{maxcount}-{maxsize}", tmp_path / f"wds-{maxcount}-{maxsize}"
        ours.mkdir()
        theirs.mkdir()
        with TarShards(str(ours / "shard-%06d.tar"), maxcount, maxsize) as sink:
            for sample in samples:
                sink.write(sample)
        with webdataset.ShardWriter(str(theirs / "shard-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0,
                                    mtime=0) as sink:
            for sample in samples:
                sink.write(sample)
        names = sorted(p.name for p in theirs.iterdir())
        assert len(names) > (1 if (maxcount, maxsize) != (10_000, 64 << 20) else 0)
        assert sorted(p.name for p in ours.iterdir()) == names
        assert all((ours / n).read_bytes() == (theirs / n).read_bytes() for n in names)
    with pytest.raises(ShardError, match=r"no encoding for a .pth field of type dict"):
        with TarShards(str(tmp_path / "x-%d.tar"), 10, 1000) as sink:
            sink.write({"__key__": "a", "pth": {"w": 1}})


@pytest.mark.parametrize("text, problem", [
    ('{"shards": [', r"not a shard index \(Expecting value"),
    ('[1, 2]', r"not a shard index \(expected an object with a 'shards' list"),
    ('{"count": 3}', r"not a shard index \(expected an object with a 'shards' list"),
    ('{"shards": [{"name": "shard-000000.tar", "bytes": "12", "count": 3}]}',
     r"shards\[0\] has no valid bytes, sha256"),
    ('{"shards": ["shard-000000.tar"]}', r"shards\[0\] has no valid name, bytes, count, sha256"),
])
def test_a_damaged_shard_index_is_named_with_what_is_wrong(tmp_path, text, problem):
    (tmp_path / "index.json").write_text(text)
    with pytest.raises(ShardError, match=f"{tmp_path / 'index.json'}: {problem}"):
        read_index(tmp_path)


def _shard_ids(shard_dir) -> list[str]:
    return [b["__key__"] for b in webdataset.WebDataset(sorted(str(p) for p in shard_dir.glob("*.tar")),
                                                         shardshuffle=False)]


def test_limit_keeps_the_first_rows_or_a_seeded_sample_in_manifest_order(tmp_path):
    src = _image_source(tmp_path / "src", n=30)

    def keys(name: str, **cut) -> list[str]:
        index = write_shards(src, "train", tmp_path / name, **cut)
        assert (index["rows"], index["limit"], index["sample_seed"]) == (6, 6, cut.get("sample_seed"))
        return _shard_ids(tmp_path / name)

    first = keys("first", limit=6)
    assert first == [f"img_{i:03d}" for i in range(6)]
    drawn, again, other = (keys(f"s{seed}-{k}", limit=6, sample_seed=seed) for seed, k in ((0, 0), (0, 1), (1, 0)))
    assert drawn == again and drawn != other  # the seed decides the sample
    assert drawn == sorted(drawn) and len(set(drawn)) == 6 and drawn != first  # distinct rows, manifest order
    assert write_shards(src, "train", tmp_path / "all", limit=99, sample_seed=0)["count"] == 30
    with pytest.raises(ShardError, match="train: sample_seed=3 needs a limit"):
        write_shards(src, "train", tmp_path / "x", sample_seed=3)
    assert not (tmp_path / "x").exists()


def test_image_transforms_keep_colour_at_three_channels_and_take_luminance_at_one():
    """A pure red image stays red for a 3-channel encoder in every mode (the transforms once turned it grey), a grey
    one is repeated over the channels, and a 1-channel encoder sees the red image's luminance."""
    from d2v.data.loaders import _decode_image, image_transform

    def png(array):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "PNG")
        return {"png": buf.getvalue(), "cls": 0}

    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    rgb = ImageAugConfig(size=16, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0, color_jitter=0.0,
                         randaugment_magnitude=0, random_erasing=0.0)
    for mode in ("eval", "finetune", "pretrain"):
        x, _ = _decode_image(png(red), image_transform(rgb, mode))
        assert x.shape == (3, 16, 16) and torch.allclose(x.mean((1, 2)), torch.tensor([1.0, -1.0, -1.0])), mode
    grey, _ = _decode_image(png(np.full((32, 32), 51, np.uint8)), image_transform(rgb, "eval"))
    assert torch.allclose(grey, torch.full((3, 16, 16), 51 / 255 / 0.5 - 1))
    one = ImageAugConfig(size=16, channels=1, mean=(0.5,), std=(0.5,), crop_pct=1.0)
    luma, _ = _decode_image(png(red), image_transform(one, "eval"))
    assert luma.shape == (1, 16, 16) and luma.mean().item() == pytest.approx(76 / 255 / 0.5 - 1, abs=0.01)


def test_image_reader_eval_pass_is_complete_and_ordered(tmp_path):
    src = _image_source(tmp_path / "src", n=20)
    write_shards(src, "train", tmp_path / "s", ShardConfig(max_count=6))
    cfg = ImageAugConfig(size=32, channels=1, mean=(0.5,), std=(0.5,), crop_pct=1.0)
    batches = list(image_loader(tmp_path / "s", cfg, "eval", batch_size=8))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (20, 1, 32, 32) and y.tolist() == [i % 3 for i in range(20)]
    expected = (np.arange(20) * 8 / 255 - 0.5) / 0.5  # constant images keep their value through resize
    np.testing.assert_allclose(x.mean(dim=(1, 2, 3)).numpy(), expected, atol=1e-3)
    pre = next(iter(image_loader(tmp_path / "s", cfg.model_copy(update={"channels": 3, "mean": (0.5,) * 3,
                                                                         "std": (0.5,) * 3}), "pretrain", 4)))
    assert pre[0].shape == (4, 3, 32, 32)


def test_ranks_read_disjoint_shards_covering_everything(tmp_path, monkeypatch):
    src = _image_source(tmp_path / "src", n=24)
    write_shards(src, "train", tmp_path / "s", ShardConfig(max_count=6))
    cfg = ImageAugConfig(size=28, channels=1, mean=(0.5,), std=(0.5,), crop_pct=1.0)
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        values = torch.cat([b[0].mean(dim=(1, 2, 3)) for b in image_loader(tmp_path / "s", cfg, "eval", 4)])
        seen.append(set(np.round((values.numpy() * 0.5 + 0.5) * 255 / 8).astype(int).tolist()))
    assert not (seen[0] & seen[1]) and seen[0] | seen[1] == set(range(24)) and len(seen[0]) == 12


def test_resampled_mode_is_infinite_and_seeded(tmp_path):
    src = _image_source(tmp_path / "src", n=10)
    write_shards(src, "train", tmp_path / "s", ShardConfig(max_count=5))
    cfg = ImageAugConfig(size=28, channels=1, mean=(0.5,), std=(0.5,))

    def labels(seed):
        torch.manual_seed(0)
        it = iter(image_loader(tmp_path / "s", cfg, "pretrain", 5, seed=seed, shuffle=4))
        return [next(it)[1].tolist() for _ in range(6)]  # 30 samples from 10: it must wrap around
    assert labels(1) == labels(1)


def _speech_source(root):
    rows = []
    for i, seconds in enumerate((1.0, 2.5, 0.3, 1.7)):
        rel = f"s/{i}.flac"
        (root / "s").mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(flac_bytes(seconds, freq=200 + 50 * i))
        rows.append(dict(id=f"u{i}", path=rel, split="train", duration=seconds, text=f"WORD {'AB'[i % 2]}'S"))
    write_manifest(root, make_manifest(rows), source="mini_librispeech")
    return root


def test_speech_reader_normalises_crops_and_pads(tmp_path):
    write_shards(_speech_source(tmp_path / "src"), "train", tmp_path / "s")
    cfg = AudioConfig(min_samples=8000, max_samples=24000)
    letters = LetterTokenizer(build_letter_vocab(["WORD A'S", "WORD B'S"]))
    fine = list(speech_loader(tmp_path / "s", cfg, "eval", 8, letters=letters))[0]
    lengths = (~fine["batch"].padding_mask).sum(1).tolist()
    assert lengths == [16000, 40000, 4800, 27200]  # eval scores every utterance, uncropped (0.3 s < min_samples)
    train = speech_loader(tmp_path / "s", cfg, "finetune", 1, letters=letters, resampled=False, shuffle=0)
    assert [b["batch"].source.shape[1] for b in train] == [16000]  # training drops the too short and too long
    wave = fine["batch"].source[0, :16000]
    assert abs(wave.mean().item()) < 1e-3 and wave.std().item() == pytest.approx(1.0, abs=1e-3)
    assert letters.decode(fine["targets"][:fine["target_lengths"][0]].tolist()) == "WORD A'S"
    pre = next(iter(speech_loader(tmp_path / "s", cfg, "pretrain", 3, shuffle=0)))
    assert pre.source.shape == (3, 16000) and pre.padding_mask is None  # cropped to the shortest


def test_crop_and_pad_collation():
    items = [(torch.arange(10.0), "A"), (torch.arange(4.0), "B")]
    batch = crop_to_shortest(items, np.random.default_rng(0))
    assert batch.source.shape == (2, 4) and torch.equal(batch.source[1], torch.arange(4.0))
    assert (batch.source[0][1:] - batch.source[0][:-1] == 1).all()  # a contiguous crop
    padded = pad_waveforms(items)["batch"]
    assert padded.padding_mask.tolist()[1] == [False] * 4 + [True] * 6 and padded.source[1, 4:].abs().sum() == 0


def test_corrupt_audio_in_a_shard_is_skipped_with_a_warning(tmp_path, caplog):
    import webdataset as wds
    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "shard-000000.tar")) as sink:
        sink.write({"__key__": "good", "flac": flac_bytes(1.0), "txt": "A"})
        sink.write({"__key__": "bad", "flac": b"not audio", "txt": "B"})
    tar = tmp_path / "s" / "shard-000000.tar"
    (tmp_path / "s" / "index.json").write_text(json.dumps({"shards": [
        {"name": tar.name, "bytes": os.path.getsize(tar), "count": 2, "sha256": file_digest(tar)}]}))
    out = list(speech_loader(tmp_path / "s", AudioConfig(min_samples=0), "eval", 4))
    assert out[0]["text"] == ["A"] and "skipping bad" in caplog.text


def test_a_shard_cut_short_by_a_corrupt_tar_header_is_an_error_not_a_smaller_dataset(tmp_path):
    """Python's tarfile ends a stream silently at a bad header; the reader compares each shard with index.json."""
    import tarfile

    import webdataset as wds
    (tmp_path / "s").mkdir()
    tar = tmp_path / "s" / "shard-000000.tar"
    with wds.TarWriter(str(tar)) as sink:
        for i in range(5):
            sink.write({"__key__": f"u{i}", "flac": flac_bytes(0.5), "txt": "A"})
    (tmp_path / "s" / "index.json").write_text(json.dumps({"shards": [
        {"name": tar.name, "bytes": os.path.getsize(tar), "count": 5, "sha256": file_digest(tar)}]}))
    assert len(list(speech_loader(tmp_path / "s", AudioConfig(min_samples=0), "eval", 1))) == 5
    with tarfile.open(tar) as t:
        header = [m.offset for m in t if m.name.startswith("u2.")][0]
    with open(tar, "r+b") as f:  # same size, so the index's byte count still matches: the name field overwritten
        f.seek(header)
        f.write(b"garbage" * 8)
    for mode in ("eval", "pretrain"):  # a single pass, and the resampled stream of pretraining
        batches = speech_loader(tmp_path / "s", AudioConfig(min_samples=0), mode, 1)
        with pytest.raises(ShardError, match=r"shard-000000.tar: 2 samples read, index.json says 5; the tar is "
                                             r"corrupt"):
            list(itertools.islice(batches, 10))


def test_text_packing_and_tasks(tmp_path):
    chunks = [{"ids.npy": np.arange(10, 15)}, {"ids.npy": np.arange(20, 27)}, {"ids.npy": np.arange(30, 33)}]
    blocks = list(pack_blocks(5, bos=0)(iter(chunks)))
    assert [b.tolist() for b in blocks] == [[0, 10, 11, 12, 13], [0, 14, 20, 21, 22], [0, 23, 24, 25, 26]]
    corpus = tmp_path / "corpus"
    (corpus / "d").mkdir(parents=True)
    lines = [f"Paragraph {i} talks about the weather and the garden, and then about tea." for i in range(300)]
    (corpus / "d" / "a.txt").write_text("\n\n".join(lines))
    write_manifest(corpus, make_manifest([dict(id="a", path="d/a.txt", split="pretrain")]), source="text_corpus")
    spm_cfg = SentencePieceConfig(vocab_size=60, num_threads=1, seed_sentencepiece_size=10_000)
    model = train_sentencepiece(lines, tmp_path / "tok" / "spm.model", spm_cfg)
    again = train_sentencepiece(lines, tmp_path / "tok2" / "spm.model", spm_cfg)
    assert model.read_bytes() == again.read_bytes()  # deterministic for pinned num_threads
    tok = TextTokenizer(model)
    assert tok.vocab_size == 60 and tok.mask == 59 and tok.decode(tok.encode(lines[0])) == lines[0]
    assert tok.encode("tea", "garden").tolist()[-1] == tok.eos and tok.encode("a " * 50, max_tokens=8).size == 8
    pair = tok.encode(" ".join(lines[:20]), "tea garden", max_tokens=24).tolist()  # longest-first truncation
    assert len(pair) == 24 and tok.decode(pair[pair.index(tok.eos) + 2:]) == "tea garden"
    index = write_shards(corpus, "pretrain", tmp_path / "ts", ShardConfig(chunk_tokens=64), tokenizer=tok)
    stored = sum(len(tok.sp.encode(line)) + 1 for line in lines)
    assert index["count"] == -(-stored // 64)
    batch = next(iter(text_pretrain_loader(tmp_path / "ts", 32, 4, resampled=False, shuffle=0)))
    assert batch.source.shape == (4, 32) and (batch.source[:, 0] == tok.bos).all()
    task = tmp_path / "task"
    task.mkdir()
    rows = [dict(id=f"t{i}", split="train", label=float(i % 2), text="tea " * (i + 1), text_b="garden")
            for i in range(3)]
    write_manifest(task, make_manifest(rows), source="rt_polarity", task="single_sentence_classification")
    write_shards(task, "train", tmp_path / "tt")
    out = next(iter(text_task_loader(tmp_path / "tt", tok, 8, 64, "eval")))
    assert out["labels"].tolist() == [0.0, 1.0, 0.0]
    assert out["batch"].padding_mask[0].sum() > 0 and not out["batch"].padding_mask[2].any()
    lengths = lambda b: (b["batch"].source != tok.pad).sum(1).tolist()  # noqa: E731
    seekable = [next(iter(seekable_text_task_batches(tmp_path / "tt", tok, 2, 64, seed=0, start=k))) for k in range(3)]
    places = sum((lengths(b) for b in seekable), [])
    assert sorted(places[:3]) == sorted(lengths(out)) and places[3:6] != places[:3]  # an epoch each, reshuffled


def test_a_text_corpus_is_read_as_a_stream_from_input_file_to_token_chunks(tmp_path):
    """Preparing and sharding a one-file corpus (BookCorpus comes as one) holds a line and a chunk at a time, not
    the file: Python's peak allocation stays far below the file's 2.4 MB, where reading it whole took several
    times its size; the chunks are those of the whole token stream cut every chunk_tokens, and the tokenizer's
    sample of lines is the same on every run."""
    import tracemalloc

    from d2v.data.manifest import Skipped, read_manifest
    from d2v.data.shards import _samples
    from d2v.data.sources import Context, user_text
    from d2v.data.tokenizer import corpus_lines
    lines = [f"Paragraph {i % 97} talks about the weather and the garden, and then about tea." for i in range(32_000)]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "books.txt").write_text("\n".join(lines))
    spm_cfg = SentencePieceConfig(vocab_size=40, num_threads=1, seed_sentencepiece_size=10_000, sample_lines=3000)
    models = [train_sentencepiece(lines, tmp_path / f"tok{k}" / "spm.model", spm_cfg).read_bytes() for k in range(2)]
    assert models[0] == models[1]
    tok = TextTokenizer(tmp_path / "tok0" / "spm.model")
    tracemalloc.start()
    try:
        user_text.prepare(Context(tmp_path / "cache", tmp_path / "corpus"), paths=[str(tmp_path / "in" / "*")],
                          volume_mb=4.0)
        prepare_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        df = read_manifest(tmp_path / "corpus", "pretrain")
        chunks = [s["ids.npy"] for s in _samples(tmp_path / "corpus", df, "text_corpus", ShardConfig(chunk_tokens=64),
                                                 tok, Skipped())]
        shard_peak = tracemalloc.get_traced_memory()[1] - sum(c.nbytes + 200 for c in chunks)
    finally:
        tracemalloc.stop()
    size = (tmp_path / "in" / "books.txt").stat().st_size
    assert size > 2_000_000 and len(df) == 1 and list(corpus_lines(tmp_path / "corpus")) == lines
    assert prepare_peak < size / 8 and shard_peak < size / 8, (prepare_peak, shard_peak)
    stream = np.concatenate([[*tok.sp.encode(line), tok.eos] for line in lines])
    assert all(len(c) == 64 for c in chunks[:-1]) and np.array_equal(np.concatenate(chunks), stream)


def test_a_vocabulary_larger_than_the_corpus_can_fill_names_the_largest_that_fits(tmp_path):
    lines = ["Hello world.", "Second line here."]
    with pytest.raises(ValueError, match=r"vocab_size 200 \(199 SentencePiece pieces \+ <mask>\) is more than this "
                                         r"corpus can fill; at most (\d+)") as err:
        train_sentencepiece(lines, tmp_path / "spm.model", SentencePieceConfig(vocab_size=200, num_threads=1))
    most = int(err.value.args[0].split("at most ")[1].split(" ")[0])
    model = train_sentencepiece(lines, tmp_path / "spm.model", SentencePieceConfig(vocab_size=most, num_threads=1))
    assert TextTokenizer(model).vocab_size == most
    assert json.loads((tmp_path / "spm.json").read_text())["mask_id"] == most - 1


def test_the_tokenizers_line_sample_is_uniform_and_the_same_in_every_process(tmp_path):
    """`sample_lines` (the smoke and paper profiles') once left the sample to SentencePiece, whose model then differed
    in every process despite its generator seed: the smoke tokenizer, and so every text result, changed run to run."""
    import subprocess
    import sys

    from d2v.data.tokenizer import sample_lines_seeded

    items = [str(i) for i in range(20)]
    assert sample_lines_seeded(items, 5) == sample_lines_seeded(iter(items), 5) != sample_lines_seeded(items, 5, 1)
    assert sample_lines_seeded(items, 30) == items and len(set(sample_lines_seeded(items, 5))) == 5
    counts = Counter(x for seed in range(4000) for x in sample_lines_seeded(items, 5, seed))
    assert all(abs(counts[x] / 4000 - 0.25) < 0.03 for x in items)  # each item in k/n of the samples
    corpus = tmp_path / "lines.txt"
    words = "the garden tea weather rain walked morning letter sister house evening".split()
    rng = np.random.default_rng(0)
    corpus.write_text("\n".join(" ".join(rng.choice(words, 12)) + f" {i}" for i in range(4000)))
    code = ("import hashlib, sys\n"
            "from d2v.data.tokenizer import SentencePieceConfig, paragraphs, train_sentencepiece\n"
            "cfg = SentencePieceConfig(vocab_size=60, num_threads=2, seed_sentencepiece_size=10_000,\n"
            "                          sample_lines=500)\n"
            "print(hashlib.sha256(train_sentencepiece(paragraphs(sys.argv[1]), sys.argv[2], cfg).read_bytes())"
            ".hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / f"spm{i}.model")],
                              capture_output=True, text=True, check=True).stdout for i in range(2)}
    assert len(digests) == 1


def test_text_corpus_needs_a_tokenizer(tmp_path):
    write_manifest(tmp_path, make_manifest([dict(id="a", path="a.txt", split="pretrain")]), source="text_corpus")
    with pytest.raises(ShardError, match="pass the SentencePiece tokenizer"):
        write_shards(tmp_path, "pretrain", tmp_path / "out")


def test_letter_vocabulary_round_trip_and_unknown_characters():
    letters = LetterTokenizer(build_letter_vocab(["AAB C", "B'"], alphabet=""))
    assert letters.symbols == ["<blank>", "|", "A", "B", "'", "C"]
    assert letters.decode(letters.encode("AB C'")) == "AB C'"
    with pytest.raises(ValueError, match="character 'Z'"):
        letters.encode("Z")
    full = build_letter_vocab(["AAB C", "B'"])  # the LibriSpeech alphabet is always there, unseen letters last
    assert full[:6] == ["<blank>", "|", "A", "B", "'", "C"] and len(full) == 2 + 27 and full[-1] == "Z"
    with pytest.raises(ValueError, match="character 'é'"):
        LetterTokenizer(full).encode("CAFé")


def test_audio_fixture_is_real_flac():
    x, rate = sf.read(io.BytesIO(flac_bytes(0.5)))
    assert rate == 16000 and len(x) == 8000


def test_cli_shard_and_prepare_errors(tmp_path, capsys):
    from d2v.cli import main

    _image_source(tmp_path / "raw" / "imgs", n=9)
    assert main(["shard", "imgs", "--split", "train", "--root", str(tmp_path), "--max-count", "4"]) == 0
    assert read_index(tmp_path / "shards" / "imgs" / "train")["count"] == 9
    assert main(["shard", "imgs", "--split", "dev", "--root", str(tmp_path)]) == 2
    assert "no rows with split 'dev'" in capsys.readouterr().err
    assert main(["prepare", "lee_sts", "--set", "fold=x=1", "--set", "colour=red"]) == 2
    assert "lee_sts: unknown option(s) ['colour']" in capsys.readouterr().err
    assert main(["prepare", "lee_sts", "--set", "folds=five"]) == 2  # checked before anything is read or written
    assert "lee_sts.folds: Input should be a valid integer" in capsys.readouterr().err
    assert main(["prepare", "imagenet", "--root", str(tmp_path)]) == 2
    assert "give exactly one of archives=" in capsys.readouterr().err


def test_a_subset_no_row_has_is_an_error_not_an_empty_shard_set(tmp_path):
    rows = [dict(id=f"t{i}", split="train", label=0.0, text="tea", subsets=tags)
            for i, tags in enumerate(["10min|1h|10h", "1h|10h", "10h"])]
    write_manifest(tmp_path / "task", make_manifest(rows), source="rt_polarity", task="single_sentence_classification")
    counts = {s: write_shards(tmp_path / "task", "train", tmp_path / s, subset=s)["count"] for s in ("10min", "1h")}
    assert counts == {"10min": 1, "1h": 2}
    with pytest.raises(ShardError, match=r"train: no row has subset '1hr'; its subsets are \['10h', '10min', '1h'\]"):
        write_shards(tmp_path / "task", "train", tmp_path / "1hr", subset="1hr")
    assert not (tmp_path / "1hr").exists()


def test_a_split_whose_every_sample_is_skipped_is_an_error_not_an_empty_shard_set(tmp_path):
    rows = [dict(id=f"i{k}", path=f"img/{k}.png", split="train", label=0.0) for k in range(2)]
    write_manifest(tmp_path / "src", make_manifest(rows), source="fashion_mnist")
    with pytest.raises(ShardError, match=r"src/train: no sample could be written \(2 rows, 2 skipped; the first: "
                                         r"img/0.png: missing\)"):
        write_shards(tmp_path / "src", "train", tmp_path / "out")
    assert not (tmp_path / "out").exists()
