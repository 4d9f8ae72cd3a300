"""ImageNet-1K (ILSVRC 2012), paper scale: from the official tar files, or from an extracted tree you point to.

ImageNet cannot be downloaded without an account, so `prepare` takes the three official archives from a folder
(`ILSVRC2012_img_train.tar`, `ILSVRC2012_img_val.tar`, `ILSVRC2012_devkit_t12.tar.gz`, md5-checked against the
published digests) or an ImageFolder tree `train/<wnid>/*.JPEG`, `val/<wnid>/*.JPEG`. Class indices follow the
sorted WordNet ids (the torchvision/timm convention). Every image header is opened; unreadable files are skipped,
named and counted.
"""
from __future__ import annotations

import functools
import io
import os
import shutil
import tarfile
from collections.abc import Mapping
from pathlib import Path

from PIL import Image
from pydantic import PositiveInt

from d2v.data.download import Artifact, bytes_sha256, verify
from d2v.data.manifest import Skipped, make_manifest, write_manifest
from d2v.data.sources.base import Context, register, rows_in_blocks

MD5 = {"ILSVRC2012_img_train.tar": "1d675b47d978889d74fa0da5fadfb00e",
       "ILSVRC2012_img_val.tar": "29b22e2961454d5413ddabcf34fc5622",
       "ILSVRC2012_devkit_t12.tar.gz": "fa75699e90414af021442c21a62c3abf"}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
INDEX_BLOCK = 1000  # images a worker indexes per task


def read_devkit(devkit: Path) -> tuple[dict[int, str], list[str]]:
    """ILSVRC2012_ID → wnid for the 1000 leaf classes, and the validation ground-truth IDs in file order."""
    from scipy.io import loadmat

    with tarfile.open(devkit) as tar:
        meta = tar.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
        truth = tar.extractfile("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read()
    synsets = loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    return id_to_wnid, [int(x) for x in truth.decode().split()]


def unpack_official(archives: Path, tree: Path) -> Path:
    """Official tars → `tree/{train,val}/<wnid>/*.JPEG` (atomically: a temp folder renamed at the end)."""
    tmp = tree.with_name(f".{tree.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        id_to_wnid, val_ids = read_devkit(archives / "ILSVRC2012_devkit_t12.tar.gz")
        with tarfile.open(archives / "ILSVRC2012_img_train.tar") as outer:
            for member in outer:  # one inner tar per class: n01440764.tar
                wnid = Path(member.name).stem
                with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                    inner.extractall(tmp / "train" / wnid, filter="data")
        with tarfile.open(archives / "ILSVRC2012_img_val.tar") as val:
            names = sorted(m.name for m in val.getmembers() if m.isfile())
            if len(names) != len(val_ids):
                raise ValueError(f"{archives}: {len(names)} validation images but {len(val_ids)} ground-truth labels")
            for name, ilsvrc_id in zip(names, val_ids):
                target = tmp / "val" / id_to_wnid[ilsvrc_id] / Path(name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(val.extractfile(name).read())
        os.replace(tmp, tree)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tree


def _index_files(files: list[tuple[str, Path]], out_dir: Path, label: dict[str, int], verify_images: bool
                 ) -> list[dict | tuple[str, str]]:
    """For each (split, image): its manifest row, or (path, reason) where it cannot be used; in the order given."""
    indexed = []
    for split, path in files:
        rel = os.path.relpath(path, out_dir)
        wnid = path.parent.name
        if wnid not in label:
            indexed.append((rel, f"class folder {wnid!r} not among the training classes"))
            continue
        data = path.read_bytes()
        if verify_images:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
            except Exception as err:
                indexed.append((rel, f"unreadable image: {err}"))
                continue
        key = path.stem.replace(".", "_")  # a WebDataset key ends at its first dot
        indexed.append(dict(id=f"{split}/{key}", path=rel, split=split, bytes=len(data), label=label[wnid],
                            text=wnid, sha256=bytes_sha256(data)))
    return indexed


def index_tree(tree: Path, out_dir: Path, skipped: Skipped, verify_images: bool = True, workers: int = 1
               ) -> tuple[list[dict], list[str]]:
    """Read, hash and check every image, in `workers` processes: 1.28M files are I/O-bound in one (hours on a
    network file system); the rows come back in file order whatever the number."""
    wnids = sorted(p.name for p in (tree / "train").iterdir() if p.is_dir())
    label = {w: i for i, w in enumerate(wnids)}
    files = [(split, path) for split in ("train", "val") for path in sorted((tree / split).rglob("*"))
             if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES]
    index = functools.partial(_index_files, out_dir=out_dir, label=label, verify_images=verify_images)
    return rows_in_blocks(index, files, INDEX_BLOCK, workers, skipped), wnids


@register("imagenet", "image", "paper", "ImageNet-1K from the official tars or an extracted train/val tree",
          splits=("train", "val"))
def prepare(ctx: Context, archives: str | Path | None = None, tree: str | Path | None = None,
            md5: Mapping[str, str] = MD5, verify_images: bool = True, workers: PositiveInt = 1) -> Path:
    """Give `archives` (folder with the three official files) or `tree` (extracted ImageFolder layout); `workers`
    processes read and check the images."""
    if (archives is None) == (tree is None):
        raise ValueError("imagenet: give exactly one of archives=<folder with the official tars> or tree=<folder>")
    out = ctx.out_dir
    out.mkdir(parents=True, exist_ok=True)
    if archives is not None:
        archives = Path(archives)
        for name, digest in md5.items():  # checksum the user's copies in place (the train tar is 138 GB)
            if not (archives / name).is_file():
                raise FileNotFoundError(f"imagenet: {archives / name} missing; expected the official {name}")
            verify(archives / name, Artifact(name, (str(archives / name),), md5=digest), str(archives / name))
        tree = out / "tree"
        if not tree.exists():
            unpack_official(archives, tree)
    tree = Path(tree)
    for split in ("train", "val"):
        if not (tree / split).is_dir():
            raise FileNotFoundError(f"imagenet: {tree / split} missing; expected {tree}/{{train,val}}/<wnid>/*.JPEG")
        loose = next((f for f in (tree / split).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), None)
        if loose is not None:  # the official val tar unpacked as it comes: every image would be skipped
            raise ValueError(f"imagenet: {loose} lies in {tree / split} itself; expected one folder per class, "
                             f"{tree / split}/<wnid>/*.JPEG. Give archives=<folder with the three official files> "
                             "instead (the devkit sorts the validation images), or sort them by class first")
    skipped = Skipped()
    rows, wnids = index_tree(tree, out, skipped, verify_images, workers)
    write_manifest(out, make_manifest(rows), source="imagenet", classes=wnids, tree=str(tree),
                   skipped=skipped.as_json(), licence="ImageNet terms of access (non-commercial research)")
    return out
