"""Seekable pretraining streams (`stream_resume: seek`): random access into the shards, a per-epoch order split over
ranks, batches that start anywhere and do not depend on the worker count."""
import io
import itertools
import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch
import webdataset
from fixtures import token_shards, tone_speech, tone_task_shards
from PIL import Image

from d2v.config import AudioConfig, ImageAugConfig
from d2v.data import loaders
from d2v.data.manifest import make_manifest, write_manifest
from d2v.data.seekable import RankOrder, ShardTable, TarIndex, TokenBlocks, ustar_members
from d2v.data.shards import ShardConfig, ShardError, write_shards
from d2v.data.tokenizer import LetterTokenizer
from d2v.train.batches import pretrain_stream
from d2v.train.config import DataConfig

IMAGE = ImageAugConfig(size=16, channels=1, mean=(0.5,), std=(0.5,), min_scale=0.3, color_jitter=0.0)


@pytest.fixture
def image_shards(tmp_path):
    """22 PNGs of distinct grey levels (the level names the sample) in shards of 6, 6, 6 and 4."""
    rows = []
    for i in range(22):
        buf = io.BytesIO()
        Image.fromarray(np.full((20, 20), 10 * i, dtype=np.uint8)).save(buf, "PNG")
        (tmp_path / "raw").mkdir(exist_ok=True)
        (tmp_path / "raw" / f"{i}.png").write_bytes(buf.getvalue())
        rows.append(dict(id=f"im{i:02d}", path=f"{i}.png", split="train", label=i % 3))
    write_manifest(tmp_path / "raw", make_manifest(rows), source="fashion_mnist")
    write_shards(tmp_path / "raw", "train", tmp_path / "shards", ShardConfig(max_count=6))
    return tmp_path / "shards"


def stream_batches(shards, start: int, count: int, workers: int = 0, batch_size: int = 4) -> list[torch.Tensor]:
    data = DataConfig(shards=str(shards), batch_size=batch_size, image=IMAGE, num_workers=workers)
    return [b.source for b in itertools.islice(pretrain_stream("image", data, 7, "seek")(start), count)]


def test_the_tar_index_reads_every_sample_webdataset_reads_in_the_same_order(image_shards):
    index = TarIndex(image_shards)
    sequential = list(webdataset.WebDataset([str(p) for p in index.paths], shardshuffle=False))
    assert len(index) == len(sequential) == 22 and index.counts == [6, 6, 6, 4]
    for n, expected in enumerate(sequential):
        sample = index[n]
        assert sample["__key__"] == expected["__key__"] and set(sample) - {"__url__"} == \
            set(expected) - {"__url__", "__local_path__"}
        assert all(sample[ext] == expected[ext] for ext in ("png", "cls"))
    with pytest.raises(IndexError):
        index[22]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_the_header_reader_agrees_with_tarfile_in_every_format(tmp_path, fmt):
    """pax (what d2v's shards and webdataset's writer use), plain ustar with a prefix field, and GNU long names,
    which are left to tarfile."""
    path = tmp_path / "t.tar"
    long_name = "c" * 120 + "/x.png" if fmt == tarfile.USTAR_FORMAT else "b" * 120 + "/0002.png"  # a prefix field
    names = ["a/0001.png", "a/0001.cls", long_name, "d/0003.flac"]
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 700 * i + 1, 0.5 if fmt == tarfile.PAX_FORMAT else 0
            tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    fast = ustar_members(path)
    assert fast == (None if fmt == tarfile.GNU_FORMAT else expected)
    table = ShardTable.of(expected)
    assert [k.decode() for k in table.keys] == ["a/0001", names[2].split(".")[0], "d/0003"]
    assert table.parts(0) == {"png": expected[0][1:], "cls": expected[1][1:]}


