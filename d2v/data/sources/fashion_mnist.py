"""Fashion-MNIST (Zalando, MIT): the embedded ImageNet stand-in, 60k train / 10k test, 28x28 grey, 10 classes.

Taken from Debian's `dataset-fashion-mnist` .deb (read without installing it); when no Debian mirror answers,
from the upstream URLs with their published md5s. Debian re-gzipped the files, so the IDX payloads are pinned by
the sha256 of their decompressed bytes, which both routes must match. Images are written as PNG in an
ImageNet-like tree `{train,test}/<class>/<id>.png`, so ImageNet and Fashion-MNIST share the shard/loader path.
"""
from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import PositiveInt

from d2v.data.download import Artifact, ChecksumError, DownloadError, bytes_sha256, fetch
from d2v.data.manifest import make_manifest, write_manifest
from d2v.data.sources.base import Context, Member, debian, log, register, staged

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
DEB = debian("dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb", "d/dataset-fashion-mnist/",
             "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0", size=30900652)
UPSTREAM = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# file -> (sha256 of the .gz inside the .deb, md5 of the upstream .gz, sha256 of the decompressed IDX payload)
FILES = {
    "train-images-idx3-ubyte": ("b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    "train-labels-idx1-ubyte": ("0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
                                "25c81989df183df01b3e8a0aad5dffbe",
                                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    "t10k-images-idx3-ubyte": ("cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
                               "bef4ecab320f06d8554ea6380940ec79",
                               "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    "t10k-labels-idx1-ubyte": ("8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
                               "bb300cfdad3c16e7a12a480ee83cd310",
                               "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
}
DEB_DIR = "usr/share/datasets/fashion-mnist/"


def read_idx(data: bytes, where: str) -> np.ndarray:
    """Parse an IDX file (LeCun's MNIST format): magic 0x0000 0x08 ndim, big-endian dims, uint8 payload."""
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{where}: not a uint8 IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{where}: {len(data)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_payloads(ctx: Context) -> dict[str, bytes]:
    """Decompressed IDX payloads, from the .deb or (fallback) upstream, each checked against its sha256."""
    try:
        raw = {name: gzip.decompress(ctx.read(Member(DEB, DEB_DIR + name + ".gz", gz_sha)))
               for name, (gz_sha, _, _) in FILES.items()}
    except ChecksumError:
        raise  # the pinned package has other contents: never paper over that with another source
    except DownloadError as err:
        log.warning("Debian mirrors failed (%s); using the upstream Fashion-MNIST files", err)
        raw = {name: gzip.decompress(fetch(Artifact(name + ".gz", (UPSTREAM + name + ".gz",), md5=md5),
                                           ctx.cache_dir).read_bytes())
               for name, (_, md5, _) in FILES.items()}
    for name, data in raw.items():
        if bytes_sha256(data) != FILES[name][2]:
            raise ValueError(f"fashion-mnist {name}: decompressed sha256 {bytes_sha256(data)} != {FILES[name][2]}")
    return raw


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


@register("fashion_mnist", "image", "embedded", "Fashion-MNIST 60k/10k, ImageNet stand-in (Debian package)",
          splits=("train", "test"))
def prepare(ctx: Context, limit: PositiveInt | None = None) -> Path:
    """Write PNGs + manifest. `limit` keeps the first N images per split (for smoke runs)."""
    raw = load_payloads(ctx)
    rows = []
    with staged(ctx.out_dir) as out:
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = read_idx(raw[f"{prefix}-images-idx3-ubyte"], f"{prefix}-images")
            labels = read_idx(raw[f"{prefix}-labels-idx1-ubyte"], f"{prefix}-labels")
            n = len(images) if limit is None else min(limit, len(images))
            for i in range(n):
                label = int(labels[i])
                rel = f"{split}/{label}/{split}_{i:05d}.png"
                data = png_bytes(images[i])
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(data)
                rows.append(dict(id=f"{split}_{i:05d}", path=rel, split=split, bytes=len(data), label=label,
                                 text=CLASSES[label], sha256=bytes_sha256(data)))
        write_manifest(out, make_manifest(rows), source="fashion_mnist", classes=list(CLASSES),
                       artifacts={DEB.name: DEB.sha256}, skipped={"count": 0, "files": []},
                       licence="MIT (Zalando SE)")
    return ctx.out_dir
