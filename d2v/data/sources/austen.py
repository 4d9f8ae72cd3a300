"""Jane Austen's six novels from Debian's `r-cran-janeaustenr` (public-domain text, MIT package), without R.

The package stores each novel as an R lazy-load object: at a known offset of `Rdata.rdb`, a 4-byte length and a
zlib-compressed XDR serialisation of a character vector (one element per printed line). The reader below decodes
exactly that (STRSXP of CHARSXP, with an optional attribute pairlist); anything else is an error. The offsets are
those of the pinned `Rdata.rdb`.
"""
from __future__ import annotations

import re
import struct
import zlib

from d2v.data.sources.base import Context, Member, debian

DEB = debian("r-cran-janeaustenr_1.0.0-1_all.deb", "r/r-cran-janeaustenr/",
             "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95", size=None)
RDB = Member(DEB, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
             "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21")
OFFSETS = {"emma": (0, 352043), "mansfieldpark": (352043, 351373), "northangerabbey": (703416, 175196),
           "persuasion": (878612, 185130), "prideprejudice": (1063742, 271037),
           "sensesensibility": (1334779, 266556)}
TITLES = {"emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
          "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
          "sensesensibility": "Sense and Sensibility"}

STRSXP, LISTSXP, SYMSXP, CHARSXP, NILVALUE, REFSXP = 16, 2, 1, 9, 254, 255


class _XDR:
    """Just enough of R's XDR unserialiser for a character vector with attributes."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def header(self) -> None:
        if self.data[:2] != b"X\n":
            raise ValueError(f"not an XDR serialisation (header {self.data[:2]!r})")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer and minimal reader versions
        if version == 3:
            n = self.int()  # length of the native encoding name, which follows
            self.pos += n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == STRSXP:
            out = [self.item() for _ in range(self.int())]
            if has_attr:
                self.item()
            return out
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            text = self.data[self.pos:self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return text
        if kind == LISTSXP:
            if has_attr:
                self.item()
            if has_tag:
                self.item()
            return self.item(), self.item()
        if kind == SYMSXP:
            return self.item()
        if kind == NILVALUE:
            return None
        if kind == REFSXP:
            return None
        raise ValueError(f"unsupported R object type {kind} at byte {self.pos}")


def read_novels(ctx: Context) -> dict[str, list[str]]:
    """{novel key: printed lines}, from the pinned `Rdata.rdb`."""
    rdb = ctx.read(RDB)
    novels = {}
    for name, (offset, length) in OFFSETS.items():
        reader = _XDR(zlib.decompress(rdb[offset + 4:offset + length]))
        reader.header()
        lines = reader.item()
        if not isinstance(lines, list):
            raise ValueError(f"janeaustenr {name}: expected a character vector")
        novels[name] = [line or "" for line in lines]
    return novels


HEADING = re.compile(r"^(CHAPTER|VOLUME|Chapter)\b|^[IVXLC]+\.?$")
SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')]))\s+(?=[\"'(]*[A-Z])")


def paragraphs(lines: list[str]) -> list[str]:
    """Join printed lines into paragraphs (blank-line separated), dropping chapter/volume headings."""
    paras, current = [], []
    for line in lines + [""]:
        line = line.strip()
        if line and not HEADING.match(line):
            current.append(line)
        elif current:
            paras.append(" ".join(current))
            current = []
    return paras


ABBREVIATIONS = {"Mr.", "Mrs.", "Messrs.", "Dr.", "St.", "Rev.", "Esq.", "Col.", "Capt.", "Sir.", "Lt."}


def sentences(paragraph: str) -> list[str]:
    """Split at sentence-final punctuation, but not after titles such as 'Mr.'."""
    out = []
    for piece in SENTENCE_END.split(paragraph):
        piece = piece.strip()
        if out and out[-1].split()[-1] in ABBREVIATIONS:
            out[-1] = f"{out[-1]} {piece}"
        elif piece:
            out.append(piece)
    return out


_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


def normalize_transcript(text: str) -> str:
    """LibriSpeech style: upper case A-Z, apostrophes only inside words, single spaces, no digits or punctuation."""
    text = text.translate(_APOSTROPHES).replace("_", "").replace("-", " ").upper()
    text = re.sub(r"(?<![A-Z])'|'(?![A-Z])", " ", text)
    text = re.sub(r"[^A-Z' ]+", " ", text)
    return " ".join(text.split())


def transcript_sentences(lines: list[str], min_words: int = 6, max_words: int = 30) -> list[str]:
    """Normalised sentences of `min_words`..`max_words` words; sentences with digits are dropped, not spelled."""
    out = []
    for para in paragraphs(lines):
        for sent in sentences(para):
            if re.search(r"\d", sent):
                continue
            norm = normalize_transcript(sent)
            if min_words <= len(norm.split()) <= max_words:
                out.append(norm)
    return out
