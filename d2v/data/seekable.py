"""Seekable training streams (`stream_resume: seek`): batch g of a rank is a pure function of (seed, rank, g), so a
run resumes at any batch by arithmetic, where the shuffle-buffer streams must decode every batch before it again.

- Order: each epoch is one seeded permutation of every sample in the shards, shared by the ranks, which take every
  world-th place of it (DistributedSampler's split; the n mod world left over move with the permutation).
- Access: a sample is read from its tar by offset. The stream indexes every tar's members from their headers when it
  is built, before the DataLoader forks its workers (`TarIndex`), and checks the counts against `index.json`. The
  tables are cached between runs (d2v.data.index_cache; `d2v index` fills the cache before a launch).
- Randomness: each sample's draws (crop, flip, jitter, RandAugment, audio offset) come from a generator keyed by
  (seed, rank, its place t in the rank's order), each batch's (crop to the shortest) by (seed, rank, g). DataLoader
  worker w builds batches start + w, start + w + W, ..., which the loader hands out in order: the batches do not
  depend on the number of workers either.
- A sample that fails to decode, or that the modality leaves out (speech shorter than `min_samples`), is replaced by
  a stand-in drawn by (seed, rank, t), so batches stay full and no other place moves.
- Text pretraining's samples are blocks (`TokenBlocks`): the corpus cut once into fixed blocks, as fairseq cuts it,
  each read from the chunks it spans. The blocks are what each epoch permutes.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2v.data.index_cache import cached
from d2v.data.shards import ShardError, read_index

log = logging.getLogger("d2v.data")

# Generator keys start with SEEKABLE and a tag, and each tag's keys have one length: NumPy's SeedSequence ignores
# trailing zeros ([s, 1, 0] seeds what [s, 1] seeds), so keys of other lengths or families could meet.
SEEKABLE = 0x5EE4AB1E
ORDER, SAMPLE, BATCH, REPLACE = 1, 2, 3, 4
REPLACEMENTS = 8  # stand-ins tried for a place whose sample is left out or fails before the batch goes short
BLOCK, ZERO_BLOCK = 512, bytes(512)


@dataclass(frozen=True)
class ShardTable:
    """One tar's samples in arrays, 53 bytes a Fashion-MNIST sample (two members) where a dict of tuples takes ten
    times that: every rank holds the tables of all its shards. Sample i's members are first[i]:first[i+1] of
    offsets, sizes and exts (indices into ext_names)."""
    keys: np.ndarray  # bytes, one per sample
    first: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    exts: np.ndarray
    ext_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def parts(self, i: int) -> dict[str, tuple[int, int]]:
        """{extension: (data offset, size)} of sample i."""
        return {self.ext_names[self.exts[j]]: (int(self.offsets[j]), int(self.sizes[j]))
                for j in range(self.first[i], self.first[i + 1])}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"keys": self.keys, "first": self.first, "offsets": self.offsets, "sizes": self.sizes,
                "exts": self.exts, "ext_names": np.asarray(self.ext_names, dtype=str)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ShardTable:
        return cls(arrays["keys"], arrays["first"], arrays["offsets"], arrays["sizes"], arrays["exts"],
                   tuple(str(e) for e in arrays["ext_names"]))

    @classmethod
    def of(cls, members: list[tuple[str, int, int]]) -> ShardTable:
        """From (name, data offset, size) in tar order, grouped into samples as webdataset groups them (its own
        key/extension split, extensions lower-cased)."""
        from webdataset.tariterators import base_plus_ext

        keys, first, kept, exts, ext_names = [], [], [], [], {}
        for name, offset, size in members:
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            ext = ext.lower()
            if not keys or keys[-1] != key:
                keys.append(key)
                first.append(len(kept))
            kept.append((offset, size))
            exts.append(ext_names.setdefault(ext, len(ext_names)))
        spans = np.asarray(kept, dtype=np.int64).reshape(-1, 2)
        return cls(np.asarray([k.encode() for k in keys], dtype=bytes), np.asarray(first + [len(kept)], np.int64),
                   spans[:, 0].copy(), spans[:, 1].copy(), np.asarray(exts, np.uint8), tuple(ext_names))


class TarIndex:
    """Random access to the samples of a shard folder: sample n is the n-th over the shards in `index.json` order."""

    def __init__(self, shard_dir: str | Path):
        shard_dir = Path(shard_dir)
        shards = read_index(shard_dir)["shards"]
        self.paths = [shard_dir / s["name"] for s in shards]
        self.counts = [int(s["count"]) for s in shards]
        self.starts = np.cumsum([0] + self.counts).tolist()
        self._tables: dict[int, ShardTable] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, n: int) -> dict:
        if not 0 <= n < len(self):
            raise IndexError(f"sample {n} of {len(self)}")
        shard = bisect.bisect_right(self.starts, n) - 1
        table, i = self.table(shard), n - self.starts[shard]
        path = self.paths[shard]
        sample = {"__key__": table.keys[i].decode(), "__url__": str(path)}
        with open(path, "rb") as f:
            for ext, (offset, size) in table.parts(i).items():
                f.seek(offset)
                sample[ext] = f.read(size)
        return sample

    def index_all(self) -> TarIndex:
        """Every shard's table now (a batch of a shuffled order reads most shards anyway)."""
        for shard in range(len(self.paths)):
            self.table(shard)
        return self

    def table(self, shard: int) -> ShardTable:
        if shard not in self._tables:
            self._tables[shard] = self._scan(shard)
        return self._tables[shard]

    def _scan(self, shard: int) -> ShardTable:
        path = self.paths[shard]
        table = ShardTable.from_arrays(cached(path, "tar", lambda: self._read(path).arrays()))
        if len(table) != self.counts[shard]:
            raise ShardError(f"{path}: {len(table)} samples in the tar, index.json says {self.counts[shard]}")
        return table

    @staticmethod
    def _read(path: Path) -> ShardTable:
        try:
            members = ustar_members(path)
            if members is None:  # GNU or global pax extensions: the standard library reads those
                with tarfile.open(path) as tar:
                    members = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        except (tarfile.TarError, OSError, ValueError) as err:
            raise ShardError(f"{path}: unreadable tar ({err})") from err
        return ShardTable.of(members)


