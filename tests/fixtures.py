"""Local stand-ins for the real world: an HTTP server on 127.0.0.1 (Range requests, cut connections, 404s) and
builders for package and corpus files in their real formats (.deb, IDX, LibriSpeech tree, GLUE zips, ImageNet tars).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import soundfile as sf


class FileServer:
    """Serves `files` {path: bytes}. `cut[path] = n` closes the connection after n bytes of the next response;
    `ignore_range` answers 200 with the whole file even when a Range is asked for; while `hold` (an Event) is
    unset, responses wait."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut, self.ignore_range, self.requests = dict(files), {}, False, []
        self.hold: threading.Event | None = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if server.hold is not None:
                    server.hold.wait(timeout=30)
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                limit = server.cut.pop(self.path, None)
                self.wfile.write(body if limit is None else body[:limit])
                if limit is not None:
                    self.wfile.flush()
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_bytes(files: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def deb_bytes(files: dict[str, bytes]) -> bytes:
    """A Debian package: ar archive of debian-binary, control.tar.xz, data.tar.xz ('./' prefixed paths)."""
    members = {"debian-binary": b"2.0\n", "control.tar.xz": tar_bytes({"./control": b"Package: x\n"}, "w:xz"),
               "data.tar.xz": tar_bytes({"./" + k: v for k, v in files.items()}, "w:xz")}
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    return bytes(out)


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def flac_bytes(seconds: float, freq: float = 220.0, rate: int = 16_000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * freq * t), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def tone_speech(text: str, rate: int = 16_000, seconds_per_symbol: float = 0.12) -> bytes:
    """FLAC of a 'spoken' string over A/B/C: one tone per letter, silence for a space (a learnable toy for CTC)."""
    freqs = {"A": 300.0, "B": 700.0, "C": 1500.0, " ": 0.0}
    t = np.arange(int(seconds_per_symbol * rate)) / rate
    gap = np.zeros(int(0.03 * rate))
    x = np.concatenate([np.concatenate([0.3 * np.sin(2 * np.pi * freqs[c] * t), gap]) for c in text])
    buf = io.BytesIO()
    sf.write(buf, x, rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def tone_task_shards(root, texts: list[str]):
    """A CTC task of tone speech under `root`: FLACs, manifest, shards `tones/train` and a letter vocabulary;
    returns the vocabulary's path."""
    from d2v.data.manifest import make_manifest, write_manifest
    from d2v.data.shards import write_shards
    from d2v.data.tokenizer import LetterTokenizer, build_letter_vocab

    (root / "raw").mkdir()
    rows = []
    for i, text in enumerate(texts):
        (root / "raw" / f"{i}.flac").write_bytes(tone_speech(text))
        rows.append(dict(id=f"u{i}", path=f"{i}.flac", split="train", duration=0.6, text=text))
    write_manifest(root / "raw", make_manifest(rows), source="mini_librispeech")
    write_shards(root / "raw", "train", root / "shards" / "tones" / "train")
    LetterTokenizer(build_letter_vocab(texts)).save(root / "letters.json")
    return root / "letters.json"


def token_shards(root, chunks: list[np.ndarray], per_shard: int):
    """Text corpus shards as `d2v shard` writes them: `ids.npy` chunks, `per_shard` to a tar, and index.json."""
    import json

    import webdataset as wds

    from d2v.data.shards import shard_summary

    root.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(chunks), per_shard):
        with wds.TarWriter(str(root / f"shard-{k // per_shard:06d}.tar")) as sink:
            for i in range(k, min(k + per_shard, len(chunks))):
                sink.write({"__key__": f"doc-{i:05d}", "ids.npy": chunks[i]})
    shards = [shard_summary(p) for p in sorted(root.glob("*.tar"))]
    (root / "index.json").write_text(json.dumps({"kind": "text_corpus", "shards": shards}))
    return root


def librispeech_tar(split: str, utterances: dict[str, tuple[float, str]], corrupt: tuple[str, ...] = (),
                    untranscribed: tuple[str, ...] = ()) -> bytes:
    """LibriSpeech layout: LibriSpeech/<split>/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac + <spk>-<chapter>.trans.txt"""
    files, trans = {}, {}
    for utt, (seconds, text) in utterances.items():
        spk, chapter, _ = utt.split("-")
        folder = f"LibriSpeech/{split}/{spk}/{chapter}/"
        files[folder + utt + ".flac"] = b"not a flac file" if utt in corrupt else flac_bytes(seconds)
        trans.setdefault(folder + f"{spk}-{chapter}.trans.txt", []).append(f"{utt} {text}")
    for utt in untranscribed:
        spk, chapter, _ = utt.split("-")
        files[f"LibriSpeech/{split}/{spk}/{chapter}/{utt}.flac"] = flac_bytes(1.0)
    files.update({k: ("\n".join(v) + "\n").encode() for k, v in trans.items()})
    files["LibriSpeech/README.TXT"] = b"LibriSpeech ASR corpus\n"
    return tar_bytes(files)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def randomize(model, seed: int = 0):
    """Every parameter drawn at random (in eval mode): zero-initialised tables, tokens and biases, or LayerNorms at
    exactly 1, would hide a checkpoint-mapping bug."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.02 if p.ndim >= 2 and "embed" not in name else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("weight") and p.ndim == 1 else 0))
    return model.eval()



def mae_sincos(dim: int, n: int) -> np.ndarray:
    """MAE's util/pos_embed.get_2d_sincos_pos_embed (cls_token=False): the table fairseq's v2 images store."""
    grid = np.stack(np.meshgrid(np.arange(n, dtype=np.float32), np.arange(n, dtype=np.float32)), 0)  # w first

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
