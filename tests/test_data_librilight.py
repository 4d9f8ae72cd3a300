"""Libri-light unlab: voice-activity cutting, the source (download or in place) and pieces in shards."""
import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
from fixtures import FileServer, tar_bytes

from d2v.data.download import Artifact
from d2v.data.manifest import read_manifest
from d2v.data.segments import format_ranges, pack, parse_ranges, vad_ranges
from d2v.data.shards import read_index, write_shards
from d2v.data.sources import Context, librilight

RATE = 16_000


def test_pack_joins_intervals_as_libri_lights_cut_by_vad():
    ranges = [(0, 10), (12, 20), (25, 60), (61, 63), (70, 75)]
    # 10 + 8 fit in 20; 35 is over the limit alone, so it is a piece of its own; 2 + 5 fit again
    assert pack(ranges, 20) == [[(0, 10), (12, 20)], [(25, 60)], [(61, 63), (70, 75)]]
    assert pack(ranges, 1000) == [ranges]
    assert pack([(0, 10), (10, 20)], 20) == [[(0, 10), (10, 20)]]  # exactly at the limit still fits
    assert pack([], 20) == []


def test_vad_ranges_clip_to_the_audio_and_name_bad_intervals():
    assert vad_ranges([[0.5, 1.0], [1.25, 3.0], [4.0, 5.0]], RATE, 2 * RATE) == [(8000, 16000), (20000, 32000)]
    for bad, match in [([[2.0, 1.0]], r"v\[0\]: expected 0 <= start < end"), ([[0, 1], ["a", 2]], r"v\[1\]"),
                       ([[0, 2], [1, 3]], r"v\[1\]: starts at 1 s, before"), ([3], r"v\[0\]: expected \[start")]:
        with pytest.raises(ValueError, match=match):
            vad_ranges(bad, RATE, 10 * RATE, "v")


def test_ranges_round_trip_and_reject_malformed_text():
    ranges = [(0, 5), (9, 1200)]
    assert parse_ranges(format_ranges(ranges)) == ranges
    for bad in ("", "5:3", "1-2", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="row7: expected sample ranges"):
            parse_ranges(bad, "row7")


def _noise(seconds: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-8000, 8000, int(seconds * RATE)).astype(np.int16)


