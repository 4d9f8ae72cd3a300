"""Each source's prepare code run on tiny fixtures in the real formats, served from 127.0.0.1 where it downloads."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from fixtures import FileServer, deb_bytes, flac_bytes, gz, idx_bytes, librispeech_tar, sha256, tar_bytes, zip_bytes
from PIL import Image

from d2v.data.download import Artifact, ChecksumError
from d2v.data.manifest import ManifestError, make_manifest, read_manifest, write_manifest
from d2v.data.sources import Context, austen, fashion_mnist, glue, imagenet, librispeech, mini_librispeech, \
    real_speech, text
from d2v.data.sources.base import Member


def assert_declared_splits(source: str, folder, options: dict | None = None, dataset: str | None = None,
                           every: bool = True):
    """The splits `prepare` wrote are the ones its registry entry declares (which params validation checks shard
    sets against before anything is prepared); `every=False` where a small fixture leaves some empty."""
    from d2v.data.sources import SOURCES
    df = read_manifest(folder)
    written, declared = set(df["split"]), SOURCES[source].declared("splits", options or {}, dataset or source)
    assert written == declared if every else written <= declared, (source, written, declared)
    tags = {t for row in df["subsets"].dropna() for t in str(row).split("|") if t} if "subsets" in df else set()
    assert tags <= SOURCES[source].declared("subsets", options or {}, dataset or source), (source, tags)


def test_fashion_mnist_from_a_deb_on_a_local_mirror(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28)), "train-labels-idx1-ubyte":
              np.arange(12) % 10, "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(5)}
    payload = {k: idx_bytes(v) for k, v in arrays.items()}
    members = {fashion_mnist.DEB_DIR + k + ".gz": gz(v) for k, v in payload.items()}
    deb = deb_bytes(members)
    with FileServer({"/fm.deb": deb}) as server:
        monkeypatch.setattr(fashion_mnist, "DEB", Artifact("fm.deb", (server.url("/fm.deb"),), sha256=sha256(deb)))
        monkeypatch.setattr(fashion_mnist, "FILES", {k: (sha256(members[fashion_mnist.DEB_DIR + k + ".gz"]), "",
                                                         sha256(v)) for k, v in payload.items()})
        fashion_mnist.prepare(Context(tmp_path / "cache", tmp_path / "fm"))
    df = read_manifest(tmp_path / "fm")
    assert list(df["split"].value_counts().sort_index()) == [5, 12]
    assert_declared_splits("fashion_mnist", tmp_path / "fm")
    first = df.iloc[0]
    image = np.asarray(Image.open(tmp_path / "fm" / first["path"]))
    np.testing.assert_array_equal(image, arrays["train-images-idx3-ubyte"][0])  # PNG round trip is lossless
    assert first["label"] == 0 and first["text"] == "T-shirt/top"
    assert first["sha256"] == sha256((tmp_path / "fm" / first["path"]).read_bytes())


def test_fashion_mnist_payload_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    members = {fashion_mnist.DEB_DIR + k + ".gz": gz(idx_bytes(np.zeros((1, 2, 2)))) for k in fashion_mnist.FILES}
    deb = deb_bytes(members)
    with FileServer({"/fm.deb": deb}) as server:
        monkeypatch.setattr(fashion_mnist, "DEB", Artifact("fm.deb", (server.url("/fm.deb"),), sha256=sha256(deb)))
        with pytest.raises(ChecksumError, match="train-images-idx3-ubyte.gz: sha256 mismatch"):
            fashion_mnist.prepare(Context(tmp_path / "cache", tmp_path / "fm"))
    assert not (tmp_path / "fm").exists()


def test_idx_reader_rejects_wrong_sizes():
    good = idx_bytes(np.zeros((2, 3, 3)))
    assert fashion_mnist.read_idx(good, "x").shape == (2, 3, 3)
    with pytest.raises(ValueError, match="x: 20 bytes, expected 34"):
        fashion_mnist.read_idx(good[:20], "x")
    with pytest.raises(ValueError, match="not a uint8 IDX"):
        fashion_mnist.read_idx(b"\x00\x00\x0d\x01", "x")


def _xdr_strings(lines):
    """A minimal R XDR serialisation of a character vector (what janeaustenr stores per novel)."""
    out = b"X\n" + (3).to_bytes(4, "big") + (0x040201).to_bytes(4, "big") + (0x030500).to_bytes(4, "big")
    out += (5).to_bytes(4, "big") + b"UTF-8" + (16).to_bytes(4, "big") + len(lines).to_bytes(4, "big")
    for line in lines:
        data = line.encode()
        out += (0x00040009).to_bytes(4, "big") + len(data).to_bytes(4, "big") + data
    return out


def test_austen_reader_and_librispeech_style_normalisation():
    reader = austen._XDR(_xdr_strings(["CHAPTER 1", "", "It is a truth", "universally acknowledged."]))
    reader.header()
    lines = reader.item()
    assert lines == ["CHAPTER 1", "", "It is a truth", "universally acknowledged."]
    assert austen.paragraphs(lines) == ["It is a truth universally acknowledged."]
    assert austen.sentences("Mr. Darcy came. She said \"No!\" Then left.") == \
        ["Mr. Darcy came.", "She said \"No!\"", "Then left."]
    assert austen.normalize_transcript("“Well-bred _Emma_,” said Mr. Knightley's 'friend'.") == \
        "WELL BRED EMMA SAID MR KNIGHTLEY'S FRIEND"
    assert austen.transcript_sentences(["One two three four five six.", "Only 3 words here at all ok.",
                                        "", "Too short."]) == ["ONE TWO THREE FOUR FIVE SIX"]


def test_prompt_transcripts_are_spoken_forms():
    assert real_speech.number_words(0) == "ZERO"
    assert real_speech.number_words(115) == "ONE HUNDRED FIFTEEN"
    assert real_speech.number_words(20_004) == "TWENTY THOUSAND FOUR"
    assert real_speech.spoken_form("Press 1, then # or *. 50% off!") == \
        "PRESS ONE THEN POUND OR STAR FIFTY PERCENT OFF"
    assert real_speech.parse_prompts("; comment\ndigits/1: One.\nbeep: [a tone]\n") == \
        {"digits/1": "One.", "beep": "[a tone]"}
    assert real_speech.parse_sphinx_transcription("<s> he was not ill </s> (utt-01)\n") == {"utt-01": "HE WAS NOT ILL"}


def test_librispeech_and_librilight_download_extract_index(tmp_path):
    dev = librispeech_tar("dev-clean", {"84-121123-0000": (1.5, "GO DO YOU HEAR"),
                                        "84-121123-0001": (0.5, "BUT IN LESS THAN FIVE MINUTES"),
                                        "174-50561-0000": (1.0, "FORGOTTEN TOO THE NAME OF GILLIAN")},
                          corrupt=("174-50561-0000",), untranscribed=("84-121123-0009",))
    files = {"LibriSpeech/README.TXT": b""}
    for part, utt in (("1h/0/clean", "19-198-0000"), ("1h/3/other", "20-200-0001"), ("9h/clean", "21-201-0002")):
        spk, chapter, _ = utt.split("-")
        files[f"librispeech_finetuning/{part}/{spk}/{chapter}/{utt}.flac"] = flac_bytes(0.25)
        files[f"librispeech_finetuning/{part}/{spk}/{chapter}/{spk}-{chapter}.trans.txt"] = f"{utt} A B\n".encode()
    light = tar_bytes(files)
    with FileServer({"/dev-clean.tar.gz": dev, "/ft.tgz": light}) as server:
        server.cut["/dev-clean.tar.gz"] = len(dev) // 3  # the connection drops once; the download resumes
        arts = {"dev-clean": Artifact("dev-clean.tar.gz", (server.url("/dev-clean.tar.gz"),), sha256=sha256(dev)),
                "librilight": Artifact("ft.tgz", (server.url("/ft.tgz"),), sha256=sha256(light))}
        librispeech.prepare(Context(tmp_path / "cache", tmp_path / "ls"), splits=["dev-clean"], artifacts=arts)
    df = read_manifest(tmp_path / "ls")
    meta = json.loads((tmp_path / "ls" / "manifest.json").read_text())
    dev_rows = df[df["split"] == "dev_clean"].set_index("id")
    assert sorted(dev_rows.index) == ["84-121123-0000", "84-121123-0001"]
    assert dev_rows.loc["84-121123-0000", "duration"] == pytest.approx(1.5)
    assert dev_rows.loc["84-121123-0001", "text"] == "BUT IN LESS THAN FIVE MINUTES"
    reasons = sorted(f["reason"].split(":")[0] for f in meta["skipped"]["files"])
    assert reasons == ["no transcript line", "unreadable FLAC"]
    light_rows = df[df["split"] == "librilight_10h"].set_index("id")["subsets"].to_dict()
    assert_declared_splits("librispeech", tmp_path / "ls", {"splits": ["dev-clean"]})
    assert light_rows == {"19-198-0000": "10min|1h|10h", "20-200-0001": "1h|10h", "21-201-0002": "10h"}
    # every paper profile's LibriSpeech shard sets are cut from splits this manifest has (they asked for
    # 'dev-clean' where prepare writes 'dev_clean', so no paper profile could shard LibriSpeech)
    from d2v.data.shards import write_shards
    from d2v.pipeline.params import load_params
    archive_splits = {librispeech.manifest_split(s) for s in librispeech.SHA256} | {librispeech.LIBRILIGHT_SPLIT}
    sharded = set()
    for name, profile in load_params("params.yaml").profiles.items():
        for key in (k for k in profile.shard_keys if k.startswith("librispeech/")):
            spec = profile.shard_spec(key)
            assert set(spec.split.split("+")) <= archive_splits, (name, key, spec.split)
            if spec.split in set(df["split"]) and key not in sharded:  # the splits this fixture prepared
                index = write_shards(tmp_path / "ls", spec.split, tmp_path / "shards" / key, subset=spec.subset)
                assert index["count"] == len(df[df["split"] == spec.split].query(
                    "subsets.str.contains(@spec.subset)" if spec.subset else "index == index")), key
                sharded.add(key)
    assert {"librispeech/dev-clean", "librispeech/librilight_10h-10min", "librispeech/librilight_10h"} <= sharded


def test_librispeech_checksum_mismatch_stops_before_extracting(tmp_path):
    dev = librispeech_tar("dev-clean", {"1-2-0000": (0.2, "A")})
    with FileServer({"/d.tar.gz": dev}) as server:
        arts = {"dev-clean": Artifact("d.tar.gz", (server.url("/d.tar.gz"),), sha256="f" * 64)}
        with pytest.raises(ChecksumError, match="d.tar.gz: sha256 mismatch"):
            librispeech.prepare(Context(tmp_path / "cache", tmp_path / "ls"), splits=["dev-clean"],
                                librilight=False, artifacts=arts)
    assert not (tmp_path / "ls" / "splits").exists()


def _glue_fixtures():
    sst = "sentence\tlabel\nit 's a charming journey \t1\nbad film\t0\nbroken row\n"
    sst_dev = "sentence\tlabel\nwonderful\t1\n"
    sts = ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
           "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off."
           "\t5.000\n")
    mrpc_head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    mrpc_train = mrpc_head + "1\t702876\t702977\tAmrozi accused his brother.\tReferring to him, Amrozi accused.\n" \
                             "0\t2108705\t2108831\tYucaipa owned Dominick 's.\tYucaipa bought Dominick 's in 1995.\n"
    return {"/SST-2.zip": zip_bytes({"SST-2/train.tsv": sst.encode(), "SST-2/dev.tsv": sst_dev.encode()}),
            "/STS-B.zip": zip_bytes({"STS-B/train.tsv": sts.encode(), "STS-B/dev.tsv": sts.encode()}),
            "/msr_paraphrase_train.txt": mrpc_train.encode(), "/msr_paraphrase_test.txt": mrpc_head.encode(),
            "/mrpc_dev_ids.tsv": b"2108705\t2108831\n"}


def test_glue_tsv_formats(tmp_path):
    files = _glue_fixtures()
    with FileServer(files) as server:
        arts = {p.lstrip("/"): Artifact(p.lstrip("/"), (server.url(p),), unpinned=True) for p in files}
        glue.prepare(Context(tmp_path / "cache", tmp_path / "glue"), tasks=["sst2", "stsb", "mrpc"],
                     artifacts=arts, check_sizes=False)
        sst = read_manifest(tmp_path / "glue" / "sst2")
        assert list(sst["label"]) == [1.0, 0.0, 1.0] and sst["text"][0] == "it 's a charming journey "
        meta = json.loads((tmp_path / "glue" / "sst2" / "manifest.json").read_text())
        assert meta["skipped"]["files"][0]["path"] == "SST-2.zip:SST-2/train.tsv:4"  # the 1-field row, by line
        assert read_manifest(tmp_path / "glue" / "stsb")["label"][0] == 5.0
        mrpc = read_manifest(tmp_path / "glue" / "mrpc")
        for task in ("sst2", "stsb", "mrpc"):
            assert_declared_splits("glue", tmp_path / "glue" / task, {"tasks": [task]}, f"glue/{task}",
                                   every=task != "mrpc")  # the fixture's MRPC test file is its header
        assert dict(zip(mrpc["split"], mrpc["label"])) == {"train": 1.0, "dev": 0.0}  # dev = the listed pair
        with pytest.raises(ValueError, match=r"glue/sst2: example counts .*'train': \(2, 67349\)"):
            glue.prepare(Context(tmp_path / "cache", tmp_path / "glue2"), tasks=["sst2"], artifacts=arts)
    assert not (tmp_path / "glue2").exists()


def test_glue_rows_hold_unicode_line_separators_as_text(tmp_path):
    """A TSV row ends at \\n or \\r\\n only: U+2028, U+0085 (a cp1252 ellipsis read as latin-1) or a form feed inside
    a sentence is text, as csv and pandas read it (str.splitlines would cut the row and skip both halves)."""
    from d2v.io import text_lines
    odd = "wait\u2028what\x85 and\x0cmore"
    assert text_lines(f"a\t{odd}\r\nb\rc\n") == ["a\t" + odd, "b", "c"] and text_lines("") == []
    sst = f"sentence\tlabel\r\n{odd}\t1\r\nplain\t0\r\n"
    files = {"/SST-2.zip": zip_bytes({"SST-2/train.tsv": sst.encode(), "SST-2/dev.tsv": sst.encode()})}
    with FileServer(files) as server:
        arts = {"SST-2.zip": Artifact("SST-2.zip", (server.url("/SST-2.zip"),), unpinned=True)}
        glue.prepare(Context(tmp_path / "cache", tmp_path / "glue"), tasks=["sst2"], artifacts=arts,
                     check_sizes=False)
    df = read_manifest(tmp_path / "glue" / "sst2")
    assert list(df["text"]) == [odd, "plain"] * 2 and list(df["label"]) == [1.0, 0.0] * 2
    meta = json.loads((tmp_path / "glue" / "sst2" / "manifest.json").read_text())
    assert meta["skipped"]["count"] == 0


def _jpeg(seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_imagenet_from_official_tars(tmp_path):
    from scipy.io import savemat

    wnids = ["n01440764", "n01443537"]
    inner = {w: tar_bytes({f"{w}_{i}.v2.JPEG": _jpeg(i) for i in range(2)}, "w") for w in wnids}  # a dotted stem
    inner["n01443537"] = tar_bytes({"n01443537_0.JPEG": _jpeg(5), "n01443537_1.JPEG": b"\xff\xd8broken"}, "w")
    train = tar_bytes({f"{w}.tar": data for w, data in inner.items()}, "w")
    val = tar_bytes({f"ILSVRC2012_val_{i:08d}.JPEG": _jpeg(10 + i) for i in (1, 2, 3)}, "w")
    synsets = np.array([(1, "n01443537", "goldfish", 0), (2, "n01440764", "tench", 0), (3, "n00001", "fish", 2)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    devkit = tar_bytes({"ILSVRC2012_devkit_t12/data/meta.mat": meta.getvalue(),
                        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": b"2\n1\n1\n"})
    archives = tmp_path / "archives"
    archives.mkdir()
    files = {"ILSVRC2012_img_train.tar": train, "ILSVRC2012_img_val.tar": val, "ILSVRC2012_devkit_t12.tar.gz": devkit}
    import hashlib
    for name, data in files.items():
        (archives / name).write_bytes(data)
    md5 = {k: hashlib.md5(v).hexdigest() for k, v in files.items()}
    imagenet.prepare(Context(tmp_path / "cache", tmp_path / "in"), archives=archives, md5=md5)
    df = read_manifest(tmp_path / "in")
    meta = json.loads((tmp_path / "in" / "manifest.json").read_text())
    assert meta["classes"] == wnids and meta["skipped"]["count"] == 1
    assert_declared_splits("imagenet", tmp_path / "in")
    val_rows = df[df["split"] == "val"].sort_values("id")
    assert list(val_rows["text"]) == ["n01440764", "n01443537", "n01443537"]  # ground truth ids 2, 1, 1
    assert list(val_rows["label"]) == [0.0, 1.0, 1.0]
    assert (df["split"] == "train").sum() == 3  # the broken JPEG is skipped, named and counted
    assert "train/n01440764_0_v2" in set(df["id"])  # a shard key holds no '.'
    bad = dict(md5, **{"ILSVRC2012_img_val.tar": "0" * 32})
    with pytest.raises(ChecksumError, match="ILSVRC2012_img_val.tar: md5 mismatch"):
        imagenet.prepare(Context(tmp_path / "cache", tmp_path / "in2"), archives=archives, md5=bad)
    # a tree whose val folder holds the images unsorted, as the val tar unpacks, is refused before any is read
    tree = tmp_path / "tree"
    (tree / "train" / "n01440764").mkdir(parents=True)
    (tree / "train" / "n01440764" / "a.JPEG").write_bytes(_jpeg(0))
    (tree / "val").mkdir()
    (tree / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(_jpeg(1))
    with pytest.raises(ValueError, match=r"ILSVRC2012_val_00000001.JPEG lies in .*val itself; expected one folder "
                                         r"per class, .*val/<wnid>/\*.JPEG. Give archives="):
        imagenet.prepare(Context(tmp_path / "cache", tmp_path / "in3"), tree=tree)


class FixtureContext(Context):
    """Serves package members from a dict instead of downloading the packages."""

    def __init__(self, tmp, members: dict[str, bytes]):
        super().__init__(tmp / "cache", tmp / "out")
        self.members = members

    def read(self, member: Member) -> bytes:
        return self.members[member.path]


def test_lee_sts_cross_validates_by_document(tmp_path):
    docs = "\n".join(f"document number {i} about topic {i % 3}" for i in range(6)).encode("latin-1")
    sim = np.triu(np.arange(36).reshape(6, 6) / 35.0)
    buf = io.StringIO()
    np.savetxt(buf, sim, delimiter="\t")
    members = {text.LEE.path: docs, text.LEE_SIM.path: buf.getvalue().encode()}
    tested, devs = [], []
    for fold in range(3):
        ctx = FixtureContext(tmp_path / str(fold), members)
        text.prepare_lee(ctx, folds=3, fold=fold)
        df = read_manifest(ctx.out_dir)
        assert_declared_splits("lee_sts", ctx.out_dir)
        docs_of = {s: {int(x) for i in df[df["split"] == s]["id"] for x in i.split("-")[1:]}
                   for s in ("train", "dev", "test")}
        assert all(not (docs_of[a] & docs_of[b]) for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")))
        assert len(df) == 1 + 1 + 1  # C(2,2) pairs per split of 2 documents
        meta = json.loads((ctx.out_dir / "manifest.json").read_text())
        assert (meta["fold"], meta["folds"], meta["dropped_cross_split_pairs"]) == (fold, 3, 15 - 3)
        assert set(meta["documents"]["test"]) == docs_of["test"]
        for _, row in df.iterrows():
            i, j = map(int, row["id"].split("-")[1:])
            assert row["label"] == pytest.approx(sim[i, j])
        tested.append(docs_of["test"])
        devs.append(docs_of["dev"])
    assert sorted(d for t in tested for d in t) == list(range(6))  # every document is tested exactly once
    assert devs[1:] + devs[:1] == tested  # fold k tests the group that fold k + 1 selects on
    for bad, message in (({"folds": 3, "fold": 3}, "lee_sts.fold: expected 0 to 2, got 3"),
                         ({"folds": 2}, "lee_sts.folds: expected 3 to 6")):
        with pytest.raises(ValueError, match=message):
            text.prepare_lee(FixtureContext(tmp_path / "bad", members), **bad)
    assert not (tmp_path / "bad" / "out").exists()


def test_rt_polarity_deduplicates_and_drops_conflicts(tmp_path):
    import bz2
    csv = ("category,text,movie_name,has_plot_and_reviews\nfresh,a  joy,m,True\nfresh,a joy,m,True\n"
           "rotten,dull,m,True\nfresh,mixed,m,True\nrotten,mixed,m,True\nplot,a summary,m,True\n")
    ctx = FixtureContext(tmp_path, {text.RT.path: bz2.compress(csv.encode())})
    text.prepare_rt(ctx)
    df = read_manifest(ctx.out_dir)
    assert_declared_splits("rt_polarity", ctx.out_dir, every=False)  # 6 snippets: all drawn for train
    assert sorted(zip(df["text"], df["label"])) == [("a joy", 1.0), ("dull", 0.0)]


def test_mini_librispeech_is_deterministic_with_disjoint_books_and_speakers(tmp_path, monkeypatch):
    novels = {k: [line for w in ("one", "two", "three", "four", "five", "six", "seven", "eight")
                  for line in (f"The {k} sentence number {w} is here and long enough.", "")] for k in austen.OFFSETS}
    monkeypatch.setattr(austen, "read_novels", lambda ctx: novels)
    cfg = mini_librispeech.MiniLibriSpeechConfig(pretrain=6, train_1h=4, train_10min=2, dev=2, test=2, block=5)
    outs = []
    for run, workers in (("a", 1), ("b", 2)):
        ctx = Context(tmp_path / "cache", tmp_path / run)
        mini_librispeech.prepare(ctx, cfg.model_copy(update={"workers": workers}))
        outs.append(read_manifest(tmp_path / run))
    a, b = outs
    assert list(a["sha256"]) == list(b["sha256"])  # byte-identical audio for the same seed and engine
    stamp = (tmp_path / "a" / "manifest.csv").stat().st_mtime_ns
    mini_librispeech.prepare(Context(tmp_path / "cache", tmp_path / "a"), cfg)  # same recipe: nothing to redo
    assert (tmp_path / "a" / "manifest.csv").stat().st_mtime_ns == stamp
    assert a.groupby("split").size().to_dict() == {"dev_clean": 2, "dev_other": 2, "pretrain": 6, "test_clean": 2,
                                                   "test_other": 2, "train_1h": 4}
    assert_declared_splits("mini_librispeech", tmp_path / "a")
    group = a["split"].str.split("_").str[0].replace({"pretrain": "train"})
    books = a.groupby(group)["book"].agg(set).to_dict()
    assert books["test"] == {"sensesensibility"} and books["dev"] == {"northangerabbey"}
    speakers = a.groupby(group)["speaker"].agg(set).to_dict()
    assert not (speakers["train"] & speakers["dev"]) and not (speakers["train"] & speakers["test"])
    assert not (speakers["dev"] & speakers["test"])
    assert list(a[a["split"] == "train_1h"]["subsets"]) == ["10min|1h", "10min|1h", "1h", "1h"]
    wave, rate = sf.read(tmp_path / "a" / a.iloc[0]["path"])
    assert rate == 16_000 and len(wave) / rate == pytest.approx(a.iloc[0]["duration"]) and wave.std() > 0.01
    assert set("".join(a["text"])) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
    assert (a[a["condition"] == "other"]["split"].str.endswith("other") | ~a["split"].str.startswith(
        ("dev", "test"))).all()


def test_mini_librispeech_needs_enough_sentences(tmp_path, monkeypatch):
    monkeypatch.setattr(austen, "read_novels", lambda ctx: {k: ["Just one sentence with enough words here."]
                                                           for k in austen.OFFSETS})
    cfg = mini_librispeech.MiniLibriSpeechConfig(pretrain=10, train_1h=0, dev=0, test=0, workers=1)
    with pytest.raises(ValueError, match="pretrain needs 10 sentences, only 4 left"):
        mini_librispeech.prepare(Context(tmp_path / "cache", tmp_path / "m"), cfg)


def test_manifest_errors_name_the_file(tmp_path):
    with pytest.raises(ManifestError, match="manifest missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("id,path\nx,y\n")
    with pytest.raises(ManifestError, match=r"manifest.csv: missing columns \['split'"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text('id,path\n1,"x\n')
    with pytest.raises(ManifestError, match=r"manifest.csv: not a readable manifest CSV \(.*EOF inside string"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text("")
    with pytest.raises(ManifestError, match=r"manifest.csv: not a readable manifest CSV \(No columns"):
        read_manifest(tmp_path)
    header = "id,path,split,bytes,duration,label,text,text_b,sha256\n"
    (tmp_path / "manifest.csv").write_text(header + "a,p,train,3,,1,t,,h\nb,p,train,3,,one,t,,h\n")
    with pytest.raises(ManifestError, match=r"manifest.csv: label 'one' of id 'b' is not a number"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.csv").write_text(header + "a,p,train,3,,1,t,,h\nb,p,train,3,,,t,,h\n")
    assert read_manifest(tmp_path)["label"].isna().tolist() == [False, True]  # an empty number is missing, not bad
    rows = [dict(id="pride.and.prejudice-0", path="a", split="train"), dict(id="pride.and.prejudice-1", path="b",
                                                                             split="train")]
    with pytest.raises(ManifestError, match=r"manifest.csv: id 'pride.and.prejudice-0' holds a '.', where a shard "
                                            r"would cut the sample's key"):
        write_manifest(tmp_path / "dotted", make_manifest(rows))
    assert not (tmp_path / "dotted" / "manifest.csv").exists()


def test_tar_fixture_is_a_real_gzip_tar():
    data = tar_bytes({"a/b.txt": b"x"})
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["a/b.txt"]


def test_fashion_mnist_falls_back_to_upstream_when_no_debian_mirror_answers(tmp_path, monkeypatch):
    import hashlib
    payload = {k: idx_bytes(np.zeros((2, 28, 28)) if "images" in k else np.array([1, 2])) for k in fashion_mnist.FILES}
    with FileServer({f"/up/{k}.gz": gz(v) for k, v in payload.items()}) as server:
        monkeypatch.setattr(fashion_mnist, "DEB", Artifact("fm.deb", (server.url("/missing.deb"),), sha256="0" * 64))
        monkeypatch.setattr(fashion_mnist, "UPSTREAM", server.url("/up/"))
        monkeypatch.setattr(fashion_mnist, "FILES", {k: ("", hashlib.md5(gz(v)).hexdigest(), sha256(v))
                                                     for k, v in payload.items()})
        fashion_mnist.prepare(Context(tmp_path / "cache", tmp_path / "fm"))
    assert read_manifest(tmp_path / "fm")["label"].tolist() == [1.0, 2.0, 1.0, 2.0]


def test_user_text_files_accept_txt_and_wiki_dumps_and_skip_bad_files(tmp_path):
    import bz2
    from d2v.data.sources import user_text
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "book.txt").write_text("First paragraph.\n\nSecond paragraph.")
    (tmp_path / "in" / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xff")
    page = ("<page><title>{t}</title><ns>{ns}</ns>{r}<revision><text>'''{t}''' is a [[topic|subject]]."
            "</text></revision></page>")
    xml = ("<mediawiki xmlns=\"http://www.mediawiki.org/xml/export-0.10/\">" + page.format(t="Albedo", ns=0, r="")
           + page.format(t="Talk:Albedo", ns=1, r="") + page.format(t="AfghanistanHistory", ns=0,
                                                                      r="<redirect title=\"x\"/>") + "</mediawiki>")
    (tmp_path / "in" / "wiki.xml.bz2").write_bytes(bz2.compress(xml.encode()))
    user_text.prepare(Context(tmp_path / "cache", tmp_path / "out"), paths=[str(tmp_path / "in" / "*")])
    df = read_manifest(tmp_path / "out")
    texts = [(tmp_path / "out" / p).read_text() for p in df["path"]]
    assert texts == ["First paragraph.\n\nSecond paragraph.\n\n", "Albedo is a subject.\n\n"]
    assert list(df["documents"]) == [1, 1]
    assert [Path(o).name for o in df["origin"]] == ["book.txt", "wiki.xml.bz2"]
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert meta["skipped"]["count"] == 1 and meta["skipped"]["files"][0]["path"].endswith("bad.txt")


def _wiki_dump(titles, tail="</mediawiki>") -> bytes:
    page = ("<page><title>{t}</title><ns>0</ns><revision><text>'''{t}''' is a [[topic|subject]].\n\n\n\n"
            "More on {t}.</text></revision></page>")
    return ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(page.format(t=t) for t in titles)
            + tail).encode()


def test_user_text_streams_documents_into_volumes_and_holds_every_nth_document_out(tmp_path):
    """Volumes are cut between lines once they pass volume_mb; read back they give every document in order, the
    valid split holding documents valid_every-1, 2·valid_every-1, … across files; markup is stripped the same in
    1 and 2 processes; a U+2028 inside a paragraph stays inside it."""
    import bz2
    from d2v.data.sources import user_text
    (tmp_path / "in").mkdir()
    books = {f"book{i}.txt": "\n\n".join(f"Book {i} paragraph {j}, \u2028 kept whole." for j in range(40))
             for i in range(3)}
    for name, book in books.items():
        (tmp_path / "in" / name).write_text(book, encoding="utf-8")
    titles = [f"Topic {i}" for i in range(7)]
    (tmp_path / "in" / "wiki.xml.bz2").write_bytes(bz2.compress(_wiki_dump(titles)))
    made = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        user_text.prepare(Context(tmp_path / "cache", out), paths=[str(tmp_path / "in" / "*")], valid_every=4,
                          volume_mb=600 / (1 << 20), workers=workers)
        made[workers] = read_manifest(out)
        sizes = [(out / p).stat().st_size for p in made[workers]["path"]]
        assert max(sizes) < 600 + 60  # cut at the first line past the limit
    df = made[1]
    assert df.equals(made[2].assign(origin=made[2]["origin"].str.replace("out2", "out1")))
    assert not df["id"].str.contains(".", regex=False).any() and df["id"].is_unique
    assert (df.groupby("origin").size() > 2).any()  # the books were cut into several volumes
    expected = [books[n] for n in sorted(books)] + [f"{t} is a subject.\n\nMore on {t}." for t in titles]
    for split, numbers in (("pretrain", [n for n in range(10) if n % 4 != 3]), ("valid", [3, 7])):
        rows = df[df["split"] == split]
        read = "".join((tmp_path / "out1" / p).read_text(encoding="utf-8") for p in rows["path"])
        assert read == "".join(expected[n] + "\n\n" for n in numbers)
        assert rows["documents"].sum() == len(numbers)
    meta = json.loads((tmp_path / "out1" / "manifest.json").read_text())
    assert meta["documents"] == 10 and meta["skipped"]["count"] == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_user_text_skips_an_article_whose_markup_cannot_be_read_not_the_dump(tmp_path, monkeypatch, workers):
    import bz2
    from d2v.data.sources import user_text

    def plain_text(wikitext):
        if "Topic 1" in wikitext:
            raise RecursionError("maximum recursion depth exceeded")
        return wikitext.split("'''")[1]

    monkeypatch.setattr(user_text, "plain_text", plain_text)  # before the pool forks: its workers see it too
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "wiki.xml.bz2").write_bytes(bz2.compress(_wiki_dump([f"Topic {i}" for i in range(3)])))
    user_text.prepare(Context(tmp_path / "cache", tmp_path / "out"), paths=[str(tmp_path / "in" / "*")],
                      workers=workers)
    df = read_manifest(tmp_path / "out")
    assert [(tmp_path / "out" / p).read_text() for p in df["path"]] == ["Topic 0\n\nTopic 2\n\n"]
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (skip,) = meta["skipped"]["files"]
    assert skip["path"].endswith("wiki.xml.bz2:Topic 1") and "RecursionError" in skip["reason"]


def test_user_text_reads_the_next_block_of_pages_while_the_workers_strip_this_one(tmp_path):
    import bz2
    from d2v.data.sources import user_text
    taken = []  # blocks taken from the dump and handed out (pool.map submits when called)
    blocks = (taken.append(k) or iter([f"{k}.0", f"{k}.1"]) for k in range(3))
    seen = [(item, list(taken)) for item in user_text._one_block_ahead(blocks)]
    assert [item for item, _ in seen] == ["0.0", "0.1", "1.0", "1.1", "2.0", "2.1"]
    assert [t for _, t in seen] == [[0, 1], [0, 1], [0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 2]]  # one ahead
    # several blocks of 512 pages (2 workers) come out in dump order, as from one process
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "wiki.xml.bz2").write_bytes(bz2.compress(_wiki_dump([f"T{i}" for i in range(1100)])))
    texts = []
    for workers in (1, 2):
        user_text.prepare(Context(tmp_path / "cache", tmp_path / f"out{workers}"), paths=[str(tmp_path / "in" / "*")],
                          workers=workers, valid_every=1000)
        texts.append("".join((tmp_path / f"out{workers}" / p).read_text() for p in read_manifest(tmp_path /
                                                                                              f"out{workers}")["path"]))
    assert texts[0] == texts[1] and texts[0].index("T0 is") < texts[0].index("T600 is") < texts[0].index("T1099 is")


def test_user_text_reads_compressed_inputs_and_skips_a_truncated_one(tmp_path):
    import bz2
    import gzip
    import lzma
    from d2v.data.sources import user_text
    (tmp_path / "in").mkdir()
    book = "\ufeffFirst paragraph.\r\n\r\nSecond \u2028 paragraph.\n"
    for name, pack in (("a.txt", bytes), ("b.txt.gz", gzip.compress), ("c.txt.bz2", bz2.compress),
                       ("d.txt.xz", lzma.compress)):
        (tmp_path / "in" / name).write_bytes(pack(book.encode()))
    (tmp_path / "in" / "e.txt.gz").write_bytes(gzip.compress(book.encode() * 50)[:-20])  # cut short
    (tmp_path / "in" / "f.xml.xz").write_bytes(lzma.compress(_wiki_dump(["Albedo"])))
    user_text.prepare(Context(tmp_path / "cache", tmp_path / "out"), paths=[str(tmp_path / "in" / "*")])
    df = read_manifest(tmp_path / "out")
    texts = {Path(o).name: (tmp_path / "out" / p).read_text(encoding="utf-8") for o, p in zip(df["origin"], df["path"])}
    plain = "First paragraph.\n\nSecond \u2028 paragraph.\n\n"  # BOM dropped, \r\n read as \n, U+2028 kept
    assert texts == {"a.txt": plain, "b.txt.gz": plain, "c.txt.bz2": plain, "d.txt.xz": plain,
                     "f.xml.xz": "Albedo is a subject.\n\nMore on Albedo.\n\n"}
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (skip,) = meta["skipped"]["files"]
    assert skip["path"].endswith("e.txt.gz") and "end-of-stream" in skip["reason"]


def test_user_text_stops_on_a_full_disk_instead_of_blaming_the_input(tmp_path, monkeypatch):
    """A volume that cannot be written stops the run (and leaves no prepared folder); it is not an unreadable input
    to skip, which would finish with a corpus short of that file."""
    import builtins
    import errno
    from d2v.data.sources import user_text

    class FullDisk(io.BytesIO):
        def write(self, data):
            if self.tell() + len(data) > 300:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    real_open = builtins.open
    monkeypatch.setattr(user_text, "open", lambda path, mode="r", **kw: FullDisk() if mode == "wb"
                        else real_open(path, mode, **kw), raising=False)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("\n".join(f"Line {i} of the book." for i in range(100)))
    with pytest.raises(user_text.WriteFailed, match=r"writing a volume under .*00000_a_txt failed: .*No space left"):
        user_text.prepare(Context(tmp_path / "cache", tmp_path / "out"), paths=[str(tmp_path / "in" / "*")])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("bad", ["utf8", "xml"])
def test_user_text_skips_a_file_that_breaks_midway_whole(tmp_path, monkeypatch, bad):
    """A file found unreadable after it has filled volumes leaves nothing behind, and the documents after it are
    numbered as if it were absent."""
    import bz2
    from d2v.data.sources import user_text
    discarded = []
    discard = user_text.Volumes.discard
    monkeypatch.setattr(user_text.Volumes, "discard", lambda self: (discarded.append(len(self.done)), discard(self)))
    (tmp_path / "in").mkdir()
    if bad == "utf8":  # past the reader's first 8 KiB, so lines were written before the decoder meets the bad bytes
        good = "\n".join(f"Line {j} of a long first part." for j in range(2000))
        (tmp_path / "in" / "a_broken.txt").write_bytes(good.encode() + b"\n\xff\xfe then garbage\n")
    else:
        (tmp_path / "in" / "a_broken.xml.bz2").write_bytes(bz2.compress(_wiki_dump(["One", "Two"] * 20,
                                                                                   tail="<page><ti")))
    for i in range(4):
        (tmp_path / "in" / f"b{i}.txt").write_text(f"Document {i}.")
    user_text.prepare(Context(tmp_path / "cache", tmp_path / "out"), paths=[str(tmp_path / "in" / "*")],
                      valid_every=2, volume_mb=500 / (1 << 20))
    df = read_manifest(tmp_path / "out")
    assert [Path(o).name for o in df["origin"]] == ["b0.txt", "b1.txt", "b2.txt", "b3.txt"]
    assert list(df["split"]) == ["pretrain", "valid", "pretrain", "valid"]
    assert sorted(p.name for p in (tmp_path / "out" / "docs").iterdir()) == [f"{i:05d}_b{i - 1}_txt"
                                                                            for i in range(1, 5)]
    meta = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert meta["skipped"]["files"][0]["path"].endswith("a_broken." + ("txt" if bad == "utf8" else "xml.bz2"))
    assert discarded and discarded[0] >= 2  # volumes had been completed, then deleted


def test_bible_para_pairs_each_verse_with_its_paraphrase_or_the_nearest_other_one(tmp_path):
    import gzip

    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(40)]
    books, kjv, web = ("Genesis", "Exodus"), [], ["field,field,field,field,field"]
    for n in range(300):  # more verses than one chunk of the similarity search
        book, chapter, verse = books[n // 150], 1 + n % 150 // 50, 1 + n % 50
        kjv_text = " ".join(rng.choice(words, 8))
        web_text = kjv_text if n % 97 == 5 else f"{kjv_text} {rng.choice(words)} {{a footnote}}"  # some identical
        kjv.append(json.dumps({"book": book, "chapter": chapter, "verse": verse, "text": kjv_text}))
        web.append(f"{n},{books.index(book) + 1},{chapter},{verse},{web_text}")
    ctx = FixtureContext(tmp_path, {text.KJV.path: "\n".join(kjv).encode(),
                                    text.WEB.path: gzip.compress("\n".join(web).encode())})
    text.prepare_bible(ctx)
    df = read_manifest(ctx.out_dir)
    assert_declared_splits("bible_para", ctx.out_dir)
    assert len(df) == 300 - 4 and "a footnote" not in " ".join(df["text_b"])  # identical verses dropped, {…} cut
    kjv_of = {json.loads(v)["text"]: json.loads(v) for v in kjv}
    web_of = {f"{b} {c}:{v}": t.replace(" {a footnote}", "") for b, c, v, t in
              ((books[int(r.split(",")[1]) - 1], *r.split(",")[2:]) for r in web[1:])}
    df = df.sort_values("id")
    left, right = list(df["text"]), [web_of[c] for c in df["citation"]]
    vec = TfidfVectorizer(sublinear_tf=True).fit(left + right)
    sim = cosine_similarity(vec.transform(left), vec.transform(right))
    np.fill_diagonal(sim, -1.0)
    for i, row in enumerate(df.itertuples()):
        assert f"{kjv_of[row.text]['book']} {kjv_of[row.text]['chapter']}:{kjv_of[row.text]['verse']}" == row.citation
        expected = right[i] if row.label == 1.0 else right[int(sim[i].argmax())]
        assert row.text_b == expected, row.citation
    assert 0.4 < df["label"].mean() < 0.6
    # a smoke run's limit: the first 100 pairs in canonical order, each negative the nearest among those 100
    small = FixtureContext(tmp_path / "limit", ctx.members)
    text.prepare_bible(small, limit=100)
    head = read_manifest(small.out_dir).sort_values("id")
    assert list(head["citation"]) == list(df["citation"][:100]) and list(head["text"]) == left[:100]
    vec = TfidfVectorizer(sublinear_tf=True).fit(left[:100] + right[:100])  # the weights of those 100 only
    sim = cosine_similarity(vec.transform(left[:100]), vec.transform(right[:100]))
    np.fill_diagonal(sim, -1.0)
    for i, row in enumerate(head.itertuples()):
        assert row.text_b == (right[i] if row.label == 1.0 else right[int(sim[i].argmax())]), row.citation
    assert (head["label"] == 0.0).any() and set(head["text_b"]) <= set(right[:100])
    with pytest.raises(ValueError, match=r"bible_para.limit: expected a whole number of at least 10 verse pairs .* "
                                         r"got 0"):
        text.prepare_bible(small, limit=0)
