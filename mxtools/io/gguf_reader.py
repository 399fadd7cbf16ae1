"""A GGUF header parser: metadata and tensor infos, with bounds checks; tensor data is read later by offset."""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import FormatError
from .files import RawFile
from .gguf_writer import tensor_nbytes

_NP = {GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
       GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
       GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "<u8",
       GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8"}


@dataclass
class TensorInfo:
    name: str
    shape: tuple          # numpy order (outermost first)
    qtype: GGMLQuantizationType
    offset: int           # absolute file offset
    nbytes: int


class _Cursor:
    def __init__(self, raw: RawFile):
        self.raw, self.pos = raw, 0
        self.buf = bytes(raw.read(0, min(raw.size, 1 << 20)))

    def take(self, n: int) -> bytes:
        while self.pos + n > len(self.buf):
            if len(self.buf) >= self.raw.size:
                raise FormatError("truncated GGUF header", file=self.raw.path)
            self.buf = bytes(self.raw.read(0, min(self.raw.size, 2 * len(self.buf) + n)))
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            elem, count = GGUFValueType(self.unpack("<I")), self.unpack("<Q")
            if elem in _NP:
                dt = np.dtype(_NP[elem])
                return np.frombuffer(self.take(count * dt.itemsize), dtype=dt).tolist()
            return [self.value(elem) for _ in range(count)]
        dt = np.dtype(_NP[vtype])
        return np.frombuffer(self.take(dt.itemsize), dtype=dt)[0].item()


def read_header(raw: RawFile) -> tuple[dict, list[TensorInfo]]:
    """(metadata, tensor infos) of a GGUF file; raises FormatError naming the file (and tensor) when broken."""
    c = _Cursor(raw)
    try:
        if c.take(4) != b"GGUF":
            raise FormatError("not a GGUF file (bad magic)", file=raw.path)
        version, n_tensors, n_kv = c.unpack("<I"), c.unpack("<Q"), c.unpack("<Q")
        if version not in (2, 3):
            raise FormatError(f"unsupported GGUF version {version}", file=raw.path)
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.unpack("<I"))
        infos = [_info(c) for _ in range(n_tensors)]
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise FormatError(f"corrupt GGUF header ({exc})", file=raw.path) from None
    align = int(meta.get("general.alignment", 32))
    start = c.pos + (-c.pos % align)
    return meta, [_place(raw, t, start) for t in infos]


def _info(c: _Cursor) -> TensorInfo:
    name = c.string()
    dims = [c.unpack("<Q") for _ in range(c.unpack("<I"))]
    qtype, offset = GGMLQuantizationType(c.unpack("<I")), c.unpack("<Q")
    shape = tuple(reversed(dims))
    return TensorInfo(name, shape, qtype, offset, tensor_nbytes(shape, qtype))


def _place(raw: RawFile, t: TensorInfo, start: int) -> TensorInfo:
    t.offset += start
    if t.offset + t.nbytes > raw.size:
        raise FormatError(f"file is truncated: tensor ends at byte {t.offset + t.nbytes} of {raw.size}",
                          file=raw.path, tensor=t.name)
    return t
