"""A streaming GGUF v3 writer: plan all metadata and tensor infos, write the header, then the data in order.

Unlike gguf-py's writer it never needs a whole tensor: a merged [E, F, D] expert tensor is written one expert
slab at a time. Calls out of order are refused with an OutputError naming the file: metadata and tensor plans
-> write_header -> the data of tensor 0, 1, ... in plan order -> close.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from gguf import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGMLQuantizationType, GGUFValueType

from ..core.errors import OutputError
from .direct import DirectFile
from .gguf_format import VALUE_FORMATS, tensor_nbytes


def _str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: GGUFValueType, value, elem: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _str(value)
    if vtype == GGUFValueType.ARRAY:
        head = struct.pack("<IQ", int(elem), len(value))
        if elem in VALUE_FORMATS:
            return head + np.asarray(value, dtype=np.dtype(VALUE_FORMATS[elem])).tobytes()
        return head + b"".join(_value(elem, v) for v in value)
    return struct.pack(VALUE_FORMATS[vtype], value)


class GGUFStreamWriter:
    def __init__(self, path: Path, alignment: int = GGUF_DEFAULT_ALIGNMENT):
        self.path, self.alignment = Path(path), alignment
        self.kv: list[bytes] = []
        self.infos: list[tuple[str, tuple, GGMLQuantizationType, int]] = []
        self.f = None
        self.current, self.written = 0, 0

    def add(self, key: str, vtype: GGUFValueType, value, elem: GGUFValueType | None = None) -> None:
        if self.f is not None:
            raise OutputError("metadata added after the header was written", file=self.path)
        self.kv.append(_str(key) + struct.pack("<I", int(vtype)) + _value(vtype, value, elem))

    def plan(self, name: str, np_shape: tuple, qtype: GGMLQuantizationType) -> None:
        if self.f is not None:
            raise OutputError("tensor planned after the header was written", file=self.path, tensor=name)
        self.infos.append((name, tuple(np_shape), qtype, tensor_nbytes(np_shape, qtype)))

    def _pad(self, n: int) -> int:
        return -n % self.alignment

    def write_header(self) -> None:
        if self.f is not None:
            raise OutputError("the GGUF header was already written", file=self.path)
        head = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self.infos), len(self.kv)), *self.kv]
        offset = 0
        for name, shape, qtype, nbytes in self.infos:
            dims = struct.pack(f"<I{len(shape)}Q", len(shape), *reversed(shape))
            head.append(_str(name) + dims + struct.pack("<IQ", int(qtype), offset))
            offset += nbytes + self._pad(nbytes)
        blob = b"".join(head)
        self.f = DirectFile(self.path)
        self.f.write(blob + b"\0" * self._pad(len(blob)))

    def write(self, data) -> int:
        """Append raw bytes of the current tensor (a whole tensor or one slab of it)."""
        if self.f is None:
            raise OutputError("tensor data written before the GGUF header (call write_header first)",
                              file=self.path)
        if self.current == len(self.infos):
            raise OutputError(f"tensor data written after all {len(self.infos)} planned tensors", file=self.path)
        name, _, _, nbytes = self.infos[self.current]
        mv = memoryview(data).cast("B")
        if self.written + mv.nbytes > nbytes:
            raise OutputError("more data than planned", file=self.path, tensor=name)
        self.f.write(mv)
        self.written += mv.nbytes
        if self.written == nbytes:
            self.f.write(b"\0" * self._pad(nbytes))
            self.current, self.written = self.current + 1, 0
        return mv.nbytes

    def close(self) -> None:
        if self.f is None:
            raise OutputError("closed before the GGUF header was written", file=self.path)
        if self.current != len(self.infos):
            raise OutputError(f"only {self.current} of {len(self.infos)} tensors written", file=self.path)
        self.f.close()
