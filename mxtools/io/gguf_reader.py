"""A GGUF header parser: metadata and tensor infos. Every count, length, dimension, type id and offset read
from the file is checked against the file's size and the format's limits (llama.cpp's gguf.cpp) before
anything is allocated or read; tensor data is read later by offset."""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys

from ..core.errors import FormatError, OutputError
from ..core.values import is_kind
from .files import RawFile
from .gguf_format import MAGIC, READ_VERSIONS, VALUE_FORMATS, tensor_nbytes

MAX_DIMS = 4                 # GGML_MAX_DIMS
INT64_MAX = 2**63 - 1        # ggml counts elements and bytes in int64
_MIN_KV = 8 + 4 + 1          # key length, value type, the smallest value
_MIN_INFO = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dimension, type, offset


@dataclass
class TensorInfo:
    name: str
    shape: tuple          # numpy order (outermost first)
    qtype: GGMLQuantizationType
    offset: int           # absolute file offset
    nbytes: int


class _Cursor:
    """Reads the header front to back; never reads, nor allocates for, more than the file still holds."""

    def __init__(self, raw: RawFile):
        self.raw, self.pos = raw, 0
        self.buf = bytes(raw.read(0, min(raw.size, 1 << 20)))

    def fail(self, message: str, tensor=None):
        raise FormatError(message, file=self.raw.path, tensor=tensor)

    def left(self) -> int:
        return self.raw.size - self.pos

    def need(self, count: int, each: int, what: str) -> int:
        """`count` items of at least `each` bytes must fit in the rest of the file."""
        if count * each > self.left():
            self.fail(f"truncated or corrupt GGUF header: {what} {count} does not fit in the file "
                      f"({self.left()} bytes left at byte {self.pos})")
        return count

    def take(self, n: int) -> bytes:
        self.need(n, 1, "a length of")
        if self.pos + n > len(self.buf):
            self.buf = bytes(self.raw.read(0, min(self.raw.size, max(2 * len(self.buf), self.pos + n))))
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings (the same checks as string(), in one loop: a vocabulary holds 32000 of them)."""
        out, unpack = [], struct.unpack_from
        for _ in range(count):
            buf, pos = self.buf, self.pos
            n = unpack("<Q", buf, pos)[0] if pos + 8 <= len(buf) else len(buf)
            if pos + 8 + n > len(buf):
                out.append(self.string())  # the slow path reads more of the file, or fails
                continue
            out.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
            self.pos = pos + 8 + n
        return out

    def vtype(self) -> GGUFValueType:
        code = self.unpack("<I")
        try:
            return GGUFValueType(code)
        except ValueError:
            self.fail(f"corrupt GGUF header: unknown value type {code} at byte {self.pos - 4}")

    def value(self, vtype: GGUFValueType):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            elem, count = self.vtype(), self.unpack("<Q")
            if elem == GGUFValueType.ARRAY:
                self.fail("corrupt GGUF header: nested arrays are not supported")
            if elem == GGUFValueType.STRING:
                return self.strings(self.need(count, 8, "array length"))
            dt = np.dtype(VALUE_FORMATS[elem])
            return np.frombuffer(self.take(self.need(count, dt.itemsize, "array length") * dt.itemsize), dt).tolist()
        dt = np.dtype(VALUE_FORMATS[vtype])
        return np.frombuffer(self.take(dt.itemsize), dtype=dt)[0].item()


def read_header(raw: RawFile) -> tuple[dict, list[TensorInfo]]:
    """(metadata, tensor infos) of a GGUF file; raises FormatError naming the file (and tensor) when broken."""
    c = _Cursor(raw)
    if c.take(len(MAGIC)) != MAGIC:
        c.fail("not a GGUF file (bad magic)")
    version = c.unpack("<I")
    if version not in READ_VERSIONS:
        c.fail(f"unsupported GGUF version {version}")
    n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
    c.need(n_tensors, _MIN_INFO, "tensor count")
    c.need(n_kv, _MIN_KV, "metadata key count")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        if key in meta:
            c.fail(f"corrupt GGUF header: duplicate metadata key {key!r}")
        meta[key] = c.value(c.vtype())
    infos = {}
    for _ in range(n_tensors):
        t = _info(c)
        if t.name in infos:
            c.fail("corrupt GGUF header: duplicate tensor name", tensor=t.name)
        infos[t.name] = t
    align = _alignment(c, meta)
    return meta, _place(c, list(infos.values()), c.pos + (-c.pos % align), align)


def _alignment(c: _Cursor, meta: dict) -> int:
    align = meta.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    if not is_kind(align, int) or align <= 0 or align & (align - 1):
        c.fail(f"{Keys.General.ALIGNMENT} must be a power of two, not {align!r}")
    return align


def _info(c: _Cursor) -> TensorInfo:
    name = c.string()
    n_dims = c.unpack("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(f"tensor has {n_dims} dimensions (1 to {MAX_DIMS} allowed)", tensor=name)
    dims = [c.unpack("<Q") for _ in range(n_dims)]
    if any(d < 1 or d > INT64_MAX for d in dims) or math.prod(dims) > INT64_MAX:
        c.fail(f"tensor dimensions {dims} are out of range", tensor=name)
    code, offset = c.unpack("<I"), c.unpack("<Q")
    try:
        qtype = GGMLQuantizationType(code)
        GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        c.fail(f"unknown tensor type id {code}", tensor=name)
    shape = tuple(reversed(dims))
    try:
        nbytes = tensor_nbytes(shape, qtype)
    except OutputError as exc:  # the writer's check of the same rule: here it is the input that breaks it
        c.fail(exc.message, tensor=name)
    return TensorInfo(name, shape, qtype, offset, nbytes)


def _place(c: _Cursor, infos: list[TensorInfo], start: int, align: int) -> list[TensorInfo]:
    """Make offsets absolute; each must be aligned, inside the file and clear of every other tensor."""
    end = start
    for t in sorted(infos, key=lambda t: t.offset):
        if t.offset % align:
            c.fail(f"data offset {t.offset} is not a multiple of the alignment {align}", tensor=t.name)
        t.offset += start
        if t.offset < end:
            c.fail(f"data at byte {t.offset} overlaps the previous tensor (ends at byte {end})", tensor=t.name)
        end = t.offset + t.nbytes
        if end > c.raw.size:
            c.fail(f"file is truncated: tensor ends at byte {end} of {c.raw.size}", tensor=t.name)
    return infos