class TokenBlocks:
    """A text corpus as fairseq's TokenBlockDataset cuts it (`sample_break_mode: none`, the data2vec text recipe):
    every chunk's ids concatenated in shard order and cut into blocks of `block_tokens` - 1 ids, each led by <s>; the
    tail short of a block is left out. Block b is read, by offset, from the chunks it spans.

    The index keeps each chunk's shard, the file offset of its ids and the running token count: 20 bytes a chunk
    (8M chunks of 512 for the paper's 4B-token corpus: 160 MB a rank). Building it reads every chunk's .npy header,
    once: the cache keeps each tar's offsets and counts."""

    def __init__(self, shard_dir: str | Path, block_tokens: int, bos: int):
        tars = TarIndex(shard_dir)
        self.paths, self.block_tokens, self.bos = tars.paths, block_tokens, bos
        chunks = text_chunks(tars)
        self.dtype = np.dtype(one_id_type([str(c["dtype"]) for c in chunks if len(c["counts"])], shard_dir))
        self.shards = np.concatenate([np.full(len(c["counts"]), k, np.int32) for k, c in enumerate(chunks)])
        self.offsets = np.concatenate([c["offsets"] for c in chunks])
        self.ends = np.cumsum(np.concatenate([c["counts"] for c in chunks]))  # chunk c: tokens ends[c-1]:ends[c]
        self.tokens = int(self.ends[-1]) if len(self.ends) else 0

    def __len__(self) -> int:
        return block_count(self.tokens, self.block_tokens)

    def __getitem__(self, b: int) -> dict:
        if not 0 <= b < len(self):
            raise IndexError(f"block {b} of {len(self)}")
        width = self.block_tokens - 1
        at, stop = b * width, (b + 1) * width
        chunk = int(np.searchsorted(self.ends, at, side="right"))
        pieces = [np.asarray([self.bos], dtype=np.int64)]
        while at < stop:
            begins = int(self.ends[chunk - 1]) if chunk else 0
            take = min(stop, int(self.ends[chunk])) - at
            with open(self.paths[self.shards[chunk]], "rb") as f:
                f.seek(int(self.offsets[chunk]) + (at - begins) * self.dtype.itemsize)
                pieces.append(np.frombuffer(f.read(take * self.dtype.itemsize), dtype=self.dtype).astype(np.int64))
            at, chunk = at + take, chunk + 1
        return {"__key__": f"block{b}", "__url__": str(self.paths[self.shards[chunk - 1]]),
                "ids": np.concatenate(pieces)}


