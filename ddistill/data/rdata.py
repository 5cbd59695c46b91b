"""Pure-Python reader for R lazy-load databases (``Rdata.rdb`` + ``Rdata.rdx``), enough for data packages.

Format (R Internals, "Serialization formats" and "Lazy loading"):

* ``Rdata.rdx`` is a gzip-compressed RDS file (or a lazy-load blob) holding a serialised
  ``list(variables=, references=, compressed=)``; ``variables`` is a named list mapping each object name
  to an integer pair ``(offset, length)`` into ``Rdata.rdb``.
* A blob is a 4-byte big-endian uncompressed length followed by a zlib stream (``compressed=TRUE``);
  for ``compressed`` 2/3 a fifth byte names the codec (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` none).
* The payload is R's XDR serialisation: ``"X\\n"``, the format version (2 or 3, the latter followed by the
  native-encoding name), then items. Each item starts with a 32-bit ``flags`` word: low byte = SEXP type,
  bit 8 = is-object, bit 9 = has-attributes, bit 10 = has-tag, bits 12.. = "levels" (string encoding).

Decoded values: character vectors -> ``list[str | None]`` (NA -> None), logical/integer/real vectors ->
lists (``NA_integer_`` -> None), generic vectors and pairlists -> :class:`RObject` carrying ``attributes``.
Closures, environments and bytecode are out of scope (they never appear in data objects) and raise.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["RObject", "RDataError", "read_lazyload_db"]

_NILSXP, _SYMSXP, _LISTSXP, _CHARSXP, _LGLSXP, _INTSXP, _REALSXP = 0, 1, 2, 9, 10, 13, 14
_STRSXP, _VECSXP, _EXPRSXP, _RAWSXP = 16, 19, 20, 24
_ALTREP_SXP, _EMPTYENV, _BASEENV, _GLOBALENV, _NILVALUE, _REFSXP = 238, 242, 241, 253, 254, 255
_NA_INT = -(2**31)


class RDataError(ValueError):
    """The bytes are not an R serialisation this reader understands."""


@dataclass
class RObject:
    """A decoded R value with its attributes (``names``, ``class``, ``row.names`` ...)."""

    value: object
    attributes: dict[str, object] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise RDataError(f"only XDR ('X\\n') serialisations are supported, got header {data[:2]!r}")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer / minimal reader R versions
        if version == 3:
            name_len = self.int()  # then the native encoding name
            self.pos += name_len
        elif version != 2:
            raise RDataError(f"unsupported serialisation version {version}")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) | (lo & 0xFFFFFFFF)
        return n

    def charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        levels = flags >> 12
        return raw.decode("latin-1" if levels & 4 else "utf-8", errors="strict" if levels & 4 else "replace")

    def attributes(self) -> dict[str, object]:
        plist = self.item()
        return dict(plist.value) if isinstance(plist, RObject) else {}

    def item(self) -> object:
        flags = self.int()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _NILSXP):
            return None
        if kind == _REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if kind == _LISTSXP:  # pairlist -> RObject(list of (tag, value))
            attrs, pairs = {}, []
            while True:
                if has_attr:
                    attrs.update(self.attributes())
                tag = self.item() if has_tag else None
                pairs.append((tag, self.item()))
                flags = self.int()
                kind = flags & 0xFF
                has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
                if kind != _LISTSXP:
                    if kind not in (_NILVALUE, _NILSXP):
                        raise RDataError(f"pairlist terminated by SEXP type {kind}")
                    return RObject(pairs, attrs)
        if kind == _CHARSXP:
            return self.charsxp(flags)
        if kind in (_LGLSXP, _INTSXP):
            n = self.length()
            vals = struct.unpack_from(f">{n}i", self.data, self.pos)
            self.pos += 4 * n
            value = [None if v == _NA_INT else v for v in vals]
        elif kind == _REALSXP:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind == _STRSXP:
            value = []
            for _ in range(self.length()):
                sub = self.int()
                if sub & 0xFF != _CHARSXP:
                    raise RDataError(f"STRSXP element of SEXP type {sub & 0xFF}")
                value.append(self.charsxp(sub))
        elif kind in (_VECSXP, _EXPRSXP):
            value = [self.item() for _ in range(self.length())]
        elif kind == _RAWSXP:
            n = self.length()
            value = self.data[self.pos:self.pos + n]
            self.pos += n
        elif kind == _ALTREP_SXP:
            return self.altrep()
        else:
            raise RDataError(f"unsupported SEXP type {kind} (closures/environments/bytecode are not data)")
        attrs = self.attributes() if has_attr else {}
        return RObject(value, attrs) if attrs else value

    def altrep(self) -> object:
        info, state, attr = self.item(), self.item(), self.item()
        cls = info.value[0][1] if isinstance(info, RObject) else None
        attrs = dict(attr.value) if isinstance(attr, RObject) else {}
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = (state.value if isinstance(state, RObject) else state)[:3]
            value = [start + i * step for i in range(int(n))]
            if cls == "compact_intseq":
                value = [int(v) for v in value]
        elif isinstance(cls, str) and cls.startswith("wrap_"):
            # state = pairlist(x, metadata) (a CONS cell): the wrapped vector is its first value
            value = state.value[0][1] if isinstance(state, RObject) else state[0]
        else:
            raise RDataError(f"unsupported ALTREP class {cls!r}")
        return RObject(value, attrs) if attrs else value


def _decompress(blob: bytes, compression: int) -> bytes:
    (size,) = struct.unpack_from(">I", blob, 0)
    if compression == 1:
        out = zlib.decompress(blob[4:])
    else:
        codec, payload = blob[4:5], blob[5:]
        out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress,
               b"0": bytes}.get(codec, lambda _: None)(payload)
        if out is None:
            raise RDataError(f"unknown lazy-load compression codec {codec!r}")
    if len(out) != size:
        raise RDataError(f"blob decompressed to {len(out)} bytes, header says {size}")
    return out


def read_lazyload_db(directory: Path, stem: str = "Rdata") -> dict[str, object]:
    """Decode every object of the lazy-load DB ``directory/{stem}.rdb`` (index ``{stem}.rdx``)."""
    directory = Path(directory)
    index_raw = (directory / f"{stem}.rdx").read_bytes()
    # The index is written by saveRDS (a gzip file) in installed packages, or as a lazy-load blob.
    index_bytes = gzip.decompress(index_raw) if index_raw[:2] == b"\x1f\x8b" else _decompress(index_raw, 1)
    index = _Reader(index_bytes).item()
    if not isinstance(index, RObject) or "names" not in index.attributes:
        raise RDataError(f"{stem}.rdx is not a named list")
    entries = dict(zip(index.attributes["names"], index.value, strict=True))
    compressed = entries.get("compressed", [True])
    compression = 1 if compressed in ([True], [1], True) else int(compressed[0])
    variables = entries["variables"]
    names = variables.attributes["names"]
    rdb = (directory / f"{stem}.rdb").read_bytes()
    out = {}
    for name, (offset, length) in zip(names, variables.value, strict=True):
        offset, length = int(offset), int(length)
        out[name] = _Reader(_decompress(rdb[offset:offset + length], compression)).item()
    return out
