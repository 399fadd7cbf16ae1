"""Streaming safetensors: lazy reads by offset, and a writer that plans the header then writes in order."""
from __future__ import annotations

import json
import struct
from itertools import pairwise
from pathlib import Path

import torch

from ..core.errors import FormatError, OutputError
from ..core.tensors import LazyTensor, dense_nbytes
from ..core.values import is_kind
from .direct import DirectFile
from .files import RawFile

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "U16": torch.uint16, "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: header parsed and validated up front; tensors read one at a time by offset."""

    def __init__(self, path, dtypes: dict = DTYPES):
        self.path, self.dtypes = str(path), dtypes  # dtypes: the header's dtype names (a layout may add its own)
        self.raw = RawFile(path)
        try:
            self.metadata, self.entries = self._parse()
        except BaseException:
            self.raw.close()
            raise

    def _parse(self):
        if self.raw.size < 8:
            raise FormatError("not a safetensors file (too short)", file=self.path)
        (n,) = struct.unpack("<Q", bytes(self.raw.read(0, 8)))
        if n > MAX_HEADER or 8 + n > self.raw.size:
            raise FormatError("not a safetensors file or truncated (bad header length)", file=self.path)
        try:
            header = json.loads(bytes(self.raw.read(8, n)))
        except (ValueError, RecursionError):  # bad UTF-8, bad JSON, nesting or integers beyond the parser
            raise FormatError("corrupt safetensors header", file=self.path) from None
        if not is_kind(header, dict):
            raise FormatError("corrupt safetensors header (not a JSON object)", file=self.path)
        start = 8 + n
        meta = header.pop("__metadata__", None) or {}
        if not is_kind(meta, dict):
            raise FormatError("corrupt safetensors header (__metadata__ is not an object)", file=self.path)
        entries = {name: self._entry(name, e, start) for name, e in header.items()}
        _check_disjoint(entries, self.path)
        return meta, entries

    def _entry(self, name, e, start):
        try:
            dtype = self.dtypes[e["dtype"]]
            shape, offsets = tuple(e["shape"]), tuple(e["data_offsets"])
        except (KeyError, TypeError):
            raise FormatError("corrupt header entry (dtype, shape, data_offsets)", file=self.path,
                              tensor=name) from None
        if not all(is_kind(x, int) and x >= 0 for x in shape + offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise FormatError(f"corrupt header entry: shape {str(list(shape))[:80]}, data_offsets "
                              f"{str(list(offsets))[:80]}", file=self.path, tensor=name)
        begin, end = offsets
        nbytes = dense_nbytes(shape, dtype)
        if end - begin != nbytes:
            raise FormatError(f"size {end - begin} does not match shape {list(shape)}", file=self.path, tensor=name)
        if start + end > self.raw.size:
            raise FormatError(f"file is truncated: tensor ends at byte {start + end} of {self.raw.size}",
                              file=self.path, tensor=name)
        return dtype, shape, start + begin, nbytes

    def keys(self):
        return self.entries.keys()

    def lazy(self, key: str, name: str | None = None) -> LazyTensor:
        dtype, shape, offset, nbytes = self.entries[key]
        load = lambda: self.raw.read_tensor(offset, nbytes, dtype, shape, key)
        return LazyTensor(name or key, shape, dtype, load, self.path)

    def close(self):
        self.raw.close()


def _check_disjoint(entries: dict, path) -> None:
    """No two tensors' data may overlap (each byte of the data section belongs to at most one tensor)."""
    spans = sorted((off, off + nbytes, name) for name, (_, _, off, nbytes) in entries.items() if nbytes)
    for (_, end, a), (begin, _, b) in pairwise(spans):
        if begin < end:
            raise FormatError(f"data overlaps tensor {a}'s", file=path, tensor=b)


class SafetensorsWriter:
    """Plan every tensor first (name, dtype, shape), write the header, then accept the data in plan order."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple]], metadata: dict | None = None):
        self.path, self.plan, self.next = Path(path), plan, 0
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        for name, dtype, shape in plan:
            n = dense_nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
        self.f = DirectFile(self.path)
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> int:
        """Append tensor `name` (must be the next planned one); returns bytes written."""
        want_name, dtype, shape = self.plan[self.next]
        if name != want_name or t.dtype != dtype or tuple(t.shape) != tuple(shape):
            raise OutputError(f"writer expected {want_name} {dtype} {list(shape)}, got {name} {t.dtype} "
                              f"{list(t.shape)}", file=self.path, tensor=name)
        self.next += 1
        return write_tensor_bytes(self.f, t)

    def close(self):
        if self.next != len(self.plan):
            raise OutputError(f"only {self.next} of {len(self.plan)} tensors written", file=self.path)
        self.f.close()


def write_tensor_bytes(f, t: torch.Tensor) -> int:
    """Write a tensor's raw little-endian bytes without an extra copy when it is contiguous."""
    t = t.contiguous()
    if t.numel() == 0:
        return 0
    data = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    f.write(memoryview(data.numpy()).cast("B"))
    return dense_nbytes(t.shape, t.dtype)