def text_chunks(tars: TarIndex) -> list[dict[str, np.ndarray]]:
    """Each tar's `chunk_ids`, cached. Every tar table is indexed first, which checks it against index.json (the
    chunk arrays are made from it, or cached with it)."""
    tars.index_all()
    return [cached(path, "ids", lambda: chunk_ids(path, tars.table(shard))) for shard, path in enumerate(tars.paths)]


def block_count(tokens: int, block_tokens: int) -> int:
    """How many blocks `TokenBlocks` cuts from a corpus of `tokens` pieces: each holds block_tokens - 1 of them after
    its <s>, and the remainder is dropped."""
    return tokens // (block_tokens - 1)


def index_shards(shard_dir: str | Path) -> dict[str, int]:
    """Index a shard folder as its seekable stream will: its tars' tables, and a text corpus's chunks. Filling the
    cache beforehand (`d2v index`) spares the ranks of a launch from all building the same index at once."""
    tars = TarIndex(shard_dir).index_all()
    found = {"tars": len(tars.paths), "samples": len(tars)}
    if any("ids.npy" in tars.table(shard).ext_names for shard in range(len(tars.paths))):
        found["tokens"] = sum(int(c["counts"].sum()) for c in text_chunks(tars))
    return found


def chunk_ids(path: Path, table: ShardTable) -> dict[str, np.ndarray]:
    """Where each chunk's ids start in the tar, how many there are, and their type."""
    with open(path, "rb") as f:
        found = [npy_ids(f, path, table, i) for i in range(len(table))]
    return {"offsets": np.asarray([o for o, _, _ in found], np.int64).reshape(-1),
            "counts": np.asarray([n for _, n, _ in found], np.int64).reshape(-1),
            "dtype": np.asarray(one_id_type([str(dtype) for _, _, dtype in found], path))}


def one_id_type(dtypes: list[str], where: Path | str) -> str:
    """The one type the chunks store their ids as (`d2v shard` picks it by vocabulary size); uint16 for none."""
    if len(set(dtypes)) > 1:
        raise ShardError(f"{where}: chunks stored as {sorted(set(dtypes))}; one id type expected")
    return dtypes[0] if dtypes else "uint16"


def npy_ids(f, path: Path, table: ShardTable, i: int) -> tuple[int, int, np.dtype]:
    """(file offset of the ids, their count, their type) of sample i's `ids.npy`, from its header."""
    key = table.keys[i].decode()
    part = table.parts(i).get("ids.npy")
    if part is None:
        raise ShardError(f"{path}: sample {key} has no ids.npy (a text corpus shard holds token ids)")
    offset, size = part
    f.seek(offset)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
    except ValueError as err:
        raise ShardError(f"{path}: {key}.ids.npy is not a .npy array ({err})") from err
    data = f.tell()
    if len(shape) != 1 or dtype.kind not in "iu" or data - offset + shape[0] * dtype.itemsize != size:
        raise ShardError(f"{path}: {key}.ids.npy holds {dtype}{list(shape)} in {size} bytes; expected a 1-D array "
                         "of token ids that fills its member")
    return data, shape[0], dtype