def test_a_tar_that_disagrees_with_its_index_is_named(image_shards):
    meta = json.loads((image_shards / "index.json").read_text())
    meta["shards"][1]["count"] = 7
    (image_shards / "index.json").write_text(json.dumps(meta))
    index = TarIndex(image_shards)
    assert index[0]["__key__"]  # shard 0 is fine; shard 1 is read only when a sample of it is
    with pytest.raises(ShardError, match=r"shard-000001.tar: 6 samples in the tar, index.json says 7"):
        index[7]
    tar = image_shards / "shard-000002.tar"
    tar.write_bytes(b"\x00garbage" * (tar.stat().st_size // 8))  # same size: read_index lets it through
    with pytest.raises(ShardError, match=r"shard-000002.tar: (unreadable tar|0 samples in the tar)"):
        TarIndex(image_shards)[13]


def test_each_epoch_is_one_permutation_that_the_ranks_split():
    n, world = 11, 3
    orders = [RankOrder(n, seed=5, rank=r, world=world) for r in range(world)]
    per_rank = n // world
    for epoch in range(3):
        places = [[o[epoch * per_rank + i] for i in range(per_rank)] for o in orders]
        flat = sum(places, [])
        assert len(set(flat)) == len(flat) == 9 and set(flat) <= set(range(n))  # disjoint ranks, 2 left over
    epoch0, epoch1 = ([orders[0][e * per_rank + i] for i in range(per_rank)] for e in (0, 1))
    assert epoch0 != epoch1
    assert [RankOrder(n, 5, 1, world)[t] for t in range(9)] == [orders[1][t] for t in range(9)]  # keyed, not drawn
    with pytest.raises(ShardError, match="2 samples cannot give each of 3 ranks one"):
        RankOrder(2, 5, 0, 3)


def test_a_seekable_stream_starts_at_any_batch_with_any_worker_count(image_shards, monkeypatch):
    straight = stream_batches(image_shards, 0, 12)  # 48 samples: the 5-sample epochs of 22 wrap twice
    assert [b.shape for b in straight] == [(4, 1, 16, 16)] * 12
    levels = torch.stack(straight).flatten(0, 1).amax(dim=(1, 2, 3))  # a uniform image stays uniform when cropped
    assert levels[:22].unique().numel() == 22  # the first epoch reads every sample once
    assert levels[22:44].unique().numel() == 22 and not torch.equal(levels[:22], levels[22:44])  # then reshuffles
    torch.manual_seed(0)
    training_rng = torch.get_rng_state()
    decoded = []
    decode = loaders._decode_image
    monkeypatch.setattr(loaders, "_decode_image", lambda *a: decoded.append(1) or decode(*a))
    resumed = stream_batches(image_shards, 9, 3)
    assert len(decoded) == 12  # the three batches read, nothing before them
    assert torch.equal(torch.get_rng_state(), training_rng)  # the crops drew from their own keyed generators
    assert all(torch.equal(a, b) for a, b in zip(resumed, straight[9:], strict=True))
    monkeypatch.undo()
    with_workers = stream_batches(image_shards, 5, 7, workers=2)
    assert all(torch.equal(a, b) for a, b in zip(with_workers, straight[5:], strict=True))


def test_ranks_read_disjoint_samples_of_each_epoch(image_shards, monkeypatch):
    """Under torchrun (RANK and WORLD_SIZE set), 2 ranks read 11 samples each of every 22-sample epoch, none twice."""
    levels = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        batches = stream_batches(image_shards, 0, 6, batch_size=2)  # places 0-11: one epoch and the next's first
        levels[rank] = torch.stack(batches).flatten(0, 1).amax(dim=(1, 2, 3))
    first_epoch = torch.cat([levels[0][:11], levels[1][:11]])
    assert first_epoch.unique().numel() == 22
    # one rank accumulating 2 micro-batches a step reads what the 2 ranks read together at each step (a checkpoint
    # continued on another number of ranks, d2v.train.checkpoint.rescaled)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    one = torch.stack(stream_batches(image_shards, 0, 12, batch_size=2)).flatten(0, 1).amax(dim=(1, 2, 3))
    for step in range(6):
        together = torch.cat([levels[0][2 * step:2 * step + 2], levels[1][2 * step:2 * step + 2]])
        assert sorted(one[4 * step:4 * step + 4].tolist()) == sorted(together.tolist())


def test_a_sample_that_fails_is_named_and_a_stand_in_keeps_the_batch_full(image_shards, monkeypatch, caplog):
    decode = loaders._decode_image

    def failing(sample, transform):
        if sample["__key__"] == "im03":
            raise OSError("broken PNG")
        return decode(sample, transform)
    monkeypatch.setattr(loaders, "_decode_image", failing)
    with caplog.at_level(logging.WARNING, logger="d2v.data"):
        batches = stream_batches(image_shards, 0, 6)
    assert [len(b) for b in batches] == [4] * 6
    assert "skipping im03 from" in caplog.text and "shard-000000.tar" in caplog.text and "broken PNG" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(stream_batches(image_shards, 3, 3), batches[3:], strict=True))


def test_speech_pretraining_reads_seekable_crops_with_stand_ins_for_short_utterances(tmp_path):
    rows = []
    (tmp_path / "raw").mkdir()
    for i, text in enumerate(["AB", "ABCABC", "A", "CCBBAA", "ABCCBA", "BACBAC", "CAB CAB", "AAB BBC"]):
        (tmp_path / "raw" / f"{i}.flac").write_bytes(tone_speech(text))
        rows.append(dict(id=f"u{i}", path=f"{i}.flac", split="train", duration=0.1, text=text))
    write_manifest(tmp_path / "raw", make_manifest(rows), source="mini_librispeech")
    write_shards(tmp_path / "raw", "train", tmp_path / "shards", ShardConfig(max_count=3))
    audio = AudioConfig(min_samples=8_000, max_samples=10_000)  # "A" (0.15 s) is too short, long ones are cut
    data = DataConfig(shards=str(tmp_path / "shards"), batch_size=3, audio=audio)
    stream = pretrain_stream("speech", data, 1, "seek")
    straight = [b.source for b in itertools.islice(stream(0), 8)]
    assert all(b.shape[0] == 3 and 8_000 <= b.shape[1] <= 10_000 for b in straight)
    assert all(torch.equal(a.source, b) for a, b in zip(itertools.islice(stream(6), 2), straight[6:], strict=True))


def test_ctc_fine_tuning_reads_seekable_padded_batches_with_their_letters(tmp_path):
    letters = tone_task_shards(tmp_path, ["AB", "BC", "CAB", "ABC", "CC"])
    tok = LetterTokenizer.load(letters)
    batches = [next(iter(loaders.seekable_speech_batches(tmp_path / "shards" / "tones" / "train", AudioConfig(
        min_samples=0, max_samples=160_000), "finetune", 2, seed=4, start=k, letters=tok))) for k in range(2)]
    texts = batches[0]["text"] + batches[1]["text"]
    assert len(set(texts)) == 4 and set(texts) <= {"AB", "BC", "CAB", "ABC", "CC"}  # 4 places of one epoch
    for b in batches:
        assert b["targets"].tolist() == [i for t in b["text"] for i in tok.encode(t).tolist()]
        assert b["target_lengths"].tolist() == [len(t) for t in b["text"]]
        assert b["batch"].padding_mask is None or b["batch"].padding_mask.shape == b["batch"].source.shape


def test_text_blocks_are_the_corpus_cut_as_fairseq_cuts_it(tmp_path):
    """Every chunk in shard order, one stream, cut into blocks of block_tokens - 1 ids, each led by <s>; a block spans
    several chunks (one of them empty) and shards; the tail is left out."""
    lengths = [7, 3, 0, 12, 5, 1, 9]
    stream = np.arange(1000, 1000 + sum(lengths))
    chunks = np.split(stream, np.cumsum(lengths)[:-1])
    shards = token_shards(tmp_path / "ts", [c.astype(np.uint16) for c in chunks], per_shard=3)
    blocks = TokenBlocks(shards, block_tokens=6, bos=0)
    assert (blocks.tokens, len(blocks), blocks.dtype) == (37, 7, np.uint16)  # 37 ids, 7 blocks of 5, 2 left out
    for b in range(7):
        assert blocks[b]["ids"].tolist() == [0, *stream[5 * b:5 * b + 5]]
    assert blocks[2]["__url__"].endswith("shard-000001.tar")  # ids 10-14: the last of chunk 1, chunk 3's first four
    with pytest.raises(IndexError):
        blocks[7]


def test_a_seekable_text_stream_starts_at_any_batch_and_reads_each_block_once_an_epoch(tmp_path):
    chunks = [np.arange(100 * i, 100 * i + 45, dtype=np.int32) for i in range(6)]  # 270 ids: 18 blocks of 1 + 15
    data = DataConfig(shards=str(token_shards(tmp_path / "ts", chunks, per_shard=4)), batch_size=3, block_tokens=16)
    stream = pretrain_stream("text", data, 2, "seek")
    straight = [b.source for b in itertools.islice(stream(0), 12)]  # two epochs of 6 batches
    assert all(b.shape == (3, 16) and b.dtype == torch.int64 and (b[:, 0] == 0).all() for b in straight)
    firsts = [torch.cat(straight[e * 6:(e + 1) * 6])[:, 1].tolist() for e in (0, 1)]  # a block's first id names it
    every_block = np.concatenate(chunks)[::15].tolist()
    assert sorted(firsts[0]) == sorted(firsts[1]) == every_block and firsts[0] != firsts[1]
    assert all(torch.equal(a.source, b) for a, b in zip(stream(7), straight[7:], strict=False))
    data_workers = data.model_copy(update={"num_workers": 2})
    resumed = itertools.islice(pretrain_stream("text", data_workers, 2, "seek")(4), 6)
    assert all(torch.equal(a.source, b) for a, b in zip(resumed, straight[4:10], strict=True))


@pytest.mark.parametrize("member, problem", [(b"not an array", "is not a .npy array"),
                                             (np.zeros(4, np.float32), "holds float32"),
                                             (np.zeros((2, 2), np.int32), r"holds int32\[2, 2\]")])
def test_a_chunk_that_is_not_token_ids_is_named(tmp_path, member, problem):
    token_shards(tmp_path / "ts", [np.arange(9), member, np.arange(5)], per_shard=3)
    with pytest.raises(ShardError, match=f"shard-000000.tar: doc-00001.ids.npy {problem}"):
        TokenBlocks(tmp_path / "ts", 4, 0)


@pytest.mark.parametrize("per_shard, where", [(2, r"ts/shard-000000.tar"), (1, r"ts")])
def test_chunks_of_two_id_types_are_refused_within_a_tar_or_across_tars(tmp_path, per_shard, where):
    token_shards(tmp_path / "ts", [np.arange(9, dtype=np.uint16), np.arange(9, dtype=np.int32)], per_shard)
    with pytest.raises(ShardError, match=rf"{where}: chunks stored as \['int32', 'uint16'\]; one id type expected"):
        TokenBlocks(tmp_path / "ts", 4, 0)


def test_shard_indexes_are_cached_by_path_size_and_time_and_rebuilt_when_unreadable(image_shards, tmp_path,
                                                                                     monkeypatch, caplog):
    from d2v.data import seekable

    monkeypatch.setenv("D2V_INDEX_CACHE", str(tmp_path / "cache"))
    scans, read = [], seekable.ustar_members
    monkeypatch.setattr(seekable, "ustar_members", lambda path: scans.append(path.name) or read(path))
    first = TarIndex(image_shards).index_all()
    assert len(scans) == 4 and len(list((tmp_path / "cache").glob("*.npz"))) == 4
    again = TarIndex(image_shards).index_all()
    assert len(scans) == 4  # every table from the cache
    assert all(again[n] == first[n] for n in range(22))
    shard = image_shards / "shard-000001.tar"
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # rewritten, as far as the cache can tell
    TarIndex(image_shards).index_all()
    assert scans[4:] == ["shard-000001.tar"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 4  # its entry replaced, not joined by a second
    for entry in (tmp_path / "cache").glob("*.npz"):
        entry.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="d2v.data"):
        rebuilt = TarIndex(image_shards).index_all()
    assert len(scans) == 9 and "cache entry" in caplog.text and "is unreadable" in caplog.text
    assert all(rebuilt[n] == first[n] for n in range(22))
    (image_shards / "index.json").write_text((image_shards / "index.json").read_text().replace('"count": 4',
                                                                                             '"count": 5'))
    with pytest.raises(ShardError, match="shard-000003.tar: 4 samples in the tar, index.json says 5"):
        TarIndex(image_shards).index_all()  # a cached table is checked against index.json as a scanned one
    monkeypatch.setenv("D2V_INDEX_CACHE", "off")
    off = TarIndex(image_shards)
    off.table(0)
    assert scans[-1] == "shard-000000.tar" and len(scans) == 10


def test_text_chunk_indexes_are_cached_too(tmp_path, monkeypatch):
    from d2v.data import seekable

    monkeypatch.setenv("D2V_INDEX_CACHE", str(tmp_path / "cache"))
    shards = token_shards(tmp_path / "ts", [np.arange(i, i + 9, dtype=np.uint16) for i in range(5)], per_shard=2)
    first = TokenBlocks(shards, 5, 0)
    read, headers = seekable.npy_ids, []
    monkeypatch.setattr(seekable, "npy_ids", lambda *a: headers.append(1) or read(*a))
    again = TokenBlocks(shards, 5, 0)
    assert headers == [] and len(again) == len(first) == 11
    assert all(np.array_equal(again[b]["ids"], first[b]["ids"]) for b in range(11))
    (shards / "index.json").write_text((shards / "index.json").read_text().replace('"count": 1', '"count": 2'))
    with pytest.raises(ShardError, match="shard-000002.tar: 1 samples in the tar, index.json says 2"):
        TokenBlocks(shards, 5, 0)  # read from the cache, still checked


def test_pruning_drops_the_entries_no_tar_matches_and_abandoned_temp_files(tmp_path, monkeypatch):
    from d2v.data import index_cache

    cache = tmp_path / "cache"
    monkeypatch.setenv("D2V_INDEX_CACHE", str(cache))
    shards = token_shards(tmp_path / "ts", [np.arange(i, i + 9, dtype=np.uint16) for i in range(6)], per_shard=2)
    TokenBlocks(shards, 5, 0)  # a tar table and a chunk table for each of 3 tars
    entries = {p.name for p in cache.glob("*.npz")}
    assert len(entries) == 6 and all(index_cache.stale(cache / e) is None for e in entries)
    (shards / "shard-000000.tar").unlink()
    changed = shards / "shard-000001.tar"
    os.utime(changed, ns=(0, changed.stat().st_mtime_ns + 1))
    np.savez(cache / "format1.npz", keys=np.arange(3))  # no source recorded
    (cache / "garbage.npz").write_bytes(b"garbage")
    (cache / ".abandoned.npz.x.tmp").write_bytes(b"partial")
    (cache / ".writing.npz.y.tmp").write_bytes(b"partial")
    os.utime(cache / ".abandoned.npz.x.tmp", (0, 0))
    pruned = {p.entry.name: p.why for p in index_cache.prune(cache)}
    assert len(pruned) == 7 and pruned["format1.npz"] == "written by an older d2v (no source recorded)"
    assert pruned["garbage.npz"].startswith("unreadable")
    assert pruned[".abandoned.npz.x.tmp"] == "left by a killed writer"
    assert sorted(why.rsplit("/", 1)[1] for why in pruned.values() if "shard-" in why) == [
        "shard-000000.tar is gone"] * 2 + ["shard-000001.tar changed since"] * 2
    kept = {p.name for p in cache.iterdir()}
    assert kept == {".writing.npz.y.tmp"} | (entries - pruned.keys()) and len(kept) == 3
    assert index_cache.prune(cache) == [] and index_cache.usage(cache)[0] == 2


def test_d2v_index_fills_the_cache_ahead_of_a_stream(image_shards, tmp_path, monkeypatch, capsys):
    from d2v import cli
    from d2v.data import seekable

    monkeypatch.setenv("D2V_INDEX_CACHE", str(tmp_path / "cache"))
    text = token_shards(tmp_path / "ts", [np.arange(i, i + 9, dtype=np.uint16) for i in range(5)], per_shard=2)
    assert cli.main(["index", str(image_shards), str(text)]) == 0
    out = capsys.readouterr().out
    assert f"{image_shards}: 22 samples in 4 tar(s)" in out and f"{text}: 5 samples, 45 tokens in 3 tar(s)" in out
    assert f"{tmp_path / 'cache'}: 10 entries" in out  # 4 image tar tables; 3 text tar and 3 chunk tables
    scans, headers = [], []
    monkeypatch.setattr(seekable, "ustar_members", lambda path: scans.append(path) or None)
    monkeypatch.setattr(seekable, "npy_ids", lambda *a: headers.append(a))
    assert len(TarIndex(image_shards).index_all()) == 22 and len(TokenBlocks(text, 5, 0)) == 11
    assert scans == [] and headers == []  # nothing read but the cache
    monkeypatch.setenv("D2V_INDEX_CACHE", "off")
    assert cli.main(["index", str(image_shards)]) == 2
    assert "D2V_INDEX_CACHE=off" in capsys.readouterr().err


def test_d2v_index_takes_a_profiles_seekable_training_shards():
    from d2v.cli import _seekable_shards
    from d2v.pipeline.params import load_params

    assert _seekable_shards(load_params("params.yaml", "embedded").active) == []  # replay throughout
    paper = _seekable_shards(load_params("params.yaml", "paper").active)
    assert set(paper) == {"data/paper/shards/imagenet/train", "data/paper/shards/librispeech/train-960",
                          "data/paper/shards/text_files/pretrain", "data/paper/shards/librispeech/train-clean-100"}


INDEX_FIRST_SCRIPT = """
import json, sys
from d2v.data import seekable
from d2v.train.batches import index_first
from d2v.train.distributed import init, shutdown
world = init("cpu")
scanned, read = [], seekable.ustar_members
seekable.ustar_members = lambda path: scanned.append(path.name) or read(path)
try:
    index_first({shards!r}, {resume!r}, world)
except Exception as e:
    open({out!r} + f"/rank{{world.rank}}.err", "w").write(f"{{type(e).__name__}}: {{e}}")
    raise
ahead = list(scanned)
seekable.TarIndex({shards!r}).index_all()  # what the rank's seekable stream does next
json.dump([ahead, scanned], open({out!r} + f"/rank{{world.rank}}.json", "w"))
shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("resume", ["seek", "replay"])
def test_under_torchrun_the_first_rank_indexes_while_the_others_wait(image_shards, tmp_path, resume):
    """With `seek`, rank 0 fills the cache and rank 1 then reads it; the shuffle-buffer streams need no index, and
    nothing is indexed ahead for them."""
    import subprocess
    import sys

    script = tmp_path / "index_first.py"
    script.write_text(INDEX_FIRST_SCRIPT.format(shards=str(image_shards), resume=resume, out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "D2V_INDEX_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script)], check=True, env=env, timeout=120)
    (ahead0, all0), (ahead1, all1) = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    tars = [f"shard-00000{i}.tar" for i in range(4)]
    if resume == "seek":
        assert ahead0 == all0 == tars and ahead1 == all1 == []
    else:
        assert ahead0 == ahead1 == []


@pytest.mark.slow
def test_two_nodes_sharing_one_cache_folder_index_each_tar_into_one_entry(image_shards, tmp_path):
    """The multi-node pattern: two torchrun agents (nodes of 2 ranks each, here on one machine) with one shared
    D2V_INDEX_CACHE. Each node's first rank indexes what the cache lacks, concurrently with the other node's; the
    cache ends with one entry per tar and no temp file, and every rank then reads all 4 tables from it."""
    import socket
    import subprocess
    import sys

    script = tmp_path / "index_first.py"
    script.write_text(INDEX_FIRST_SCRIPT.format(shards=str(image_shards), resume="seek", out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "D2V_INDEX_CACHE": str(tmp_path / "cache")}
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank",
                               str(node), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                               str(port), str(script)], env=env) for node in (0, 1)]
    assert [node.wait(timeout=180) for node in nodes] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    tars = {f"shard-00000{i}.tar" for i in range(4)}
    (ahead0, all0), (ahead1, all1), (ahead2, all2), (ahead3, all3) = ranks
    assert ahead1 == all1 == ahead3 == all3 == []  # the second rank of each node waits, then reads the cache
    assert all0 == ahead0 and all2 == ahead2 and set(ahead0) | set(ahead2) == tars  # nothing left to scan after
    cache = list((tmp_path / "cache").iterdir())
    assert len(cache) == 4 and all(p.suffix == ".npz" for p in cache)


@pytest.mark.slow
def test_when_the_first_rank_cannot_index_every_rank_stops_with_an_error(image_shards, tmp_path):
    """A corrupt tar fails rank 0's indexing; rank 1, waiting for it, raises its own error naming the cause's rank
    (before, it sat in a barrier until torchrun killed it)."""
    import subprocess
    import sys

    (image_shards / "shard-000002.tar").write_bytes(b"not a tar" * 100)
    script = tmp_path / "index_first.py"
    script.write_text(INDEX_FIRST_SCRIPT.format(shards=str(image_shards), resume="seek", out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "D2V_INDEX_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], env=env, timeout=120, capture_output=True, text=True)
    assert run.returncode != 0
    assert "shard-000002.tar" in (tmp_path / "rank0.err").read_text()
    assert "failed on a node's first rank" in (tmp_path / "rank1.err").read_text()