def _flac(samples: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, RATE, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _meta(vad, speaker="100", book_id="7") -> bytes:
    return json.dumps({"speaker": speaker, "book_meta": {"id": book_id, "title": "T"}, "snr": 9.1,
                       "voice_activity": vad}).encode()


AUDIO = {"small/100/history_of_holland/holland_01_motley_64kb": (_noise(6.0, 0), [[0.5, 2.0], [2.5, 3.0], [3.2, 5.5]]),
         "small/100/history_of_holland/holland.02_motley_64kb": (_noise(2.0, 1), [[0.0, 1.0], [1.5, 9.0]]),
         "small/205/poems/poem_01": (_noise(1.0, 2), [[0.1, 0.9]])}


def _small_tar() -> bytes:
    files = {}
    for stem, (samples, vad) in AUDIO.items():
        files[stem + ".flac"], files[stem + ".json"] = _flac(samples), _meta(vad)
    files["small/205/poems/no_json.flac"] = _flac(_noise(1.0, 3))
    files["small/205/poems/corrupt.flac"], files["small/205/poems/corrupt.json"] = b"not flac", _meta([[0, 1]])
    files["small/205/poems/no_vad.flac"], files["small/205/poems/no_vad.json"] = _flac(_noise(1.0, 4)), b"{}"
    files["small/205/poems/silent.flac"], files["small/205/poems/silent.json"] = _flac(_noise(1.0, 5)), \
        _meta([[2.0, 3.0]])
    return tar_bytes(files, mode="w")


def _expected_pieces() -> dict[str, np.ndarray]:
    """The pieces at target 2 s, cut by hand from the voice activity above."""
    a, b, c = (samples for samples, _ in AUDIO.values())
    s = lambda x, lo, hi: x[int(lo * RATE):int(hi * RATE)]  # noqa: E731
    return {"100-history_of_holland-holland_01_motley_64kb-0000": np.concatenate([s(a, 0.5, 2.0), s(a, 2.5, 3.0)]),
            "100-history_of_holland-holland_01_motley_64kb-0001": s(a, 3.2, 5.5),  # 2.3 s: a piece of its own
            # the second interval is clipped at the end of the file (2 s), so both fit in one piece
            "100-history_of_holland-holland_02_motley_64kb-0000": np.concatenate([s(b, 0.0, 1.0), s(b, 1.5, 2.0)]),
            "205-poems-poem_01-0000": s(c, 0.1, 0.9)}


def test_download_cut_index_and_shard(tmp_path):
    tar = _small_tar()
    with FileServer({"/small.tar": tar}) as server:
        arts = {"small": Artifact("small.tar", (server.url("/small.tar"),), unpinned=True)}
        out = librilight.prepare(Context(tmp_path / "cache", tmp_path / "ll"), subsets=["small"], target_seconds=2.0,
                                 artifacts=arts)
    df = read_manifest(out).set_index("id")
    expected = _expected_pieces()
    assert sorted(df.index) == sorted(expected)
    assert set(df["split"]) == {"small"}
    for key, samples in expected.items():
        assert df.loc[key, "duration"] == pytest.approx(len(samples) / RATE)
    meta = json.loads((out / "manifest.json").read_text())
    reasons = {f["path"].rsplit("/", 1)[1]: f["reason"] for f in meta["skipped"]["files"]}
    assert sorted(reasons) == ["corrupt.flac", "no_json.flac", "no_vad.flac", "silent.flac"]
    assert "no_json.json beside it" in reasons["no_json.flac"]
    assert reasons["no_vad.flac"] == "no_vad.json has no 'voice_activity'"
    assert reasons["silent.flac"] == "no voice activity inside the audio"
    assert meta["hours_before_vad"]["small"] == pytest.approx(9.0 / 3600, abs=1e-3)  # the three usable files
    assert meta["hours"]["small"] == pytest.approx(sum(map(len, expected.values())) / RATE / 3600, abs=1e-3)

    index = write_shards(out, "small", tmp_path / "shards", workers=1)
    assert index["count"] == len(expected) and index["skipped"]["count"] == 0
    with tarfile.open(tmp_path / "shards" / "shard-000000.tar") as shard:
        stored = {m.name.rsplit(".", 1)[0]: shard.extractfile(m).read() for m in shard if m.name.endswith(".flac")}
    assert sorted(stored) == sorted(expected)
    for key, samples in expected.items():  # lossless: exactly the voice-activity samples, silences dropped
        got, rate = sf.read(io.BytesIO(stored[key]), dtype="int16")
        assert rate == RATE and np.array_equal(got, samples), key


def test_root_in_place_workers_and_a_file_gone_after_prepare(tmp_path):
    with tarfile.open(fileobj=io.BytesIO(_small_tar())) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")
    out = librilight.prepare(Context(tmp_path / "cache", tmp_path / "ll"), subsets=["small"],
                             root=tmp_path / "extracted", target_seconds=2.0)
    assert not (tmp_path / "ll" / "splits").exists() and not (tmp_path / "cache").exists()  # nothing copied
    assert sorted(read_manifest(out)["id"]) == sorted(_expected_pieces())
    serial = write_shards(out, "small", tmp_path / "one", workers=1)
    parallel = write_shards(out, "small", tmp_path / "two", workers=2)
    assert [s["sha256"] for s in serial["shards"]] == [s["sha256"] for s in parallel["shards"]]

    (tmp_path / "extracted/small/205/poems/poem_01.flac").unlink()
    index = write_shards(out, "small", tmp_path / "gone", workers=2)
    assert index["count"] == len(_expected_pieces()) - 1
    assert [f["reason"] for f in read_index(tmp_path / "gone")["skipped"]["files"]] == ["missing"]


def test_a_damaged_unpinned_download_is_named(tmp_path):
    tar = _small_tar()[:30_000]  # cut inside a member: no checksum to catch it, the tar reader does
    with FileServer({"/small.tar": tar}) as server:
        arts = {"small": Artifact("small.tar", (server.url("/small.tar"),), unpinned=True)}
        with pytest.raises(ValueError, match=r"unpinned/small.tar is not a complete tar archive .*delete it"):
            librilight.prepare(Context(tmp_path / "cache", tmp_path / "ll"), subsets=["small"], artifacts=arts)
    assert not (tmp_path / "ll" / "splits" / "small").exists()  # nothing half-extracted left in place


def test_options_are_checked_by_name(tmp_path):
    ctx = Context(tmp_path / "cache", tmp_path / "ll")
    with pytest.raises(ValueError, match=r"unknown subset\(s\) \['huge'\]"):
        librilight.prepare(ctx, subsets=["huge"], root=tmp_path)
    with pytest.raises(ValueError, match="target_seconds must be > 0"):
        librilight.prepare(ctx, root=tmp_path, target_seconds=0)
    with pytest.raises(FileNotFoundError, match=r"medium missing; expected .*/medium/<speaker>/<book>/\*.flac"):
        librilight.prepare(ctx, subsets=["medium"], root=tmp_path)
