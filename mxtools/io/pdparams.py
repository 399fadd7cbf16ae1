"""Paddle's `.pdparams` files (what `paddle.save(state_dict)` and PaddleNLP's `save_pretrained` write), read
without running any code in them.

A .pdparams file is a pickle (protocol 4 from paddle 2.x and 3.x by default) of a dict: parameter name ->
numpy array, plus Paddle's bookkeeping entry `StructuredToParameterName@@` (name -> Paddle's internal name).
Paddle has no numpy type for bfloat16 and stores its bits as uint16; a uint16 array here is read as bfloat16, as
`paddle.load` does. Outside a plain state dict Paddle pickles a tensor as the tuple (internal name, array),
which is read as the array.

The pickle is interpreted by `pickle_vm.Machine` (six admitted globals, each an inert marker; anything else is
refused with UnsafePickleError before it could be imported). A pickle cannot be read from the middle, so one
sequential pass over the file finds every tensor; an array's bytes are the operand of one BINBYTES opcode,
which the pass skips over and records as (offset, length), so the pass holds only names, shapes and offsets and
each tensor is later read on its own by offset, like a safetensors tensor. Peak memory is one tensor, not one
shard (measured in docs/FORMATS.md, section 3).
"""
from __future__ import annotations

import math

import torch

from ..core.errors import FormatError
from ..core.tensors import LazyTensor
from .files import RawFile
from .pickle_vm import ArrayStub, Blob, Machine

PARAMETER_NAMES_KEY = "StructuredToParameterName@@"  # Paddle's bookkeeping entry, not a tensor

# numpy type code -> torch dtype; u2 is Paddle's bfloat16 (numpy has none), never a true uint16
DTYPES = {"f2": torch.float16, "f4": torch.float32, "f8": torch.float64, "u2": torch.bfloat16,
          "i1": torch.int8, "i2": torch.int16, "i4": torch.int32, "i8": torch.int64, "u1": torch.uint8,
          "b1": torch.bool}


class PdparamsFile:
    """One .pdparams file: the pickle interpreted up front (no tensor data read); tensors read one at a time."""

    def __init__(self, path):
        self.path = str(path)
        self.raw = RawFile(path)
        try:
            self.entries = self._parse()
        except BaseException:
            self.raw.close()
            raise

    def _parse(self) -> dict:
        if self.raw.size < 2:
            raise FormatError("not a .pdparams pickle (too short)", file=self.path)
        value = Machine(self.raw.fd, self.raw.size, self.path).run()
        if not isinstance(value, dict):
            raise FormatError(f"the pickle holds a {type(value).__name__}, not a dict of named tensors",
                              file=self.path)
        out = {}
        for key, v in value.items():
            if key == PARAMETER_NAMES_KEY and isinstance(v, dict):
                continue
            if type(key) is not str:
                raise FormatError(f"a key that is a {type(key).__name__}, not a tensor name", file=self.path)
            out[key] = self._entry(key, v)
        return out

    def _entry(self, key: str, v):
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):  # Paddle's (internal name, array)
            v = v[1]
        if not isinstance(v, ArrayStub) or v.shape is None:
            raise FormatError(f"holds a {type(v).__name__}, not a numpy array", file=self.path, tensor=key)
        code, order = v.dtype.code.lstrip("<>=|"), v.dtype.byteorder
        dtype = DTYPES.get(code)
        if dtype is None or (order == ">" and dtype.itemsize > 1) or v.dtype.code[:1] == ">":
            raise FormatError(f"numpy dtype {order}{v.dtype.code[:8]} is not one Paddle writes (little-endian "
                              f"float, bfloat16 as uint16, or integer)", file=self.path, tensor=key)
        nbytes = math.prod(v.shape) * dtype.itemsize
        have = v.data.nbytes if isinstance(v.data, Blob) else len(v.data)
        if have != nbytes:
            raise FormatError(f"data of {have} bytes does not match shape {list(v.shape)} of {code}",
                              file=self.path, tensor=key)
        return dtype, v.shape, v.fortran, v.data

    def keys(self):
        return self.entries.keys()

    def load(self, key: str) -> torch.Tensor:
        dtype, shape, fortran, data = self.entries[key]
        dims = tuple(reversed(shape)) if fortran else shape
        if isinstance(data, Blob):
            t = self.raw.read_tensor(data.offset, data.nbytes, dtype, dims, key)
        else:
            t = torch.frombuffer(bytearray(data), dtype=dtype).view(dims) if data else torch.empty(dims, dtype=dtype)
        return t.permute(*reversed(range(len(dims)))).contiguous() if fortran and len(dims) > 1 else t

    def lazy(self, key: str, name: str | None = None) -> LazyTensor:
        dtype, shape, _, _ = self.entries[key]
        return LazyTensor(name or key, tuple(shape), dtype, lambda: self.load(key), self.path)

    def close(self):
        self.raw.close()