def ustar_members(path: Path) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of each regular file, read from the 512-byte headers and the pax records that
    Python's tarfile writes before each member; None for other extensions (GNU long names, global pax headers),
    left to `tarfile`. `tarfile` takes 40-70 µs a member here, this 9-15 µs: every rank indexes ImageNet's 2.6M
    members when its stream is built."""
    members, offset, pax = [], 0, {}
    with open(path, "rb") as f:
        while True:
            f.seek(offset)
            header = f.read(BLOCK)
            if len(header) < BLOCK:
                raise tarfile.ReadError(f"truncated header at byte {offset}")
            if header == ZERO_BLOCK:
                return members
            if header[257:262] != b"ustar" or octal(header[148:156]) != \
                    sum(header[:148]) + 256 + sum(header[156:]):  # the checksum counts its own field as spaces
                raise tarfile.ReadError(f"not a ustar header at byte {offset}")
            kind, size = header[156:157], octal(header[124:136])
            if kind == b"x":  # pax records for the next member: "<length> <key>=<value>\n" ...
                pax = pax_records(f.read(size))
            elif kind in (b"0", b"\0"):
                name = header[:100].rstrip(b"\0").decode()
                prefix = header[345:500].rstrip(b"\0").decode()
                size = int(pax.get("size", size))
                members.append((pax.get("path") or (f"{prefix}/{name}" if prefix else name), offset + BLOCK, size))
                pax = {}
            elif kind != b"5":  # a directory needs nothing; anything else goes to tarfile
                return None
            offset += BLOCK + -(-size // BLOCK) * BLOCK


def octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes past 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b" \0") or b"0", 8)


def pax_records(data: bytes) -> dict[str, str]:
    records, at = {}, 0
    while at < len(data) and data[at:at + 1] != b"\0":
        length = int(data[at:data.index(b" ", at)])
        key, _, value = data[data.index(b" ", at) + 1:at + length - 1].partition(b"=")
        records[key.decode()] = value.decode()
        at += length
    return records


class RankOrder:
    """Sample number of place t in a rank's order: epoch t // per_rank, place rank + world·(t mod per_rank) of that
    epoch's permutation."""

    def __init__(self, n: int, seed: int, rank: int, world: int):
        if n < world:
            raise ShardError(f"{n} samples cannot give each of {world} ranks one")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.per_rank = n // world
        self._epochs: dict[int, np.ndarray] = {}

    def __getitem__(self, t: int) -> int:
        epoch, place = divmod(t, self.per_rank)
        return int(self.permutation(epoch)[self.rank + self.world * place])

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if len(self._epochs) >= 2:  # a batch spans two epochs at most, unless it outnumbers an epoch
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = keyed_rng(ORDER, self.seed, epoch).permutation(self.n)
        return self._epochs[epoch]


def keyed_rng(tag: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([SEEKABLE, tag, *key])


Decode = Callable[[dict, np.random.Generator], object]  # sample, its generator → item (None: leave it out)
Collate = Callable[[list, np.random.Generator], object]  # items, the batch's generator → batch


class SeekableBatches(torch.utils.data.IterableDataset):
    """Batches `start`, `start` + 1, ... of the rank's order, `batch_size` samples each. A sample that fails to decode
    is skipped with a warning naming it, as the shuffle-buffer streams skip it, and a stand-in takes its place."""

    def __init__(self, samples: TarIndex | TokenBlocks, batch_size: int, seed: int, start: int, decode: Decode,
                 collate: Collate):
        # indexed before the DataLoader forks its workers (`TarIndex.index_all`, `TokenBlocks`), which then share
        # the tables instead of each scanning every tar; a missing, truncated or miscounted shard fails there, named
        self.index = samples
        self.batch_size, self.seed, self.start = batch_size, seed, start
        self.decode, self.collate = decode, collate

    def __iter__(self):
        from webdataset.utils import pytorch_worker_info

        rank, world, worker, workers = pytorch_worker_info()
        order = RankOrder(len(self.index), self.seed, rank, world)
        for g in itertools.count(self.start + worker, workers):
            yield self.batch(order, rank, g)

    def batch(self, order: RankOrder, rank: int, g: int):
        items = [self.item(order, rank, t) for t in range(g * self.batch_size, (g + 1) * self.batch_size)]
        items = [item for item in items if item is not None]
        if not items:
            raise ShardError(f"batch {g}: none of its {self.batch_size} samples could be used (see the warnings)")
        return self.collate(items, keyed_rng(BATCH, self.seed, rank, g))

    def item(self, order: RankOrder, rank: int, t: int):
        """Place t's sample decoded; when it is left out (too short) or fails, a sample drawn at random by (seed,
        rank, t, attempt) stands in, so batches stay full without moving any other place."""
        for attempt in range(REPLACEMENTS + 1):
            n = order[t] if attempt == 0 else int(keyed_rng(REPLACE, self.seed, rank, t, attempt).integers(order.n))
            sample = self.index[n]
            try:
                item = self.decode(sample, keyed_rng(SAMPLE, self.seed, rank, t, attempt))
            except Exception as err:
                log.warning("skipping %s from %s: %r", sample["__key__"], sample["__url__"], err)
                continue
            if item is not None:
                return item
        return None


def with_torch_seed(fn: Callable, rng: np.random.Generator):
    """`fn()` with torch's global generator (torchvision's draws) seeded from `rng`, and restored afterwards: without
    workers the stream runs in the training process, whose generator the checkpoint holds."""
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(int(rng.integers(2 ** 63)))  # torch.manual_seed also seeds every
        return fn()  # accelerator, 70 times slower (torchvision draws from the CPU generator only)
    finally:
        torch.set_rng_state(state)
